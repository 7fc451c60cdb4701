"""ONNX tensors read safely (dtypes, external data); apart from onnx_import.py so converters can read them too."""
from __future__ import annotations

import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch

from ..ir import dtype as to_dtype
from ..ir.packing import unpack_bits
from .errors import FrontendError

# ONNX TensorProto.DataType -> IR dtype name
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 16: "bfloat16"}


EXTERNAL_KEYS = ("location", "offset", "length", "checksum")     # checksum: recorded by some exporters, unused
MAX_TENSOR_BYTES = 1 << 40


def _external_bytes(t, base_dir: Path | None, nbytes: int) -> bytes:
    """The ``nbytes`` bytes of a tensor's external data. Everything is checked before the file is
    read: a plain relative location inside ``base_dir`` (no ``..``, absolute path or symbolic link
    on the way), a regular file with no other hard link (checked on the opened descriptor), and
    offset + length (which must equal ``nbytes``) within the file's real size."""
    if base_dir is None:
        raise FrontendError(f"tensor {t.name}: external data is only allowed for initializers")
    info = {e.key: e.value for e in t.external_data}
    for key in info:
        if key not in EXTERNAL_KEYS:
            warnings.warn(f"tensor {t.name}: ignoring unknown external-data key {key!r}", stacklevel=3)
    loc = info.get("location", "")
    if (not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or ".." in Path(loc).parts or "\\" in loc
            or "\0" in loc):
        raise FrontendError(f"tensor {t.name}: refusing external data location {loc!r} "
                            "(must be a plain relative path inside the model's directory)")
    p = base_dir
    for part in Path(loc).parts:
        p = p / part
        if p.is_symlink():
            raise FrontendError(f"tensor {t.name}: refusing external data {loc!r}: {part} is a symbolic link")
    offset, length = info.get("offset", "0"), info.get("length")
    if not offset.isdigit() or (length is not None and not length.isdigit()):
        raise FrontendError(f"tensor {t.name}: external data offset/length are not non-negative integers "
                            f"({offset!r}, {length!r})")
    offset = int(offset)
    if length is not None and int(length) != nbytes:
        raise FrontendError(f"tensor {t.name}: external data length is {length} bytes, {list(t.dims)} of its "
                            f"type needs {nbytes}")
    path = base_dir / loc
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FrontendError(f"tensor {t.name}: external data file {path} does not exist") from None
    except OSError as e:
        raise FrontendError(f"tensor {t.name}: cannot open external data {loc!r}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise FrontendError(f"tensor {t.name}: refusing external data {loc!r}: not a regular file")
        if st.st_nlink > 1:
            raise FrontendError(f"tensor {t.name}: refusing external data {loc!r}: the file has hard links")
        if offset + nbytes > st.st_size:
            raise FrontendError(f"tensor {t.name}: external data range [{offset}, {offset + nbytes}) exceeds "
                                f"{loc} ({st.st_size} bytes)")
        f.seek(offset)
        return f.read(nbytes)


FOUR_BIT = {21: False, 22: True}     # UINT4, INT4 -> signed?


def _four_bit(t, raw: bytes, numel: int) -> torch.Tensor:
    """ONNX uint4/int4 (two per byte, low nibble first) -> uint8/int8 codes."""
    if len(raw) != (numel + 1) // 2:
        raise FrontendError(f"tensor {t.name}: {len(raw)} bytes cannot hold {numel} 4-bit values")
    packed = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    vals = unpack_bits(packed.reshape(1, -1), 4, numel).reshape(-1) if numel else torch.empty(0, dtype=torch.int64)
    if FOUR_BIT[t.data_type]:
        return (vals - ((vals >> 3) & 1) * 16).to(torch.int8)
    return vals.to(torch.uint8)


def _checked_size(t, itemsize_bits: int) -> tuple[list[int], int, int]:
    """(dims, element count, bytes) of a tensor, refusing negative dims and more than
    MAX_TENSOR_BYTES before anything is allocated (Python integers: no overflow on the way)."""
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        raise FrontendError(f"tensor {t.name}: negative dimension in {dims}")
    numel = math.prod(dims)
    nbytes = (numel * itemsize_bits + 7) // 8
    if nbytes > MAX_TENSOR_BYTES:
        raise FrontendError(f"tensor {t.name}: {dims} needs {nbytes} bytes, more than nnforge reads "
                            f"({MAX_TENSOR_BYTES})")
    return dims, numel, nbytes


def tensor_from_proto(t, base_dir: Path | None) -> torch.Tensor:
    """An ONNX TensorProto as a torch tensor, checking sizes before allocating. 4-bit types come
    back unpacked as uint8/int8 codes."""
    from onnx import TensorProto, numpy_helper
    external = t.data_location == TensorProto.EXTERNAL
    if t.data_type in FOUR_BIT:
        dims, numel, nbytes = _checked_size(t, 4)
        raw = _external_bytes(t, base_dir, nbytes) if external else t.raw_data
        return _four_bit(t, raw, numel).reshape(dims)
    if t.data_type not in ONNX_DTYPES:
        raise FrontendError(f"tensor {t.name}: ONNX data type {t.data_type} is not supported")
    dt = to_dtype(ONNX_DTYPES[t.data_type])
    itemsize = torch.empty((), dtype=dt.torch_dtype).element_size()
    dims, numel, nbytes = _checked_size(t, 8 * itemsize)
    if external or t.HasField("raw_data"):
        raw = _external_bytes(t, base_dir, nbytes) if external else t.raw_data
        if len(raw) != nbytes:
            raise FrontendError(f"tensor {t.name}: {'external' if external else 'raw'} data has {len(raw)} bytes, "
                                f"{dims} of {dt} needs {nbytes}")
        out = torch.frombuffer(bytearray(raw), dtype=dt.torch_dtype) if numel else torch.empty(0, dtype=dt.torch_dtype)
        return out.reshape(dims).clone()
    if dt.name == "bfloat16":        # typed storage: one bfloat16 bit pattern per int32_data entry
        if len(t.int32_data) != numel:
            raise FrontendError(f"tensor {t.name}: holds {len(t.int32_data)} values, {dims} needs {numel}")
        bits = torch.tensor(np.asarray(t.int32_data, dtype=np.int32).astype(np.uint16).view(np.int16))
        return bits.view(torch.bfloat16).reshape(dims)
    try:
        array = np.array(numpy_helper.to_array(t))
    except ValueError as e:      # typed data (float_data, int32_data...) whose count disagrees with dims
        raise FrontendError(f"tensor {t.name}: its data does not fit {dims} of {dt}: {e}") from None
    if array.size != numel:
        raise FrontendError(f"tensor {t.name}: holds {array.size} values, {dims} needs {numel}")
    return torch.from_numpy(array).reshape(dims)

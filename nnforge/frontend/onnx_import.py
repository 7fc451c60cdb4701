"""ONNX (opset 13+) -> IR.

Converters live in :mod:`.onnx_ops`, one small function per ONNX op type. Shape computations
(Shape, Gather, Concat, Slice, arithmetic on their results) are evaluated while importing, over
symbolic dims, so that Reshape/Expand/Slice/Range/ConstantOfShape end up with static (possibly
symbolic) IR attributes rather than run-time shape tensors. Nodes whose inputs are all constants
are folded on the spot.

External data is read by nnforge itself (never by onnx.load): a location must be a plain relative
path inside the model's directory (no ``..``, no absolute path, no symlink, no hard-linked file),
offset/length must fit the file's real size, and every tensor's byte count is checked against
its dims x dtype before anything is read or allocated. Unknown external-data keys are ignored
with a warning.

    >>> g = from_onnx("model.onnx")
"""
from __future__ import annotations

import math
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..ir import Dense, Graph, Value, dtype as to_dtype, sanitize_name
from ..ir.graph import GraphError
from ..ir.ops import RunContext, get_op
from ..ir.packing import unpack_bits
from ..ir.types import TensorType
from ..ir.verifier import verify
from .errors import FrontendError, Unsupported, UnsupportedError, UnsupportedOpsError

MIN_OPSET = 13
FOLD_LIMIT = 1 << 20        # constant-fold node outputs up to this many elements

# ONNX TensorProto.DataType -> IR dtype name
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 16: "bfloat16"}


@dataclass
class DimVec:
    """A small integer tensor (0-d or 1-d) whose entries are dims known while importing:
    the result of Shape() and arithmetic on it."""
    dims: list
    scalar: bool = False

    @property
    def static(self) -> bool:
        return all(isinstance(d, int) for d in self.dims)


class OnnxContext:
    """State shared by ONNX converters."""

    def __init__(self, graph: Graph, opset: int):
        self.g = graph
        self.opset = opset
        self.env: dict[str, object] = {}          # ONNX name -> Value | DimVec | None (absent optional)
        self.node = None
        self.code_bits: dict[str, int] = {}      # initializers read from 4-bit ONNX types

    # --- reading ------------------------------------------------------------------------------
    def has(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] != ""

    def raw(self, i: int):
        if not self.has(i):
            return None
        name = self.node.input[i]
        if name not in self.env:
            raise FrontendError(f"node {self.node.name or self.node.op_type} reads {name!r}, which is defined nowhere")
        return self.env[name]

    def value(self, i: int) -> Value | None:
        """Input ``i`` as an IR value (dim vectors with known entries become constants)."""
        v = self.raw(i)
        return v if v is None or isinstance(v, Value) else self.materialize(v, self.node.input[i])

    def materialize(self, v: "DimVec", name: str) -> Value:
        if v.static:
            return self.const(torch.tensor(v.dims[0] if v.scalar else v.dims, dtype=torch.int64))
        raise UnsupportedError(f"{name} is a symbolic shape {v.dims} used as tensor data")

    def const_tensor(self, i: int) -> torch.Tensor | None:
        """Input ``i`` as a tensor when it is a constant, else None."""
        v = self.raw(i)
        if isinstance(v, DimVec):
            return torch.tensor(v.dims[0] if v.scalar else v.dims, dtype=torch.int64) if v.static else None
        if isinstance(v, Value) and v.is_weight and isinstance(v.encoding, Dense):
            return v.encoding.data
        return None

    def dims(self, i: int) -> list | None:
        """Input ``i`` as a list of dims (from a dim vector or an integer constant), else None."""
        v = self.raw(i)
        if isinstance(v, DimVec):
            return list(v.dims)
        t = self.const_tensor(i)
        if t is not None and not t.is_floating_point() and t.dim() <= 1:
            return [int(x) for x in t.reshape(-1).tolist()]
        return None

    def attr(self, name: str, default=None):
        from onnx import helper
        for a in self.node.attribute:
            if a.name == name:
                v = helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    # --- emitting -----------------------------------------------------------------------------
    def const(self, t: torch.Tensor, base: str = "const") -> Value:
        return self.g.add_weight(self.g.fresh_name(base), Dense(t))

    def emit(self, op: str, *inputs, **attrs) -> Value:
        """Add an IR node; if every input is a constant, fold it into a constant instead."""
        base = self.node.name or self.node.output[0] or self.node.op_type
        name = self.g.fresh_name(sanitize_name(base), node=True)
        meta = {"source_op": self.node.op_type}
        if self.node.name:
            meta["onnx_node"] = self.node.name
        ins = [v for v in inputs if v is not None]
        if ins and all(v.is_weight and isinstance(v.encoding, Dense) for v in ins):
            opdef = get_op(op)
            attrs_n = opdef.check_attrs(attrs, where=f"node {name} ({op})")
            t = opdef.infer_types([None if v is None else v.type for v in inputs], attrs_n, f"node {name} ({op})")[0]
            if t.is_static and math.prod(t.shape) <= FOLD_LIMIT:
                args = [None if v is None else v.encoding.data for v in inputs]
                out = opdef.run(RunContext(), args, attrs_n)[0]
                return self.const(out.to(t.dtype.torch_dtype), f"{name}_const")
        return self.g.add_node(op, inputs, attrs, name=name, output_names=[self.g.fresh_name(name)], meta=meta).output

    def cast(self, v: Value, dt) -> Value:
        dt = to_dtype(dt)
        return v if v.dtype == dt else self.emit("cast", v, dtype=dt)


# --- loading with safe external data -------------------------------------------------------------
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


def _input_type(vi, names: dict[str, str]) -> TensorType:
    tt = vi.type.tensor_type
    if tt.elem_type not in ONNX_DTYPES:
        raise FrontendError(f"input {vi.name}: ONNX element type {tt.elem_type} is not supported")
    shape = []
    for axis, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        else:
            raw = d.dim_param or f"{vi.name}_{axis}"
            if raw not in names:
                cand = sanitize_name(raw).replace(".", "_")
                while cand in names.values():
                    cand += "_"
                names[raw] = cand
            shape.append(names[raw])
    return TensorType(to_dtype(ONNX_DTYPES[tt.elem_type]), tuple(shape))


def load_onnx(path: str | Path):
    import onnx
    path = Path(path)
    if not path.is_file():
        raise FrontendError(f"{path}: no such ONNX file")
    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:
        raise FrontendError(f"{path}: not a readable ONNX model: {type(e).__name__}: {e}") from None


def from_onnx(path: str | Path, *, name: str | None = None, output_names: list[str] | None = None,
              converters: dict[str, Callable] | None = None) -> Graph:
    """Read an ONNX model file into an IR graph."""
    from .onnx_ops import CONVERTERS
    path = Path(path)
    model = load_onnx(path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise FrontendError(f"{path}: opset {opset}; nnforge reads ONNX opset {MIN_OPSET} or newer "
                            "(upgrade it with onnx.version_converter)")
    table = {**CONVERTERS, **(converters or {})}
    og = model.graph
    generic = {"", "main_graph", "torch_jit", "torch-jit-export", "graph"}
    g = Graph(name or (path.stem if og.name in generic else og.name))
    cx = OnnxContext(g, opset)
    init_names = {t.name for t in og.initializer}
    sym_names: dict[str, str] = {}
    for vi in og.input:
        if vi.name in init_names:
            continue
        cx.env[vi.name] = g.add_input(g.fresh_name(vi.name), _input_type(vi, sym_names))
    for t in og.initializer:
        cx.env[t.name] = g.add_weight(g.fresh_name(t.name), Dense(tensor_from_proto(t, path.parent)))
        if t.data_type in FOUR_BIT:
            cx.code_bits[t.name] = 4

    problems: list[Unsupported] = []
    poisoned: set[str] = set()
    for i, node in enumerate(og.node):
        label = node.name or f"{node.op_type}_{i}"
        if any(x in poisoned for x in node.input):
            poisoned.update(node.output)
            continue
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        conv = table.get(key)
        if conv is None:
            problems.append(Unsupported(key, label, str(path.name)))
            poisoned.update(node.output)
            continue
        cx.node = node
        try:
            outs = conv(cx)
        except (UnsupportedError, GraphError, ValueError) as e:      # ValueError: shape rules
            problems.append(Unsupported(key, label, str(path.name), str(e)))
            poisoned.update(node.output)
            continue
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        for o_name, o in zip(node.output, outs):
            if o_name:
                cx.env[o_name] = o
    if problems:
        raise UnsupportedOpsError(str(path), problems)

    outputs = []
    for vi in og.output:
        v = cx.env.get(vi.name)
        if isinstance(v, DimVec) and v.static:
            v = cx.materialize(v, vi.name)
        if not isinstance(v, Value):
            raise FrontendError(f"{path}: graph output {vi.name} is not a tensor computed by the graph")
        outputs.append(v)
    g.set_outputs(outputs)
    g.name_outputs(output_names or [sanitize_name(vi.name) for vi in og.output])
    g.remove_unused_weights()
    g.meta.update({"frontend": "onnx", "opset": opset, "producer": model.producer_name})
    return verify(g)


def input_specs(path: str | Path) -> tuple[list[tuple[str, TensorType]], dict[str, str]]:
    """([(input name, type)], {dim name as written in the file: its symbol}) of an ONNX model's
    inputs (initializers listed as inputs excluded)."""
    model = load_onnx(path)
    init_names = {t.name for t in model.graph.initializer}
    names: dict[str, str] = {}
    specs = [(vi.name, _input_type(vi, names)) for vi in model.graph.input if vi.name not in init_names]
    return specs, names


def example_inputs_for(path: str | Path, dims: dict[str, int] | None = None, seed: int = 0) -> tuple:
    """Random inputs matching an ONNX model's inputs; a symbolic dim takes ``dims[name]`` (its
    dim_param as written in the file) or 1. Integer inputs get 0/1 values (valid ids and masks).
    A name in ``dims`` that is no symbolic dim of the model is an error listing those that are."""
    specs, names = input_specs(path)
    dims = dims or {}
    unknown = sorted(set(dims) - set(names) - set(names.values()))
    if unknown:
        have = ", ".join(sorted(names)) or "none (every input dim is fixed)"
        raise FrontendError(f"{path}: no symbolic input dim named {', '.join(unknown)}; its symbolic dims: {have}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _, t in specs:
        sizes = {sym_name: dims.get(raw, dims.get(sym_name, 1)) for raw, sym_name in names.items()}
        shape = [d if isinstance(d, int) else sizes[d] for d in t.shape]
        if t.dtype.is_float:
            out.append(torch.randn(shape, generator=gen).to(t.dtype.torch_dtype))
        elif t.dtype.name == "bool":
            out.append(torch.ones(shape, dtype=torch.bool))
        else:
            out.append(torch.randint(0, 2, shape, generator=gen).to(t.dtype.torch_dtype))
    return tuple(out)

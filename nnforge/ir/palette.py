"""The ``Palettized`` encoding: n-bit indices into a look-up table of float values.

This is Core ML's ``constexpr_lut_to_dense`` (what coremltools' palettisation produces): each
weight is stored as a 1..8-bit index, and the table holds the 2^bits values the indices stand for.
One table serves the whole tensor, or one serves each group of ``group_size`` consecutive rows
(output channels), which is coremltools' "per grouped channel" granularity.

Layout, on the 2-D view of encodings.py (rows = first axis, columns = all other axes flattened):

    indices  uint8 [rows, ceil(cols*bits/8)]   packed with packing.pack_bits, one row at a time
    lut      float16/float32 [rows // group_size, 2^bits]
    decode:  w[r, c] = lut[r // group_size, index[r, c]]

    >>> enc = Palettized.from_indices(idx, lut, bits=4, shape=(64, 128), group_size=16)
    >>> enc.describe()
    'palettized 4-bit, f16 LUT per 16 rows'
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import packing
from .dtypes import DType, dtype as _dtype, float32
from .encodings import Encoding, EncodingError, register_encoding, rows_cols

LUT_DTYPES = (torch.float16, torch.float32)


@register_encoding
@dataclass(frozen=True, eq=False)
class Palettized(Encoding):
    """Weights as packed n-bit indices into per-tensor or per-row-group look-up tables."""
    kind: ClassVar[str] = "palettized"
    shape: tuple[int, ...]
    bits: int
    indices: torch.Tensor          # uint8 [rows, ceil(cols*bits/8)], packed
    lut: torch.Tensor              # float16/float32 [rows // group_size, 2**bits]
    group_size: int                # rows sharing one LUT; rows for one LUT per tensor
    out_dtype: DType = float32

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "out_dtype", _dtype(self.out_dtype))
        rows, cols = rows_cols(self.shape)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise EncodingError(f"Palettized supports 1..8-bit indices, got bits={self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                or not 1 <= self.group_size <= max(rows, 1) or rows % self.group_size:
            raise EncodingError(f"Palettized: group_size {self.group_size!r} must divide the {rows} rows of a "
                                f"weight of shape {self.shape}")
        want = (rows, packing.packed_cols(cols, self.bits))
        if not isinstance(self.indices, torch.Tensor) or self.indices.dtype != torch.uint8 \
                or tuple(self.indices.shape) != want:
            got = (self.indices.dtype, tuple(self.indices.shape)) if isinstance(self.indices, torch.Tensor) \
                else type(self.indices).__name__
            raise EncodingError(f"Palettized indices must be uint8 {want} for {self.bits}-bit indices of shape "
                                f"{self.shape}, got {got}")
        lut_shape = (rows // self.group_size, 1 << self.bits)
        if not isinstance(self.lut, torch.Tensor) or tuple(self.lut.shape) != lut_shape:
            got = tuple(self.lut.shape) if isinstance(self.lut, torch.Tensor) else type(self.lut).__name__
            raise EncodingError(f"Palettized LUT must be [{lut_shape[0]} groups, {lut_shape[1]} entries] for "
                                f"{self.bits}-bit indices and {self.group_size} rows per LUT, got {got}")
        if self.lut.dtype not in LUT_DTYPES:
            raise EncodingError(f"Palettized LUT must be float16 or float32, got {self.lut.dtype}")

    @property
    def dtype(self) -> DType:
        return self.out_dtype

    @property
    def groups(self) -> int:
        return self.lut.shape[0]

    def index_values(self) -> torch.Tensor:
        """Indices as int64 [rows, cols]."""
        _, cols = rows_cols(self.shape)
        return packing.unpack_bits(self.indices, self.bits, cols)

    def decode(self, dtype=None):
        rows, _ = rows_cols(self.shape)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        group = (torch.arange(rows) // self.group_size).unsqueeze(1)
        w = self.lut.to(work)[group, self.index_values()]
        return w.reshape(self.shape).to(dtype or self.out_dtype.torch_dtype)

    def tensors(self):
        return {"indices": self.indices, "lut": self.lut}

    def params(self):
        return {"shape": list(self.shape), "bits": self.bits, "group_size": self.group_size,
                "out_dtype": self.out_dtype.name}

    @classmethod
    def from_parts(cls, params, tensors):
        try:
            return cls(shape=tuple(params["shape"]), bits=params["bits"], indices=tensors["indices"],
                       lut=tensors["lut"], group_size=params["group_size"],
                       out_dtype=params.get("out_dtype", "float32"))
        except KeyError as e:
            raise EncodingError(f"Palettized: missing part {e.args[0]!r}") from None

    @classmethod
    def from_indices(cls, indices: torch.Tensor, lut: torch.Tensor, *, bits: int, shape,
                     group_size: int | None = None, out_dtype=float32) -> "Palettized":
        """Build from unpacked indices (any shape holding rows*cols values) and a LUT
        [groups, 2^bits]; ``group_size`` None means one LUT for the whole tensor."""
        shape = tuple(int(s) for s in shape)
        rows, cols = rows_cols(shape)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise EncodingError(f"Palettized supports 1..8-bit indices, got bits={bits!r}")
        if indices.numel() != rows * cols:
            raise EncodingError(f"Palettized indices hold {indices.numel()} values; shape {shape} needs "
                                f"[{rows}, {cols}]")
        idx = indices.reshape(rows, cols).to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 1 << bits):
            raise EncodingError(f"Palettized indices must lie in [0, {1 << bits}) for {bits}-bit indices, got "
                                f"[{int(idx.min())}, {int(idx.max())}]")
        return cls(shape, bits, packing.pack_bits(idx, bits), lut, rows if group_size is None else group_size,
                   out_dtype)

    def describe(self):
        per = "per tensor" if self.groups == 1 else \
            "per row" if self.group_size == 1 else f"per {self.group_size} rows"
        lut = "f16" if self.lut.dtype == torch.float16 else "f32"
        return f"palettized {self.bits}-bit, {lut} LUT {per}"

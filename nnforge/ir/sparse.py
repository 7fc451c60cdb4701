"""Sparse weights: a pattern, only the kept values (themselves an encoding), and compact metadata.

Three patterns, each with the storage its kernels read (rows and columns are the 2-D view of
:mod:`.encodings`: output channels x everything else, the reduction axis being the columns):

- ``N:M`` (2:4, 4:8, 1:4 ...) along the columns: every group of M consecutive columns of a row
  keeps exactly N values. The kept values form a dense ``[rows, cols*N/M]`` matrix (group g's
  values at columns g*N .. g*N+N-1, in increasing column order) and the metadata holds, per kept
  value, its index inside its group, packed at ceil(log2 M) bits (2 bits for 2:4, the metadata of
  NVIDIA's sparse tensor cores). Because the kept values are a plain matrix, they can be
  quantised like any weight, groups running along the compressed columns (MARLIN's 2:4 + int4).
- ``block RxC`` (1x4, 4x1, 16x1 ...): whole RxC blocks are kept or dropped, stored as BSR: a row
  pointer per block-row (int32, ``block_rows + 1`` entries), the block-column of every kept block
  (int16, or int32 past 32767 block-columns) in increasing order within a block-row, and the kept
  blocks' values as ``[kept_blocks, R, C]``.
- ``unstructured``: a bitmask (1 bit per weight, packed little-endian per row as in packing.py)
  and the kept values as a vector in row-major order.

The kept values are any non-sparse :class:`Encoding` of the layout above (``Dense``, ``IntQuant``,
``MiniFloat``...); their tensors are stored under ``values.<field>`` and their kind and parameters
inside this encoding's parameters, so the serializer round-trips the nesting without knowing it.
An optional ``row_scale`` (one float per output row) multiplies the decoded rows: it lets the
kept values of a block pattern be plain integer codes with one scale per output channel (a kept
block's values span several rows, so the values' own scales could only be per block). That is the
layout integer SpMM kernels want: they accumulate u8 x s8 products in int32 along a whole row
and rescale once per output.

    >>> w = torch.randn(8, 16); keep = (w.abs().reshape(8, 4, 4).argsort(-1).argsort(-1) >= 2).reshape(8, 16)
    >>> enc = Sparse.from_mask(w, keep, "2:4")
    >>> torch.equal(enc.decode(), w * keep)
    True
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from . import packing
from .dtypes import DType
from .encodings import Dense, Encoding, EncodingError, encoding_from_parts, register_encoding, rows_cols

PATTERN_HELP = "N:M such as '2:4', '4:8', '1:4'; 'blockRxC' such as 'block4x1', 'block1x4', 'block16x1'; 'unstructured'"


@dataclass(frozen=True)
class SparsePattern:
    """A parsed sparsity pattern: ``kind`` "nm" (n of every m), "block" (r x c) or "unstructured"."""
    kind: str
    n: int = 0
    m: int = 0
    r: int = 1
    c: int = 1

    @classmethod
    def parse(cls, spec) -> "SparsePattern":
        if isinstance(spec, SparsePattern):
            return spec
        text = spec.strip().lower() if isinstance(spec, str) else None
        if text == "unstructured":
            return cls("unstructured")
        nm = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text or "")
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if n > m:
                raise EncodingError(f"sparsity pattern {spec!r}: N={n} > M={m}; an N:M pattern keeps N of every M")
            if n < 1 or not 2 <= m <= 256:
                raise EncodingError(f"sparsity pattern {spec!r}: N:M needs 1 <= N <= M and 2 <= M <= 256")
            return cls("nm", n=n, m=m)
        block = re.fullmatch(r"block\s*(\d+)\s*x\s*(\d+)", text or "")
        if block:
            r, c = int(block.group(1)), int(block.group(2))
            if r < 1 or c < 1:
                raise EncodingError(f"sparsity pattern {spec!r}: block sides must be positive")
            return cls("block", r=r, c=c)
        raise EncodingError(f"unknown sparsity pattern {spec!r}; expected {PATTERN_HELP}")

    @property
    def name(self) -> str:
        return {"nm": f"{self.n}:{self.m}", "block": f"block{self.r}x{self.c}"}.get(self.kind, "unstructured")

    @property
    def index_bits(self) -> int:
        """Bits of one N:M metadata entry (an index inside a group of M)."""
        return max(1, math.ceil(math.log2(self.m)))

    def check_shape(self, rows: int, cols: int, what: str = "weight") -> None:
        """EncodingError unless a [rows, cols] matrix can carry this pattern."""
        if self.kind == "nm" and cols % self.m:
            raise EncodingError(f"{self.name} sparsity: M={self.m} does not divide the {cols} columns of the {what}")
        if self.kind == "block" and (rows % self.r or cols % self.c):
            raise EncodingError(f"{self.name} sparsity: {self.r}x{self.c} blocks do not tile the {what} "
                                f"({rows} rows x {cols} columns)")


def _index_dtype(block_cols: int) -> torch.dtype:
    return torch.int16 if block_cols <= torch.iinfo(torch.int16).max else torch.int32


@register_encoding
@dataclass(frozen=True, eq=False)
class Sparse(Encoding):
    """A weight that keeps only the values its ``pattern`` allows (see the module docstring for
    each pattern's layout). ``index``: N:M metadata, BSR block-column indices, or the bitmask;
    ``row_ptr``: BSR row pointers (block patterns only); ``row_scale``: optional float [rows]
    multiplying the decoded rows."""
    kind: ClassVar[str] = "sparse"
    shape: tuple[int, ...]
    pattern: SparsePattern
    values: Encoding
    index: torch.Tensor
    row_ptr: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "pattern", SparsePattern.parse(self.pattern))
        p = self.pattern
        if not isinstance(self.values, Encoding) or isinstance(self.values, Sparse):
            raise EncodingError(f"Sparse values must be a non-sparse Encoding, got {type(self.values).__name__}")
        rows, cols = rows_cols(self.shape)
        p.check_shape(rows, cols, f"weight of shape {self.shape}")
        if (self.row_ptr is not None) != (p.kind == "block"):
            raise EncodingError(f"{p.name} sparsity: row_ptr is for block patterns only, and block patterns need it")
        check = {"nm": self._check_nm, "block": self._check_bsr, "unstructured": self._check_bitmask}[p.kind]
        want = check(rows, cols)
        if tuple(self.values.shape) != want:
            raise EncodingError(f"{p.name} sparsity: kept values must have shape {want} for a weight of shape "
                                f"{self.shape}, got {tuple(self.values.shape)}")
        rs = self.row_scale
        if rs is not None and (not rs.is_floating_point() or tuple(rs.shape) != (rows,)):
            raise EncodingError(f"{p.name} sparsity: row_scale must be a float tensor [{rows}] (one per output row), "
                                f"got {rs.dtype} {tuple(rs.shape)}")

    # --- consistency of the metadata ----------------------------------------------------------
    def _check_nm(self, rows, cols):
        p = self.pattern
        kept = (rows, cols // p.m * p.n)
        packed = (rows, packing.packed_cols(kept[1], p.index_bits))
        if self.index.dtype != torch.uint8 or tuple(self.index.shape) != packed:
            raise EncodingError(f"{p.name} metadata must be uint8 {packed} ({p.index_bits}-bit indices of "
                                f"{kept[1]} kept values per row), got {self.index.dtype} {tuple(self.index.shape)}")
        idx = self.group_indices()
        if idx.numel() and (int(idx.max()) >= p.m or (p.n > 1 and bool((idx.diff(dim=-1) <= 0).any()))):
            raise EncodingError(f"{p.name} metadata does not match the pattern: indices must be distinct, "
                                f"increasing and below M={p.m} within every group")
        return kept

    def _check_bsr(self, rows, cols):
        p, rp, ix = self.pattern, self.row_ptr, self.index
        brows, bcols = rows // p.r, cols // p.c
        if rp.dtype not in (torch.int32, torch.int64) or tuple(rp.shape) != (brows + 1,):
            raise EncodingError(f"{p.name} row_ptr must be int32 [{brows + 1}] (one per block-row, plus one), got "
                                f"{rp.dtype} {tuple(rp.shape)}")
        if ix.dtype not in (torch.int16, torch.int32, torch.int64) or ix.dim() != 1:
            raise EncodingError(f"{p.name} block-column indices must be a 1-D integer tensor, got {ix.dtype} "
                                f"{tuple(ix.shape)}")
        rp64 = rp.to(torch.int64)
        if int(rp64[0]) != 0 or bool((rp64.diff() < 0).any()) or int(rp64[-1]) != ix.numel():
            raise EncodingError(f"{p.name} row_ptr must start at 0, never decrease and end at the {ix.numel()} "
                                f"kept blocks")
        col = ix.to(torch.int64)
        block_row = self._block_rows()
        same_row = block_row[1:] == block_row[:-1]
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= bcols
                            or bool((col.diff()[same_row] <= 0).any())):
            raise EncodingError(f"{p.name} block-column indices must lie in [0, {bcols}) and increase within "
                                f"each block-row")
        return (ix.numel(), p.r, p.c)

    def _check_bitmask(self, rows, cols):
        want = (rows, packing.packed_cols(cols, 1))
        if self.index.dtype != torch.uint8 or tuple(self.index.shape) != want:
            raise EncodingError(f"unstructured sparsity: the bitmask must be uint8 {want}, got {self.index.dtype} "
                                f"{tuple(self.index.shape)}")
        return (int(self.bitmask().sum()),)

    # --- reading --------------------------------------------------------------------------------
    def group_indices(self) -> torch.Tensor:
        """N:M: each kept value's index inside its group, int64 [rows, groups, N]."""
        rows, cols = rows_cols(self.shape)
        kept = cols // self.pattern.m * self.pattern.n
        return packing.unpack_bits(self.index, self.pattern.index_bits, kept).reshape(rows, -1, self.pattern.n)

    def bitmask(self) -> torch.Tensor:
        rows, cols = rows_cols(self.shape)
        return packing.unpack_bits(self.index, 1, cols).to(torch.bool)

    def _block_rows(self) -> torch.Tensor:
        """BSR: the block-row of every kept block."""
        counts = self.row_ptr.to(torch.int64).diff()
        return torch.repeat_interleave(torch.arange(counts.numel()), counts)

    def mask(self) -> torch.Tensor:
        """Where the kept values sit: bool, in the weight's shape."""
        rows, cols = rows_cols(self.shape)
        p = self.pattern
        if p.kind == "unstructured":
            return self.bitmask().reshape(self.shape)
        out = torch.zeros(rows, cols, dtype=torch.bool)
        if p.kind == "nm":
            out.view(rows, -1, p.m).scatter_(2, self.group_indices(), True)
        else:
            out.view(rows // p.r, p.r, cols // p.c, p.c)[self._block_rows(), :, self.index.to(torch.int64), :] = True
        return out.reshape(self.shape)

    @property
    def dtype(self) -> DType:
        return self.values.dtype

    @property
    def density(self) -> float:
        """Fraction of the weights kept."""
        return self.values.numel / max(self.numel, 1)

    def decode(self, dtype=None):
        rows, cols = rows_cols(self.shape)
        p = self.pattern
        vals = self.values.decode(dtype)
        out = torch.zeros(rows, cols, dtype=vals.dtype)
        if p.kind == "nm":
            out.view(rows, -1, p.m).scatter_(2, self.group_indices(), vals.reshape(rows, -1, p.n))
        elif p.kind == "block":
            out.view(rows // p.r, p.r, cols // p.c, p.c)[self._block_rows(), :, self.index.to(torch.int64), :] = vals
        else:
            out[self.bitmask()] = vals
        if self.row_scale is not None:
            out *= self.row_scale.to(out.dtype)[:, None]
        return out.reshape(self.shape)

    # --- storing --------------------------------------------------------------------------------
    def tensors(self):
        t = {"index": self.index}
        if self.row_ptr is not None:
            t["row_ptr"] = self.row_ptr
        if self.row_scale is not None:
            t["row_scale"] = self.row_scale
        t.update({f"values.{k}": v for k, v in self.values.tensors().items()})
        return t

    def params(self):
        return {"shape": list(self.shape), "pattern": self.pattern.name,
                "values": {"kind": self.values.kind, "params": self.values.params()}}

    @classmethod
    def from_parts(cls, params, tensors):
        nested = params["values"]
        inner = {k[len("values."):]: v for k, v in tensors.items() if k.startswith("values.")}
        try:
            values = encoding_from_parts(nested["kind"], nested["params"], inner)
        except EncodingError as e:
            raise EncodingError(f"Sparse values: {e}") from None
        return cls(tuple(params["shape"]), params["pattern"], values, tensors["index"], tensors.get("row_ptr"),
                   tensors.get("row_scale"))

    @classmethod
    def from_mask(cls, w: torch.Tensor, keep: torch.Tensor, pattern,
                  encode_values: Callable[[torch.Tensor], Encoding] | None = None, *,
                  row_scale: torch.Tensor | None = None) -> "Sparse":
        """The sparse encoding of ``w`` keeping the entries where ``keep`` is True (which must
        follow ``pattern``). ``encode_values`` turns the kept values, in the pattern's layout
        (N:M: [rows, kept_cols]; block: [kept_blocks, R, C]; unstructured: [kept]), into their
        encoding; the default stores them as they are (Dense). With ``row_scale``, ``w`` holds
        the values already divided by it (e.g. integer codes)."""
        p = SparsePattern.parse(pattern)
        shape = tuple(w.shape)
        rows, cols = rows_cols(shape)
        if tuple(keep.shape) != shape:
            raise EncodingError(f"mask shape {tuple(keep.shape)} differs from the weight's {shape}")
        p.check_shape(rows, cols, f"weight of shape {shape}")
        w2, k2 = w.detach().reshape(rows, cols), keep.reshape(rows, cols).to(torch.bool)
        row_ptr = None
        if p.kind == "nm":
            kg = k2.reshape(rows, -1, p.m)
            if not bool((kg.sum(-1) == p.n).all()):
                raise EncodingError(f"mask does not follow {p.name}: every group of {p.m} columns must keep exactly "
                                    f"{p.n}")
            pos = torch.arange(p.m).expand_as(kg)[kg].reshape(rows, -1)
            values = w2.reshape(rows, -1, p.m)[kg].reshape(rows, -1)
            index = packing.pack_bits(pos, p.index_bits)
        elif p.kind == "block":
            kb = k2.reshape(rows // p.r, p.r, cols // p.c, p.c)
            blocks = kb.any(3).any(1)
            if not torch.equal(kb.all(3).all(1), blocks):
                raise EncodingError(f"mask does not follow {p.name}: blocks must be kept or dropped whole")
            nz = blocks.nonzero()                     # row-major: BSR order
            values = w2.reshape(rows // p.r, p.r, cols // p.c, p.c)[nz[:, 0], :, nz[:, 1], :]
            index = nz[:, 1].to(_index_dtype(cols // p.c))
            row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), blocks.sum(1).cumsum(0)]).to(torch.int32)
        else:
            values = w2[k2]
            index = packing.pack_bits(k2.to(torch.int64), 1)
        enc = (encode_values or Dense)(values.contiguous())
        return cls(shape, p, enc, index, row_ptr, row_scale)

    def describe(self):
        p = self.pattern
        kept = "" if p.kind == "nm" else f" {100 * (1 - self.density):.0f}%"
        rows = ", one scale per output row" if self.row_scale is not None else ""
        return f"{p.name} sparse{kept} ({self.values.describe()}{rows})"


__all__ = ["Sparse", "SparsePattern", "PATTERN_HELP"]

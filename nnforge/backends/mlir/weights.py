"""Encoded weights as small torch modules: integer (or index) buffers plus the torch ops that decode
them, so that torch.export, and then torch-mlir, see integer constants and the dequantisation, not
a pre-decoded float weight.

Whether a layer's weight runs natively is the capability table's answer (:mod:`.capabilities`),
asked once per weight in :func:`weight_module`; then one table, by encoding kind (``DECODERS``), of
builders ``fn(encoding, name, site, why) -> module`` builds it (its fallback form where ``why``
says the table did not take it). Calling the module returns the dense weight in the interpreter's
compute type (fp32), computed with the same float operations as ``Encoding.decode`` so the two
agree bit for bit on the CPU.

What each encoding becomes (codes are on the 2-D view of nnforge.ir.encodings: rows x cols). Every
stored code tensor is int8 (see ``Unpack``: TOSA has no unsigned integers):

- ``Dense``: the tensor itself (fp16/bf16 kept in their type, widened to fp32 in the module).
- ``IntQuant``: 8-bit codes as an int8 tensor [rows, cols] (signed codes as themselves, unsigned
  ones minus 128); 1/2/4-bit codes stay packed (the bytes of nnforge.ir.packing, half a byte per
  4-bit code) and are unpacked in the module with shifts and masks; 3/5/6/7-bit codes are widened
  to one byte per code (a reported Fallback). Scales stay float [R, G], zero points become float
  [R, G] (small integers: exact), act-order is an ``index_select`` of the columns.
- ``MiniFloat``: the code fields as int8 (FP8) or packed (FP4), decoded by a gather from the
  format's value table (2^bits floats); scales decoded to float [R, G] (E8M0 / E4M3 scale codes
  and the fp32 tensor scale folded in, exactly). FP6 codes are widened to one byte (Fallback).
- ``Palettized``: packed (1/2/4-bit) or one-byte indices and the LUT as it is, decoded by a gather.
- ``Sparse`` N:M: the kept values (any inner encoding, itself kept compressed) and the packed
  in-group indices; the dense weight is a select over the M positions of each group. Block (BSR)
  and unstructured patterns are decoded to dense at export (Fallback).
- ``LowRank``: its factors (each kept in its own encoding) and their product in the module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...ir import Dense, Encoding, IntQuant, LowRank, MiniFloat, Palettized, Sparse
from ...ir import minifloat as mf
from ...ir.encodings import rows_cols
from ...ir.packing import unpack_bits
from ...registry import Registry
from ..base import Fallback
from .capabilities import CAPABILITIES, nm_pattern, packs


@dataclass
class Site:
    """Where a weight is read: the layer op reading it as its weight (None for any other operand:
    a bias, a norm's parameters, a folded constant), the target, and the fallbacks reported."""
    op: str | None
    target: Any
    fallbacks: list[Fallback]

    def report(self, name: str, what: str, action: str, why: str) -> None:
        self.fallbacks.append(Fallback(name, what, f"{action} ({why})"))


DECODERS: Registry[Callable[[Encoding, str, Site, str], torch.nn.Module]] = Registry("mlir weight decoder")
decoder = DECODERS.register


def weight_module(enc: Encoding, name: str, site: Site) -> torch.nn.Module:
    """The module whose call returns ``enc`` decoded (fp32 for float weights): in the form
    :data:`CAPABILITIES` gives the layer reading it, or, where no row takes it, the decoder's
    fallback form (codes widened, parts decided one by one) or the decoded tensor, reported with
    why. Only layer weights run encoded; any other weight operand is read as a plain tensor."""
    if site.op is None:
        if enc.kind == "dense":
            return Constant(enc.data)
        why = "only the weight of a linear, matmul, conv or embedding runs encoded"
    else:
        _, why = CAPABILITIES.find(site.op, enc, site.target)
    fn = DECODERS.get(enc.kind) if site.op is not None else None
    if fn is None:
        site.report(name, enc.describe(), f"decoded to {enc.dtype.name} at export", why)
        return Constant(enc.decode(torch.float32 if enc.dtype.is_float else None))
    return fn(enc, name, site, why)


class Constant(torch.nn.Module):
    """A stored tensor; float tensors are returned in fp32 (the compute type)."""

    def __init__(self, data: torch.Tensor):
        super().__init__()
        self.register_buffer("data", data.detach().contiguous())

    def forward(self):
        return self.data.to(torch.float32) if self.data.is_floating_point() else self.data


@decoder("dense")
def _dense(enc: Dense, name, site, why):
    return Constant(enc.data)


class Unpack(torch.nn.Module):
    """Stored codes as a signed int8 tensor ``v`` with ``fields = v + base`` in [0, 2^bits).

    Every stored tensor is int8, because TOSA has no unsigned integers (torch-mlir maps uint8 to a
    signless i8 that TOSA reads as signed). 8-bit fields are stored minus 128 (``base`` = 128); 1, 2
    and 4-bit fields stay packed (the bytes of nnforge.ir.packing, reinterpreted as int8) and are
    unpacked with shifts and a mask, which ignore the sign; wider odd sizes (3, 5, 6, 7 bits) are
    stored one per byte (``widen``)."""

    def __init__(self, packed: torch.Tensor, bits: int, cols: int, widen: bool = False):
        super().__init__()
        self.bits, self.cols, self.packed = bits, cols, False
        if bits == 8:
            self.base = 128
            self.register_buffer("data", (packed.to(torch.int16) - 128).to(torch.int8))
        elif widen:
            self.base = 0
            self.register_buffer("data", unpack_bits(packed, bits, cols).to(torch.int8))
        else:
            self.base, self.packed = 0, True
            self.register_buffer("data", packed.contiguous().view(torch.int8))
            self.register_buffer("shifts", torch.arange(8 // bits, dtype=torch.int8) * bits)

    def forward(self):
        if not self.packed:
            return self.data
        rows, nbytes = self.data.shape
        full = (rows, nbytes, self.shifts.shape[0])       # spelled out: StableHLO's shifts do not broadcast
        fields = torch.bitwise_right_shift(self.data.unsqueeze(-1).expand(full), self.shifts.expand(full))
        fields = torch.bitwise_and(fields, (1 << self.bits) - 1).reshape(rows, -1)
        return fields if fields.shape[1] == self.cols else fields[:, : self.cols]


def code_storage(packed: torch.Tensor, bits: int, cols: int, name: str, what: str, site: Site, why: str) -> Unpack:
    """Packed codes kept packed where the module can unpack them, else (a weight the capability
    table did not take, ``why``) widened to one byte per code, reported."""
    if packs(bits):
        return Unpack(packed, bits, cols)
    site.report(name, what, f"{bits}-bit codes widened to one byte each (int8 [rows, {cols}]); "
                "the module keeps them as integers and decodes in place", why)
    return Unpack(packed, bits, cols, widen=True)


class Grouped(torch.nn.Module):
    """Multiplies (or offsets) [rows, cols] values by per-group parameters [R, G] (R = 1 or rows),
    groups of ``group_size`` consecutive columns; ragged last groups through an index."""

    def __init__(self, cols: int, group_size: int):
        super().__init__()
        self.cols, self.group_size = cols, group_size
        self.even = cols % group_size == 0
        if not self.even:
            self.register_buffer("group_of", torch.arange(cols, dtype=torch.int64) // group_size)

    def expand(self, p: torch.Tensor) -> torch.Tensor:
        """``p`` [R, G] as [R, cols] (or [R, G, group_size] flattened) for broadcasting."""
        if self.even:
            return p.unsqueeze(-1).expand(p.shape[0], p.shape[1], self.group_size).reshape(p.shape[0], self.cols)
        return p.index_select(1, self.group_of)


class ActOrder(torch.nn.Module):
    """Columns stored in act-order (GPTQ's ``perm``) put back in their original order; identity
    when the encoding has no permutation."""

    def __init__(self, perm: torch.Tensor | None):
        super().__init__()
        self.active = perm is not None
        if self.active:
            self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.index_select(1, self.inv_perm) if self.active else w


class IntQuantWeight(torch.nn.Module):
    """(code - zero_point) * scale, columns back in original order, reshaped."""

    def __init__(self, enc: IntQuant, name: str, site: Site, why: str):
        super().__init__()
        rows, cols = rows_cols(enc.shape)
        self.shape = tuple(enc.shape)
        self.codes = code_storage(enc.codes, enc.bits, cols, name, enc.describe(), site, why)
        # code = field - 2^(bits-1) for signed codes (offset binary), so code = stored + shift;
        # signed 8-bit codes are stored as themselves (shift 0)
        self.shift = float(self.codes.base - ((1 << (enc.bits - 1)) if enc.signed else 0))
        self.groups = Grouped(cols, enc.group_size)
        self.register_buffer("scale", enc.scale.contiguous())
        self.has_zero = enc.zero_point is not None
        if self.has_zero:
            self.register_buffer("zero", enc.zero_point.to(torch.float32))
        self.act_order = ActOrder(enc.perm)

    def forward(self):
        q = self.codes().to(torch.float32)
        if self.shift:
            q = q + self.shift
        if self.has_zero:
            q = q - self.groups.expand(self.zero)
        w = q * self.groups.expand(self.scale.to(torch.float32))
        return self.act_order(w).reshape(self.shape)


@decoder("int")
def _int(enc: IntQuant, name, site, why):
    return IntQuantWeight(enc, name, site, why)


class MiniFloatWeight(torch.nn.Module):
    """table[code] * scale, columns back in original order, reshaped."""

    def __init__(self, enc: MiniFloat, name: str, site: Site, why: str):
        super().__init__()
        rows, cols = rows_cols(enc.shape)
        self.shape, self.rows, self.cols = tuple(enc.shape), rows, cols
        self.codes = code_storage(enc.codes, enc.fmt.bits, cols, name, enc.describe(), site, why)
        self.register_buffer("table", mf.decode(torch.arange(1 << enc.fmt.bits), enc.fmt, torch.float32))
        self.register_buffer("scale", enc.scale_values(torch.float32))
        self.groups = Grouped(cols, enc.group_size)
        self.act_order = ActOrder(enc.perm)

    def forward(self):
        idx = self.codes().to(torch.int64).reshape(-1)
        if self.codes.base:
            idx = idx + self.codes.base
        q = self.table.index_select(0, idx).reshape(self.rows, self.cols)
        w = q * self.groups.expand(self.scale)
        return self.act_order(w).reshape(self.shape)


@decoder("minifloat")
def _minifloat(enc: MiniFloat, name, site, why):
    return MiniFloatWeight(enc, name, site, why)


class PalettizedWeight(torch.nn.Module):
    """lut[row // group_size, index], reshaped."""

    def __init__(self, enc: Palettized, name: str, site: Site, why: str):
        super().__init__()
        rows, cols = rows_cols(enc.shape)
        self.shape, self.rows, self.cols = tuple(enc.shape), rows, cols
        self.indices = code_storage(enc.indices, enc.bits, cols, name, enc.describe(), site, why)
        self.register_buffer("lut", enc.lut.contiguous())
        self.per_row = enc.groups > 1
        if self.per_row:       # where each row's table starts in the flattened LUT (+ the stored base)
            row_base = ((torch.arange(rows) // enc.group_size) << enc.bits) + self.indices.base
            self.register_buffer("row_base", row_base.unsqueeze(1))

    def forward(self):
        idx = self.indices().to(torch.int64)
        if self.per_row:
            idx = idx + self.row_base
        elif self.indices.base:
            idx = idx + self.indices.base
        w = self.lut.to(torch.float32).reshape(-1).index_select(0, idx.reshape(-1))
        return w.reshape(self.shape)


@decoder("palettized")
def _palettized(enc: Palettized, name, site, why):
    return PalettizedWeight(enc, name, site, why)


class NMSparseWeight(torch.nn.Module):
    """N:M: dense[r, g, m] = the kept value of group g whose in-group index is m, else 0."""

    def __init__(self, enc: Sparse, name: str, site: Site, why: str):
        super().__init__()
        rows, cols = rows_cols(enc.shape)
        p = enc.pattern
        self.shape, self.rows, self.n, self.m = tuple(enc.shape), rows, p.n, p.m
        kept = cols // p.m * p.n
        self.values = weight_module(enc.values, f"{name}.values", site)
        self.index = code_storage(enc.index, p.index_bits, kept, name, enc.describe(), site, why)
        self.register_buffer("positions", torch.arange(p.m, dtype=torch.int64))
        self.has_row_scale = enc.row_scale is not None
        if self.has_row_scale:
            self.register_buffer("row_scale", enc.row_scale.contiguous())

    def forward(self):
        vals = self.values().reshape(self.rows, -1, self.n, 1)
        idx = self.index().to(torch.int64) + self.index.base
        idx = idx.reshape(self.rows, -1, self.n, 1)
        hit = idx == self.positions                              # [rows, groups, N, M]
        w = torch.where(hit, vals, torch.zeros_like(vals)).sum(2).reshape(self.rows, -1)
        if self.has_row_scale:
            w = w * self.row_scale.to(torch.float32).unsqueeze(1)
        return w.reshape(self.shape)


@decoder("sparse")
def _sparse(enc: Sparse, name, site, why):
    if nm_pattern(enc) is None:
        return NMSparseWeight(enc, name, site, why)
    site.report(name, enc.describe(), f"{enc.pattern.name} sparsity decoded to a dense {enc.dtype.name} tensor "
                "at export", why)
    return Constant(enc.decode(torch.float32))


class LowRankWeight(torch.nn.Module):
    """b @ a (+ base), each part in its own encoding."""

    def __init__(self, enc: LowRank, name: str, site: Site):
        super().__init__()
        self.shape = tuple(enc.shape)
        self.a = weight_module(enc.a, f"{name}.a", site)
        self.b = weight_module(enc.b, f"{name}.b", site)
        self.base = None if enc.base is None else weight_module(enc.base, f"{name}.base", site)

    def forward(self):
        w = (self.b() @ self.a()).reshape(self.shape)
        return w if self.base is None else w + self.base()


@decoder("lowrank")
def _lowrank(enc: LowRank, name, site, why):
    return LowRankWeight(enc, name, site)     # each factor is decided, and reported, on its own


__all__ = ["DECODERS", "Site", "weight_module", "Constant", "Unpack"]

"""Weights of the HLS matrix unit, in the layout ``nf::matmat`` streams (see ``nnforge/hls/nf_matvec.h``),
and the one byte array (the weight memory, ``weights.bin``) that holds every layer's parts.

A weight encoding becomes: signed integer codes of the kept values [rows, kept] in stored column order,
the dense column of each kept value, and float group scales [1 or rows, groups] along the kept values.
Scales are then stored as int32 mantissas with one shift per layer (``scale = m * 2^-shift``,
``scale_bits`` significant bits), and codes as offset-binary ``w_bits``-bit fields packed as
``nnforge.ir.packing`` packs them, so an IntQuant's own code bytes are stored unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...ir import packing
from ...ir.encodings import Dense, IntQuant, MiniFloat
from ...ir.sparse import Sparse
from ..base import BackendError, Fallback


class WeightMemory:
    """Append-only byte image; every part starts 4-byte aligned; 4 bytes of padding at the end
    cover the kernels' 3-byte field reads."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0
        self._once: dict[bytes, int] = {}

    def add(self, data: bytes) -> int:
        pad = (-self.size) % 4
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad
        off = self.size
        self.parts.append(bytes(data))
        self.size += len(data)
        return off

    def add_once(self, data: bytes) -> int:
        """The offset of ``data``, added on its first call only (tables several layers read)."""
        data = bytes(data)
        if data not in self._once:
            self._once[data] = self.add(data)
        return self._once[data]

    def add_i32(self, values) -> int:
        v = np.asarray(values, dtype=np.int64).ravel()
        if v.size and (v.min() < -2**31 or v.max() >= 2**31):
            raise BackendError("a weight value does not fit the int32 words of the weight memory")
        return self.add(v.astype("<i4").tobytes())

    def image(self) -> bytes:
        return b"".join(self.parts) + b"\0" * 4


@dataclass
class MatWeights:
    n_out: int
    n_in: int
    sp_n: int
    sp_m: int
    w_bits: int
    group: int
    codes: np.ndarray      # int64 [n_out, n_kept], signed
    cols: np.ndarray       # int64 [n_out, n_kept], dense column of each kept value
    scales: np.ndarray     # float64 [1 or n_out, n_groups]
    fields: np.ndarray | None = None   # stored code fields [n_out, n_kept] when codes go through ``lut``
    lut: np.ndarray | None = None      # int64 [2^w_bits]: integer value of every code (minifloats)

    @property
    def val_bits(self) -> int:
        if self.lut is None:
            return self.w_bits + 1
        return max(int(np.abs(self.lut).max()).bit_length() + 1, 2)

    @property
    def n_kept(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def idx_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.sp_m))) if self.sp_m > 1 else 1

    def mantissas(self, scale_bits: int, where: str) -> tuple[np.ndarray, int]:
        """int64 mantissas and the layer's shift: scale ~= m * 2^-shift, |m| < 2^(scale_bits-1)."""
        top = float(np.abs(self.scales).max()) if self.scales.size else 0.0
        if top == 0.0:
            return np.zeros(self.scales.shape, np.int64), 0
        shift = math.floor(math.log2(((1 << (scale_bits - 1)) - 1) / top))
        m = np.floor(self.scales * math.ldexp(1.0, shift) + 0.5).astype(np.int64)
        if shift < 0 or shift > 62 or np.abs(m).max() >= 1 << (scale_bits - 1):
            raise BackendError(f"{where}: weight scales (max {top:.3g}) cannot be held as {scale_bits}-bit "
                               f"mantissas with a non-negative shift")
        return m, shift

    def w_eff(self, mant: np.ndarray) -> np.ndarray:
        """int64 [n_out, n_in]: code * mantissa of its group at every kept position (see emulate.matmat);
        |code| < 2^16 and |m| < 2^30, so every entry fits."""
        g = np.arange(self.n_kept) // self.group
        m = np.broadcast_to(mant, (self.n_out, self.n_groups))[:, g]
        out = np.zeros((self.n_out, self.n_in), np.int64)
        np.put_along_axis(out, self.cols, self.codes * m, axis=1)
        return out

    def code_bytes(self) -> np.ndarray:
        fields = torch.from_numpy(self.fields if self.lut is not None else self.codes + (1 << (self.w_bits - 1)))
        return packing.pack_bits(fields, self.w_bits).numpy() if self.w_bits <= 8 else _pack_wide(fields, self.w_bits)

    def idx_bytes(self) -> np.ndarray | None:
        if self.sp_m == 1:
            return None
        pos = self.cols % self.sp_m
        return packing.pack_bits(torch.from_numpy(pos), self.idx_bits).numpy()


def _pack_wide(fields: torch.Tensor, bits: int) -> np.ndarray:
    """Fields of 9..16 bits as the same little-endian bit stream pack_bits writes."""
    rows, cols = fields.shape
    bitsarr = ((fields.unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(rows, cols * bits)
    bitsarr = torch.nn.functional.pad(bitsarr, (0, (-bitsarr.shape[1]) % 8)).view(rows, -1, 8)
    return (bitsarr << torch.arange(8)).sum(-1).to(torch.uint8).numpy()


def _quantize_rows(w: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row codes of a float matrix: (int64 codes, float64 scales [rows, 1])."""
    w = w.detach().to(torch.float64)
    qmax = (1 << (bits - 1)) - 1
    scale = (w.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-300)
    q = torch.round(w / scale).clamp(-qmax, qmax)
    return q.to(torch.int64).numpy(), scale.numpy()


def _int_values(enc: IntQuant) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(signed codes [rows, cols], float scales, w_bits, group) of an IntQuant matrix."""
    q = enc.int_codes().numpy()
    bits = enc.bits
    if enc.zero_point is not None:
        idx = np.arange(q.shape[1]) // enc.group_size
        q = q - np.broadcast_to(enc.zero_point.to(torch.int64).numpy(), (q.shape[0], enc.scale.shape[1]))[:, idx]
        bits += 1
    elif not enc.signed:
        bits += 1
    return q, enc.scale.to(torch.float64).numpy(), bits, enc.group_size


def mat_weights(enc, where: str, dense_bits: int, fallbacks: list[Fallback]) -> MatWeights:
    """The matrix unit's view of a 2-D weight encoding [out, in] that the capability table takes
    (:mod:`.capabilities`); float values are quantised to ``dense_bits`` per output channel and
    reported in ``fallbacks``."""
    rows, cols = enc.shape[0], int(np.prod(enc.shape[1:]))
    sp_n = sp_m = 1
    inner = enc
    if isinstance(enc, Sparse):
        sp_n, sp_m, inner = enc.pattern.n, enc.pattern.m, enc.values
    kept = cols * sp_n // sp_m
    fields = lut = None
    if isinstance(inner, IntQuant):
        q, scales, bits, group = _int_values(inner)
    elif isinstance(inner, MiniFloat):
        lut, frac = minifloat_lut(inner)
        fields = inner.fields().numpy()
        q, bits, group = lut[fields], inner.fmt.bits, inner.group_size
        scales = inner.scale_values(torch.float64).numpy() * 2.0 ** -frac
    elif isinstance(inner, Dense):
        q, scales = _quantize_rows(inner.data.reshape(rows, kept), dense_bits)
        bits, group = dense_bits, kept
        fallbacks.append(Fallback(where, f"{inner.dtype.short} weight",
                                  f"quantised to int{dense_bits} per output channel (the FPGA datapath has no "
                                  f"float MACs; target option dense_weight_bits)"))
    else:
        raise BackendError(f"{where}: {enc.describe()} reached the matrix unit without a layout for it; the hls "
                           "capability table and mat_weights disagree (a bug: please report it)")
    if isinstance(enc, Sparse):
        gi = enc.group_indices().numpy()                         # [rows, groups, n]
        dense_cols = (np.arange(gi.shape[1])[None, :, None] * sp_m + gi).reshape(rows, kept)
        if enc.row_scale is not None:
            scales = np.broadcast_to(scales, (rows, scales.shape[1])) * enc.row_scale.to(torch.float64).numpy()[:, None]
    else:
        dense_cols = np.broadcast_to(np.arange(cols), (rows, cols))
    if bits > 16:
        raise BackendError(f"{where}: {bits}-bit weight codes are wider than the matrix unit's 16 bits")
    return MatWeights(rows, cols, sp_n, sp_m, bits, group, np.ascontiguousarray(q.reshape(rows, kept)),
                      np.ascontiguousarray(dense_cols, dtype=np.int64), np.ascontiguousarray(scales),
                      None if fields is None else np.ascontiguousarray(fields.reshape(rows, kept)), lut)


LUT_MAX_BITS = 24


def minifloat_lut(enc: MiniFloat) -> tuple[np.ndarray, int] | None:
    """(integer value of every code times 2^frac, frac) for the codes' decoding LUT; None when a used
    code is not finite or the integers would need more than LUT_MAX_BITS bits (E5M2)."""
    from ...ir import minifloat
    table = minifloat.decode(torch.arange(1 << enc.fmt.bits), enc.fmt, torch.float64).numpy()
    used = np.unique(enc.fields().numpy())
    if not np.isfinite(table[used]).all():
        return None
    finite = np.where(np.isfinite(table), table, 0.0)
    frac = max((-math.frexp(v)[1] + 53 - _trailing_zero_bits(v) for v in finite if v != 0), default=0)
    frac = max(frac, 0)
    ints = np.array([int(v * 2.0 ** frac) for v in finite], dtype=np.int64)
    if not np.array_equal(ints.astype(np.float64) * 2.0 ** -frac, finite) or \
            int(np.abs(ints).max()).bit_length() + 1 > LUT_MAX_BITS:
        return None
    return ints, frac


def _trailing_zero_bits(v: float) -> int:
    """Trailing zero bits of the 53-bit significand of v (so v * 2^(53 - exp - tz) is an odd integer)."""
    m = int(abs(math.frexp(v)[0]) * 2 ** 53)
    return (m & -m).bit_length() - 1

"""Bit-accurate numpy emulation of the nnforge HLS templates (``nnforge/hls/nf_*.h``).

Every function here works on the raw integers of fixed-point values (``raw = value * 2**frac``)
and repeats the templates' arithmetic step for step: exact integer sums and products, then one
``round_shift`` (round half up, AP_RND) and ``saturate`` (AP_SAT) where the template rounds. Arrays
are int64 where the bounds proven by codegen fit in 63 bits, and Python-int object arrays where
they do not (wide dense weights), so no step can overflow silently.

    >>> fmt = Fixed(24, 8)
    >>> to_float(from_float(np.array([0.1], np.float32), fmt), fmt)
    array([0.10000229], dtype=float32)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fixed:
    """ap_fixed<width, int_bits, AP_RND, AP_SAT>."""
    width: int
    int_bits: int

    @property
    def frac(self) -> int:
        return self.width - self.int_bits

    @property
    def lo(self) -> int:
        return -(1 << (self.width - 1))

    @property
    def hi(self) -> int:
        return (1 << (self.width - 1)) - 1

    def cpp(self) -> str:
        return f"ap_fixed<{self.width}, {self.int_bits}, AP_RND, AP_SAT>"


def round_shift(v, s: int):
    """v * 2**-s rounded half up (s <= 0: exact left shift), as nf::round_shift."""
    if s <= 0:
        return v << -s
    return (v + (1 << (s - 1))) >> s


def saturate(v, fmt: Fixed) -> np.ndarray:
    return np.clip(v, fmt.lo, fmt.hi).astype(np.int64)


def round_to(v, s: int, fmt: Fixed) -> np.ndarray:
    return saturate(round_shift(v, s), fmt)


def from_float(x, fmt: Fixed) -> np.ndarray:
    """Raw integers of ``x`` in ``fmt``: floor(x * 2^F + 1/2), saturated, NaN -> 0 (nf::from_float)."""
    s = np.floor(np.asarray(x, dtype=np.float64) * math.ldexp(1.0, fmt.frac) + 0.5)
    s = np.nan_to_num(s, nan=0.0, posinf=fmt.hi, neginf=fmt.lo)
    return np.clip(s, fmt.lo, fmt.hi).astype(np.int64)


def to_float(raw, fmt: Fixed) -> np.ndarray:
    return (np.asarray(raw, dtype=np.float64) * math.ldexp(1.0, -fmt.frac)).astype(np.float32)


def matmat(x, w_eff, bias, scale_shift: int, fx: Fixed, fy: Fixed, *, exact64: bool) -> np.ndarray:
    """nf::matmat. ``x`` raw [rows, K]; ``w_eff`` int64 [N, K] = code * scale mantissa of its group at
    every kept position (0 elsewhere): sum_g m_g * sum_{j in g} code_j x_j equals x @ w_eff.T exactly.
    ``bias`` raw [N] at fx (or None). ``exact64``: codegen proved every sum fits in int64; otherwise
    w_eff is split in 20-bit limbs, each product summed exactly in int64, and the limbs recombined as
    Python ints (only the [rows, N] result is object-typed)."""
    x, w = np.asarray(x, np.int64), np.asarray(w_eff, np.int64)
    if exact64:
        total = x @ w.T
        if bias is not None:
            total = total + (np.asarray(bias, np.int64) << scale_shift)[None, :]
    else:
        lo, hi = w & ((1 << 20) - 1), w >> 20
        xmax = int(np.abs(x).max(initial=0))
        k = w.shape[1]
        if xmax * max(1 << 20, int(np.abs(hi).max(initial=0))) * k < 1 << 62:
            total = (x @ hi.T).astype(object) * (1 << 20) + (x @ lo.T).astype(object)
        else:                                      # any width: Python ints throughout
            total = x.astype(object).dot(w.astype(object).T)
        if bias is not None:
            total = total + np.array([int(b) << scale_shift for b in np.asarray(bias).ravel()], dtype=object)[None, :]
    out = round_shift(total, scale_shift + fx.frac - fy.frac)
    return np.clip(out, fy.lo, fy.hi).astype(np.int64)


def _interp(d, table, step_shift: int):
    """Linear interpolation in ``table`` at raw offsets d >= 0 (d >> step_shift < len(table))."""
    t = np.asarray(table, np.int64)
    k = d >> step_shift
    f = d & ((1 << step_shift) - 1)
    t0 = t[np.clip(k, 0, len(t) - 1)]
    t1 = t[np.clip(k + 1, 0, len(t) - 1)]
    return t0 + round_shift((t1 - t0) * f, step_shift)


def activation_lut(x, table, lut_lo: int, step_shift: int, lut_n: int, below: int, identity_above: bool,
                   fx: Fixed, fy: Fixed) -> np.ndarray:
    """nf::activation_lut."""
    v = np.asarray(x, np.int64)
    d = v - lut_lo
    inside = (d >= 0) & (d < (lut_n << step_shift))
    above = round_shift(v, fx.frac - fy.frac) if identity_above else np.full_like(v, int(table[lut_n]))
    out = np.where(d < 0, below, np.where(inside, _interp(np.clip(d, 0, None), table, step_shift), above))
    return saturate(out, fy)


def relu(x, fx: Fixed, fy: Fixed) -> np.ndarray:
    return round_to(np.maximum(np.asarray(x, np.int64), 0), fx.frac - fy.frac, fy)


def neg(x, fx: Fixed, fy: Fixed) -> np.ndarray:
    """nf::neg."""
    return round_to(-np.asarray(x, np.int64), fx.frac - fy.frac, fy)


def pow_int(x, exponent: int, fx: Fixed, fy: Fixed) -> np.ndarray:
    """nf::pow_int: ``exponent`` >= 2, each product rounded back to fx and saturated."""
    v = np.asarray(x, np.int64)
    p = v
    for _ in range(exponent - 1):
        p = saturate(round_shift(p * v, fx.frac), fx)
    return round_to(p, fx.frac - fy.frac, fy)


def mean_round(s, n: int) -> np.ndarray:
    """round(s / n) half away from zero on exact integers (nf::layer_norm's and nf::reduce's mean)."""
    s = np.asarray(s, np.int64)
    return np.where(s >= 0, (s + n // 2) // n, -((-s + n // 2) // n))


def softmax(x, table, lut_lo: int, step_shift: int, e_frac: int, fy: Fixed) -> np.ndarray:
    """nf::softmax over the last axis of raw ``x`` [rows, n]."""
    v = np.asarray(x, np.int64)
    d = v - v.max(axis=-1, keepdims=True) - lut_lo
    e = np.where(d < 0, 0, _interp(np.clip(d, 0, None), table, step_shift))
    recip = (1 << 62) // e.sum(axis=-1, keepdims=True)
    return round_to(e * recip, 62 - fy.frac, fy)


def layer_norm(x, gamma, beta, eps_raw: int, rms: bool, fx: Fixed, fy: Fixed) -> np.ndarray:
    """nf::layer_norm over the last axis of raw ``x`` [rows, n]; gamma/beta raw at fx (or None)."""
    v = np.asarray(x, np.int64)
    n = v.shape[-1]
    F = fx.frac
    s = v.sum(axis=-1, keepdims=True)
    mu = np.zeros_like(s) if rms else mean_round(s, n)
    d = v - mu
    var = (d * d).sum(axis=-1) // n + eps_raw
    g = np.full(n, 1 << F, np.int64) if gamma is None else np.asarray(gamma, np.int64)
    b = np.zeros(n, np.int64) if beta is None else np.asarray(beta, np.int64)
    out = np.empty_like(v)
    for r in range(v.shape[0]):
        vr = int(var[r])
        sh = max(62 - vr.bit_length(), 0) & ~1
        rcp = (1 << 62) // math.isqrt(vr << sh)
        z = round_shift(d[r] * rcp, 62 - sh // 2 - F)
        out[r] = round_to(z * g + (b << F), F + F - fy.frac, fy)
    return out


def binary(a, b, op: str, fa: int, fb: int, fy: Fixed) -> np.ndarray:
    """nf::binary (numpy broadcasting); ``fa``/``fb``: fractional bits of the operands."""
    va, vb = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if op == "mul":
        return round_to(va * vb, fa + fb - fy.frac, fy)
    if op == "div":
        n, d = va << (fb + fy.frac - fa), vb
        n, d = np.broadcast_arrays(np.where(d < 0, -n, n), np.abs(d))
        q = (2 * n + d) // np.maximum(2 * d, 1)
        return saturate(np.where(d == 0, np.sign(n) << 62, q), fy)
    f = max(fa, fb)
    va, vb = va << (f - fa), vb << (f - fb)
    return round_to(va + vb if op == "add" else va - vb, f - fy.frac, fy)


INT32 = (-(1 << 31), (1 << 31) - 1)


def int_from_float(x) -> np.ndarray:
    """Integer inputs (ids, masks) from floats: floor(x + 1/2) saturated to int32, NaN -> 0 (nf::int_from_float)."""
    s = np.nan_to_num(np.floor(np.asarray(x, np.float64) + 0.5), nan=0.0, posinf=INT32[1], neginf=INT32[0])
    return np.clip(s, *INT32).astype(np.int64)


def embedding(ids, table) -> np.ndarray:
    """nf::embedding: rows of raw ``table`` [n_rows, dim] at ids clamped into [0, n_rows - 1]."""
    t = np.asarray(table, np.int64)
    return t[np.clip(np.asarray(ids, np.int64).reshape(-1), 0, len(t) - 1)]


def ewise(op: str, vals: list, out_shape, shift: int, out_kind: str, fy: Fixed) -> np.ndarray:
    """nf::ewise on raw operands (numpy broadcasting to ``out_shape``); stores as nf::store."""
    v = [np.broadcast_to(np.asarray(x, np.int64), out_shape) for x in vals]
    cmp = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
           "ge": np.greater_equal}
    if op in cmp:
        out = cmp[op](v[0], v[1])
    elif op in ("and", "or"):
        out = (np.logical_and if op == "and" else np.logical_or)(v[0] != 0, v[1] != 0)
    elif op == "not":
        out = v[0] == 0
    elif op == "where":
        out = np.where(v[0] != 0, v[1], v[2])
    elif op == "cast":
        out = v[0] << shift
    elif op == "trunc":
        out = np.where(v[0] >= 0, v[0] >> shift, -((-v[0]) >> shift))
    elif op in ("min", "max"):
        out = (np.minimum if op == "min" else np.maximum)(v[0], v[1])
    else:
        raise ValueError(f"ewise op {op}")
    out = np.asarray(out, np.int64)
    if out_kind == "bool":
        return (out != 0).astype(np.int64)
    return np.clip(out, *INT32).astype(np.int64) if out_kind == "int" else saturate(out, fy)


def sqrt_fixed(x, fmt: Fixed) -> np.ndarray:
    """nf::sqrt_fixed: floor(sqrt(raw * 2^F) + 1/2) = (isqrt(raw * 2^(F+2)) + 1) >> 1; raw <= 0 -> 0."""
    v = np.asarray(x, np.int64).reshape(-1)
    out = np.array([(math.isqrt(int(r) << (fmt.frac + 2)) + 1) >> 1 if r > 0 else 0 for r in v], np.int64)
    return saturate(out, fmt)


def rsqrt_fixed(x, fmt: Fixed) -> np.ndarray:
    """nf::rsqrt_fixed (see nf_reduce.h); raw <= 0 -> the format's maximum."""
    F = fmt.frac
    p = F & 1
    out = []
    for r in np.asarray(x, np.int64).reshape(-1):
        if r <= 0:
            out.append(fmt.hi)
            continue
        u = int(r) << p
        sh = max(62 - u.bit_length(), 0) & ~1
        rcp = (1 << 62) // math.isqrt(u << sh)
        out.append(int(round_shift(rcp, 62 - sh // 2 - F - (F + p) // 2)))
    return saturate(np.array(out, np.int64), fmt)


def matmul(a, b, fa: Fixed, fb: Fixed, fy: Fixed) -> np.ndarray:
    """nf::matmul: a [..., m, k] @ b [..., k, n] on raw integers (exact int64 sums), one rounding."""
    return round_to(np.matmul(np.asarray(a, np.int64), np.asarray(b, np.int64)), fa.frac + fb.frac - fy.frac, fy)


def rope(x, positions, cos, sin, interleaved: bool, fx: Fixed, fy: Fixed) -> np.ndarray:
    """nf::rope: x raw [b, h, s, d], positions [b, s], ``cos`` / ``sin`` raw [slots, rotated] (sin with
    the rotation's sign folded in); dims past ``rotated`` pass through."""
    x = np.asarray(x, np.int64)
    r = cos.shape[1]
    slot = np.clip(np.asarray(positions, np.int64), 0, cos.shape[0] - 1)            # [b, s]
    d = np.arange(r)
    partner = d ^ 1 if interleaved else np.where(d < r // 2, d + r // 2, d - r // 2)
    c, s = cos[slot][:, None], sin[slot][:, None]                                   # [b, 1, s, r]
    y = round_to(x[..., :r] * c + x[..., partner] * s, 2 * fx.frac - fy.frac, fy)
    return np.concatenate([y, round_to(x[..., r:], fx.frac - fy.frac, fy)], axis=-1)


def kv_write(x, positions, cache: np.ndarray) -> None:
    """nf::kv_write: rows x raw [b, kvh, s, d] into ``cache`` [b, kvh, max_len, d] (a view of the
    kv memory) at slots positions [b, s]; a slot past the cache is not written."""
    x, pos = np.asarray(x, np.int64), np.asarray(positions, np.int64)
    for b in range(x.shape[0]):
        for j in range(x.shape[2]):
            if 0 <= pos[b, j] < cache.shape[2]:
                cache[b, :, pos[b, j]] = x[b, :, j]


def attention(q, positions, k, v, window: int, table, lut_lo: int, step_shift: int, scale_m: int,
              scale_shift: int, fx: Fixed, fy: Fixed) -> np.ndarray:
    """nf::attention: q raw [b, h, s, d] over the caches k, v raw [b, kvh, max_len, d]; query row j
    sees the slots lo..pos of its kv head (pos = positions[b, j] clamped to the cache)."""
    q = np.asarray(q, np.int64)
    nb, h, rows, _ = q.shape
    L, group, F = k.shape[2], h // k.shape[1], fx.frac
    out = np.empty_like(q)
    for b in range(nb):
        for j in range(rows):
            hi = int(np.clip(positions[b, j], 0, L - 1))
            lo = hi + 1 - window if window and hi + 1 > window else 0
            kk = np.asarray(k[b, :, lo:hi + 1], np.int64).repeat(group, axis=0)      # [h, T, d]
            vv = np.asarray(v[b, :, lo:hi + 1], np.int64).repeat(group, axis=0)
            acc = np.einsum("hd,htd->ht", q[b, :, j], kk)
            s = round_shift(round_shift(acc, F) * scale_m, scale_shift)
            d = s - s.max(axis=-1, keepdims=True) - lut_lo
            e = np.where(d < 0, 0, _interp(np.clip(d, 0, None), table, step_shift))
            p = round_shift(e * ((1 << 62) // e.sum(axis=-1, keepdims=True)), 62 - F)
            out[b, :, j] = round_to(np.einsum("ht,htd->hd", p, vv), F + F - fy.frac, fy)
    return out


def windows(x, shape, out_hw, filt, stride, dil, pad, fill: int = 0) -> np.ndarray:
    """The sliding windows of raw ``x`` [N, C, H, W] (``shape``) as nf_conv.h's scan meets them:
    [N, C, OH, OW, KH, KW], ``fill`` outside the image (the padding)."""
    n, c, h, w = shape
    (oh, ow), (kh, kw), (sh, sw), (dh, dw), (pt, pl) = out_hw, filt, stride, dil, pad
    rows = (np.arange(oh) * sh)[:, None] + (np.arange(kh) * dh)[None, :]
    cols = (np.arange(ow) * sw)[:, None] + (np.arange(kw) * dw)[None, :]
    xp = np.full((n, c, max(int(rows.max()) + 1, pt + h), max(int(cols.max()) + 1, pl + w)), fill, np.int64)
    xp[:, :, pt:pt + h, pl:pl + w] = np.asarray(x, np.int64).reshape(shape)
    return xp[:, :, rows[:, None, :, None], cols[None, :, None, :]]


def conv(x, shape, w_eff, bias, scale_shift: int, groups: int, out_hw, filt, stride, dil, pad, fx: Fixed, fy: Fixed,
         *, exact64: bool) -> np.ndarray:
    """nf::conv: nf::matmat's arithmetic on every window; ``w_eff`` [O, C/groups * KH * KW] as
    :func:`matmat` takes it, ``bias`` raw [O] (or None). Returns raw y [N, O, OH, OW]."""
    n, c = shape[:2]
    (oh, ow), (kh, kw) = out_hw, filt
    cg, nf = c // groups, w_eff.shape[0] // groups
    win = windows(x, shape, out_hw, filt, stride, dil, pad).reshape(n, groups, cg, oh, ow, kh, kw)
    win = win.transpose(0, 1, 3, 4, 2, 5, 6).reshape(n, groups, oh * ow, cg * kh * kw)
    w = np.asarray(w_eff, np.int64).reshape(groups, nf, cg * kh * kw)
    if exact64:
        total = np.matmul(win, w.transpose(0, 2, 1))                              # [N, G, P, nf]
        if bias is not None:
            total = total + (np.asarray(bias, np.int64).reshape(groups, 1, nf) << scale_shift)
        out = saturate(round_shift(total, scale_shift + fx.frac - fy.frac), fy)
    else:
        out = np.empty((n, groups, oh * ow, nf), np.int64)
        for b in range(n):
            for g in range(groups):
                bg = None if bias is None else np.asarray(bias).reshape(groups, nf)[g]
                out[b, g] = matmat(win[b, g], w[g], bg, scale_shift, fx, fy, exact64=False)
    return out.transpose(0, 1, 3, 2).reshape(n, groups * nf, oh, ow)


def max_pool(x, shape, out_hw, filt, stride, dil, pad, fx: Fixed, fy: Fixed) -> np.ndarray:
    """nf::max_pool on raw x [N, C, H, W]: the padding is the format's minimum, never above a value."""
    win = windows(x, shape, out_hw, filt, stride, dil, pad, fill=fx.lo)
    return round_to(win.max(axis=(-2, -1)), fx.frac - fy.frac, fy)


def topk(x, outer: int, n: int, inner: int, k: int, largest: bool) -> np.ndarray:
    """nf::topk: indices of the k largest (smallest) raw values along n, ties lower index first."""
    v = np.asarray(x, np.int64).reshape(outer, n, inner)
    order = np.argsort(-v if largest else v, axis=1, kind="stable")      # raw values are far from int64's ends
    return order[:, :k, :].reshape(-1)


def cumsum(x, outer: int, n: int, inner: int, out_kind: str, fy: Fixed) -> np.ndarray:
    """nf::cumsum: exact running sums, each saturated to y's format."""
    s = np.cumsum(np.asarray(x, np.int64).reshape(outer, n, inner), axis=1).reshape(-1)
    return np.clip(s, *INT32).astype(np.int64) if out_kind == "int" else saturate(s, fy)


def floor_fixed(x, fmt: Fixed) -> np.ndarray:
    """nf::floor_fixed: the fractional bits cleared."""
    return (np.asarray(x, np.int64) >> fmt.frac) << fmt.frac


def position(idx, n: int, wrap: bool) -> np.ndarray:
    """nf::position: an index on an axis of n, negative from the end when ``wrap``, then clamped."""
    r = np.asarray(idx, np.int64)
    if wrap:
        r = np.where(r < 0, r + n, r)
    return np.clip(r, 0, n - 1)


def take_rows(x, idx, n_rows: int) -> np.ndarray:
    """nf::take_rows: rows of x [n_rows, row] at the indices."""
    return np.asarray(x).reshape(n_rows, -1)[position(idx, n_rows, True).reshape(-1)].reshape(-1)


def gather_axis(x, idx, shape, strides, axis: int, n_axis: int) -> np.ndarray:
    """nf::gather_axis: y[i] = x[i with its ``axis`` coordinate replaced by idx[i]] (shape: idx's, strides: x's)."""
    off = position(idx, n_axis, False).reshape(shape) * strides[axis]
    for d, (n, s) in enumerate(zip(shape, strides)):
        if d != axis:
            off = off + (np.arange(n, dtype=np.int64) * s).reshape([n if e == d else 1 for e in range(len(shape))])
    return np.asarray(x).reshape(-1)[off.reshape(-1)]


def scatter_rows(x, v, idx, n_rows: int, row: int, v_si: int, v_sc: int, accumulate: bool, kind: str,
                 fy: Fixed) -> np.ndarray:
    """nf::scatter_rows: x with rows idx[i] set to (or, saturating, increased by) values row i, in index order."""
    y = np.asarray(x, np.int64).reshape(n_rows, row).copy()
    v = np.asarray(v, np.int64).reshape(-1)
    cols = np.arange(row) * v_sc
    for i, r in enumerate(position(idx, n_rows, True).reshape(-1)):
        val = v[i * v_si + cols]
        if accumulate:
            s = y[r] + val
            y[r] = np.clip(s, *INT32) if kind == "int" else (s != 0) if kind == "bool" else saturate(s, fy)
        else:
            y[r] = val
    return y.reshape(-1)


# --- the kv8 KV-cache encoding (nf_kv8.h) ----------------------------------------------------------
KV8_RCP_SHIFT = 40


def kv8_scale_bits(n: int, F: int) -> int:
    """nf::kv8_scale_bits: the float16 bit pattern nearest n * 2^-F / 127 (ties to even), saturated."""
    if n == 0:
        return 0
    L = n.bit_length() - 1
    e = L - 6 if (n << 6) >= (127 << L) else L - 7
    ev = e - F
    if ev > 15:
        return 0x7BFF
    lsb = max(ev, -14) - 10
    s = -lsb - F
    if s >= 0:
        q, r = divmod(n << s, 127)
        q += 2 * r > 127
    else:
        b = 127 << -s
        q, r = divmod(n, b)
        q += 2 * r > b or (2 * r == b and q & 1)
    if q >= 2048:
        q, lsb = q >> 1, lsb + 1
    if q < 1024:
        return q
    return 0x7BFF if lsb + 25 > 30 else ((lsb + 25) << 10) | (q - 1024)


def kv8_scale_parts(bits):
    """(m, e) with scale = m * 2^e, of float16 bit patterns (nf::kv8_scale_parts)."""
    bits = np.asarray(bits, np.int64)
    ef, mant = (bits >> 10) & 31, bits & 1023
    return np.where(ef == 0, mant, mant | 1024), np.where(ef == 0, -24, ef - 25)


def kv8_quantize(x, group: int, F: int) -> tuple[np.ndarray, np.ndarray]:
    """nf::kv8_write's arithmetic on raw rows x [..., d]: (int8 codes [..., d], float16 bit patterns
    [..., d / group] as uint16)."""
    x = np.asarray(x, np.int64)
    groups = x.reshape(-1, group)
    codes = np.zeros(groups.shape, np.int64)
    bits = np.zeros(len(groups), np.int64)
    for i, g in enumerate(groups):
        a = np.abs(g)
        bits[i] = kv8_scale_bits(int(a.max(initial=0)), F)
        m, e = (int(v) for v in kv8_scale_parts(bits[i]))
        if m == 0:
            continue
        while m < 1024:
            m, e = m << 1, e - 1
        rcp = ((1 << KV8_RCP_SHIFT) + m // 2) // m
        codes[i] = np.sign(g) * np.minimum(round_shift(a * rcp, KV8_RCP_SHIFT + e + F), 127)
    return codes.reshape(x.shape).astype(np.int8), bits.reshape(*x.shape[:-1], -1).astype(np.uint16)


def kv8_values(codes, bits, fmt: Fixed) -> np.ndarray:
    """nf::kv8_value over a cache: raw codes * scale at ``fmt`` (codes [..., d], bits [..., d / group])."""
    c = np.asarray(codes, np.int64)
    m, e = kv8_scale_parts(bits)
    g = c.shape[-1] // m.shape[-1]
    m, e = np.repeat(m, g, axis=-1), np.repeat(e, g, axis=-1)
    s = -(e + fmt.frac)
    v = c * m
    up = v << np.clip(-s, 0, None)
    down = (v + (np.int64(1) << np.clip(s - 1, 0, None))) >> np.clip(s, 0, None)
    return saturate(np.where(s > 0, down, up), fmt)


def pack_words(data: np.ndarray) -> np.ndarray:
    """The little-endian bytes of ``data`` as int32 words (int64 values), zero-padded to a whole word."""
    raw = np.ascontiguousarray(data).tobytes()
    raw += b"\0" * (-len(raw) % 4)
    return np.frombuffer(raw, "<i4").astype(np.int64)


def unpack_words(words, dtype, n: int) -> np.ndarray:
    """The first ``n`` elements of ``dtype`` in the bytes of int32 ``words`` (inverse of pack_words)."""
    return np.frombuffer(np.asarray(words).astype("<i4").tobytes(), dtype)[:n].copy()

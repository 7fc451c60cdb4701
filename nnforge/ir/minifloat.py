"""Bit-exact minifloat arithmetic for the ExMy formats of :mod:`.dtypes` (OCP FP8/FP6/FP4, E8M0).

``encode`` rounds to nearest, ties to even, with subnormals, and saturates to the largest finite
value (the OCP "saturating" conversion that quantizers use); E5M2 may instead overflow to
infinity. ``decode`` reads codes through a per-format table, so every code decodes exactly as the
format defines it. Codes are unsigned integer fields of ``fmt.bits`` bits (sign bit on top), the
same bit patterns ``ml_dtypes`` uses.

    >>> codes = encode(torch.tensor([0.3, -448.0, 1e9]), dtype("e4m3"))     # 1e9 saturates to 448
    >>> decode(codes, dtype("e4m3"))
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..errors import NnforgeError
from .dtypes import DType


class MiniFloatError(NnforgeError, ValueError):
    """A value or format that minifloat arithmetic cannot take."""


def _check(fmt: DType) -> None:
    if fmt.kind != "minifloat":
        raise MiniFloatError(f"{fmt.name} is not a minifloat format")


def _is_nan_code(code: int, fmt: DType) -> bool:
    e, m = fmt.exp_bits, fmt.man_bits
    exp = (code >> m) & ((1 << e) - 1)
    man = code & ((1 << m) - 1)
    if fmt.nan == "ieee":
        return exp == (1 << e) - 1 and man != 0
    if fmt.nan == "fn":
        return exp == (1 << e) - 1 and man == (1 << m) - 1
    return False


@lru_cache(maxsize=None)
def _table(fmt: DType) -> torch.Tensor:
    """float64 value of every code of ``fmt``."""
    e, m, bias = fmt.exp_bits, fmt.man_bits, fmt.bias
    out = []
    for code in range(1 << fmt.bits):
        sign = -1.0 if fmt.signed and code >> (e + m) & 1 else 1.0
        exp = (code >> m) & ((1 << e) - 1)
        man = code & ((1 << m) - 1)
        if _is_nan_code(code, fmt):
            v = math.nan
        elif fmt.has_inf and exp == (1 << e) - 1:
            v = math.inf
        elif exp == 0 and m > 0:                       # subnormal (E8M0 has none: exp 0 is 2^-127)
            v = man / (1 << m) * 2.0 ** (1 - bias)
        else:
            v = (1 + man / (1 << m)) * 2.0 ** (exp - bias)
        out.append(sign * v)
    return torch.tensor(out, dtype=torch.float64)


def decode(codes: torch.Tensor, fmt: DType, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of integer ``codes`` (any integer dtype holding ``fmt.bits``-bit fields)."""
    _check(fmt)
    return _table(fmt).to(dtype)[codes.to(torch.int64)]


def min_exponent(fmt: DType) -> int:
    """Unbiased exponent of the smallest normal number."""
    return 1 - fmt.bias


def max_exponent(fmt: DType) -> int:
    """Unbiased exponent of the largest finite number (OCP's emax of the element format)."""
    return math.floor(math.log2(fmt.max_value))


def round_to(x: torch.Tensor, fmt: DType, *, saturate: bool = True) -> torch.Tensor:
    """``x`` rounded to the nearest value of ``fmt`` (ties to even), in float64; NaN stays NaN.
    Overflow saturates to the largest finite value, or (``saturate=False``, formats with
    infinities) becomes infinity."""
    _check(fmt)
    if not fmt.signed:
        raise MiniFloatError(f"{fmt.name} is an unsigned scale format; use e8m0_exponent")
    a = x.to(torch.float64).abs()
    finite = torch.isfinite(a)
    safe = torch.where(finite & (a > 0), a, torch.ones_like(a))
    _, e2 = torch.frexp(safe)
    exp = (e2 - 1).clamp(min=min_exponent(fmt))             # subnormals share the smallest quantum
    quantum = torch.pow(2.0, (exp - fmt.man_bits).to(torch.float64))
    r = torch.round(safe / quantum) * quantum                 # torch.round rounds half to even
    r = torch.where(finite & (a > 0), r, a)
    top = fmt.max_value
    if saturate or not fmt.has_inf:
        r = torch.where(torch.isnan(a), a, r.clamp(max=top))
    else:
        # IEEE-style: values that round past the largest finite number overflow.
        limit = top + 2.0 ** (max_exponent(fmt) - fmt.man_bits - 1)
        r = torch.where(a >= limit, torch.full_like(r, math.inf), r.clamp(max=top))
    return torch.where(torch.signbit(x.to(torch.float64)), -r, r)


def encode(x: torch.Tensor, fmt: DType, *, saturate: bool = True) -> torch.Tensor:
    """Codes (uint8 fields of ``fmt.bits`` bits) of ``x`` rounded to ``fmt``; see :func:`round_to`.
    NaN encodes as the format's NaN; formats without NaN refuse it."""
    v = round_to(x, fmt, saturate=saturate)
    e, m = fmt.exp_bits, fmt.man_bits
    nan = torch.isnan(v)
    if bool(nan.any()) and fmt.nan == "none":
        raise MiniFloatError(f"{fmt.name} has no NaN, and the input holds {int(nan.sum())} NaN value(s)")
    a = v.abs()
    inf = torch.isinf(a)
    safe = torch.where(torch.isfinite(a) & (a > 0), a, torch.ones_like(a))
    _, e2 = torch.frexp(safe)
    exp = e2 - 1
    normal = exp >= min_exponent(fmt)
    exp_field = torch.where(normal, exp + fmt.bias, torch.zeros_like(exp))
    quantum = torch.pow(2.0, (torch.where(normal, exp, torch.full_like(exp, min_exponent(fmt))) - m).to(torch.float64))
    man_field = (safe / quantum).to(torch.int64) - torch.where(normal, 1 << m, 0)
    code = (exp_field.to(torch.int64) << m) | man_field
    code = torch.where(a == 0, torch.zeros_like(code), code)
    if fmt.has_inf:
        code = torch.where(inf, torch.full_like(code, ((1 << e) - 1) << m), code)
    if fmt.nan != "none":
        nan_code = ((1 << e) - 1) << m | ((1 << m) - 1 if fmt.nan == "fn" else 1 << (m - 1))
        code = torch.where(nan, torch.full_like(code, nan_code), code)
    sign = torch.signbit(v) & ~nan
    code = code | (sign.to(torch.int64) << (e + m))
    return code.to(torch.uint8)


def e8m0_exponent(amax: torch.Tensor, elem: DType) -> torch.Tensor:
    """OCP MX shared scale: the E8M0 code of 2^(floor(log2(amax)) - emax_elem) for blocks whose
    largest magnitude is ``amax`` (all-zero blocks get the smallest scale). Elements above the
    scaled range then saturate when encoded, as the MX spec prescribes."""
    safe = torch.where(amax > 0, amax.to(torch.float64), torch.ones_like(amax, dtype=torch.float64))
    _, e2 = torch.frexp(safe)
    shared = (e2 - 1) - max_exponent(elem)
    shared = torch.where(amax > 0, shared, torch.full_like(shared, -127))
    return (shared.clamp(-127, 127) + 127).to(torch.uint8)


def encode_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 codes of scales that are exact powers of two in [2^-127, 2^127]."""
    e = torch.log2(scale.to(torch.float64))
    if not bool(torch.all(e == torch.round(e))) or bool(((e < -127) | (e > 127)).any()):
        raise MiniFloatError("E8M0 holds powers of two in [2^-127, 2^127] only")
    return (e.to(torch.int64) + 127).to(torch.uint8)


__all__ = ["MiniFloatError", "decode", "encode", "encode_e8m0", "round_to", "e8m0_exponent", "min_exponent", "max_exponent"]

"""How the lowbit kernel reads a minifloat code as a number, in TensorIR expressions.

The kernel computes ``W = (value(code) - zero) * scale`` for every code format it reads
(kernels/lowbit.py); for minifloat codes ``value`` is the format's value up to a power of two
that the scales carry instead (:data:`SCALE_FACTOR`, folded into the kernel's scale array, and
:data:`FLOAT_UNIT`, applied once a group), so the k loop does no extra multiply:

- On the float paths a code's bits are placed in a float16 pattern (sign on top, exponent and
  mantissa under float16's exponent) and widened to float32: its value is the code's times a power
  of two for normals and subnormals alike (float16 has the larger exponent range, and its
  subnormals widen exactly). E5M2 is the top byte of a float16 as it is.
- FP4 on the VNNI dot path, whose ``vpdpbusd`` takes unsigned bytes: twice an E2M1 value is an
  integer in ``{0, 1, 2, 3, 4, 6, 8, 12}`` with a sign, so one ``vpshufb`` of the nibbles through
  a 16-byte table gives ``t[c] = 12 + 2 e2m1(c)`` in 0..24, and the kernel's zero-point correction
  takes the 12 (:data:`FP4_DOT_ZERO`) off. The scales carry the 1/2.

Codes are the unsigned fields nnforge stores (``ir/minifloat.py``: sign bit on top). E4M3's NaN
code reads as 480; the quantisers saturate, so no weight holds it.
"""
from __future__ import annotations

FORMATS = ("e2m1", "e4m3", "e5m2")
BITS = {"e2m1": 4, "e4m3": 8, "e5m2": 8}
SCALE_FACTOR = {"e2m1": 0.5, "e4m3": 2.0 ** 8, "e5m2": 1.0}
FP4_DOT_ZERO = 12
# what a float path multiplies a group's sum by: the float16 value of an e2m1 code is 2**-15 of
# twice its value (the bias is 14 more), the unit its scales carry
FLOAT_UNIT = {"int": 1.0, "e2m1": 2.0 ** 15, "e4m3": 1.0, "e5m2": 1.0}
_E2M1_TWICE = (0, 1, 2, 3, 4, 6, 8, 12)      # twice the E2M1 magnitude of codes 0..7


def fp4_table(offset: int) -> list[int]:
    """``offset + 2 e2m1(c)`` for the 16 codes c (sign bit 8)."""
    return [offset + (-1 if c & 8 else 1) * _E2M1_TWICE[c & 7] for c in range(16)]


def code_value(fmt: str, code):
    """The float32 value the kernel's float paths give the code field ``code`` (a uint8 expression,
    scalar or inside a vectorised loop) of format ``fmt`` ("int": the field itself): the code's
    bits placed in a float16 pattern and widened (``vcvtph2ps`` on x86), to be multiplied by
    :data:`FLOAT_UNIT` once a group."""
    from tvm import tirx
    if fmt == "int":
        return tirx.Cast("float32", code)

    def signed16(byte):     # the byte's sign bit copied into bits 8..15
        return tirx.reinterpret("uint16", tirx.Cast("int16", tirx.reinterpret("int8", byte)))

    def u16(v):
        return tirx.const(v, "uint16")
    if fmt == "e2m1":       # the sign to bit 15, exponent and mantissa to bits 11..9 (the copies cleared)
        bits = tirx.bitwise_and(tirx.shift_left(signed16(tirx.shift_left(code, tirx.const(4, "uint8"))), u16(5)),
                                u16(0x8FFF))
    elif fmt == "e4m3":     # the sign to bit 15, exponent and mantissa to bits 13..7
        bits = tirx.bitwise_and(tirx.shift_left(signed16(code), u16(7)), u16(0xBFFF))
    elif fmt == "e5m2":
        bits = tirx.shift_left(tirx.Cast("uint16", code), u16(8))
    else:
        raise ValueError(f"no code value for format {fmt!r} (known: int, {', '.join(FORMATS)})")
    return tirx.Cast("float32", tirx.reinterpret("float16", bits))


def fp4_lookup(nibbles, lanes: int, offset: int):
    """``offset + 2 e2m1(c)`` for each nibble of ``nibbles``, a uint8 vector of ``lanes`` (64 or
    16) values in 0..15: one ``vpshufb`` through the table (int8 lanes; x86 with AVX-512BW for 64
    lanes, SSSE3 for 16)."""
    from tvm import tirx
    intrin = "llvm.x86.avx512.pshuf.b.512" if lanes == 64 else "llvm.x86.ssse3.pshuf.b.128"
    table = fp4_table(offset) * (lanes // 16)        # vpshufb looks up within each 16-byte lane
    consts = tirx.Shuffle([tirx.const(v, "int8") for v in table], list(range(lanes)))
    return tirx.call_llvm_pure_intrin(f"int8x{lanes}", intrin, consts, tirx.reinterpret(f"int8x{lanes}", nibbles))


def round_value(v, fmt):
    """The float32 expression ``v`` rounded to the nearest value of minifloat ``fmt`` (a DType;
    ties to even, saturating at its largest finite value, NaN kept), as
    nnforge.ir.minifloat.round_to: the quantum 2^(exponent - mantissa bits) is built from the
    exponent field of the value's bits, so the arithmetic is exact."""
    from tvm import tirx
    from ....ir.minifloat import min_exponent
    mag = tirx.abs(v)
    bits = tirx.reinterpret("int32", mag)
    exp = tirx.max(tirx.shift_right(bits, 23) - 127, min_exponent(fmt))
    quantum = tirx.reinterpret("float32", tirx.shift_left(exp - fmt.man_bits + 127, 23))
    r = tirx.min(tirx.nearbyint(mag / quantum) * quantum, tirx.const(fmt.max_value, "float32"))
    r = tirx.Select(tirx.isnan(v), v, r)
    return tirx.Select(v < tirx.const(0, "float32"), -r, r)


def minifloat_code(v, name: str):
    """The code (uint8: sign on top, nnforge.ir.minifloat.encode's field) of float32 ``v`` rounded
    to minifloat ``name`` (nearest even, saturating; for a format with NaN, NaN gives its NaN code;
    -0.0 keeps its sign)."""
    from tvm import tirx
    from ....ir.dtypes import dtype
    from ....ir.minifloat import min_exponent
    fmt = dtype(name)
    r = round_value(v, fmt)
    mag = tirx.abs(r)
    bits = tirx.reinterpret("int32", mag)
    exp = tirx.shift_right(bits, 23) - 127
    normal = tirx.bitwise_or(tirx.shift_left(exp + fmt.bias, fmt.man_bits),
                             tirx.bitwise_and(tirx.shift_right(bits, 23 - fmt.man_bits), (1 << fmt.man_bits) - 1))
    # below the smallest normal a code counts quanta of 2^(min exponent - mantissa bits), exactly
    sub = tirx.Cast("int32", mag * tirx.const(2.0 ** (fmt.man_bits - min_exponent(fmt)), "float32"))
    code = tirx.Select(exp >= min_exponent(fmt), normal, sub)
    # the input's sign bit: round_value gives -0.0 as +0.0, and a value rounding to zero keeps its sign
    sign = tirx.Select(tirx.reinterpret("int32", v) < 0, 1 << (fmt.exp_bits + fmt.man_bits), 0)
    code = tirx.bitwise_or(code, sign)
    if fmt.nan != "none":
        code = tirx.Select(tirx.isnan(r), (1 << (fmt.exp_bits + fmt.man_bits)) - 1, code)
    return tirx.Cast("uint8", code)


__all__ = ["BITS", "FORMATS", "FP4_DOT_ZERO", "SCALE_FACTOR", "code_value", "fp4_lookup", "fp4_table",
           "minifloat_code", "round_value"]

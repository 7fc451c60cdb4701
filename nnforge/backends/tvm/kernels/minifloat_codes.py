"""How the lowbit kernel reads a minifloat code as a number, in TensorIR expressions.

The kernel computes ``W = (value(code) - zero) * scale`` for every code format it reads
(kernels/lowbit.py); for minifloat codes ``value`` is the format's value up to a power of two
that the scales carry instead (:data:`SCALE_FACTOR`, folded into the kernel's scale array), so
the k loop does no extra multiply:

- ``e2m1`` (FP4): twice the E2M1 value, an integer in ``{0, 1, 2, 3, 4, 6, 8, 12}`` with a sign.
  The float paths compute it with selects; the VNNI dot path, whose ``vpdpbusd`` takes unsigned
  bytes, looks the nibble up in a 16-byte table (``vpshufb``) that adds :data:`FP4_DOT_ZERO`, so
  ``t[c] = 12 + 2 e2m1(c)`` lies in 0..24 and the kernel's zero-point correction takes the 12 off.
- ``e4m3`` (FP8): the code's bits placed in a float16 pattern (sign on top, exponent and mantissa
  shifted under it), whose value is the E4M3 value times ``2**-8`` for normals and subnormals
  alike (the float16 bias is 8 more, and float16 subnormals convert exactly).
- ``e5m2`` (FP8): the top byte of a float16, so its bits shifted up are the value.

Codes are the unsigned fields nnforge stores (``ir/minifloat.py``: sign bit on top). E4M3's NaN
code reads as 480; the quantisers saturate, so no weight holds it.
"""
from __future__ import annotations

FORMATS = ("e2m1", "e4m3", "e5m2")
BITS = {"e2m1": 4, "e4m3": 8, "e5m2": 8}
SCALE_FACTOR = {"e2m1": 0.5, "e4m3": 2.0 ** 8, "e5m2": 1.0}
FP4_DOT_ZERO = 12
_E2M1_TWICE = (0, 1, 2, 3, 4, 6, 8, 12)      # twice the E2M1 magnitude of codes 0..7


def fp4_table(offset: int) -> list[int]:
    """``offset + 2 e2m1(c)`` for the 16 codes c (sign bit 8)."""
    return [offset + (-1 if c & 8 else 1) * _E2M1_TWICE[c & 7] for c in range(16)]


def code_value(fmt: str, code):
    """The float32 value the kernel gives the code field ``code`` (a uint8 expression, scalar or
    inside a vectorised loop) of format ``fmt`` ("int": the field itself)."""
    from tvm import tirx

    def u8(v):
        return tirx.const(v, "uint8")
    if fmt == "int":
        return tirx.Cast("float32", code)
    if fmt == "e2m1":
        mag = tirx.bitwise_and(code, u8(7))
        # 0..3 are themselves; 4, 5 -> 4, 6 (steps of 2); 6, 7 -> 8, 12 (steps of 4)
        twice = tirx.Select(mag < u8(4), mag, tirx.Select(mag < u8(6), (mag - u8(2)) * u8(2), (mag - u8(4)) * u8(4)))
        value = tirx.Cast("float32", twice)
        return tirx.Select(code > u8(7), -value, value)
    def u16(v):
        return tirx.const(v, "uint16")
    wide = tirx.Cast("uint16", code)
    if fmt == "e4m3":       # sign to bit 15, exponent and mantissa under float16's 5-bit exponent
        bits = tirx.bitwise_or(tirx.shift_left(tirx.bitwise_and(wide, u16(0x80)), u16(8)),
                               tirx.shift_left(tirx.bitwise_and(wide, u16(0x7F)), u16(7)))
    elif fmt == "e5m2":
        bits = tirx.shift_left(wide, u16(8))
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


__all__ = ["BITS", "FORMATS", "FP4_DOT_ZERO", "SCALE_FACTOR", "code_value", "fp4_lookup", "fp4_table"]

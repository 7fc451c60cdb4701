"""Bit-exact checks of :mod:`nnforge.ir.minifloat` against two independent implementations.

1. ml_dtypes 0.6 (float8_e4m3fn, float8_e5m2, float6_e3m2fn, float6_e2m3fn, float4_e2m1fn,
   float8_e8m0fnu): every code decodes to ml_dtypes' value of the same bit pattern; ``encode``
   gives ml_dtypes' ``astype(...).view(uint8)`` codes for random values, every midpoint between
   neighbouring values (ties to even) and its float32 neighbours, signed zeros, the subnormal
   range and below it; out-of-range values saturate (ml_dtypes is fed the clipped input, since
   it overflows to NaN for E4M3); E5M2 with ``saturate=False`` overflows to inf as ml_dtypes does.
   ml_dtypes is only fed float32: its float64 -> minifloat conversion goes through float32 and
   so double-rounds (e.g. 1 + 2**-4 + 2**-40 becomes 1.0 in E4M3 instead of 1.125). The float64
   path of ``round_to`` is checked against an exact (Fraction) nearest-value oracle instead.
   ``e8m0_exponent`` is checked against the OCP MX v1.0 definition computed in plain Python
   (shared exponent = floor(log2(amax)) - emax_elem via ``math.frexp``; all-zero blocks and
   exponents beyond the E8M0 range clamp to [-127, 127], the module's convention) and decoded
   through ml_dtypes' float8_e8m0fnu.

2. Brevitas 0.13.4, which quantizes ``x`` as ``y = clamp(s * round(x/scale / s))`` with
   ``s = 2**(max(floor(log2|x/scale|), 1-bias) - man_bits)`` in float32, then dequantizes as
   ``y * scale`` in float32. ``x/scale`` is the same float32 division here and there; ``s`` is a
   power of two so the rounding step is exact; ``y`` has at most 4 significant bits, so
   ``round_to(...).float() * scale`` is the same single float32 rounding of the exact product as
   Brevitas' ``y * scale``. Hence we demand exact equality of the dequantized weights, and also of
   Brevitas' internal minifloat values ``y`` (captured at ``FloatQuant.dequantize``) and their
   codes. (A float32 ``log2`` that rounds up to the next integer just below a power of two picks
   the next binade, but both binades round such a value to that power of two, so this never shows.)
   Configurations:
     * E4M3 / E5M2 per-tensor and per-channel: Brevitas' own ``Fp8e4m3OCPWeightPerTensorFloat``,
       ``Fp8e5m2OCPWeightPerTensorFloat`` and the ``...PerChannelFloat`` variants
       (scale = absmax / max_value, float32).
     * FP6 E3M2 / E2M3, FP4 E2M1: subclasses of ``FpOCPWeightPerTensorFloat`` /
       ``FpOCPWeightPerChannelFloat`` with ``bit_width``, ``exponent_bit_width``,
       ``mantissa_bit_width`` and ``exponent_bias`` set (FpOCPMixin gives these no NaN/inf
       codes, so the max is all ones: 28, 7.5, 6 as in OCP).
     * Saturation: ``Fp8e4m3OCPWeight`` (unscaled, saturating); overflow to inf:
       ``Fp8e5m2OCPWeight`` with ``saturating = False``.
     * MX: ``MXFloat8e4m3Weight`` and subclasses of it with the E5M2, E3M2, E2M3, E2M1 element
       layouts (groups of 32 along the input dimension, power-of-two scale
       2**(floor(log2 amax) - floor(log2 max_elem)), saturating elements), against
       ``e8m0_exponent`` + ``encode`` with block size 32 (also with a ragged last block, which
       Brevitas zero-pads).

   What cannot be matched, and is therefore not compared:
     * Infinite inputs: Brevitas computes ``inf / 2**inf`` = NaN for them (even when not
       saturating), while nnforge (like ml_dtypes) gives inf / saturates to max.
     * MX blocks with a tiny absmax (below 2**-33, all-zero blocks included): Brevitas clamps
       the absmax to ``scaling_min_val = 1e-10`` before log2, and clamps the floored power of
       two 2**floor(log2 amax) to at least 1e-10 again afterwards, so such a block gets the
       scale float32(1e-10) / 2**emax, which is not even a power of two (no E8M0 code), while
       OCP / nnforge give 2**(floor(log2 amax) - emax) (2**-127 for an all-zero block). The
       element codes of an all-zero block still agree (all zero); that and Brevitas' clamped
       scale are asserted.
"""
from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch

from nnforge.ir import dtype
from nnforge.ir import minifloat as mf
from nnforge.ir.minifloat import MiniFloatError

ELEM = ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1"]
ALL = ELEM + ["e8m0"]
ML = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "e3m2": ml_dtypes.float6_e3m2fn,
      "e2m3": ml_dtypes.float6_e2m3fn, "e2m1": ml_dtypes.float4_e2m1fn, "e8m0": ml_dtypes.float8_e8m0fnu}
OCP_EMAX = {"e4m3": 8, "e5m2": 15, "e3m2": 4, "e2m3": 2, "e2m1": 2}     # OCP MX v1.0, table of element formats


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def ml_codes(x: np.ndarray, name: str) -> np.ndarray:
    """ml_dtypes' codes of float32 ``x``."""
    assert x.dtype == np.float32
    return x.astype(ML[name]).view(np.uint8)


def ml_values(name: str) -> np.ndarray:
    """float64 value of every code of the format, as ml_dtypes reads the bit pattern."""
    bits = dtype(name).bits
    return np.arange(1 << bits, dtype=np.uint8).view(ML[name]).astype(np.float64)


def our_codes(x: np.ndarray, name: str, **kw) -> np.ndarray:
    return mf.encode(torch.from_numpy(x), dtype(name), **kw).numpy()


def positives(name: str) -> np.ndarray:
    """Sorted non-negative finite values of the format (0 included)."""
    v = ml_values(name)
    return np.unique(v[np.isfinite(v) & (v >= 0)])


def min_subnormal(name: str) -> float:
    f = dtype(name)
    return 2.0 ** (1 - f.bias - f.man_bits)


def bits64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64).view(torch.int64)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal as bit patterns (so -0.0 != +0.0); NaNs must coincide."""
    assert a.shape == b.shape and a.dtype == b.dtype
    na, nb = torch.isnan(a), torch.isnan(b)
    assert torch.equal(na, nb)
    view = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    assert torch.equal(a[~na].view(view), b[~nb].view(view)), (a[~na], b[~nb])


def midpoints(name: str) -> np.ndarray:
    """Every midpoint between neighbouring finite values, both signs, as float32 (exact)."""
    p = positives(name)
    mid = (p[:-1] + p[1:]) / 2
    m32 = mid.astype(np.float32)
    assert np.array_equal(m32.astype(np.float64), mid)          # exactly representable
    return np.concatenate([m32, -m32])


def nearest_even_oracle(x: float, name: str) -> float:
    """Exact round-to-nearest-even of a finite in-range ``x`` (Fraction arithmetic) over the
    values ml_dtypes decodes. Even = even code."""
    vals = ml_values(name)
    codes = [c for c in range(len(vals)) if np.isfinite(vals[c])]
    fx = Fraction(x)
    best = min(codes, key=lambda c: (abs(Fraction(float(vals[c])) - fx), c & 1))
    r = float(vals[best])
    return math.copysign(abs(r), x) if r == 0 else r


# ---------------------------------------------------------------------------------------------
# 1. ml_dtypes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_decode_every_code_matches_ml_dtypes(name):
    f = dtype(name)
    ref = ml_values(name)
    assert len(ref) == 1 << f.bits
    codes = torch.arange(1 << f.bits, dtype=torch.int64)
    for out_dtype in (torch.float64, torch.float32):
        got = mf.decode(codes, f, dtype=out_dtype)
        assert got.dtype == out_dtype
        assert_same_bits(got, torch.from_numpy(ref).to(out_dtype))
    # uint8 codes (what encode returns) decode the same
    assert_same_bits(mf.decode(codes.to(torch.uint8), f), mf.decode(codes, f))
    # the NaN codes are exactly the expected ones
    nan_codes = set(np.flatnonzero(np.isnan(ref)).tolist())
    expected = {"e4m3": {0x7F, 0xFF}, "e5m2": {0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF}, "e8m0": {0xFF}}.get(name, set())
    assert nan_codes == expected
    assert ref[np.isfinite(ref)].max() == f.max_value
    assert np.isinf(ref).sum() == (2 if name == "e5m2" else 0)


@pytest.mark.parametrize("name", ELEM)
def test_encode_every_representable_value_roundtrips(name):
    f = dtype(name)
    ref = ml_values(name)
    finite = np.isfinite(ref)
    x = ref[finite].astype(np.float32)
    got = our_codes(x, name)
    assert np.array_equal(got, np.flatnonzero(finite).astype(np.uint8))     # includes -0 -> sign code
    assert np.array_equal(got, ml_codes(x, name))


@pytest.mark.parametrize("name", ELEM)
def test_encode_random_in_range_matches_ml_dtypes(name):
    f = dtype(name)
    rng = np.random.default_rng(1234)
    n = 20000
    lo, hi = math.log2(min_subnormal(name) / 8), math.log2(f.max_value)
    logu = np.exp2(rng.uniform(lo, hi, n)) * rng.choice([-1.0, 1.0], n)
    uni = rng.uniform(-f.max_value, f.max_value, n)
    x = np.concatenate([logu, uni]).astype(np.float32)
    x = x[np.abs(x) <= f.max_value]
    got = our_codes(x, name)
    assert np.array_equal(got, ml_codes(x, name))
    # round_to agrees with decode(encode) and with ml_dtypes' values, bit for bit
    t = torch.from_numpy(x)
    r = mf.round_to(t, f)
    assert r.dtype == torch.float64
    assert_same_bits(r, mf.decode(torch.from_numpy(got), f, dtype=torch.float64))
    assert_same_bits(r, torch.from_numpy(x.astype(ML[name]).astype(np.float64)))
    # sanity: the sample actually spans normals, subnormals and values that flush to zero
    a = np.abs(x)
    assert (a < min_subnormal(name) / 2).any() and ((a > min_subnormal(name)) & (a < 2.0 ** (1 - f.bias))).any()


@pytest.mark.parametrize("name", ELEM)
def test_midpoints_round_ties_to_even(name):
    f = dtype(name)
    mid = midpoints(name)
    got = our_codes(mid, name)
    assert np.array_equal(got, ml_codes(mid, name))
    # independently of ml_dtypes: a tie goes to the code with an even mantissa (even code)
    assert np.all(got & 1 == 0)
    # and it is one of the two neighbours
    r = mf.decode(torch.from_numpy(got), f, dtype=torch.float64).numpy()
    p = positives(name)
    i = np.searchsorted(p, np.abs(mid.astype(np.float64)))
    assert np.all((np.abs(r) == p[i - 1]) | (np.abs(r) == p[i]))


@pytest.mark.parametrize("name", ELEM)
def test_neighbours_of_midpoints_round_away_from_the_tie(name):
    mid = midpoints(name)
    up = np.nextafter(mid, np.float32(np.inf))
    down = np.nextafter(mid, np.float32(-np.inf))
    x = np.concatenate([up, down])
    assert np.array_equal(our_codes(x, name), ml_codes(x, name))
    # up and down neighbours of a positive midpoint land on different values
    n = len(mid) // 2
    assert np.all(our_codes(up[:n], name) == our_codes(down[:n], name) + 1)


@pytest.mark.parametrize("name", ELEM)
def test_signed_zero(name):
    f = dtype(name)
    x = np.array([0.0, -0.0], np.float32)
    got = our_codes(x, name)
    assert got.tolist() == [0, 1 << (f.bits - 1)]
    assert np.array_equal(got, ml_codes(x, name))
    r = mf.round_to(torch.from_numpy(x), f)
    assert r.tolist() == [0.0, 0.0] and torch.signbit(r).tolist() == [False, True]


@pytest.mark.parametrize("name", ELEM)
def test_tiny_values_subnormal_range_and_below(name):
    f = dtype(name)
    s = min_subnormal(name)
    k = np.arange(0, 129, dtype=np.float64)
    base = k * s / 16                                     # 0 .. 8 * smallest subnormal, step s/16
    base = np.concatenate([base, [s / 2, 3 * s / 2, s * 2 ** -10, 2.0 ** -126, 2.0 ** -149, 1e-45]])
    x = base.astype(np.float32)
    assert np.array_equal(x.astype(np.float64)[:len(k)], base[:len(k)])
    x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(0))])
    x = np.concatenate([x, -x])
    got = our_codes(x, name)
    assert np.array_equal(got, ml_codes(x, name))
    # s/2 is a tie between 0 and s -> 0 (even); 3s/2 -> 2s (even); just above s/2 -> s
    t = lambda v: int(our_codes(np.array([v], np.float32), name)[0])
    assert t(s / 2) == 0 and t(3 * s / 2) == 2 and t(float(np.nextafter(np.float32(s / 2), np.float32(1)))) == 1
    assert t(-s / 2) == 1 << (f.bits - 1)                 # -0


@pytest.mark.parametrize("name", ELEM)
def test_out_of_range_saturates(name):
    f = dtype(name)
    top = f.max_value
    p = positives(name)
    half_ulp = (p[-1] - p[-2]) / 2
    rng = np.random.default_rng(7)
    x = np.concatenate([
        [top, top + half_ulp, np.nextafter(np.float32(top + half_ulp), np.float32(0)),
         np.nextafter(np.float32(top + half_ulp), np.float32(np.inf)), 2 * top, 1e30,
         np.finfo(np.float32).max, np.inf],
        rng.uniform(top, 100 * top, 500),
    ]).astype(np.float32)
    x = np.concatenate([x, -x])
    got = our_codes(x, name)
    assert np.array_equal(got, ml_codes(np.clip(x, -top, top), name))
    r = mf.round_to(torch.from_numpy(x), f).numpy()
    assert np.array_equal(np.abs(r), np.full(len(x), top))
    assert np.array_equal(np.sign(r), np.sign(x))
    if not f.has_inf:
        # without infinities saturate=False still saturates (documented); ml_dtypes would give NaN / max
        assert np.array_equal(our_codes(x, name, saturate=False), got)


def test_e5m2_without_saturation_overflows_to_inf_like_ml_dtypes():
    f = dtype("e5m2")
    top = f.max_value                                     # 57344 = 1.75 * 2**15; next binade step 8192
    limit = top + 4096.0                                  # ties at 61440 round to even = 65536 -> inf
    rng = np.random.default_rng(3)
    x = np.concatenate([
        [top, limit, np.nextafter(np.float32(limit), np.float32(0)), np.nextafter(np.float32(limit), np.float32(np.inf)),
         65536.0, 1e6, np.finfo(np.float32).max, np.inf],
        rng.uniform(-2 * top, 2 * top, 2000),
        np.exp2(rng.uniform(-18, 16, 2000)) * rng.choice([-1.0, 1.0], 2000),
    ]).astype(np.float32)
    x = np.concatenate([x, -x])
    got = our_codes(x, "e5m2", saturate=False)
    assert np.array_equal(got, x.astype(ml_dtypes.float8_e5m2).view(np.uint8))
    r = mf.round_to(torch.from_numpy(x), f, saturate=False).numpy()
    assert np.isinf(r).sum() > 0
    assert np.array_equal(np.isinf(r), np.abs(x) >= limit)
    assert got[0] == 0x7B and got[1] == 0x7C and got[2] == 0x7B      # 57344, +inf, 57344
    # saturate=True agrees wherever nothing overflows
    ok = np.abs(x) < limit
    assert np.array_equal(our_codes(x[ok], "e5m2"), got[ok])


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_nan_encodes_as_the_formats_nan(name):
    f = dtype(name)
    x = np.array([np.nan, -np.nan, 1.0], np.float32)
    got = our_codes(x, name)
    assert got[0] == ml_codes(x[:1], name)[0]             # canonical NaN code: 0x7F / 0x7E
    assert got[0] == {"e4m3": 0x7F, "e5m2": 0x7E}[name]
    assert np.isnan(ml_values(name)[got[:2]]).all()
    assert got[2] == ml_codes(x[2:], name)[0]
    assert torch.isnan(mf.round_to(torch.from_numpy(x), f)[:2]).all()


@pytest.mark.parametrize("name", ["e3m2", "e2m3", "e2m1"])
def test_nan_in_format_without_nan_raises(name):
    f = dtype(name)
    x = torch.tensor([1.0, float("nan"), 2.0, float("nan")])
    with pytest.raises(MiniFloatError, match=rf"{f.name} has no NaN.*2 NaN"):
        mf.encode(x, f)
    # without NaN it encodes fine
    assert mf.encode(torch.tensor([1.0, 2.0]), f).tolist() == ml_codes(np.array([1.0, 2.0], np.float32), name).tolist()


@pytest.mark.parametrize("name", ELEM)
def test_float64_input_single_rounding_exact_oracle(name):
    """round_to on float64 rounds once (ml_dtypes would round through float32 first)."""
    f = dtype(name)
    mid = midpoints(name).astype(np.float64)
    mid = mid[mid > 0]
    sel = mid[:: max(1, len(mid) // 24)]                  # a spread of binades, subnormal ones included
    eps = np.abs(sel) * 2.0 ** -40                        # below float32 resolution
    x = np.concatenate([sel, sel + eps, sel - eps, -(sel + eps)])
    got = mf.round_to(torch.from_numpy(x), f).numpy()
    want = np.array([nearest_even_oracle(float(v), name) for v in x])
    assert np.array_equal(got, want)
    n = len(sel)
    assert np.all(np.abs(got[n:2 * n]) > np.abs(got[2 * n:3 * n]))      # nudges break the ties both ways


# --- E8M0 ------------------------------------------------------------------------------------

def test_e8m0_has_no_signed_rounding():
    f = dtype("e8m0")
    with pytest.raises(MiniFloatError, match="unsigned scale format"):
        mf.round_to(torch.tensor([1.0]), f)
    with pytest.raises(MiniFloatError, match="unsigned scale format"):
        mf.encode(torch.tensor([1.0]), f)


def test_encode_e8m0_of_every_power_of_two_matches_ml_dtypes():
    e = np.arange(-127, 128)
    x = np.exp2(e.astype(np.float64))
    got = mf.encode_e8m0(torch.from_numpy(x)).numpy()
    assert np.array_equal(got, x.astype(np.float32).astype(ml_dtypes.float8_e8m0fnu).view(np.uint8))
    assert np.array_equal(got, (e + 127).astype(np.uint8))
    assert np.array_equal(ml_values("e8m0")[got], x)
    for bad in (3.0, 2.0 ** -128, 2.0 ** 128):
        with pytest.raises(MiniFloatError, match="powers of two"):
            mf.encode_e8m0(torch.tensor([bad], dtype=torch.float64))


def _shared_exp_reference(amax: float, elem: str) -> int:
    """OCP MX v1.0: X = 2**(floor(log2(amax)) - emax_elem), in plain Python (frexp is exact)."""
    if amax == 0:
        return -127                                       # all-zero block: smallest scale
    _, e = math.frexp(amax)                               # amax = m * 2**e, 0.5 <= m < 1
    _, emax_e = math.frexp(dtype(elem).max_value)
    return max(-127, min(127, (e - 1) - (emax_e - 1)))


@pytest.mark.parametrize("elem", ELEM)
def test_e8m0_exponent_matches_ocp_definition(elem):
    f = dtype(elem)
    assert mf.max_exponent(f) == OCP_EMAX[elem]
    rng = np.random.default_rng(11)
    pw = np.exp2(np.arange(-140, 128, dtype=np.float64)).astype(np.float32)
    a32 = np.concatenate([
        np.exp2(rng.uniform(-130, 127, 3000)).astype(np.float32),
        pw, np.nextafter(pw, np.float32(0)), np.nextafter(pw, np.float32(np.inf)),
        [0.0, 1e-45, f.max_value, np.nextafter(np.float32(f.max_value), np.float32(np.inf)), np.finfo(np.float32).max],
    ]).astype(np.float32)
    a32 = a32[np.isfinite(a32)]
    codes = mf.e8m0_exponent(torch.from_numpy(a32), f).numpy()
    assert codes.dtype == np.uint8
    want = np.array([_shared_exp_reference(float(a), elem) for a in a32])
    assert np.array_equal(codes.astype(np.int64) - 127, want)
    # the code decodes (ml_dtypes float8_e8m0fnu, and our table) to 2**shared_exp
    scale = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    assert np.array_equal(scale, np.exp2(want.astype(np.float64)))
    assert np.array_equal(mf.decode(torch.from_numpy(codes), dtype("e8m0"), dtype=torch.float64).numpy(), scale)
    # in range, amax / X lies in [2**emax, 2**(emax+1)): the block max lands in the top binade
    inr = (want > -127) & (want < 127)
    q = a32[inr].astype(np.float64) / scale[inr]
    assert np.all((q >= 2.0 ** OCP_EMAX[elem]) & (q < 2.0 ** (OCP_EMAX[elem] + 1)))
    # float64 amax beyond float32's range clamps to the E8M0 range
    big = mf.e8m0_exponent(torch.tensor([2.0 ** 300, 2.0 ** -300, 0.0], dtype=torch.float64), f)
    assert big.tolist() == [254, 0, 0]
    # shape is kept
    assert mf.e8m0_exponent(torch.ones(3, 4), f).shape == (3, 4)


# ---------------------------------------------------------------------------------------------
# 2. Brevitas
# ---------------------------------------------------------------------------------------------

def _brevitas():
    pytest.importorskip("brevitas")
    import brevitas.config
    if brevitas.config.JIT_ENABLED:
        pytest.skip("capturing FloatQuant.dequantize needs BREVITAS_JIT off")
    import brevitas.quant.float_base as fb
    import brevitas.quant.float_quant_ocp as ocp
    import brevitas.quant.mx_quant_ocp as mx
    from brevitas.nn import QuantLinear
    return QuantLinear, fb, ocp, mx


def _ocp_quantizer(name: str, per_channel: bool):
    _, fb, ocp, _ = _brevitas()
    if name == "e4m3":
        return ocp.Fp8e4m3OCPWeightPerChannelFloat if per_channel else ocp.Fp8e4m3OCPWeightPerTensorFloat
    if name == "e5m2":
        return ocp.Fp8e5m2OCPWeightPerChannelFloat if per_channel else ocp.Fp8e5m2OCPWeightPerTensorFloat
    f = dtype(name)
    base = ocp.FpOCPWeightPerChannelFloat if per_channel else ocp.FpOCPWeightPerTensorFloat

    class Quant(base):
        bit_width = f.bits
        exponent_bit_width = f.exp_bits
        mantissa_bit_width = f.man_bits
        exponent_bias = f.bias
    return Quant


def _mx_quantizer(name: str):
    _, _, _, mx = _brevitas()
    if name == "e4m3":
        return mx.MXFloat8e4m3Weight
    f = dtype(name)

    class Quant(mx.MXFloat8e4m3Weight):
        bit_width = f.bits
        exponent_bit_width = f.exp_bits
        mantissa_bit_width = f.man_bits
        exponent_bias = f.bias
    return Quant


def _quantize(quant, w: torch.Tensor):
    """(Brevitas QuantTensor, Brevitas' minifloat values y, the scale y is multiplied by)."""
    QuantLinear = _brevitas()[0]
    layer = QuantLinear(w.shape[1], w.shape[0], bias=False, weight_quant=quant)
    with torch.no_grad():
        layer.weight.copy_(w)
    tq = layer.weight_quant.tensor_quant
    seen = {}
    orig = tq.dequantize

    def capture(y, scale):
        seen["y"], seen["scale"] = y.detach().clone(), scale.detach().clone()
        return orig(y, scale)
    tq.dequantize = capture
    with torch.no_grad():
        qw = layer.quant_weight()
    assert "y" in seen
    return qw, seen["y"], seen["scale"]


def _weights(shape, seed, spread=40):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    mag = torch.exp2(-torch.rand(shape, generator=g) * spread)          # many binades: subnormals too
    pick = torch.rand(shape, generator=g) < 0.5
    return torch.where(pick, w, torch.sign(w) * mag).to(torch.float32)


def _check_against_brevitas(qw, y, scale, w, f, name):
    # our rounding of Brevitas' own x/scale equals Brevitas' minifloat values, bit for bit
    ours = mf.round_to(w / scale, f)
    assert_same_bits(ours.float(), y)
    # ... and our codes equal the codes of those values
    codes = mf.encode(w / scale, f)
    assert np.array_equal(codes.numpy(), ml_codes(y.numpy(), name))
    # the dequantized weights are identical (single float32 rounding of the exact product)
    deq = mf.decode(codes, f) * scale
    assert_same_bits(deq.reshape(qw.value.shape), qw.value.detach())
    assert_same_bits((ours.float() * scale).reshape(qw.value.shape), qw.value.detach())
    return codes


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("name", ELEM)
def test_brevitas_ocp_weight_quant(name, per_channel):
    f = dtype(name)
    quant = _ocp_quantizer(name, per_channel)
    w = _weights((16, 96), seed=ELEM.index(name) + 10 * per_channel)
    qw, y, scale = _quantize(quant, w)
    assert int(qw.exponent_bit_width) == f.exp_bits and int(qw.mantissa_bit_width) == f.man_bits
    assert int(qw.exponent_bias) == f.bias and bool(qw.saturating)
    # Brevitas' scale: absmax / max_value in float32 (per tensor or per output channel)
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
    assert torch.equal(scale.reshape(amax.shape), amax / torch.tensor(f.max_value))
    codes = _check_against_brevitas(qw, y, scale, w, f, name)
    # the sample exercises the whole format: max magnitude, zeros, subnormals
    mag = codes.numpy() & ((1 << (f.bits - 1)) - 1)
    assert (mag == np.flatnonzero(positives(name) == f.max_value)[0]).any()
    assert (mag == 0).any() and ((mag > 0) & (mag < (1 << f.man_bits))).any()


@pytest.mark.parametrize("name", ELEM)
def test_brevitas_ties_with_unit_scale(name):
    """absmax == max_value gives scale 1 exactly, so the weights themselves are midpoints."""
    f = dtype(name)
    mid = midpoints(name)
    x = np.concatenate([[f.max_value], mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf)),
                        ml_values(name)[np.isfinite(ml_values(name))]]).astype(np.float32)
    pad = (-len(x)) % 32
    w = torch.from_numpy(np.concatenate([x, np.zeros(pad, np.float32)])).reshape(-1, 32)
    qw, y, scale = _quantize(_ocp_quantizer(name, False), w)
    assert float(scale) == 1.0
    codes = _check_against_brevitas(qw, y, scale, w, f, name)
    assert np.array_equal(codes.numpy(), ml_codes(w.numpy(), name))


def test_brevitas_saturating_unscaled_e4m3():
    _, _, ocp, _ = _brevitas()
    f = dtype("e4m3")
    g = torch.Generator().manual_seed(5)
    w = torch.cat([torch.randn(4, 64, generator=g) * 300,
                   torch.tensor([[448.0, 464.0, 479.9, 480.0, 1e6, 3.4e38] * 10 + [0.0] * 4])])
    w[-1, ::2] *= -1
    qw, y, scale = _quantize(ocp.Fp8e4m3OCPWeight, w)
    assert float(scale) == 1.0
    assert (w.abs() > f.max_value).sum() > 50
    _check_against_brevitas(qw, y, scale, w, f, "e4m3")
    assert qw.value.abs().max() == f.max_value


def test_brevitas_non_saturating_e5m2_overflows_to_inf():
    _, _, ocp, _ = _brevitas()
    f = dtype("e5m2")

    class Quant(ocp.Fp8e5m2OCPWeight):
        saturating = False
    g = torch.Generator().manual_seed(6)
    w = torch.cat([torch.randn(4, 64, generator=g) * 40000,
                   torch.tensor([[57344.0, 61439.996, 61440.0, 65536.0, 1e6, 3.4e38, 1.0, 2.0 ** -17] * 8])])
    w[-1, 1::2] *= -1
    qw, y, scale = _quantize(Quant, w)
    assert float(scale) == 1.0 and not bool(qw.saturating)
    ours = mf.round_to(w, f, saturate=False)
    assert_same_bits(ours.float(), y)
    assert_same_bits(ours.float(), qw.value.detach())
    assert torch.isinf(y).sum() > 10
    codes = mf.encode(w, f, saturate=False)
    assert np.array_equal(codes.numpy(), ml_codes(y.numpy(), "e5m2"))
    assert np.array_equal(codes.numpy(), ml_codes(w.numpy(), "e5m2"))    # ml_dtypes overflows the same way


def _mx_reference(w: torch.Tensor, f):
    """Block-32 OCP MX along the input dim with nnforge: (e8m0 codes, element codes, scale)."""
    rows, cols = w.shape
    pad = (-cols) % 32
    wp = torch.cat([w, torch.zeros(rows, pad)], dim=1).reshape(rows, -1, 32)
    amax = wp.abs().amax(dim=-1, keepdim=True)
    sc = mf.e8m0_exponent(amax, f)
    scale = mf.decode(sc, dtype("e8m0"))
    codes = mf.encode(wp / scale, f)
    return sc, codes, scale, wp


@pytest.mark.parametrize("cols", [128, 80], ids=["full_blocks", "ragged_last_block"])
@pytest.mark.parametrize("name", ELEM)
def test_brevitas_mx(name, cols):
    f = dtype(name)
    g = torch.Generator().manual_seed(100 + ELEM.index(name))
    w = _weights((8, cols), seed=200 + ELEM.index(name), spread=12)
    w = w * torch.exp2(torch.randint(-20, 20, (8, 1), generator=g).float())       # blocks of very different size
    qw, y, bscale = _quantize(_mx_quantizer(name), w)
    assert qw.group_size == 32 and qw.group_dim == 1
    sc, codes, scale, wp = _mx_reference(w, f)
    # the shared scales are the same powers of two
    assert bscale.shape == scale.shape == (8, (cols + 31) // 32, 1)
    assert torch.equal(bscale, scale)
    # codes and minifloat values are the same (zero padding included)
    assert torch.equal(y.reshape(wp.shape), mf.decode(codes, f).reshape(wp.shape))
    assert np.array_equal(codes.numpy(), ml_codes(y.numpy(), name))
    # dequantized weights are the same, bit for bit
    deq = (mf.decode(codes, f) * scale).reshape(8, -1)[:, :cols]
    assert_same_bits(deq, qw.value.detach())
    # each block's largest element lands in the top binade [2**emax, max_value] (saturating if needed)
    top = mf.decode(codes, f).abs().amax(-1)
    assert bool((top >= 2.0 ** OCP_EMAX[name]).all()) and bool((top <= f.max_value).all())


@pytest.mark.parametrize("name", ELEM)
def test_brevitas_mx_ties_with_unit_scale(name):
    f = dtype(name)
    mid = midpoints(name)
    x = np.concatenate([mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))]).astype(np.float32)
    x = np.concatenate([x, np.zeros((-len(x)) % 31, np.float32)]).reshape(-1, 31)
    # every block gets a leading max_value, so each block's scale is 2**0
    blocks = np.concatenate([np.full((len(x), 1), f.max_value, np.float32), x], axis=1)
    w = torch.from_numpy(blocks.reshape(1, -1).copy())
    qw, y, bscale = _quantize(_mx_quantizer(name), w)
    sc, codes, scale, wp = _mx_reference(w, f)
    assert torch.equal(bscale, scale) and bool((scale == 1).all()) and bool((sc == 127).all())
    assert np.array_equal(codes.numpy(), ml_codes(y.numpy(), name))
    assert np.array_equal(codes.numpy().reshape(-1), ml_codes(w.numpy().reshape(-1), name))
    assert_same_bits(mf.decode(codes, f).reshape(1, -1), qw.value.detach())


@pytest.mark.parametrize("name", ["e4m3", "e2m1"])
def test_brevitas_mx_tiny_blocks_documented_divergence(name):
    """Brevitas clamps a block's absmax and its power-of-two scale to scaling_min_val=1e-10; only
    the element codes of an all-zero block can agree with OCP/nnforge, not its scale."""
    f = dtype(name)
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-1, 1, 64)
    qw, y, bscale = _quantize(_mx_quantizer(name), w)
    sc, codes, scale, _ = _mx_reference(w, f)
    assert np.array_equal(codes.numpy(), ml_codes(y.numpy(), name))            # all codes agree
    assert torch.equal(bscale[1], scale[1])                                      # normal blocks agree
    assert (sc[0] == 0).all()                                                    # nnforge: 2**-127
    emax = OCP_EMAX[name]
    assert torch.equal(bscale[0], torch.full((2, 1), 1e-10) / 2.0 ** emax)       # Brevitas: 1e-10 / 2**emax
    assert mf.decode(sc[1], dtype("e8m0")).tolist() == bscale[1].tolist()        # a normal block: 2**(0 - emax)

"""Element types: bit widths, integer ranges, minifloat layouts and their largest values, lookup
by name / short name / torch dtype, and promotion. Minifloat layouts are checked against
ml_dtypes (the oracle the design names) code by code."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from nnforge.ir import DTYPES, dtype
from nnforge.ir import minifloat as mf
from nnforge.ir.dtypes import promote

EXPECTED_BITS = {
    "float64": 64, "float32": 32, "float16": 16, "bfloat16": 16, "int64": 64, "int32": 32, "int16": 16,
    "int8": 8, "uint8": 8, "bool": 1, **{f"int{b}": b for b in range(2, 8)}, **{f"uint{b}": b for b in range(1, 8)},
    "float8_e4m3fn": 8, "float8_e5m2": 8, "float6_e3m2fn": 6, "float6_e2m3fn": 6, "float4_e2m1fn": 4,
    "float8_e8m0fnu": 8,
}
MINIFLOAT_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0, "float6_e3m2fn": 28.0, "float6_e2m3fn": 7.5,
                 "float4_e2m1fn": 6.0, "float8_e8m0fnu": 2.0 ** 127}
ML_DTYPES = ["float8_e4m3fn", "float8_e5m2", "float6_e3m2fn", "float6_e2m3fn", "float4_e2m1fn", "float8_e8m0fnu"]


def test_registry_is_exactly_the_documented_set():
    assert set(DTYPES) == set(EXPECTED_BITS)


@pytest.mark.parametrize("name", sorted(EXPECTED_BITS))
def test_bits(name):
    assert DTYPES[name].bits == EXPECTED_BITS[name]
    assert DTYPES[name].name == name and str(DTYPES[name]) == name


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED_BITS if n.startswith(("int", "uint"))))
def test_int_range(name):
    d = DTYPES[name]
    b = d.bits
    assert d.is_integer and not d.is_float
    if name.startswith("uint"):
        assert d.int_range == (0, 2 ** b - 1)
    else:
        assert d.int_range == (-(2 ** (b - 1)), 2 ** (b - 1) - 1)
    if d.torch_dtype is not None:
        info = torch.iinfo(d.torch_dtype)
        assert d.int_range == (info.min, info.max)


@pytest.mark.parametrize("name", ["float32", "float16", "bool", "float8_e4m3fn"])
def test_int_range_refused_for_non_integers(name):
    with pytest.raises(TypeError, match=f"{name} is not an integer type"):
        DTYPES[name].int_range


@pytest.mark.parametrize("name", ["float64", "float32", "float16", "bfloat16"])
def test_standard_float_types(name):
    d = DTYPES[name]
    assert d.is_float and not d.is_integer
    assert d.torch_dtype == getattr(torch, name)
    assert torch.finfo(d.torch_dtype).bits == d.bits
    with pytest.raises(TypeError, match="not a minifloat"):
        d.max_value


@pytest.mark.parametrize("name", sorted(MINIFLOAT_MAX))
def test_minifloat_max_value(name):
    d = DTYPES[name]
    assert d.kind == "minifloat" and d.is_float
    assert d.max_value == MINIFLOAT_MAX[name]
    assert d.bits == d.exp_bits + d.man_bits + (1 if d.signed else 0)


@pytest.mark.parametrize("name", ML_DTYPES)
def test_minifloat_layout_matches_ml_dtypes(name):
    d = DTYPES[name]
    ref = getattr(ml_dtypes, name)
    info = ml_dtypes.finfo(ref)
    assert float(info.max) == d.max_value
    assert info.bits == d.bits
    assert info.nmant == d.man_bits
    assert info.nexp == d.exp_bits
    # smallest normal: 2^(1 - bias) (E8M0 has no subnormals and its smallest value is 2^-127)
    tiny = 2.0 ** (1 - d.bias) if d.man_bits else 2.0 ** -d.bias
    assert float(info.tiny) == tiny
    assert (d.nan != "none") == bool(np.isnan(np.array([np.nan], dtype=np.float32).astype(ref)[0]))
    assert d.has_inf == bool(np.isinf(np.array([np.inf], dtype=np.float32).astype(ref)[0]))
    if d.torch_name:
        assert d.torch_dtype == getattr(torch, name)


@pytest.mark.parametrize("name", ML_DTYPES)
def test_every_code_decodes_like_ml_dtypes(name):
    """Exponent bits, mantissa bits, bias and NaN/inf conventions together define every code's
    value; compare the whole code table with ml_dtypes' bit patterns."""
    d = DTYPES[name]
    codes = np.arange(1 << d.bits, dtype=np.uint8)
    want = codes.view(getattr(ml_dtypes, name)).astype(np.float64)
    got = mf.decode(torch.arange(1 << d.bits), d, torch.float64).numpy()
    np.testing.assert_array_equal(got, want)
    finite = got[np.isfinite(got)]
    assert finite.max() == d.max_value


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"])
def test_torch_minifloat_dtypes_agree(name):
    """Where torch holds the format, its largest value agrees too."""
    d = DTYPES[name]
    assert float(torch.finfo(d.torch_dtype).max) == d.max_value


def test_kinds():
    assert DTYPES["bool"].kind == "bool" and not DTYPES["bool"].is_integer and not DTYPES["bool"].is_float
    assert not DTYPES["float8_e8m0fnu"].signed
    assert all(DTYPES[n].signed for n in ML_DTYPES[:-1])
    assert DTYPES["int4"].torch_dtype is None                   # sub-byte ints live only in encodings
    assert DTYPES["float4_e2m1fn"].torch_dtype is None


# --- lookup ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED_BITS))
def test_lookup_by_name_short_and_torch(name):
    d = DTYPES[name]
    assert dtype(name) is d
    assert dtype(d.short) is d
    assert dtype(d) is d
    if d.torch_name:
        assert dtype(d.torch_dtype) is d


def test_short_names_are_unique():
    shorts = [d.short for d in DTYPES.values()]
    assert len(shorts) == len(set(shorts))
    assert dtype("f32").name == "float32" and dtype("e4m3").name == "float8_e4m3fn"
    assert dtype("i4").name == "int4" and dtype("u1").name == "uint1"


def test_lookup_errors():
    with pytest.raises(TypeError, match="unknown dtype 'float128'; known: float64"):
        dtype("float128")
    with pytest.raises(TypeError, match="cannot interpret 3"):
        dtype(3)
    with pytest.raises(TypeError, match="has no nnforge equivalent"):
        dtype(torch.complex64)


def test_promote_follows_torch():
    assert promote(dtype("f32"), dtype("f16")).name == "float32"
    assert promote(dtype("i64"), dtype("f16")).name == "float16"
    assert promote(dtype("i8"), dtype("u8")).name == "int16"
    assert promote(dtype("bool"), dtype("i32")).name == "int32"
    assert promote(dtype("bf16"), dtype("f16")).name == "float32"


def test_dtypes_are_hashable_and_frozen():
    d = dtype("f32")
    assert {d: 1}[dtype("float32")] == 1
    with pytest.raises(Exception):
        d.bits = 3
    assert math.isclose(dtype("e4m3").max_value, 448.0)

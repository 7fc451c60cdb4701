"""Weight encodings: Dense and IntQuant.

IntQuant.decode is checked against a by-hand ``(code - zero_point) * scale`` on the 2-D view;
IntQuant.quantize (round to nearest) per tensor / channel / group, symmetric and asymmetric, for
every width 2..8, with the RTN error bound |w - decode(w)| <= scale/2 for every element; act-order
permutations; from_codes / constructor validation with messages naming the problem; the stored
parts and their byte counts.
"""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import ENCODINGS, Dense, EncodingError, IntQuant, dtype
from nnforge.ir.encodings import encoding_from_parts, rows_cols

TINY_SLACK = 1e-6


def element_scales(enc: IntQuant) -> torch.Tensor:
    """The scale of every element of the 2-D view, in *stored* column order."""
    rows, cols = rows_cols(enc.shape)
    idx = torch.arange(cols) // enc.group_size
    return enc.scale.to(torch.float32)[:, idx].expand(rows, cols)


def to_original_order(x: torch.Tensor, perm) -> torch.Tensor:
    if perm is None:
        return x
    out = torch.empty_like(x)
    out[:, perm] = x
    return out


# --- Dense -------------------------------------------------------------------------------------
def test_dense_decode_and_parts():
    t = torch.randn(3, 4)
    enc = Dense(t)
    assert enc.shape == (3, 4) and enc.dtype.name == "float32"
    assert torch.equal(enc.decode(), t)
    assert enc.decode(torch.float64).dtype == torch.float64
    assert torch.equal(enc.decode(torch.float64), t.double())
    assert enc.tensors().keys() == {"data"}
    assert enc.nbytes == 48 and enc.bits_per_weight == 32.0
    assert enc.describe() == "dense f32"
    back = Dense.from_parts(enc.params(), enc.tensors())
    assert torch.equal(back.data, t)


def test_dense_integer_constant_keeps_its_dtype():
    enc = Dense(torch.arange(6).reshape(2, 3))
    assert enc.dtype.name == "int64"
    assert enc.decode(torch.float32).dtype == torch.int64          # ints are never cast to float
    assert Dense(torch.tensor(True)).dtype.name == "bool"


def test_dense_is_detached_and_contiguous():
    t = torch.randn(4, 3, requires_grad=True)
    enc = Dense(t.t())
    assert not enc.data.requires_grad
    assert enc.data.is_contiguous()
    assert enc.shape == (3, 4)


def test_dense_rejects_non_tensor():
    with pytest.raises(EncodingError, match="Dense needs a torch.Tensor, got list"):
        Dense([1.0, 2.0])


def test_registry():
    assert ENCODINGS["dense"] is Dense and ENCODINGS["int"] is IntQuant
    with pytest.raises(EncodingError, match="unknown weight encoding 'bogus'; known: .*dense"):
        encoding_from_parts("bogus", {}, {})


# --- IntQuant decode -----------------------------------------------------------------------------
def test_intquant_decode_by_hand_signed_per_group():
    codes = torch.tensor([[-8, -1, 0, 7, 3, -4], [1, 2, 3, -3, -2, -1]])
    scale = torch.tensor([[0.5, 2.0], [0.25, 1.0]])
    enc = IntQuant.from_codes(codes, scale, bits=4, signed=True, shape=(2, 6), group_size=3)
    want = torch.tensor([[-4.0, -0.5, 0.0, 14.0, 6.0, -8.0], [0.25, 0.5, 0.75, -3.0, -2.0, -1.0]])
    assert torch.equal(enc.decode(), want)
    assert torch.equal(enc.int_codes(), codes)
    assert enc.granularity == "group" and enc.code_dtype.name == "int4"
    assert enc.describe() == "i4 g3 sym"


def test_intquant_decode_by_hand_unsigned_with_zero_point():
    codes = torch.tensor([[0, 5, 15], [7, 8, 9]])
    scale = torch.tensor([[0.1], [2.0]])
    zp = torch.tensor([[5], [8]])
    enc = IntQuant.from_codes(codes, scale, bits=4, signed=False, shape=(2, 3), zero_point=zp)
    want = (codes - zp).float() * scale
    assert torch.allclose(enc.decode(), want)
    assert enc.zero_point.dtype == torch.uint8
    assert enc.granularity == "channel"
    assert enc.describe() == "u4 per-channel asym"


def test_intquant_decode_dtypes_and_shape():
    w = torch.randn(4, 2, 3)                   # conv-like: rows 4, cols 6
    enc = IntQuant.quantize(w, 8)
    assert enc.decode().shape == (4, 2, 3) and enc.decode().dtype == torch.float32
    assert enc.decode(torch.float64).dtype == torch.float64
    assert enc.decode(torch.float16).dtype == torch.float16
    assert torch.allclose(enc.decode(torch.float64).float(), enc.decode())
    enc16 = IntQuant(enc.shape, enc.bits, enc.signed, enc.codes, enc.scale, enc.group_size, out_dtype="float16")
    assert enc16.dtype.name == "float16" and enc16.decode().dtype == torch.float16


def test_intquant_act_order_decode():
    """Stored column j holds original column perm[j]: decode puts it back."""
    codes = torch.tensor([[1, 2, 3, 4]])
    perm = torch.tensor([2, 0, 3, 1])
    enc = IntQuant.from_codes(codes, torch.tensor([[1.0]]), bits=4, signed=True, shape=(1, 4), perm=perm)
    out = enc.decode()
    assert out.tolist() == [[2.0, 4.0, 1.0, 3.0]]          # out[:, perm[j]] = codes[:, j]
    assert "act-order" in enc.describe()
    assert enc.perm.dtype == torch.int64


# --- IntQuant.quantize (RTN) ----------------------------------------------------------------------
CASES = [  # (per_tensor, group_size, expected granularity)
    (True, None, "tensor"),
    (False, None, "channel"),
    (False, 8, "group"),
]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("per_tensor, group_size, gran", CASES, ids=["tensor", "channel", "group"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_error_bound(bits, per_tensor, group_size, gran, symmetric):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 32, generator=gen) * torch.linspace(0.1, 3, 6).unsqueeze(1)
    w[1] += 0.7                                         # a row that is not centred on zero
    enc = IntQuant.quantize(w, bits, group_size=group_size, symmetric=symmetric, per_tensor=per_tensor)
    assert enc.granularity == gran
    assert enc.signed == symmetric and (enc.zero_point is None) == symmetric
    rows = 1 if per_tensor else 6
    groups = 32 // group_size if group_size else 1
    assert tuple(enc.scale.shape) == (rows, groups)
    codes = enc.int_codes()
    lo, hi = enc.code_dtype.int_range
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    if symmetric:
        assert int(codes.min()) >= -(2 ** (bits - 1))
    err = (w - enc.decode()).abs()
    bound = element_scales(enc) / 2 * (1 + TINY_SLACK) + TINY_SLACK
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"
    # and the grid is actually used: not everything collapses onto a couple of codes
    assert len(torch.unique(codes)) >= min(2 ** bits - 1, 3)


def test_quantize_fp16_scales_still_bounded():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    enc = IntQuant.quantize(w, 4, group_size=16, scale_dtype=torch.float16)
    assert enc.scale.dtype == torch.float16
    err = (w - enc.decode()).abs()
    assert bool((err <= element_scales(enc) / 2 * (1 + 1e-3)).all())


def test_quantize_symmetric_scale_is_amax_over_qmax():
    w = torch.tensor([[1.0, -3.5, 0.2, 2.0]])
    enc = IntQuant.quantize(w, 4)
    assert torch.allclose(enc.scale, torch.tensor([[3.5 / 7]]))
    assert enc.int_codes().tolist() == [[2, -7, 0, 4]]


def test_quantize_asymmetric_all_positive_row_uses_zero_point_zero():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    enc = IntQuant.quantize(w, 2, symmetric=False)
    assert enc.zero_point.tolist() == [[0]]
    assert torch.allclose(enc.decode(), w)


def test_quantize_exactly_representable_weights_are_exact():
    scale = 0.125
    codes = torch.randint(-7, 8, (4, 16), generator=torch.Generator().manual_seed(0))
    codes[:, 0] = 7                                    # amax = 7*scale in every row
    w = codes.float() * scale
    enc = IntQuant.quantize(w, 4)
    assert torch.equal(enc.decode(), w)


def test_quantize_zero_weight_is_finite():
    enc = IntQuant.quantize(torch.zeros(3, 8), 4, group_size=4)
    assert torch.isfinite(enc.scale).all() and bool((enc.scale > 0).all())
    assert torch.equal(enc.decode(), torch.zeros(3, 8))
    enc = IntQuant.quantize(torch.zeros(3, 8), 4, symmetric=False)
    assert torch.equal(enc.decode(), torch.zeros(3, 8))


def test_quantize_with_act_order_permutation():
    """Quantise the weight in a permuted column order (as GPTQ's act-order does), store it with
    ``perm``: decode is back in the original order and within scale/2 of it."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(5, 24, generator=gen)
    perm = torch.randperm(24, generator=gen)
    stored = IntQuant.quantize(w[:, perm], 4, group_size=8)
    enc = IntQuant.from_codes(stored.int_codes(), stored.scale, bits=4, signed=True, shape=(5, 24), group_size=8,
                              perm=perm)
    out = enc.decode()
    bound = to_original_order(element_scales(enc), perm) / 2 * (1 + TINY_SLACK)
    assert bool(((w - out).abs() <= bound).all())
    # without the permutation, columns land in the wrong places
    assert not torch.allclose(stored.decode(), w, atol=0.5)
    assert torch.equal(to_original_order(stored.decode(), perm), out)


def test_quantize_rejects_group_size_that_does_not_divide():
    with pytest.raises(EncodingError, match="group_size 5 does not divide the 12 columns of a weight of shape \\(3, 12\\)"):
        IntQuant.quantize(torch.randn(3, 12), 4, group_size=5)


def test_quantize_per_tensor_ignores_group_size():
    enc = IntQuant.quantize(torch.randn(4, 8), 8, group_size=4, per_tensor=True)
    assert enc.granularity == "tensor" and tuple(enc.scale.shape) == (1, 1)


def test_quantize_conv_and_vector_shapes():
    w = torch.randn(4, 3, 2, 2)
    enc = IntQuant.quantize(w, 8, group_size=4)
    assert tuple(enc.scale.shape) == (4, 3)
    assert enc.decode().shape == w.shape
    assert bool(((w - enc.decode()).abs().reshape(4, 12) <= element_scales(enc) / 2 + TINY_SLACK).all())


# --- sizes ------------------------------------------------------------------------------------------
def test_nbytes_and_bits_per_weight():
    enc = IntQuant.quantize(torch.randn(16, 64), 4, group_size=32)
    assert enc.tensors().keys() == {"codes", "scale"}
    assert tuple(enc.codes.shape) == (16, 32)                       # two 4-bit codes a byte
    assert enc.nbytes == 16 * 32 + 16 * 2 * 4
    assert enc.bits_per_weight == pytest.approx(4 + 32 / 32)
    asym = IntQuant.quantize(torch.randn(16, 64), 3, symmetric=False)
    assert asym.tensors().keys() == {"codes", "scale", "zero_point"}
    assert tuple(asym.codes.shape) == (16, 24)                      # ceil(64*3/8)
    assert asym.nbytes == 16 * 24 + 16 * 4 + 16 * 1


def test_from_parts_round_trip():
    gen = torch.Generator().manual_seed(2)
    perm = torch.randperm(16, generator=gen)
    enc = IntQuant.from_codes(torch.randint(0, 32, (3, 16), generator=gen), torch.rand(3, 2) + 0.1, bits=5,
                              signed=False, shape=(3, 16), group_size=8, zero_point=torch.full((3, 2), 16),
                              perm=perm, out_dtype="float16")
    back = encoding_from_parts(enc.kind, enc.params(), enc.tensors())
    assert isinstance(back, IntQuant)
    assert back.params() == enc.params()
    for k, t in enc.tensors().items():
        assert torch.equal(back.tensors()[k], t)
    assert torch.equal(back.decode(), enc.decode())
    assert back.dtype == dtype("float16")


# --- validation ---------------------------------------------------------------------------------------
def test_from_codes_rejects_codes_of_another_size():
    """BUG: IntQuant.from_codes with codes whose element count differs from ``shape`` fails inside
    torch (``RuntimeError: shape '[4, 8]' is invalid for input of size 28``) instead of raising
    EncodingError naming the codes and the expected [rows, cols]: it reshapes before validating."""
    with pytest.raises(EncodingError, match="codes"):
        IntQuant.from_codes(torch.zeros(4, 7, dtype=torch.int64), torch.ones(4, 1), bits=4, signed=True, shape=(4, 8))


def test_from_codes_rejects_unsupported_widths():
    """BUG: IntQuant.from_codes(bits=1 or 9) raises ``TypeError: unknown dtype 'int1'; known: ...``
    (it looks up f"int{bits}" before anything checks the width) instead of IntQuant's own
    "IntQuant supports 2..8 bits" EncodingError."""
    for bits in (1, 9):
        with pytest.raises(EncodingError, match="2..8 bits"):
            IntQuant.from_codes(torch.zeros(2, 8, dtype=torch.int64), torch.ones(2, 1), bits=bits, signed=True,
                                shape=(2, 8))


def test_constructor_rejects_unsupported_widths():
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(EncodingError, match="IntQuant supports 2..8 bits, got 1"):
        IntQuant((2, 8), 1, False, codes, torch.ones(2, 1), 8)


def test_from_codes_rejects_out_of_range_codes():
    with pytest.raises(EncodingError, match="codes outside \\[-8, 7\\] for signed 4-bit"):
        IntQuant.from_codes(torch.tensor([[8, 0]]), torch.ones(1, 1), bits=4, signed=True, shape=(1, 2))
    with pytest.raises(EncodingError, match="codes outside \\[0, 15\\] for unsigned 4-bit"):
        IntQuant.from_codes(torch.tensor([[-1, 0]]), torch.ones(1, 1), bits=4, signed=False, shape=(1, 2))


@pytest.mark.parametrize("scale_shape", [(3, 2), (2, 1), (4, 1), (3,)], ids=["groups", "rows2", "rows4", "1d"])
def test_from_codes_rejects_scale_shape(scale_shape):
    """scale must be [1 or rows, groups]; the message gives the expected and actual shapes."""
    codes = torch.zeros(3, 8, dtype=torch.int64)
    scale = torch.ones(scale_shape)
    if scale_shape == (3,):            # a 1-D per-row scale is reshaped to [3, 1]: valid
        assert IntQuant.from_codes(codes, scale, bits=4, signed=True, shape=(3, 8)).granularity == "channel"
        return
    with pytest.raises(EncodingError, match="scale must be \\[1 or 3, 1\\], got"):
        IntQuant.from_codes(codes, scale, bits=4, signed=True, shape=(3, 8))


def test_from_codes_rejects_group_size():
    codes = torch.zeros(3, 8, dtype=torch.int64)
    with pytest.raises(EncodingError, match="group_size 9 outside 1..8"):
        IntQuant.from_codes(codes, torch.ones(3, 1), bits=4, signed=True, shape=(3, 8), group_size=9)
    with pytest.raises(EncodingError, match="scale must be \\[1 or 3, 2\\], got \\(3, 1\\)"):
        IntQuant.from_codes(codes, torch.ones(3, 1), bits=4, signed=True, shape=(3, 8), group_size=4)


def test_from_codes_rejects_zero_point_shape():
    codes = torch.zeros(3, 8, dtype=torch.int64)
    with pytest.raises(EncodingError, match="zero_point shape \\(3, 2\\) differs from scale shape \\(3, 1\\)"):
        IntQuant.from_codes(codes, torch.ones(3, 1), bits=4, signed=False, shape=(3, 8),
                            zero_point=torch.zeros(3, 2, dtype=torch.int64))


@pytest.mark.parametrize("perm", [[0, 1, 2], [0, 1, 2, 2], [0, 1, 2, 4], [3, 2, 1, 0, 4]])
def test_from_codes_rejects_bad_perm(perm):
    with pytest.raises(EncodingError, match="perm must be a permutation of range\\(4\\)"):
        IntQuant.from_codes(torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 1), bits=4, signed=True,
                            shape=(2, 4), perm=torch.tensor(perm))


def test_constructor_rejects_wrong_packed_codes():
    with pytest.raises(EncodingError, match="codes must be uint8 \\(2, 4\\) for 4-bit codes of shape \\(2, 8\\), "
                                            "got torch.uint8 \\(2, 8\\)"):
        IntQuant((2, 8), 4, True, torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 1), 8)
    with pytest.raises(EncodingError, match="got torch.int64"):
        IntQuant((2, 8), 4, True, torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 1), 8)


def test_constructor_rejects_integer_scale():
    with pytest.raises(EncodingError, match="scale must be a float tensor"):
        IntQuant((2, 8), 4, True, torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2, 1, dtype=torch.int64), 8)


def test_encodings_are_immutable():
    enc = IntQuant.quantize(torch.randn(2, 8), 4)
    with pytest.raises(Exception):
        enc.bits = 8
    with pytest.raises(Exception):
        Dense(torch.ones(2)).data = torch.zeros(2)

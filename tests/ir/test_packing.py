"""Bit packing: round trips for every width 1..8, signed (offset binary) and unsigned, odd column
counts; the documented little-endian layout against an independent big-integer reference; sizes
and errors."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import packing

BITS = list(range(1, 9))
COLS = [1, 3, 7, 8, 13, 33]


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The documented layout: code j occupies bits [j*b, (j+1)*b) of a little-endian row."""
    rows, cols = codes.shape
    nbytes = (cols * bits + 7) // 8
    out = torch.zeros(rows, nbytes, dtype=torch.uint8)
    for r in range(rows):
        acc = 0
        for j, c in enumerate(codes[r].tolist()):
            acc |= int(c) << (j * bits)
        out[r] = torch.tensor(list(acc.to_bytes(nbytes, "little")), dtype=torch.uint8)
    return out


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("bits", BITS)
def test_unsigned_round_trip_and_layout(bits, cols):
    gen = torch.Generator().manual_seed(bits * 100 + cols)
    codes = torch.randint(0, 1 << bits, (5, cols), generator=gen)
    codes[0, 0], codes[-1, -1] = 0, (1 << bits) - 1          # both ends of the range appear
    packed = packing.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (5, -(-cols * bits // 8)) == (5, packing.packed_cols(cols, bits))
    assert torch.equal(packed, reference_pack(codes, bits))
    back = packing.unpack_bits(packed, bits, cols)
    assert back.dtype == torch.int64
    assert torch.equal(back, codes)


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("bits", BITS[1:])
def test_signed_round_trip(bits, cols):
    gen = torch.Generator().manual_seed(bits + 7 * cols)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (4, cols), generator=gen)
    codes[0, 0], codes[-1, -1] = lo, hi
    fields = packing.to_unsigned(codes, bits)
    assert int(fields.min()) >= 0 and int(fields.max()) < 1 << bits
    assert torch.equal(fields, codes + 2 ** (bits - 1))           # offset binary, not two's complement
    back = packing.to_signed(packing.unpack_bits(packing.pack_bits(fields, bits), bits, cols), bits)
    assert torch.equal(back, codes)


def test_four_bit_is_low_nibble_first():
    packed = packing.pack_bits(torch.tensor([[0x1, 0x2, 0xA, 0xF, 0x3]]), 4)
    assert packed.tolist() == [[0x21, 0xFA, 0x03]]


def test_one_bit_is_lsb_first():
    packed = packing.pack_bits(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1]]), 1)
    assert packed.tolist() == [[0b10000001, 0b00000001]]


def test_three_bit_codes_straddle_bytes():
    # codes 0b101, 0b011, 0b111 -> stream bits (LSB first) 101 110 111 -> 0b11_011_101 = 0xDD, then 0b1
    packed = packing.pack_bits(torch.tensor([[0b101, 0b011, 0b111]]), 3)
    assert packed.tolist() == [[0b11011101, 0b1]]


@pytest.mark.parametrize("bits", BITS)
def test_rows_are_padded_independently(bits):
    """Row r's bytes depend only on row r (a row can be read without its neighbours)."""
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5), generator=gen)
    packed = packing.pack_bits(codes, bits)
    for r in range(3):
        assert torch.equal(packed[r:r + 1], packing.pack_bits(codes[r:r + 1], bits))


def test_empty_columns_and_single_code():
    for bits in BITS:
        assert tuple(packing.pack_bits(torch.zeros(2, 0, dtype=torch.int64), bits).shape) == (2, 0)
    assert packing.unpack_bits(packing.pack_bits(torch.tensor([[5]]), 3), 3, 1).tolist() == [[5]]


def test_zero_rows():
    """BUG: pack_bits on a [0, cols] tensor (a weight with no rows) crashes for every width but 8
    with torch's "cannot reshape tensor of 0 elements into shape [0, -1, ...]": the ``.view(rows,
    -1, per)`` / ``.view(rows, -1, 8)`` calls cannot infer -1 when rows == 0. It should return a
    uint8 [0, ceil(cols*bits/8)] tensor (it already checks ``codes.numel()`` for the empty case)."""
    for bits in BITS:
        packed = packing.pack_bits(torch.zeros(0, 5, dtype=torch.int64), bits)
        assert tuple(packed.shape) == (0, packing.packed_cols(5, bits)), bits
        assert tuple(packing.unpack_bits(packed, bits, 5).shape) == (0, 5), bits


@pytest.mark.parametrize("cols, bits, want", [(1, 1, 1), (8, 1, 1), (9, 1, 2), (3, 3, 2), (8, 3, 3),
                                              (5, 4, 3), (4, 6, 3), (5, 6, 4), (7, 7, 7), (3, 8, 3)])
def test_packed_cols(cols, bits, want):
    assert packing.packed_cols(cols, bits) == want


def test_pack_errors():
    with pytest.raises(ValueError, match="1..8-bit"):
        packing.pack_bits(torch.zeros(2, 2, dtype=torch.int64), 9)
    with pytest.raises(ValueError, match="1..8-bit"):
        packing.pack_bits(torch.zeros(2, 2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="2-D tensor, got shape \\(8,\\)"):
        packing.pack_bits(torch.zeros(8, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="out of range for 4-bit"):
        packing.pack_bits(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="out of range for 4-bit"):
        packing.pack_bits(torch.tensor([[-1]]), 4)


def test_unpack_errors():
    with pytest.raises(ValueError, match="2-D uint8"):
        packing.unpack_bits(torch.zeros(2, 2, dtype=torch.int64), 4, 4)
    with pytest.raises(ValueError, match="2-D uint8"):
        packing.unpack_bits(torch.zeros(4, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="5 codes of 4 bits need 3 bytes per row, got 2"):
        packing.unpack_bits(torch.zeros(1, 2, dtype=torch.uint8), 4, 5)

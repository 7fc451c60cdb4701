"""The Palettized encoding: decode is a LUT lookup per row group, indices are packed n-bit
fields, parts round-trip through from_parts and the serializer, and inconsistent parts are
rejected with a message naming what is wrong."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import ENCODINGS, Dense, EncodingError, Graph, Palettized, run_graph, tensor
from nnforge.ir.encodings import encoding_from_parts
from nnforge.ir.packing import packed_cols
from nnforge.ir.serialize import load_graph, save_graph


def parts(rows=12, cols=10, bits=3, group_size=4, lut_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
    lut = torch.randn(rows // group_size, 1 << bits, generator=gen).to(lut_dtype)
    return idx, lut


@pytest.mark.parametrize("bits,group_size", [(1, 12), (2, 1), (3, 4), (4, 6), (5, 3), (8, 2)])
def test_decode_is_the_lut_lookup_of_each_rows_group(bits, group_size):
    idx, lut = parts(bits=bits, group_size=group_size)
    enc = Palettized.from_indices(idx, lut, bits=bits, shape=(12, 10), group_size=group_size)
    assert torch.equal(enc.index_values(), idx)
    assert int(enc.index_values().max()) < 1 << bits
    want = torch.stack([lut[r // group_size][idx[r]] for r in range(12)])
    assert torch.equal(enc.decode(), want)
    assert enc.decode(torch.float64).dtype == torch.float64
    # packed: ceil(cols * bits / 8) bytes per row
    assert enc.indices.shape == (12, packed_cols(10, bits))
    assert enc.nbytes == 12 * packed_cols(10, bits) + lut.numel() * 4


def test_conv_shaped_weight_uses_the_2d_view():
    idx, lut = parts(rows=8, cols=3 * 3 * 3, bits=4, group_size=2, lut_dtype=torch.float16)
    enc = Palettized.from_indices(idx, lut, bits=4, shape=(8, 3, 3, 3), group_size=2)
    d = enc.decode()
    assert d.shape == (8, 3, 3, 3) and d.dtype == torch.float32
    assert torch.equal(d.reshape(8, -1), lut.float()[torch.arange(8).unsqueeze(1) // 2, idx])
    # 4-bit indices + 4 LUTs of 16 fp16 entries
    assert enc.nbytes == 8 * 14 + 4 * 16 * 2
    assert enc.bits_per_weight == pytest.approx(8 * enc.nbytes / (8 * 27))


def test_per_tensor_default_and_describe():
    idx, lut = parts(bits=4, group_size=12, lut_dtype=torch.float16)
    enc = Palettized.from_indices(idx, lut, bits=4, shape=(12, 10))
    assert enc.group_size == 12 and enc.groups == 1
    assert enc.describe() == "palettized 4-bit, f16 LUT per tensor"
    idx, lut = parts(bits=3, group_size=4)
    assert Palettized.from_indices(idx, lut, bits=3, shape=(12, 10), group_size=4).describe() == \
        "palettized 3-bit, f32 LUT per 4 rows"
    idx, lut = parts(bits=2, group_size=1)
    assert Palettized.from_indices(idx, lut, bits=2, shape=(12, 10), group_size=1).describe() == \
        "palettized 2-bit, f32 LUT per row"


def test_parts_round_trip():
    idx, lut = parts(bits=5, group_size=3, lut_dtype=torch.float16)
    enc = Palettized.from_indices(idx, lut, bits=5, shape=(12, 10), group_size=3, out_dtype="float16")
    assert ENCODINGS["palettized"] is Palettized
    back = encoding_from_parts(enc.kind, enc.params(), enc.tensors())
    assert back.params() == enc.params() and back.dtype == enc.dtype
    assert torch.equal(back.decode(), enc.decode()) and back.decode().dtype == torch.float16


def test_serializer_round_trip(tmp_path):
    idx, lut = parts(rows=8, cols=16, bits=3, group_size=4)
    enc = Palettized.from_indices(idx, lut, bits=3, shape=(8, 16), group_size=4)
    g = Graph("pal")
    x = g.add_input("x", tensor("f32", "batch", 16))
    b = g.add_weight("fc.bias", Dense(torch.zeros(8)))
    g.set_outputs([g.op("linear", x, g.add_weight("fc.weight", enc), b, name="fc")])
    save_graph(g, tmp_path / "g.json", tmp_path / "w.safetensors")
    g2 = load_graph(tmp_path / "g.json", tmp_path / "w.safetensors")
    enc2 = g2.weights["fc.weight"].encoding
    assert isinstance(enc2, Palettized) and enc2.params() == enc.params()
    assert torch.equal(enc2.indices, enc.indices) and torch.equal(enc2.lut, enc.lut)
    xin = torch.randn(3, 16)
    assert torch.equal(run_graph(g2, [xin])[0], run_graph(g, [xin])[0])


def test_inconsistent_parts_are_rejected():
    idx, lut = parts(bits=3, group_size=4)
    packed = Palettized.from_indices(idx, lut, bits=3, shape=(12, 10), group_size=4).indices
    with pytest.raises(EncodingError, match="1..8-bit indices, got bits=0"):
        Palettized.from_indices(idx, lut, bits=0, shape=(12, 10), group_size=4)
    with pytest.raises(EncodingError, match="1..8-bit indices, got bits=9"):
        Palettized((12, 10), 9, packed, lut, 4)
    with pytest.raises(EncodingError, match=r"LUT must be \[3 groups, 8 entries\].*got \(3, 4\)"):
        Palettized((12, 10), 3, packed, lut[:, :4], 4)
    with pytest.raises(EncodingError, match=r"LUT must be \[3 groups"):
        Palettized((12, 10), 3, packed, lut[:2], 4)
    with pytest.raises(EncodingError, match="group_size 5 must divide the 12 rows"):
        Palettized((12, 10), 3, packed, lut, 5)
    big = idx.clone()
    big[0, 0] = 9
    with pytest.raises(EncodingError, match=r"indices must lie in \[0, 8\) for 3-bit indices, got \[0, 9\]"):
        Palettized.from_indices(big, lut, bits=3, shape=(12, 10), group_size=4)
    with pytest.raises(EncodingError, match=r"indices must lie in \[0, 8\)"):
        Palettized.from_indices(idx - 1, lut, bits=3, shape=(12, 10), group_size=4)
    with pytest.raises(EncodingError, match="indices hold 120 values; shape"):
        Palettized.from_indices(idx, lut, bits=3, shape=(12, 11), group_size=4)
    with pytest.raises(EncodingError, match=r"indices must be uint8 \(12, 4\)"):
        Palettized((12, 10), 3, packed.to(torch.int32), lut, 4)
    with pytest.raises(EncodingError, match="LUT must be float16 or float32"):
        Palettized((12, 10), 3, packed, lut.to(torch.float64), 4)
    with pytest.raises(EncodingError, match="missing part 'lut'"):
        Palettized.from_parts({"shape": [12, 10], "bits": 3, "group_size": 4}, {"indices": packed})

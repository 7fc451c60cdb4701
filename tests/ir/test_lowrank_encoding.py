"""The LowRank encoding: decode = base + B @ A, nested parts round-tripping through
tensors()/params()/from_parts() and the serializer, real byte counts, and the shape errors."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import Dense, EncodingError, Graph, IntQuant, LowRank, run_graph, tensor
from nnforge.ir.encodings import encoding_from_parts
from nnforge.ir.serialize import load_graph, save_graph


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def perm_base(rows=12, cols=20):
    w = rand(rows, cols, seed=3)
    q = IntQuant.quantize(w, 4, group_size=cols)
    perm = torch.randperm(cols, generator=torch.Generator().manual_seed(1))
    return IntQuant(q.shape, q.bits, q.signed, q.codes, q.scale, q.group_size, perm=perm)


def test_decode_is_the_product_plus_the_base():
    a, b = rand(3, 20, seed=1), rand(12, 3, seed=2)
    base = perm_base()
    plain = LowRank((12, 20), Dense(a), Dense(b))
    torch.testing.assert_close(plain.decode(), b @ a)
    with_base = LowRank((12, 20), Dense(a), Dense(b), base)
    torch.testing.assert_close(with_base.decode(), base.decode() + b @ a)
    assert with_base.decode(torch.float64).dtype == torch.float64
    assert plain.rank == 3 and plain.factor_params == 3 * 32


def test_weights_of_any_rank_use_the_two_d_view():
    enc = LowRank((6, 2, 3, 3), Dense(rand(2, 18)), Dense(rand(6, 2, seed=1)))
    assert enc.decode().shape == (6, 2, 3, 3)
    torch.testing.assert_close(enc.decode().reshape(6, 18), enc.b.decode() @ enc.a.decode())


def test_nested_parts_round_trip_with_prefixed_names():
    a = IntQuant.quantize(rand(4, 20, seed=1), 8)
    b = Dense(rand(12, 4, seed=2))
    enc = LowRank((12, 20), a, b, perm_base())
    t = enc.tensors()
    assert set(t) == {"a.codes", "a.scale", "b.data", "base.codes", "base.scale", "base.perm"}
    back = encoding_from_parts("lowrank", enc.params(), t)
    assert isinstance(back.a, IntQuant) and isinstance(back.b, Dense) and torch.equal(back.base.perm, enc.base.perm)
    torch.testing.assert_close(back.decode(), enc.decode(), rtol=0, atol=0)
    # nbytes counts what is stored: the parts, nothing else
    assert enc.nbytes == a.nbytes + b.nbytes + enc.base.nbytes
    assert enc.describe() == "i4 per-channel sym act-order + rank 4 [i8 per-channel sym x dense f32]"


def test_serializer_round_trip(tmp_path):
    g = Graph("g")
    x = g.add_input("x", tensor("f32", "batch", 20))
    w = g.add_weight("fc.weight", LowRank((12, 20), IntQuant.quantize(rand(4, 20, seed=1), 8),
                                          Dense(rand(12, 4, seed=2)), perm_base()))
    g.set_outputs([g.op("linear", x, w, None, name="fc")])
    save_graph(g, tmp_path / "g.json", tmp_path / "w.safetensors")
    back = load_graph(tmp_path / "g.json", tmp_path / "w.safetensors")
    enc = back.weights["fc.weight"].encoding
    assert isinstance(enc, LowRank) and enc.rank == 4 and enc.base is not None
    xin = rand(5, 20, seed=9)
    torch.testing.assert_close(run_graph(back, [xin])[0], run_graph(g, [xin])[0], rtol=0, atol=0)


def test_low_rank_storage_is_smaller():
    enc = LowRank((64, 64), Dense(rand(4, 64)), Dense(rand(64, 4)))
    assert enc.nbytes == 4 * 128 * 4 < Dense(enc.decode()).nbytes
    assert enc.bits_per_weight == pytest.approx(32 * 4 * 128 / 64 ** 2)


@pytest.mark.parametrize("shape,a,b,base,msg", [
    ((12, 20), (3, 19), (12, 3), None, r"needs a \[rank, 20\] and b \[12, rank\]"),
    ((12, 20), (3, 20), (11, 3), None, r"needs a \[rank, 20\] and b \[12, rank\]"),
    ((12, 20), (3, 20), (12, 2), None, "same rank"),
    ((12, 20), (3, 20), (12, 3), (12, 21), r"base has shape \(12, 21\)"),
    ((12, 20), (3, 20, 1), (12, 3), None, "must be 2-D"),
])
def test_mismatched_shapes_are_errors(shape, a, b, base, msg):
    with pytest.raises(EncodingError, match=msg):
        LowRank(shape, Dense(torch.zeros(a)), Dense(torch.zeros(b)), None if base is None else Dense(torch.zeros(base)))


def test_bad_parts_are_errors():
    with pytest.raises(EncodingError, match="b must be an Encoding"):
        LowRank((4, 4), Dense(torch.zeros(1, 4)), torch.zeros(4, 1))
    with pytest.raises(EncodingError, match="one float dtype"):
        LowRank((4, 4), Dense(torch.zeros(1, 4)), Dense(torch.zeros(4, 1, dtype=torch.float16)))
    enc = LowRank((4, 4), Dense(torch.zeros(1, 4)), Dense(torch.zeros(4, 1)))
    params = {"shape": [4, 4], "a": enc.params()["a"]}
    with pytest.raises(EncodingError, match="needs both factors"):
        LowRank.from_parts(params, {"a.data": torch.zeros(1, 4)})
    with pytest.raises(EncodingError, match=r"\['c.data'\] belong to no part"):
        LowRank.from_parts(enc.params(), {**enc.tensors(), "c.data": torch.zeros(1)})

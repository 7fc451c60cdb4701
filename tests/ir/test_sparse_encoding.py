"""The Sparse encoding: each pattern's stored layout (N:M metadata, BSR, bitmask), exact decode,
nested value encodings through the serializer, stored sizes, and every consistency error."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import (Dense, EncodingError, Graph, IntQuant, MiniFloat, Sparse, load_graph, run_graph, save_graph,
                        tensor)
from nnforge.ir.encodings import encoding_from_parts
from nnforge.ir.packing import pack_bits
from nnforge.ir.sparse import SparsePattern


def weight(rows=32, cols=64, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def nm_mask(w, n, m):
    g = w.abs().reshape(w.shape[0], -1, m)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.topk(n, -1).indices, True)
    return keep.reshape(w.shape)


def block_mask(rows, cols, r, c, seed=1):
    blocks = torch.rand(rows // r, cols // c, generator=torch.Generator().manual_seed(seed)) < 0.5
    return blocks.repeat_interleave(r, 0).repeat_interleave(c, 1)


def random_mask(shape, seed=2):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_keeps_exactly_n_per_group_and_decodes_exactly(n, m):
    w = weight()
    keep = nm_mask(w, n, m)
    enc = Sparse.from_mask(w, keep, f"{n}:{m}")
    d = enc.decode()
    assert torch.equal(d, w * keep) and torch.equal(enc.mask(), keep)
    assert bool(((d.reshape(32, -1, m) != 0).sum(-1) == n).all())
    # metadata: ceil(log2 M)-bit indices of the kept values, increasing within each group
    bits = SparsePattern.parse(f"{n}:{m}").index_bits
    assert bits == (m - 1).bit_length()
    assert enc.index.dtype == torch.uint8 and enc.index.shape == (32, (64 // m * n * bits + 7) // 8)
    idx = enc.group_indices()
    assert idx.shape == (32, 64 // m, n) and (n == 1 or bool((idx.diff(dim=-1) > 0).all()))
    assert enc.values.shape == (32, 64 // m * n) and enc.describe() == f"{n}:{m} sparse (dense f32)"


def test_two_four_metadata_is_two_bits_per_kept_value():
    w = torch.tensor([[0.0, 5.0, 0.0, 7.0, 1.0, 2.0, 0.0, 0.0]])
    enc = Sparse.from_mask(w, w != 0, "2:4")
    assert enc.group_indices().tolist() == [[[1, 3], [0, 1]]]
    # little-endian 2-bit fields 1, 3, 0, 1 -> 0b01_00_11_01
    assert enc.index.tolist() == [[0b01001101]]
    assert enc.values.decode().tolist() == [[5.0, 7.0, 1.0, 2.0]]


@pytest.mark.parametrize("r,c", [(4, 1), (1, 4), (16, 1), (2, 8)])
def test_block_sparsity_is_bsr(r, c):
    w = weight()
    keep = block_mask(32, 64, r, c)
    enc = Sparse.from_mask(w, keep, f"block{r}x{c}")
    assert torch.equal(enc.decode(), w * keep) and torch.equal(enc.mask(), keep)
    blocks = keep[::r, ::c]
    assert enc.row_ptr.dtype == torch.int32 and enc.index.dtype == torch.int16
    assert enc.row_ptr.tolist() == [0] + blocks.sum(1).cumsum(0).tolist()
    for br in range(32 // r):                            # each block-row lists its kept block-columns in order
        cols = enc.index[enc.row_ptr[br]:enc.row_ptr[br + 1]].tolist()
        assert cols == blocks[br].nonzero().flatten().tolist()
    k = int(blocks.sum())
    assert enc.values.shape == (k, r, c)
    br, bc = blocks.nonzero()[0].tolist()
    assert torch.equal(enc.values.decode()[0], w[br * r:(br + 1) * r, bc * c:(bc + 1) * c])
    assert f"block{r}x{c} sparse" in enc.describe()


def test_unstructured_is_a_bitmask_and_row_major_values():
    w = weight()
    keep = random_mask(w.shape)
    enc = Sparse.from_mask(w, keep, "unstructured")
    assert torch.equal(enc.decode(), w * keep)
    assert enc.index.shape == (32, 8) and torch.equal(enc.bitmask(), keep)
    assert torch.equal(enc.values.decode(), w[keep])
    assert enc.describe() == f"unstructured sparse {100 * (1 - float(keep.float().mean())):.0f}% (dense f32)"


def test_conv_weights_use_the_2d_view():
    w = torch.randn(8, 4, 3, 4, generator=torch.Generator().manual_seed(3))
    keep = nm_mask(w.reshape(8, 48), 2, 4).reshape(w.shape)
    enc = Sparse.from_mask(w, keep, "2:4")
    assert enc.shape == (8, 4, 3, 4) and torch.equal(enc.decode(), w * keep)


def test_stored_size_is_the_real_one():
    w = weight(64, 256)
    dense = 64 * 256 * 4
    nm = Sparse.from_mask(w, nm_mask(w, 2, 4), "2:4")
    assert nm.nbytes == dense // 2 + 64 * 128 * 2 // 8                   # half the values + 2 bits each
    assert nm.bits_per_weight == pytest.approx(17.0)
    un = Sparse.from_mask(w, random_mask(w.shape), "unstructured")
    assert un.nbytes == un.values.numel * 4 + 64 * 256 // 8
    blk = Sparse.from_mask(w, block_mask(64, 256, 16, 1), "block16x1")
    k = blk.values.shape[0]
    assert blk.nbytes == k * 16 * 4 + k * 2 + (64 // 16 + 1) * 4            # values + int16 columns + row_ptr
    q = Sparse.from_mask(w, nm_mask(w, 2, 4), "2:4", lambda v: IntQuant.quantize(v, 4, group_size=64,
                                                                                  symmetric=False))
    # int4 kept values + 2-bit metadata + fp32 scale and uint8 zero point per 64 kept values
    assert q.nbytes == 64 * 128 // 2 + 64 * 128 // 4 + 64 * 2 * (4 + 1)
    assert q.bits_per_weight == pytest.approx(2 + 1 + 5 * 8 / 128)


def test_nested_intquant_values_decode_and_describe():
    w = weight(16, 512)
    keep = nm_mask(w, 2, 4)
    enc = Sparse.from_mask(w, keep, "2:4", lambda v: IntQuant.quantize(v, 4, group_size=128, symmetric=False))
    assert enc.describe() == "2:4 sparse (u4 g128 asym)"
    assert set(enc.tensors()) == {"index", "values.codes", "values.scale", "values.zero_point"}
    assert enc.params()["values"]["kind"] == "int" and enc.params()["values"]["params"]["shape"] == [16, 256]
    d = enc.decode()
    assert bool((d[~keep] == 0).all())
    torch.testing.assert_close(d[keep], enc.values.decode().flatten())
    assert float((d - w * keep).abs().max()) < float(w.abs().max()) / 7


def test_from_parts_round_trips_every_pattern():
    w = weight()
    encs = [Sparse.from_mask(w, nm_mask(w, 2, 4), "2:4"),
            Sparse.from_mask(w, block_mask(32, 64, 4, 1), "block4x1"),
            Sparse.from_mask(w, random_mask(w.shape), "unstructured"),
            Sparse.from_mask(w, nm_mask(w, 2, 4), "2:4",
                             lambda v: MiniFloat.from_fields(torch.zeros(32, 32, dtype=torch.int64),
                                                             torch.ones(32, 1), fmt="e4m3", shape=(32, 32)))]
    for enc in encs:
        back = encoding_from_parts(enc.kind, enc.params(), enc.tensors())
        assert isinstance(back, Sparse) and back.describe() == enc.describe()
        assert torch.equal(back.decode(), enc.decode())


def test_serializer_round_trip_with_nested_values(tmp_path):
    w1, w2 = weight(32, 64, 4), weight(16, 32, 5)
    g = Graph("sparse")
    x = g.add_input("x", tensor("f32", "batch", 64))
    e1 = Sparse.from_mask(w1, nm_mask(w1, 2, 4), "2:4", lambda v: IntQuant.quantize(v, 4, group_size=16))
    e2 = Sparse.from_mask(w2, block_mask(16, 32, 16, 1), "block16x1")
    h = g.op("linear", x, g.add_weight("fc1.weight", e1), None, name="fc1")
    g.set_outputs([g.op("linear", h, g.add_weight("fc2.weight", e2), None, name="fc2")])
    save_graph(g, tmp_path / "g.json", tmp_path / "w.safetensors")
    back = load_graph(tmp_path / "g.json", tmp_path / "w.safetensors")
    for name in ("fc1.weight", "fc2.weight"):
        a, b = g.weights[name].encoding, back.weights[name].encoding
        assert isinstance(b, Sparse) and b.describe() == a.describe() and b.nbytes == a.nbytes
        assert torch.equal(a.decode(), b.decode())
    assert isinstance(back.weights["fc1.weight"].encoding.values, IntQuant)
    xin = torch.randn(3, 64)
    assert torch.equal(run_graph(back, [xin])[0], run_graph(g, [xin])[0])
    torch.testing.assert_close(run_graph(g, [xin])[0], xin @ e1.decode().T @ e2.decode().T)


# --- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,msg", [("5:4", "N=5 > M=4"), ("0:4", "1 <= N <= M"), ("1:1", "2 <= M <= 256"),
                                      ("block0x4", "block sides must be positive"),
                                      ("3x3", "unknown sparsity pattern '3x3'"),
                                      (24, "unknown sparsity pattern 24")])
def test_bad_patterns_are_named(spec, msg):
    with pytest.raises(EncodingError, match=msg):
        SparsePattern.parse(spec)


def test_shapes_the_pattern_does_not_fit():
    with pytest.raises(EncodingError, match="M=4 does not divide the 10 columns"):
        Sparse.from_mask(torch.ones(4, 10), torch.ones(4, 10, dtype=torch.bool), "2:4")
    with pytest.raises(EncodingError, match="4x1 blocks do not tile"):
        Sparse.from_mask(torch.ones(6, 8), torch.ones(6, 8, dtype=torch.bool), "block4x1")


def test_masks_that_break_the_pattern():
    w = weight(8, 16)
    with pytest.raises(EncodingError, match="mask shape"):
        Sparse.from_mask(w, torch.ones(8, 8, dtype=torch.bool), "2:4")
    with pytest.raises(EncodingError, match="every group of 4 columns must keep exactly 2"):
        Sparse.from_mask(w, torch.ones(8, 16, dtype=torch.bool), "2:4")
    keep = block_mask(8, 16, 4, 1)
    keep[0, keep[0].nonzero()[0]] = False
    with pytest.raises(EncodingError, match="kept or dropped whole"):
        Sparse.from_mask(w, keep, "block4x1")


def test_metadata_that_does_not_match():
    w = weight(8, 16)
    good = Sparse.from_mask(w, nm_mask(w, 2, 4), "2:4")
    dup = pack_bits(torch.ones(8, 8, dtype=torch.int64), 2)                 # index 1 twice in every group
    with pytest.raises(EncodingError, match="metadata does not match"):
        Sparse(good.shape, "2:4", good.values, dup)
    with pytest.raises(EncodingError, match=r"metadata must be uint8 \(8, 2\)"):
        Sparse(good.shape, "2:4", good.values, good.index.to(torch.int32))
    # 3-bit indices for M=6: 5 is the last column of a group, 6 lies past it
    Sparse((8, 12), "2:6", Dense(torch.ones(8, 4)), pack_bits(torch.tensor([[0, 5]] * 16).reshape(8, 4), 3))
    with pytest.raises(EncodingError, match="below M=6"):
        Sparse((8, 12), "2:6", Dense(torch.ones(8, 4)), pack_bits(torch.tensor([[0, 6]] * 16).reshape(8, 4), 3))


def test_values_that_do_not_match():
    w = weight(8, 16)
    good = Sparse.from_mask(w, nm_mask(w, 2, 4), "2:4")
    with pytest.raises(EncodingError, match=r"kept values must have shape \(8, 8\)"):
        Sparse(good.shape, "2:4", Dense(torch.ones(8, 4)), good.index)
    with pytest.raises(EncodingError, match="non-sparse Encoding, got Tensor"):
        Sparse(good.shape, "2:4", torch.ones(8, 8), good.index)
    with pytest.raises(EncodingError, match="non-sparse Encoding, got Sparse"):
        Sparse(good.shape, "2:4", good, good.index)
    with pytest.raises(EncodingError, match="row_ptr is for block patterns only"):
        Sparse(good.shape, "2:4", good.values, good.index, torch.zeros(3, dtype=torch.int32))


def test_bsr_parts_that_do_not_match():
    w = weight(8, 16)
    good = Sparse.from_mask(w, block_mask(8, 16, 4, 1), "block4x1")
    v, ix, rp = good.values, good.index, good.row_ptr
    with pytest.raises(EncodingError, match="row_ptr is for block patterns only, and block patterns need it"):
        Sparse(good.shape, "block4x1", v, ix)
    with pytest.raises(EncodingError, match=r"row_ptr must be int32 \[3\]"):
        Sparse(good.shape, "block4x1", v, ix, rp[:2])
    with pytest.raises(EncodingError, match="must start at 0, never decrease and end at"):
        Sparse(good.shape, "block4x1", v, ix, rp - 1)
    with pytest.raises(EncodingError, match="1-D integer tensor"):
        Sparse(good.shape, "block4x1", v, ix.float(), rp)
    with pytest.raises(EncodingError, match=r"lie in \[0, 16\) and increase within each block-row"):
        Sparse(good.shape, "block4x1", v, ix.flip(0), rp)
    with pytest.raises(EncodingError, match=r"lie in \[0, 16\)"):
        Sparse(good.shape, "block4x1", v, ix + 16, rp)


def test_bitmask_that_does_not_match():
    w = weight(8, 16)
    good = Sparse.from_mask(w, random_mask(w.shape), "unstructured")
    with pytest.raises(EncodingError, match=r"bitmask must be uint8 \(8, 2\)"):
        Sparse(good.shape, "unstructured", good.values, good.index[:, :1])
    with pytest.raises(EncodingError, match="kept values must have shape"):
        Sparse(good.shape, "unstructured", good.values, torch.full_like(good.index, 255))


def test_nested_errors_are_prefixed():
    w = weight(8, 16)
    enc = Sparse.from_mask(w, nm_mask(w, 2, 4), "2:4")
    params = {**enc.params(), "values": {"kind": "nope", "params": {}}}
    with pytest.raises(EncodingError, match="Sparse values: unknown weight encoding 'nope'"):
        encoding_from_parts("sparse", params, enc.tensors())

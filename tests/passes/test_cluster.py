"""k-means palettisation: the prefix-sum Lloyd iteration against a plain distance-matrix one,
k-means++ and empty-cluster handling, at most 2^bits values per LUT group, determinism under a
seed, Hessian weighting lowering the Hessian-weighted error, conv importance, the pass through
PassManager and nnforge.compile to onnx, and every documented error."""
from __future__ import annotations

import pytest
import torch

import nnforge as nf
from nnforge.ir import Dense, Graph, Palettized, run_graph, tensor
from nnforge.passes import PassContext, PassError, PassManager, resolve_recipe
from nnforge.passes.cluster import Palettize, kmeans_1d, palettize_weight
from nnforge.passes.cluster.kmeans import assign_nearest, input_importance
from nnforge.passes.quantize.gptq import hessian_of
from tests.passes.graphs import mlp_graph


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def correlated_batches(n=4, cols=16, seed=3):
    """Correlated input features whose scales differ by 100x: where sensitivity weighting matters."""
    mix = torch.randn(cols, cols, generator=gen(cols)) / cols ** 0.5 + torch.eye(cols)
    scale = torch.logspace(0, -2, cols)[torch.randperm(cols, generator=gen(cols + 1))]
    g = gen(seed)
    return [((torch.randn(64, cols, generator=g) @ mix.T) * scale,) for _ in range(n)]


def lloyd_reference(x, w, c, iters):
    """Weighted Lloyd with a full distance matrix, one group at a time."""
    out = []
    for xg, wg, cg in zip(x, w, c):
        cg = cg.double().clone()
        for _ in range(iters):
            lab = ((xg.double()[:, None] - cg[None]) ** 2).argmin(1)
            for j in range(len(cg)):
                m = lab == j
                if m.any():
                    cg[j] = (wg[m].double() * xg[m].double()).sum() / wg[m].double().sum()
        out.append(torch.sort(cg).values)
    return torch.stack(out).float()


def test_sorted_prefix_sum_lloyd_matches_distance_matrix_lloyd():
    x = torch.randn(3, 500, generator=gen(1))
    w = torch.rand(3, 500, generator=gen(2)) + 0.1
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    start = lo + (hi - lo) * (torch.arange(8) + 0.5) / 8
    for iters in (1, 5):
        lut, idx, info = kmeans_1d(x, 8, weights=w, init="uniform", iters=iters, tol=0)
        assert info.iters == iters and not info.converged
        torch.testing.assert_close(lut, lloyd_reference(x, w, start, iters), rtol=1e-5, atol=1e-6)
        # every value indexes its nearest centroid
        d = (x[..., None] - lut[:, None, :]).abs()
        assert torch.equal(d.gather(2, idx[..., None])[..., 0], d.amin(2))


def test_converges_and_reports_inertia():
    x = torch.randn(2, 2000, generator=gen(0))
    lut, idx, info = kmeans_1d(x, 4, iters=500, tol=1e-7, generator=gen(0))
    assert info.converged and info.iters < 500
    torch.testing.assert_close(info.inertia, ((x - lut.gather(1, idx)) ** 2).sum(1))
    # Lloyd-Max 4-level quantiser of a unit Gaussian: MSE 0.1175
    assert float(info.inertia.sum()) / x.numel() == pytest.approx(0.1175, rel=0.08)


def test_kmeans_pp_beats_or_matches_uniform_init():
    # Heavy-tailed values (as weights are): a uniform grid over the range wastes clusters on the tails.
    x = torch.randn(8, 1000, generator=gen(4)) / (torch.rand(8, 1000, generator=gen(5)) + 0.05)
    for k, iters in ((8, 3), (16, 3), (16, 40)):
        pp = kmeans_1d(x, k, init="kmeans++", iters=iters, generator=gen(0))[2].inertia.sum()
        uni = kmeans_1d(x, k, init="uniform", iters=iters)[2].inertia.sum()
        assert float(pp) <= float(uni) * 1.0001


def test_empty_clusters_are_reseeded():
    # Two tight far-apart blobs: a uniform grid leaves most centroids in the gap, empty.
    x = torch.cat([torch.randn(1, 990, generator=gen(0)) * 0.01, 100 + torch.randn(1, 10, generator=gen(1)) * 0.01], 1)
    lut, idx, info = kmeans_1d(x, 8, init="uniform", iters=50)
    assert len(torch.unique(idx)) == 8
    assert torch.isfinite(lut).all()
    # one centroid per blob would leave the blobs' own spread, about 0.1
    assert float(info.inertia) < 0.03


def test_fewer_distinct_values_than_clusters_is_exact():
    x = torch.tensor([[0.5, -1.0, 2.0] * 40])
    for init in ("kmeans++", "uniform"):
        lut, idx, info = kmeans_1d(x, 16, init=init, iters=20, generator=gen(0))
        assert torch.equal(lut.gather(1, idx), x) and float(info.inertia) == 0


@pytest.mark.parametrize("bits,group_size", [(1, None), (2, 4), (3, 8), (4, None), (8, 16)])
def test_at_most_2_to_the_bits_values_per_group(bits, group_size):
    w = torch.randn(32, 48, generator=gen(bits)) * 0.05
    enc, figs = palettize_weight(w, bits, group_size=group_size, lut_dtype=torch.float32, generator=gen(0))
    gs = group_size or 32
    d = enc.decode()
    assert isinstance(enc, Palettized) and enc.bits == bits and enc.group_size == gs
    assert int(enc.index_values().max()) < 1 << bits
    for g in range(32 // gs):
        vals = torch.unique(d[g * gs:(g + 1) * gs])
        assert len(vals) <= 1 << bits
        assert set(vals.tolist()) <= set(enc.lut[g].tolist())
    assert figs["rel_error"] == pytest.approx(float((d - w).norm() / w.norm()), rel=1e-4)
    assert figs["rel_error"] < {1: 0.7, 2: 0.4, 3: 0.22, 4: 0.12, 8: 0.01}[bits]


def test_float16_lut_indices_stay_nearest():
    w = torch.randn(16, 64, generator=gen(0))
    enc, _ = palettize_weight(w, 4, group_size=4, lut_dtype=torch.float16, generator=gen(0))
    assert enc.lut.dtype == torch.float16
    x = w.reshape(4, -1)
    assert torch.equal(enc.index_values().reshape(4, -1), assign_nearest(x, enc.lut.float()))


def test_deterministic_under_a_seed():
    g = mlp_graph()

    def run(seed):
        out = Palettize(bits=3)(g.copy(), PassContext(seed=seed))
        return [out.weights[n].encoding for n in ("fc1.weight", "fc2.weight")]

    a, b, c = run(7), run(7), run(8)
    for ea, eb in zip(a, b):
        assert torch.equal(ea.indices, eb.indices) and torch.equal(ea.lut, eb.lut)
    assert any(not torch.equal(ea.lut, ec.lut) for ea, ec in zip(a, c))


def weighted_error(w_hat, w, h_diag):
    return float(((w_hat - w) ** 2 * h_diag).sum())


def test_hessian_weighting_lowers_the_hessian_weighted_error():
    g = mlp_graph()
    calib = correlated_batches(4)
    h = sum(input_importance(b[0], g.node("fc1")) for b in calib)
    w = g.weights["fc1.weight"].encoding.data
    # a LUT per 4 rows, as SqueezeLLM's per-channel tables: few values per LUT, where weighting pays
    pm = PassManager([Palettize(bits=2, group_size=4, layers=["fc1"], weighting="hessian")])
    plain = Palettize(bits=2, group_size=4, layers=["fc1"])(g.copy(), PassContext())
    weighted = pm.run(g, PassContext(calibration=calib))
    e_plain = weighted_error(plain.weights["fc1.weight"].encoding.decode(), w, h)
    e_weighted = weighted_error(weighted.weights["fc1.weight"].encoding.decode(), w, h)
    assert e_weighted < 0.7 * e_plain
    assert isinstance(weighted.weights["fc2.weight"].encoding, Dense)
    figs = pm.records[0].figures["per_layer"]["fc1"]
    assert figs["weighted"] is True
    assert figs["weighted_rel_error"] == pytest.approx((e_weighted / float((w ** 2 * h).sum())) ** 0.5, rel=1e-3)


def test_conv_importance_is_the_im2col_hessian_diagonal():
    g = Graph("conv")
    x = g.add_input("x", tensor("f32", "batch", 3, 9, 9))
    w = g.add_weight("conv.weight", Dense(torch.randn(8, 3, 3, 2, generator=gen(0)) * 0.1))
    # uneven padding (begins then ends: top, left, bottom, right) checks the pad order
    g.set_outputs([g.op("conv", x, w, None, name="conv", stride=[2, 1], padding=[1, 2, 0, 1], dilation=[1, 2])])
    xin = torch.randn(2, 3, 9, 9, generator=gen(1))
    node = g.node("conv")
    H, _ = hessian_of(xin, node)
    torch.testing.assert_close(input_importance(xin, node), torch.diag(H), rtol=1e-5, atol=1e-5)
    out = Palettize(bits=3, group_size=4, weighting="hessian")(g, PassContext(calibration=[(xin,)]))
    assert isinstance(out.weights["conv.weight"].encoding, Palettized)


def test_pass_rewrites_weights_and_records_figures():
    g = mlp_graph()
    pm = PassManager([Palettize(bits=4, group_size=4, lut_dtype="float32")])
    out = pm.run(g, PassContext())
    for name in ("fc1.weight", "fc2.weight"):
        enc = out.weights[name].encoding
        assert isinstance(enc, Palettized) and enc.group_size == 4 and enc.lut.dtype == torch.float32
    assert isinstance(out.weights["fc1.bias"].encoding, Dense)
    figs = pm.records[0].figures
    assert figs["layers"] == 2 and figs["encodings"] == {"palettized 4-bit, f32 LUT per 4 rows": 2}
    encs = [out.weights[n].encoding for n in ("fc1.weight", "fc2.weight")]
    # small layers: the f32 LUTs weigh as much as the indices
    assert figs["bits_per_weight"] == pytest.approx(8 * sum(e.nbytes for e in encs) / sum(e.numel for e in encs),
                                                    abs=1e-4)
    assert set(figs["per_layer"]) == {"fc1", "fc2"}
    x = torch.randn(5, 16, generator=gen(1))
    ref, got = run_graph(g, [x])[0], run_graph(out, [x])[0]
    assert float((got - ref).norm() / ref.norm()) < 0.15


def test_embeddings_on_request_and_unweighted_under_hessian():
    g = Graph("emb")
    ids = g.add_input("ids", tensor("i64", "batch", 5))
    table = g.add_weight("emb.weight", Dense(torch.randn(32, 16, generator=gen(0))))
    w = g.add_weight("fc.weight", Dense(torch.randn(8, 16, generator=gen(1))))
    e = g.op("embedding", ids, table, name="emb")
    g.set_outputs([g.op("linear", e, w, None, name="fc")])
    calib = [(torch.randint(0, 32, (4, 5), generator=gen(2)),)]
    pm = PassManager([Palettize(bits=4, group_size=8, weighting="hessian", ops=["embedding", "linear"])])
    out = pm.run(g, PassContext(calibration=calib))
    assert isinstance(out.weights["emb.weight"].encoding, Palettized)
    figs = pm.records[0].figures
    assert figs["unweighted"] == ["emb"]
    assert figs["per_layer"]["fc"]["weighted"] is True and figs["per_layer"]["emb"]["weighted"] is False


def test_compile_to_onnx_runs(tmp_path):
    calib = correlated_batches(3)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    recipe = [{"pass": "palettize", "bits": 4, "group_size": 8, "weighting": "hessian"}]
    bundle = nf.compile(model, "onnx", recipe, example_inputs=calib[0], calibration=calib, out=tmp_path / "b")
    g = bundle.graph()
    assert all(isinstance(g.weights[n].encoding, Palettized) for n in g.weights if n.endswith("weight"))
    x = correlated_batches(1, seed=5)[0][0]
    got = torch.as_tensor(nf.load(bundle.path)(x.numpy()))
    torch.testing.assert_close(got, run_graph(g, [x])[0], rtol=1e-4, atol=1e-5)


def test_bad_options_name_the_option():
    cases = [({"bits": 0}, "bits must be an integer in 1..8.*got 0"),
             ({"bits": 9}, "bits must be an integer in 1..8.*got 9"),
             ({"bits": 4.0}, "bits must be an integer"),
             ({"group_size": 0}, "group_size must be a positive number of rows per LUT"),
             ({"weighting": "fisher"}, "unknown weighting 'fisher'; choose from none, hessian"),
             ({"lut_dtype": "bfloat16"}, "unknown lut_dtype 'bfloat16'; choose from float16, float32"),
             ({"init": "random"}, "unknown init 'random'; choose from kmeans\\+\\+, uniform"),
             ({"iters": 0}, "iters must be a positive integer"),
             ({"restarts": 0}, "restarts must be a positive integer"),
             ({"tol": -1.0}, "tol must be a number >= 0"),
             ({"ops": ["matmul"]}, "matmul weights are \\[K, N\\]")]
    for options, message in cases:
        with pytest.raises(PassError, match=f"palettize: {message}"):
            Palettize(**options)
    with pytest.raises(PassError, match="recipe entry 0 \\(palettize\\): unknown option\\(s\\) clusters"):
        resolve_recipe([{"pass": "palettize", "clusters": 16}])


def test_kmeans_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"expects values \[groups, n\], got shape \(10,\)"):
        kmeans_1d(torch.randn(10), 4)
    with pytest.raises(ValueError, match="at least one cluster, got k=0"):
        kmeans_1d(torch.randn(2, 10), 0)
    with pytest.raises(ValueError, match="unknown k-means init 'random'"):
        kmeans_1d(torch.randn(2, 10), 4, init="random")


def test_group_size_not_dividing_rows_names_the_layer():
    with pytest.raises(PassError, match=r"layer fc2 \(fc2.weight, \[8, 32\]\) has 8 rows.*group_size 16 does not"):
        Palettize(bits=4, group_size=16)(mlp_graph())


def test_missing_calibration_for_hessian_weighting():
    with pytest.raises(PassError, match='palettize: weighting="hessian" needs calibration data'):
        Palettize(weighting="hessian")(mlp_graph(), PassContext())
    with pytest.raises(PassError, match='palettize: weighting="hessian" needs calibration data'):
        PassManager([Palettize(weighting="hessian")]).run(mlp_graph())
    assert Palettize(weighting="hessian").needs_calibration and not Palettize().needs_calibration
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    with pytest.raises(PassError, match="runs palettize, which needs calibration data"):
        nf.compile(model, "onnx", [{"pass": "palettize", "weighting": "hessian"}],
                   example_inputs=(torch.randn(2, 16),), out="/nonexistent/never-written")

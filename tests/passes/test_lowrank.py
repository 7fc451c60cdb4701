"""Low-rank passes: SVD truncation against torch.linalg.svd, ASVD beating SVD on held-out
correlated inputs, the two-linear rewrite against the reference interpreter, EoRA lowering the
error of int3/int4 layers, budgets, serialisation, compile to onnx, and the documented errors."""
from __future__ import annotations

import pytest
import torch

import nnforge as nf
from nnforge.ir import Dense, Graph, IntQuant, LowRank, run_graph, tensor, verify
from nnforge.ir.serialize import load_graph, save_graph
from nnforge.passes import PassContext, PassError, PassManager, QuantizeGPTQ, resolve_recipe
from nnforge.passes.lowrank import LowRankASVD, LowRankSVD, QuantizeEoRA
from nnforge.passes.lowrank.svd import allocate, factors, spectrum


def weight(rows, cols, seed):
    # decaying spectrum, like trained weights: low rank is a meaningful approximation
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * torch.logspace(0, -1.5, cols)) @ \
        torch.linalg.qr(torch.randn(cols, cols, generator=g))[0] * 0.1


def mlp(cols=48, hidden=64, out=40):
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", cols))
    w1 = g.add_weight("fc1.weight", Dense(weight(hidden, cols, 1)))
    b1 = g.add_weight("fc1.bias", Dense(torch.linspace(-0.1, 0.1, hidden)))
    w2 = g.add_weight("fc2.weight", Dense(weight(out, hidden, 2)))
    h = g.op("relu", g.op("linear", x, w1, b1, name="fc1"))
    g.set_outputs([g.op("linear", h, w2, None, name="fc2")])
    return g


def batches(n=4, cols=48, seed=3):
    """Strongly unequal, correlated features (one fixed distribution; ``seed`` draws samples)."""
    mix = torch.randn(cols, cols, generator=torch.Generator().manual_seed(cols)) * torch.logspace(0, -2, cols)
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, cols, generator=gen) @ mix.T,) for _ in range(n)]


def rel_error(g_new, g_ref, data):
    num = sum(float((run_graph(g_new, b)[0] - run_graph(g_ref, b)[0]).norm() ** 2) for b in data)
    den = sum(float(run_graph(g_ref, b)[0].norm() ** 2) for b in data)
    return (num / den) ** 0.5


def run(p, g, calibration=None):
    ctx = PassContext(calibration=calibration)
    ctx.current = p.name
    out = verify(p(g.copy(), ctx))
    return out, ctx.figures[p.name]


def decoded_reference(g_new: Graph, g: Graph) -> Graph:
    """``g`` with each factored layer's weight replaced by B @ A of the rewritten graph."""
    ref = g.copy()
    for name in ("fc1", "fc2"):
        a = g_new.node(f"{name}.lowrank_a").inputs[1].encoding.decode()
        b = g_new.node(name).inputs[1].encoding.decode()
        ref.set_encoding(f"{name}.weight", Dense(b @ a))
    return ref


# --- the factorisation ----------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 5, 17])
def test_svd_truncation_equals_torch(rank):
    w = weight(30, 24, 0)
    U, s, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    want = (U[:, :rank] * s[:rank]) @ Vh[:rank]
    enc = factors(spectrum(w), rank, w.shape, dtype=torch.float64)
    torch.testing.assert_close(enc.decode(torch.float64), want)
    # the singular values are split evenly: both factors have the same per-component norms
    torch.testing.assert_close(enc.a.data.norm(dim=1), enc.b.data.norm(dim=0))


def test_whitened_truncation_minimises_output_error_with_either_whitening():
    w = weight(30, 24, 0)
    x = batches(1, 24)[0][0]
    cov = x.T @ x / len(x)
    errs = {}
    for how in ("cholesky", "eigen"):
        enc = factors(spectrum(w, cov, damp=0.0, whitening=how), 6, w.shape, dtype=torch.float64)
        errs[how] = float(((w.double() - enc.decode(torch.float64)) @ x.T.double()).norm())
    plain = factors(spectrum(w), 6, w.shape, dtype=torch.float64)
    assert errs["cholesky"] == pytest.approx(errs["eigen"], rel=1e-6)
    assert errs["cholesky"] < 0.8 * float(((w.double() - plain.decode(torch.float64)) @ x.T.double()).norm())


def test_budget_allocation_is_one_ratio_that_fits():
    flat, steep = torch.ones(10), torch.logspace(0, -3, 10)
    shapes = [(10, 40), (20, 40), (30, 30)]
    ranks = allocate([flat, steep, torch.ones(30)], shapes, 0.5)
    params = sum(k * (r + c) for k, (r, c) in zip(ranks, shapes))
    assert params <= 0.5 * sum(r * c for r, c in shapes)
    # the same ratio of min(rows, cols) everywhere, as large as fits (one more step would not)
    ratios = [k / min(r, c) for k, (r, c) in zip(ranks, shapes)]
    assert max(ratios) - min(ratios) < 0.1
    bigger = [k + 1 for k in ranks]
    assert sum(k * (r + c) for k, (r, c) in zip(bigger, shapes)) > 0.5 * sum(r * c for r, c in shapes)
    # never a rank that saves nothing
    assert all(k * (r + c) < r * c for k, (r, c) in zip(ranks, shapes))
    flat, steep = torch.ones(10), torch.logspace(0, -3, 10)
    with pytest.raises(PassError, match=r"param_budget 0.01 keeps 8 of 800 parameters.*\(100\)"):
        allocate([flat, steep], [(10, 40), (10, 40)], 0.01)


# --- the rewrite ------------------------------------------------------------------------------
def test_svd_pass_rewrites_each_layer_as_two_linears():
    g = mlp()
    q, figs = run(LowRankSVD(rank=8), g)
    linears = [n for n in q.nodes if n.op == "linear"]
    assert [n.name for n in linears] == ["fc1.lowrank_a", "fc1", "fc2.lowrank_a", "fc2"]
    assert [tuple(n.inputs[1].shape) for n in linears] == [(8, 48), (64, 8), (8, 64), (40, 8)]
    assert q.node("fc1").inputs[2].name == "fc1.bias" and q.node("fc1.lowrank_a").inputs[2] is None
    assert "fc1.weight" not in q.weights and q.signature() == g.signature()
    xin = batches(1, seed=11)[0]
    torch.testing.assert_close(run_graph(q, xin)[0], run_graph(decoded_reference(q, g), xin)[0])
    assert figs["ranks"] == {"fc1": 8, "fc2": 8}
    assert figs["params"]["fc1"] == {"dense": 64 * 48, "factors": 8 * 112}


def test_rank_rules():
    g = mlp()
    _, figs = run(LowRankSVD(rank_ratio=0.25), g)
    assert figs["ranks"] == {"fc1": 12, "fc2": 10}
    for energy in (0.5, 0.9):
        _, figs = run(LowRankSVD(energy=energy, skip_unprofitable=True), g)
        for layer, r in figs["ranks"].items():
            s = torch.linalg.svd(g.weights[f"{layer}.weight"].encoding.data.double())[1] ** 2
            kept = torch.cumsum(s, 0) / s.sum()
            assert kept[r - 1] >= energy and (r == 1 or kept[r - 2] < energy)
    _, figs = run(LowRankSVD(param_budget=0.4), g)
    assert figs["params_kept"] <= 0.4 and set(figs["ranks"]) == {"fc1", "fc2"}


def test_skip_unprofitable_leaves_the_layer_dense():
    q, figs = run(LowRankSVD(rank_ratio=0.75, skip_unprofitable=True), mlp())
    assert figs["left_dense"] == ["fc1", "fc2"] and figs["layers"] == 0
    assert isinstance(q.weights["fc1.weight"].encoding, Dense)


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_asvd_beats_svd_on_held_out_correlated_inputs(rank):
    g = mlp()
    held_out = batches(3, seed=7)
    svd, _ = run(LowRankSVD(rank=rank), g)
    asvd, figs = run(LowRankASVD(rank=rank), g, batches())
    assert rel_error(asvd, g, held_out) < 0.8 * rel_error(svd, g, held_out)
    assert figs["ranks"] == {"fc1": rank, "fc2": rank}


def test_asvd_with_a_budget_and_int8_factors():
    g = mlp()
    held_out = batches(3, seed=7)
    svd, _ = run(LowRankSVD(param_budget=0.3), g)
    asvd, figs = run(LowRankASVD(param_budget=0.3, factor_format="int8"), g, batches())
    assert figs["params_kept"] <= 0.3
    assert all(isinstance(asvd.weights[n].encoding, IntQuant) for n in ("fc1.lowrank_a.weight", "fc1.lowrank_b.weight"))
    assert rel_error(asvd, g, held_out) < rel_error(svd, g, held_out)


def test_a_weight_with_a_reader_that_is_not_a_linear_stays_encoded(tmp_path):
    g = Graph("tied")
    x = g.add_input("x", tensor("f32", "batch", 16))
    w = g.add_weight("w", Dense(weight(32, 16, 4)))
    y = g.op("linear", x, w, None, name="fc")
    g.set_outputs([g.op("matmul", y, w, name="back")])
    q, figs = run(LowRankSVD(rank=4), g)
    assert figs["kept_encoded"] == ["w"] and isinstance(q.weights["w"].encoding, LowRank)
    ref = g.copy()
    ref.set_encoding("w", Dense(q.weights["w"].encoding.decode()))
    xin = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run_graph(q, [xin])[0], run_graph(ref, [xin])[0])
    save_graph(q, tmp_path / "g.json", tmp_path / "w.safetensors")
    back = load_graph(tmp_path / "g.json", tmp_path / "w.safetensors")
    torch.testing.assert_close(run_graph(back, [xin])[0], run_graph(q, [xin])[0], rtol=0, atol=0)


def test_rewritten_graphs_round_trip_through_the_serializer(tmp_path):
    g = mlp()
    for i, p in enumerate([LowRankSVD(rank=6, factor_format="int8"), QuantizeEoRA(format="int4", rank=4)]):
        q, _ = run(p, g, batches(2))
        save_graph(q, tmp_path / f"{i}.json", tmp_path / f"{i}.safetensors")
        back = load_graph(tmp_path / f"{i}.json", tmp_path / f"{i}.safetensors")
        xin = batches(1, seed=5)[0]
        torch.testing.assert_close(run_graph(back, xin)[0], run_graph(q, xin)[0], rtol=0, atol=0)


# --- EoRA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,gs", [("uint3", 16), ("int4", None)])
def test_eora_lowers_the_error_of_a_quantised_layer(fmt, gs):
    g = mlp()
    held_out = batches(3, seed=7)
    plain, _ = run(QuantizeGPTQ(format=fmt, group_size=gs), g, batches())
    eora, figs = run(QuantizeEoRA(format=fmt, group_size=gs, rank=8), g, batches())
    assert rel_error(eora, g, held_out) < 0.75 * rel_error(plain, g, held_out)
    assert all(v < 1 for v in figs["output_error_kept"].values())
    assert figs["extra_bytes"] == 4 * 8 * (48 + 64 + 64 + 40)
    # the quantised base keeps the weight's name; the compensation runs beside it
    assert isinstance(eora.weights["fc1.weight"].encoding, IntQuant)
    assert [n.op for n in eora.nodes if n.name.startswith("fc1")] == ["linear", "linear", "linear", "add"]
    assert eora.signature() == g.signature() and eora.outputs[0].producer.op == "add"
    rtn, _ = run(QuantizeEoRA(format=fmt, group_size=gs, rank=8, method="rtn", factor_format="int8"), g, batches())
    assert rel_error(rtn, g, held_out) < rel_error(plain, g, held_out)
    assert isinstance(rtn.weights["fc2.eora_b.weight"].encoding, IntQuant)


def test_passes_are_deterministic():
    g = mlp()
    one, _ = run(LowRankASVD(rank=5), g, batches())
    two, _ = run(LowRankASVD(rank=5), g, batches())
    assert all(torch.equal(v.encoding.decode(), two.weights[k].encoding.decode()) for k, v in one.weights.items())


@pytest.mark.parametrize("recipe,linears", [
    ([{"pass": "lowrank_asvd", "rank": 8, "factor_format": "int8"}], 4),
    pytest.param([{"pass": "quantize_eora", "format": "uint4", "group_size": 16, "rank": 4}], 6,
                 marks=pytest.mark.slow),
])
def test_compile_to_onnx_runs(tmp_path, recipe, linears):
    calib = batches(2)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 40)).eval()
    bundle = nf.compile(model, "onnx", recipe, example_inputs=calib[0], calibration=calib, out=tmp_path / "b")
    x = batches(1, seed=5)[0][0]
    got = torch.as_tensor(nf.load(bundle.path)(x.numpy()))
    torch.testing.assert_close(got, run_graph(bundle.graph(), [x])[0], rtol=1e-4, atol=1e-5)
    assert sum(n.op == "linear" for n in bundle.graph().nodes) == linears
    assert bundle.manifest["numerics"]["runtime_checked"] is True


def test_pass_manager_records_figures():
    pm = PassManager([LowRankASVD(rank=4)])
    pm.run(mlp(), PassContext(calibration=batches(2)))
    figs = pm.records[0].figures
    assert figs["layers"] == 2 and figs["params_kept"] == pytest.approx(4 * (112 + 104) / (64 * 48 + 40 * 64))


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,opts,msg", [
    (LowRankSVD, {}, "give exactly one of rank, rank_ratio, energy, param_budget; got none"),
    (LowRankSVD, {"rank": 4, "energy": 0.9}, "got rank and energy"),
    (LowRankASVD, {"rank_ratio": 0.5, "param_budget": 0.5}, "got rank_ratio and param_budget"),
    (LowRankSVD, {"rank": 0}, "rank must be a positive integer"),
    (LowRankSVD, {"rank_ratio": 1.5}, r"rank_ratio must be in \(0, 1\]"),
    (LowRankSVD, {"param_budget": 1.0}, r"param_budget must be in \(0, 1\)"),
    (LowRankSVD, {"rank": 4, "ops": ["conv"]}, "ops must be"),
    (LowRankSVD, {"rank": 4, "factor_format": "int9"}, "factor_format: .*2..8"),
    (LowRankASVD, {"rank": 4, "damp": 2}, r"damp must be in \[0, 1\)"),
    (QuantizeEoRA, {"format": "int4", "method": "awq"}, "method must be"),
    (QuantizeEoRA, {"format": "int4", "rank": -1}, "rank must be a positive integer"),
    (QuantizeEoRA, {"format": "int4", "factor_format": "fp5"}, "factor_format: unknown weight format"),
])
def test_bad_options_are_named(cls, opts, msg):
    with pytest.raises(PassError, match=msg):
        cls.from_options(opts)


def test_rank_larger_than_the_matrix_is_an_error_naming_the_layer():
    with pytest.raises(PassError, match=r"rank 49 exceeds the rank of layer fc1 \(fc1.weight, \[64, 48\]\), "
                                        r"at most 48"):
        LowRankSVD(rank=49)(mlp())
    with pytest.raises(PassError, match=r"rank 41 exceeds the rank of layer fc2"):
        QuantizeEoRA(format="int4", rank=41)(mlp(), PassContext(calibration=batches(1)))


def test_rank_that_saves_nothing_is_refused_naming_the_layer():
    with pytest.raises(PassError, match=r"rank 28 saves nothing in layer fc1 \(fc1.weight, \[64, 48\]\): "
                                        r"3136 factor parameters against 3072 dense; choose a rank below 28"):
        LowRankSVD(rank=28)(mlp())


def test_missing_calibration_is_an_error():
    for p in (LowRankASVD(rank=4), QuantizeEoRA(format="int4", rank=4)):
        with pytest.raises(PassError, match=f"pass {p.name} needs calibration data"):
            p(mlp(), PassContext())
    model = torch.nn.Sequential(torch.nn.Linear(48, 8)).eval()
    with pytest.raises(PassError, match="lowrank_asvd.*calibration"):
        nf.compile(model, "onnx", [{"pass": "lowrank_asvd", "rank": 2}], example_inputs=(torch.randn(2, 48),))


def test_recipes_resolve_the_proposed_presets():
    _, passes = resolve_recipe([{"pass": "lowrank_asvd", "param_budget": 0.5},
                                {"pass": "quantize_eora", "format": "uint4", "group_size": 128, "ragged_groups": True,
                                 "rank": 32}])
    assert [p.name for p in passes] == ["lowrank_asvd", "quantize_eora"]

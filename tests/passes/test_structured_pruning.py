"""Structured pruning: MLP channels, attention heads (separate and fused Q/K/V) and residual
sub-blocks leave a smaller graph that verifies, runs on the interpreter and in an onnx bundle;
the OBS choice and the least-squares update beat their ablations; the documented errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch.export import Dim

import nnforge as nf
from nnforge.ir import Dense, Graph, run_graph, tensor, verify
from nnforge.passes import PASSES, PassContext, PassError, PassManager, cleanup_passes
from nnforge.passes.prune.structured import obs_remove
from nnforge.passes.prune.structures import find_attention_heads, find_mlp_channels, find_residual_branches
from nnforge.frontend import import_model

SEQ = {0: Dim("batch"), 1: Dim("seq")}


class MiniBert(torch.nn.Module):
    """One post-LN BERT layer written out by hand: separate Q/K/V, an additive padding mask."""

    def __init__(self, d=32, heads=4, ff=64):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.fc1, self.fc2 = torch.nn.Linear(d, ff), torch.nn.Linear(ff, d)

    def forward(self, x, mask):
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.h, self.hd).transpose(1, 2)      # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.hd) + (1.0 - mask[:, None, None, :]) * -1e4
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        x = self.ln1(x + self.o(ctx))
        return self.ln2(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def _seeded(module):
    torch.manual_seed(0)
    return module().eval()


def bert_batch(n=3, s=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, s)
    mask[0, s - 2:] = 0
    return torch.randn(n, s, 32, generator=g), mask


def encoder_batch(n=3, s=7, seed=0):
    return (torch.randn(n, s, 32, generator=torch.Generator().manual_seed(seed)),)


def imported(model, example, dynamic):
    graph, _ = import_model(model, example, dynamic_shapes=dynamic)
    return PassManager(cleanup_passes()).run(graph)


def prune(graph, calib, **cfg):
    name = cfg.pop("pass_")
    ctx = PassContext(calibration=calib)
    return PassManager([PASSES[name].from_options(cfg)]).run(graph, ctx), ctx.figures[name] if ctx.figures else {}


def shapes(g):
    return {k: tuple(v.shape) for k, v in g.weights.items()}


def mlp_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()


def mlp_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 16, generator=torch.Generator().manual_seed(99))    # correlated features
    return [(torch.randn(64, 16, generator=g) @ mix,) for _ in range(n)]


def mlp_error(reference, pruned, batches):
    return sum(float(((run_graph(pruned, b)[0] - run_graph(reference, b)[0]) ** 2).sum()) for b in batches)


@pytest.fixture(scope="module")
def mlp_graph():
    """mlp_model as IR, built directly (tracing is covered by the BERT block below)."""
    model = mlp_model()
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", 16))
    fc1, fc2 = model[0], model[2]
    h = g.op("linear", x, g.add_weight("fc1.weight", Dense(fc1.weight.detach().clone())),
             g.add_weight("fc1.bias", Dense(fc1.bias.detach().clone())), name="fc1")
    a = g.op("relu", h, name="act")
    g.set_outputs([g.op("linear", a, g.add_weight("fc2.weight", Dense(fc2.weight.detach().clone())),
                        g.add_weight("fc2.bias", Dense(fc2.bias.detach().clone())), name="fc2")])
    return g


@pytest.fixture(scope="module")
def bert():
    model = _seeded(MiniBert)
    return model, imported(model, bert_batch(), (SEQ, SEQ))


# --- MLP channels ------------------------------------------------------------------------------------
def test_mlp_channels_shrink_verify_and_run(mlp_graph):
    g = mlp_graph
    [grp] = find_mlp_channels(g)
    assert (grp.channels, [n.op for n in grp.region]) == (64, ["relu"])
    q, figs = prune(g, mlp_batches(4), pass_="prune_mlp", fraction=0.25)
    verify(q)
    w = [v for v in q.weights.values() if v.shape[0] == 48 or (len(v.shape) == 2 and v.shape[1] == 48)]
    assert sorted(tuple(v.shape) for v in w) == [(8, 48), (48,), (48, 16)]
    assert len(next(iter(figs["removed"].values()))["removed"]) == 16
    assert figs["weight_bytes"]["after"] < figs["weight_bytes"]["before"]
    x = mlp_batches(1, seed=7)[0]
    assert run_graph(q, x)[0].shape == (64, 8)


def test_fraction_zero_leaves_the_graph_unchanged(bert):
    g = bert[1]
    for name in ("prune_mlp", "prune_heads"):
        q, _ = prune(g, [bert_batch(seed=1)], pass_=name, fraction=0.0)
        assert shapes(q) == shapes(g) and len(q.nodes) == len(g.nodes)
        for k, v in q.weights.items():
            assert torch.equal(v.encoding.data, g.weights[k].encoding.data)


def test_least_squares_update_beats_plain_removal_on_held_out_inputs(mlp_graph):
    g = mlp_graph
    calib, held_out = mlp_batches(8), mlp_batches(4, seed=3)
    updated, _ = prune(g, calib, pass_="prune_mlp", fraction=0.5)
    plain, _ = prune(g, calib, pass_="prune_mlp", fraction=0.5, update=False)
    assert mlp_error(g, updated, held_out) < 0.7 * mlp_error(g, plain, held_out)


def test_obs_choice_beats_magnitude_choice(mlp_graph):
    # relu(s*x)/s = relu(x): rescaling fc1's rows and fc2's columns by random s keeps the model but
    # scrambles weight magnitudes; OBS sees the activations' scale, magnitude does not.
    g = mlp_graph.copy()
    s = torch.exp(2 * torch.randn(64, generator=torch.Generator().manual_seed(4)))
    [grp] = find_mlp_channels(g)
    fc1_w, fc1_b, fc2_w = grp.sources[0].inputs[1], grp.sources[0].inputs[2], grp.sink.inputs[1]
    for w, data in ((fc1_w, fc1_w.encoding.data * s[:, None]), (fc1_b, fc1_b.encoding.data * s),
                    (fc2_w, fc2_w.encoding.data / s[None, :])):
        g.set_encoding(w.name, Dense(data))
    calib, held_out = mlp_batches(8), mlp_batches(4, seed=3)
    for update in (True, False):
        obs, _ = prune(g, calib, pass_="prune_mlp", fraction=0.5, update=update)
        mag, _ = prune(g, calib, pass_="prune_mlp", fraction=0.5, update=update, criterion="magnitude")
        assert mlp_error(g, obs, held_out) < 0.8 * mlp_error(g, mag, held_out)


def test_obs_remove_matches_the_least_squares_solution():
    # Removing one group with the OBS update equals refitting the kept columns by least squares.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=torch.float64)
    W = torch.randn(3, 6, generator=g, dtype=torch.float64)
    groups = torch.tensor([[0, 1], [2, 3], [4, 5]])
    Wn, order, losses = obs_remove(W, X.T @ X, groups, 1, damp=0.0)
    keep = [c for c in range(6) if c not in groups[order[0]].tolist()]
    ls = torch.linalg.lstsq(X[:, keep], X @ W.T).solution.T
    torch.testing.assert_close(Wn[:, keep], ls)
    assert losses[0] == pytest.approx(float(((X[:, keep] @ ls.T - X @ W.T) ** 2).sum()), rel=1e-6)


# --- attention heads -----------------------------------------------------------------------------------
def test_heads_of_a_hand_written_bert_block(bert):
    model, g = bert
    [att] = find_attention_heads(g)
    assert (att.heads, att.head_dim, len(att.sources)) == (4, 8, 3)
    q, figs = prune(g, [bert_batch(seed=i) for i in range(1, 4)], pass_="prune_heads", fraction=0.25)
    verify(q)
    assert figs["removed"]["o"]["kind"] == "heads" and len(figs["removed"]["o"]["removed"]) == 1
    assert shapes(q)["q.weight"] == (24, 32) and shapes(q)["v.bias"] == (24,) and shapes(q)["o.weight"] == (32, 24)
    assert any(n.op == "reshape" and 3 in n.attrs["shape"] for n in q.nodes)
    x = bert_batch(n=2, s=5, seed=9)
    got = run_graph(q, x)[0]
    with torch.no_grad():
        want = model(*x)
    assert got.shape == want.shape
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0) > 0.95


def test_speedup_and_global_budgets(bert):
    calib = [bert_batch(seed=i) for i in range(1, 3)]
    q, figs = prune(bert[1], calib, pass_="prune_structured", speedup=1.25)
    verify(q)
    assert figs["modeled_speedup"] >= 1.25 and figs["cost_unit"] == "bytes+flops"
    assert figs["weight_bytes"]["after"] < figs["weight_bytes"]["before"]
    q, figs = prune(bert[1], calib, pass_="prune_structured", fraction=0.25, scope="global")
    verify(q)
    assert sum(figs["allocation"].values()) == round(0.25 * (64 + 4))


@pytest.mark.slow
def test_heads_of_a_fused_qkv_transformer_encoder_layer_and_speedup_mode():
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    g = imported(model, encoder_batch(), (SEQ,))
    calib = [encoder_batch(seed=i) for i in range(1, 4)]
    q, _ = prune(g, calib, pass_="prune_heads", fraction=0.5)
    verify(q)
    assert shapes(q)["self_attn.in_proj_weight"] == (48, 32) and shapes(q)["self_attn.out_proj.weight"] == (32, 16)
    assert run_graph(q, encoder_batch(n=2, s=9, seed=5))[0].shape == (2, 9, 32)
    q, figs = prune(g, calib, pass_="prune_structured", speedup=1.3)
    verify(q)
    assert figs["modeled_speedup"] >= 1.3 and sum(figs["allocation"].values()) > 0


@pytest.mark.slow
def test_pruned_block_runs_in_an_onnx_bundle(tmp_path):
    model = _seeded(MiniBert)
    calib = [bert_batch(seed=i) for i in range(1, 4)]
    recipe = [{"pass": "prune_heads", "fraction": 0.25}, {"pass": "prune_mlp", "fraction": 0.25}]
    bundle = nf.compile(model, "onnx", recipe, example_inputs=bert_batch(), calibration=calib,
                        dynamic_shapes=(SEQ, SEQ), out=tmp_path / "b")
    assert bundle.manifest["numerics"]["runtime_checked"] is True
    x = bert_batch(n=2, s=6, seed=11)
    got = torch.as_tensor(nf.load(bundle.path)(*[t.numpy() for t in x]))
    torch.testing.assert_close(got, run_graph(bundle.graph(), x)[0], rtol=1e-4, atol=1e-4)
    assert tuple(bundle.graph().weights["fc1.weight"].shape) == (48, 32)


# --- residual sub-blocks --------------------------------------------------------------------------------
def test_prune_blocks_drops_a_sub_block(bert):
    g = bert[1]
    assert sorted(b.kind for b in find_residual_branches(g)) == ["attention", "mlp"]
    q, figs = prune(g, [bert_batch(seed=1)], pass_="prune_blocks", count=1, kinds="mlp")
    verify(q)
    assert "fc1.weight" not in q.weights and "q.weight" in q.weights
    assert len(q.nodes) < len(g.nodes)
    assert next(iter(figs["removed"].values()))["kind"] == "mlp"
    assert run_graph(q, bert_batch(seed=2))[0].shape == (3, 7, 32)


# --- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,match", [
    ({"fraction": 1.0}, "fraction must be in \\[0, 1\\)"),
    ({"fraction": -0.1}, "fraction must be in \\[0, 1\\)"),
    ({}, "exactly one of fraction or speedup"),
    ({"fraction": 0.2, "speedup": 1.5}, "exactly one of fraction or speedup"),
    ({"speedup": 0.9}, "speedup must be a number above 1"),
    ({"fraction": 0.2, "criterion": "random"}, "criterion must be one of obs, magnitude"),
    ({"fraction": 0.2, "scope": "model"}, "scope must be one of layer, global"),
    ({"fraction": 0.2, "block": -1}, "block must be a non-negative integer"),
])
def test_bad_options(cfg, match):
    with pytest.raises(PassError, match=match):
        PASSES["prune_mlp"].from_options(cfg)


def test_pruning_every_head_or_channel_is_refused(bert):
    g = bert[1]
    with pytest.raises(PassError, match="would remove all 4 heads of layer o"):
        prune(g, [bert_batch(seed=1)], pass_="prune_heads", fraction=0.9)
    with pytest.raises(PassError, match="goal is out of reach"):
        prune(g, [bert_batch(seed=1)], pass_="prune_mlp", speedup=50.0)
    with pytest.raises(PassError, match="count 3 exceeds the 2 removable"):
        prune(g, [bert_batch(seed=1)], pass_="prune_blocks", count=3)


def test_calibration_is_required(bert):
    g = bert[1]
    with pytest.raises(PassError, match="prune_heads needs calibration data"):
        PassManager([PASSES["prune_heads"](fraction=0.25)]).run(g, PassContext())


def test_unsafe_attention_is_refused_naming_the_node(bert):
    g = bert[1].copy()
    [softmax] = [n for n in g.nodes if n.op == "softmax"]
    softmax.attrs = dict(softmax.attrs, axis=1)   # across heads: they are no longer independent
    with pytest.raises(PassError, match=r"node \S+ \(softmax\): softmax runs across heads"):
        prune(g, [bert_batch(seed=1)], pass_="prune_heads", fraction=0.25)


def test_no_structure_is_a_clear_error():
    g = Graph("single")
    x = g.add_input("x", tensor("f32", "batch", 16))
    g.set_outputs([g.op("linear", x, g.add_weight("fc.weight", Dense(torch.randn(8, 16))), None, name="fc")])
    with pytest.raises(PassError, match="prune_mlp: graph .* has no mlp structure"):
        prune(g, mlp_batches(1), pass_="prune_mlp", fraction=0.25)


def test_quantised_weights_are_refused(mlp_graph):
    g = mlp_graph
    ctx = PassContext(calibration=mlp_batches(1))
    with pytest.raises(PassError, match="run structured pruning before quantisation"):
        PassManager([PASSES["quantize_rtn"](format="int8"), PASSES["prune_mlp"](fraction=0.25)]).run(g, ctx)

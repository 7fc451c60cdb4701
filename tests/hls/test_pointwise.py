"""The element-wise ops language models bring (neg, integer pow, rsqrt, sigmoid, tanh, reduce_mean,
concat) and the fused RMSNorm / tanh-GELU / SiLU, each against its bit-accurate emulation: the
C-simulation equals nnforge.backends.hls.emulate bit for bit, and the fp32 reference interpreter
within the fixed-point tolerance.

One graph holds every op as a separate output, so g++ runs once for the module."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnforge.backends.base import BackendError
from nnforge.backends.hls import make_sim, render
from nnforge.backends.hls.patterns import fuse_patterns
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.ir import Dense, Graph, tensor
from nnforge.ir.interpreter import Interpreter

R, K = 4, 32


def _c(g, name, value):
    return g.add_weight(name, Dense(torch.tensor(float(value))))


def rms_chain(g, x, w=None, square="pow"):
    """x * rsqrt(mean(x^2, -1) + eps) [* w], as torch traces Llama's RMSNorm."""
    sq = g.op("pow", x, _c(g, f"two_{square}", 2.0)) if square == "pow" else g.op("mul", x, x)
    h = g.op("mul", x, g.op("rsqrt", g.op("add", g.op("reduce_mean", sq, axes=[-1], keepdim=True),
                                           _c(g, f"eps_{square}", 1e-6))))
    return h if w is None else g.op("mul", w, h)


def gelu_chain(g, x):
    """GPT-2's NewGELU as traced: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    inner = g.op("add", x, g.op("mul", g.op("pow", x, _c(g, "three", 3.0)), _c(g, "k", 0.044715)))
    t = g.op("tanh", g.op("mul", inner, _c(g, "c", math.sqrt(2.0 / math.pi))))
    return g.op("mul", g.op("mul", x, _c(g, "k_half", 0.5)), g.op("add", t, _c(g, "one", 1.0)))


def pointwise_graph() -> Graph:
    torch.manual_seed(0)
    g = Graph("pointwise")
    x = g.add_input("x", tensor("f32", R, K))
    y = g.add_input("y", tensor("f32", R, K))
    w = g.add_weight("norm.w", Dense(torch.rand(K) + 0.5))
    h = g.op("slice", x, axis=1, start=K // 2, end=K, name="half")
    outs = [
        g.op("neg", x, name="neg"),
        g.op("pow", x, _c(g, "p2", 2.0), name="pow2"), g.op("pow", x, _c(g, "p3", 3.0), name="pow3"),
        g.op("pow", x, _c(g, "p0", 0.0), name="pow0"), g.op("pow", x, _c(g, "p1", 1.0), name="pow1"),
        g.op("rsqrt", g.op("add", g.op("mul", x, x), _c(g, "quarter", 0.25)), name="rsqrt"),
        g.op("rsqrt", x, name="rsqrt_nonpositive_is_max"),
        g.op("sigmoid", x, name="sigmoid"), g.op("tanh", x, name="tanh"),
        g.op("reduce_mean", x, axes=[-1], keepdim=True, name="mean_last"),
        g.op("reduce_mean", x, axes=[0], keepdim=False, name="mean_first"),
        g.op("concat", g.op("neg", h), g.op("slice", x, axis=1, start=0, end=K // 2), axis=1, name="rotate_half"),
        g.op("concat", x, y, h, axis=1, name="concat3"),
        g.op("concat", x, y, axis=0, name="concat_rows"),
        rms_chain(g, x, w), rms_chain(g, y, square="mul"), gelu_chain(g, x),
        g.op("mul", g.op("mul", x, g.op("sigmoid", x)), y, name="swiglu"),
        g.op("rms_norm", x, w, eps=1e-5, offset=1.0, name="rms_norm_offset"),
    ]
    g.set_outputs(outs)
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NNFORGE_HLS_CACHE", str(tmp_path_factory.mktemp("hls-cache")))
    g = pointwise_graph()
    plan = build_plan(g, HlsOptions())
    yield g, plan, make_sim(plan, render.sources(plan))
    mp.undo()


def _inputs(kind: str):
    rng = np.random.default_rng({"normal": 1, "large": 2, "tiny": 3, "wide": 4}[kind])
    scale = {"normal": 1.0, "large": 300.0, "tiny": 1e-3, "wide": 12.0}[kind]
    return [(rng.standard_normal((R, K)) * scale).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("kind", ["normal", "large", "tiny", "wide"])
def test_csim_equals_emulation_bit_for_bit(built, kind):
    g, plan, sim = built
    xs = _inputs(kind)
    bad = [v for v, a, b in zip(plan.outputs, sim.run(xs), plan.emulate(xs))
           if not np.array_equal(a.reshape(-1), b.reshape(-1))]
    assert not bad, bad


def test_close_to_the_fp32_reference(built):
    g, plan, sim = built
    xs = _inputs("normal")
    xs[1] = np.abs(xs[1]) + 0.5           # rms of y away from eps
    ref = Interpreter(g).run(*[torch.from_numpy(x) for x in xs])
    for v, a, r in zip(plan.outputs, sim.run(xs), ref):
        r = r.numpy().reshape(-1)
        if v == "rsqrt_nonpositive_is_max":       # near 0 the input's own rounding dominates: 1/sqrt of it
            q = np.floor(xs[0].reshape(-1).astype(np.float64) * 2.0 ** 16 + 0.5) * 2.0 ** -16
            ok = q > 0
            assert np.all(a.reshape(-1)[~ok] == 128.0 - 2.0 ** -16), v    # torch: inf / nan
            a, r = a.reshape(-1)[ok], np.minimum(1.0 / np.sqrt(q[ok]), 128.0 - 2.0 ** -16)
        err = np.abs(a.reshape(-1) - r).max()
        assert err < 3e-4 * max(1.0, np.abs(r).max()), (v, err)


def test_traced_chains_become_one_template_each(built):
    """RMSNorm (with pow or mul for the square), tanh-GELU and SiLU become the norm unit and the
    tables; the leftover sigmoid of swiglu's gate is gone, its product with y stays a multiply."""
    g, plan, sim = built
    kinds = {}
    for layer in plan.layers:
        kinds.setdefault(type(layer).__name__, []).append(layer)
    norms = [l for l in kinds["Norm"] if l.rms]
    assert len(norms) == 3 and sum(l.gamma is not None for l in norms) == 2
    assert sorted(l.fn for l in kinds["Lut"]) == ["gelu_tanh", "sigmoid", "silu", "tanh"]
    assert [l.exponent for l in kinds["PowInt"]] == [2, 3]      # pow2 and pow3 alone; the chains' powers fused
    assert len(kinds["Rsqrt"]) == 2


def test_fusion_leaves_the_graph_equal_to_the_reference():
    g = pointwise_graph()
    fused = fuse_patterns(g)
    ops = [n.op for n in fused.nodes]
    assert ops.count("rms_norm") == 3 and ops.count("silu") == 1 and ops.count("gelu") == 1
    assert [n.op for n in g.nodes].count("rms_norm") == 1             # the original is left as it was
    xs = [torch.from_numpy(x) for x in _inputs("normal")]
    for a, b in zip(Interpreter(g).run(*xs), Interpreter(fused).run(*xs)):
        assert torch.allclose(a, b, atol=1e-5, equal_nan=True), (a - b).abs().max()


def test_concat_of_three_goes_through_a_temporary(built):
    g, plan, sim = built
    parts = [l for l in plan.layers if l.node == "concat3"]
    assert [(l.n_a, l.n_b) for l in parts] == [(K, K), (2 * K, K // 2)]
    assert parts[0].output == parts[1].inputs[0] != "concat3"


@pytest.mark.parametrize("exponent", [0.5, 2.5, -1.0])
def test_pow_with_a_non_integer_or_negative_exponent_is_refused_naming_the_node(exponent):
    g = Graph("bad_pow")
    x = g.add_input("x", tensor("f32", R, K))
    g.set_outputs([g.op("pow", x, _c(g, "e", exponent), name="odd_power")])
    with pytest.raises(BackendError, match=rf"node odd_power \(pow\): exponent {exponent:g} is not an integer"):
        build_plan(g, HlsOptions())


def test_an_op_without_a_template_is_refused_naming_node_and_op():
    g = Graph("no_template")
    x = g.add_input("x", tensor("f32", R, K))
    g.set_outputs([g.op("erf", x, name="the_erf")])
    with pytest.raises(BackendError, match=r"no lowering for op\(s\) erf \(nodes the_erf\)"):
        build_plan(g, HlsOptions())


def test_every_new_layer_has_a_resource_rule(built):
    from nnforge.backends.hls import resources
    g, plan, sim = built
    est = resources.estimate(plan)
    assert est["unrated"] == []
    rows = {r["node"]: r for r in est["layers"]}
    assert rows["pow3"]["dsp"] >= 1 and rows["neg"]["dsp"] == 0 and "isqrt64" in rows["rsqrt"]["why"]

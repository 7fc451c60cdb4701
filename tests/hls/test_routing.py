"""The routing ops of mixture-of-experts layers in the hls backend (top-k and argsort, running sums,
floor, integer floor division, minimum / maximum, float -> int casts, gathers and index_put by
computed indices), each against its bit-accurate emulation: the C-simulation equals
nnforge.backends.hls.emulate bit for bit; integer outputs equal the fp32 reference interpreter's
exactly, activations are within the fixed-point tolerance.

One graph holds every op as a separate output, so g++ runs once for the module."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnforge.backends.base import BackendError
from nnforge.backends.hls import make_sim, render, resources
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.ir import Dense, Graph, tensor
from nnforge.ir.interpreter import Interpreter

R, E, N = 4, 8, 16          # score rows, experts, ids
LSB = 2.0 ** -16            # ap_fixed<24, 8>


def _w(g, name, t):
    return g.add_weight(name, Dense(torch.as_tensor(t)))


def routing_graph() -> Graph:
    g = Graph("routing_ops")
    x = g.add_input("x", tensor("f32", R, E))
    y = g.add_input("y", tensor("f32", R, E))
    ids = g.add_input("ids", tensor("i64", N))
    top = g.op("topk_indices", x, k=3, axis=1, largest=True, name="topk_rows")
    rows = g.op("minimum", ids, _w(g, "last_row", torch.tensor(R - 1)), name="minimum_int")
    order = g.op("topk_indices", ids, k=N, axis=0, largest=False, name="argsort_ties")
    by_order = g.op("index", g.op("reshape", x, shape=[R * E]), order, name="take_1d")
    quotient = g.op("cast", g.op("floor", g.op("div", ids, _w(g, "three", torch.tensor(3))), name="floor_div"),
                    dtype="i64", name="floor_div_int")
    outs = [
        top, g.op("topk_indices", x, k=2, axis=0, largest=False, name="topk_columns"), order,
        g.op("gather_elements", x, top, axis=1, name="gather_act"),
        g.op("gather_elements", ids, order, axis=0, name="gather_int"),
        g.op("cumsum", ids, axis=0, name="cumsum_int"), g.op("cumsum", x, axis=1, name="cumsum_act"),
        g.op("floor", g.op("mul", x, _w(g, "k", torch.tensor(2.5))), name="floor_act"),
        g.op("maximum", x, y, name="maximum_act"), rows, quotient, by_order,
        g.op("cast", g.op("mul", x, _w(g, "k10", torch.tensor(10.0))), dtype="i64", name="trunc_toward_zero"),
        g.op("index", x, rows, name="take_rows"),
        g.op("index_put", _w(g, "zeros", torch.zeros(N, dtype=torch.int64)),
             _w(g, "arange", torch.arange(N)), order, accumulate=False, name="inverse_permutation"),
        g.op("index_put", y, _w(g, "bump", torch.linspace(-1, 1, E)), rows, accumulate=True, name="index_add_rows"),
        g.op("index_put", g.op("reshape", y, shape=[R * E]), g.op("neg", by_order), order, accumulate=False,
             name="index_put_values"),
    ]
    g.set_outputs(outs)
    return g


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((R, E)) * 3).astype(np.float32)
    y = rng.standard_normal((R, E)).astype(np.float32)
    ids = rng.integers(0, 8, N).astype(np.float32)          # many repeats: argsort ties
    return [x, y, ids]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NNFORGE_HLS_CACHE", str(tmp_path_factory.mktemp("hls-cache")))
    g = routing_graph()
    plan = build_plan(g, HlsOptions())
    yield g, plan, make_sim(plan, render.sources(plan))
    mp.undo()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_csim_equals_emulation_bit_for_bit(built, seed):
    g, plan, sim = built
    xs = _inputs(seed)
    bad = [v for v, a, b in zip(plan.outputs, sim.run(xs), plan.emulate(xs))
           if not np.array_equal(a.reshape(-1), b.reshape(-1))]
    assert not bad, bad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_indices_equal_the_reference_and_values_are_close(built, seed):
    g, plan, sim = built
    xs = _inputs(seed)
    # on the activation grid, so floor and truncation see what the reference sees
    xs[0] = np.round(xs[0] / LSB) * LSB
    feeds = [torch.from_numpy(xs[0]), torch.from_numpy(xs[1]), torch.from_numpy(xs[2]).long()]
    ref = Interpreter(g).run(*feeds)
    for v, got, want in zip(plan.outputs, sim.run(xs), ref):
        want = want.numpy().astype(np.float64).reshape(-1)
        got = np.asarray(got, np.float64).reshape(-1)
        if plan.kinds[v] == "int" or v in ("floor_div", "floor_act"):
            assert np.array_equal(got, want), (v, got, want)
        else:
            assert np.abs(got - want).max() <= 4 * LSB * max(1.0, np.abs(want).max()), v


def test_argsort_keeps_index_order_among_equal_values(built):
    g, plan, sim = built
    xs = _inputs(0)
    order = sim.run(xs)[plan.outputs.index("argsort_ties")].reshape(-1).astype(int)
    assert order.tolist() == np.argsort(xs[2], kind="stable").tolist()


def test_scores_that_round_to_one_value_tie_to_the_lower_index():
    """Fixed-point rounding can make the chosen experts differ from float torch: two scores closer
    than half an LSB are one raw value, and the lower index wins, where torch takes the larger."""
    g = Graph("near_tie")
    x = g.add_input("x", tensor("f32", 1, 4))
    g.set_outputs([g.op("topk_indices", x, k=1, axis=1, largest=True, name="pick")])
    plan = build_plan(g, HlsOptions())
    scores = np.array([[0.1, 0.5, 0.5 + LSB / 8, 0.2]], np.float32)
    assert int(plan.emulate([scores])[0].reshape(-1)[0]) == 1
    assert int(Interpreter(g).run(torch.from_numpy(scores))[0].reshape(-1)[0]) == 2


def test_division_by_a_whole_constant_is_exact_where_a_reciprocal_is_not():
    """floor(x / 3) at x = 3 * q: a product with a rounded 1/3 lands just below q."""
    g = Graph("exact_div")
    x = g.add_input("x", tensor("f32", 1, 8))
    g.set_outputs([g.op("floor", g.op("div", x, _w(g, "three", torch.tensor(3.0))), name="q")])
    plan = build_plan(g, HlsOptions())
    xs = np.arange(0, 24, 3, dtype=np.float32).reshape(1, 8)
    assert plan.emulate([xs])[0].reshape(-1).tolist() == list(range(8))
    assert [l.op for l in plan.layers if type(l).__name__ == "Binary"] == ["div"]


def test_an_index_too_large_for_the_activation_format_is_refused_naming_the_node():
    g = Graph("wide_index")
    x = g.add_input("x", tensor("f32", 300))
    order = g.op("topk_indices", x, k=300, axis=0, largest=True, name="order")
    g.set_outputs([g.op("cast", order, dtype="f32", name="as_float")])
    with pytest.raises(BackendError, match=r"node as_float \(cast\): integer order reaches 299, beyond the 127 .*"
                                           r"raise the target option act_int to at least 10"):
        build_plan(g, HlsOptions())
    build_plan(g, HlsOptions(act_width=28, act_int=12))


def test_index_by_two_computed_tensors_is_refused_naming_the_node():
    g = Graph("two_indices")
    x = g.add_input("x", tensor("f32", 4, 4))
    i = g.add_input("i", tensor("i64", 3))
    g.set_outputs([g.op("index", x, i, i, name="pick2")])
    with pytest.raises(BackendError, match=r"node pick2 \(index\): .*one computed index tensor"):
        build_plan(g, HlsOptions())


def test_every_routing_layer_has_a_resource_rule(built):
    g, plan, sim = built
    est = resources.estimate(plan)
    assert est["unrated"] == []
    rows = {r["node"]: r for r in est["layers"]}
    assert "top-k" in rows["topk_rows"]["why"] and rows["topk_rows"]["dsp"] == 0

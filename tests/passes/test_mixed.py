"""Mixed precision: the knapsack is exact (against brute force), the pass meets its budget,
gives sensitive layers more bits, records its assignment, and refuses bad budgets."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nnforge.ir import Dense, Graph, tensor
from nnforge.passes import PassContext, PassError, resolve_recipe
from nnforge.passes.quantize import MixedPrecision, knapsack
from nnforge.targets import get_target


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    errors = rng.random((6, 3)) * rng.random((6, 1)) * 10
    costs = np.array([8.25, 4.31, 3.31]) * rng.integers(1, 5, (6, 1)) * 1000
    budget = float(costs[:, 1].sum())
    picks = knapsack(errors, costs, budget)
    best = min((c for c in itertools.product(range(3), repeat=6)
                if sum(costs[i, j] for i, j in enumerate(c)) <= budget),
               key=lambda c: sum(errors[i, j] for i, j in enumerate(c)))
    got = sum(errors[i, j] for i, j in enumerate(picks))
    assert got == pytest.approx(sum(errors[i, j] for i, j in enumerate(best)))
    assert sum(costs[i, j] for i, j in enumerate(picks)) <= budget * (1 + 1e-4)


def test_knapsack_refuses_an_impossible_budget():
    with pytest.raises(PassError, match="cannot be met"):
        knapsack(np.zeros((2, 2)), np.array([[8.0, 4.0], [8.0, 4.0]]), 7.0)


def three_layers():
    gen = torch.Generator().manual_seed(0)
    g = Graph("m")
    x = g.add_input("x", tensor("f32", "batch", 128))
    h = x
    for i in range(3):
        w = torch.randn(128, 128, generator=gen) * 0.05
        if i == 1:
            w[:, :4] *= 40           # a layer with outlier columns: the one that needs bits
        h = g.op("relu", g.op("linear", h, g.add_weight(f"fc{i}.weight", Dense(w)), None, name=f"fc{i}"))
    g.set_outputs([h])
    return g


def calib(n=3):
    gen = torch.Generator().manual_seed(4)
    return [(torch.randn(32, 128, generator=gen),) for _ in range(n)]


@pytest.mark.parametrize("sensitivity", ["hessian", "output"])
def test_budget_is_met_and_recorded(sensitivity):
    ctx = PassContext(calibration=calib())
    g = MixedPrecision(bits=5.0, sensitivity=sensitivity, method="rtn").run(three_layers(), ctx)
    figs = ctx.figures["mixed_precision"] if "mixed_precision" in ctx.figures else ctx.figures[""]
    assert figs["bits_per_weight"] <= 5.0 + 1e-3
    assign = figs["assignment"]
    assert set(assign) == {"fc0", "fc1", "fc2"}
    stored = sum(v.encoding.nbytes for v in g.weights.values()) * 8 / (3 * 128 * 128)
    assert stored == pytest.approx(figs["bits_per_weight"], abs=0.05)
    assert assign["fc1"]["bits"] >= max(assign["fc0"]["bits"], assign["fc2"]["bits"])


def test_latency_budget_uses_the_targets_bandwidth():
    tgt = get_target("xeon-spr")
    total_bits = 3 * 128 * 128 * 4.5
    ms = total_bits / 8 / (tgt.memory["bandwidth_gbps"] * 1e9) * 1000
    ctx = PassContext(calibration=calib(), target=tgt)
    MixedPrecision(latency_ms=ms, method="rtn").run(three_layers(), ctx)
    assert ctx.figures[""]["bits_per_weight"] <= 4.5 + 1e-3
    with pytest.raises(PassError, match="bandwidth"):
        MixedPrecision(latency_ms=1.0).run(three_layers(), PassContext(calibration=calib(), target=get_target("onnx")))


@pytest.mark.parametrize("opts,msg", [({}, "exactly one budget"), ({"bits": 4, "latency_ms": 1}, "exactly one budget"),
                                      ({"bits": 0.5}, "bits must be"), ({"bits": 4, "sensitivity": "vibes"}, "sensitivity"),
                                      ({"bits": 4, "candidates": [{"format": "int4", "gs": 3}]}, "candidate"),
                                      ({"bits": 4, "candidates": [{"format": "int17"}]}, "2..8")])
def test_bad_options(opts, msg):
    with pytest.raises(PassError, match=msg):
        MixedPrecision(**opts)


def test_mixed_presets():
    name, passes = resolve_recipe("mixed-4.5")
    assert name == "mixed-4.5" and passes[0].bits == 4.5 and passes[0].name == "mixed_precision"
    with pytest.raises(PassError, match="mixed-<bits>"):
        resolve_recipe("mixed-lots")

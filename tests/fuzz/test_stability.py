"""The fairness filter: discontinuous ops near a jump, fp32 far from fp64, and exact values."""
from __future__ import annotations

import torch

from nnforge.fuzz.stability import check_stable, exact_values
from nnforge.ir import Dense, Graph, tensor


def _graph(build):
    g = Graph("s")
    x = g.add_input("x", tensor("f32", 4))
    g.set_outputs([build(g, x)])
    return g


def test_floor_next_to_an_integer_is_unstable():
    g = _graph(lambda g, x: g.op("floor", g.op("mul", x, g.add_weight("w", Dense(torch.full((4,), 3.0))))))
    near = torch.tensor([1 / 3, 0.5, 0.25, 0.1])        # 1/3 * 3 = 1.0000000x: on the edge
    far = torch.tensor([0.45, 0.5, 0.25, 0.1])
    assert any("integer" in p for p in check_stable(g, [near]))
    assert check_stable(g, [far]) == []


def test_comparison_of_exact_values_is_always_fair():
    g = _graph(lambda g, x: g.op("lt", g.op("relu", x), x))
    ties = torch.tensor([1.0, 2.0, 0.0, 3.0])            # relu(x) == x exactly
    assert check_stable(g, [ties]) == []
    assert {v.name for v in exact_values(g)} >= {"x", "relu", "lt"}


def test_argmax_ties_of_computed_values_are_unstable():
    g = _graph(lambda g, x: g.op("argmax", g.op("exp", x), axis=0))
    assert any("tied" in p for p in check_stable(g, [torch.tensor([1.0, 1.0, 0.0, -1.0])]))


def test_cancellation_is_caught_by_the_fp64_run():
    def build(g, x):
        big = g.add_weight("big", Dense(torch.full((4,), 1e4)))
        return g.op("sub", g.op("add", x, big), big)      # x + 1e4 - 1e4: x to 3 digits in fp32
    g = _graph(build)
    assert any("fp64" in p for p in check_stable(g, [torch.tensor([1.3e-3, 0.2e-3, -0.7e-3, 2.9e-3])]))

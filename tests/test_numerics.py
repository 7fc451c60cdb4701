"""Output comparison and the tolerance for graphs that round activations at run time."""
from __future__ import annotations

import pytest
import torch

from nnforge.numerics import compare, within, within_rounding, BACKEND_TOLERANCE


def test_compare_and_within():
    ref = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    m = compare([ref + 1e-6], [ref])
    assert m["cosine_min"] > 0.999999 and within(m, BACKEND_TOLERANCE)
    assert not within(compare([-ref], [ref]), BACKEND_TOLERANCE)


@pytest.mark.parametrize("ref_cos, backend_cos, ok", [
    (0.99, 0.985, True),        # half as far again as the reference: rounding flips
    (0.99, 0.9797, False),      # more than twice as far
    (1.0, 0.99995, True),       # the floor
    (1.0, 0.9998, False),
])
def test_within_rounding_allows_twice_the_reference_distance(ref_cos, backend_cos, ok):
    passed, allowed = within_rounding({"cosine_min": backend_cos}, {"cosine_min": ref_cos})
    assert passed is ok
    assert allowed == pytest.approx(1 - (2 * (1 - ref_cos) + 1e-4))


def test_quantised_activations_count_as_rounding_at_run_time():
    from nnforge.ir import Graph, tensor
    from nnforge.numerics import rounds_at_run_time
    g = Graph("dq")
    x = g.add_input("x", tensor("f32", 2, 32))
    g.set_outputs([g.op("relu", x)])
    assert not rounds_at_run_time(g)
    g.set_outputs([g.op("dynamic_quant", x, format="int8")])      # scales from each token: still a rounding
    assert rounds_at_run_time(g)

"""Fixing dimension symbols: attributes evaluated, types re-inferred and checked, results unchanged."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import Graph, GraphError, Interpreter, bind_symbols, specialize, tensor


def _graph() -> Graph:
    g = Graph("g")
    x = g.add_input("x", tensor("f32", "batch", "seq", 8))
    r = g.op("reshape", x, name="r", shape=["batch", "seq*2", 4])
    s = g.op("slice", r, name="s", axis=1, start=0, end="seq", step=1)
    g.set_outputs([g.op("relu", s, name="out")])
    return g


def test_specialised_graph_is_static_and_computes_the_same():
    g = _graph()
    env = bind_symbols(g, None, {"x": [2, 3, 8]})
    assert env == {"batch": 2, "seq": 3}
    static = specialize(g, env)
    assert [tuple(n.output.shape) for n in static.nodes] == [(2, 6, 4), (2, 3, 4), (2, 3, 4)]
    assert static.node("r").attrs["shape"] == [2, 6, 4] and static.node("s").attrs["end"] == 3
    assert static.meta["specialized_dims"] == env
    x = torch.randn(2, 3, 8)
    assert torch.equal(Interpreter(static).run(x)[0], Interpreter(g).run(x)[0])
    assert specialize(static, {}) is static          # already static: nothing to do


def test_bind_symbols_errors():
    g = _graph()
    with pytest.raises(GraphError, match="no size for dimension symbol.*seq"):
        bind_symbols(g, {"batch": 1})
    with pytest.raises(GraphError, match="input x: rank 3"):
        bind_symbols(g, None, {"x": [2, 3]})
    with pytest.raises(GraphError, match="no dimension symbol.*heads"):
        bind_symbols(g, {"heads": 2})
    with pytest.raises(GraphError, match="no size for dimension symbol.*batch"):
        specialize(g, {"seq": 2})

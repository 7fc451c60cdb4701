"""The reducer keeps a property while dropping outputs, cutting the graph and bypassing nodes."""
from __future__ import annotations

import torch

from nnforge.fuzz.reduce import reduce_graph, with_outputs
from nnforge.ir import Dense, Graph, tensor


def _graph():
    g = Graph("r")
    x = g.add_input("x", tensor("f32", 2, 4))
    y = g.add_input("y", tensor("f32", 2, 4))
    a = g.op("relu", x)
    b = g.op("tanh", a)
    c = g.op("exp", b)                                   # the "bug"
    d = g.op("sigmoid", c)
    e = g.op("linear", y, g.add_weight("w", Dense(torch.randn(3, 4))), None)
    g.set_outputs([d, e])
    return g


def test_reduces_to_the_failing_op():
    g = _graph()
    inputs = {"x": torch.randn(2, 4), "y": torch.randn(2, 4)}
    small = reduce_graph(g, inputs, lambda g, xs: any(n.op == "exp" for n in g.nodes), budget_s=30)
    assert [n.op for n in small.nodes] == ["exp"]
    assert not small.weights                             # the weight went with the other output
    # the exp alone, reading what it read in the full graph as a new input
    assert [v.name for v in small.inputs] == ["tanh"]
    assert torch.equal(inputs["tanh"], torch.tanh(torch.relu(inputs["x"])))


def test_with_outputs_keeps_an_input_that_binds_a_symbol():
    g = Graph("s")
    x = g.add_input("x", tensor("f32", "batch", 2))
    z = g.op("full", shape=["batch", 2], value=1.0, dtype="float32")
    g.set_outputs([g.op("add", z, x)])
    small = with_outputs(g, [g.node("full").outputs[0]])
    assert [v.name for v in small.inputs] == ["x"]

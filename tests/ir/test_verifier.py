"""The verifier: one malformed graph per rule, each checked to be reported with the offending
node / value / weight named. Graphs are broken by editing their fields directly, as a buggy
pass (or a tampered file) would."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import Dense, Graph, GraphError, TensorType, Value, check, tensor, verify
from nnforge.ir.verifier import MAX_RANK


def mlp_graph() -> Graph:
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", 4))
    w1 = g.add_weight("fc1.weight", Dense(torch.randn(8, 4)))
    w2 = g.add_weight("fc2.weight", Dense(torch.randn(3, 8)))
    h = g.op("linear", x, w1, None, name="fc1")
    a = g.op("relu", h, name="act")
    g.set_outputs([g.op("linear", a, w2, None, name="fc2")])
    return g


def problems(g: Graph) -> str:
    """The report, as one string; also checks verify() raises with the same content."""
    found = check(g)
    assert found, "the verifier accepted a malformed graph"
    with pytest.raises(GraphError) as info:
        verify(g)
    msg = str(info.value)
    assert msg.startswith(f"graph {g.name} is malformed ({len(found)} problem(s))")
    for p in found[:25]:
        assert p in msg
    return msg


def test_well_formed_graph_passes():
    g = mlp_graph()
    assert check(g) == []
    assert verify(g) is g


# --- SSA, definitions and order -------------------------------------------------------------------
def test_use_of_undefined_value():
    g = mlp_graph()
    ghost = Value("ghost", tensor("f32", "batch", 8))
    g.node("act").inputs[0] = ghost
    msg = problems(g)
    assert "node act reads dangling value ghost (input 0), defined nowhere in the graph" in msg


def test_graph_output_undefined():
    g = mlp_graph()
    g.outputs.append(Value("phantom", tensor("f32", 1)))
    assert "graph output phantom is defined nowhere in the graph" in problems(g)


def test_no_outputs():
    g = mlp_graph()
    g.set_outputs([])
    assert "graph mlp has no outputs" in problems(g)


def test_wrong_topological_order():
    """BUG: verify() on a graph whose nodes are out of order (no cycle) crashes with a bare
    ``KeyError: %fc1: f32[batch, 8]`` instead of reporting "node act reads fc1 ... before node fc1
    defines it" and "nodes are not in topological order". The order rule probes for a cycle with
    ``g.copy().toposort()``, but Graph.copy() maps inputs through values copied so far, in node
    order, so it raises KeyError on exactly the graphs this branch is for (verifier._ssa_and_order)."""
    g = mlp_graph()
    g.nodes.reverse()
    msg = problems(g)
    assert "node act reads fc1 (input 0) before node fc1 defines it" in msg
    assert "nodes are not in topological order (Graph.toposort() can fix it)" in msg


def test_cycle():
    """BUG: same crash as test_wrong_topological_order (KeyError from Graph.copy() inside the
    verifier), so a cycle is never reported as "graph mlp has a cycle through nodes: ..."."""
    g = mlp_graph()
    g.node("fc1").inputs[0] = g.value("fc2")
    msg = problems(g)
    assert "node fc1 reads fc2 (input 0) before node fc2 defines it" in msg
    assert "has a cycle through nodes: act, fc1, fc2" in msg


def test_value_produced_twice():
    g = mlp_graph()
    g.node("fc2").outputs.append(g.value("act"))
    msg = problems(g)
    assert "value act is produced by both act and fc2" in msg
    assert "value act lists producer act but node fc2 defines it" in msg


def test_producer_mismatch():
    g = mlp_graph()
    g.value("act").producer = g.node("fc1")
    assert "value act lists producer fc1 but node act defines it" in problems(g)


# --- names ------------------------------------------------------------------------------------------
def test_duplicate_value_names():
    g = mlp_graph()
    g.value("act").name = "x"
    assert "value name 'x' is defined twice (input and output of node act)" in problems(g)


def test_duplicate_node_names():
    g = mlp_graph()
    g.node("fc2").name = "fc1"
    assert "node name 'fc1' is used twice" in problems(g)


@pytest.mark.parametrize("bad", ["has space", "1st", "a:b", "x" * 201])
def test_invalid_value_name(bad):
    g = mlp_graph()
    g.value("act").name = bad
    assert f"value {bad!r} has an invalid name" in problems(g)


def test_invalid_node_name():
    g = mlp_graph()
    g.node("act").name = "re lu"
    assert "node 're lu' has an invalid name" in problems(g)


def test_weight_registered_under_another_name():
    g = mlp_graph()
    g.weights["fc1.weight"].name = "renamed"
    assert "weight fc1.weight is not registered consistently (name renamed" in problems(g)


# --- ops, attributes, types -------------------------------------------------------------------------
def test_unknown_op():
    g = mlp_graph()
    g.node("act").op = "frobnicate"
    assert "node act (frobnicate): unknown op" in problems(g)


def test_wrong_arity():
    g = mlp_graph()
    g.node("act").inputs.append(g.value("x"))
    assert "node act (relu): takes 1 inputs (x), got 2" in problems(g)


def test_attributes_not_canonical():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 3))
    g.set_outputs([g.op("softmax", x, axis=1, name="sm")])
    g.node("sm").attrs["axis"] = 1.0
    msg = problems(g)
    assert "node sm (softmax): attribute axis must be of kind int, got 1.0" in msg


def test_attribute_defaults_missing():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 3))
    g.set_outputs([g.op("gelu", x, name="act")])
    del g.node("act").attrs["approximate"]
    assert "node act (gelu): attributes are not in canonical form" in problems(g)


def test_type_mismatch_against_inference():
    g = mlp_graph()
    g.value("act").type = tensor("f32", "batch", 9)
    msg = problems(g)
    assert "node act (relu): output act is typed f32[batch, 9] but its inputs give f32[batch, 8]" in msg
    # the reader of the wrong type fails its own inference, and is named too
    assert "node fc2 (linear): linear input f32[batch, 9] does not match weight" in msg


def test_dtype_mismatch_against_inference():
    g = mlp_graph()
    g.value("fc2").type = tensor("f16", "batch", 3)
    assert "node fc2 (linear): output fc2 is typed f16[batch, 3] but its inputs give f32[batch, 3]" in problems(g)


def test_output_count_mismatch():
    g = mlp_graph()
    n = g.node("act")
    n.outputs.append(Value("act_extra", n.output.type, n))
    assert "node act (relu): has 2 outputs, its op defines 1" in problems(g)


def test_weight_encoding_disagrees_with_type():
    g = mlp_graph()
    w = g.weights["fc1.weight"]
    w.encoding = Dense(torch.randn(8, 5))
    msg = problems(g)
    assert "weight fc1.weight: encoding shape (8, 5) differs from its type f32[8, 4]" in msg
    w.encoding = Dense(torch.randn(8, 4, dtype=torch.float64))
    assert "weight fc1.weight: encoding decodes to float64, its type says float32" in problems(g)


# --- symbols and sizes ---------------------------------------------------------------------------------
def test_rank_limit():
    g = Graph("g")
    x = g.add_input("big", TensorType("f32", (1,) * (MAX_RANK + 1)))
    g.set_outputs([g.op("relu", x, name="r")])
    msg = problems(g)
    assert f"value big has rank {MAX_RANK + 1}, above the cap of {MAX_RANK}" in msg
    assert f"value r has rank {MAX_RANK + 1}" in msg


def test_rank_at_limit_is_fine():
    g = Graph("g")
    x = g.add_input("x", TensorType("f32", (1,) * MAX_RANK))
    g.set_outputs([g.op("relu", x, name="r")])
    assert check(g) == []


def test_element_limit():
    g = Graph("g")
    x = g.add_input("huge", tensor("f32", 1 << 21, 1 << 20))
    g.set_outputs([g.op("relu", x, name="r")])
    msg = problems(g)
    assert "value huge has an absurd shape f32[2097152, 1048576] (more than 1099511627776 elements" in msg


def test_free_symbol():
    g = mlp_graph()
    g.value("act").type = tensor("f32", "rows", 8)
    assert "value act (f32[rows, 8]) uses symbol(s) rows that no graph input defines" in problems(g)


def test_input_dims_must_be_plain_symbols():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", "2*n", 3))
    g.set_outputs([g.op("relu", x, name="r")])
    assert "input x axis 0: input dims must be ints or plain symbols, got '2*n'" in problems(g)


def test_every_problem_is_reported_and_long_reports_are_cut():
    g = mlp_graph()
    for i in range(30):
        g.add_input(f"in{i}", tensor("f32", 2))
        g.inputs[-1].name = "x"                         # 30 duplicates of x
    found = check(g)
    assert len(found) == 30
    with pytest.raises(GraphError, match="\\(30 problem\\(s\\)\\)[\\s\\S]*\\.\\.\\. and 5 more"):
        verify(g)

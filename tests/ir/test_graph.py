"""Graph building and editing: names, inference on add, uses and replacement, removal, renaming,
topological sorting, copies (independent of the original), the networkx view, symbols and the
signature."""
from __future__ import annotations

import networkx as nx
import pytest
import torch

from nnforge.ir import Dense, Graph, GraphError, IntQuant, Value, check, run_graph, sanitize_name, tensor


def mlp_graph() -> Graph:
    """x[batch, 4] -> fc1 (linear 4->8) -> relu -> fc2 (linear 8->3) -> out."""
    torch.manual_seed(0)
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", 4))
    w1 = g.add_weight("fc1.weight", Dense(torch.randn(8, 4)))
    b1 = g.add_weight("fc1.bias", Dense(torch.randn(8)))
    w2 = g.add_weight("fc2.weight", Dense(torch.randn(3, 8)))
    h = g.op("linear", x, w1, b1, name="fc1")
    a = g.op("relu", h, name="act")
    y = g.op("linear", a, w2, None, name="fc2")
    g.set_outputs([y])
    return g


# --- building ---------------------------------------------------------------------------------
def test_build_infers_types_and_names():
    g = mlp_graph()
    assert [n.name for n in g.nodes] == ["fc1", "act", "fc2"]
    assert [n.op for n in g.nodes] == ["linear", "relu", "linear"]
    assert str(g.nodes[0].output.type) == "f32[batch, 8]"
    assert str(g.outputs[0].type) == "f32[batch, 3]"
    assert g.nodes[0].output.name == "fc1"                 # single output named after its node
    assert g.nodes[2].inputs[2] is None                    # absent optional bias
    assert g.nodes[0].output.producer is g.nodes[0]
    assert g.value("fc1.weight").kind == "weight" and g.value("x").kind == "input"
    assert g.value("act").kind == "node"
    assert g.node("fc2").input("weight") is g.weights["fc2.weight"]
    assert check(g) == []
    assert repr(g) == "<Graph mlp: 1 inputs, 3 nodes, 3 weights>"


def test_default_node_and_value_names_are_fresh():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2))
    a = g.op("relu", x)
    b = g.op("relu", a)
    c = g.op("relu", b)
    assert [n.name for n in g.nodes] == ["relu", "relu_1", "relu_2"]
    assert [a.name, b.name, c.name] == ["relu", "relu_1", "relu_2"]


def test_multi_output_names_and_output_names_argument():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 3))
    n = g.add_node("relu", [x], name="r", output_names=["custom"])
    assert n.output.name == "custom"
    with pytest.raises(GraphError, match="produces 1 outputs, 2 names were given"):
        g.add_node("relu", [x], name="r2", output_names=["a", "b"])


def test_add_node_errors():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 3))
    g.op("relu", x, name="r")
    with pytest.raises(GraphError, match="node name 'r' is already used in graph g"):
        g.op("relu", x, name="r")
    with pytest.raises(GraphError, match="input 0 of new relu node is Tensor, not a Value"):
        g.add_node("relu", [torch.ones(2)])
    with pytest.raises(GraphError, match="unknown op 'frobnicate'"):
        g.op("frobnicate", x)
    with pytest.raises(GraphError, match="node bad \\(add\\): inputs must share one dtype"):
        g.op("add", x, g.add_input("i", tensor("i64", 2, 3)), name="bad")
    with pytest.raises(GraphError, match="invalid node name 'a b'"):
        g.op("relu", x, name="a b")
    with pytest.raises(GraphError, match="node s \\(softmax\\): unknown attribute\\(s\\) dim; softmax takes: axis"):
        g.op("softmax", x, dim=1, name="s")
    with pytest.raises(GraphError, match="node s \\(softmax\\): missing required attribute axis"):
        g.op("softmax", x, name="s")
    # a failed add leaves no trace: no node, and the names are still free
    assert [n.name for n in g.nodes] == ["r"]
    g.op("relu", x, name="bad")


def test_duplicate_and_invalid_value_names():
    g = Graph("g")
    g.add_input("x", tensor("f32", 2))
    with pytest.raises(GraphError, match="input name 'x' is already used"):
        g.add_input("x", tensor("f32", 2))
    with pytest.raises(GraphError, match="weight name 'x' is already used"):
        g.add_weight("x", Dense(torch.ones(2)))
    for bad in ["1x", "a-b", "a:b", "", "x" * 201]:
        with pytest.raises(GraphError, match="invalid input name"):
            g.add_input(bad, tensor("f32", 2))


def test_sanitize_name():
    assert sanitize_name("encoder.layer.0/attn:q") == "encoder.layer.0_attn_q"
    assert sanitize_name("0abc") == "v_0abc"
    assert sanitize_name("") == "v"
    assert sanitize_name("...") == "v"
    assert len(sanitize_name("a" * 500)) == 200
    assert Graph("my model!").name == "my_model_"


def test_fresh_name():
    g = mlp_graph()
    assert g.fresh_name("new") == "new"
    assert g.fresh_name("fc1") == "fc1_1"
    assert g.fresh_name("fc1", node=True) == "fc1_1"
    assert g.fresh_name("x") == "x_1"
    assert g.fresh_name("x", node=True) == "x"                 # node and value names are separate
    assert g.fresh_name("a b") == "a_b"
    g.add_input("fc1_1", tensor("f32", 1))
    assert g.fresh_name("fc1") == "fc1_2"


def test_inserting_before():
    g = mlp_graph()
    fc2 = g.node("fc2")
    with g.inserting_before(fc2):
        n1 = g.op("neg", g.value("act"), name="n1")
        n2 = g.op("neg", n1, name="n2")
    g.op("relu", g.outputs[0], name="tail")
    assert [n.name for n in g.nodes] == ["fc1", "act", "n1", "n2", "fc2", "tail"]


# --- uses / replace / remove ----------------------------------------------------------------------
def test_uses():
    g = mlp_graph()
    uses = g.uses()
    assert uses[g.value("x")] == [(g.node("fc1"), 0)]
    assert uses[g.weights["fc1.bias"]] == [(g.node("fc1"), 2)]
    assert g.outputs[0] not in uses                           # graph outputs are not node uses


def test_replace_uses_counts_nodes_and_outputs():
    g = mlp_graph()
    act = g.value("act")
    neg = g.op("neg", act, name="neg")
    assert g.replace_uses(act, neg) == 2                      # fc2 reads it; so does neg itself
    assert g.node("fc2").inputs[0] is neg
    g.node("neg").inputs[0] = act                             # undo the self-loop
    y = g.outputs[0]
    z = g.op("relu", y, name="z")
    assert g.replace_uses(y, z) == 2                          # node z and the graph output
    assert g.outputs == [z]
    g.node("z").inputs[0] = y
    g.toposort()                                              # neg was appended after its reader fc2
    assert [n.name for n in g.nodes] == ["fc1", "act", "neg", "fc2", "z"]
    assert check(g) == []


def test_remove_node_refuses_when_read():
    g = mlp_graph()
    with pytest.raises(GraphError, match="cannot remove node act: its outputs are read by fc2"):
        g.remove_node(g.node("act"))
    with pytest.raises(GraphError, match="cannot remove node fc2: its outputs are read by graph output fc2"):
        g.remove_node(g.node("fc2"))


def test_remove_node_frees_names():
    g = mlp_graph()
    d = g.op("neg", g.value("act"), name="dead")
    g.remove_node(d.producer)
    assert [n.name for n in g.nodes] == ["fc1", "act", "fc2"]
    assert g.op("neg", g.value("act"), name="dead").name == "dead"     # name reusable


def test_remove_nodes_without_use_check():
    g = mlp_graph()
    tail = [g.node("act"), g.node("fc2")]
    g.remove_nodes(tail)
    assert [n.name for n in g.nodes] == ["fc1"]
    assert g.fresh_name("act") == "act" and g.fresh_name("act", node=True) == "act"
    g.set_outputs([g.value("fc1")])
    assert g.remove_unused_weights() == ["fc2.weight"]
    assert check(g) == []


def test_rename():
    g = mlp_graph()
    act = g.value("act")
    g.rename(act, "hidden")
    assert act.name == "hidden" and g.fresh_name("act") == "act"
    with pytest.raises(GraphError, match="value name 'fc1' is already used"):
        g.rename(act, "fc1")
    with pytest.raises(GraphError, match="invalid value name 'no good'"):
        g.rename(act, "no good")
    g.rename(act, "hidden")                                   # no-op
    w = g.weights["fc2.weight"]
    g.rename(w, "head.weight")
    assert list(g.weights) == ["fc1.weight", "fc1.bias", "head.weight"]     # order kept
    assert g.weights["head.weight"] is w and w.name == "head.weight"
    assert check(g) == []


def test_set_encoding():
    g = mlp_graph()
    enc = IntQuant.quantize(g.weights["fc1.weight"].encoding.data, 8)
    g.set_encoding("fc1.weight", enc)
    assert g.weights["fc1.weight"].encoding is enc
    with pytest.raises(GraphError, match="weight fc1.weight: new encoding has shape \\(4, 8\\), the weight has "
                                         "\\(8, 4\\); use a graph rewrite"):
        g.set_encoding("fc1.weight", Dense(torch.zeros(4, 8)))
    assert check(g) == []


def test_name_outputs():
    g = mlp_graph()
    g.name_outputs(["logits"])
    assert g.outputs[0].name == "logits"
    g2 = mlp_graph()
    g2.name_outputs(["act"])                  # taken by an intermediate: it moves aside
    assert g2.outputs[0].name == "act" and g2.node("act").output.name == "act_1"
    g3 = mlp_graph()
    g3.name_outputs(["x"])                    # taken by an input: the output takes a variant
    assert g3.outputs[0].name == "x_1"
    for h in (g, g2, g3):
        assert check(h) == []
    with pytest.raises(GraphError, match="has 1 outputs but 2 output names"):
        g.name_outputs(["a", "b"])


# --- order ---------------------------------------------------------------------------------------------
def test_toposort_restores_order_stably():
    g = mlp_graph()
    extra = g.op("neg", g.value("x"), name="side")
    g.set_outputs(g.outputs + [extra])
    g.toposort()                                              # already sorted: unchanged
    assert [n.name for n in g.nodes] == ["fc1", "act", "fc2", "side"]
    g.nodes.reverse()
    g.toposort()                                              # ties keep the current order
    assert [n.name for n in g.nodes] == ["side", "fc1", "act", "fc2"]
    assert check(g) == []


def test_toposort_raises_on_cycle():
    g = mlp_graph()
    g.node("fc1").inputs[0] = g.value("fc2")               # fc1 <- fc2 <- act <- fc1
    g.node("fc2").inputs[0] = g.value("act")
    with pytest.raises(GraphError, match="graph mlp has a cycle through nodes: act, fc1, fc2"):
        g.toposort()


# --- copy -------------------------------------------------------------------------------------------------
def test_copy_is_independent():
    g = mlp_graph()
    c = g.copy()
    assert str(c) == str(g)
    assert c.signature() == g.signature()
    assert all(a is not b for a, b in zip(c.nodes, g.nodes))
    assert all(a is not b for a, b in zip(c.values(), g.values()))
    # weight encodings are immutable and shared
    assert c.weights["fc1.weight"].encoding is g.weights["fc1.weight"].encoding
    # every value in the copy is one of the copy's own
    own = set(c.values())
    assert all(v in own for n in c.nodes for v in n.inputs if v is not None)
    assert all(o.producer in c.nodes for n in c.nodes for o in n.outputs)
    # edits of the copy leave the original alone
    c.rename(c.value("act"), "hidden")
    c.op("neg", c.outputs[0], name="extra")
    c.set_encoding("fc2.weight", Dense(torch.zeros(3, 8)))
    c.node("fc1").attrs["foo"] = 1
    c.meta["k"] = "v"
    assert g.value("act").name == "act"
    assert [n.name for n in g.nodes] == ["fc1", "act", "fc2"]
    assert torch.count_nonzero(g.weights["fc2.weight"].encoding.data) > 0
    assert "foo" not in g.node("fc1").attrs and "k" not in g.meta
    # and the copy's name tables work: the names it holds are taken
    with pytest.raises(GraphError, match="already used"):
        c.op("relu", c.value("x"), name="fc1")
    assert c.fresh_name("fc2") == "fc2_1"


def test_copy_runs_identically():
    g = mlp_graph()
    x = torch.randn(5, 4)
    assert torch.equal(run_graph(g, [x])[0], run_graph(g.copy(), [x])[0])


# --- views ----------------------------------------------------------------------------------------------
def test_to_networkx():
    g = mlp_graph()
    G = g.to_networkx()
    assert isinstance(G, nx.DiGraph) and nx.is_directed_acyclic_graph(G)
    kinds = nx.get_node_attributes(G, "kind")
    assert sorted(k for k, v in kinds.items() if v == "input") == ["input:x"]
    assert sorted(k for k, v in kinds.items() if v == "weight") == ["weight:fc1.bias", "weight:fc1.weight",
                                                                   "weight:fc2.weight"]
    assert sorted(k for k, v in kinds.items() if v == "node") == ["act", "fc1", "fc2"]
    assert G.nodes["fc1"]["op"] == "linear"
    assert G.edges["input:x", "fc1"]["value"] == "x"
    assert G.edges["fc1", "act"]["value"] == "fc1"
    assert G.edges["weight:fc2.weight", "fc2"]["value"] == "fc2.weight"
    assert G.number_of_edges() == 6
    assert list(nx.topological_sort(G.subgraph(["fc1", "act", "fc2"]))) == ["fc1", "act", "fc2"]


def test_to_networkx_exposes_cycles():
    g = mlp_graph()
    g.node("fc1").inputs[0] = g.value("fc2")
    g.node("fc2").inputs[0] = g.value("act")
    cycles = list(nx.simple_cycles(g.to_networkx()))
    assert len(cycles) == 1 and sorted(cycles[0]) == ["act", "fc1", "fc2"]


def test_symbols_and_signature():
    g = Graph("g")
    ids = g.add_input("ids", tensor("i64", "batch", "seq"))
    mask = g.add_input("mask", tensor("i64", "batch", "seq"))
    emb = g.add_weight("emb", Dense(torch.randn(10, 4)))
    e = g.op("embedding", ids, emb, name="e")
    g.set_outputs([e, g.op("cast", mask, dtype="f32", name="m")])
    syms = g.symbols()
    assert set(syms) == {"batch", "seq"}
    assert syms["batch"] == (ids, 0) and syms["seq"] == (ids, 1)      # first input that carries it
    assert g.signature() == {"inputs": [("ids", "i64[batch, seq]"), ("mask", "i64[batch, seq]")],
                             "outputs": [("e", "f32[batch, seq, 4]"), ("m", "f32[batch, seq]")]}
    assert Graph("empty").symbols() == {} and Graph("empty").signature() == {"inputs": [], "outputs": []}


def test_value_and_node_lookup_errors():
    g = mlp_graph()
    with pytest.raises(KeyError, match="graph mlp has no value named 'nope'"):
        g.value("nope")
    with pytest.raises(KeyError, match="graph mlp has no node named 'nope'"):
        g.node("nope")
    with pytest.raises(KeyError, match="op relu has no input slot 'weight'"):
        g.node("act").input("weight")
    with pytest.raises(KeyError, match="input slot 'bias' of linear is absent"):
        Graph("h").add_node("linear", [g.value("x"), g.weights["fc1.weight"]]).input("bias")
    assert isinstance(g.value("x"), Value) and repr(g.value("x")) == "%x: f32[batch, 4]"


def test_copy_of_out_of_order_graph():
    """BUG: Graph.copy() maps each node's inputs through the values copied so far, in node order,
    so copying a graph whose nodes are not topologically sorted raises a bare ``KeyError: %fc1:
    f32[batch, 8]``. The verifier relies on ``graph.copy().toposort()`` exactly for such graphs
    (see tests/ir/test_verifier.py::test_wrong_topological_order), and PassManager.run starts with
    ``graph.copy()``. A copy should preserve the order it is given (or fail with a GraphError)."""
    g = mlp_graph()
    g.nodes.reverse()
    c = g.copy()
    assert [n.name for n in c.nodes] == ["fc2", "act", "fc1"]
    c.toposort()
    assert [n.name for n in c.nodes] == ["fc1", "act", "fc2"] and check(c) == []

"""The printer: graph header with typed inputs, the weight table with each encoding, one line per
node with its op, operands, attributes and output types, provenance comments, and the return."""
from __future__ import annotations

import torch

from nnforge.ir import Dense, Graph, IntQuant, format_graph, tensor
from nnforge.ir.printer import format_node


def graph() -> Graph:
    torch.manual_seed(0)
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", 4))
    w1 = g.add_weight("fc1.weight", IntQuant.quantize(torch.randn(8, 4), 4, group_size=2))
    b1 = g.add_weight("fc1.bias", Dense(torch.randn(8)))
    w2 = g.add_weight("fc2.weight", Dense(torch.randn(3, 8)))
    h = g.op("linear", x, w1, b1, name="fc1")
    a = g.op("gelu", h, approximate="tanh", name="act")
    y = g.add_node("linear", [a, w2, None], name="fc2", output_names=["logits"], meta={"module": "head"}).output
    s = g.op("softmax", y, axis=-1, name="probs", meta={"source_op": "aten.softmax"})
    g.set_outputs([s, y])
    return g


def test_format_graph_exact():
    assert format_graph(graph()) == "\n".join([
        "graph mlp(%x: f32[batch, 4]) {",
        "  # 3 weights, 64 elements, 208 bytes stored",
        "  @fc1.weight: f32[8, 4] = i4 g2 sym",
        "  @fc1.bias: f32[8] = dense f32",
        "  @fc2.weight: f32[3, 8] = dense f32",
        "  %fc1 = linear(%x, @fc1.weight, @fc1.bias)  : f32[batch, 8]",
        "  %act = gelu(%fc1, approximate='tanh')  : f32[batch, 8]",
        "  %logits = linear(%act, @fc2.weight, None)  : f32[batch, 3]  # node fc2, head",
        "  %probs = softmax(%logits, axis=-1)  : f32[batch, 3]  # aten.softmax",
        "  return %probs, %logits",
        "}",
    ])


def test_str_of_graph_is_the_printer():
    g = graph()
    assert str(g) == format_graph(g)


def test_every_node_value_and_type_appears():
    g = graph()
    text = format_graph(g)
    for n in g.nodes:
        assert f"{n.op}(" in text
        for o in n.outputs:
            assert f"%{o.name} = " in text and str(o.type) in text
    for name in g.weights:
        assert f"@{name}:" in text


def test_list_and_dtype_attributes():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 3))
    r = g.op("reshape", x, shape=[3, "2"], name="r")
    c = g.op("cast", r, dtype="f16", name="c")
    g.set_outputs([c])
    assert format_node(g.node("r")) == "%r = reshape(%x, shape=[3, 2])  : f32[3, 2]"
    assert format_node(g.node("c")) == "%c = cast(%r, dtype=float16)  : f16[3, 2]"
    assert "weights" not in format_graph(g)                     # no weight table when there are none


def test_weight_table_is_capped():
    g = Graph("many")
    x = g.add_input("x", tensor("f32", 2))
    ws = [g.add_weight(f"w{i}", Dense(torch.ones(2))) for i in range(50)]
    g.set_outputs([g.op("add", x, ws[0])])
    text = format_graph(g)
    assert "@w39:" in text and "@w40:" not in text
    assert "# ... 10 more weights" in text
    full = format_graph(g, max_weights=None)
    assert "@w49:" in full and "more weights" not in full
    assert format_graph(g, max_weights=5).count("= dense f32") == 5


def test_weight_and_input_outputs_print_with_sigils():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2))
    w = g.add_weight("w", Dense(torch.ones(2)))
    g.set_outputs([x, w])
    assert format_graph(g).splitlines()[-2] == "  return %x, @w"

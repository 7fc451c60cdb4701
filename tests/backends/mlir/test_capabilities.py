"""The mlir backend's capability table is what its lowering does: for each layer op and a
representative set of weight encodings, a row takes the weight exactly when building the module
reports no fallback for it or its parts (N:M values, low-rank factors), and the module still equals
the interpreter; ``nnforge targets --explain mlir`` lists every row. Building the module needs no
torch-mlir."""
from __future__ import annotations

import pytest
import torch

from tests.backends.capability_cases import cases, explained, rtn

from nnforge.backends.mlir import MlirBackend
from nnforge.backends.mlir.capabilities import CAPABILITIES
from nnforge.backends.mlir.module import GraphModule
from nnforge.cli import explain_target
from nnforge.ir import Dense, Graph, run_graph, tensor
from nnforge.targets import get_target

CASES = cases()


def _input(graph):
    x = graph.inputs[0]
    shape = [2 if isinstance(d, str) else d for d in x.shape]
    gen = torch.Generator().manual_seed(0)
    if x.dtype.is_float:
        return torch.randn(shape, generator=gen)
    return torch.randint(0, graph.meta["vocab"], shape, generator=gen)


@pytest.mark.parametrize("op, label, graph", CASES, ids=[f"{op}-{label}" for op, label, _ in CASES])
def test_table_agrees_with_lowering(op, label, graph):
    weight = graph.weights["layer.weight"]
    cap, why = CAPABILITIES.find(op, weight.encoding, get_target("mlir"))
    module, fallbacks = GraphModule.build(graph, get_target("mlir"))
    mine = [f for f in fallbacks if f.where == weight.name or f.where.startswith(weight.name + ".")]
    assert (cap is not None) == (not mine), (cap, why, mine)
    reasons = [r.split(": ", 1)[-1] for r in why.split("; ")]       # a part's reason is "values: ..."
    assert all(any(r in f.action for r in reasons) for f in mine), (why, mine)
    x = _input(graph)
    assert torch.equal(module(x), run_graph(graph, [x])[0])


def test_every_kind_and_op_is_covered():
    """The cases reach every weight row, and weights no row takes (the KV-cache rows are run by
    test_decoder.py)."""
    from nnforge.ir import WEIGHT_OPS
    found = {id(CAPABILITIES.find(op, g.weights["layer.weight"].encoding, get_target("mlir"))[0])
             for op, _, g in CASES}
    assert {id(r) for r in CAPABILITIES if r.op in WEIGHT_OPS} <= found and id(None) in found
    assert {(r.op, r.encoding) for r in CAPABILITIES if r.op not in WEIGHT_OPS} == {
        ("kv_cache_write", "kv8"), ("kv_cache_read", "kv8")}


def test_other_weight_operands_are_read_as_tensors():
    """A bias and a folded constant are no layer weights: dense, they are constants, no fallback."""
    g = Graph("biased")
    x = g.add_input("x", tensor("f32", "batch", 64))
    w = g.add_weight("fc.weight", rtn(torch.randn(16, 64), "int8"))
    y = g.op("linear", x, w, g.add_weight("fc.bias", Dense(torch.randn(16))), name="fc")
    g.set_outputs([g.op("add", y, g.add_weight("shift", Dense(torch.randn(16))))])
    module, fallbacks = GraphModule.build(g, get_target("mlir"))
    assert fallbacks == []
    xin = torch.randn(3, 64)
    assert torch.equal(module(xin), run_graph(g, [xin])[0])


def test_backend_declares_the_table_and_explain_lists_every_row():
    assert MlirBackend.capabilities is CAPABILITIES and not hasattr(MlirBackend, "native")
    lines = explain_target("mlir")
    assert [r for r in CAPABILITIES if not explained(lines, r)] == []

"""scale_residual: a decoder's residual stream times a power of two, the RMS norms on it with their
epsilon times its square; the graph computes what it did (interpreter against interpreter)."""
from __future__ import annotations

import pytest
import torch

from nnforge.frontend.decoders.importer import import_decoder
from nnforge.ir import Graph, Interpreter, tensor
from nnforge.passes import PassContext, PassError, PassManager
from nnforge.passes.residual_scale import ScaleResidual
from tests.frontend.decoders.families import tiny_model


def _run(graph: Graph, factor=0.125):
    pm = PassManager([ScaleResidual(factor=factor)])
    out = pm.run(graph, PassContext())
    return out, pm.records[-1].figures


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_the_scaled_stream_computes_what_the_graph_did(family):
    graph = import_decoder(tiny_model(family), max_len=32).graph
    inputs = [torch.randint(4, 100, (1, 5)), torch.arange(5)[None]] + \
        [torch.zeros([1, *v.shape[1:]]) for v in graph.inputs[2:]]
    want = Interpreter(graph).run(*inputs)
    eps = {n.name: n.attrs["eps"] for n in graph.nodes if n.op == "rms_norm"}
    scaled, figures = _run(graph.copy())
    layers = len([n for n in graph.nodes if n.op == "attention"])
    folded = 2 * layers if family == "gemma3" else 0       # Gemma's post-norms make every block output
    assert figures["scaled"] == {"factor": 0.125, "adds": 2 * layers, "rms_norms": 2 * layers + 1,
                                 "folded_into_norms": folded}
    muls = [len([n for n in g.nodes if n.op == "mul"]) for g in (graph, scaled)]
    assert muls[1] - muls[0] == 1 + 2 * layers - folded
    streamed = [n for n in scaled.nodes if n.op == "rms_norm" and n.attrs["eps"] != eps[n.name]]
    assert len(streamed) == figures["scaled"]["rms_norms"]
    assert all(n.attrs["eps"] == eps[n.name] / 64 for n in streamed)
    for got, ref in zip(Interpreter(scaled).run(*inputs), want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    for norm in (n for n in scaled.nodes if n.op == "rms_norm" and n.inputs[1].name.endswith(".scaled")):
        before = graph.node(norm.name)
        assert norm.attrs["offset"] == 0.0 and torch.equal(
            norm.inputs[1].encoding.data, (before.attrs["offset"] + before.inputs[1].encoding.data) * 0.125)


def test_a_stream_something_else_reads_is_left_as_it_is():
    g = Graph("other")
    x = g.add_input("x", tensor("f32", 2, 8))
    h = g.op("add", x, g.op("rms_norm", x, eps=1e-6))
    g.set_outputs([g.op("rms_norm", h, eps=1e-6), g.op("relu", h)])
    out, figures = _run(g)
    assert figures["unchanged"].endswith(f"(relu) reads the residual value {h.name}")
    assert [n.attrs["eps"] for n in out.nodes if n.op == "rms_norm"] == [1e-6, 1e-6]


@pytest.mark.parametrize("factor", [0.3, 1, 2.0, True])
def test_a_factor_that_is_not_a_power_of_two_below_one_is_refused(factor):
    with pytest.raises(PassError, match=f"scale_residual: factor must be a power of two below 1 .*got {factor!r}"):
        ScaleResidual(factor=factor)

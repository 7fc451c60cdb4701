"""run_calibration: every node over every batch in graph order, and with ``until`` nothing after the
last node a hook works on (an LM head over the vocabulary is neither run nor held)."""
from __future__ import annotations

import torch

from nnforge.ir import run_graph
from nnforge.passes.quantize.calibrate import run_calibration
from tests.passes.graphs import mlp_graph


def test_every_node_runs_and_the_outputs_come_back():
    graph = mlp_graph()
    batches = [(torch.randn(3, 16),), (torch.randn(5, 16),)]
    seen = []
    outs = run_calibration(graph, batches, lambda node, args: seen.append((node.name, len(args))))
    assert seen == [(n.name, 2) for n in graph.nodes]
    for got, batch in zip(outs, batches):
        torch.testing.assert_close(got[0], run_graph(graph, batch)[0])


def test_until_stops_after_the_last_named_node(monkeypatch):
    graph = mlp_graph()
    ran = []
    from nnforge.ir.ops import registry
    real = registry.OpDef.run

    def spy(self, ctx, args, attrs):
        ran.append(self.name)
        return real(self, ctx, args, attrs)

    monkeypatch.setattr(registry.OpDef, "run", spy)
    seen = []
    out = run_calibration(graph, [(torch.randn(2, 16),)], lambda node, args: seen.append(node.name), until={"fc1"})
    assert out is None and seen == [n.name for n in graph.nodes[:graph.nodes.index(graph.node("fc1")) + 1]]
    assert "gelu" not in ran and ran.count("linear") == 0          # fc1 itself is hooked, not run
    assert run_calibration(graph, [(torch.randn(2, 16),)], None, until=set()) is None


def test_until_frees_outputs_no_one_reads_back():
    from nnforge.passes.quantize.calibrate import last_uses
    graph = mlp_graph()
    assert last_uses(graph)[graph.outputs[0]] == len(graph.nodes)
    assert graph.outputs[0] not in last_uses(graph, outputs=False)

"""Pruning passes say which share of the model's weights they reached and why they left the rest:
a tiny convolutional net (convs, a depthwise conv, a classifier) under block and N:M patterns."""
from __future__ import annotations

import torch

from nnforge.frontend import from_torch
from nnforge.passes import PassContext, PassManager
from nnforge.passes.prune.sparsity import PruneMagnitude


class TinyConvNet(torch.nn.Module):
    """A ResNet-like stem, a residual 3x3 pair, a depthwise and a pointwise conv, a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = torch.nn.Conv2d(16, 32, 1)
        self.fc = torch.nn.Linear(32, 8)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.c2(torch.relu(self.c1(x)))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.fc(x.mean((2, 3)))


def conv_graph():
    torch.manual_seed(0)
    return from_torch(TinyConvNet().eval(), (torch.randn(2, 3, 8, 8),))


def weight_count(g, op=None):
    seen = {}
    for n in g.nodes:
        if n.op in ("linear", "conv") and (op is None or n.op == op):
            seen[n.inputs[1].name] = n.inputs[1].encoding.numel
    return sum(seen.values())


def run(g, p):
    ctx = PassContext()
    pm = PassManager([p])
    out = pm.run(g, ctx)
    return out, pm.records[0]


def test_a_pass_that_leaves_the_convs_says_so():
    g = conv_graph()
    _, rec = run(g, PruneMagnitude(pattern="block4x1", ops=["linear"]))
    total, linear = weight_count(g), weight_count(g, "linear")
    assert rec.figures["reach"] == {"weights": linear, "of": total, "fraction": round(linear / total, 4)}
    conv = [x for x in rec.figures["not_reached"] if x["kind"] == "conv"]
    assert conv and conv[0]["layers"] == 4 and "conv is not in ops=['linear']" in conv[0]["why"]
    assert any(x["kind"] == "depthwise conv" for x in rec.figures["not_reached"])
    (warning,) = rec.warnings
    assert warning.startswith("prune_magnitude pruned ") and "conv layers: " in warning
    assert "add \"conv\" to ops" in warning


def test_a_pass_that_reaches_nearly_everything_does_not_warn():
    g = conv_graph()
    _, rec = run(g, PruneMagnitude(pattern="unstructured", ops=["linear", "conv"]))
    assert rec.figures["reach"]["fraction"] == 1.0 and rec.figures["not_reached"] == []
    assert rec.warnings == []

"""Pruning passes say which share of the model's weights they reached and why they left the rest:
a tiny convolutional net (convs, a depthwise conv, a classifier) under block and N:M patterns."""
from __future__ import annotations

import pytest
import torch

import nnforge as nf
from nnforge.frontend import from_torch
from nnforge.ir import Dense, Sparse, run_graph
from nnforge.passes import PassContext, PassManager
from nnforge.passes.prune.sparsity import PruneMagnitude
from nnforge.passes.prune.structured import PruneMLP


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


def test_block_sparsity_reaches_the_convs_and_names_the_depthwise_one():
    g = conv_graph()
    out, rec = run(g, PruneMagnitude(pattern="block4x1"))
    dw = out.weights["dw.weight"].encoding.numel
    assert rec.figures["reach"]["weights"] == weight_count(g) - dw
    (left,) = rec.figures["not_reached"]
    assert left["kind"] == "depthwise conv" and left["weights"] == dw and "depthwise: one input channel" in left["why"]
    assert rec.warnings == []
    for name in ("stem.weight", "c1.weight", "c2.weight", "pw.weight", "fc.weight"):
        enc = out.weights[name].encoding
        assert isinstance(enc, Sparse) and enc.shape == tuple(g.weights[name].shape)
        # the im2col view [out, in*kh*kw] holds the 4x1 blocks: whole blocks kept or dropped
        rows = enc.shape[0]
        kept = enc.mask().reshape(rows // 4, 4, -1)
        assert torch.equal(kept.all(1), kept.any(1)) and abs(1 - enc.density - 0.5) < 0.05
        dense = g.weights[name].encoding.data
        torch.testing.assert_close(enc.decode(), dense * enc.mask())


def test_a_conv_the_pattern_does_not_tile_is_left_with_its_reason():
    g = conv_graph()
    out, rec = run(g, PruneMagnitude(pattern="2:4"))
    assert isinstance(out.weights["stem.weight"].encoding, Dense)       # 3*3*3 = 27 columns
    assert isinstance(out.weights["c1.weight"].encoding, Sparse)
    why = {x["kind"]: x["why"] for x in rec.figures["not_reached"]}
    assert "does not divide the 27 columns" in why["conv"] and "[out, in*kh*kw]" in why["conv"]


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_block_sparse_convs_compile_and_match_the_interpreter(target, tmp_path):
    torch.manual_seed(0)
    m = TinyConvNet().eval()
    calib = [(torch.randn(2, 3, 8, 8),) for _ in range(4)]
    bundle = nf.compile(m, target, "block-sparse-50", example_inputs=calib[0], calibration=calib,
                        out=tmp_path / "b")
    g = bundle.graph()
    for name in ("c1.weight", "c2.weight", "pw.weight"):
        assert isinstance(g.weights[name].encoding, Sparse)
    fallbacks = {f["where"] for f in bundle.manifest["fallbacks"]}
    assert {"stem.weight", "c1.weight", "c2.weight", "pw.weight"} <= fallbacks
    (sgpt,) = [p for p in bundle.manifest["passes"] if p["name"] == "prune_sparsegpt"]
    assert "magnitude_instead" not in sgpt["figures"]          # SparseGPT on the im2col inputs, not a fallback
    x = torch.randn(2, 3, 8, 8)
    got = torch.as_tensor(nf.load(bundle.path)(x.numpy()))
    torch.testing.assert_close(got, run_graph(g, [x])[0], rtol=1e-4, atol=1e-5)


class PatchMLP(torch.nn.Module):
    """A conv patch embedding, then one transformer-style MLP over the patches."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 32, 4, stride=4)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.down(torch.nn.functional.gelu(self.up(t)))


def test_structured_pruning_names_the_conv_it_cannot_shrink():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    g = from_torch(PatchMLP().eval(), (x,))
    ctx = PassContext(calibration=[(torch.randn(2, 3, 8, 8),) for _ in range(4)])
    pm = PassManager([PruneMLP(fraction=0.25)])
    pm.run(g, ctx)
    rec = pm.records[0]
    total, linear = weight_count(g), weight_count(g, "linear")
    assert rec.figures["reach"] == {"weights": linear, "of": total, "fraction": round(linear / total, 4)}
    (left,) = rec.figures["not_reached"]
    assert left["kind"] == "conv" and "not in a linear -> activation -> linear structure" in left["why"]
    (warning,) = rec.warnings
    assert "prune_mlp pruned" in warning and "conv layers: " in warning

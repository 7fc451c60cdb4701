"""Compressed convolutions followed by batch norm on apple targets (issue 21, item 4).

A small compressed weight (a 1x1 conv, a depthwise conv) has no Core ML form smaller than fp16,
so it is stored as a plain fp16 const, and coremltools' conversion fuses conv + batch_norm into a
new const. The bundle must still build and verify; a weight kept compressed must still be found
and checked bit for bit."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("coremltools")

import nnforge as nf                                              # noqa: E402
from nnforge.backends.coreml import MODEL_DIR                     # noqa: E402
from nnforge.ir import Interpreter                                # noqa: E402

SHAPE = (1, 3, 16, 16)


class ConvBN(torch.nn.Module):
    """A 3x3 stem, a 1x1 conv (ResNet's shortcut) and a depthwise conv (MobileNetV2), each + BN."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 16, 1, stride=2, bias=False), torch.nn.BatchNorm2d(16)
        self.c3, self.b3 = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), torch.nn.BatchNorm2d(16)
        for bn in (self.b1, self.b2, self.b3):      # running stats far from the identity, so BN matters
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        return self.b3(self.c3(torch.relu(self.b2(self.c2(x)))))


def _batches(n: int, shape=SHAPE, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g),) for _ in range(n)]


def _compile(model, tmp_path, shape=SHAPE, recipe="palettize-4"):
    return nf.compile(model.eval(), "apple-a17", recipe, example_inputs=_batches(1, shape, 0)[0],
                      calibration=_batches(4, shape), out=tmp_path / "b")


def test_fp32_conv_batchnorm_builds_though_coremltools_fuses_the_pair(tmp_path):
    torch.manual_seed(0)
    bundle = _compile(ConvBN(), tmp_path, recipe=None)
    check = bundle.manifest["backend"]["entry"]["verify"]
    assert {"c1.weight", "c2.weight", "c3.weight"} <= set(check["missing"])
    assert check["op_map"]["batch_norm"] == [] and check["op_map"]["conv"] == ["conv"]
    assert nf.verify(bundle.path)["passed"]


def test_palettized_conv_batchnorm_builds_verifies_and_matches_the_interpreter(tmp_path):
    torch.manual_seed(0)
    model = ConvBN().eval()
    bundle = _compile(model, tmp_path)
    m = bundle.manifest
    check = m["backend"]["entry"]["verify"]
    by = {w["name"]: w for w in check["weights"]}
    # the 3x3 stem's LUT form is smaller than fp16: kept compressed and checked bit for bit
    assert by["c1.weight"]["op_types"][0] == "constexpr_lut_to_dense"
    # the 1x1 and depthwise weights were stored as plain fp16 (each said as a fallback), and
    # coremltools fused them with their batch norms, so the package has no const of that name
    assert {"c2.weight", "c3.weight"} <= set(check["missing"])
    assert {"c2.weight", "c3.weight"} <= {f["where"] for f in m["fallbacks"]}
    assert nf.verify(bundle.path)["passed"]
    # the bundle's compressed graph on the reference interpreter against the fp32 model, fresh inputs
    graph = bundle.graph()
    for (x,) in _batches(2, seed=7):
        got = Interpreter(graph).run(x)[0]
        cos = torch.nn.functional.cosine_similarity(got.flatten(), model(x).detach().flatten(), dim=0)
        assert cos > 0.99, cos


def _hf_model(name: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "resnet":
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
        return transformers.ResNetModel(config)
    return transformers.MobileNetV2Model(transformers.MobileNetV2Config(depth_multiplier=0.25, image_size=32))


@pytest.mark.parametrize("name", ["resnet", pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_random_init_hf_vision_models_build_with_palettize_4(tmp_path, name):
    # both return a ModelOutput; ResNet's shortcut is a 1x1 conv + BN, MobileNetV2's depthwise convs + BN
    bundle = _compile(_hf_model(name), tmp_path, shape=(1, 3, 32, 32))
    m = bundle.manifest
    assert m["backend"]["entry"]["verify"]["missing"]          # small conv weights fused with their BN
    assert any(w["op_types"][0] == "constexpr_lut_to_dense" for w in m["backend"]["entry"]["verify"]["weights"])
    # 16-entry palettes of random-init weights: close to the fp32 model, not equal to it
    assert m["numerics"]["fidelity_vs_fp32"]["cosine_min"] > 0.95
    assert nf.verify(bundle.path)["passed"]

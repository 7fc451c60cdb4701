"""Issue 21's architectures on the FPGA target: tiny random-init configs (tests/architectures.py)
compiled for alveo-u280 with ``w8`` build, verify, match the fp32 reference within the bundle's
tolerance, and their C-simulation equals the bit-accurate emulation on fresh inputs: the language
models, the mixture-of-experts Mixtral, and the convolutional networks at their example's static
shapes.

Causal LMs are wrapped in ``Logits`` so that they trace as one stateless graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nnforge as nf
from nnforge.ir.interpreter import Interpreter
from nnforge.numerics import BACKEND_TOLERANCE, compare, within
from tests.architectures import ARCHITECTURES, Logits


@pytest.fixture
def hls_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NNFORGE_HLS_CACHE", str(tmp_path / "hls-cache"))


def _compile(name: str, out, **kwargs):
    arch = ARCHITECTURES[name]
    model = arch.build()
    if arch.kind == "decoder":
        model = Logits(model)
    x = arch.inputs(batch=1, size=arch.sizes[0], seed=0)
    return nf.compile(model, "alveo-u280", "w8", example_inputs=x, input_names=list(arch.input_names),
                      out=out, progress=False, **kwargs), arch


def _builds_verifies_and_simulates_bit_exactly(name, out, **kwargs):
    """The bundle's C-simulation, within tolerance of the fp32 reference at compile time, equals the
    bit-accurate emulation on fresh inputs; returns the runner."""
    bundle, arch = _compile(name, out, **kwargs)
    num = bundle.manifest["numerics"]
    assert num["backend_vs_reference"]["cosine_min"] >= num["tolerance"]["cosine_min"]
    nf.verify(bundle.path)
    runner = nf.load(bundle.path)
    xs = [t.numpy() for t in arch.inputs(batch=1, size=arch.sizes[0], seed=3)]
    got, emulated = runner.run_numpy(xs), runner.emulate(xs)
    assert all(np.array_equal(a, b) for a, b in zip(got, emulated))
    return runner


# both under -m slow: a decoder's attention, cache and rope run on hls in tests/backends/hls/test_decoder.py
@pytest.mark.parametrize("name", [pytest.param("llama", marks=pytest.mark.slow), pytest.param("gpt2", marks=pytest.mark.slow)])
def test_language_models_build_verify_and_simulate_bit_exactly(name, tmp_path, hls_cache):
    runner = _builds_verifies_and_simulates_bit_exactly(name, tmp_path / name)
    kinds = {type(layer).__name__ for layer in runner.plan.layers}
    assert {"Norm", "Lut"} <= kinds                    # the norms and the activation are one template each
    if name == "llama":                                # rotate_half: slice + neg + concat
        assert {"Neg", "Concat"} <= kinds and not {"PowInt", "Rsqrt"} & kinds


# the convolution each network brings: a strided 7x7 stem, 3x3 and 1x1 convs with batch norm and
# max pooling (ResNet); an 8x8 stride-8 patch embedding (ViT); two conv1d, the second strided
# (Whisper); depthwise 3x3 after TF-style padding, relu6 (MobileNetV2); a 4x4 stride-4 stem,
# depthwise 7x7, 2x2 stride-2 downsampling (ConvNeXt)
CONV_NETS = {"resnet": {"MaxPool"}, "vit": set(), "whisper_encoder": set(), "mobilenet_v2": {"Clamp"},
             "convnext": set()}


@pytest.mark.parametrize("name", [n if n == "resnet" else pytest.param(n, marks=pytest.mark.slow) for n in CONV_NETS])
def test_convolutional_networks_build_verify_and_simulate_bit_exactly(name, tmp_path, hls_cache):
    runner = _builds_verifies_and_simulates_bit_exactly(name, tmp_path / name, dynamic_shapes="static")
    kinds = {type(layer).__name__ for layer in runner.plan.layers}
    assert {"Conv"} | CONV_NETS[name] <= kinds
    convs = [layer for layer in runner.plan.layers if type(layer).__name__ == "Conv"]
    if name in ("mobilenet_v2", "convnext"):
        assert any(c.groups > 1 and c.groups == c.shape[1] for c in convs)          # depthwise
    if name == "whisper_encoder":
        assert all(c.shape[2] == 1 for c in convs) and {c.stride for c in convs} == {(1, 1), (1, 2)}


@pytest.mark.slow
def test_mixtral_routes_like_the_reference_and_simulates_bit_exactly(tmp_path, hls_cache):
    """Top-2 of 4 experts per token, the argsort of the choices, the per-expert counts and the
    scatter back: every bundle output within the runtime check's tolerance of the reference
    interpreter on fresh inputs, with the experts it picks equal to the reference's."""
    runner = _builds_verifies_and_simulates_bit_exactly("mixtral", tmp_path / "mixtral", dynamic_shapes="static")
    kinds = {type(layer).__name__ for layer in runner.plan.layers}
    assert {"TopK", "Cumsum", "Floor", "TakeRows", "GatherAxis", "ScatterRows"} <= kinds
    arch, graph = ARCHITECTURES["mixtral"], runner.graph
    routers = [n.output.name for n in graph.nodes if n.op == "topk_indices" and n.attrs["largest"]]
    assert len(routers) == 2                           # one per layer
    for seed in (4, 5, 6):
        ids = arch.inputs(batch=1, size=arch.sizes[0], seed=seed)[0]
        picked = {}
        want = Interpreter(graph).run(ids, capture=lambda n, outs: picked.update({n.output.name: outs[0]}))
        got = runner.run_numpy([ids.numpy()])
        assert within(compare([torch.from_numpy(g) for g in got], want), BACKEND_TOLERANCE), seed
        env = runner.plan.emulate_env([ids.numpy()])
        for v in routers:
            assert np.array_equal(env[v], picked[v].numpy().reshape(-1)), (seed, v)

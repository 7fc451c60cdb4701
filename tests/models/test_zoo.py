"""The zoo models compile for the onnx target and the bundle matches the torch model on inputs of
another shape than the example the model was traced with."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nnforge as nf
from nnforge.models import ZOO, zoo_model


def rowwise_cosine(a, b) -> torch.Tensor:
    a = torch.as_tensor(np.asarray(a)).double()
    b = torch.as_tensor(np.asarray(b)).double()
    return torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)


def compile_zoo(name, out):
    model, example, dyn, ins, outs = zoo_model(name)
    bundle = nf.compile(model, "onnx", example_inputs=example, dynamic_shapes=dyn, input_names=ins,
                        output_names=outs, out=out)
    return model, example, bundle


def test_zoo_names():
    assert {"minilm", "resnet18", "llama"} <= set(ZOO)
    with pytest.raises(KeyError, match="resnet18"):
        zoo_model("alexnet")


def test_resnet18_has_torchvisions_layout():
    """torchvision itself cannot be imported beside CPU torch 2.13 here (its wheel's C ops need
    CUDA), so the zoo carries the architecture; its state dict must line up with torchvision's."""
    model = zoo_model("resnet18")[0]
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512       # torchvision's figure
    assert len(sd) == 122
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.conv2.weight"].shape == (512, 512, 3, 3) and sd["fc.weight"].shape == (1000, 512)


@pytest.mark.slow  # a second whole resnet18 compile, at another batch
def test_resnet18_other_batch(tmp_path):
    model, example, bundle = compile_zoo("resnet18", tmp_path / "resnet18")
    m = bundle.manifest
    assert m["signature"]["inputs"][0]["shape"] == ["batch", 3, 224, 224]
    assert m["signature"]["outputs"][0]["shape"] == ["batch", 1000]
    assert example[0].shape[0] == 2
    ops = {layer["op"] for layer in m["compression"]["layers"]}
    assert ops == {"conv", "linear"} and len(m["compression"]["layers"]) == 21      # 20 convs + fc
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        want = model(x)
    got = nf.load(bundle.path)(x)
    assert got.shape == (3, 1000)
    cos = rowwise_cosine(got, want)
    assert float(cos.min()) >= 0.99999, cos
    assert float((got - want).abs().max()) <= 1e-3 * float(want.abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # batch of one as numpy
    got1 = nf.load(bundle.path)(x[:1].numpy())
    assert isinstance(got1, np.ndarray) and got1.shape == (1, 1000)
    assert float(rowwise_cosine(got1, want[:1]).min()) >= 0.99999


def test_llama_other_sequence_length(tmp_path):
    model, example, bundle = compile_zoo("llama", tmp_path / "llama")
    m = bundle.manifest
    assert m["signature"]["inputs"][0]["shape"] == [1, "seq"]
    assert m["signature"]["outputs"][0]["shape"] == [1, "seq", 1024]
    assert example[0].shape == (1, 16)
    runner = nf.load(bundle.path)
    gen = torch.Generator().manual_seed(7)
    for seq in (5, 37):
        ids = torch.randint(0, 1024, (1, seq), generator=gen)
        with torch.no_grad():
            want = model(ids)
        got = runner(ids)
        assert got.shape == (1, seq, 1024)
        cos = rowwise_cosine(got, want)                 # per token
        assert float(cos.min()) >= 0.99999, cos
        assert float((got - want).abs().max()) <= 1e-3 * float(want.abs().max())
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    # causality survives lowering: a later token does not change earlier logits
    ids = torch.randint(0, 1024, (1, 12), generator=gen)
    a, b = runner(ids), runner(torch.cat([ids, torch.tensor([[3]])], dim=1))
    torch.testing.assert_close(a, b[:, :12], rtol=1e-4, atol=1e-4)

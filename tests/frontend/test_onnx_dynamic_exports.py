"""ONNX files torch exports with dynamic batch and sequence axes import, compile for onnx and
match the torch model at sizes other than the example's."""
import pytest
import torch

import nnforge as nf
from nnforge.frontend import FrontendError
from nnforge.frontend.onnx_import import from_onnx

transformers = pytest.importorskip("transformers")


class _Bert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100)
        self.m = transformers.BertModel(cfg).eval()

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _inputs(b, t):
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -1] = 0
    return torch.randint(0, 100, (b, t)), mask


def test_legacy_bert_export_with_shapes_used_as_data(tmp_path):
    """The legacy exporter writes Expand targets as Where(Equal(shape, -1), 1, shape) and the
    attention mask from Range over the sequence length: both stay symbolic."""
    model = _Bert().eval()
    names = ["input_ids", "attention_mask"]
    path = tmp_path / "bert.onnx"
    torch.onnx.export(model, _inputs(2, 8), str(path), dynamo=False, input_names=names, output_names=["out"],
                      opset_version=17, dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + ["out"]})
    assert from_onnx(path).outputs[0].shape == ("batch", "seq", 32)
    runner = nf.compile(path, "onnx", example_inputs=_inputs(2, 8), out=tmp_path / "bundle").load()
    for b, t in [(3, 5), (1, 11)]:
        x = _inputs(b, t)
        torch.testing.assert_close(runner(*x), model(*x), atol=1e-4, rtol=1e-4)


def test_dynamo_export_with_a_batch_of_one_is_refused_naming_the_output(tmp_path):
    """With a batch-1 example torch.export fixes the batch (its Reshape targets start with 1) while
    the file's input still says 'batch': the declared output gives it away."""
    from tests.architectures import Logits
    from tests.frontend.decoders.families import tiny_model
    model = Logits(tiny_model("llama")).eval()
    path = tmp_path / "llama.onnx"
    axes = {"input_ids": {0: "batch", 1: "seq"}, "out": {0: "batch", 1: "seq"}}
    torch.onnx.export(model, (torch.randint(3, 100, (1, 8)),), str(path), dynamo=True, input_names=["input_ids"],
                      output_names=["out"], dynamic_axes=axes, verbose=False)
    with pytest.raises(FrontendError) as info:
        nf.compile(path, "onnx", example_inputs=(torch.randint(3, 100, (1, 8)),), out=tmp_path / "bundle")
    msg = str(info.value)
    assert "graph output out is declared [1, seq, 128] but the imported graph computes [batch, " in msg
    assert "fixed axis 0" in msg and "sizes of at least 2" in msg
    assert not (tmp_path / "bundle").exists()

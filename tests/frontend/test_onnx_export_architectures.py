"""torch.onnx.export of each of the twelve architectures of tests/architectures.py, with the dynamo
exporter and the legacy one and dynamic axes (the batch, and the sequence or image size where the
architecture has a free axis), imports with nf.compile(path, "onnx", "fp32") and matches torch and
ONNX Runtime on the original file at two sizes other than the example's.

The example has a batch of 2: torch specialises a dynamic axis whose example size is 1 (the import
refuses such a file, see test_onnx_import.py).
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import nnforge as nf
from tests.architectures import ARCHITECTURES, Architecture, Logits

pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

EXAMPLE_BATCH = 2
CHECK_BATCHES = (3, 1)


class LogitsWithMask(Logits):
    """Logits with an all-ones attention mask made inside forward: without a mask, transformers'
    mask code looks for packed sequences with torch.diff, which the legacy exporter cannot export."""

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


# (architecture, exporter) -> why torch's exporter, not nnforge, cannot write the file. Once it can,
# Mixtral's routing ops (TopK, scatter, one-hot) are issue 21 item 1, which another change adds.
EXPORT_FAILS = {
    ("phi3", "legacy"): "the legacy exporter has no aten::copy, which this Phi-3 config's traced graph holds",
    ("mixtral", "legacy"): "the legacy exporter has no aten::histc, which Mixtral's expert routing calls",
    ("mixtral", "dynamo"): "the dynamo exporter has no ONNX function for transformers' grouped_mm_fallback "
                           "(Mixtral's experts)",
}
# (architecture, exporter) -> why the exporter fixes the image size: only the batch stays free
FIXED_SIZE = {
    ("mobilenet_v2", "dynamo"): "torch.export specialises the image size: MobileNetV2's TF-style padding "
                                "reads int(features.shape[-2])",
}


def _model(arch: Architecture, exporter: str) -> torch.nn.Module:
    model = arch.build()
    if arch.kind == "decoder":
        model = Logits(model).eval()
    if exporter == "legacy" and isinstance(model, Logits):
        model = LogitsWithMask(model.lm).eval()
    return model


def _free_axes(arch: Architecture, x: torch.Tensor, free_size: bool) -> dict[int, str]:
    if not free_size:
        return {0: "batch"}
    return {0: "batch", 1: "seq"} if x.dim() == 2 else {0: "batch", 2: "height", 3: "width"}


def _export(model, arch: Architecture, exporter: str, free_size: bool, path) -> tuple:
    x = arch.inputs(batch=EXAMPLE_BATCH, size=arch.sizes[0], seed=0)
    axes = {n: _free_axes(arch, t, free_size) for n, t in zip(arch.input_names, x)}
    names = list(arch.input_names)
    if exporter == "legacy":
        torch.onnx.export(model, x, str(path), dynamo=False, input_names=names, output_names=["out"],
                          opset_version=17, dynamic_axes=axes)
        return x
    dims: dict[str, torch.export.Dim] = {}
    shapes = tuple({axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in a.items()}
                   for a in axes.values())
    params = inspect.signature(model.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):     # forward(*inputs): one entry for the tuple
        shapes = (shapes,)
    torch.onnx.export(model, x, str(path), dynamo=True, input_names=names, output_names=["out"],
                      dynamic_shapes=shapes, verbose=False)
    return x


def _check_sizes(arch: Architecture, free_size: bool) -> list[tuple[int, int]]:
    sizes = arch.sizes[1:3] if free_size and len(arch.sizes) > 2 else (arch.sizes[0],) * 2
    return list(zip(CHECK_BATCHES, sizes))


def _ort(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# In the default run: a decoder, an encoder with a mask and a CNN, with both exporters; the rest under -m slow.
DEFAULT_RUN = {"llama", "bert", "resnet"}


def _cases():
    for name in ARCHITECTURES:
        for exporter in ("dynamo", "legacy"):
            why = EXPORT_FAILS.get((name, exporter))
            marks = [pytest.mark.xfail(raises=torch.onnx.OnnxExporterError, reason=why, strict=False)] if why else []
            if name not in DEFAULT_RUN:
                marks.append(pytest.mark.slow)
            yield pytest.param(name, exporter, id=f"{name}-{exporter}", marks=marks)


@pytest.mark.parametrize("name, exporter", list(_cases()))
def test_exported_onnx_imports_compiles_and_matches(tmp_path, name, exporter):
    arch = ARCHITECTURES[name]
    model = _model(arch, exporter)
    free_size = len(arch.sizes) > 1 and (name, exporter) not in FIXED_SIZE
    path = tmp_path / f"{name}.onnx"
    x = _export(model, arch, exporter, free_size, path)
    runner = nf.compile(path, "onnx", "fp32", example_inputs=x, out=tmp_path / "bundle").load()
    session = _ort(path)
    for batch, size in _check_sizes(arch, free_size):
        xi = arch.inputs(batch=batch, size=size, seed=1)
        with torch.no_grad():
            want = model(*xi)
        got = runner(*xi)
        (onnx_out,) = session.run(None, {n: t.numpy() for n, t in zip(arch.input_names, xi)})
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{batch=} {size=} vs torch: {m}")
        np.testing.assert_allclose(got.numpy(), onnx_out, atol=1e-4, rtol=1e-4,
                                   err_msg=f"{batch=} {size=} vs ONNX Runtime on the original file")


@pytest.mark.slow
@pytest.mark.parametrize("name, exporter", list(FIXED_SIZE))
def test_exporter_fixes_the_image_size(tmp_path, name, exporter):
    """The cases above check only the batch here: this notices when torch stops fixing the size."""
    import onnx
    arch = ARCHITECTURES[name]
    path = tmp_path / f"{name}.onnx"
    _export(_model(arch, exporter), arch, exporter, True, path)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims][2:] == [32 * arch.sizes[0]] * 2

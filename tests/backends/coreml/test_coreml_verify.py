"""verify_package: a package built from a graph passes; a changed weight or a missing op fails by name."""
import pytest
import torch

ct = pytest.importorskip("coremltools")

from nnforge.backends.coreml.verify import CoreMLVerifyError, verify_package  # noqa: E402
from nnforge.backends.coreml.weights import emit_weight, mil_name  # noqa: E402
from nnforge.ir import Graph, tensor  # noqa: E402
from nnforge.ir.encodings import Dense, IntQuant  # noqa: E402

OP_MAP = {"linear": ("linear",), "relu": ("relu",)}


def _graph():
    g = Graph("tiny")
    x = g.add_input("x", tensor("f32", 2, 32))
    w1 = g.add_weight("fc1.weight", IntQuant.quantize(torch.randn(16, 32), 4, group_size=16,
                                                      scale_dtype=torch.float16))
    w2 = g.add_weight("fc2.weight", Dense(torch.randn(8, 16)))
    h = g.op("relu", g.op("linear", x, w1, None, name="fc1"))
    g.set_outputs([g.op("linear", h, w2, None, name="fc2")])
    return g


def _package(g, tmp_path, tamper=False):
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    used = set()
    names = {n: mil_name(n, used) for n in g.weights}

    @mb.program(input_specs=[mb.TensorSpec((2, 32), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        w1, _, _ = emit_weight(g.weights["fc1.weight"].encoding, names["fc1.weight"])
        enc2 = g.weights["fc2.weight"].encoding
        w2, _, _ = emit_weight(Dense(enc2.data * (1.5 if tamper else 1.0)), names["fc2.weight"])
        return mb.linear(x=mb.relu(x=mb.linear(x=x, weight=w1)), weight=w2)

    m = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                   skip_model_load=True, compute_precision=ct.precision.FLOAT16)
    path = str(tmp_path / "m.mlpackage")
    m.save(path)
    return path


def test_verify_passes(tmp_path):
    g = _graph()
    report = verify_package(_package(g, tmp_path), g, OP_MAP)
    by = {w.name: w for w in report.weights}
    assert by["fc1.weight"].op_types == ["constexpr_blockwise_shift_scale", "const", "const"]
    assert by["fc1.weight"].nbytes < by["fc1.weight"].dense_fp16_bytes / 3
    assert report.ops_checked == 3 and not report.missing


def test_verify_names_changed_weight(tmp_path):
    g = _graph()
    with pytest.raises(CoreMLVerifyError, match=r"weight 'fc2.weight' .* values differ"):
        verify_package(_package(g, tmp_path, tamper=True), g, OP_MAP)


def test_verify_names_missing_op(tmp_path):
    g = _graph()
    path = _package(g, tmp_path)
    with pytest.raises(CoreMLVerifyError, match=r"node fc1 \(linear\): expected MIL op 'gelu'"):
        verify_package(path, g, {**OP_MAP, "linear": ("linear", "gelu")})
    with pytest.raises(CoreMLVerifyError, match="no entry for IR op"):
        verify_package(path, g, {"linear": ("linear",)})


def test_verify_names_the_layer_of_a_compressed_weight_the_package_lost(tmp_path):
    g = _graph()
    path = _package(g, tmp_path)
    names = {"fc1.weight": "fc1_weight_elsewhere", "fc2.weight": "fc2_weight"}
    with pytest.raises(CoreMLVerifyError, match=r"weight 'fc1.weight' of layer fc1 \(linear\).*not in the "
                                                r"saved package.*report it"):
        verify_package(path, g, OP_MAP, names=names)


def test_verify_accepts_a_plain_const_coremltools_folded_away(tmp_path):
    # a compressed weight that emit_weight stored as a plain fp16 const (the lowering says so in
    # ``plain``) may be folded into another constant by coremltools, like a Dense one
    g = _graph()
    path = _package(g, tmp_path)
    names = {"fc1.weight": "fc1_weight_folded", "fc2.weight": "fc2_weight"}
    report = verify_package(path, g, OP_MAP, names=names, plain={"fc1.weight", "fc2.weight"})
    assert report.missing == ["fc1.weight"] and [w.name for w in report.weights] == ["fc2.weight"]

"""Activation quantisation (int8, uint8, FP8) and SmoothQuant: equivalence, calibrated scales,
shared quantisers for layers reading one value, layer_norm folding, the onnx backend, and errors."""
from __future__ import annotations

import pytest
import torch

import nnforge as nf
from nnforge.ir import Dense, Graph, run_graph, tensor
from nnforge.passes import PassContext, PassError, PassManager
from nnforge.passes.quantize import QuantizeActivations, QuantizeRTN, SmoothQuant


def attention_like(post_ln_residual: bool):
    """layer_norm -> three linears reading its output (Q/K/V-like); optionally the layer_norm's
    output also feeds a residual add (post-LN BERT), which blocks folding."""
    gen = torch.Generator().manual_seed(0)
    g = Graph("blk")
    x = g.add_input("x", tensor("f32", "batch", 32))
    gamma = g.add_weight("ln.weight", Dense(torch.rand(32, generator=gen) + 0.5))
    beta = g.add_weight("ln.bias", Dense(torch.randn(32, generator=gen) * 0.1))
    h = g.op("layer_norm", x, gamma, beta, name="ln")
    outs = []
    for name in ("q", "k", "v"):
        w = g.add_weight(f"{name}.weight", Dense(torch.randn(16, 32, generator=gen) * 0.2))
        outs.append(g.op("linear", h, w, None, name=name))
    y = g.op("add", g.op("add", outs[0], outs[1]), outs[2])
    if post_ln_residual:
        y = g.op("concat", y, h, axis=-1)
    g.set_outputs([y])
    return g


def outlier_batches(n=4, seed=1):
    """Inputs whose channels 3 and 17 are 30x larger, like transformer activation outliers."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(24, 32, generator=gen)
        x[:, [3, 17]] *= 30
        out.append((x,))
    return out


@pytest.mark.parametrize("residual", [False, True])
def test_smooth_quant_keeps_the_function(residual):
    g = attention_like(residual)
    calib = outlier_batches()
    s = SmoothQuant(alpha=0.5)(g.copy(), PassContext(calibration=calib))
    for b in outlier_batches(2, seed=7):
        torch.testing.assert_close(run_graph(s, b)[0], run_graph(g, b)[0], rtol=1e-4, atol=1e-4)
    muls = [n for n in s.nodes if n.op == "mul"]
    # folded into the layer_norm when the linears are its only readers, else one shared multiply
    assert len(muls) == (1 if residual else 0)
    if not residual:
        assert not torch.equal(s.weights["ln.weight"].encoding.data, g.weights["ln.weight"].encoding.data)


def act_error(q, g, batches):
    return max(float((run_graph(q, b)[0] - run_graph(g, b)[0]).norm() / run_graph(g, b)[0].norm()) for b in batches)


def test_smooth_quant_helps_int8_activations_with_outliers():
    g = attention_like(False)
    calib, held = outlier_batches(), outlier_batches(2, seed=9)
    plain = PassManager([QuantizeRTN(format="int8"), QuantizeActivations(format="int8")])
    smooth = PassManager([SmoothQuant(alpha=0.5), QuantizeRTN(format="int8"), QuantizeActivations(format="int8")])
    e_plain = act_error(plain.run(g, PassContext(calibration=calib)), g, held)
    e_smooth = act_error(smooth.run(g, PassContext(calibration=calib)), g, held)
    assert e_smooth < 0.7 * e_plain


@pytest.mark.parametrize("fmt", ["int8", "uint8", "int4", "e4m3", "e5m2"])
def test_static_scales_come_from_calibration(fmt):
    g = attention_like(False)
    calib = outlier_batches()
    q = QuantizeActivations(format=fmt)(g.copy(), PassContext(calibration=calib))
    fqs = [n for n in q.nodes if n.op == "fake_quant"]
    assert len(fqs) == 1                                   # q, k and v share one quantiser
    assert all(n.inputs[0] is fqs[0].output for n in q.nodes if n.op == "linear")
    amax = max(float(run_graph_value(g, b, "ln").abs().max()) for b in calib)
    a = fqs[0].attrs
    if fmt == "int8":
        assert a["scale"] == pytest.approx(amax / 127, rel=1e-5) and a["zero_point"] == 0
    elif fmt == "int4":
        assert a["scale"] == pytest.approx(amax / 7, rel=1e-5) and a["zero_point"] == 0
    elif fmt == "e4m3":
        assert a["scale"] == pytest.approx(amax / 448, rel=1e-5)
    elif fmt == "uint8":
        assert 0 < a["zero_point"] < 255
    # in range, the round trip error is at most half a step (int) or 2^-4 relative (e4m3)
    b = outlier_batches(1, seed=5)[0]
    assert act_error(q, g, [b]) < (0.5 if fmt == "int4" else 0.08)


def run_graph_value(g, batch, node_name):
    seen = {}
    from nnforge.ir import Interpreter
    Interpreter(g).run(*batch, capture=lambda n, outs: seen.setdefault(n.name, outs[0]))
    return seen[node_name]


@pytest.mark.parametrize("recipe", ["w8a8", "fp8-w8a8"])
def test_w8a8_presets_compile_and_run_in_onnx_runtime(tmp_path, recipe):
    model = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 8)).eval()
    calib = outlier_batches()
    bundle = nf.compile(model, "onnx", recipe, example_inputs=calib[0], calibration=calib, out=tmp_path / "b")
    m = bundle.manifest
    assert m["numerics"]["runtime_checked"] is True
    x = outlier_batches(1, seed=11)[0][0]
    got = torch.as_tensor(nf.load(bundle.path)(x.numpy()))
    torch.testing.assert_close(got, run_graph(bundle.graph(), [x])[0], rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        want = model(x)
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=-1).min()) > 0.99


def test_errors_are_clear():
    with pytest.raises(PassError, match="unknown activation format 'int3'"):
        QuantizeActivations(format="int3")
    with pytest.raises(PassError, match="group_size and clip shape dynamic scales; static int4"):
        QuantizeActivations(format="int4", group_size=32)
    with pytest.raises(PassError, match="nvfp4 scales blocks of 16 channels, not 32"):
        QuantizeActivations(format="nvfp4", group_size=32)
    with pytest.raises(PassError, match="group_size and clip shape dynamic scales; static int8"):
        QuantizeActivations(format="int8", clip=0.9)
    with pytest.raises(PassError, match=r"clip must be in \(0, 1\], got 1.5"):
        QuantizeActivations(format="int4", dynamic=True, clip=1.5)
    with pytest.raises(PassError, match="alpha must be in"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(PassError, match="needs calibration"):
        QuantizeActivations()(attention_like(False), PassContext())


def test_auto_alpha_beats_no_smoothing_and_keeps_the_function():
    calib, held = outlier_batches(), outlier_batches(2, seed=9)
    g = attention_like(True)
    s = SmoothQuant()(g.copy(), PassContext(calibration=calib))
    for b in held:
        torch.testing.assert_close(run_graph(s, b)[0], run_graph(g, b)[0], rtol=1e-4, atol=1e-4)
    g = attention_like(False)
    plain = PassManager([QuantizeRTN(format="int8"), QuantizeActivations(format="int8")])
    auto = PassManager([SmoothQuant(), QuantizeRTN(format="int8"), QuantizeActivations(format="int8")])
    e_plain = act_error(plain.run(g, PassContext(calibration=calib)), g, held)
    e_auto = act_error(auto.run(g, PassContext(calibration=calib)), g, held)
    assert e_auto < 0.7 * e_plain                      # on rows the calibration never saw
    alphas = [r.figures["alpha"] for r in auto.records if r.name == "smooth_quant"][0]
    assert set(alphas) == {"q"} and alphas["q"] is not None and 0 <= alphas["q"] <= 1


def one_linear(w):
    g = Graph("one")
    x = g.add_input("x", tensor("f32", "batch", w.shape[1]))
    g.set_outputs([g.op("linear", x, g.add_weight("fc.weight", Dense(w)), None, name="fc")])
    return g


def test_auto_alpha_is_never_worse_than_leaving_the_layer_alone():
    # no activation outliers, weights with one large input column
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 32, generator=gen) * 0.1
    w[:, 5] *= 20
    g = one_linear(w)
    calib = [(torch.randn(64, 32, generator=gen),) for _ in range(4)]
    plain = PassManager([QuantizeRTN(format="int8"), QuantizeActivations(format="int8")])
    auto = PassManager([SmoothQuant(), QuantizeRTN(format="int8"), QuantizeActivations(format="int8")])
    e_plain = act_error(plain.run(g, PassContext(calibration=calib)), g, calib)
    e_auto = act_error(auto.run(g, PassContext(calibration=calib)), g, calib)
    assert e_auto <= e_plain * 1.001


def test_auto_alpha_leaves_a_layer_alone_when_nothing_is_gained():
    # a dead input: every candidate is exact, and the first (no smoothing) is kept
    g = one_linear(torch.randn(16, 32))
    pm = PassManager([SmoothQuant()])
    out = pm.run(g, PassContext(calibration=[(torch.zeros(8, 32),)]))
    assert [r.figures["alpha"] for r in pm.records if r.name == "smooth_quant"] == [{"fc": None}]
    assert not any(n.op == "mul" for n in out.nodes)
    assert torch.equal(out.weights["fc.weight"].encoding.data, g.weights["fc.weight"].encoding.data)


def test_smooth_quant_option_errors():
    with pytest.raises(PassError, match="alpha must be in \\[0, 1\\] or 'auto'"):
        SmoothQuant(alpha="best")
    with pytest.raises(PassError, match="weight_format: unknown weight format 'int9x'"):
        SmoothQuant(weight_format="int9x")
    with pytest.raises(PassError, match="unknown activation format 'int3'"):
        SmoothQuant(act_format="int3")
    with pytest.raises(PassError, match="sample_rows must be an integer >= 16"):
        SmoothQuant(sample_rows=4)


def test_w8a8_bundle_with_3d_activations_loads_and_is_checked(tmp_path):
    # linears on [batch, seq, features]: the onnx lowering flattens them with Flatten (ONNX
    # Runtime's QDQ propagation breaks int8 Quantize/DequantizeLinear across a Reshape)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 8)).eval()
    calib = [(torch.randn(4, 6, 32) * 3,) for _ in range(4)]
    bundle = nf.compile(model, "onnx", "w8a8", example_inputs=calib[0], calibration=calib, out=tmp_path / "b")
    n = bundle.manifest["numerics"]
    assert n["runtime_checked"] is True
    if "check" in n:            # rounding flips made it fall back to the fp32-distance check
        assert "activations are rounded at run time" in n["check"]
    x = torch.randn(4, 6, 32) * 3
    got = torch.as_tensor(nf.load(bundle.path)(x.numpy()))
    with torch.no_grad():
        assert float(torch.nn.functional.cosine_similarity(got, model(x), dim=-1).min()) > 0.98


def test_runtime_drift_beyond_rounding_is_an_error(tmp_path, monkeypatch):
    from nnforge.backends.base import BackendError
    from nnforge.backends.onnx import OnnxRunner
    real = OnnxRunner.run_numpy
    monkeypatch.setattr(OnnxRunner, "run_numpy", lambda self, inputs: [-y for y in real(self, inputs)])
    model = torch.nn.Sequential(torch.nn.Linear(32, 8)).eval()
    calib = outlier_batches()
    with pytest.raises(BackendError, match="drifts from fp32 further than rounding explains"):
        nf.compile(model, "onnx", "w8a8", example_inputs=calib[0], calibration=calib, out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_dynamic_activations_need_no_calibration_and_share_one_quantiser_per_value():
    g = attention_like(post_ln_residual=False)
    out = QuantizeActivations(format="int8", dynamic=True)(g.copy(), PassContext())
    quants = [n for n in out.nodes if n.op == "dynamic_quant"]
    assert len(quants) == 1 and quants[0].attrs == {"format": "int8", "group": 0, "clip": 1.0, "global_scale": 0.0}
    assert all(n.inputs[0] is quants[0].output for n in out.nodes if n.op == "linear")
    x = outlier_batches(1)[0][0]
    got, want = run_graph(out, [x])[0], run_graph(g, [x])[0]
    assert float((got - want).norm() / want.norm()) < 0.02


def test_nvfp4_activations_calibrate_their_tensor_scale():
    g = attention_like(post_ln_residual=False)
    with pytest.raises(PassError, match="quantize_activations needs calibration data"):
        QuantizeActivations(format="nvfp4")(g.copy(), PassContext())
    ctx = PassContext(calibration=outlier_batches())
    ctx.current = "quantize_activations"
    out = QuantizeActivations(format="nvfp4")(g.copy(), ctx)
    (quant,) = [n for n in out.nodes if n.op == "dynamic_quant"]
    scale = ctx.figures["quantize_activations"]["scales"]["q"]
    assert quant.attrs["global_scale"] == pytest.approx(scale) and 0 < scale
    dynamic = QuantizeActivations(format="nvfp4", dynamic=True)
    assert not dynamic.needs_calibration
    assert dynamic(g.copy(), PassContext()).nodes[1].attrs["global_scale"] == 0.0

"""Weight formats, RTN and GPTQ: each format's grid and storage, GPTQ against a plain
column-by-column implementation, GPTQ beating RTN on real calibration, act-order storage, the
onnx backend running every format, and the documented errors."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import lower_into

import nnforge as nf
from nnforge.backends.base import get_backend
from nnforge.ir import Dense, Graph, IntQuant, MiniFloat, run_graph, tensor
from nnforge.ir import minifloat as mf
from nnforge.ir.serialize import save_graph
from nnforge.passes import PassContext, PassError, PassManager, QuantizeGPTQ, QuantizeRTN, resolve_recipe
from nnforge.passes.quantize.formats import MSE_NORM, FormatError, parse_format, quantize_rtn
from nnforge.passes.quantize.gptq import gptq_quantize
from nnforge.targets import get_target

ALL_FORMATS = [("int8", None), ("int4", 32), ("uint4", 32), ("int3", 64), ("uint2", 16), ("e4m3", None),
               ("e5m2", 32), ("e3m2", 32), ("e2m3", None), ("e2m1", 32), ("mxfp8", None), ("mxfp6", None),
               ("mxfp6_e2m3", None), ("mxfp4", None), ("nvfp4", None)]


def weight(rows=24, cols=128, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("spec,gs", ALL_FORMATS)
def test_rtn_codes_lie_on_the_grid_and_storage_is_packed(spec, gs):
    fmt = parse_format(spec, group_size=gs)
    w = weight()
    enc = quantize_rtn(w, fmt)
    d = enc.decode()
    assert d.shape == w.shape
    # packed: bits per weight is the element width plus the scales' share, never a byte per code
    assert enc.codes.shape[1] == (w.shape[1] * fmt.bits + 7) // 8
    assert enc.bits_per_weight == pytest.approx(fmt.bits_per_weight(w.shape[1]) + 0.0, abs=0.3)
    # every decoded weight is a grid point: re-quantising it with the same scales gives the same codes
    idx = torch.arange(w.shape[1]) // enc.group_size
    if isinstance(enc, MiniFloat):
        assert torch.equal(fmt.codes(d, enc.scale_values()[:, idx]), enc.fields())
    else:
        zp = None if enc.zero_point is None else enc.zero_point.to(torch.int64)[:, idx]
        assert torch.equal(fmt.codes(d, enc.scale.float()[:, idx], zp), enc.int_codes())
    # RTN error is at most half a grid step: far below the weights' own spread
    assert float((d - w).norm() / w.norm()) < {8: 0.06, 6: 0.12, 4: 0.2, 3: 0.35, 2: 0.7}[fmt.bits]


def test_int_rtn_is_nearest_point():
    w = weight()
    enc = quantize_rtn(w, parse_format("int4", group_size=32))
    s = enc.scale[:, torch.arange(128) // 32]
    assert float(((enc.decode() - w).abs() - s / 2).max()) <= 1e-6


def test_mx_scales_follow_the_ocp_rule():
    w = weight()
    enc = quantize_rtn(w, parse_format("mxfp4"))
    assert enc.scale.dtype == torch.uint8 and enc.scale.shape == (24, 4) and enc.group_size == 32
    amax = w.abs().reshape(24, 4, 32).amax(-1)
    want = torch.floor(torch.log2(amax)) - 2                     # emax of E2M1 is 2
    assert torch.equal(enc.scale.to(torch.int64) - 127, want.to(torch.int64))


def test_nvfp4_has_two_level_scales():
    enc = quantize_rtn(weight(), parse_format("nvfp4"))
    assert enc.scale_format.short == "e4m3" and enc.global_scale is not None and enc.group_size == 16
    assert "e4m3 scales + fp32 tensor scale" in enc.describe()


@pytest.mark.parametrize("spec,gs", [("int4", 32), ("uint4", 32), ("uint3", 16), ("e2m1", 32), ("nvfp4", None)])
def test_the_mse_observer_never_does_worse_than_minmax_and_clips_heavy_tails(spec, gs):
    """Per group, the searched range leaves no more of the error it minimises (its candidates
    include the full range) and, on heavy-tailed weights, less squared error; the codes still lie
    on the grid."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(24, 128, generator=gen) ** 3 * 0.05            # heavy tails: a few weights set each range
    plain, mse = parse_format(spec, group_size=gs), parse_format(spec, group_size=gs, observer="mse")
    n = plain.group_size or 128

    def group_error(fmt, p):
        d = quantize_rtn(w, fmt).decode()
        return ((d - w).abs() ** p).reshape(24, -1, n).sum(-1)
    assert bool((group_error(mse, MSE_NORM) <= group_error(plain, MSE_NORM) * (1 + 1e-5)).all())
    assert float(group_error(mse, 2).sum()) < 0.97 * float(group_error(plain, 2).sum())
    enc = quantize_rtn(w, mse)
    idx = torch.arange(128) // enc.group_size
    if isinstance(enc, MiniFloat):
        assert torch.equal(mse.codes(enc.decode(), enc.scale_values()[:, idx]), enc.fields())
    else:
        zp = None if enc.zero_point is None else enc.zero_point.to(torch.int64)[:, idx]
        assert torch.equal(mse.codes(enc.decode(), enc.scale.float()[:, idx], zp), enc.int_codes())


def test_gptq_with_the_mse_observer_beats_minmax_on_held_out_inputs():
    g = mlp()
    calib, held = correlated_batches(6), correlated_batches(3, seed=9)
    for w in g.weights.values():                                   # heavy-tailed weights, as trained LLMs have
        w.encoding = Dense(w.encoding.data ** 3 * 400)
    errs = {obs: out_error(QuantizeGPTQ(format="int4", group_size=16, observer=obs)(g.copy(),
                                                                                   PassContext(calibration=calib)),
                           g, held) for obs in ("minmax", "mse")}
    assert errs["mse"] < errs["minmax"]


@pytest.mark.parametrize("spec,msg", [("int9", "2..8"), ("int1", "2..8"), ("uint12", "2..8"),
                                      ("fp5", "unknown weight format 'fp5'"), ("", "unknown weight format")])
def test_bad_formats_are_named(spec, msg):
    with pytest.raises(FormatError, match=msg):
        parse_format(spec)


def test_block_formats_refuse_another_group_size():
    with pytest.raises(FormatError, match="blocks of 32"):
        parse_format("mxfp4", group_size=64)


@pytest.mark.parametrize("opts,msg", [({"bits": 9}, "bits must be an integer in 2..8"),
                                      ({"format": "int4", "bits": 4}, "format or bits"),
                                      ({"format": "float3"}, "unknown weight format"),
                                      ({"format": "int4", "group_size": 0}, "group_size"),
                                      ({"format": "int4", "observer": "max"}, "observer must be one of minmax, mse")])
def test_pass_options_are_checked(opts, msg):
    with pytest.raises(PassError, match=msg):
        QuantizeRTN(**opts)


def mlp(cols=48):
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", cols))
    w1 = g.add_weight("fc1.weight", Dense(weight(64, cols, 1)))
    w2 = g.add_weight("fc2.weight", Dense(weight(16, 64, 2)))
    h = g.op("relu", g.op("linear", x, w1, None, name="fc1"))
    g.set_outputs([g.op("linear", h, w2, None, name="fc2")])
    return g


def test_group_size_not_dividing_a_layer_is_an_error_naming_it():
    with pytest.raises(PassError, match=r"layer fc1 .* 48 input columns.*group_size 32"):
        QuantizeRTN(format="int4", group_size=32)(mlp())
    g = QuantizeRTN(format="int4", group_size=32, ragged_groups=True)(mlp())
    enc = g.weights["fc1.weight"].encoding
    assert enc.scale.shape == (64, 2)                              # 32 + a last group of 16


def correlated_batches(n=6, cols=48, seed=3):
    """Inputs with strongly unequal, correlated features (one fixed distribution; ``seed`` draws
    other samples from it): where GPTQ's error feedback matters."""
    mix = torch.randn(cols, cols, generator=torch.Generator().manual_seed(cols)) * torch.logspace(0, -2, cols)
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, cols, generator=gen) @ mix.T,) for _ in range(n)]


def out_error(g_q, g, batches):
    num = sum(float((run_graph(g_q, b)[0] - run_graph(g, b)[0]).norm() ** 2) for b in batches)
    den = sum(float(run_graph(g, b)[0].norm() ** 2) for b in batches)
    return (num / den) ** 0.5


@pytest.mark.parametrize("spec,gs", [("int4", None), ("uint3", 16), ("e2m1", 16), ("nvfp4", None), ("mxfp4", None)])
def test_gptq_beats_rtn_on_held_out_inputs(spec, gs):
    g = mlp()
    calib, held = correlated_batches(6), correlated_batches(3, seed=9)
    rtn = QuantizeRTN(format=spec, group_size=gs)(g.copy())
    gptq = QuantizeGPTQ(format=spec, group_size=gs)(g.copy(), PassContext(calibration=calib))
    assert out_error(gptq, g, held) < 0.8 * out_error(rtn, g, held)


def reference_gptq(W, H, fmt, damp=0.01):
    """The algorithm as the paper writes it: one column at a time, full updates, no act-order."""
    W = W.clone()
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale, _ = fmt.fit(W.unsqueeze(1))
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        q = fmt.snap(W[:, j], scale[:, 0])
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= err.unsqueeze(1) * Hinv[j, j:].unsqueeze(0)
    return Q


@pytest.mark.parametrize("spec", ["int4", "e4m3"])
def test_lazy_block_updates_equal_the_plain_algorithm(spec):
    fmt = parse_format(spec)
    W = weight(32, 96)
    X = torch.cat([b[0] for b in correlated_batches(4, 96)])
    H = 2 * X.T @ X / X.shape[0]
    enc, _ = gptq_quantize(W, H, fmt, act_order=False, block_size=16)
    torch.testing.assert_close(enc.decode(), reference_gptq(W, H, fmt), rtol=0, atol=2e-6)


def test_act_order_storage():
    W = weight(32, 96)
    X = torch.cat([b[0] for b in correlated_batches(4, 96)])
    H = 2 * X.T @ X / X.shape[0]
    grouped, _ = gptq_quantize(W, H, parse_format("uint4", group_size=32), act_order=True)
    assert isinstance(grouped, IntQuant) and grouped.perm is not None
    assert torch.equal(grouped.perm, torch.argsort(torch.diag(H), descending=True))
    static, _ = gptq_quantize(W, H, parse_format("uint4", group_size=32), act_order=True, static_groups=True)
    per_channel, _ = gptq_quantize(W, H, parse_format("int8"), act_order=True)
    assert static.perm is None and per_channel.perm is None           # original order, no gather needed
    for enc in (grouped, static, per_channel):
        assert float((enc.decode() - W).norm() / W.norm()) < 0.15


@pytest.mark.parametrize("spec,gs", ALL_FORMATS)
def test_onnx_backend_runs_every_format(tmp_path, spec, gs):
    enc = quantize_rtn(weight(16, 128), parse_format(spec, group_size=gs))
    g = Graph("one")
    x = g.add_input("x", tensor("f32", "batch", 128))
    g.set_outputs([g.op("linear", x, g.add_weight("fc.weight", enc), None, name="fc")])
    backend = get_backend("onnx")
    lowered = lower_into(backend, g, "onnx", tmp_path)
    xin = torch.randn(3, 128)
    torch.testing.assert_close(backend.load(tmp_path, lowered.entry)(xin), run_graph(g, [xin])[0],
                               rtol=1e-4, atol=1e-5)
    # FP8 runs as DequantizeLinear of its codes; FP6/FP4 (no ONNX type) widen exactly to integer
    # multiples of their smallest subnormal, and say so; nothing is decoded to floats
    assert not [f for f in lowered.fallbacks if "decoded" in f.action]
    widened = [f.action for f in lowered.fallbacks if "widened exactly" in f.action]
    small = isinstance(enc, MiniFloat) and enc.fmt.short in ("e3m2", "e2m3", "e2m1")
    assert len(widened) == small
    if small:
        want = {"e2m1": "int8 multiples of 0.5", "e2m3": "int8 multiples of 0.125", "e3m2": "int16 multiples of 0.0625"}
        assert want[enc.fmt.short] in widened[0]
        import onnx
        ops = {n.op_type for n in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.node}
        assert "DequantizeLinear" in ops


@pytest.mark.parametrize("spec", ["mxfp4", "nvfp4", "mxfp6"])
def test_widened_minifloats_with_a_short_last_block_and_act_order(tmp_path, spec):
    # 100 columns: MX blocks of 32 end with a block of 4; GPTQ act-order stores a permutation
    W = weight(16, 100)
    X = torch.randn(256, 100, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 100)
    enc, _ = gptq_quantize(W, 2 * X.T @ X / 256, parse_format(spec), act_order=True)
    assert enc.perm is not None
    g = Graph("one")
    x = g.add_input("x", tensor("f32", "batch", 100))
    g.set_outputs([g.op("linear", x, g.add_weight("fc.weight", enc), None, name="fc")])
    backend = get_backend("onnx")
    lowered = lower_into(backend, g, "onnx", tmp_path)
    xin = torch.randn(5, 100)
    torch.testing.assert_close(backend.load(tmp_path, lowered.entry)(xin), run_graph(g, [xin])[0],
                               rtol=1e-4, atol=1e-5)


def test_gptq_with_act_order_groups_through_compile(tmp_path):
    calib = correlated_batches(4)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    bundle = nf.compile(model, "onnx", [{"pass": "quantize_gptq", "format": "uint4", "group_size": 16}],
                        example_inputs=calib[0], calibration=calib, out=tmp_path / "b")
    assert bundle.manifest["numerics"]["runtime_checked"] is True
    runner = nf.load(bundle.path)
    x = correlated_batches(1, seed=5)[0][0]
    got = torch.as_tensor(runner(x.numpy()))
    want = run_graph(bundle.graph(), [x])[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_calibration_errors_are_clear():
    g = mlp()
    with pytest.raises(PassError, match="needs calibration data"):
        QuantizeGPTQ(format="int4")(g.copy(), PassContext())
    with pytest.raises(PassError, match="calibration set is empty"):
        QuantizeGPTQ(format="int4").run(g.copy(), PassContext(calibration=[]))
    with pytest.raises(PassError, match=r"calibration batch 1 does not fit.*input x"):
        QuantizeGPTQ(format="int4")(g.copy(), PassContext(calibration=[(torch.randn(4, 48),), (torch.randn(4, 47),)]))


def test_gptq_presets_need_calibration_through_compile(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(128, 8)).eval()
    with pytest.raises(PassError, match="w4-gptq.*quantize_gptq.*calibration"):
        nf.compile(model, "onnx", "w4-gptq", example_inputs=(torch.randn(2, 128),), out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_presets_resolve():
    for name in ("w8", "w4-rtn", "w4-gptq", "w3-gptq", "fp8", "mxfp4", "nvfp4"):
        _, passes = resolve_recipe(name)
        assert passes and all(p.weight_format for p in passes)
    assert resolve_recipe("w4-gptq")[1][0].weight_format.describe() == "uint4 g128"


def test_w4_gptq_preset_stores_no_permutation(tmp_path):
    # act-order with static groups: codes stay in the original column order, so the onnx bundle
    # is MatMulNBits alone, with no Gather of the activations per call
    import onnx
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    calib = correlated_batches(2, cols=256)
    bundle = nf.compile(model, "onnx", "w4-gptq", example_inputs=calib[0], calibration=calib, out=tmp_path / "b")
    g = bundle.graph()
    assert all(getattr(w.encoding, "perm", None) is None for w in g.weights.values())
    ops = {n.op_type for n in onnx.load(str(bundle.path / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "Gather" not in ops


def test_pass_manager_records_gptq_figures():
    pm = PassManager([QuantizeGPTQ(format="int4", group_size=16)])
    pm.run(mlp(), PassContext(calibration=correlated_batches(2)))
    figs = pm.records[0].figures
    assert figs["layers"] == 2 and set(figs["hessian_weighted_error"]) == {"fc1", "fc2"}


def test_indefinite_hessian_is_a_clear_error():
    # a Hessian no dampening can rescue (negative curvature), for both OBS sweeps
    from nnforge.passes.prune.sparsity import sparsegpt_prune
    W, H = weight(8, 32), -torch.eye(32)
    with pytest.raises(PassError, match="gptq: the Hessian of a 8x32 weight is not positive definite with "
                                        "damping 0.01, 0.1, 1 "):
        gptq_quantize(W, H, parse_format("int4", group_size=16))
    with pytest.raises(PassError, match="sparsegpt: the Hessian of a 8x32 weight is not positive definite"):
        sparsegpt_prune(W, H, "2:4")
    with pytest.raises(PassError, match="gptq: Hessian \\(16, 16\\) does not match 32 input columns"):
        gptq_quantize(W, torch.eye(16), parse_format("int4", group_size=16))

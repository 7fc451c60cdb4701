"""The HLS templates (nnforge/hls/nf_*.h) against their bit-accurate emulation.

One project holds every kernel variant as a separate output of one graph, so g++ runs once for the
module; every output of the C-simulation must equal the emulation bit for bit, on ordinary inputs
and on inputs that saturate, fall off the function tables, or are tiny."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnforge.backends.hls import make_sim, render
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.ir import Dense, Graph, tensor
from nnforge.ir import minifloat
from nnforge.ir.dtypes import dtype
from nnforge.ir.encodings import IntQuant, MiniFloat
from nnforge.ir.interpreter import Interpreter
from nnforge.ir.sparse import Sparse

ROWS, K, N = 4, 64, 32


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    r, c = w.shape
    a = w.abs().reshape(r, -1, m)
    return (a.argsort(-1).argsort(-1) >= m - n).reshape(r, c)


def mx(w: torch.Tensor, fmt: str, block: int = 32) -> MiniFloat:
    """OCP MX-style: ``fmt`` codes with one E8M0 shared exponent per block of ``block`` columns."""
    f = dtype(fmt)
    r, c = w.shape
    e8 = minifloat.e8m0_exponent(w.abs().reshape(r, -1, block).amax(-1), f)          # [r, c / block]
    scale = minifloat.decode(e8, dtype("e8m0"), torch.float32)
    codes = minifloat.encode(w / scale.repeat_interleave(block, dim=1), f)
    return MiniFloat.from_fields(codes, e8, fmt=f, shape=(r, c), group_size=block, scale_format="e8m0")


def per_channel(w: torch.Tensor, fmt: str) -> MiniFloat:
    f = dtype(fmt)
    values = minifloat.decode(torch.arange(1 << f.bits), f, torch.float64)
    top = float(values[torch.isfinite(values)].max())
    scale = w.abs().amax(1, keepdim=True) / top
    return MiniFloat.from_fields(minifloat.encode(w / scale, f), scale, fmt=f, shape=tuple(w.shape))


def kernel_graph() -> Graph:
    torch.manual_seed(0)
    g = Graph("kernels")
    x = g.add_input("x", tensor("f32", ROWS, K))
    y = g.add_input("y", tensor("f32", ROWS, K))
    w = torch.randn(N, K) * 0.1
    outs = [
        g.op("linear", x, g.add_weight("w8", IntQuant.quantize(w, 8, group_size=32)),
             g.add_weight("b8", Dense(torch.randn(N) * 0.1)), name="dense_int8_g32"),
        g.op("linear", x, g.add_weight("w4", IntQuant.quantize(w, 4, group_size=16)), None, name="dense_int4_g16"),
        g.op("linear", x, g.add_weight("w4c", IntQuant.quantize(w, 4)), None, name="dense_int4_channel"),
        g.op("linear", x, g.add_weight("w3", IntQuant.quantize(w, 3, group_size=64, symmetric=False)), None,
             name="dense_int3_asym"),
        g.op("linear", x, g.add_weight("wf", Dense(w)), None, name="dense_fp32"),
    ]
    for n, m, bits in ((2, 4, 4), (2, 4, 8), (1, 4, 8), (1, 4, 4)):
        enc = Sparse.from_mask(w, nm_mask(w, n, m), f"{n}:{m}", lambda v, b=bits: IntQuant.quantize(v, b, group_size=8))
        outs.append(g.op("linear", x, g.add_weight(f"ws{n}{m}_{bits}", enc), None, name=f"sparse{n}{m}_int{bits}"))
    outs += [g.op("linear", x, g.add_weight(f"wmx_{f}", mx(w, f)), None, name=f"mx_{f}") for f in ("e2m1", "e2m3", "e3m2")]
    outs.append(g.op("linear", x, g.add_weight("we4m3", per_channel(w, "e4m3")), None, name="fp8_e4m3_channel"))
    outs.append(g.op("linear", x, g.add_weight("we5m2", per_channel(w, "e5m2")), None, name="fp8_e5m2_fallback"))
    enc = Sparse.from_mask(w, nm_mask(w, 2, 4), "2:4", lambda v: mx(v, "e2m1", 16))
    outs.append(g.op("linear", x, g.add_weight("ws24_e2m1", enc), None, name="sparse24_mxfp4"))
    enc = Sparse.from_mask(w, nm_mask(w, 2, 4), "2:4")                         # float kept values
    outs.append(g.op("linear", x, g.add_weight("ws24f", enc), None, name="sparse24_fp32"))
    outs += [
        g.op("gelu", x, name="gelu"), g.op("gelu", x, name="gelu_tanh", approximate="tanh"),
        g.op("silu", x, name="silu"), g.op("relu", x, name="relu"),
        g.op("softmax", x, name="softmax", axis=-1),
        g.op("layer_norm", x, g.add_weight("ln.w", Dense(torch.rand(K) + 0.5)),
             g.add_weight("ln.b", Dense(torch.randn(K) * 0.1)), name="layer_norm", axis=-1, eps=1e-5),
        g.op("layer_norm", x, name="layer_norm_plain", axis=-1, eps=1e-12),
        g.op("add", x, y, name="add"), g.op("sub", x, y, name="sub"), g.op("mul", x, y, name="mul"),
        g.op("add", x, g.add_weight("pos", Dense(torch.randn(K))), name="add_const_bcast"),
        g.op("div", x, g.add_weight("three", Dense(torch.tensor(3.0))), name="div_const"),
        g.op("matmul", x, g.op("permute", y, name="yt", perm=[1, 0]), name="matmul_act"),
        g.op("slice", x, name="slice", axis=1, start=3, end=40, step=2),
        g.op("expand", g.op("slice", x, name="col0", axis=1, start=0, end=1), name="expand", shape=[2, ROWS, K]),
        g.op("clamp", x, name="clamp", min=-0.5, max=0.75),
    ]
    g.set_outputs(outs)
    return g


def _build(opts: HlsOptions, defines=()):
    g = kernel_graph()
    plan = build_plan(g, opts)
    return g, plan, make_sim(plan, render.sources(plan), defines)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NNFORGE_HLS_CACHE", str(tmp_path_factory.mktemp("hls-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def built(cache):
    """ap_fixed<24, 8> activations; 30-bit scale mantissas push the wide layers past 64-bit sums."""
    return _build(HlsOptions(scale_bits=30))


@pytest.fixture(scope="module")
def built_narrow(cache):
    """9-bit activations: int8 and int4 rows pack two MACs per DSP (WP486); and the dataflow form."""
    return _build(HlsOptions(act_width=9, act_int=4, lut_step_log2=-5, dataflow=True))


def _inputs(kind: str):
    rng = np.random.default_rng({"normal": 1, "large": 2, "tiny": 3, "wide": 4}[kind])
    scale = {"normal": 1.0, "large": 300.0, "tiny": 1e-3, "wide": 12.0}[kind]
    return [(rng.standard_normal((ROWS, K)) * scale).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("kind", ["normal", "large", "tiny", "wide"])
def test_csim_equals_emulation_bit_for_bit(built, kind):
    g, plan, sim = built
    xs = _inputs(kind)
    got, want = sim.run(xs), plan.emulate(xs)
    bad = [f"{v}: {int(np.sum(a.reshape(-1) != b.reshape(-1)))} differ"
           for v, a, b in zip(plan.outputs, got, want) if not np.array_equal(a.reshape(-1), b.reshape(-1))]
    assert not bad, bad


def test_fixed_point_close_to_fp32_reference(built):
    g, plan, sim = built
    xs = _inputs("normal")
    got = sim.run(xs)
    ref = Interpreter(g).run(*[torch.from_numpy(x) for x in xs])
    for v, a, r in zip(plan.outputs, got, ref):
        r = r.numpy().reshape(-1)
        err = np.abs(a - r).max()
        # 16 fractional bits: a few LSB per rounding step; fp32 weights become int16 per channel
        assert err < 3e-4 * max(1.0, np.abs(r).max()), (v, err)


def test_saturation_clamps_to_the_format(built):
    g, plan, sim = built
    xs = [np.full((ROWS, K), 1e6, np.float32), np.full((ROWS, K), -1e6, np.float32)]
    got = dict(zip(plan.outputs, sim.run(xs)))
    top = 2.0 ** 7 - 2.0 ** -16
    assert got["add"].max() == pytest.approx(top - 128.0)     # 127.99.. + (-128) after both saturate
    assert got["mul"].min() == -128.0
    assert got["relu"].max() == pytest.approx(top)


def test_int_codes_are_stored_unchanged(built):
    """An int4 IntQuant's packed code bytes appear in weights.bin exactly where its config says."""
    g, plan, sim = built
    layer = next(l for l in plan.layers if l.node == "dense_int4_g16")
    codes = g.weights["w4"].encoding.codes.numpy()
    image = plan.mem.image()
    off = layer.offsets["w_off"]
    assert image[off:off + codes.size] == codes.tobytes()
    assert f"struct {layer.cfg}" in render.parameters_h(plan)


def test_minifloats_decode_through_a_lut(built):
    g, plan, sim = built
    by_node = {l.node: l for l in plan.layers}
    for name in ("mx_e2m1", "mx_e2m3", "mx_e3m2", "fp8_e4m3_channel", "sparse24_mxfp4"):
        assert by_node[name].w.lut is not None, name
        assert "lut_decode = true" in by_node[name].config()
    assert by_node["fp8_e5m2_fallback"].w.lut is None                          # 2^-16 .. 57344: too wide
    assert any(f.where.startswith("node fp8_e5m2_fallback") for f in plan.fallbacks)
    assert not any(f.where.startswith("node mx_") for f in plan.fallbacks)


def test_wide_accumulators(built):
    """int16 codes (fp32 weights) need accumulators past 64 bits: ap_int<acc_bits> in C++, limbs in
    the emulation; both paths are covered by the bit-exact tests above."""
    g, plan, sim = built
    by_node = {l.node: l for l in plan.layers}
    assert not by_node["dense_fp32"].exact64 and by_node["dense_fp32"].acc_bits > 64
    assert by_node["dense_int4_g16"].exact64


def test_emulation_primitives():
    from nnforge.backends.hls import emulate as E
    assert list(E.round_shift(np.array([-3, -2, -1, 1, 2, 3]), 1)) == [-1, -1, 0, 1, 1, 2]   # half up
    f = E.Fixed(8, 4)
    assert list(E.from_float(np.array([0.03125, -0.03125, 100.0, -100.0, np.nan]), f)) == [1, 0, 127, -128, 0]
    assert E.to_float(np.array([16]), f)[0] == 1.0


@pytest.mark.parametrize("kind", ["normal", "large", "tiny", "wide"])
def test_two_macs_per_dsp_and_dataflow_bit_exact(built_narrow, kind):
    g, plan, sim = built_narrow
    packed = {l.node for l in plan.layers if getattr(l, "pack2", False)}
    assert {"dense_int8_g32", "dense_int4_g16", "dense_int3_asym", "mx_e2m1"} <= packed
    assert not packed & {"dense_fp32", "sparse24_int4"}          # int16 codes too wide; N:M rows differ in columns
    xs = _inputs(kind)
    for v, a, b in zip(plan.outputs, sim.run(xs), plan.emulate(xs)):
        assert np.array_equal(a.reshape(-1), b.reshape(-1)), v


def channels_are_single_writer_single_reader(plan) -> bool:
    """Dataflow's rule: every on-chip buffer and port is written by one layer and read by one layer."""
    writers, readers = {}, {}
    for layer in plan.layers:
        for out in (layer.output, getattr(layer, "output2", "")):
            if out:
                writers[plan.ids[out]] = writers.get(plan.ids[out], 0) + 1
        for v in set(layer.inputs):
            readers[plan.ids[v]] = readers.get(plan.ids[v], 0) + 1
    return all(n == 1 for n in writers.values()) and all(n == 1 for n in readers.values())


def test_dataflow_channels(built_narrow):
    g, plan, sim = built_narrow
    assert channels_are_single_writer_single_reader(plan)
    assert "#pragma HLS DATAFLOW" in render.top_cpp(plan)


def test_host_int64_sums_equal_the_ap_int_form(built, cache):
    """C-simulation sums inner products on int64 (nf_types.h NF_HOST_MAC); -DNF_AP_MAC builds the
    ap_int form synthesis sees. Both must give the same bits, including the >64-bit layers."""
    _, plan, sim = built
    _, _, ap_sim = _build(HlsOptions(scale_bits=30), defines=("NF_AP_MAC",))
    for kind in ("normal", "large", "wide"):
        xs = _inputs(kind)
        for a, b, v in zip(sim.run(xs), ap_sim.run(xs), plan.outputs):
            assert np.array_equal(a, b), f"{v} ({kind})"

"""Convolution on the hls backend (nnforge/hls/nf_conv.h): 1-D and 2-D, strided, padded
(symmetric, asymmetric, a zero ``pad`` folded in; a ``pad`` no conv reads on its own), dilated, grouped and depthwise, with float, int8,
int4-group, minifloat and 2:4 sparse weights and a bias; max pooling and batch norm beside them. The
C-simulation equals nnforge.backends.hls.emulate bit for bit (host int64 sums and the ap_int form),
and the fp32 reference interpreter within the fixed-point tolerance.

One graph holds every case as a separate output, so g++ runs once per form for the module."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from nnforge.backends.base import BackendError
from nnforge.backends.hls import make_sim, render, resources
from nnforge.backends.hls.conv import Conv, MaxPool, Pad
from nnforge.backends.hls.patterns import fuse_patterns
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.ir import Dense, Graph, tensor
from nnforge.ir.encodings import IntQuant
from nnforge.ir.interpreter import Interpreter
from nnforge.ir.sparse import Sparse
from tests.hls.test_kernels import nm_mask, per_channel

N, C, H, W, L = 2, 8, 11, 10, 20


def conv_graph() -> Graph:
    torch.manual_seed(0)
    g = Graph("convs")
    x = g.add_input("x", tensor("f32", N, C, H, W))
    z = g.add_input("z", tensor("f32", N, C, L))
    outs = []

    def conv(name, inp, shape, stride, padding, dilation=None, groups=1, bias=True, enc=None):
        nd = len(shape) - 2
        w = torch.randn(shape) * (1.0 / (shape[1] * np.prod(shape[2:])) ** 0.5)
        wt = g.add_weight(f"{name}.w", enc(w) if enc else Dense(w))
        b = g.add_weight(f"{name}.b", Dense(torch.randn(shape[0]) * 0.1)) if bias else None
        outs.append(g.op("conv", inp, wt, b, stride=stride, padding=padding, dilation=dilation or [1] * nd,
                         groups=groups, name=name))

    conv("same3x3", x, (6, C, 3, 3), [1, 1], [1, 1, 1, 1])
    conv("strided", x, (6, C, 3, 3), [2, 2], [1, 1, 1, 1], bias=False)
    conv("asym_pad", x, (4, C, 3, 3), [2, 1], [0, 1, 1, 0])
    conv("dilated", x, (4, C, 3, 3), [1, 1], [2, 2, 2, 2], dilation=[2, 2])
    conv("grouped", x, (6, C // 2, 3, 3), [1, 1], [1, 1, 1, 1], groups=2)
    conv("depthwise", x, (C, 1, 3, 3), [1, 1], [1, 1, 1, 1], groups=C)
    conv("depthwise_x2_7x7", x, (2 * C, 1, 7, 7), [1, 1], [3, 3, 3, 3], groups=C)
    conv("stem4x4s4", x, (6, C, 4, 4), [4, 4], [0, 0, 0, 0])
    conv("pointwise1x1", x, (5, C, 1, 1), [1, 1], [0, 0, 0, 0])
    conv("int8", x, (6, C, 3, 3), [1, 1], [1, 1, 1, 1], enc=lambda w: IntQuant.quantize(w, 8))
    conv("int4_g24", x, (6, C, 3, 3), [1, 1], [1, 1, 1, 1], enc=lambda w: IntQuant.quantize(w, 4, group_size=24))
    conv("e4m3", x, (6, C, 3, 3), [1, 1], [1, 1, 1, 1], enc=lambda w: replace(per_channel(w.reshape(6, -1), "e4m3"), shape=tuple(w.shape)))
    conv("sparse24", x, (8, C, 1, 2), [1, 2], [0, 0, 0, 0],
         enc=lambda w: Sparse.from_mask(w, nm_mask(w.reshape(8, -1), 2, 4).reshape(w.shape), "2:4"))
    conv("conv1d", z, (6, C, 3), [1], [1, 1])
    conv("conv1d_s2", z, (6, C, 3), [2], [1, 1])
    conv("conv1d_dil_dw", z, (C, 1, 3), [1], [2, 2], dilation=[2], groups=C)
    padded = g.op("pad", x, pads=[0, 0, 0, 1, 0, 0, 1, 0], value=0.0, name="tf_pad")
    conv("after_pad", padded, (4, C, 3, 3), [2, 2], [0, 0, 0, 0])
    outs.append(g.op("max_pool", x, kernel=[3, 3], stride=[2, 2], padding=[1, 1, 1, 1], dilation=[1, 1],
                     ceil_mode=False, name="maxpool3s2"))
    outs.append(g.op("max_pool", x, kernel=[2, 2], stride=[2, 2], padding=[0, 0, 0, 0], dilation=[1, 1],
                     ceil_mode=True, name="maxpool2_ceil"))
    outs.append(g.op("max_pool", z, kernel=[3], stride=[2], padding=[1, 1], dilation=[1], ceil_mode=False,
                     name="maxpool1d"))
    outs.append(g.op("pad", x, pads=[0, 1, 2, 0, 0, 0, 1, 3], value=-1.5, name="pad_fill"))   # no conv reads it
    outs.append(g.op("pad", z, pads=[0, 0, 2, 0, 0, 1], value=0.0, name="pad_1d"))
    stats = [g.add_weight(f"bn.{k}", Dense(t)) for k, t in
             (("mean", torch.randn(C) * 0.3), ("var", torch.rand(C) + 0.5), ("w", torch.randn(C)),
              ("b", torch.randn(C) * 0.2))]
    outs.append(g.op("batch_norm", x, *stats, eps=1e-5, name="bn"))
    g.set_outputs(outs)
    return g


def _sim(plan, defines=()):
    return make_sim(plan, render.sources(plan), defines)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NNFORGE_HLS_CACHE", str(tmp_path_factory.mktemp("hls-cache")))
    g = conv_graph()
    plan = build_plan(g, HlsOptions())
    yield g, plan, _sim(plan)
    mp.undo()


def _inputs(kind: str):
    rng = np.random.default_rng({"normal": 1, "large": 2, "tiny": 3}[kind])
    scale = {"normal": 1.0, "large": 60.0, "tiny": 1e-3}[kind]
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in ((N, C, H, W), (N, C, L))]


@pytest.mark.parametrize("kind", ["normal", "large", "tiny"])
def test_csim_equals_emulation_bit_for_bit(built, kind):
    g, plan, sim = built
    xs = _inputs(kind)
    bad = [v for v, a, b in zip(plan.outputs, sim.run(xs), plan.emulate(xs))
           if not np.array_equal(a.reshape(-1), b.reshape(-1))]
    assert not bad, bad


@pytest.mark.slow
def test_ap_int_form_equals_the_host_sums(built):
    """-DNF_AP_MAC: the window products summed in ap_int, as synthesis sees them."""
    g, plan, _ = built
    xs = _inputs("normal")
    for a, b in zip(_sim(plan, ("NF_AP_MAC",)).run(xs), plan.emulate(xs)):
        assert np.array_equal(a.reshape(-1), b.reshape(-1))


@pytest.mark.slow
def test_narrow_activations_in_the_dataflow_form_bit_exact(built):
    """16-bit activations, 8-bit codes for float weights, 12-bit scales, every layer a process."""
    g, _, _ = built
    plan = build_plan(g, HlsOptions(act_width=16, act_int=6, lut_step_log2=-8, scale_bits=12, dense_weight_bits=8,
                                    dataflow=True))
    xs = _inputs("normal")
    for v, a, b in zip(plan.outputs, _sim(plan).run(xs), plan.emulate(xs)):
        assert np.array_equal(a.reshape(-1), b.reshape(-1)), v


def test_close_to_the_fp32_reference(built):
    """Within the error of the weights' own quantisation (int16 per channel for float weights, the
    stored codes otherwise, which the reference decodes) and the activations' 16 fractional bits."""
    g, plan, sim = built
    xs = _inputs("normal")
    ref = Interpreter(g).run(*[torch.from_numpy(x) for x in xs])
    for v, a, r in zip(plan.outputs, sim.run(xs), ref):
        r = r.numpy()
        err = np.abs(a.reshape(r.shape) - r).max()
        assert err < 5e-4 * max(1.0, np.abs(r).max()), (v, err)


def test_layers_and_geometry(built):
    g, plan, sim = built
    convs = {layer.node: layer for layer in plan.layers if isinstance(layer, Conv)}
    assert convs["depthwise_x2_7x7"].groups == C and convs["depthwise_x2_7x7"].filt == (7, 7)
    assert convs["conv1d_s2"].shape == (N, C, 1, L) and convs["conv1d_s2"].stride == (1, 2)
    assert convs["asym_pad"].pad == (0, 1) and convs["dilated"].dil == (2, 2)
    assert convs["int8"].w.w_bits == 8 and convs["int4_g24"].w.n_groups == 3
    assert convs["e4m3"].w.lut is not None and (convs["sparse24"].w.sp_n, convs["sparse24"].w.sp_m) == (2, 4)
    padded = [n for n in convs if n.startswith("after_pad")]
    assert len(padded) == 1 and convs[padded[0]].pad == (0, 1)          # the pad (left 1) is folded in
    assert sum(isinstance(layer, MaxPool) for layer in plan.layers) == 3
    assert sorted(layer.node for layer in plan.layers if isinstance(layer, Pad)) == ["pad_1d", "pad_fill"]
    assert [layer.op for layer in plan.layers if layer.node == "bn"] == ["mul", "add"]


def test_padding_is_folded_only_when_zero_and_spatial():
    g = Graph("pads")
    x = g.add_input("x", tensor("f32", 1, 2, 5, 5))
    w = g.add_weight("w", Dense(torch.randn(3, 2, 3, 3)))
    outs = []
    for name, pads, value in (("zero", [0, 0, 1, 0, 0, 0, 0, 2], 0.0), ("one", [0, 0, 1, 1, 0, 0, 1, 1], 1.0),
                              ("channels", [0, 1, 0, 0, 0, 0, 0, 0], 0.0)):
        p = g.op("pad", x, pads=pads, value=value, name=f"pad_{name}")
        wt = w if name != "channels" else g.add_weight("w3", Dense(torch.randn(3, 3, 3, 3)))
        outs.append(g.op("conv", p, wt, None, stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1,
                         name=f"conv_{name}"))
    g.set_outputs(outs)
    fused = fuse_patterns(g)
    assert [n.op for n in fused.nodes].count("pad") == 2
    conv = next(n for n in fused.nodes if n.op == "conv" and n.inputs[0] is fused.inputs[0])
    assert list(conv.attrs["padding"]) == [2, 1, 1, 3]
    xs = [torch.randn(1, 2, 5, 5)]
    for a, b in zip(Interpreter(g).run(*xs), Interpreter(fused).run(*xs)):
        assert torch.allclose(a, b, atol=1e-5)


def test_resources_count_the_conv_unit(built):
    g, plan, sim = built
    est = resources.estimate(plan)
    rows = {r["node"]: r for r in est["layers"]}
    assert not est["unrated"]
    assert rows["same3x3"]["dsp"] >= plan.opts.chain and "line buffer 3 x" in rows["same3x3"]["why"]
    assert "line buffer 7 x" in rows["depthwise_x2_7x7"]["why"]
    assert rows["maxpool3s2"]["dsp"] == 0


def test_a_3d_convolution_is_refused_naming_the_node():
    g = Graph("conv3d")
    x = g.add_input("x", tensor("f32", 1, 2, 4, 4, 4))
    y = g.op("conv", x, g.add_weight("w", Dense(torch.randn(3, 2, 1, 1, 1))), None, stride=[1, 1, 1],
             padding=[0] * 6, dilation=[1, 1, 1], groups=1, name="vol")
    g.set_outputs([y])
    with pytest.raises(BackendError, match=r"node vol \(conv\): 3-D convolution; the hls backend runs 1-D and 2-D"):
        build_plan(g, HlsOptions())

"""The static resource estimate of a generated HLS project (nnforge.backends.hls.resources): counts
follow the rules its docstring states, rows add up to the total, every layer type has a rule."""
from __future__ import annotations

import math

import pytest
import torch

import nnforge as nf
from nnforge.backends.hls import layers as L
from nnforge.backends.hls import logic as G
from nnforge.backends.hls import resources as R
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.ir import Dense, Graph, tensor

KEYS = ("dsp", "bram36", "uram", "lut", "ff", "macs_per_cycle")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """A tiny MLP (fp32 recipe: int16 weights per channel) compiled for alveo-u280, 4 rows per call."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NNFORGE_HLS_CACHE", str(tmp_path_factory.mktemp("hls-cache")))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    b = nf.compile(model, "alveo-u280", example_inputs=(torch.randn(4, 16),), dynamic_shapes="static", out=tmp_path_factory.mktemp("b") / "mlp",
                   progress=False)
    yield b, nf.load(b.path).plan
    mp.undo()


def _sums(est):
    rows = est["layers"] + est["buffers"] + [est["interface"]]
    return {k: sum(r[k] for r in rows) for k in KEYS}


def test_mult_and_bram_rules():
    assert R.mult_dsps(27, 18) == R.mult_dsps(18, 27) == 1           # DSP48E2 27 x 18
    assert R.mult_dsps(28, 18) == 2 and R.mult_dsps(24, 24) == 2       # wider: cascaded slices
    assert R.mult_dsps(24, 24, "dsp58") == 1                           # DSP58 27 x 24
    assert R.mult_dsps(64, 64, keep=64) == 8 < R.mult_dsps(64, 64)     # only the kept bits' partial products
    assert R.dsp_family("xcu280-fsvh2892-2L-e") == "dsp48e2"
    assert R.dsp_family("xcvh1582-vsva3697-2MP-e-S") == "dsp58"
    assert R.dsp_family("xcvu37p-fsvh2892-2L-e") == "dsp48e2"          # Virtex UltraScale+, not Versal
    assert R.bram36(1024, 36) == 1 and R.bram36(1025, 36) == 2 and R.bram36(512, 72) == 1
    assert R.bram36(64, 64) == 0 and R.bram36(32, 32) == 0             # LUTRAM by the size assumption
    for depth in (65, 100, 1000, 4097, 30000):
        for width in (1, 9, 17, 24, 32, 64):
            if depth * width > R.LUTRAM_MAX_BITS:
                assert R.bram36(depth, width) >= math.ceil(depth * width / 36864)


def test_mlp_counts_follow_the_rules(mlp):
    b, plan = mlp
    est = R.estimate(plan, device=nf.target("alveo-u280").fpga)
    assert est["dsp_family"] == "dsp48e2" and "not a synthesis report" in est["method"]
    assert not est["unrated"]
    mats = [lay for lay in plan.layers if isinstance(lay, L.MatMat)]
    rows = {r["name"]: r for r in est["layers"]}
    assert len(rows) == len(plan.layers) == 3
    W = plan.opts.act_width
    for lay in mats:
        r = rows[lay.name]
        assert lay.w.val_bits == 17 and W == 24 and not lay.pack2      # int16 codes + 1 bit, ap_fixed<24, 8>
        # chain multipliers, 17 x 24 fits 27 x 18 (one DSP each), plus the group-scale multiplier
        assert r["dsp"] == lay.chain * 1 + R.mult_dsps(lay.acc_bits, 32, keep=lay.acc_bits)
        assert r["macs_per_cycle"] == lay.chain
        assert r["bram36"] == 0                                          # decoded rows this short: LUTRAM
        assert "weight x activation 17x24: 1 DSP" in r["why"]
    relu = rows[next(lay.name for lay in plan.layers if isinstance(lay, L.Relu))]
    assert relu["dsp"] == relu["bram36"] == 0
    # weights are off chip; on-chip activation buffers by the BRAM shape rule
    assert {r["name"]: r["elements"] for r in est["buffers"]} == plan.pool
    for r in est["buffers"]:
        assert r["bram36"] == R.bram36(r["elements"], W)
    assert est["total"] == _sums(est)
    assert est["total"]["dsp"] == sum(rows[m.name]["dsp"] for m in mats)
    assert 0 < est["utilisation"]["dsp"] < 0.01
    text = R.format_estimate(est)
    assert "total" in text and "rough" in text and str(est["total"]["dsp"]) in text


def test_pack2_and_dataflow(mlp):
    """A narrower activation format turns on pack2 (two MACs per DSP); dataflow doubles the buffers."""
    b, _ = mlp
    graph = b.graph()
    narrow = build_plan(graph, HlsOptions(act_width=16, act_int=6, dense_weight_bits=4))
    est = R.estimate(narrow)
    for lay in (x for x in narrow.layers if isinstance(x, L.MatMat)):
        r = next(r for r in est["layers"] if r["name"] == lay.name)
        assert lay.pack2
        assert r["macs_per_cycle"] == 2 * lay.chain
        assert r["dsp"] == lay.chain + R.mult_dsps(lay.acc_bits, 32, keep=lay.acc_bits)
    df = build_plan(graph, HlsOptions(dataflow=True))
    est = R.estimate(df)
    for r in est["buffers"]:
        assert r["bram36"] == 2 * R.bram36(r["elements"], 24)
    assert est["total"] == _sums(est)


def test_encoder_kernels_follow_the_rules():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 8, 16))
    torch.manual_seed(0)
    h = g.op("linear", x, g.add_weight("w", Dense(torch.randn(16, 16))), name="fc")
    n = g.op("layer_norm", h, axis=-1, eps=1e-5, name="ln")
    a = g.op("gelu", n, name="act")
    s = g.op("matmul", a, g.op("permute", a, perm=[1, 0], name="tr"), name="scores")
    p = g.op("softmax", s, axis=-1, name="sm")
    g.set_outputs([g.op("mul", p, p, name="sq")])
    plan = build_plan(g, HlsOptions())
    est = R.estimate(plan)
    by_kind = {r["kind"]: r for r in est["layers"]}
    assert not est["unrated"]
    assert by_kind["Matmul"]["dsp"] == 4 * R.mult_dsps(24, 24) == 8               # chain x (24 x 24: 2 DSPs)
    assert by_kind["Norm"]["dsp"] == 3 * R.mult_dsps(64, 64, keep=64) == 24
    assert by_kind["Lut"]["dsp"] == R.mult_dsps(33, 10) == 2                        # 33 x step_shift (16 - 6)
    assert by_kind["Lut"]["bram36"] == R.bram36(1025, 32) == 2                      # the 1025-entry table ROM
    assert by_kind["Softmax"]["dsp"] == 2 + 8 and by_kind["Softmax"]["bram36"] == 2
    assert by_kind["Binary"]["dsp"] == 8 and by_kind["Strided"]["dsp"] == 0
    assert est["total"] == _sums(est)
    est58 = R.estimate(plan, family="dsp58")
    assert {r["kind"]: r for r in est58["layers"]}["Matmul"]["dsp"] == 4            # 24 x 24 fits DSP58


def test_every_layer_type_has_a_rule():
    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)
    missing = [c.__name__ for c in subclasses(L.Layer) if c not in R.RESOURCE_COSTS and c is not L.Alias]
    assert not missing, f"no resource rule for {missing}"
    assert G.Ewise in R.RESOURCE_COSTS


def test_large_buffers_are_bound_to_uram(mlp):
    """Activation buffers of at least uram_min_bits (the target's uram_min_buffer_kib, also the
    simulator's rule) get BIND_STORAGE impl=uram in the top function and count as URAM288 blocks."""
    from dataclasses import replace

    from nnforge.backends.hls import render
    _, plan = mlp
    assert plan.opts.uram_min_bits == 1024 * 1024 * 8                  # alveo-u280.toml: 1 MiB
    assert not any(plan.in_uram(b) for b in plan.pool)                # 4 x 64 activations: BRAM / LUTRAM
    plan.opts = replace(plan.opts, uram_min_bits=64 * plan.opts.act_width)
    try:
        big = [b for b in plan.pool if plan.in_uram(b)]
        assert big
        top = render.top_cpp(plan)
        for b in big:
            assert f"#pragma HLS BIND_STORAGE variable={b} type=ram_2p impl=uram" in top
        est = R.estimate(plan)
        rows = {r["name"]: r for r in est["buffers"]}
        for b in big:
            n = plan.pool[b]
            assert rows[b]["uram"] == math.ceil(n / 4096) * math.ceil(plan.opts.act_width / 72)
            assert rows[b]["bram36"] == 0
        assert est["total"]["uram"] == _sums(est)["uram"] > 0
    finally:
        plan.opts = replace(plan.opts, uram_min_bits=1024 * 1024 * 8)

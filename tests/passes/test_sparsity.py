"""Sparsity passes: every pattern holds in the stored weights, magnitude keeps the largest weights,
SparseGPT beats magnitude on held-out inputs, joint 2:4 + int4, per-layer targets and the
sensitivity schedule, serializer and onnx-compile round trips, and the documented errors."""
from __future__ import annotations

import pytest
import torch

import nnforge as nf
from nnforge.ir import Dense, Graph, IntQuant, Sparse, load_graph, run_graph, save_graph, tensor
from nnforge.passes import PASSES, PassContext, PassError, PassManager, QuantizeRTN, resolve_recipe
from nnforge.passes.prune.sparsity import PruneMagnitude, PruneSparseGPT

MIX = torch.randn(48, 48, generator=torch.Generator().manual_seed(48)) * torch.logspace(0, -2, 48)


def batches(n=4, seed=3):
    """Correlated inputs of unequal scale: where the Hessian tells weights apart."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 48, generator=gen) @ MIX.T,) for _ in range(n)]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).eval()


def graph(m=None, w1=None, w2=None) -> Graph:
    """x[batch, 48] -> fc1 (48->64) -> gelu -> fc2 (64->32), weights from ``model()`` unless given."""
    m = m or model()
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", 48 if w1 is None else w1.shape[1]))
    h = g.op("linear", x, g.add_weight("fc1.weight", Dense(m[0].weight.detach().clone() if w1 is None else w1)),
             g.add_weight("fc1.bias", Dense(m[0].bias.detach().clone())) if w1 is None else None, name="fc1")
    a = g.op("gelu", h, name="act")
    g.set_outputs([g.op("linear", a, g.add_weight("fc2.weight", Dense(m[2].weight.detach().clone() if w2 is None
                                                                      else w2)),
                        g.add_weight("fc2.bias", Dense(m[2].bias.detach().clone())) if w2 is None else None,
                        name="fc2")])
    return g


def prune(g, config: dict, calibration=None):
    ctx = PassContext(calibration=calibration)
    name, passes = resolve_recipe([config])
    out = PassManager(passes).run(g, ctx)
    return out, ctx.figures[passes[0].name]


def out_error(gq, g, data):
    num = sum(float((run_graph(gq, b)[0] - run_graph(g, b)[0]).norm() ** 2) for b in data)
    return (num / sum(float(run_graph(g, b)[0].norm() ** 2) for b in data)) ** 0.5


PATTERNS = ["2:4", "4:8", "1:4", "block4x1", "block1x4", "block16x1", "unstructured"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", ["prune_magnitude", "prune_sparsegpt"])
def test_pattern_holds_in_the_stored_weights(pattern, method):
    g = graph()
    gp, figs = prune(g, {"pass": method, "pattern": pattern}, batches())
    for name in ("fc1.weight", "fc2.weight"):
        enc = gp.weights[name].encoding
        assert isinstance(enc, Sparse) and enc.pattern.name == pattern
        d = enc.decode()
        nz = d != 0
        if ":" in pattern:
            n, m = map(int, pattern.split(":"))
            assert bool((nz.reshape(d.shape[0], -1, m).sum(-1) == n).all())
        elif pattern.startswith("block"):
            r, c = map(int, pattern[5:].split("x"))
            blocks = nz.reshape(d.shape[0] // r, r, d.shape[1] // c, c)
            assert torch.equal(blocks.any(3).any(1), blocks.all(3).all(1))          # whole blocks kept or dropped
            assert float(blocks.any(3).any(1).float().mean()) == 0.5
            assert enc.row_ptr[-1] == enc.index.numel() == enc.values.shape[0]
        else:
            assert float(nz.float().mean()) == 0.5
        assert enc.nbytes < 0.6 * enc.numel * 4
    want = 0.75 if pattern == "1:4" else 0.5
    assert figs["overall_sparsity"] == want and figs["sparsity"] == {"fc1": want, "fc2": want}
    assert figs["pattern"] == pattern and figs["layers"] == 2


def test_magnitude_keeps_the_largest_weights():
    g = graph()
    gp, _ = prune(g, {"pass": "prune_magnitude", "pattern": "2:4"})
    w = g.weights["fc1.weight"].encoding.data
    enc = gp.weights["fc1.weight"].encoding
    keep = enc.mask().reshape(64, -1, 4)
    a = w.abs().reshape(64, -1, 4)
    assert bool((a.masked_fill(~keep, float("inf")).amin(-1) >= a.masked_fill(keep, -1).amax(-1)).all())
    assert torch.equal(enc.decode(), w * enc.mask())
    gu, _ = prune(g, {"pass": "prune_magnitude", "pattern": "unstructured", "sparsity": 0.7})
    mask = gu.weights["fc1.weight"].encoding.mask()
    assert float(mask.float().mean()) == pytest.approx(0.3, abs=1 / 3072)
    assert float(w.abs()[mask].min()) >= float(w.abs()[~mask].max())


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_sparsegpt_beats_magnitude_on_held_out_inputs(pattern):
    g = graph()
    held_out = batches(3, seed=11)
    mag, _ = prune(g, {"pass": "prune_magnitude", "pattern": pattern})
    sgpt, figs = prune(g, {"pass": "prune_sparsegpt", "pattern": pattern}, batches())
    e_mag, e_sgpt = out_error(mag, g, held_out), out_error(sgpt, g, held_out)
    assert e_sgpt < 0.8 * e_mag
    assert set(figs["hessian_weighted_error"]) == {"fc1", "fc2"}


def test_joint_two_four_and_int4():
    g = graph()
    gp, figs = prune(g, {"pass": "prune_sparsegpt", "pattern": "2:4", "format": "uint4", "group_size": 16},
                     batches())
    enc = gp.weights["fc1.weight"].encoding
    assert isinstance(enc.values, IntQuant) and enc.values.shape == (64, 24) and enc.values.group_size == 16
    assert enc.describe() == "2:4 sparse (u4 g16 asym)"
    assert figs["encodings"] == {"2:4 sparse (u4 g16 asym)": 2}
    # groups of 16 kept values: ragged (24 = 16 + 8) for fc1; 2 + 1 + scales bits per weight
    assert enc.values.scale.shape == (64, 2) and figs["bits_per_weight"] < 5
    d = enc.decode()
    assert bool(((d != 0).reshape(64, -1, 4).sum(-1) <= 2).all())
    held_out = batches(3, seed=11)
    mag, _ = prune(g, {"pass": "prune_magnitude", "pattern": "2:4"})
    assert out_error(gp, g, held_out) < out_error(mag, g, held_out)
    # the same grid as RTN's with the stored scales: decoding re-quantises to itself
    v = enc.values
    assert torch.equal(IntQuant.from_codes(v.int_codes(), v.scale, bits=4, signed=False, shape=v.shape,
                                           group_size=16, zero_point=v.zero_point).decode(), v.decode())


@pytest.mark.parametrize("pattern", ["block4x1", "block1x4"])
def test_joint_block_sparsity_and_int8_with_row_scales(pattern):
    """Block patterns quantise their kept values to integer codes with one scale per output row
    (Sparse.row_scale): the layout of integer SpMM kernels."""
    g = graph()
    gp, figs = prune(g, {"pass": "prune_sparsegpt", "pattern": pattern, "sparsity": 0.5, "format": "int8"},
                     batches())
    enc = gp.weights["fc1.weight"].encoding
    v = enc.values
    assert isinstance(v, IntQuant) and v.bits == 8 and v.signed and tuple(v.scale.shape) == (1, 1)
    assert float(v.scale) == 1.0 and enc.row_scale.shape == (64,)
    assert enc.describe() == f"{pattern} sparse 50% (i8 per-tensor sym, one scale per output row)"
    codes = v.decode()                                      # the integer codes themselves
    assert torch.equal(codes, codes.round()) and -128 <= float(codes.min()) and float(codes.max()) <= 127
    d = enc.decode()
    assert torch.equal(d, enc.mask() * d) and float(enc.density) == pytest.approx(0.5, abs=0.02)
    assert torch.allclose(d, (enc.mask() * d / enc.row_scale.float()[:, None]).round() * enc.row_scale.float()[:, None])
    # joint quantisation costs little against pruning alone, and beats magnitude pruning
    held_out = batches(3, seed=11)
    fp, _ = prune(g, {"pass": "prune_sparsegpt", "pattern": pattern, "sparsity": 0.5}, batches())
    mag, _ = prune(g, {"pass": "prune_magnitude", "pattern": pattern, "sparsity": 0.5})
    assert out_error(gp, g, held_out) < min(1.1 * out_error(fp, g, held_out), out_error(mag, g, held_out))
    assert enc.nbytes < 0.3 * 4 * 64 * 48


def test_row_scale_round_trips_and_is_checked(tmp_path):
    g, _ = prune(graph(), {"pass": "prune_sparsegpt", "pattern": "block4x1", "format": "int8"}, batches())
    save_graph(g, tmp_path / "g.json", tmp_path / "w.safetensors")
    back = load_graph(tmp_path / "g.json", tmp_path / "w.safetensors")
    a, b = g.weights["fc2.weight"].encoding, back.weights["fc2.weight"].encoding
    assert torch.equal(a.row_scale, b.row_scale) and torch.equal(a.decode(), b.decode())
    with pytest.raises(Exception, match=r"row_scale must be a float tensor \[32\]"):
        Sparse(a.shape, a.pattern, a.values, a.index, a.row_ptr, torch.ones(31))


def test_layer_sparsity_by_name_pattern():
    _, figs = prune(graph(), {"pass": "prune_magnitude", "pattern": "unstructured", "sparsity": 0.6,
                              "layer_sparsity": {"fc1*": 0.25}})
    assert figs["sparsity"] == {"fc1": 0.25, "fc2": pytest.approx(0.6, abs=1 / 2048)}
    assert figs["overall_sparsity"] == pytest.approx((0.25 * 3072 + 0.6 * 2048) / 5120, abs=1e-4)


def test_sensitivity_schedule_prunes_the_fragile_layer_less():
    gen = torch.Generator().manual_seed(0)
    # fc1: equal magnitudes, every removal costs as much; fc2: a few large weights carry the output
    w1 = torch.sign(torch.randn(64, 48, generator=gen)) * (1 + 0.1 * torch.rand(64, 48, generator=gen))
    w2 = torch.randn(32, 64, generator=gen) * torch.where(torch.rand(32, 64, generator=gen) < 0.1, 1.0, 0.01)
    g = graph(w1=w1, w2=w2)
    data = [(torch.randn(64, 48, generator=gen),) for _ in range(3)]
    gp, figs = prune(g, {"pass": "prune_magnitude", "pattern": "unstructured", "schedule": "sensitivity"}, data)
    s = figs["sparsity"]
    assert s["fc1"] < 0.5 < s["fc2"]
    assert figs["overall_sparsity"] == pytest.approx(0.5, abs=0.02)       # a grid of 0.05 over two layers
    uniform, _ = prune(g, {"pass": "prune_magnitude", "pattern": "unstructured"})
    assert out_error(gp, g, data) < out_error(uniform, g, data)
    _, figs = prune(g, {"pass": "prune_sparsegpt", "pattern": "block4x1", "schedule": "sensitivity"}, data)
    assert figs["sparsity"]["fc1"] < figs["sparsity"]["fc2"]


def test_deterministic_and_round_trips_through_the_serializer(tmp_path):
    config = {"pass": "prune_sparsegpt", "pattern": "2:4", "format": "int4", "group_size": 8}
    a, _ = prune(graph(), config, batches())
    b, _ = prune(graph(), config, batches())
    assert all(torch.equal(a.weights[n].encoding.decode(), b.weights[n].encoding.decode()) for n in a.weights)
    save_graph(a, tmp_path / "g.json", tmp_path / "w.safetensors")
    back = load_graph(tmp_path / "g.json", tmp_path / "w.safetensors")
    assert back.weights["fc2.weight"].encoding.describe() == a.weights["fc2.weight"].encoding.describe()
    x = batches(1, seed=9)[0]
    assert torch.equal(run_graph(back, x)[0], run_graph(a, x)[0])


def test_compile_to_onnx_runs(tmp_path):
    calib = batches()
    bundle = nf.compile(model(), "onnx", [{"pass": "prune_sparsegpt", "pattern": "2:4", "format": "uint4",
                                           "group_size": 16}],
                        example_inputs=calib[0], calibration=calib, out=tmp_path / "b")
    g = bundle.graph()
    encs = [v.encoding for v in g.weights.values() if len(v.shape) == 2]
    assert len(encs) == 2 and all(isinstance(e, Sparse) and isinstance(e.values, IntQuant) for e in encs)
    assert [f["what"] for f in bundle.manifest["fallbacks"]] == ["2:4 sparse (u4 g16 asym)"] * 2
    x = batches(1, seed=5)[0][0]
    got = torch.as_tensor(nf.load(bundle.path)(x.numpy()))
    torch.testing.assert_close(got, run_graph(g, [x])[0], rtol=1e-4, atol=1e-5)


# --- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,msg", [
    ({"pattern": "3x3"}, "option pattern: unknown sparsity pattern '3x3'"),
    ({"pattern": "5:4"}, "option pattern: .*N=5 > M=4"),
    ({"pattern": "unstructured", "sparsity": 1.0}, r"sparsity must be a fraction of weights removed in \(0, 1\)"),
    ({"pattern": "unstructured", "sparsity": "half"}, "sparsity must be a fraction"),
    ({"pattern": "2:4", "sparsity": 0.7}, "2:4 removes 50% of the weights by definition"),
    ({"pattern": "2:4", "schedule": "sensitivity"}, "fixes every layer's sparsity"),
    ({"pattern": "2:4", "layer_sparsity": {"fc1": 0.3}}, "fixes every layer's sparsity"),
    ({"pattern": "unstructured", "layer_sparsity": {"fc1": 1.5}}, "layer_sparsity must map layer-name patterns"),
    ({"pattern": "unstructured", "layer_sparsity": ["fc1"]}, "layer_sparsity must map"),
    ({"pattern": "unstructured", "schedule": "greedy"}, "schedule must be one of uniform, sensitivity"),
    ({"pattern": "unstructured", "schedule": "sensitivity", "layer_sparsity": {"fc1": 0.3}},
     "give layer_sparsity or schedule='sensitivity', not both"),
    ({"ops": ["matmul"]}, "matmul weights are"),
    ({"layers": 3}, "option layers must be a list of strings"),
    ({"bogus": 1}, "unknown option"),
])
@pytest.mark.parametrize("method", ["prune_magnitude", "prune_sparsegpt"])
def test_bad_options_are_named(options, msg, method):
    with pytest.raises(PassError, match=msg):
        resolve_recipe([{"pass": method, **options}])


@pytest.mark.parametrize("options,msg", [
    ({"damp": 1.5}, r"damp must be in \[0, 1\)"),
    ({"block_size": 0}, "block_size must be a positive integer"),
    ({"group_size": 64}, "group_size applies to the format of the kept weights; give format too"),
    ({"pattern": "unstructured", "format": "int4"}, "format .* needs an N:M or block pattern"),
    ({"pattern": "block4x1", "format": "uint8"}, "block pattern block4x1, format must be a symmetric integer"),
    ({"pattern": "block1x4", "format": "int8", "group_size": 16}, "one scale per output row"),
    ({"pattern": "block16x1", "format": "e4m3"}, "symmetric integer format"),
    ({"format": "int12"}, "integer weights take 2..8 bits"),
    ({"pattern": "4:8", "format": "int4", "group_size": 6}, "group_size 6 must be a multiple of N=4"),
])
def test_bad_sparsegpt_options_are_named(options, msg):
    with pytest.raises(PassError, match=msg):
        PruneSparseGPT(**options)


def test_layers_the_pattern_does_not_fit_are_named():
    g = graph()
    with pytest.raises(PassError, match=r"layer fc2: block64x1 sparsity: 64x1 blocks do not tile the weight "
                                        r"fc2.weight \[32, 64\].*exclude=\[\"fc2\"\]"):
        PruneMagnitude(pattern="block64x1")(g.copy())
    with pytest.raises(PassError, match=r"layer fc1: 3:5 sparsity: M=5 does not divide the 48 columns"):
        PruneMagnitude(pattern="3:5")(g.copy())
    gp = PruneMagnitude(pattern="block64x1", exclude=["fc2"])(g.copy())
    assert isinstance(gp.weights["fc2.weight"].encoding, Dense)


def test_runtime_errors_are_clear():
    g = graph()
    q = QuantizeRTN(format="int8", layers=["fc1"])(g.copy())
    with pytest.raises(PassError, match=r"layer fc1 \(fc1.weight\) is already encoded as i8 per-channel sym; prune "
                                        "before quantising"):
        PruneMagnitude()(q)
    with pytest.raises(PassError, match=r"prune_magnitude: layers pattern 'nope' matches no linear/conv layer"):
        PruneMagnitude(layers=["nope"])(g.copy())
    with pytest.raises(PassError, match="schedule='sensitivity' measures each layer's output error on calibration"):
        PruneMagnitude(pattern="unstructured", schedule="sensitivity")(g.copy())
    with pytest.raises(PassError, match="pass prune_sparsegpt needs calibration data"):
        PruneSparseGPT()(g.copy())


def test_passes_are_registered():
    assert PASSES["prune_magnitude"] is PruneMagnitude and PASSES["prune_sparsegpt"] is PruneSparseGPT

"""Block reconstruction (passes/recover): free parameters per encoding, the cut into blocks, and
the pass on a residual stack imported from torch, checked on inputs it never saw."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from nnforge.frontend import import_model
from nnforge.ir import Dense, IntQuant, run_graph
from nnforge.ir.lowrank import LowRank
from nnforge.ir.palette import Palettized
from nnforge.ir.sparse import Sparse
from nnforge.passes import PassContext, PassError, PassManager, QuantizeRTN, resolve_recipe
from nnforge.passes.cleanup import cleanup_passes
from nnforge.passes.quantize.formats import parse_format, quantize_rtn
from nnforge.passes.recover import Distill, Reconstruct, Tunable, free_fields
from nnforge.passes.recover.blocks import cut, layer_key


class _Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class _Stack(nn.Module):
    def __init__(self, d=32, n=3):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.layers = nn.ModuleList([_Layer(d) for _ in range(n)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 8, generator=gen),) for _ in range(n)]


@pytest.fixture(scope="module")
def stack():
    torch.manual_seed(0)
    graph, _ = import_model(_Stack().eval(), _data(1, 0)[0])
    return PassManager(cleanup_passes()).run(graph)


def _error(g, ref, batches):
    num = sum(float((run_graph(g, b)[0] - run_graph(ref, b)[0]).pow(2).sum()) for b in batches)
    return num / sum(float(run_graph(ref, b)[0].pow(2).sum()) for b in batches)


def _w(rows=16, cols=64, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


# --- free parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("enc, want", [
    (lambda: Dense(_w()), []),
    (lambda: Dense(torch.ones(16)), [("data",)]),
    (lambda: quantize_rtn(_w(), parse_format("uint4", group_size=32)), [("scale",)]),
    (lambda: quantize_rtn(_w(), parse_format("e2m1", group_size=32)), [("scale",)]),
    (lambda: quantize_rtn(_w(), parse_format("nvfp4")), [("global_scale",)]),
    (lambda: quantize_rtn(_w(), parse_format("mxfp4")), []),
    (lambda: Palettized.from_indices(torch.randint(0, 8, (16, 64)), torch.randn(16, 8).half(), bits=3,
                                     shape=(16, 64), group_size=1), [("lut",)]),
    (lambda: LowRank((16, 64), Dense(_w(4, 64)), Dense(_w(16, 4)), base=quantize_rtn(_w(), parse_format("int4"))),
     [("a", "data"), ("b", "data"), ("base", "scale")]),
])
def test_free_fields_are_the_continuous_parts_of_each_encoding(enc, want):
    assert [p for p, _ in free_fields(enc())] == want


def test_sparse_values_are_free_and_the_mask_is_not():
    from nnforge.passes.prune.sparsity import PruneMagnitude
    g = PruneMagnitude(pattern="2:4")(_single_linear())
    enc = g.weights["fc.weight"].encoding
    assert isinstance(enc, Sparse) and [p for p, _ in free_fields(enc)] == [("values", "data")]
    t = Tunable(enc)
    with torch.no_grad():
        t.deltas[0].add_(0.1)
    w = t.weight()
    assert torch.equal(w == 0, enc.decode() == 0)                  # the kept positions stay the kept positions
    assert torch.equal(t.encoding().mask(), enc.mask())


def _single_linear():
    from nnforge.ir import Graph, tensor
    g = Graph("one")
    x = g.add_input("x", tensor("f32", "batch", 64))
    w = g.add_weight("fc.weight", Dense(_w()))
    g.set_outputs([g.op("linear", x, w, None, name="fc")])
    return g


@pytest.mark.parametrize("spec, gs, scale_dtype", [("uint4", 32, "float16"), ("int3", 16, "float32"),
                                                   ("e2m1", 32, "float32"), ("nvfp4", None, "float32")])
def test_a_tunable_decodes_as_its_encoding_stores_what_it_tunes_and_passes_gradients(spec, gs, scale_dtype):
    enc = quantize_rtn(_w(), parse_format(spec, group_size=gs, scale_dtype=scale_dtype))
    t = Tunable(enc)
    assert torch.equal(t.weight(), enc.decode())                   # zero deltas: the encoding as it was
    assert torch.equal(t.encoding().decode(), enc.decode())
    target = enc.decode() * 1.1
    (t.weight() - target).pow(2).sum().backward()
    assert all(d.grad is not None and float(d.grad.abs().sum()) > 0 for d in t.deltas)
    with torch.no_grad():
        for d in t.deltas:
            d.add_(0.05)
    tuned = t.encoding()
    assert type(tuned) is type(enc) and tuned.nbytes == enc.nbytes
    # the forward pass sees what will be stored (float16 scales rounded, straight through)
    assert torch.equal(t.weight().detach(), tuned.decode())
    if isinstance(enc, IntQuant):
        assert torch.equal(tuned.int_codes(), enc.int_codes()) and tuned.scale.dtype == enc.scale.dtype


# --- blocks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, key", [("model.layers.3.self_attn.q_proj", "model.layers.3"),
                                       ("bert.encoder.layer.11.output.dense", "bert.encoder.layer.11"),
                                       ("/model/layers.0/attn/MatMul", "/model/layers.0"), ("layer2.1.conv1", "layer2.1"),
                                       ("add_14", None), ("bert.embeddings.word_embeddings", None)])
def test_layer_keys(name, key):
    assert layer_key(name) == key


def test_a_stack_is_cut_into_its_layers_with_embeddings_and_head_outside(stack):
    c = cut(stack)
    assert [b.name for b in c.blocks] == ["layers.0", "layers.1", "layers.2"]
    assert any(n.name == "embed" for n in c.prologue) and any(n.name == "head" for n in c.epilogue)
    for b in c.blocks:
        assert {w.name.rsplit(".", 2)[-2] for w in b.weights} == {"norm", "fc1", "fc2"}
        assert len(b.outputs) == 1 and len(b.inputs) == 1          # the residual stream in, and out


# --- the pass -------------------------------------------------------------------------------------
def _compressed(stack, recipe, calibration):
    return PassManager(recipe).run(stack, PassContext(calibration=calibration))


def test_reconstruction_brings_int3_back_towards_the_model_on_inputs_it_never_saw(stack):
    calibration, fresh = _data(8, 1), _data(4, 99)
    rtn = [QuantizeRTN(format="int3", group_size=16, ragged_groups=True)]
    one_shot = _compressed(stack, rtn, calibration)
    pm = PassManager(rtn + [Reconstruct(steps=150, lr=3e-3)])
    ctx = PassContext(calibration=calibration)
    recovered = pm.run(stack, ctx)
    assert _error(recovered, stack, fresh) < 0.6 * _error(one_shot, stack, fresh)
    for name, v in one_shot.weights.items():                     # same encodings, same bytes, same codes
        r = recovered.weights[name].encoding
        assert type(r) is type(v.encoding) and r.nbytes == v.encoding.nbytes
        if isinstance(r, IntQuant):
            assert torch.equal(r.int_codes(), v.encoding.int_codes())
    figs = pm.records[-1].figures
    assert figs["blocks"] == 3 and set(figs["loss_curve"]) == {"layers.0", "layers.1", "layers.2"}
    assert all(s["after"] < s["before"] for s in figs["held_out_error"].values())
    assert ctx.reference is None                                  # the PassManager lets go of the teacher


def test_learned_rounding_moves_codes_one_step_on_the_grid_and_beats_scales_alone(stack):
    calibration, fresh = _data(8, 1), _data(4, 99)
    rtn = [QuantizeRTN(format="int3", group_size=16, ragged_groups=True)]
    one_shot = _compressed(stack, rtn, calibration)
    scales = _compressed(stack, rtn + [Reconstruct(steps=150, lr=3e-3)], calibration)
    pm = PassManager(rtn + [Reconstruct(steps=150, lr=3e-3, rounding=True)])
    learned = pm.run(stack, PassContext(calibration=calibration))
    assert _error(learned, stack, fresh) < _error(scales, stack, fresh)
    moved = 0
    for name, v in one_shot.weights.items():
        r = learned.weights[name].encoding
        assert type(r) is type(v.encoding) and r.nbytes == v.encoding.nbytes
        if isinstance(r, IntQuant):
            step = r.int_codes() - v.encoding.int_codes()
            assert int(step.abs().max()) <= 1 and int(r.int_codes().abs().max()) <= 3   # int3's grid: -3..3
            moved += int(step.ne(0).sum())
    assert moved == pm.records[-1].figures["codes_moved"] > 0


def test_learned_rounding_keeps_zero_points_and_act_order_permutation():
    from nnforge.passes.recover.free import Tunable
    w = _w(16, 64)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    rtn = IntQuant.quantize(w, 3, group_size=16, symmetric=False)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    enc = IntQuant.from_codes(rtn.int_codes()[:, perm], rtn.scale, bits=3, signed=False, shape=(16, 64), group_size=16,
                              zero_point=rtn.zero_point, perm=perm)      # columns stored in another order
    t = Tunable(enc, rounding=True)
    assert torch.allclose(t.weight(), enc.decode(torch.float32)) and t.size == enc.scale.numel() + w.numel()

    def err(v):
        return float(((x @ (v - w).T) ** 2).mean())
    opt = torch.optim.Adam(t.deltas, lr=2e-2)
    for _ in range(60):
        opt.zero_grad()
        ((x @ (t.weight() - w).T) ** 2).mean().backward()
        opt.step()
    tuned = t.encoding()
    assert torch.equal(tuned.zero_point, enc.zero_point) and torch.equal(tuned.perm, perm) and tuned.bits == 3
    assert torch.allclose(tuned.decode(torch.float32), t.weight().detach(), atol=1e-3)
    assert t.rounding.moved() > 0 and err(tuned.decode(torch.float32)) < err(enc.decode(torch.float32))


def test_learned_rounding_starts_where_the_float_weight_falls_on_the_grid():
    """From RTN codes the latent offset starts at each weight's rounding residual, so the weight is
    the one-shot one and codes near a boundary are a small push from flipping."""
    from nnforge.passes.recover.free import Tunable
    w = _w(16, 64)
    enc = IntQuant.quantize(w, 3, group_size=16)
    t = Tunable(enc, rounding=True, start=w)
    scale = enc.scale[:, torch.arange(64) // 16]
    residual = w / scale - enc.int_codes()
    assert torch.allclose(t.rounding.offset.detach(), residual.clamp(-0.49, 0.49), atol=1e-5)
    assert float(residual.abs().max()) > 0.4 and torch.allclose(t.weight(), enc.decode(torch.float32))
    assert t.rounding.moved() == 0


def test_the_loss_weighs_each_token_by_its_own_size():
    """A decoder's attention-sink token is far larger than the rest: the same relative error on it
    and on an ordinary token must cost the same."""
    from nnforge.passes.recover.train import relative_error
    want = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
    want[0, 0] *= 100.0                                          # the sink
    sink, ordinary = want.clone(), want.clone()
    sink[0, 0] *= 1.1
    ordinary[0, 3] *= 1.1
    assert float(relative_error(sink, want)) == pytest.approx(float(relative_error(ordinary, want)), rel=1e-3)
    assert float(relative_error(want, want)) == 0.0
    assert float(relative_error(torch.tensor([2.0]), torch.tensor([1.0]))) == pytest.approx(1.0)


def test_reconstruction_is_deterministic_with_a_seed(stack):
    calibration = _data(4, 1)
    runs = [PassManager([QuantizeRTN(format="int3", group_size=16, ragged_groups=True), Reconstruct(steps=20, lr=3e-3)]).run(
        stack, PassContext(calibration=calibration, seed=5)) for _ in range(2)]
    for name, v in runs[0].weights.items():
        for part, t in v.encoding.tensors().items():
            assert torch.equal(t, runs[1].weights[name].encoding.tensors()[part]), (name, part)


def test_a_sparse_then_reconstructed_stack_keeps_its_mask(stack):
    calibration = _data(6, 1)
    pm = PassManager(resolve_recipe("sparse24")[1] + [Reconstruct(steps=30, lr=3e-3)])
    g = pm.run(stack, PassContext(calibration=calibration))
    one_shot = _compressed(stack, resolve_recipe("sparse24")[1], calibration)
    for name, v in g.weights.items():
        if isinstance(v.encoding, Sparse):
            assert torch.equal(v.encoding.mask(), one_shot.weights[name].encoding.mask())
    assert _error(g, stack, _data(3, 50)) < _error(one_shot, stack, _data(3, 50))


@pytest.mark.parametrize("opts, msg", [({"steps": 0}, "budget of zero"), ({"budget_s": 0}, "budget of zero"),
                                       ({"lr": 0}, "lr must be positive"), ({"held_out": 1.0}, "held_out"),
                                       ({"rounding": "yes"}, "rounding must be true or false")])
def test_options_are_checked(opts, msg):
    with pytest.raises(PassError, match=msg):
        Reconstruct(**opts)


@pytest.mark.parametrize("n", [2, 5, 10, 109])
def test_held_out_batches_are_spread_over_the_calibration_set(n):
    """Length-sorted calibration sets would otherwise choose the step kept on their longest inputs."""
    train, held = Reconstruct().split(n, PassContext(), "reconstruct")
    assert sorted(train + held) == list(range(n)) and not set(train) & set(held)
    assert len(held) == max(1, round(0.2 * n))
    if len(held) > 1:
        assert held[0] <= n // 4 and held[-1] >= 3 * n // 4


def test_an_uncompressed_model_is_refused(stack):
    with pytest.raises(PassError, match="nothing to recover.*after a compression pass"):
        PassManager([Reconstruct(steps=5)]).run(stack, PassContext(calibration=_data(2, 1)))


def test_encodings_with_nothing_free_are_refused_naming_them(stack):
    with pytest.raises(PassError, match=r"\(e2m1 block 32 e8m0 scales\) leave no parameter free"):
        PassManager([QuantizeRTN(format="mxfp4"), Reconstruct(steps=5)]).run(stack, PassContext(calibration=_data(2, 1)))


def test_too_little_calibration_is_a_warning_naming_the_ratio(stack):
    pm = PassManager([QuantizeRTN(format="int3", group_size=16, ragged_groups=True), Reconstruct(steps=2)])
    ctx = PassContext(calibration=[(torch.randn(2, 8),), (torch.randn(2, 8),)])
    pm.run(stack, ctx)
    (warning,) = [w for w in pm.records[-1].warnings if "calibration too small" in w]
    assert "layers.0 has" in warning and "calibration output values per tuned parameter" in warning


@pytest.mark.parametrize("recipe", ["w3-gptq+rec", "sparse24+rec", "palettize-3+rec", "rot+w4-gptq+rec",
                                    "w4-gptq+rec+kv4", "block-sparse-80+distill", "sparse24+rec+distill"])
def test_recovery_presets_resolve_after_the_compression(recipe):
    passes = resolve_recipe(recipe)[1]
    names = [p.name for p in passes]
    first = min(names.index(n) for n in ("reconstruct", "distill") if n in names)
    assert first > 0 and all(p.rewrites_state or p.name in ("reconstruct", "distill") for p in passes[first:])


@pytest.mark.parametrize("recipe, msg", [("rec+w3-gptq", "quantize_gptq would come after it"),
                                         ("w3-gptq+rec+sparse24", "prune_sparsegpt would come after it")])
def test_a_recovery_preset_before_what_it_recovers_is_refused(recipe, msg):
    with pytest.raises(PassError, match=f"a recovery preset goes after the presets it recovers.*{msg}"):
        resolve_recipe(recipe)


@pytest.mark.parametrize("pattern, fmt", [("2:4", None), ("block4x1", None), ("unstructured", None), ("2:4", "int4")])
def test_sparse_tunables_decode_as_the_encoding_with_and_without_row_scales(pattern, fmt):
    from nnforge.passes.prune.sparsity import PruneMagnitude
    opts = {"pattern": pattern, **({"sparsity": 0.75} if pattern != "2:4" else {})}
    enc = PruneMagnitude(**opts)(_single_linear()).weights["fc.weight"].encoding
    if fmt:                                                        # kept values quantised, as sparse24-w4 stores them
        enc = dataclasses.replace(enc, values=quantize_rtn(enc.values.decode(), parse_format(fmt, group_size=16)))
    for e in (enc, dataclasses.replace(enc, row_scale=torch.rand(16) + 0.5)):
        t = Tunable(e)
        assert torch.equal(t.weight(), e.decode())
        with torch.no_grad():
            for d in t.deltas:
                d.add_(0.03)
        assert torch.allclose(t.weight().detach(), t.encoding().decode(), rtol=1e-6, atol=1e-9)


# --- distillation ---------------------------------------------------------------------------------
def test_distillation_brings_int3_back_on_inputs_it_never_saw(stack):
    calibration, fresh = _data(8, 1), _data(4, 99)
    rtn = [QuantizeRTN(format="int3", group_size=16, ragged_groups=True)]
    one_shot = _compressed(stack, rtn, calibration)
    pm = PassManager(rtn + [Distill(steps=120, lr=3e-3)])
    recovered = pm.run(stack, PassContext(calibration=calibration))
    assert _error(recovered, stack, fresh) < 0.6 * _error(one_shot, stack, fresh)
    figs = pm.records[-1].figures
    assert figs["held_out_error"]["after"] < figs["held_out_error"]["before"] and len(figs["loss_curve"]) > 2


def test_gradual_pruning_ends_at_the_recipes_sparsity_and_pattern(stack):
    from nnforge.passes.prune.sparsity import PruneMagnitude
    calibration, fresh = _data(8, 1), _data(4, 99)
    prune = [PruneMagnitude(pattern="block4x1", sparsity=0.8)]
    one_shot = _compressed(stack, prune, calibration)
    pm = PassManager(prune + [Distill(steps=90, lr=3e-3, gradual=3, gradual_steps=45)])
    g = pm.run(stack, PassContext(calibration=calibration))
    sparse = [n for n, v in one_shot.weights.items() if isinstance(v.encoding, Sparse)]
    assert sparse
    for n in sparse:
        a, b = one_shot.weights[n].encoding, g.weights[n].encoding
        assert isinstance(b, Sparse) and b.pattern == a.pattern and b.values.numel == a.values.numel
    in_blocks = [n for n in sparse if n.startswith("layers.")]   # embed and head lie outside the blocks
    assert pm.records[-1].figures["gradual"] == {"stages": 3, "steps": 45, "weights": len(in_blocks)}
    assert pm.records[-1].figures["held_out_error"]["step_kept"] >= 31       # never from before the last stage
    assert _error(g, stack, fresh) < _error(one_shot, stack, fresh)


def test_gradual_pruning_without_block_sparsity_is_left_out_with_a_warning(stack):
    pm = PassManager([QuantizeRTN(format="int3", group_size=16, ragged_groups=True), Distill(steps=4, gradual=2,
                                                                                             gradual_steps=2)])
    pm.run(stack, PassContext(calibration=_data(3, 1)))
    assert any("gradual=2 left out" in w for w in pm.records[-1].warnings)


@pytest.mark.parametrize("opts, msg", [({"steps": 0}, "budget of zero"), ({"hidden": -1}, "hidden"),
                                       ({"temperature": 0}, "temperature"),
                                       ({"steps": 10, "gradual": 4, "gradual_steps": 10}, "gradual_steps must leave"),
                                       ({"steps": 10, "gradual": 4, "gradual_steps": 2}, "between 4 and steps - 1")])
def test_distill_options_are_checked(opts, msg):
    with pytest.raises(PassError, match=msg):
        Distill(**opts)


def test_logits_are_distilled_by_kl_divergence():
    d = Distill()
    logits = torch.randn(2, 5, 11)
    assert float(d._output_loss("logits", logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(d._output_loss("logits", logits, logits + 3.0)) == pytest.approx(0.0, abs=1e-5)   # shift-invariant
    assert float(d._output_loss("logits", logits, logits * 2)) > 0


def test_a_recovered_recipe_compiles_verifies_and_runs_as_the_interpreter(tmp_path):
    import nnforge as nf
    torch.manual_seed(0)
    model = _Stack().eval()
    calibration = _data(6, 1)
    recipe = [{"preset": "w3-gptq"}, {"preset": "rec", "steps": 10, "lr": 0.003}]
    bundle = nf.compile(model, "onnx", recipe, example_inputs=calibration[0], calibration=calibration,
                        out=tmp_path / "b")
    nf.verify(bundle.path)
    (rec,) = [p for p in bundle.manifest["passes"] if p["name"] == "reconstruct"]
    assert set(rec["figures"]["loss_curve"]) == {"layers.0", "layers.1", "layers.2"}
    from nnforge.cli import describe_bundle                       # nnforge inspect BUNDLE
    (line,) = [x for x in describe_bundle(bundle) if x.startswith("  reconstruct:")]
    assert "3 blocks, held-out error" in line and "the worst block layers." in line and "parameters tuned" in line
    x = _data(1, 77)[0][0]
    got = torch.as_tensor(nf.load(bundle.path)(x.numpy()))
    torch.testing.assert_close(got, run_graph(bundle.graph(), [x])[0], rtol=1e-4, atol=1e-5)


def test_a_decoder_with_dynamic_activations_is_reconstructed_per_layer_and_compiles(tmp_path):
    """A tiny Llama through nf.compile with w4a8+rec: the blocks are its layers (their caches among
    the outputs matched), activation rounding passes gradients straight through, and the bundle runs."""
    import nnforge as nf
    from tests.frontend.decoders.families import llama_directory
    root = llama_directory(tmp_path / "llm", words=300)
    recipe = [{"preset": "w4a8"}, {"preset": "rec", "steps": 12, "eval_every": 4, "lr": 0.001}]
    bundle = nf.compile(root / "model", "onnx", recipe, calibration=root / "calib.txt", out=tmp_path / "b", max_len=32)
    (rec,) = [p for p in bundle.manifest["passes"] if p["name"] == "reconstruct"]
    errors = rec["figures"]["held_out_error"]
    assert list(errors) == [f"model.layers.{i}" for i in range(len(errors))] and len(errors) >= 2
    assert all(e["after"] <= e["before"] for e in errors.values())
    assert any(e["after"] < e["before"] for e in errors.values())
    assert nf.verify(bundle.path)["passed"]


def test_inspect_says_what_distillation_did():
    from nnforge.cli import recovery_lines
    m = {"passes": [{"name": "distill", "figures": {"tuned_parameters": 1200, "seconds": 3.5,
                                                    "held_out_error": {"before": 0.28, "after": 0.18,
                                                                       "step_kept": 260, "steps": 300}}},
                    {"name": "quantize_gptq", "figures": {}}]}
    assert recovery_lines(m) == ["  distill: held-out loss 0.28 -> 0.18 (step 260 of 300 kept); 1200 parameters "
                                 "tuned in 3.5 s"]


@pytest.mark.parametrize("recovery", [Reconstruct(steps=2), Distill(steps=2)])
def test_a_teacher_without_the_students_block_outputs_is_refused_naming_the_value(stack, recovery):
    student = QuantizeRTN(format="int3", group_size=16, ragged_groups=True)(stack.copy())
    teacher = stack.copy()
    out = cut(teacher).blocks[0].outputs[0]
    name = out.name
    teacher.rename(out, f"{name}_moved")                         # as a structural pass in between would
    ctx = PassContext(calibration=_data(3, 1))
    ctx.reference = teacher
    with pytest.raises(PassError, match=f"{name} is not in the model before compression"):
        recovery.run(student, ctx)

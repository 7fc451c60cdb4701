"""A decoder for the apple targets: the stateful multifunction package (KV cache as Core ML state,
prefill and decode sharing weight blobs), its weights per output channel, the compute units the
manifest gives each weight form, and generation through the saved MIL program evaluated in numpy
(mil_numpy), token for token against the reference interpreter."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import nnforge as nf
from nnforge.backends.base import BackendError
from nnforge.backends.coreml.capabilities import OFF_ANE
from nnforge.backends.coreml.mil_numpy import program_runner
from nnforge.generation import DecoderRunner, generate
from nnforge.ir import Interpreter
from nnforge.passes.recipes import per_channel_scales
from tests.frontend.decoders.families import llama_directory, tiny_model


@pytest.fixture(scope="module")
def w4_bundle(tmp_path_factory):
    root = llama_directory(tmp_path_factory.mktemp("coreml-llm"), words=600)
    return nf.compile(root / "model", "apple-a17", "w4-gptq", calibration=root / "calib.txt", out=root / "b",
                      max_len=64)


def _reference(bundle) -> DecoderRunner:
    m, graph = bundle.manifest, bundle.graph()
    sig = m["signature"]
    return DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), m["decoder"], [i["name"] for i in sig["inputs"]],
                         [o["name"] for o in sig["outputs"]])


def test_w4_gptq_decoder_is_a_stateful_package_that_generates_like_the_interpreter(w4_bundle):
    m = w4_bundle.manifest
    entry = m["backend"]["entry"]
    assert entry["stateful"] and entry["default_function"] == "decode"
    assert {fn: f["tokens"] for fn, f in entry["functions"].items()} == {"prefill": 32, "decode": 1}
    assert [s["input"] for s in entry["state"]] == [f"cache.{i}.{k}" for i in range(2) for k in "kv"]
    assert entry["state"][0]["shape"] == [1, 2, 64, 16] and entry["state"][0]["dtype"] == "float16"
    # the apple targets take the preset per output channel, and every form is meant for the Neural Engine too
    gptq = next(p for p in m["recipe"]["passes"] if p["pass"] == "quantize_gptq")
    assert gptq["group_size"] is None
    forms = entry["weight_forms"]
    assert any(f["form"].startswith("constexpr_blockwise_shift_scale") for f in forms)
    assert all(f["compute_units"] == ["cpu", "gpu", "ane"] for f in forms)
    assert entry["verify"]["shared_blobs"] >= 15        # both functions read each quantised layer's blobs
    assert nf.verify(w4_bundle.path)["passed"]
    check = entry["verify"]["program_check"]        # at compile time: a prefill chunk, then decode steps
    assert (check["prefill_tokens"], check["decode_steps"], check["argmax_equal"]) == (32, 3, 1.0)
    assert check["cosine_min"] >= check["tolerance"]["cosine_min"]
    assert check["against"].startswith("the bundle graph's outputs on the held-out batch")
    lm, reference = program_runner(w4_bundle.path), _reference(w4_bundle)
    prompt = torch.randint(4, 128, (40,), generator=torch.Generator().manual_seed(3))
    for ids in (prompt[:6], prompt):                    # decode steps alone; one prefill chunk, then decode
        got = generate(lm.decoder(), ids, 16, stop_tokens=[])
        want = generate(reference.decoder(resident=False), ids, 16, stop_tokens=[])
        assert got.tokens == want.tokens
    # the logits of the fp16 program against the fp32 interpreter's, and the state read back as the graph's caches
    inputs = {"input_ids": prompt[None, :34].numpy(), "positions": np.arange(34)[None]}
    graph = w4_bundle.graph()
    zeros = {v.name: np.zeros([1, *v.shape[1:]], np.float32) for v in graph.inputs if v.name.startswith("cache.")}
    outs = lm.runner(*[{**inputs, **zeros}[n] for n in lm.runner.input_names])
    want = Interpreter(graph).run(*[torch.as_tensor({**inputs, **zeros}[v.name]) for v in graph.inputs])
    a, b = outs[0].ravel(), np.asarray(want[0]).ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.999
    assert np.abs(outs[1][:, :, :34] - np.asarray(want[1])[:, :, :34]).max() < 0.05
    assert not outs[1][:, :, 34:].any()


def test_a_batch_runs_a_state_per_sequence_and_positions_past_the_cache_are_refused(w4_bundle):
    lm = program_runner(w4_bundle.path)
    decoder = lm.decoder()
    both = decoder.prefill(torch.tensor([[5, 6, 7], [9, 10, 11]]))
    assert torch.equal(decoder.step(torch.tensor([12, 13]))[1], _alone(lm, [9, 10, 11, 13]))
    assert torch.equal(both[0], lm.decoder().prefill(torch.tensor([[5, 6, 7]]))[0])
    assert list(decoder.cache["cache.0.k"].shape) == [2, 2, 64, 16]
    # a fork writes each copy's state: sequence 1's copies step as it would alone
    decoder.fork(2)
    assert torch.equal(decoder.step(torch.tensor([1, 2, 3, 14]))[3], _alone(lm, [9, 10, 11, 13, 14]))
    state = lm.runner.engine.new_state()
    with pytest.raises(BackendError, match="positions 63..64 reach outside the cache's 64 slots"):
        lm.runner.tokens(state, np.array([[5, 6]]), np.array([[63, 64]]))


def test_the_compile_time_program_check_catches_a_program_that_computes_something_else(w4_bundle, monkeypatch):
    from nnforge.backends.coreml import mil_numpy
    entry = w4_bundle.manifest["backend"]["entry"]
    inputs, expected, _ = w4_bundle.reference()
    path = w4_bundle.path / entry["model"]
    assert mil_numpy.program_check(path, entry, w4_bundle.graph(), inputs)["argmax_equal"] == 1.0
    monkeypatch.setitem(mil_numpy.OPS._entries, "silu", lambda a: a["x"])     # the MLP's gate without its silu
    for given in (None, expected):          # the interpreter run here, or the compile's expected outputs
        with pytest.raises(BackendError, match=r"the saved program of graph model, evaluated in numpy over 35 tokens "
                                               r"\(prefill 32, then decode\), disagrees with the reference interpreter"):
            mil_numpy.program_check(path, entry, w4_bundle.graph(), inputs, given)


def _alone(lm, ids):
    decoder = lm.decoder()
    decoder.prefill(torch.tensor([ids[:-1]]))
    return decoder.step(torch.tensor([ids[-1]]))[0]


def test_a_malformed_stateful_entry_is_refused():
    from nnforge.backends.coreml.stateful import StatefulRunner
    with pytest.raises(BackendError, match="coreml backend entry of a stateful decoder is malformed"):
        StatefulRunner(None, {"state": [], "functions": {}})


def test_program_runner_refuses_a_bundle_that_is_not_a_stateful_coreml_decoder(tmp_path):
    bundle = nf.compile(tiny_model("llama"), "onnx", out=tmp_path / "b", max_len=16)
    with pytest.raises(BackendError, match="not a stateful coreml decoder bundle \\(backend 'onnx'\\)"):
        program_runner(bundle.path)


def test_a_bad_prefill_chunk_is_refused_naming_the_target(tmp_path):
    target = nf.target("apple-a17").with_options(prefill_chunk=0)
    with pytest.raises(BackendError, match="target apple-a17: prefill_chunk must be a positive integer, got 0"):
        nf.compile(tiny_model("llama"), target, out=tmp_path / "b", max_len=16)
    assert not (tmp_path / "b").exists()


def test_presets_go_per_channel_on_the_apple_targets():
    assert per_channel_scales([{"pass": "quantize_rtn", "format": "uint4", "group_size": 128},
                               {"pass": "palettize", "bits": 4, "group_size": 1},
                               {"pass": "quantize_gptq", "format": "mxfp4"}], "per_channel") == [
        {"pass": "quantize_rtn", "format": "uint4", "group_size": None},
        {"pass": "palettize", "bits": 4, "group_size": 1}, {"pass": "quantize_gptq", "format": "mxfp4"}]
    from nnforge.passes import PassError
    with pytest.raises(PassError, match="target option preset_scales must be one of per_channel, got 'blocks'"):
        per_channel_scales([], "blocks")


@pytest.mark.slow      # a second decoder compile (two functions) for the reporting alone
def test_a_per_block_recipe_is_reported_off_the_neural_engine(tmp_path):
    # a recipe that lists its own groups keeps them: the manifest says where that form is meant to run
    recipe = [{"pass": "quantize_rtn", "format": "uint4", "group_size": 32, "ops": ["linear"]}]
    bundle = nf.compile(tiny_model("llama"), "apple-m2", recipe, out=tmp_path / "b", max_len=16, head="recipe")
    forms = {f["form"]: f for f in bundle.manifest["backend"]["entry"]["weight_forms"]}
    blocked = forms["constexpr_blockwise_shift_scale (per-block)"]
    assert blocked["compute_units"] == ["cpu", "gpu"] and blocked["why"] == OFF_ANE and blocked["weights"] >= 14
    assert "#2510" in OFF_ANE


@pytest.mark.parametrize("recipe,message", [
    ("kv8", "the coreml backend cannot run the encoded KV cache of 4 cache(s) on apple-a17: cache.0.k of layer "
            "model.layers.0.self_attn (kv8: the coreml capability table has no kv_cache_write row for kv8)"),
    ("kv-evict-8", "the coreml backend's stateful decoder takes input_ids, positions and the KV cache; graph llama "
                   "has input(s) slots"),
])
def test_what_the_stateful_package_cannot_hold_is_refused_before_a_bundle_is_written(tmp_path, recipe, message):
    with pytest.raises(BackendError) as e:
        nf.compile(tiny_model("llama"), "apple-a17", recipe, out=tmp_path / "b", max_len=16)
    assert message in str(e.value)
    assert not (tmp_path / "b").exists()


def _two_functions(tmp_path, same: bool):
    """A multifunction package whose functions read a weight named w: one blob, or two that differ."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types
    for fn, value in (("a", 1.0), ("b", 1.0 if same else 2.0)):
        with Function({"x": mb.placeholder(shape=(1, 8), dtype=types.fp16)}, ct.target.iOS18) as f:
            w = mb.const(val=np.full((8, 8), value, np.float16), name="w")
            f.set_outputs([mb.linear(x=f.inputs["x"], weight=w, name="y")])
        prog = Program()
        prog.add_function("main", f)
        ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                   skip_model_load=True).save(str(tmp_path / f"{fn}.mlpackage"))
    desc = ct.utils.MultiFunctionDescriptor()
    for fn in "ab":
        desc.add_function(str(tmp_path / f"{fn}.mlpackage"), src_function_name="main", target_function_name=fn)
    desc.default_function_name = "a"
    ct.utils.save_multifunction(desc, str(tmp_path / "m.mlpackage"))
    return tmp_path / "m.mlpackage"


def test_functions_that_hold_a_weight_twice_are_caught(tmp_path):
    from nnforge.backends.coreml.verify import CoreMLVerifyError, check_shared
    assert check_shared(_two_functions(tmp_path / "same", True), ["w"], ["a", "b"]) == 1
    with pytest.raises(CoreMLVerifyError, match=r"functions a and b read 1 stored tensor\(s\) from different blobs "
                                                r"\(first: w\); the package holds the weights twice"):
        check_shared(_two_functions(tmp_path / "apart", False), ["w"], ["a", "b"])


def test_the_numpy_evaluator_names_what_it_cannot_run(tmp_path, monkeypatch):
    from nnforge.backends.coreml import mil_numpy
    from nnforge.backends.coreml.verify import CoreMLVerifyError, load_program
    evaluator = mil_numpy.ProgramEvaluator(load_program(_two_functions(tmp_path, True)))
    x = np.ones((1, 8), np.float16)
    assert np.array_equal(evaluator.run("a", {"x": x}, {})["y"], np.full((1, 8), 8, np.float16))
    with pytest.raises(CoreMLVerifyError, match=r"the program has no function 'c' \(it has a, b\)"):
        evaluator.run("c", {"x": x}, {})
    with pytest.raises(CoreMLVerifyError, match="function a: input x not given"):
        evaluator.run("a", {}, {})
    assert evaluator.first_overflow is None
    evaluator.run("a", {"x": np.full((1, 8), 3e4, np.float16)}, {})        # 8 x 3e4 is past fp16's range
    assert evaluator.first_overflow == "linear y in function a (its inputs reach 3e+04)"
    monkeypatch.delitem(mil_numpy.OPS._entries, "linear")       # as if the lowering emitted an op it has no rule for
    with pytest.raises(CoreMLVerifyError, match=r"function a: the numpy MIL evaluator has no rule for op linear \(y\)"):
        evaluator.run("a", {"x": x}, {})


def test_hidden_states_past_fp16s_square_root_range_are_normalised_without_overflow(tmp_path):
    """An fp16 RMS norm that squares its input overflows once a hidden state passes 256 (Gemma 3
    270M's do); the coreml rule normalises by the row's largest value first, so the program
    check (the saved program in numpy against the interpreter) passes and sees no overflow."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(300)
        hidden = model(torch.tensor([[5, 6, 7, 8]]), output_hidden_states=True).hidden_states[1]
    assert hidden.abs().max() > 256
    unscaled = nf.target("apple-a17").with_options(residual_scale=None)      # the rule alone, the stream as it is
    bundle = nf.compile(model, unscaled, out=tmp_path / "b", max_len=48)
    check = bundle.manifest["backend"]["entry"]["verify"]["program_check"]
    assert "first_overflow" not in check and check["cosine_min"] >= check["tolerance"]["cosine_min"]

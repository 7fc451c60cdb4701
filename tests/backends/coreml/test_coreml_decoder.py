"""A decoder for the apple targets: the stateful multifunction package (KV cache as Core ML state,
prefill and decode sharing weight blobs), its weights per output channel, the compute units the
manifest gives each weight form, and generation through the saved MIL program evaluated in numpy
(mil_numpy), token for token against the reference interpreter."""
from __future__ import annotations

import json
import random

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
from tests.frontend.decoders.families import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def w4_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml-llm")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    r = random.Random(0)
    (root / "calib.txt").write_text(" ".join(f"w{r.randrange(4, 128)}" for _ in range(600)))
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


def test_the_stateful_runner_refuses_a_batch_and_positions_past_the_cache(w4_bundle):
    lm = program_runner(w4_bundle.path)
    with pytest.raises(BackendError, match=r"batch \[2\]: the stateful Core ML package holds one sequence"):
        lm.decoder().prefill(torch.tensor([[5, 6], [7, 8]]))
    state = lm.runner.engine.new_state()
    with pytest.raises(BackendError, match="positions 63..64 reach outside the cache's 64 slots"):
        lm.runner.tokens(state, np.array([[5, 6]]), np.array([[63, 64]]))


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

"""Decoders on the hls backend: a small random-init Llama decodes token by token with its KV cache
in the design's off-chip memory (nnforge/backends/hls/decoder.py), the bit-accurate emulation
against the reference interpreter (fast), and the C-simulation of the compiled bundle, prefill and
decode designs with the cache kept between calls, against that emulation (slow: each design is a
g++ build)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import nnforge as nf
from nnforge.backends.base import BackendError, get_backend
from nnforge.backends.hls import HlsRunner, static_graph
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.frontend.decoders.importer import import_decoder
from nnforge.generation import DecoderRunner, generate
from nnforge.ir import Interpreter
from tests import conftest
from tests.frontend.decoders.families import tiny_model, tiny_tokenizer
from tests.passes.graphs import decoder_block, decoder_inputs

MAX_LEN = 32
PROMPT = torch.tensor([3, 99, 12, 45, 7, 88, 20])     # one whose greedy tokens vary on the tiny model


def _runners(graph, section):
    """(the reference interpreter's decoder runner, the hls design's emulation as one)."""
    names = [v.name for v in graph.inputs], [v.name for v in graph.outputs]
    static, env = static_graph(graph, None, {v.name: [1, *v.shape[1:]] if v.name.startswith("cache") else [1, 1]
                                             for v in graph.inputs})
    hls = HlsRunner(graph, HlsOptions(), env, build_plan(static, HlsOptions()), None)
    reference = DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), section, *names)
    emulated = DecoderRunner(lambda *xs: hls.emulate([np.asarray(x) for x in xs]), section, *names)
    return reference, emulated, hls


@pytest.fixture(scope="module")
def llama():
    imported = import_decoder(tiny_model("llama"), max_len=MAX_LEN)
    return imported.graph, imported.manifest_section()


def test_emulated_design_generates_as_the_interpreter(llama):
    """16 greedy tokens after a 6-token prefill, then one at a time: the design's fixed point
    (24-bit activations, 16 fractional bits) keeps the logits within a few LSBs of float32, so the
    random-init model's tokens are the interpreter's."""
    graph, section = llama
    reference, emulated, hls = _runners(graph, section)
    want = generate(reference.decoder(resident=False), PROMPT, 16, stop_tokens=[]).tokens
    got = generate(emulated.decoder(resident=False), PROMPT, 16, stop_tokens=[]).tokens
    assert got == want and len(set(want)) > 2
    feeds = [torch.tensor([[1, 17, 42, 9, 77, 5, 33, 100]]), torch.arange(8)[None]] + \
        [torch.zeros(1, *v.shape[1:]) for v in graph.inputs[2:]]
    diff = np.abs(hls.emulate([x.numpy() for x in feeds])[0] - Interpreter(graph).run(*feeds)[0].numpy())
    assert diff.max() < 2e-3
    plan = hls.plan
    assert [layer.kernel or type(layer).__name__ for layer in plan.layers if type(layer).__name__ in
            ("Rope", "KvWrite", "Attention")].count("KvWrite") == 4
    assert plan.state == [(f"cache.{i}.{k}", f"cache.{i}.{k}.next") for i in range(2) for k in "kv"]
    assert plan.inputs == ["input_ids", "positions"] and plan.outputs == ["logits"]
    from nnforge.backends.hls.resources import estimate
    est = estimate(plan)
    assert not est["unrated"] and "gmem2 (KV cache)" in est["interface"]["why"]
    # a key row a cycle: a multiplier per channel of the 16-channel heads in each attention
    assert all(r["dsp"] >= 16 for r in est["layers"] if r["kind"] == "Attention")


def test_a_w4_gptq_bundle_for_the_fpga_generates_as_the_interpreter(tmp_path):
    """nf.compile of the tiny Llama with w4-gptq for alveo-u280: its design's bit-accurate emulation
    (which the slow test holds the C-simulation to, bit for bit) generates the interpreter's 16
    greedy tokens on the bundle's own graph."""
    tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    r = random.Random(0)
    calibration = " ".join(f"w{r.randrange(4, 128)}" for _ in range(1200))
    bundle = nf.compile(tmp_path / "model", "alveo-u280", "w4-gptq", out=tmp_path / "b", max_len=MAX_LEN,
                        calibration=calibration)
    lm, graph = bundle.load(), bundle.graph()
    names = [v.name for v in graph.inputs], [v.name for v in graph.outputs]
    reference = DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), bundle.manifest["decoder"], *names)
    emulated = DecoderRunner(lambda *xs: lm.runner.emulate([np.asarray(x) for x in xs]), bundle.manifest["decoder"],
                             *names)
    want = generate(reference.decoder(resident=False), PROMPT, 16, stop_tokens=[]).tokens
    assert generate(emulated.decoder(resident=False), PROMPT, 16, stop_tokens=[]).tokens == want
    assert len(set(want)) > 2
    # the manifest carries the accelerator model's prefill and decode rates and resources for the
    # bundle's own graph: a prompt of half the cache, then decode steps to fill it
    sim = bundle.manifest["backend"]["entry"]["simulation"]
    assert (sim["prompt"], sim["generate"]) == (MAX_LEN // 2, MAX_LEN // 2)
    assert sim["prefill_tokens_per_s"] > 0 and sim["decode_tokens_per_s"] > 0
    assert {"DSP", "HBM"} <= set(sim["resources"])
    assert "decode throughput" in (bundle.path / "fpga" / "simulation.txt").read_text()


def test_positions_outside_the_cache_are_refused(llama):
    graph, section = llama
    _, _, hls = _runners(graph, section)
    feeds = [np.array([[3]]), np.array([[MAX_LEN]])] + [np.zeros((1, *v.shape[1:]), np.float32) for v in graph.inputs[2:]]
    with pytest.raises(BackendError, match=rf"input positions: positions {MAX_LEN}\.\.{MAX_LEN} are outside the KV "
                                           rf"cache of {MAX_LEN} slots written by node model.layers.0.self_attn.k_cache"):
        hls.emulate(feeds)


def test_a_cache_that_is_not_state_and_a_softcap_are_named(tmp_path):
    graph = decoder_block()
    shapes = {v.name: list(t.shape) for v, t in zip(graph.inputs, decoder_inputs(5, 0))}
    with pytest.raises(BackendError, match=r"node cache_update(\.\d+)? \(cache_update\): its cache cache is not a state "
                                           r"input with a cache.next output"):
        conftest.lower_into(get_backend("hls"), graph, "alveo-u280", tmp_path / "a", shapes=shapes)
    graph = decoder_block(softcap=20.0)
    graph.outputs[1].name = "cache.next"                   # the cache as state, as the decoder builder makes it
    with pytest.raises(BackendError, match=r"node attention(\.\d+)? \(attention\): a score softcap \(tanh\) is not "
                                           r"supported by the hls backend"):
        conftest.lower_into(get_backend("hls"), graph, "alveo-u280", tmp_path / "b", shapes=shapes)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [None, "w4-gptq", "w4-gptq+kv8"])
def test_csim_generates_token_by_token_as_the_emulation(tmp_path, monkeypatch, recipe):
    """nf.compile for alveo-u280; the C-simulation generates 16 tokens after the prompt (the prefill
    design, then the one-token decode design), the cache resident in the design's kv memory between
    calls and equal to the cache fed back through numpy; the tokens are the bit-accurate
    emulation's, and with fp32 weights the interpreter's. With kv8 the resident cache (packed codes
    and float16 scales) is the emulation's bit for bit."""
    monkeypatch.setenv("NNFORGE_HLS_CACHE", str(tmp_path / "hls-cache"))
    tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    r = random.Random(0)
    calibration = " ".join(f"w{r.randrange(4, 128)}" for _ in range(1200)) if recipe else None
    bundle = nf.compile(tmp_path / "model", "alveo-u280", recipe, out=tmp_path / "b", max_len=MAX_LEN,
                        calibration=calibration)
    lm = bundle.load()
    graph = bundle.graph()
    reference, emulated, _ = _runners(graph, bundle.manifest["decoder"])
    resident = lm.decoder()
    got = generate(resident, PROMPT, 16, stop_tokens=[]).tokens
    assert got == generate(lm.decoder(resident=False), PROMPT, 16, stop_tokens=[]).tokens
    emulated_runner = DecoderRunner(lambda *xs: lm.runner.emulate([np.asarray(x) for x in xs]), bundle.manifest["decoder"],
                                    [v.name for v in graph.inputs], [v.name for v in graph.outputs])
    emulated_decoder = emulated_runner.decoder(resident=False)
    assert got == generate(emulated_decoder, PROMPT, 16, stop_tokens=[]).tokens
    if recipe is None:
        assert got == generate(reference.decoder(resident=False), PROMPT, 16, stop_tokens=[]).tokens
    kv8 = recipe is not None and recipe.endswith("+kv8")
    if kv8:
        assert set(resident.cache) == set(emulated_decoder.cache)
        for name, state in emulated_decoder.cache.items():
            assert resident.cache[name].dtype == state.dtype and torch.equal(resident.cache[name], state), name
    cache = resident.cache["cache.1.v.codes" if kv8 else "cache.1.v"]
    assert cache.shape == (1, 2, MAX_LEN, 16) and bool(cache[:, :, :len(PROMPT) + 15].abs().sum(-1).gt(0).all())
    # a fork writes the fixed-point cache back into the design's kv memory, exactly
    plain = lm.decoder(resident=False)
    for d in (resident, plain):
        d.prefill(PROMPT[None])
        d.fork(2)
    torch.testing.assert_close(resident.step(torch.tensor([5, 9])), plain.step(torch.tensor([5, 9])), rtol=0, atol=0)

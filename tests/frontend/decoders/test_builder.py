"""The decoder-form graph of every family on the reference interpreter against transformers'
forward: a prompt's logits (prefill), then tokens one at a time through the cache (decode), past
every family's sliding window; greedy tokens identical to model.generate."""
from __future__ import annotations

import pytest
import torch

from nnforge.frontend.decoders import load_causal_lm, spec_from_config
from nnforge.frontend.decoders.builder import LOGITS, build, cache_shape, state_pairs
from nnforge.frontend.errors import FrontendError
from nnforge.ir import Interpreter, verify
from tests.frontend.decoders.families import CASES, VOCAB, tiny_model

MAX_LEN = 32


def _graph(name: str, max_len: int = MAX_LEN):
    model = tiny_model(name)
    loaded = load_causal_lm(model)
    spec = spec_from_config(loaded.config, max_len=max_len)
    return model, spec, build(spec, loaded.weights, max_len)


class Stepper:
    """Runs the decoder graph step by step, carrying its cache."""

    def __init__(self, spec, graph, batch: int, max_len: int = MAX_LEN):
        self.interp, self.spec = Interpreter(graph), spec
        self.cache = {inp: torch.zeros(cache_shape(spec, max_len, batch)) for inp, _ in state_pairs(spec)}

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        outs = self.interp.run({"input_ids": ids, "positions": positions, **self.cache})
        named = dict(zip([v.name for v in self.interp.graph.outputs], outs))
        for inp, out in state_pairs(self.spec):
            self.cache[inp] = named[out]
        return named[LOGITS]


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_then_decode_match_transformers(name):
    model, spec, graph = _graph(name)
    verify(graph)
    assert [v.name for v in graph.outputs] == [LOGITS] + [o for _, o in state_pairs(spec)]
    ids = torch.randint(4, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))     # windows: 16, 24
    with torch.no_grad():
        want = model(ids).logits
    step = Stepper(spec, graph, batch=2)
    prompt = 20
    got = step(ids[:, :prompt], torch.arange(prompt).repeat(2, 1))
    torch.testing.assert_close(got, want[:, :prompt], rtol=1e-4, atol=1e-4)
    for t in range(prompt, ids.shape[1]):
        got = step(ids[:, t:t + 1], torch.full((2, 1), t))
        torch.testing.assert_close(got[:, 0], want[:, t], rtol=1e-4, atol=1e-4)


def test_longrope_switches_tables_per_call_as_transformers_does():
    """Phi-3's longrope: short factors while a call's positions stay within the original context
    (32 here), long factors for a call past it; keys cached before the switch keep their rotation,
    exactly as transformers' cache does."""
    model, spec, graph = _graph("phi3", max_len=48)
    assert spec.layers[0].rope.switch_at == 32 and spec.layers[0].rope.long_inv_freq is not None
    ids = torch.randint(4, VOCAB, (1, 44), generator=torch.Generator().manual_seed(2))
    step = Stepper(spec, graph, batch=1, max_len=48)
    prompt = 20
    with torch.no_grad():
        out = model(ids[:, :prompt], use_cache=True)
        torch.testing.assert_close(step(ids[:, :prompt], torch.arange(prompt)[None]), out.logits, rtol=1e-4, atol=1e-4)
        cache = out.past_key_values
        for t in range(prompt, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            got = step(ids[:, t:t + 1], torch.full((1, 1), t))
            torch.testing.assert_close(got, out.logits, rtol=1e-4, atol=1e-4, msg=f"position {t}")
        # a prompt past the original context in one call: long factors for all of it
        step = Stepper(spec, graph, batch=1, max_len=48)
        torch.testing.assert_close(step(ids[:, :40], torch.arange(40)[None]), model(ids[:, :40]).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2", "phi3"])
def test_greedy_tokens_equal_generate(name):
    model, spec, graph = _graph(name)
    prompt = torch.tensor([[1, 17, 42, 99, 5]])
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, prompt.shape[1]:]
    step = Stepper(spec, graph, batch=1)
    logits = step(prompt, torch.arange(prompt.shape[1])[None])
    tokens = []
    for t in range(20):
        tokens.append(int(logits[0, -1].argmax()))
        logits = step(torch.tensor([[tokens[-1]]]), torch.tensor([[prompt.shape[1] + t]]))
    assert tokens == want.tolist()


def test_layers_are_linear_nodes_named_after_the_modules():
    _, spec, graph = _graph("llama")
    linears = {n.name for n in graph.nodes if n.op == "linear"}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"} <= linears
    head = graph.node("lm_head")
    assert head.inputs[1] is graph.weights["model.embed_tokens.weight"]        # tied: one value
    fused = {n.name for n in _graph("phi3")[2].nodes if n.op == "linear"}
    assert "model.layers.0.self_attn.qkv_proj" in fused and "model.layers.0.mlp.gate_up_proj" in fused


def test_errors_name_what_is_wrong():
    model = tiny_model("llama")
    loaded = load_causal_lm(model)
    spec = spec_from_config(loaded.config)
    with pytest.raises(FrontendError, match="needs a static cache length: give max_len"):
        build(spec, loaded.weights)
    weights = dict(loaded.weights)
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(FrontendError, match=r"has no tensor 'model.layers.1.mlp.up_proj.weight'"):
        build(spec, weights, 16)
    with pytest.raises(FrontendError, match="computed for max_len 16, not 32"):
        build(spec_from_config(loaded.config, max_len=16), loaded.weights, 32)
    gpt2 = load_causal_lm(tiny_model("gpt2"))
    with pytest.raises(FrontendError, match="learned positions for 64 tokens"):
        build(spec_from_config(gpt2.config), gpt2.weights, 128)


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """The address ranges of this process's memory maps of ``path`` (Linux /proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_a_float32_checkpoints_weights_stay_pages_of_its_file(tmp_path):
    """A model directory's float32 weights are not copied into the graph: each is a view of the
    privately mapped safetensors file (so a model larger than memory is held once, and nothing a
    pass could write reaches the file). A module object's weights are copied instead."""
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path / "m")
    file = (tmp_path / "m" / "model.safetensors").resolve()
    loaded = load_causal_lm(tmp_path / "m")
    spec = spec_from_config(loaded.config, max_len=MAX_LEN)
    graph = build(spec, loaded.weights, MAX_LEN)
    ranges = _mapped_ranges(file)
    assert ranges
    checkpoint = [w for w in graph.weights.values() if not w.name.startswith("rope.")]
    assert checkpoint and all(any(a <= w.encoding.data.data_ptr() < b for a, b in ranges) for w in checkpoint)
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    graph.weights["model.norm.weight"].encoding.data.add_(1.0)       # copy-on-write: the file keeps its bytes
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before

    module_graph = build(spec, load_causal_lm(model).weights, MAX_LEN)
    q = "model.layers.0.self_attn.q_proj.weight"
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2.0)
    assert not torch.equal(module_graph.weights[q].encoding.data, model.model.layers[0].self_attn.q_proj.weight)

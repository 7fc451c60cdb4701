"""The rotate pass (QuaRot): the rotated fp32 model computes what the original did, on real decoder
families (prefill, then decode steps through the cache it now holds rotated) and on the default
model; what it folds and where it adds online rotations; and that rotation flattens activations."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from nnforge.frontend.decoders.importer import import_decoder
from nnforge.ir import Dense
from nnforge.ir.interpreter import run_graph
from nnforge.passes import PASSES, PassContext, PassError, resolve_recipe
from nnforge.passes.quantize import QuantizeRTN
from nnforge.passes.rotate import Rotate
from tests.frontend.decoders.families import tiny_model

MAX_LEN = 16


def _rotate(graph, **options):
    ctx = PassContext()
    ctx.current = "rotate"
    out = Rotate(**options)(graph.copy(), ctx)
    return out, ctx.figures["rotate"], ctx.warnings.get("rotate", [])


def _steps(graph, ids):
    """Logits of a 5-token prefill and then 3 single-token decode steps, the cache fed back."""
    names = [v.name for v in graph.outputs]
    cache = {v.name: torch.zeros([1 if d == "batch" else d for d in v.shape]) for v in graph.inputs
             if v.name.startswith("cache.")}
    logits = []
    for start, end in ((0, 5), (5, 6), (6, 7), (7, 8)):
        out = dict(zip(names, run_graph(graph, {"input_ids": ids[:, start:end],
                                                "positions": torch.arange(start, end)[None], **cache})))
        logits.append(out["logits"])
        cache = {k: out[k + ".next"] for k in cache}
    return torch.cat(logits, 1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))


# family -> what the residual fold must do: tied heads and Gemma's post-norms rotate online
FAMILIES = {
    "llama": dict(writers_online=1, readers_rotated_back=1),         # tied head: embedding and final norm
    "llama-linear": dict(writers_online=0, readers_rotated_back=0),  # untied: everything folds
    "gemma3": dict(writers_online=9, readers_rotated_back=1),        # 2 post-norms a layer + the tied embedding
    "phi3": dict(writers_online=0, readers_rotated_back=0),          # fused qkv and gate_up
    "qwen3": dict(writers_online=1, readers_rotated_back=1),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_rotated_decoder_computes_what_the_original_did(family, ids):
    graph = import_decoder(tiny_model(family), max_len=MAX_LEN).graph
    rotated, figures, warnings = _rotate(graph)
    want, got = _steps(graph, ids), _steps(rotated, ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    residual = figures["residual"]
    layers = sum(n.op == "attention" for n in graph.nodes)
    assert {k: residual[k] for k in FAMILIES[family]} == FAMILIES[family]
    assert residual["norms_fused"] >= 2 * layers and figures["heads"] == layers and figures["qk"] == layers
    assert not warnings
    # every linear but a tied head reads a rotated input: a fused norm, the heads' fold or a hadamard
    norms = {n.output for n in rotated.nodes if n.op == "rms_norm" and len(n.inputs) == 1}
    for node in rotated.nodes:
        if node.op == "linear" and node.name != "lm_head" or (node.name == "lm_head" and family in (
                "llama-linear", "phi3")):
            x = node.inputs[0]
            assert x in norms or x.producer.op == "hadamard" or x.name.endswith("merge_heads"), node.name
    # the cache now holds rotated keys: the hadamard sits between RoPE and the cache write
    k_write = next(n for n in rotated.nodes if n.op == "cache_update" and n.name.endswith("k_cache"))
    assert k_write.inputs[1].producer.op == "hadamard"


def test_a_layer_norm_stream_is_left_and_its_linears_are_rotated_online(ids):
    graph = import_decoder(tiny_model("gpt2"), max_len=MAX_LEN).graph
    rotated, figures, _ = _rotate(graph)
    assert "layer_norm's mean subtraction does not commute" in figures["residual"]["unchanged"]
    assert figures["inputs"]["left_out"] == ["lm_head"]          # tied to the embedding
    want, got = _steps(graph, ids), _steps(rotated, ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_folded_only_adds_no_op(ids):
    """online=() on an untied Llama: no hadamard node, so any backend runs the rotated graph."""
    graph = import_decoder(tiny_model("llama-linear"), max_len=MAX_LEN).graph
    rotated, figures, _ = _rotate(graph, online=())
    assert not any(n.op == "hadamard" for n in rotated.nodes)
    assert figures["residual"]["writers_folded"] == 5 and "inputs" not in figures
    assert Counter(n.op for n in rotated.nodes) - Counter(n.op for n in graph.nodes) == Counter()
    want, got = _steps(graph, ids), _steps(rotated, ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_seed_changes_the_signs_not_the_function(ids):
    graph = import_decoder(tiny_model("llama-linear"), max_len=MAX_LEN).graph
    a, _, _ = _rotate(graph, seed=0)
    b, _, _ = _rotate(graph, seed=1)
    wa, wb = (g.weights["model.embed_tokens.weight"].encoding.data for g in (a, b))
    assert not torch.equal(wa, wb)
    assert torch.allclose(_steps(a, ids), _steps(b, ids), atol=1e-4)


@pytest.fixture(scope="module")
def minilm(default_model, default_inputs):
    from nnforge.frontend import from_torch
    from nnforge.models.default import dynamic_shapes
    model, _ = default_model
    return from_torch(model, default_inputs, dynamic_shapes=dynamic_shapes())


def _linear_inputs(graph, inputs):
    """Each linear's input on ``inputs``: the graph with those values as extra outputs."""
    g = graph.copy()
    linears = [n for n in g.nodes if n.op == "linear"]
    g.set_outputs(list(g.outputs) + [n.inputs[0] for n in linears])
    outs = run_graph(g, list(inputs))
    return {n.name: x for n, x in zip(linears, outs[len(graph.outputs):])}


def test_the_default_model_rotated_online_is_the_same_function_with_flatter_activations(minilm, default_inputs):
    """MiniLM is post-LN (LayerNorm on the stream): every linear input gets a 384- or 1536-wide
    (Paley-factor) hadamard; the embeddings are unchanged, and the largest activation over the
    RMS of its row (the outliers int8 and int4 activations clip or waste levels on) drops."""
    rotated, figures, _ = _rotate(minilm)
    assert "no add extends" in figures["residual"]["unchanged"]
    assert figures["inputs"] == {"hadamard_ops": 24, "linears": 36, "left_out": []}
    assert {n.attrs["block"] for n in rotated.nodes if n.op == "hadamard"} == {384, 1536}
    want = run_graph(minilm, list(default_inputs))[0]
    got = run_graph(rotated, list(default_inputs))[0]
    assert (got - want).abs().max() < 1e-5

    def peak(x):
        x = x.reshape(-1, x.shape[-1])
        return (x.abs().amax(1) / x.pow(2).mean(1).sqrt()).median().item()

    before, after = _linear_inputs(minilm, default_inputs), _linear_inputs(rotated, default_inputs)
    ratios = sorted(peak(after[k]) / peak(before[k]) for k in before)
    assert ratios[len(ratios) // 2] < 0.7 and ratios[-1] < 1.2


def test_rotation_lowers_the_error_of_int8_activations_on_the_default_model(minilm, default_model, default_inputs):
    """Static per-tensor int8 activations (ranges calibrated on calibration sentences) clip or
    waste levels on MiniLM's outlier channels; rotated, the held-out embeddings' error drops."""
    from nnforge.models import sentence_splits
    from nnforge.models.default import calibration_batches
    calibration = calibration_batches(default_model[1], sentence_splits()[0][:16], batch_size=16)
    want = run_graph(minilm, list(default_inputs))[0]

    def error(graph):
        q = PASSES["quantize_activations"](format="int8")(graph.copy(), PassContext(calibration=calibration))
        return (run_graph(q, list(default_inputs))[0] - want).norm().item()

    rotated, _, _ = _rotate(minilm)
    assert error(rotated) < 0.5 * error(minilm)


def test_rotate_runs_before_weight_compression():
    graph = import_decoder(tiny_model("llama-linear"), max_len=MAX_LEN).graph
    quantized = QuantizeRTN(format="int8")(graph, PassContext())
    with pytest.raises(PassError, match=r"layer model\.layers\.0\.self_attn\.q_proj's weight is already encoded "
                                        r"\(IntQuant\); rotate before compressing weights"):
        Rotate()(quantized, PassContext())
    assert all(type(w.encoding) is not Dense for n in quantized.nodes if n.op == "linear"
               for w in [n.inputs[1]])


def test_options_and_the_preset():
    with pytest.raises(PassError, match=r"rotate: unknown online rotation\(s\) 'down'; choose from inputs, qk"):
        Rotate(online=("down",))
    name, passes = resolve_recipe("rot+w4-gptq")
    assert [p.name for p in passes] == ["rotate", "quantize_gptq"]
    with pytest.raises(PassError, match="KV-cache preset goes after"):
        resolve_recipe("kv8+rot")


# cpu's build takes most of a minute here; its hadamard kernel is checked in tests/backends/tvm
@pytest.mark.parametrize("target", ["onnx", pytest.param("cpu", marks=pytest.mark.slow)])
def test_a_rotated_bundle_generates_as_the_original_model(target, tmp_path):
    """Gemma 3 (post-norms and a tied head rotated online, hadamards on Q/K and the down
    projections) through nf.compile: the bundle verifies, and its perplexity and greedy tokens on
    the target's runtime are the original model's on the interpreter (head kept fp32: the default
    int8 head would differ from the original by its own rounding)."""
    import nnforge as nf
    from nnforge.generation import DecoderRunner, generate, perplexity
    from nnforge.ir import Interpreter
    model = tiny_model("gemma3")
    bundle = nf.compile(model, target, "rot", out=tmp_path / "b", max_len=32, head="fp32")
    assert nf.verify(bundle.path)["passed"]
    # the stream: 9 writers rotated and the final norm reading it back; Q and K; the down projections
    assert sum(n.op == "hadamard" for n in bundle.graph().nodes) == 9 + 1 + 2 * 4 + 4
    m, graph = bundle.manifest, import_decoder(model, max_len=32).graph
    original = DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), m["decoder"],
                             [i["name"] for i in m["signature"]["inputs"]],
                             [o["name"] for o in m["signature"]["outputs"]])
    ids = torch.randint(3, 128, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    lm = bundle.load()
    assert lm.perplexity(ids).perplexity == pytest.approx(
        perplexity(original.decoder(resident=False), ids).perplexity, rel=1e-5)
    assert lm.generate(ids[:5], 12, stop_tokens=[]).tokens == \
        generate(original.decoder(resident=False), ids[:5], 12, stop_tokens=[]).tokens


def test_block_caps_every_rotation(ids):
    """block=16 (an NVFP4 scale block): every hadamard op and the residual's block are 16 wide, and
    the function is still the original's."""
    graph = import_decoder(tiny_model("gemma3"), max_len=MAX_LEN).graph
    rotated, figures, _ = _rotate(graph, block=16)
    assert figures["residual"]["block"] == 16
    assert {n.attrs["block"] for n in rotated.nodes if n.op == "hadamard"} == {16}
    want, got = _steps(graph, ids), _steps(rotated, ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    with pytest.raises(PassError, match="rotate: block must be 0 \\(whole width\\) or a power of two, got 24"):
        Rotate(block=24)


def test_a_stream_whose_norms_mute_channels_is_rotated_online_per_linear(ids):
    """Gemma mutes its massive-activation channels with near-zero norm weights: fused into rotated
    linears, those channels' huge values would leak through the weights' quantisation error, so the
    stream stays as it is and each linear gets its own online rotation."""
    graph = import_decoder(tiny_model("llama"), max_len=MAX_LEN).graph
    norm = next(n for n in graph.nodes if n.op == "rms_norm" and n.name.endswith("post_attention_layernorm"))
    w = norm.inputs[1].encoding.data.clone()
    w[3] = 0.01 * w.abs().median()
    graph.set_encoding(norm.inputs[1].name, Dense(w))
    rotated, figures, _ = _rotate(graph)
    assert "nearly silences channels" in figures["residual"]["unchanged"] and norm.name in figures["residual"]["unchanged"]
    assert figures["inputs"]["linears"] > 0
    want, got = _steps(graph, ids), _steps(rotated, ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()

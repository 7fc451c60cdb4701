"""The activation format fitted to the values a design meets (nnforge/backends/hls/ranges.py): a
decoder whose residual stream passes the target's ap_fixed range, as Gemma 3's does, is carried
scaled and planned in a wider format, and generates the interpreter's tokens where the target's
format turns its logits to noise; a value no format can hold is refused by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nnforge as nf
from nnforge.backends.base import BackendError
from nnforge.backends.hls import HlsRunner, ranges, static_graph
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.generation import DecoderRunner, generate
from nnforge.ir import Graph, Interpreter, tensor
from nnforge.numerics import compare
from tests.frontend.decoders.families import tiny_model

MAX_LEN = 32
PROMPT = torch.tensor([3, 99, 12, 45, 7, 88, 20])


def loud_gemma():
    """The tiny Gemma 3 with post-norm gains of a few thousand: its block outputs, and so its
    residual stream, reach the thousands while everything the norms read stays near 1."""
    model = tiny_model("gemma3")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_feedforward_layernorm.weight.fill_(3000.0)
            layer.post_attention_layernorm.weight.fill_(1000.0)
    return model


def test_a_stream_past_the_format_is_carried_scaled_and_generates_as_the_interpreter(tmp_path):
    bundle = nf.compile(loud_gemma(), "alveo-u280", out=tmp_path / "b", max_len=MAX_LEN)
    entry, numerics = bundle.manifest["backend"]["entry"], bundle.manifest["numerics"]
    fit = entry["activation_fit"]
    assert fit["target_format"] == [24, 8] and fit["largest"]["magnitude"] > 1000
    assert 0 < fit["residual_scale"] < 1 and fit["stream"]["magnitude"] > 1000 > fit["stream"]["rest_magnitude"]
    width, act_int = fit["format"]
    assert entry["options"]["act_width"] == width and entry["options"]["act_int"] == act_int
    assert width - act_int == 16              # the fractional bits kept: the stream scaled, not the format
    assert numerics["runtime_checked"] and numerics["backend_vs_reference"]["cosine_min"] >= 0.9999

    graph, section = bundle.graph(), bundle.manifest["decoder"]
    names = [v.name for v in graph.inputs], [v.name for v in graph.outputs]
    lm = bundle.load()                        # the load rebuilds the scaled design the compile wrote
    reference = DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), section, *names)
    emulated = DecoderRunner(lambda *xs: lm.runner.emulate([np.asarray(x) for x in xs]), section, *names)
    want = generate(reference.decoder(resident=False), PROMPT, 16, stop_tokens=[]).tokens
    assert generate(emulated.decoder(resident=False), PROMPT, 16, stop_tokens=[]).tokens == want

    # the target's own format saturates the stream: the same graph's logits are another function
    feeds = [PROMPT[None], torch.arange(len(PROMPT))[None]] + \
        [torch.zeros(1, *v.shape[1:]) for v in graph.inputs[2:]]
    static, env = static_graph(graph, None, {v.name: list(x.shape) for v, x in zip(graph.inputs, feeds)})
    plain = HlsRunner(graph, HlsOptions(), env, build_plan(static, HlsOptions()), None)
    saturated = plain.emulate([x.numpy() for x in feeds])[0]
    assert compare([torch.from_numpy(saturated)], [Interpreter(graph).run(*feeds)[0]])["cosine_min"] < 0.99


def test_a_model_inside_the_format_keeps_it():
    graph = Graph("small")
    x = graph.add_input("x", tensor("f32", 2, 64))
    graph.set_outputs([graph.op("rms_norm", graph.op("add", x, x), eps=1e-6)])
    opts = HlsOptions()
    same, got, record = ranges.fit(graph, opts, [torch.randn(2, 64)])
    assert same is graph and got == opts and record is None


def test_a_value_no_format_holds_is_refused_naming_it():
    """Masks written as the float minimum saturate by design and are not fitted; a product of a
    billion is, and cannot be: the norm over 640 channels caps the width at 26 bits."""
    graph = Graph("loud")
    x = graph.add_input("x", tensor("f32", 2, 640))
    masked = graph.op("add", x, graph.op("full", shape=[], value=float(np.finfo(np.float32).min), dtype="f32"))
    big = graph.op("mul", x, graph.op("full", shape=[], value=1e9, dtype="f32"), name="blow_up")
    graph.set_outputs([graph.op("rms_norm", big, eps=1e-6, name="norm"), masked])
    assert ranges.width_limit(graph) == (26, "node norm (rms_norm) sums 640 products of two activations in 64 bits")
    with pytest.raises(BackendError, match=r"value blow_up reaches [0-9.e+]+ on the first held-out batch, which needs "
                                           r"act_int = 3[0-9]; the widest activation the design can sum is act_width = "
                                           r"26 \(node norm \(rms_norm\) sums 640 products of two activations in 64 "
                                           r"bits\), leaving -?[0-9]+ fractional bits \(at least 8 are needed\)"):
        ranges.fit(graph, HlsOptions(), [torch.rand(2, 640) + 1])
    no_big = Graph("masked")
    y = no_big.add_input("x", tensor("f32", 2, 8))
    no_big.set_outputs([no_big.op("add", y, no_big.op("full", shape=[], value=float("-inf"), dtype="f32"))])
    assert ranges.fit(no_big, HlsOptions(), [torch.rand(2, 8)])[2] is None

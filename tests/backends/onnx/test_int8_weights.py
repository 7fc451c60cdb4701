"""8-bit weights on the onnx backend: linear layers as MatMulNBits where the target allows int8
activations (per-channel and per-tensor scales repeated per block, codes read in place), and
embeddings that gather 8- or 4-bit code rows and dequantise only those (no float table)."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx
import pytest
import torch

import nnforge as nf
from nnforge.backends.onnx import MODEL_FILE, OnnxBackend, OnnxRunner
from nnforge.backends.onnx.capabilities import CAPABILITIES, INT8_ACTIVATIONS, MATMULNBITS, block_size, matmulnbits
from nnforge.ir import Dense, Graph, run_graph, tensor
from nnforge.numerics import BACKEND_TOLERANCE, compare, within
from nnforge.targets import get_target
from tests import conftest
from tests.backends.test_onnx_backend import _external, _inits, _st_span, make_intquant
from tests.frontend.decoders.families import tiny_model, tiny_tokenizer

INT8_TARGET = dataclasses.replace(get_target("onnx"), options={**get_target("onnx").options, INT8_ACTIVATIONS: True})


def _linear(enc) -> Graph:
    g = Graph("one")
    x = g.add_input("x", tensor("f32", "batch", "seq", enc.shape[1]))
    w = g.add_weight("fc.weight", enc)
    bias = g.add_weight("fc.bias", Dense(torch.randn(enc.shape[0])))
    g.set_outputs([g.op("linear", x, w, bias, name="fc")])
    return g


def _mnb(path):
    model = onnx.load(os.fspath(path / MODEL_FILE), load_external_data=False)
    return model, [n for n in model.graph.node if n.op_type == "MatMulNBits"]


def test_8bit_matmulnbits_needs_the_targets_int8_activations():
    enc = make_intquant(torch.randn(32, 128), 8, "channel", True)
    assert CAPABILITIES.find("linear", enc, get_target("onnx"))[0] is not MATMULNBITS
    assert f"target option {INT8_ACTIVATIONS} is off" in matmulnbits(enc, get_target("onnx"))
    assert CAPABILITIES.find("linear", enc, INT8_TARGET)[0] is MATMULNBITS


@pytest.mark.parametrize("cols, group, want", [(640, None, 128), (2048, None, 2048), (96, 32, 32), (96, 48, 16),
                                               (100, None, None)])
def test_blocks_are_the_largest_power_of_two_dividing_k_and_the_group(cols, group, want):
    enc = make_intquant(torch.randn(4, cols), 8, "group" if group else "channel", True, group_size=group or 16)
    assert block_size(enc) == want


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group", "group_shared"])
def test_8bit_linear_runs_as_matmulnbits_reading_codes_in_place(tmp_path, gran, symmetric):
    torch.manual_seed(0)
    enc = make_intquant(torch.randn(48, 384), 8, gran, symmetric, torch.float32, 64)
    g = _linear(enc)
    lowered = conftest.lower_into(OnnxBackend(), g, INT8_TARGET, tmp_path)
    assert not lowered.fallbacks
    model, mnb = _mnb(tmp_path)
    assert len(mnb) == 1 and "DequantizeLinear" not in {n.op_type for n in model.graph.node}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mnb[0].attribute}
    assert (attrs["bits"], attrs["K"], attrs["N"], attrs["accuracy_level"]) == (8, 384, 48, 4)
    assert attrs["block_size"] == (64 if gran.startswith("group") else 128)
    codes = _inits(tmp_path)[mnb[0].input[1]]
    assert (int(_external(codes)["offset"]), int(_external(codes)["length"])) == \
        _st_span(tmp_path / "weights.safetensors", "fc.weight::codes")
    x = torch.randn(3, 5, 384)
    want = run_graph(g, [x])[0]
    got = OnnxBackend().load(tmp_path, lowered.entry)(x)
    assert within(compare([got], [want]), BACKEND_TOLERANCE)      # activations rounded to int8
    # The blocks, repeated scales and zero points are exact: with ORT's fp32 kernel
    # (accuracy_level 0, the slow form) the layer equals the reference.
    for a in mnb[0].attribute:
        if a.name == "accuracy_level":
            a.i = 0
    onnx.save_model(model, os.fspath(tmp_path / "exact.onnx"))
    exact = OnnxRunner(tmp_path / "exact.onnx", threads=1).run_numpy([x.numpy()])[0]
    torch.testing.assert_close(torch.from_numpy(exact), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group", "group_shared"])
def test_embedding_gathers_code_rows_and_makes_no_float_table(tmp_path, gran, symmetric, bits):
    """8-bit code rows, or 4-bit ones split into nibbles after the gather (an int4 table tied to
    an LM head in w4-g32)."""
    torch.manual_seed(1)
    enc = make_intquant(torch.randn(300, 64), bits, gran, symmetric, torch.float16, 16)
    g = Graph("emb")
    ids = g.add_input("ids", tensor("i64", "batch", "seq"))
    g.set_outputs([g.op("embedding", ids, g.add_weight("tok.weight", enc), name="emb")])
    lowered = conftest.lower_into(OnnxBackend(), g, "onnx", tmp_path)
    assert not lowered.fallbacks and "session_config" not in lowered.entry
    model = onnx.load(os.fspath(tmp_path / MODEL_FILE), load_external_data=False)
    assert "DequantizeLinear" not in {n.op_type for n in model.graph.node}
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert all(np.prod(t.dims) <= 300 * 4 for t in floats)      # scale and zero-point rows, not a table
    codes = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8)
    assert (int(_external(codes)["offset"]), int(_external(codes)["length"])) == \
        _st_span(tmp_path / "weights.safetensors", "tok.weight::codes")
    x = torch.tensor([[0, 299, 17], [5, 5, 123]])
    got = OnnxBackend().load(tmp_path, lowered.entry)(x)
    torch.testing.assert_close(got, run_graph(g, [x])[0], rtol=0, atol=0)


def test_int8_head_of_a_decoder_runs_as_matmulnbits_like_the_interpreter(tmp_path):
    """A tiny Gemma 3 in w4-rtn keeps its LM head in int8 (the default head format, tied to the
    embedding): on a target with int8 activations the head is an 8-bit MatMulNBits, the embedding
    gathers code rows, and the bundle's runtime check against the interpreter holds."""
    bundle = nf.compile(tiny_model("gemma3"), INT8_TARGET, "w4-rtn", out=tmp_path / "b", max_len=32,
                        batch_sizes=())
    model, mnb = _mnb(bundle.path)
    bits = sorted(onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits")) for n in mnb)
    assert bits == [8]                        # the layers' per-channel 4-bit codes stay DequantizeLinear
    weight = bundle.graph().node("lm_head").inputs[1].name           # the embedding's too (tied)
    head_codes = {t.name for t in model.graph.initializer if t.name.startswith(f"{weight}.codes")}
    readers = {n.op_type for n in model.graph.node if head_codes & set(n.input)}
    assert readers == {"MatMulNBits", "Gather"}
    numerics = bundle.manifest["numerics"]
    assert numerics["runtime_checked"] and numerics["backend_vs_reference"]["cosine_min"] >= 0.9999


def test_int4_head_tied_to_the_embedding_is_gathered_not_dequantised(tmp_path):
    """With the w4-g32 head a tiny Llama's tied table is int4: the head is a 4-bit MatMulNBits and
    the embedding gathers its code rows, so no DequantizeLinear makes a float table of it."""
    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    text = " ".join(f"w{4 + (7 * i) % 124}" for i in range(800))
    bundle = nf.compile(tmp_path / "m", "onnx", "w4-rtn", out=tmp_path / "b", max_len=32, head="w4-g32",
                        calibration=text)
    model, _ = _mnb(bundle.path)
    weight = bundle.graph().node("lm_head").inputs[1].name
    head_codes = {t.name for t in model.graph.initializer if t.name.startswith(f"{weight}.codes")}
    assert {n.op_type for n in model.graph.node if head_codes & set(n.input)} == {"MatMulNBits", "Gather"}
    numerics = bundle.manifest["numerics"]
    assert numerics["runtime_checked"] and numerics["backend_vs_reference"]["cosine_min"] >= 0.9999

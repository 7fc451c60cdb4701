"""QuantizeRTN on a small MLP with real weights: fewer weight bytes, outputs close to the fp32
graph (cosine), the RTN error bound on every weight, layer selection (skipped layers untouched),
weights shared by several nodes, figures, option errors, and a sweep over weight formats."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import Dense, Graph, IntQuant, MiniFloat, check, run_graph, tensor
from nnforge.ir.encodings import rows_cols
from nnforge.passes import PassContext, PassError, PassManager, QuantizeRTN
from tests.passes.graphs import cosine, inputs, mlp_graph, weight_bytes

X = inputs(64, seed=1)


def quantize(g: Graph, **options) -> tuple[Graph, PassContext]:
    ctx = PassContext()
    out = PassManager([QuantizeRTN(**options)]).run(g, ctx)
    return out, ctx


def test_int8_per_channel():
    g = mlp_graph()
    ref = run_graph(g, [X])[0]
    q, ctx = quantize(g, bits=8)
    for name in ("fc1.weight", "fc2.weight"):
        enc = q.weights[name].encoding
        assert isinstance(enc, IntQuant) and enc.bits == 8 and enc.signed and enc.granularity == "channel"
        rows, cols = rows_cols(enc.shape)
        assert enc.nbytes == rows * cols + rows * 4                   # one byte a weight + an fp32 scale a row
    for name in ("fc1.bias", "fc2.bias"):                              # biases are not weight slots
        assert q.weights[name].encoding is g.weights[name].encoding
    assert weight_bytes(q) < 0.4 * weight_bytes(g)
    assert cosine(run_graph(q, [X])[0], ref) > 0.9999
    assert ctx.figures["quantize_rtn"] == {"layers": 2, "encodings": {"i8 per-channel sym": 2}}
    assert check(q) == [] and q.signature() == g.signature()


def test_int4_groups_error_bound_and_accuracy():
    g = mlp_graph()
    ref = run_graph(g, [X])[0]
    q, _ = quantize(g, bits=4, group_size=8)
    for name in ("fc1.weight", "fc2.weight"):
        w = g.weights[name].encoding.data
        enc = q.weights[name].encoding
        assert enc.granularity == "group" and enc.group_size == 8
        assert tuple(enc.codes.shape) == (w.shape[0], w.shape[1] // 2)
        scale = enc.scale[:, torch.arange(w.shape[1]) // 8]
        assert bool(((w - enc.decode()).abs() <= scale / 2 * (1 + 1e-6)).all())
    assert weight_bytes(q) < 0.35 * weight_bytes(g)
    assert cosine(run_graph(q, [X])[0], ref) > 0.99


def test_fewer_bits_fewer_bytes_and_more_error():
    g = mlp_graph()
    ref = run_graph(g, [X])[0]
    sizes, cosines = [], []
    for bits in (8, 6, 4, 3, 2):
        q, _ = quantize(g, bits=bits, group_size=8)
        sizes.append(weight_bytes(q))
        cosines.append(cosine(run_graph(q, [X])[0], ref))
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert cosines == sorted(cosines, reverse=True)


def test_skipped_layers_are_untouched():
    g = mlp_graph()
    q, ctx = quantize(g, bits=4, exclude=["fc2"])
    assert isinstance(q.weights["fc1.weight"].encoding, IntQuant)
    assert q.weights["fc2.weight"].encoding is g.weights["fc2.weight"].encoding
    assert ctx.figures["quantize_rtn"]["layers"] == 1
    q2, _ = quantize(g, bits=4, layers=["fc2.weight"])                 # patterns match weight names too
    assert q2.weights["fc1.weight"].encoding is g.weights["fc1.weight"].encoding
    assert isinstance(q2.weights["fc2.weight"].encoding, IntQuant)
    with pytest.raises(PassError, match="quantize_rtn: layers pattern 'nothing' matches no linear/conv layer"):
        quantize(g, bits=4, layers=["nothing"])


def test_original_graph_is_not_modified():
    g = mlp_graph()
    before = {n: v.encoding for n, v in g.weights.items()}
    quantize(g, bits=4)
    assert {n: v.encoding for n, v in g.weights.items()} == before


def test_already_encoded_and_integer_weights_skipped():
    g = mlp_graph()
    pre = IntQuant.quantize(g.weights["fc1.weight"].encoding.data, 8)
    g.set_encoding("fc1.weight", pre)
    q, ctx = quantize(g, bits=4)
    assert q.weights["fc1.weight"].encoding is pre
    assert ctx.figures["quantize_rtn"]["layers"] == 1
    e = Graph("emb")
    ids = e.add_input("ids", tensor("i64", 3))
    table = e.add_weight("tok", Dense(torch.arange(12).reshape(6, 2)))     # integer table: never quantised
    e.set_outputs([e.op("embedding", ids, table, name="lookup")])
    q, ctx = quantize(e, bits=4, ops=["embedding"])
    assert q.weights["tok"].encoding is table.encoding and ctx.figures["quantize_rtn"]["layers"] == 0


def test_shared_weight_quantised_once():
    g = mlp_graph()
    h = g.op("linear", g.outputs[0], g.add_weight("sq", Dense(torch.randn(8, 8))), None, name="sq1")
    h = g.op("linear", h, g.weights["sq"], None, name="sq2")
    g.set_outputs([h])
    q, ctx = quantize(g, bits=8, layers=["sq*"])
    assert ctx.figures["quantize_rtn"]["layers"] == 1
    assert q.node("sq1").input("weight") is q.node("sq2").input("weight")
    assert isinstance(q.weights["sq"].encoding, IntQuant)


def test_embedding_and_conv_selection():
    g = Graph("mixed")
    ids = g.add_input("ids", tensor("i64", 4))
    img = g.add_input("img", tensor("f32", 1, 4, 6, 6))
    e = g.op("embedding", ids, g.add_weight("tok", Dense(torch.randn(10, 16))), name="tok_lookup")
    c = g.op("conv", img, g.add_weight("conv.weight", Dense(torch.randn(8, 4, 3, 3))), None, stride=[1, 1],
             padding=[1, 1, 1, 1], dilation=[1, 1], name="conv")
    g.set_outputs([e, c])
    q, _ = quantize(g, bits=8)                                # defaults: linear and conv
    assert isinstance(q.weights["conv.weight"].encoding, IntQuant)
    assert q.weights["conv.weight"].encoding.shape == (8, 4, 3, 3)
    assert isinstance(q.weights["tok"].encoding, Dense)
    q2, _ = quantize(g, bits=8, ops=["embedding", "conv"])
    assert isinstance(q2.weights["tok"].encoding, IntQuant)
    x = [torch.tensor([0, 3, 9, 1]), torch.randn(1, 4, 6, 6)]
    for a, b in zip(run_graph(g, x), run_graph(q2, x)):
        assert cosine(a, b) > 0.9999


def test_fp16_weights_keep_their_type():
    g = Graph("half")
    x = g.add_input("x", tensor("f16", 2, 16))
    w = g.add_weight("w", Dense(torch.randn(4, 16).half()))
    g.set_outputs([g.op("linear", x, w, None, name="fc")])
    q, _ = quantize(g, bits=8)
    enc = q.weights["w"].encoding
    assert enc.dtype.name == "float16" and enc.decode().dtype == torch.float16
    assert check(q) == []


def test_group_size_must_divide_unless_ragged():
    g = mlp_graph()
    with pytest.raises(PassError, match="quantize_rtn: layer fc1 \\(fc1.weight, \\[32, 16\\]\\) has 16 input columns, "
                                        "which group_size 12 does not divide"):
        quantize(g, bits=4, group_size=12)
    q, _ = quantize(g, bits=4, group_size=12, ragged_groups=True)
    assert check(q) == []
    assert cosine(run_graph(q, [X])[0], run_graph(g, [X])[0]) > 0.99


@pytest.mark.parametrize("options, message", [
    ({"bits": 4, "format": "int4"}, "give format or bits, not both"),
    ({"bits": 1}, "bits must be an integer in 2..8, got 1"),
    ({"bits": True}, "bits must be an integer in 2..8, got True"),
    ({"format": "int12"}, "integer weights take 2..8 bits, got 12"),
    ({"format": "float7"}, "unknown weight format 'float7'"),
    ({"bits": 4, "group_size": 0}, "group_size must be a positive integer or None, got 0"),
    ({"bits": 4, "group_size": 8, "per_tensor": True}, "per_tensor and group_size exclude each other"),
    ({"bits": 4, "scale_dtype": "float8"}, "scale_dtype must be float32, float16 or bfloat16"),
    ({"format": "mxfp4", "group_size": 16}, "has blocks of 32; group_size cannot be changed"),
    ({"ops": ["relu"]}, "carry no weights"),
])
def test_option_errors(options, message):
    with pytest.raises(PassError, match=message):
        QuantizeRTN(**options)


FORMATS = [  # options, encoding type, minimum cosine (measured values are comfortably above)
    ({"format": "int8"}, IntQuant, 0.9999),
    ({"format": "uint8", "group_size": 8}, IntQuant, 0.9999),
    ({"format": "int8", "per_tensor": True}, IntQuant, 0.9995),
    ({"format": "uint4", "group_size": 8}, IntQuant, 0.99),
    ({"format": "int3", "group_size": 8}, IntQuant, 0.97),
    ({"format": "int4", "group_size": 16, "scale_dtype": "float16"}, IntQuant, 0.99),
    ({"format": "e4m3"}, MiniFloat, 0.999),
    ({"format": "e5m2", "group_size": 16}, MiniFloat, 0.995),
    ({"format": "e2m1", "group_size": 8}, MiniFloat, 0.985),
    ({"format": "mxfp8"}, MiniFloat, 0.995),
    ({"format": "mxfp4"}, MiniFloat, 0.97),
    ({"format": "nvfp4"}, MiniFloat, 0.98),
]


@pytest.mark.parametrize("options, kind, min_cos", FORMATS, ids=[
    "-".join(f"{v}" for v in o.values()) for o, _, _ in FORMATS])
def test_formats(options, kind, min_cos):
    g = mlp_graph()
    ref = run_graph(g, [X])[0]
    q, ctx = quantize(g, **options)
    for name in ("fc1.weight", "fc2.weight"):
        enc = q.weights[name].encoding
        assert isinstance(enc, kind), enc
        assert enc.shape == g.weights[name].encoding.shape
        assert enc.nbytes < g.weights[name].encoding.nbytes / 2
    assert check(q) == []
    assert cosine(run_graph(q, [X])[0], ref) >= min_cos
    assert ctx.figures["quantize_rtn"]["layers"] == 2

"""The onnx backend against the reference interpreter.

Every IntQuant variant the backend handles (2..8 bits; per-tensor, per-channel, per-group with
per-row or shared scales; symmetric and asymmetric; with and without an act-order permutation;
fp32 and fp16 scales) on linear (2-D and 3-D inputs), conv, embedding and matmul with a weight
operand is lowered with ``OnnxBackend().lower``, checked by ``onnx.checker`` (full check), run by
ONNX Runtime at two sets of symbolic sizes and compared with ``nnforge.ir.run_graph``.

Also: which ONNX ops carry the weights (MatMulNBits for 4-bit groups, DequantizeLinear for 8 bits),
that weights are read in place from weights.safetensors (byte-exact offsets, small model.onnx),
that every non-native form is a reported Fallback, and the errors of lowering and loading.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests import conftest

from nnforge.backends.base import BackendError, get_backend
from nnforge.backends.onnx import DATA_FILE, MODEL_FILE, OnnxBackend
from nnforge.backends.onnx.ops import LOWERINGS
from nnforge.ir import Dense, Graph, IntQuant, dtype, run_graph, save_graph, tensor
from nnforge.targets import get_target

COS_MIN = 0.99999
SIZES = [{"batch": 1, "seq": 3}, {"batch": 4, "seq": 11}]      # every graph runs at both


# --- building encodings -----------------------------------------------------------------------
def make_intquant(w: torch.Tensor, bits: int, gran: str, symmetric: bool, scale_dtype=torch.float32,
                  group_size: int = 16, act_order: bool = False, seed: int = 0) -> IntQuant:
    """Round-to-nearest IntQuant of ``w`` with any granularity:
    tensor: scale [1, 1]; channel: [rows, 1]; group: [rows, G]; group_shared: [1, G]."""
    rows, cols = w.shape[0], w[0].numel()
    w2 = w.reshape(rows, cols).to(torch.float32)
    perm = torch.randperm(cols, generator=torch.Generator().manual_seed(seed)) if act_order else None
    if perm is not None:
        w2 = w2[:, perm]                              # stored column j holds original column perm[j]
    gs = cols if gran in ("tensor", "channel") else group_size
    assert cols % gs == 0
    groups = cols // gs
    blocks = w2.reshape(rows, groups, gs)
    if gran == "tensor":
        lo, hi = w2.min().reshape(1, 1), w2.max().reshape(1, 1)
    elif gran == "group_shared":
        lo, hi = blocks.amin(dim=(0, 2)).reshape(1, groups), blocks.amax(dim=(0, 2)).reshape(1, groups)
    else:
        lo, hi = blocks.amin(-1), blocks.amax(-1)        # [rows, groups]
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp(min=tiny).to(scale_dtype)
        zp = None
    else:
        qmax = (1 << bits) - 1
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=tiny).to(scale_dtype)
        zp = torch.round(-lo / scale.float()).clamp(0, qmax)
    idx = torch.arange(cols) // gs
    s_full = scale.float().expand(rows, groups)[:, idx]
    if symmetric:
        codes = torch.round(w2 / s_full).clamp(-qmax - 1, qmax)
    else:
        codes = torch.round(w2 / s_full + zp.expand(rows, groups)[:, idx]).clamp(0, qmax)
    enc = IntQuant.from_codes(codes, scale, bits=bits, signed=symmetric, shape=tuple(w.shape), group_size=gs,
                              zero_point=zp, perm=perm)
    assert enc.granularity == ("group" if gran == "group_shared" else gran)
    assert len(torch.unique(enc.int_codes())) > 1, "degenerate codes would make the comparison vacuous"
    return enc


# --- lowering and running -------------------------------------------------------------------------
def lower(graph: Graph, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = OnnxBackend()
    lowered = conftest.lower_into(backend, graph, "onnx", out_dir)
    onnx.checker.check_model(os.fspath(out_dir / MODEL_FILE), full_check=True)
    return backend, lowered


def op_types(out_dir: Path) -> list[str]:
    return [n.op_type for n in onnx.load(os.fspath(out_dir / MODEL_FILE), load_external_data=False).graph.node]


def assert_close(got, ref, what="", rtol=1e-4):
    got = torch.as_tensor(np.asarray(got)).double()
    ref = ref.double()
    assert tuple(got.shape) == tuple(ref.shape), what
    cos = torch.nn.functional.cosine_similarity(got.reshape(-1), ref.reshape(-1), dim=0)
    assert cos >= COS_MIN, f"{what}: cosine {float(cos):.8f}"
    tol = rtol * max(1.0, float(ref.abs().max()))
    err = float((got - ref).abs().max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def make_inputs(graph: Graph, env: dict, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in graph.inputs:
        shape = [d if isinstance(d, int) else env[d] for d in v.shape]
        if v.dtype.is_float:
            out.append(torch.randn(shape, generator=gen))
        else:
            high = graph.meta.get("vocab", 2)
            out.append(torch.randint(0, high, shape, generator=gen))
    return out


def lower_run_compare(graph: Graph, out_dir: Path, sizes=SIZES):
    """Lower, then run ORT vs the interpreter at every size; returns (lowered, ONNX op types)."""
    backend, lowered = lower(graph, out_dir)
    runner = backend.load(out_dir, lowered.entry)
    for i, env in enumerate(sizes):
        inputs = make_inputs(graph, env, seed=i)
        ref = run_graph(graph, inputs)
        got = runner(*[x.numpy() for x in inputs])
        got = list(got) if isinstance(got, tuple) else [got]
        assert len(got) == len(ref)
        for j, (g, r) in enumerate(zip(got, ref)):
            assert isinstance(g, np.ndarray)
            assert_close(g, r, f"output {j} at {env}")
    return lowered, op_types(out_dir)


# --- graphs -----------------------------------------------------------------------------------
K, N = 96, 47           # odd rows, 3 groups of 32 / 6 groups of 16


def linear_graph(enc2d: IntQuant, enc3d: IntQuant, bias: bool = True) -> Graph:
    """Two linears: one on a [batch, K] input, one on a [batch, seq, K] input."""
    g = Graph("lin")
    x2 = g.add_input("x2", tensor("f32", "batch", K))
    x3 = g.add_input("x3", tensor("f32", "batch", "seq", K))
    wa = g.add_weight("a.weight", enc2d)
    wb = g.add_weight("b.weight", enc3d)
    ba = g.add_weight("a.bias", Dense(torch.randn(N))) if bias else None
    ya = g.op("linear", x2, wa, ba, name="a")
    yb = g.op("linear", x3, wb, None, name="b")
    g.set_outputs([ya, yb])
    return g


def conv_graph(enc) -> Graph:
    g = Graph("conv")
    x = g.add_input("x", tensor("f32", "batch", enc.shape[1], 9, 9))
    w = g.add_weight("c.weight", enc)
    bias = g.add_weight("c.bias", Dense(torch.randn(enc.shape[0])))
    y = g.op("conv", x, w, bias, stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1, name="c")
    g.set_outputs([g.op("relu", y)])
    return g


def embedding_graph(enc) -> Graph:
    g = Graph("emb")
    g.meta["vocab"] = enc.shape[0]
    ids = g.add_input("ids", tensor("i64", "batch", "seq"))
    w = g.add_weight("tok.weight", enc)
    g.set_outputs([g.op("embedding", ids, w, name="e")])
    return g


def matmul_graph(enc) -> Graph:
    g = Graph("mm")
    x = g.add_input("x", tensor("f32", "batch", "seq", enc.shape[-2]))
    w = g.add_weight("m.weight", enc)
    g.set_outputs([g.op("matmul", x, w, name="m")])
    return g


BITS = list(range(2, 9))
GRANS = ["tensor", "channel", "group", "group_shared"]


# --- the matrix -------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("bits", BITS)
def test_linear_intquant_matches_interpreter(tmp_path, bits, gran, symmetric, act_order):
    torch.manual_seed(bits)
    gs = 32 if bits % 2 == 0 else 16
    w = torch.randn(N, K)
    enc_a = make_intquant(w, bits, gran, symmetric, torch.float32, gs, act_order, seed=1)
    enc_b = make_intquant(w * 0.5, bits, gran, symmetric, torch.float16, gs, act_order, seed=2)
    lowered, ops = lower_run_compare(linear_graph(enc_a, enc_b), tmp_path)
    if bits not in (4, 8):
        assert any(f.where in ("a.weight", "b.weight") and "widened" in f.action for f in lowered.fallbacks)
    else:
        assert not any("widened" in f.action for f in lowered.fallbacks), lowered.fallbacks
    # linear layers apply act-order to their activations: no Gather on the weight is reported
    assert not any("act-order" in f.action for f in lowered.fallbacks)
    if bits == 4 and gran == "group":
        assert ops.count("MatMulNBits") == 2
    else:
        assert "MatMulNBits" not in ops and "DequantizeLinear" in ops


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("kind", ["conv", "embedding", "matmul"])
def test_other_weight_ops_intquant_match_interpreter(tmp_path, kind, bits, gran, symmetric, act_order):
    torch.manual_seed(100 + bits)
    scale_dtype = torch.float16 if symmetric else torch.float32
    if kind == "conv":
        w = torch.randn(12, 8, 3, 3)             # cols 72: groups of 8
        graph = conv_graph(make_intquant(w, bits, gran, symmetric, scale_dtype, 8, act_order))
    elif kind == "embedding":
        w = torch.randn(50, 32)
        graph = embedding_graph(make_intquant(w, bits, gran, symmetric, scale_dtype, 8, act_order))
    else:
        w = torch.randn(32, 24)                  # [K, N]: rows are the matmul's K
        graph = matmul_graph(make_intquant(w, bits, gran, symmetric, scale_dtype, 8, act_order))
    lowered, ops = lower_run_compare(graph, tmp_path)
    if kind == "embedding" and bits in (8, 4) and not act_order:      # rows gathered, then dequantised
        assert "DequantizeLinear" not in ops and "Gather" in ops
    else:
        assert "DequantizeLinear" in ops
    wname = graph.nodes[0].inputs[1].name
    if act_order:
        assert any(f.where == wname and "act-order" in f.action for f in lowered.fallbacks)
    if bits not in (4, 8):
        assert any(f.where == wname and "widened" in f.action for f in lowered.fallbacks)


def test_matmul_with_3d_weight_operand(tmp_path):
    torch.manual_seed(3)
    enc = make_intquant(torch.randn(2, 16, 12), 8, "channel", True)
    g = Graph("mm3")
    x = g.add_input("x", tensor("f32", "batch", 2, "seq", 16))
    w = g.add_weight("m.weight", enc)
    g.set_outputs([g.op("matmul", x, w, name="m")])
    lower_run_compare(g, tmp_path)


# --- which ONNX ops hold the weights ----------------------------------------------------------
def _inits(out_dir: Path) -> dict[str, onnx.TensorProto]:
    model = onnx.load(os.fspath(out_dir / MODEL_FILE), load_external_data=False)
    return {t.name: t for t in model.graph.initializer}


def _external(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data} if t.data_location == onnx.TensorProto.EXTERNAL else {}


def _st_span(path: Path, key: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    begin, end = header[key]["data_offsets"]
    return 8 + n + begin, end - begin


def _single_linear(enc, k=K) -> Graph:
    g = Graph("one")
    x = g.add_input("x", tensor("f32", "batch", "seq", k))
    w = g.add_weight("fc.weight", enc)
    bias = g.add_weight("fc.bias", Dense(torch.randn(enc.shape[0])))
    g.set_outputs([g.op("linear", x, w, bias, name="fc")])
    return g


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_4bit_group32_linear_uses_matmulnbits_reading_codes_in_place(tmp_path, symmetric):
    torch.manual_seed(0)
    enc = make_intquant(torch.randn(64, 256), 4, "group", symmetric, torch.float32, 32)
    g = _single_linear(enc, 256)
    lowered, ops = lower_run_compare(g, tmp_path)
    model = onnx.load(os.fspath(tmp_path / MODEL_FILE), load_external_data=False)
    mnb = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(mnb) == 1 and mnb[0].domain == "com.microsoft"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mnb[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["K"] == 256 and attrs["N"] == 64
    assert "com.microsoft" in {o.domain for o in model.opset_import}
    assert "DequantizeLinear" not in ops and not lowered.fallbacks
    # the packed codes are read in place from weights.safetensors, byte for byte
    codes = _inits(tmp_path)[mnb[0].input[1]]
    ext = _external(codes)
    assert ext["location"] == "weights.safetensors"
    offset, length = _st_span(tmp_path / "weights.safetensors", "fc.weight::codes")
    assert (int(ext["offset"]), int(ext["length"])) == (offset, length)
    assert length == enc.codes.numel()


def test_4bit_matmulnbits_with_odd_group_count_and_zero_points(tmp_path):
    torch.manual_seed(1)
    enc = make_intquant(torch.randn(33, 96), 4, "group", False, torch.float16, 32)     # 3 groups, asym, fp16
    lowered, ops = lower_run_compare(_single_linear(enc), tmp_path)
    assert "MatMulNBits" in ops


@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
def test_8bit_linear_uses_dequantizelinear_on_codes_in_place(tmp_path, gran):
    torch.manual_seed(2)
    enc = make_intquant(torch.randn(64, 128), 8, gran, True, torch.float32, 32)
    lowered, ops = lower_run_compare(_single_linear(enc, 128), tmp_path)
    assert "DequantizeLinear" in ops and "MatMulNBits" not in ops
    assert not lowered.fallbacks
    model = onnx.load(os.fspath(tmp_path / MODEL_FILE), load_external_data=False)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    codes = _inits(tmp_path)[dq[0].input[0]]
    assert codes.data_type == onnx.TensorProto.UINT8
    assert _external(codes)["location"] == "weights.safetensors"
    assert (int(_external(codes)["offset"]), int(_external(codes)["length"])) == \
        _st_span(tmp_path / "weights.safetensors", "fc.weight::codes")


def test_4bit_per_channel_uses_uint4_dequantizelinear(tmp_path):
    torch.manual_seed(3)
    enc = make_intquant(torch.randn(64, 128), 4, "channel", True)
    lowered, ops = lower_run_compare(_single_linear(enc, 128), tmp_path)
    assert not lowered.fallbacks
    model = onnx.load(os.fspath(tmp_path / MODEL_FILE), load_external_data=False)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert _inits(tmp_path)[dq[0].input[0]].data_type == onnx.TensorProto.UINT4


def test_3bit_weight_is_a_reported_widening_fallback(tmp_path):
    torch.manual_seed(4)
    enc = make_intquant(torch.randn(N, K), 3, "group", True, torch.float32, 32)
    lowered, _ = lower_run_compare(_single_linear(enc), tmp_path)
    assert len(lowered.fallbacks) == 1
    fb = lowered.fallbacks[0]
    assert fb.where == "fc.weight" and "widened" in fb.action and "3" in fb.what
    assert set(fb.to_dict()) == {"where", "what", "action"}


def test_4bit_with_odd_columns_is_widened_not_packed(tmp_path):
    torch.manual_seed(5)
    enc = make_intquant(torch.randn(16, 33), 4, "channel", False)
    lowered, _ = lower_run_compare(_single_linear(enc, 33), tmp_path)
    assert [f.where for f in lowered.fallbacks] == ["fc.weight"] and "widened" in lowered.fallbacks[0].action


def test_dense_weights_are_referenced_in_place(tmp_path):
    torch.manual_seed(6)
    g = Graph("big")
    x = g.add_input("x", tensor("f32", "batch", "seq", 256))
    w1 = g.add_weight("l1.weight", Dense(torch.randn(512, 256) * 0.05))
    b1 = g.add_weight("l1.bias", Dense(torch.randn(512)))
    w2 = g.add_weight("l2.weight", Dense(torch.randn(256, 512) * 0.05))
    e = g.add_weight("emb.weight", Dense(torch.randn(300, 64)))
    ids = g.add_input("ids", tensor("i64", "batch", "seq"))
    h = g.op("linear", g.op("gelu", g.op("linear", x, w1, b1, name="l1")), w2, None, name="l2")
    g.set_outputs([h, g.op("embedding", ids, e, name="emb")])
    g.meta["vocab"] = 300
    lowered, ops = lower_run_compare(g, tmp_path)
    weights_size = (tmp_path / "weights.safetensors").stat().st_size
    model_size = (tmp_path / MODEL_FILE).stat().st_size
    assert weights_size > 1_000_000
    assert model_size < weights_size / 100, (model_size, weights_size)
    assert not (tmp_path / DATA_FILE).exists() or (tmp_path / DATA_FILE).stat().st_size < 4096
    assert lowered.files[0] == MODEL_FILE and all((tmp_path / f).is_file() for f in lowered.files)
    # every large initializer points into weights.safetensors at exactly the weight's bytes
    data = (tmp_path / "weights.safetensors").read_bytes()
    arrays = {"l1.weight": w1, "l1.bias": b1, "l2.weight": w2, "emb.weight": e}
    found = set()
    for t in _inits(tmp_path).values():
        ext = _external(t)
        if not ext:
            assert len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data) <= 1024
            continue
        assert ext["location"] == "weights.safetensors"
        off, length = int(ext["offset"]), int(ext["length"])
        for name, v in arrays.items():
            if (off, length) == _st_span(tmp_path / "weights.safetensors", f"{name}::data"):
                assert data[off:off + length] == v.encoding.data.numpy().tobytes()
                found.add(name)
    assert found == set(arrays)


def test_fp16_dense_graph(tmp_path):
    torch.manual_seed(7)
    g = Graph("half")
    x = g.add_input("x", tensor("f16", "batch", 64))
    w = g.add_weight("fc.weight", Dense((torch.randn(32, 64) * 0.1).half()))
    g.set_outputs([g.op("linear", x, w, None, name="fc")])
    backend, lowered = lower(g, tmp_path)
    runner = backend.load(tmp_path, lowered.entry)
    xin = torch.randn(5, 64).half()
    got = runner(xin)
    assert got.dtype == torch.float16
    assert_close(got.float(), xin.float() @ w.encoding.data.float().T, rtol=2e-3)     # fp16 output
    assert_close(got.float(), run_graph(g, [xin])[0].float(), rtol=2e-3)


def test_shared_intquant_weight_between_embedding_and_linear(tmp_path):
    """A tied embedding / LM head: the linear applies act-order to its activations, the embedding
    needs the original column order (a reported Gather fallback)."""
    torch.manual_seed(8)
    enc = make_intquant(torch.randn(100, 64), 4, "group", True, torch.float32, 32, act_order=True)
    g = Graph("tied")
    g.meta["vocab"] = 100
    ids = g.add_input("ids", tensor("i64", "batch", "seq"))
    w = g.add_weight("tok.weight", enc)
    h = g.op("embedding", ids, w, name="emb")
    g.set_outputs([g.op("linear", h, w, None, name="head")])
    lowered, ops = lower_run_compare(g, tmp_path)
    assert "MatMulNBits" in ops
    assert [f.where for f in lowered.fallbacks] == ["tok.weight"] and "act-order" in lowered.fallbacks[0].action


# --- symbolic dims ---------------------------------------------------------------------------
def test_symbolic_dims_stay_symbolic_and_run_at_several_sizes(tmp_path):
    torch.manual_seed(9)
    enc = make_intquant(torch.randn(N, K), 8, "channel", False)
    g = _single_linear(enc)
    lower_run_compare(g, tmp_path, sizes=[{"batch": 1, "seq": 1}, {"batch": 3, "seq": 17}, {"batch": 7, "seq": 2}])
    model = onnx.load(os.fspath(tmp_path / MODEL_FILE), load_external_data=False)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", K]
    out_dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", "seq", N]


# --- runner behaviour ---------------------------------------------------------------------------
def test_runner_numpy_torch_and_dict_inputs(tmp_path):
    torch.manual_seed(10)
    g = _single_linear(make_intquant(torch.randn(8, 16), 8, "channel", True), 16)
    backend, lowered = lower(g, tmp_path)
    runner = backend.load(tmp_path, lowered.entry)
    x = torch.randn(2, 3, 16)
    ref = run_graph(g, [x])[0]
    out_np = runner(x.numpy())
    out_t = runner(x)
    out_d = runner({"x": x.numpy()})
    assert isinstance(out_np, np.ndarray) and isinstance(out_t, torch.Tensor) and isinstance(out_d, np.ndarray)
    for o in (out_np, out_t, out_d):
        assert_close(o, ref)
    assert runner.input_names == ["x"] and runner.output_names == [g.outputs[0].name]
    with pytest.raises(BackendError, match="takes 1 inputs"):
        runner(x, x)
    with pytest.raises(BackendError, match="CPU"):
        backend.load(tmp_path, lowered.entry, device="cuda")
    assert backend.load(tmp_path, lowered.entry, device="cpu")(x.numpy()).shape == (2, 3, 8)


def test_registry_returns_the_onnx_backend():
    b = get_backend("onnx")
    assert isinstance(b, OnnxBackend) and b is get_backend("onnx")
    assert {"onnx", "onnxruntime"} <= set(b.toolchain())
    with pytest.raises(BackendError, match="unknown backend 'nope'; known: coreml, hls"):
        get_backend("nope")


# --- errors -------------------------------------------------------------------------------------
def test_op_without_lowering_raises_backend_error_naming_op(tmp_path, monkeypatch):
    monkeypatch.delitem(LOWERINGS, "gelu")
    g = Graph("nolower")
    x = g.add_input("x", tensor("f32", "batch", 4))
    g.set_outputs([g.op("gelu", g.op("relu", x), name="act")])
    with pytest.raises(BackendError) as ei:
        lower(g, tmp_path)
    assert "gelu" in str(ei.value) and "act" in str(ei.value)
    assert not (tmp_path / MODEL_FILE).exists()


def test_lowering_failure_inside_a_rule_names_the_node(tmp_path, monkeypatch):
    def broken(b, node, fb):
        raise KeyError("boom")
    monkeypatch.setitem(LOWERINGS, "relu", broken)
    g = Graph("broken")
    x = g.add_input("x", tensor("f32", "batch", 4))
    g.set_outputs([g.op("relu", x, name="the_relu")])
    with pytest.raises(BackendError, match="the_relu.*relu"):
        lower(g, tmp_path)


@pytest.mark.parametrize("what", ["weight", "input"])
def test_graph_output_that_is_a_weight_or_an_input(tmp_path, what):
    """BUG: an output not produced by a node (a weight, or an input passed through) is given an
    output value_info without a shape, and onnx.checker(full_check) rejects the model."""
    g = Graph("passthrough")
    x = g.add_input("x", tensor("f32", "batch", 4))
    w = g.add_weight("w", Dense(torch.randn(4, 4)))
    y = g.op("relu", x)
    g.set_outputs([y, w] if what == "weight" else [y, x])
    lower_run_compare(g, tmp_path)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_intquant_quantize_per_tensor_lowers(tmp_path, symmetric):
    """BUG: IntQuant.quantize(per_tensor=True) raises EncodingError (its scales come out per row)."""
    torch.manual_seed(11)
    enc = IntQuant.quantize(torch.randn(N, K), 8, symmetric=symmetric, per_tensor=True)
    assert enc.granularity == "tensor"
    lower_run_compare(_single_linear(enc), tmp_path)


@pytest.mark.parametrize("bits,gran", [(8, "channel"), (4, "group"), (3, "tensor")])
def test_intquant_with_fp16_output_in_an_fp16_graph(tmp_path, bits, gran):
    """BUG: an IntQuant weight whose out_dtype is float16 (an fp16 model) is dequantised to float32
    (DequantizeLinear with float32 scales, MatMulNBits with float32 scales), so the ONNX graph mixes
    float16 activations with float32 weights and is rejected; the checker's InferenceError also
    escapes lower() unwrapped (only ValidationError is caught)."""
    import dataclasses
    from nnforge.ir import dtype
    torch.manual_seed(12)
    enc = make_intquant(torch.randn(32, 64), bits, gran, True, torch.float16, 32)
    enc = dataclasses.replace(enc, out_dtype=dtype("float16"))
    g = Graph("half_q")
    x = g.add_input("x", tensor("f16", "batch", 64))
    w = g.add_weight("fc.weight", enc)
    g.set_outputs([g.op("linear", x, w, None, name="fc")])
    backend, lowered = lower(g, tmp_path)
    runner = backend.load(tmp_path, lowered.entry)
    xin = torch.randn(5, 64).half()
    got = runner(xin)
    assert got.dtype == torch.float16
    assert_close(got.float(), run_graph(g, [xin])[0].float(), rtol=2e-3)


# --- session config -----------------------------------------------------------------------------
def test_weight_only_dequantize_is_folded_at_load(tmp_path):
    # weight-only DequantizeLinear: the bundle asks ORT to fold it into fp32 weights once at load
    torch.manual_seed(2)
    enc = make_intquant(torch.randn(64, 128), 8, "channel", True)
    lowered, ops = lower_run_compare(_single_linear(enc, 128), tmp_path)
    assert "DequantizeLinear" in ops
    assert lowered.entry["session_config"] == {"session.disable_quant_qdq": "1"}


def test_dense_and_activation_quantised_graphs_keep_ort_defaults(tmp_path):
    torch.manual_seed(2)
    dense = _single_linear(Dense(torch.randn(64, 128)), 128)
    lowered, _ = lower_run_compare(dense, tmp_path / "dense")
    assert "session_config" not in lowered.entry
    g = _single_linear(make_intquant(torch.randn(64, 128), 8, "channel", True), 128)
    lin = next(n for n in g.nodes if n.op == "linear")
    with g.inserting_before(lin):
        q = g.op("fake_quant", lin.inputs[0], format=dtype("int8"), scale=0.05, zero_point=0, name="act_q")
    lin.inputs[0] = q
    lowered, ops = lower_run_compare(g, tmp_path / "w8a8")
    assert "QuantizeLinear" in ops and "session_config" not in lowered.entry


@pytest.mark.parametrize("config, match", [
    ({"session.disable_quant_qdq": "2"}, "'session.disable_quant_qdq' = '2' is not allowed"),
    ({"session.use_env_allocators": "1"}, "'session.use_env_allocators' = '1' is not allowed"),
    (["session.disable_quant_qdq"], "session_config must be a table of strings"),
])
def test_manifest_session_config_is_checked(tmp_path, config, match):
    from nnforge.bundle import BundleError
    backend, lowered = lower(_single_linear(Dense(torch.randn(8, 16)), 16), tmp_path)
    with pytest.raises(BundleError, match=match):
        backend.load(tmp_path, {**lowered.entry, "session_config": config})


def test_static_int4_activations_are_an_int4_qdq_pair_rounding_ties_to_even(tmp_path):
    g = Graph("int4_act")
    x = g.add_input("x", tensor("f32", "n"))
    g.set_outputs([g.op("fake_quant", x, format=dtype("int4"), scale=0.5, zero_point=0)])
    backend, lowered = lower(g, tmp_path)
    xs = torch.tensor([0.25, 0.75, -1.25, 1.75, 3.25, -3.75, 100.0, -100.0, 0.0])
    got = backend.load(tmp_path, lowered.entry)(xs.numpy())
    got = got[0] if isinstance(got, (list, tuple)) else got
    assert torch.equal(torch.as_tensor(got), run_graph(g, [xs])[0])
    assert torch.as_tensor(got).tolist() == [0.0, 1.0, -1.0, 2.0, 3.0, -4.0, 3.5, -4.0, 0.0]
    assert "QuantizeLinear" in op_types(tmp_path)

"""ONNX -> IR: one hand-built ONNX graph (opset 17..21) per converter, imported with ``from_onnx``,
run by the reference interpreter and compared with ONNX Runtime on the same file and inputs.

Also: symbolic shape arithmetic (Shape -> Gather -> Concat -> Reshape, as exporters emit it) must be
resolved into IR attributes over the symbol names; unknown ops are all reported together; old
opsets, unsafe external data and inconsistent tensors are refused; MatMulNBits round-trips through
nnforge's own ONNX backend; the zoo ResNet-18 exported by torch.onnx (dynamo) matches ORT.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nnforge.frontend import FrontendError, ShapeRuleError, UnsupportedOpsError
from nnforge.frontend.onnx_import import from_onnx
from nnforge.frontend.onnx_ops import CONVERTERS
from nnforge.ir import Dense, Graph, IntQuant, run_graph, save_graph, tensor

F, I64, I32, BOOL, U8, I8 = (TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL,
                             TensorProto.UINT8, TensorProto.INT8)
IR_VERSION = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}
SIZES = [{"batch": 3, "seq": 5}, {"batch": 2, "seq": 7}]     # every case runs at two sets of sizes
INT64_MAX = 2 ** 63 - 1


# --- building models ------------------------------------------------------------------------------
def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, array) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def ints(name, values) -> TensorProto:
    return init(name, np.asarray(values, dtype=np.int64))


def node(op, ins, outs, domain=None, **attrs):
    return helper.make_node(op, ins, outs, domain=domain, **attrs)


def make_model(nodes, inputs, outputs, inits=(), opset=17, ms=False, name="g") -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(inits))
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="nnforge-tests")
    model.ir_version = IR_VERSION[opset]
    return model


def save(model, tmp_path: Path, name="model.onnx") -> Path:
    path = tmp_path / name
    onnx.save_model(model, str(path))
    return path


def rng_for(seed):
    return np.random.default_rng(seed)


def feed_for(model: onnx.ModelProto, sizes: dict, gen: dict, seed: int) -> dict[str, np.ndarray]:
    """Random inputs for every graph input; symbolic dims take ``sizes[dim_param]``; ``gen`` maps an
    input name to a function (shape, rng) -> array for inputs that need special values."""
    r = rng_for(seed)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else sizes[d.dim_param] for d in tt.shape.dim]
        if v.name in gen:
            out[v.name] = np.ascontiguousarray(gen[v.name](shape, r))
        elif tt.elem_type == F:
            out[v.name] = r.standard_normal(shape).astype(np.float32)
        elif tt.elem_type == BOOL:
            out[v.name] = r.random(shape) > 0.5
        elif tt.elem_type == I64:
            out[v.name] = r.integers(-5, 6, shape).astype(np.int64)
        elif tt.elem_type == I32:
            out[v.name] = r.integers(-5, 6, shape).astype(np.int32)
        else:
            raise AssertionError(f"no generator for {v.name}")
    return out


def ort_run(path: Path, feed: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def assert_close(got: torch.Tensor, want: np.ndarray, tol: float, what: str):
    want_t = torch.from_numpy(np.array(want))            # (np.ascontiguousarray would make 0-d arrays 1-d)
    assert tuple(got.shape) == tuple(want_t.shape), f"{what}: shape {tuple(got.shape)} != ORT {tuple(want_t.shape)}"
    assert got.dtype == want_t.dtype, f"{what}: dtype {got.dtype} != ORT {want_t.dtype}"
    if not want_t.is_floating_point():
        assert torch.equal(got, want_t), f"{what}: values differ from ORT\n{got}\n{want_t}"
        return
    g, w = got.double(), want_t.double()
    assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{what}: NaN pattern differs"
    ok = ~torch.isnan(w)
    if ok.any():
        err = (g[ok] - w[ok]).abs().max().item()
        scale = max(1.0, w[ok].abs().max().item())
        assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


def check_against_ort(path: Path, gen: dict | None = None, tol: float = 1e-5, sizes=SIZES) -> Graph:
    """Import ``path``, run interpreter and ORT on the same inputs (at each size), compare."""
    model = onnx.load(str(path), load_external_data=False)
    g = from_onnx(path)
    for k, sz in enumerate(sizes):
        feed = feed_for(model, sz, gen or {}, seed=k)
        want = ort_run(path, feed)
        got = run_graph(g, {v.name: torch.from_numpy(feed[v.name]) for v in g.inputs})
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, tol, f"output {i} at sizes {sz}")
    return g


# --- value generators ---------------------------------------------------------------------------
def positive(shape, r):
    return (np.abs(r.standard_normal(shape)) + 0.2).astype(np.float32)


def with_nans(shape, r):
    x = r.standard_normal(shape).astype(np.float32)
    x[..., ::3] = np.nan
    return x


def index_gen(lo, hi, dtype=np.int64):
    return lambda shape, r: r.integers(lo, hi, shape).astype(dtype)


# --- the case table -----------------------------------------------------------------------------
@dataclass
class OCase:
    id: str
    nodes: list
    inputs: list
    outputs: list
    inits: list = field(default_factory=list)
    opset: int = 17
    gen: dict = field(default_factory=dict)
    tol: float = 1e-5
    check: Callable[[Graph], None] | None = None       # extra assertions on the imported graph
    ms: bool = False

    @property
    def op_types(self):
        return {n.op_type if not n.domain else f"{n.domain}.{n.op_type}" for n in self.nodes}


X = vi("x", F, ["batch", 6])
Y = vi("y", F, ["batch", 6])
Yb = vi("y", BOOL, ["batch", 6])


def unary(op, opset=17, gen=None, tol=1e-5, **attrs):
    return OCase(f"{op}{'_' + '_'.join(f'{k}{v}' for k, v in attrs.items()) if attrs else ''}",
                 [node(op, ["x"], ["y"], **attrs)], [X], [Y], opset=opset, gen={"x": gen} if gen else {}, tol=tol)


def binary(op, elem=F, out_elem=None, opset=17, gen=None, const_b=False, tol=1e-5):
    a = vi("a", elem, ["batch", 6])
    inputs, inits = [a], []
    if const_b:       # broadcast a constant row
        dt = {F: np.float32, I64: np.int64, BOOL: np.bool_}[elem]
        inits = [init("b", (np.arange(6) % 3 + 1).astype(dt) if elem != BOOL else np.arange(6) % 2 == 0)]
    else:
        inputs.append(vi("b", elem, ["batch", 6]))
    return OCase(f"{op}{'_const' if const_b else ''}", [node(op, ["a", "b"], ["y"])], inputs,
                 [vi("y", out_elem or elem, ["batch", 6])], inits, opset=opset, gen=gen or {}, tol=tol)


def attr_has(op, **want):
    def check(g: Graph):
        nodes = [n for n in g.nodes if n.op == op]
        assert nodes, f"no {op} node in {[n.op for n in g.nodes]}"
        for k, v in want.items():
            assert nodes[0].attrs[k] == v, f"{op}.{k} = {nodes[0].attrs[k]!r}, expected {v!r}"
    return check


def has_ops(*ops):
    def check(g: Graph):
        present = {n.op for n in g.nodes}
        assert set(ops) <= present, f"expected IR ops {ops}, graph has {sorted(present)}"
    return check


def img(name="x", c=4, h=7, w=7, elem=F):
    return vi(name, elem, ["batch", c, h, w])


r0 = rng_for(123)
W84 = r0.standard_normal((8, 4)).astype(np.float32)
W48 = r0.standard_normal((4, 8)).astype(np.float32)
B4 = r0.standard_normal(4).astype(np.float32)
CONV_W = (r0.standard_normal((6, 2, 3, 3)) * 0.3).astype(np.float32)
CONV_B = r0.standard_normal(6).astype(np.float32)

CASES: list[OCase] = [
    # --- elementwise unary ----------------------------------------------------------------------
    *[unary(op) for op in ("Neg", "Abs", "Exp", "Relu", "Sigmoid", "Tanh", "Erf", "Sin", "Cos", "Floor", "Ceil",
                           "Identity")],
    unary("Log", gen=positive), unary("Sqrt", gen=positive), unary("Reciprocal", gen=positive),
    unary("HardSwish", opset=18),
    unary("Gelu", opset=20), unary("Gelu", opset=20, approximate="tanh"),
    unary("LeakyRelu", alpha=0.3), unary("HardSigmoid"), unary("HardSigmoid", alpha=1 / 6, beta=0.5),
    OCase("Dropout", [node("Dropout", ["x"], ["y"])], [X], [Y], opset=17),
    OCase("Not", [node("Not", ["x"], ["y"])], [vi("x", BOOL, ["batch", 6])], [Yb]),
    OCase("IsNaN", [node("IsNaN", ["x"], ["y"])], [X], [Yb], gen={"x": with_nans}, opset=20),
    OCase("PRelu", [node("PRelu", ["x", "slope"], ["y"])], [img()], [img("y")],
          [init("slope", np.array([0.1, -0.2, 0.3, 0.5], np.float32).reshape(4, 1, 1))]),
    OCase("Clip_min_max", [node("Clip", ["x", "lo", "hi"], ["y"])], [X], [Y],
          [init("lo", np.float32(-0.5)), init("hi", np.float32(0.7))]),
    OCase("Clip_min_only", [node("Clip", ["x", "lo"], ["y"])], [X], [Y], [init("lo", np.float32(0.1))]),
    OCase("Clip_max_only", [node("Clip", ["x", "", "hi"], ["y"])], [X], [Y], [init("hi", np.float32(0.1))]),
    OCase("Cast_float_to_int64", [node("Mul", ["x", "four"], ["x4"]), node("Cast", ["x4"], ["y"], to=I64)], [X],
          [vi("y", I64, ["batch", 6])], [init("four", np.float32(4))]),
    OCase("Cast_int64_to_float_and_bool", [node("Cast", ["i"], ["f"], to=F), node("Cast", ["i"], ["b"], to=BOOL)],
          [vi("i", I64, ["batch", 6])], [vi("f", F, ["batch", 6]), vi("b", BOOL, ["batch", 6])]),
    OCase("CastLike", [node("CastLike", ["i", "x"], ["y"])], [vi("i", I64, ["batch", 6]), X], [Y], opset=19),
    # --- binary ---------------------------------------------------------------------------------
    *[binary(op) for op in ("Add", "Sub", "Mul")],
    binary("Add", const_b=True), binary("Div", const_b=True),
    binary("Div", gen={"b": positive}),
    binary("Pow", gen={"a": positive}, tol=1e-5),
    OCase("Pow_int_exponent", [node("Pow", ["a", "e"], ["y"])], [vi("a", F, ["batch", 6])], [Y],
          [init("e", np.int64(3))], opset=19),
    OCase("Div_int_negative", [node("Div", ["a", "b"], ["y"])],
          [vi("a", I64, ["batch", 6]), vi("b", I64, ["batch", 6])],
          [vi("y", I64, ["batch", 6])], gen={"a": index_gen(-9, 10), "b": index_gen(1, 4)}),
    binary("Equal", I64, BOOL), binary("Less", F, BOOL), binary("LessOrEqual", F, BOOL, opset=18),
    binary("Greater", F, BOOL), binary("GreaterOrEqual", F, BOOL, opset=19),
    binary("And", BOOL), binary("Or", BOOL), binary("Xor", BOOL), binary("Or", BOOL, const_b=True),
    OCase("Max_Min_variadic", [node("Max", ["a", "b", "c"], ["mx"]), node("Min", ["a", "b", "c"], ["mn"])],
          [vi(n, F, ["batch", 6]) for n in "abc"], [vi("mx", F, ["batch", 6]), vi("mn", F, ["batch", 6])]),
    OCase("Where", [node("Where", ["c", "a", "b"], ["y"])],
          [vi("c", BOOL, ["batch", 6]), vi("a", F, ["batch", 6]), vi("b", F, [6])], [Y]),
    # --- matmul / gemm --------------------------------------------------------------------------
    OCase("MatMul_3d_weight", [node("MatMul", ["x", "w"], ["y"])], [vi("x", F, ["batch", "seq", 8])],
          [vi("y", F, ["batch", "seq", 4])], [init("w", W84)]),
    OCase("MatMul_activations_4d", [node("MatMul", ["a", "b"], ["y"])],
          [vi("a", F, ["batch", 2, "seq", 4]), vi("b", F, ["batch", 2, 4, "seq"])],
          [vi("y", F, ["batch", 2, "seq", "seq"])]),
    OCase("MatMul_vector_right", [node("MatMul", ["x", "v"], ["y"])], [vi("x", F, ["batch", 8])],
          [vi("y", F, ["batch"])], [init("v", W84[:, 0].copy())]),
    OCase("MatMul_vector_left", [node("MatMul", ["v", "x"], ["y"])], [vi("x", F, ["batch", 8, 4])],
          [vi("y", F, ["batch", 4])], [init("v", W84[:, 1].copy())]),
    OCase("Gemm_weight_bias", [node("Gemm", ["x", "w", "b"], ["y"])], [vi("x", F, ["batch", 8])],
          [vi("y", F, ["batch", 4])], [init("w", W84), init("b", B4)], check=has_ops("linear")),
    OCase("Gemm_transB_alpha", [node("Gemm", ["x", "w", "b"], ["y"], transB=1, alpha=0.5)],
          [vi("x", F, ["batch", 8])], [vi("y", F, ["batch", 4])], [init("w", W48), init("b", B4)]),
    OCase("Gemm_beta_2d_bias", [node("Gemm", ["x", "w", "b"], ["y"], transB=1, alpha=2.0, beta=0.25)],
          [vi("x", F, ["batch", 8])], [vi("y", F, ["batch", 4])], [init("w", W48), init("b", B4.reshape(1, 4))]),
    OCase("Gemm_transA_activation_B", [node("Gemm", ["a", "b"], ["y"], transA=1, transB=1)],
          [vi("a", F, [8, "batch"]), vi("b", F, [4, 8])], [vi("y", F, ["batch", 4])]),
    OCase("Gemm_scalar_C", [node("Gemm", ["x", "w", "c"], ["y"])], [vi("x", F, ["batch", 8])],
          [vi("y", F, ["batch", 4])], [init("w", W84), init("c", np.float32(1.5))]),
    OCase("Gemm_bias_beta", [node("Gemm", ["x", "w", "c"], ["y"], beta=0.5)], [vi("x", F, ["batch", 8])],
          [vi("y", F, ["batch", 4])], [init("w", W84), init("c", B4)]),
    OCase("Gemm_alpha_no_C", [node("Gemm", ["x", "w"], ["y"], alpha=3.0, transB=1)], [vi("x", F, ["batch", 8])],
          [vi("y", F, ["batch", 4])], [init("w", W48)]),
    OCase("MatMul_int64", [node("MatMul", ["a", "b"], ["y"])], [vi("a", I64, ["batch", 3]), vi("b", I64, [3, 2])],
          [vi("y", I64, ["batch", 2])]),
    # --- conv and normalisation -----------------------------------------------------------------
    OCase("Conv_group_stride_pads", [node("Conv", ["x", "w", "b"], ["y"], group=2, strides=[2, 1],
                                          pads=[1, 0, 0, 1])],
          [img()], [vi("y", F, ["batch", 6, 3, 6])], [init("w", CONV_W), init("b", CONV_B)]),
    OCase("Conv_dilation_no_bias", [node("Conv", ["x", "w"], ["y"], dilations=[2, 2], pads=[2, 2, 2, 2],
                                         group=2)],
          [img()], [vi("y", F, ["batch", 6, 7, 7])], [init("w", CONV_W)]),
    OCase("Conv_auto_pad_same_upper", [node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
          [img(c=2, h=8, w=7)], [vi("y", F, ["batch", 6, 4, 4])], [init("w", CONV_W[:, :, :2, :2].copy())]),
    OCase("Conv_auto_pad_same_lower", [node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER")],
          [img(c=2, h=6, w=5)], [vi("y", F, ["batch", 6, 6, 5])], [init("w", CONV_W[:, :, :2, :2].copy())]),
    OCase("Conv_auto_pad_valid", [node("Conv", ["x", "w"], ["y"], auto_pad="VALID")],
          [img(c=2)], [vi("y", F, ["batch", 6, 5, 5])], [init("w", CONV_W)]),
    OCase("Conv1d_symbolic_length", [node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1])],
          [vi("x", F, ["batch", 2, "seq"])], [vi("y", F, ["batch", 6, "seq"])],
          [init("w", CONV_W[:, :, 1, :].copy()), init("b", CONV_B)]),
    OCase("BatchNormalization", [node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)],
          [img()], [img("y")], [init("s", np.float32([0.5, 1, 1.5, 2])), init("b", np.float32([0, 1, -1, 0.5])),
                                init("m", np.float32([0.1, -0.2, 0, 0.3])), init("v", np.float32([1, 0.5, 2, 1.5]))],
          opset=17),
    OCase("LayerNormalization_bias", [node("LayerNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5)],
          [vi("x", F, ["batch", "seq", 8])], [vi("y", F, ["batch", "seq", 8])],
          [init("s", W84[:, 0].copy()), init("b", W84[:, 1].copy())]),
    OCase("LayerNormalization_axis_no_bias", [node("LayerNormalization", ["x", "s"], ["y"], axis=-2)],
          [vi("x", F, ["batch", 3, 4])], [vi("y", F, ["batch", 3, 4])], [init("s", W48[:3, :4].copy())]),
    OCase("Softmax_axis1", [node("Softmax", ["x"], ["y"], axis=1)], [vi("x", F, ["batch", "seq", 3])],
          [vi("y", F, ["batch", "seq", 3])]),
    OCase("LogSoftmax", [node("LogSoftmax", ["x"], ["y"])], [vi("x", F, ["batch", "seq", 3])],
          [vi("y", F, ["batch", "seq", 3])]),
    # --- pooling --------------------------------------------------------------------------------
    OCase("MaxPool_pads_strides", [node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                        pads=[1, 1, 1, 1])], [img()], [vi("y", F, ["batch", 4, 4, 4])]),
    OCase("MaxPool_ceil_dilation", [node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                         dilations=[1, 2], ceil_mode=1)], [img(h=7, w=8)],
          [vi("y", F, ["batch", 4, 4, 4])]),
    OCase("AveragePool_count_include_pad", [node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                                 pads=[1, 1, 1, 1], count_include_pad=1)],
          [img()], [vi("y", F, ["batch", 4, 4, 4])]),
    OCase("AveragePool_exclude_pad", [node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                           pads=[1, 1, 1, 1])], [img()], [vi("y", F, ["batch", 4, 4, 4])]),
    OCase("AveragePool_ceil", [node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
          [img(h=7, w=6)], [vi("y", F, ["batch", 4, 4, 3])], opset=19),
    OCase("AveragePool_asym_pads_exclude", [node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                                 pads=[1, 0, 0, 1])], [img()], [vi("y", F, ["batch", 4, 4, 4])]),
    OCase("AveragePool_asym_pads_include", [node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                                 pads=[1, 0, 0, 1], count_include_pad=1)],
          [img()], [vi("y", F, ["batch", 4, 4, 4])]),
    OCase("MaxPool_auto_pad_same_upper", [node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                               auto_pad="SAME_UPPER")], [img()], [vi("y", F, ["batch", 4, 4, 4])]),
    OCase("MaxPool_asym_pads_ceil", [node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                          pads=[0, 1, 2, 0], ceil_mode=1)],
          [img(h=8, w=8)], [vi("y", F, ["batch", 4, None, None])]),
    OCase("GlobalAveragePool", [node("GlobalAveragePool", ["x"], ["y"])], [img()], [vi("y", F, ["batch", 4, 1, 1])]),
    OCase("GlobalMaxPool", [node("GlobalMaxPool", ["x"], ["y"])], [img()], [vi("y", F, ["batch", 4, 1, 1])]),
    # --- reductions -----------------------------------------------------------------------------
    OCase("ReduceSum_axes_input", [node("ReduceSum", ["x", "ax"], ["y"], keepdims=0)],
          [vi("x", F, ["batch", "seq", 3])], [vi("y", F, ["batch", 3])], [ints("ax", [1])]),
    OCase("ReduceMean_attr_opset17", [node("ReduceMean", ["x"], ["y"], axes=[-1])],
          [vi("x", F, ["batch", "seq", 3])], [vi("y", F, ["batch", "seq", 1])]),
    OCase("ReduceMean_input_opset18", [node("ReduceMean", ["x", "ax"], ["y"], keepdims=0)],
          [vi("x", F, ["batch", "seq", 3])], [vi("y", F, ["batch"])], [ints("ax", [1, 2])], opset=18),
    OCase("ReduceMax_all_axes", [node("ReduceMax", ["x"], ["y"], keepdims=0)], [vi("x", F, ["batch", 3])],
          [vi("y", F, [])], opset=18),
    OCase("ReduceMin_noop_empty_axes", [node("ReduceMin", ["x"], ["y"], noop_with_empty_axes=1)],
          [vi("x", F, ["batch", 3])], [vi("y", F, ["batch", 3])], opset=18),
    OCase("ReduceProd", [node("ReduceProd", ["x"], ["y"], axes=[0])], [vi("x", F, ["batch", 3])], [vi("y", F, [1, 3])]),
    OCase("ReduceL1", [node("ReduceL1", ["x", "ax"], ["y"])], [vi("x", F, ["batch", 3])], [vi("y", F, ["batch", 1])],
          [ints("ax", [-1])], opset=18),
    OCase("ReduceL2", [node("ReduceL2", ["x"], ["y"], axes=[1], keepdims=0)], [vi("x", F, ["batch", 3])],
          [vi("y", F, ["batch"])]),
    OCase("ReduceSumSquare", [node("ReduceSumSquare", ["x"], ["y"], axes=[1])], [vi("x", F, ["batch", 3])],
          [vi("y", F, ["batch", 1])]),
    OCase("ArgMax", [node("ArgMax", ["x"], ["y"], axis=1, keepdims=0)], [vi("x", F, ["batch", "seq", 3])],
          [vi("y", I64, ["batch", 3])]),
    OCase("ArgMax_keepdims", [node("ArgMax", ["x"], ["y"], axis=-1)], [vi("x", F, ["batch", 3])],
          [vi("y", I64, ["batch", 1])]),
    OCase("CumSum", [node("CumSum", ["x", "ax"], ["y"])], [vi("x", F, ["batch", "seq"])],
          [vi("y", F, ["batch", "seq"])],
          [init("ax", np.int64(1))]),
    # --- shapes ---------------------------------------------------------------------------------
    OCase("Reshape_zero_and_minus1", [node("Reshape", ["x", "s"], ["y"])], [vi("x", F, ["batch", "seq", 6])],
          [vi("y", F, ["batch", "seq", 2, 3])], [ints("s", [0, 0, -1, 3])],
          check=attr_has("reshape", shape=["batch", "seq", 2, 3])),
    OCase("Flatten_axis2", [node("Flatten", ["x"], ["y"], axis=2)], [vi("x", F, ["batch", 3, 4, 5])],
          [vi("y", F, [None, 20])]),
    OCase("Flatten_axis_equals_rank", [node("Flatten", ["x"], ["y"], axis=2)], [vi("x", F, ["batch", 6])],
          [vi("y", F, [None, 1])]),
    OCase("Squeeze_Unsqueeze_axes_input", [node("Unsqueeze", ["x", "a1"], ["u"]), node("Squeeze", ["u", "a2"], ["y"])],
          [vi("x", F, ["batch", 1, 6])], [vi("y", F, ["batch", 6, 1])], [ints("a1", [0, -1]), ints("a2", [0, 2])]),
    OCase("Squeeze_no_axes", [node("Squeeze", ["x"], ["y"])], [vi("x", F, ["batch", 1, 6, 1])],
          [vi("y", F, ["batch", 6])]),
    OCase("Transpose_perm", [node("Transpose", ["x"], ["y"], perm=[0, 2, 1])], [vi("x", F, ["batch", "seq", 3])],
          [vi("y", F, ["batch", 3, "seq"])]),
    OCase("Transpose_default_reverses", [node("Transpose", ["x"], ["y"])], [vi("x", F, ["batch", "seq", 3])],
          [vi("y", F, [3, "seq", "batch"])]),
    OCase("Expand_const_shape", [node("Expand", ["x", "s"], ["y"])], [vi("x", F, ["batch", 1, 3])],
          [vi("y", F, ["batch", 4, 3])], [ints("s", [1, 4, 1])], check=attr_has("expand", shape=["batch", 4, 3])),
    OCase("Expand_to_shape_of_other", [node("Shape", ["z"], ["zs"]), node("Expand", ["x", "zs"], ["y"])],
          [vi("x", F, [1, 3]), vi("z", F, ["batch", 3])], [vi("y", F, ["batch", 3])],
          check=attr_has("expand", shape=["batch", 3])),
    OCase("Slice_neg_start_open_end_step", [node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
          [vi("x", F, ["batch", "seq", 8])], [vi("y", F, ["batch", "seq", 4])],
          [ints("st", [-7]), ints("en", [INT64_MAX]), ints("ax", [2]), ints("sp", [2])]),
    OCase("Slice_symbolic_axis", [node("Slice", ["x", "st", "en", "ax"], ["y"])],
          [vi("x", F, ["batch", "seq", 3])], [vi("y", F, ["batch", None, 3])],
          [ints("st", [1]), ints("en", [-1]), ints("ax", [1])], check=attr_has("slice", start=1, end="seq - 1")),
    OCase("Slice_past_end_and_default_axes", [node("Slice", ["x", "st", "en"], ["y"])], [vi("x", F, ["batch", 6])],
          [vi("y", F, [None, None])], [ints("st", [0, 2]), ints("en", [INT64_MAX, 100])]),
    OCase("Concat_neg_axis", [node("Concat", ["a", "b", "a"], ["y"], axis=-1)],
          [vi("a", F, ["batch", 2]), vi("b", F, ["batch", 3])], [vi("y", F, ["batch", 7])]),
    OCase("Split_sizes_input", [node("Split", ["x", "sp"], ["y0", "y1"], axis=1)], [vi("x", F, ["batch", 6])],
          [vi("y0", F, ["batch", 2]), vi("y1", F, ["batch", 4])], [ints("sp", [2, 4])]),
    OCase("Split_num_outputs_uneven", [node("Split", ["x"], ["y0", "y1", "y2"], axis=-1, num_outputs=3)],
          [vi("x", F, ["batch", 7])], [vi(f"y{i}", F, ["batch", n]) for i, n in enumerate((3, 3, 1))], opset=18),
    OCase("Split_even_default", [node("Split", ["x"], ["y0", "y1"])], [vi("x", F, [4, "batch"])],
          [vi("y0", F, [2, "batch"]), vi("y1", F, [2, "batch"])]),
    OCase("Gather_axis1_negative_indices", [node("Gather", ["x", "i"], ["y"], axis=1)],
          [vi("x", F, ["batch", 6, 2])], [vi("y", F, ["batch", 2, 2, 2])], [ints("i", [[0, -1], [3, -6]])]),
    OCase("Gather_scalar_index", [node("Gather", ["x", "i"], ["y"], axis=1)], [vi("x", F, ["batch", 6, 2])],
          [vi("y", F, ["batch", 2])], [init("i", np.int64(-2))]),
    OCase("Gather_embedding_ids", [node("Gather", ["table", "ids"], ["y"])], [vi("ids", I32, ["batch", "seq"])],
          [vi("y", F, ["batch", "seq", 4])], [init("table", W84)], gen={"ids": index_gen(0, 8, np.int32)}),
    OCase("GatherElements", [node("GatherElements", ["x", "i"], ["y"], axis=1)],
          [vi("x", F, ["batch", 5]), vi("i", I64, ["batch", 3])], [vi("y", F, ["batch", 3])],
          gen={"i": index_gen(-5, 5)}),
    OCase("GatherND", [node("GatherND", ["x", "i"], ["y"])], [vi("x", F, [4, 5, 3]), vi("i", I64, ["batch", 2])],
          [vi("y", F, ["batch", 3])], gen={"i": lambda shape, r: np.stack(
              [r.integers(0, 4, shape[0]), r.integers(0, 5, shape[0])], 1).astype(np.int64)}),
    OCase("Pad_constant_value", [node("Pad", ["x", "p", "v"], ["y"])], [vi("x", F, ["batch", "seq", 3])],
          [vi("y", F, ["batch", None, 4])], [ints("p", [0, 1, 0, 0, 2, 1]), init("v", np.float32(-2.5))]),
    OCase("Pad_axes_input", [node("Pad", ["x", "p", "", "ax"], ["y"])], [vi("x", F, ["batch", "seq", 3])],
          [vi("y", F, ["batch", "seq", 6])], [ints("p", [2, 1]), ints("ax", [-1])], opset=18),
    # torch's legacy exporter writes F.pad's amounts as Concat -> Reshape [-1, 2] -> Slice step -1 ->
    # Transpose -> Reshape: shape-vector ops on constants, which import as constants (MobileNetV2)
    OCase("Pad_amounts_reordered_by_the_legacy_exporter",
          [node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64))),
           node("ConstantOfShape", ["four"], ["z"], value=numpy_helper.from_array(np.array([0], np.int64))),
           node("Concat", ["c", "z"], ["cz"], axis=0), node("Reshape", ["cz", "pairs"], ["p2"]),
           node("Slice", ["p2", "st", "en", "ax", "step"], ["rev"]), node("Transpose", ["rev"], ["tr"], perm=[1, 0]),
           node("Reshape", ["tr", "flat"], ["p"]), node("Pad", ["x", "p"], ["y"])],
          [vi("x", F, ["batch", 3, "seq", 4])], [vi("y", F, ["batch", 3, None, 5])],
          [ints("four", [4]), ints("pairs", [-1, 2]), ints("st", [-1]), ints("en", [-INT64_MAX]), ints("ax", [0]),
           ints("step", [-1]), ints("flat", [-1])], check=attr_has("pad", pads=[0, 0, 0, 0, 0, 0, 1, 1])),
    OCase("Expand_lower_rank_target", [node("Expand", ["x", "s"], ["y"])], [vi("x", F, ["batch", 1])],
          [vi("y", F, [2, "batch", 4])], [ints("s", [2, 1, 4])]),
    OCase("Shape_cast_int32_roundtrip", [node("Shape", ["x"], ["s"]), node("Cast", ["s"], ["s32"], to=I32),
                                         node("Cast", ["s32"], ["s64"], to=I64), node("Reshape", ["x", "s64"], ["y"])],
          [vi("x", F, ["batch", 6])], [vi("y", F, ["batch", 6])], check=attr_has("reshape", shape=["batch", 6])),
    OCase("Clip_int", [node("Clip", ["i", "lo", "hi"], ["y"])], [vi("i", I64, ["batch", 6])],
          [vi("y", I64, ["batch", 6])], [init("lo", np.int64(-2)), init("hi", np.int64(3))]),
    OCase("CumSum_int_negative_axis", [node("CumSum", ["x", "ax"], ["y"])], [vi("x", I64, ["batch", 6])],
          [vi("y", I64, ["batch", 6])], [init("ax", np.int32(-1))]),
    # --- constants and creation -----------------------------------------------------------------
    OCase("Constant_tensor_float_ints", [node("Constant", [], ["c"], value=init("cv", W84[0].reshape(2, 2))),
                                         node("Constant", [], ["s"], value_float=0.5),
                                         node("Constant", [], ["shp"], value_ints=[-1, 2, 2]),
                                         node("Reshape", ["x", "shp"], ["xr"]),
                                         node("Mul", ["xr", "c"], ["m"]), node("Add", ["m", "s"], ["y"])],
          [vi("x", F, ["batch", 4])], [vi("y", F, ["batch", 2, 2])]),
    OCase("ConstantOfShape_symbolic", [node("Shape", ["x"], ["s"]),
                                       node("ConstantOfShape", ["s"], ["c"], value=init("v", np.float32([1.5]))),
                                       node("Add", ["x", "c"], ["y"])],
          [vi("x", F, ["batch", "seq"])], [vi("y", F, ["batch", "seq"])], check=has_ops("full")),
    OCase("ConstantOfShape_static_int", [node("ConstantOfShape", ["s"], ["y"], value=init("v", np.int64([7])))],
          [], [vi("y", I64, [2, 3])], [ints("s", [2, 3])]),
    OCase("Range_symbolic_limit", [node("Shape", ["x"], ["s"]), node("Gather", ["s", "one"], ["n"]),
                                   node("Range", ["zero", "n", "one"], ["r"]),
                                   node("Cast", ["r"], ["rf"], to=F), node("Add", ["x", "rf"], ["y"])],
          [vi("x", F, ["batch", "seq"])], [vi("y", F, ["batch", "seq"])],
          [init("zero", np.int64(0)), init("one", np.int64(1))], check=attr_has("arange", end="seq")),
    OCase("Range_float_constants", [node("Range", ["a", "b", "d"], ["r"]), node("Mul", ["x", "r"], ["y"])],
          [vi("x", F, ["batch", 5])], [vi("y", F, ["batch", 5])],
          [init("a", np.float32(0.5)), init("b", np.float32(3.0)), init("d", np.float32(0.5))]),
]


# --- symbolic shape arithmetic (what exporters emit) ---------------------------------------------
def _attention_reshape_case():
    """[batch, seq, 8] -> [batch, seq, 2, 4] -> transpose -> back, with every target shape computed
    at run time from Shape/Gather/Unsqueeze/Concat, as torch.onnx exports it."""
    nodes = [
        node("Shape", ["x"], ["s"]),
        node("Gather", ["s", "i0"], ["b"], axis=0), node("Gather", ["s", "i1"], ["t"], axis=0),
        node("Unsqueeze", ["b", "ax0"], ["b1"]), node("Unsqueeze", ["t", "ax0"], ["t1"]),
        node("Concat", ["b1", "t1", "heads"], ["shape4"], axis=0),
        node("Reshape", ["x", "shape4"], ["x4"]),
        node("Transpose", ["x4"], ["xt"], perm=[0, 2, 1, 3]),
        node("Mul", ["t1", "two"], ["t2"]),                        # 2*seq, via arithmetic on the dims
        node("Concat", ["b1", "t2", "four"], ["shape3"], axis=0),
        node("Reshape", ["xt", "shape3"], ["y"]),
    ]
    inits = [init("i0", np.int64(0)), init("i1", np.int64(1)), ints("ax0", [0]), ints("heads", [2, 4]),
             ints("two", [2]), ints("four", [4])]

    def check(g: Graph):
        shapes = [n.attrs["shape"] for n in g.nodes if n.op == "reshape"]
        assert ["batch", "seq", 2, 4] in shapes, shapes
        assert ["batch", "2*seq", 4] in shapes, shapes
        assert not any(isinstance(d, int) and d in (3, 5, 2 * 5) for s in shapes for d in s[:2]), shapes
        assert g.outputs[0].shape == ("batch", "2*seq", 4)
    return OCase("Shape_Gather_Concat_Reshape_chain", nodes, [vi("x", F, ["batch", "seq", 8])],
                 [vi("y", F, ["batch", None, 4])], inits, check=check)


def _flatten_heads_case():
    """[b, s, h, d] -> [b, s, h*d] through Shape -> Slice -> Concat, and a flat reshape whose size
    comes from Size and Div/Sub/Neg on it; Max/Min/Mod on the static part of the shape."""
    nodes = [
        node("Shape", ["x"], ["s"]),
        node("Slice", ["s", "z", "two"], ["bs"]),                     # [batch, seq]
        node("Shape", ["x"], ["hd"], start=-2),                       # [2, 3]
        node("Gather", ["hd", "zero"], ["h"]), node("Gather", ["hd", "one"], ["d"]),
        node("Mul", ["h", "d"], ["hdp"]), node("Unsqueeze", ["hdp", "z"], ["hd1"]),
        node("Concat", ["bs", "hd1"], ["target"], axis=0),
        node("Reshape", ["x", "target"], ["y"]),
        node("Size", ["x"], ["n"]),                                   # 6*batch*seq
        node("Div", ["n", "six"], ["bsn"]),                           # batch*seq
        node("Sub", ["bsn", "zero"], ["bsz"]), node("Neg", ["bsz"], ["nb"]), node("Neg", ["nb"], ["pb"]),
        node("Unsqueeze", ["pb", "z"], ["pb1"]),
        node("Max", ["h", "d"], ["mx"]), node("Min", ["h", "d"], ["mn"]), node("Mod", ["d", "h"], ["md"]),
        node("Mul", ["mx", "mn"], ["six_a"]), node("Add", ["six_a", "md"], ["seven"]),
        node("Sub", ["seven", "one"], ["six_b"]),                     # max(2,3)*min(2,3) + 3%2 - 1 = 6
        node("Unsqueeze", ["six_b", "z"], ["six1"]),
        node("Concat", ["pb1", "six1"], ["flat"], axis=0),
        node("Reshape", ["x", "flat"], ["y2"]),
    ]
    inits = [ints("z", [0]), ints("two", [2]), init("zero", np.int64(0)), init("one", np.int64(1)),
             init("six", np.int64(6))]

    def check(g: Graph):
        shapes = [n.attrs["shape"] for n in g.nodes if n.op == "reshape"]
        assert ["batch", "seq", 6] in shapes, shapes
        assert ["batch*seq", 6] in shapes, shapes
        assert g.outputs[1].shape == ("batch*seq", 6)
    return OCase("Shape_Slice_Size_arith_chain", nodes, [vi("x", F, ["batch", "seq", 2, 3])],
                 [vi("y", F, ["batch", "seq", 6]), vi("y2", F, [None, 6])], inits, opset=18, check=check)


def _symbolic_min_max_mod_case():
    """Max/Min/Mod on a symbolic dim give opaque but evaluable dims: ConstantOfShape of
    [batch, min(max(seq, 2), 6) + seq % 4] must match ORT at several sizes."""
    nodes = [
        node("Shape", ["x"], ["s"]), node("Gather", ["s", "zero"], ["b"]), node("Gather", ["s", "one"], ["t"]),
        node("Max", ["t", "two"], ["tmax"]), node("Min", ["tmax", "six"], ["tmin"]),
        node("Mod", ["t", "four"], ["tmod"]),
        node("Add", ["tmin", "tmod"], ["n"]),
        node("Unsqueeze", ["b", "z"], ["b1"]), node("Unsqueeze", ["n", "z"], ["n1"]),
        node("Concat", ["b1", "n1"], ["shp"], axis=0),
        node("ConstantOfShape", ["shp"], ["y"], value=init("v", np.float32([2.0]))),
    ]
    inits = [init("zero", np.int64(0)), init("one", np.int64(1)), init("two", np.int64(2)), init("four", np.int64(4)),
             init("six", np.int64(6)), ints("z", [0])]

    def check(g: Graph):
        (full,) = [n for n in g.nodes if n.op == "full"]
        b, n = full.attrs["shape"]
        assert b == "batch" and isinstance(n, str) and "seq" in n and "min" in n and "%" in n, full.attrs["shape"]
    return OCase("Symbolic_Max_Min_Mod_dims", nodes, [vi("x", F, ["batch", "seq"])], [vi("y", F, ["batch", None])],
                 inits, check=check)


def _mask_from_shape_case():
    """A causal mask built from Range over a symbolic length, compared with Less, used by Where."""
    nodes = [
        node("Shape", ["x"], ["s"], start=1, end=2), node("Squeeze", ["s"], ["n"]),
        node("Range", ["zero", "n", "one"], ["r"]),
        node("Unsqueeze", ["r", "ax0"], ["row"]), node("Unsqueeze", ["r", "ax1"], ["col"]),
        node("Less", ["row", "col"], ["future"]),
        node("Where", ["future", "neg", "x"], ["y"]),
    ]
    inits = [init("zero", np.int64(0)), init("one", np.int64(1)), ints("ax0", [0]), ints("ax1", [1]),
             init("neg", np.float32(-1e4))]
    return OCase("Causal_mask_from_Range", nodes, [vi("x", F, ["batch", "seq", "seq"])],
                 [vi("y", F, ["batch", "seq", "seq"])], inits, check=has_ops("arange", "where"))


CASES += [_attention_reshape_case(), _flatten_heads_case(), _symbolic_min_max_mod_case(), _mask_from_shape_case()]


# --- quantised weights ----------------------------------------------------------------------------
def _dq_cases():
    r = rng_for(7)
    cases = []
    # int8 per-tensor symmetric weight feeding Gemm(transB=1) -> linear with an IntQuant weight
    w = r.integers(-127, 128, (4, 8)).astype(np.int8)
    cases.append(OCase(
        "DequantizeLinear_int8_per_tensor_gemm",
        [node("DequantizeLinear", ["wq", "ws"], ["w"]), node("Gemm", ["x", "w"], ["y"], transB=1)],
        [vi("x", F, ["batch", 8])], [vi("y", F, ["batch", 4])], [init("wq", w), init("ws", np.float32(0.02))],
        check=_intquant_linear(bits=8, signed=True)))
    # uint8 per-row with zero points (asymmetric) feeding MatMul through a Transpose
    wu = r.integers(0, 256, (4, 8)).astype(np.uint8)
    cases.append(OCase(
        "DequantizeLinear_uint8_per_channel_zp",
        [node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0), node("Transpose", ["w"], ["wt"]),
         node("MatMul", ["x", "wt"], ["y"])],
        [vi("x", F, ["batch", 8])], [vi("y", F, ["batch", 4])],
        [init("wq", wu), init("ws", np.float32([0.01, 0.02, 0.03, 0.04])), init("wz", np.uint8([120, 128, 3, 250]))]))
    # uint8 with the offset-binary zero point 128 everywhere -> signed IntQuant
    cases.append(OCase(
        "DequantizeLinear_uint8_zp128_signed",
        [node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]), node("Gemm", ["x", "w"], ["y"], transB=1)],
        [vi("x", F, ["batch", 8])], [vi("y", F, ["batch", 4])],
        [init("wq", wu), init("ws", np.float32(0.01)), init("wz", np.uint8(128))],
        check=_intquant_linear(bits=8, signed=True)))
    # blocked int4 (opset 21), block 4 along the columns
    w4 = r.integers(-8, 8, (4, 8)).astype(np.int8)
    scales = (r.random((4, 2)) * 0.1 + 0.01).astype(np.float32)
    cases.append(OCase(
        "DequantizeLinear_int4_blocked",
        [node("DequantizeLinear", ["wq", "ws"], ["w"], axis=1, block_size=4),
         node("Gemm", ["x", "w"], ["y"], transB=1)],
        [vi("x", F, ["batch", 8])], [vi("y", F, ["batch", 4])],
        [_four_bit("wq", w4, TensorProto.INT4), init("ws", scales)], opset=21,
        check=_intquant_linear(bits=4, signed=True, group_size=4)))
    # blocked uint4 with zero points
    wu4 = r.integers(0, 16, (4, 8)).astype(np.uint8)
    zp4 = r.integers(0, 16, (4, 2)).astype(np.uint8)
    cases.append(OCase(
        "DequantizeLinear_uint4_blocked_zp",
        [node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1, block_size=4),
         node("Gemm", ["x", "w"], ["y"], transB=1)],
        [vi("x", F, ["batch", 8])], [vi("y", F, ["batch", 4])],
        [_four_bit("wq", wu4, TensorProto.UINT4), init("ws", scales), _four_bit("wz", zp4, TensorProto.UINT4)],
        opset=21, check=_intquant_linear(bits=4, group_size=4)))
    # a 4-D conv weight per output channel: decoded to a dense constant
    wc = r.integers(-127, 128, (6, 2, 3, 3)).astype(np.int8)
    cases.append(OCase(
        "DequantizeLinear_conv_weight_per_channel",
        [node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0), node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        [img(c=2, h=5, w=5)], [vi("y", F, ["batch", 6, 5, 5])],
        [init("wq", wc), init("ws", (r.random(6) * 0.01 + 0.001).astype(np.float32))]))
    return cases


def _four_bit(name, values, data_type) -> TensorProto:
    flat = (values.astype(np.int64).reshape(-1) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    t = TensorProto()
    t.name, t.data_type = name, data_type
    t.dims.extend(values.shape)
    t.raw_data = packed.tobytes()
    return t


def _intquant_linear(bits, signed=None, group_size=None):
    def check(g: Graph):
        lin = [n for n in g.nodes if n.op == "linear"]
        assert len(lin) == 1, [n.op for n in g.nodes]
        enc = lin[0].inputs[1].encoding
        assert isinstance(enc, IntQuant), enc
        assert enc.bits == bits
        if signed is not None:
            assert enc.signed == signed
        if group_size is not None:
            assert enc.group_size == group_size and enc.granularity == "group"
    return check


CASES += _dq_cases()

_ids = [c.id for c in CASES]
assert len(_ids) == len(set(_ids)), sorted(i for i in _ids if _ids.count(i) > 1)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_converter_matches_onnxruntime(case: OCase, tmp_path):
    model = make_model(case.nodes, case.inputs, case.outputs, case.inits, opset=case.opset, ms=case.ms)
    onnx.checker.check_model(model, full_check=True)
    path = save(model, tmp_path)
    g = check_against_ort(path, case.gen, case.tol)
    if case.check:
        case.check(g)


def test_graph_keeps_input_and_output_names(tmp_path):
    """IR inputs/outputs carry the ONNX names (runners and bundle signatures are keyed by them),
    also when a converter needs several IR nodes for one ONNX output. Checked over the whole case
    table; one failure lists every case that loses a name."""
    wrong = []
    for case in CASES:
        model = make_model(case.nodes, case.inputs, case.outputs, case.inits, opset=case.opset, ms=case.ms)
        g = from_onnx(save(model, tmp_path, f"{case.id}.onnx"))
        assert [v.name for v in g.inputs] == [v.name for v in case.inputs], case.id
        # An output that *is* a graph input or a constant (Identity, a folded ConstantOfShape) has
        # no node of its own in the IR and keeps that value's name; computed outputs must be renamed.
        wrong += [f"{case.id}: {v.name} != {o.name}" for v, o in zip(g.outputs, case.outputs)
                  if v.producer is not None and v.name != o.name]
    assert not wrong, f"{len(wrong)} output(s) renamed: " + "; ".join(wrong)


def test_case_table_covers_every_converter():
    covered = set().union(*(c.op_types for c in CASES))
    missing = set(CONVERTERS) - covered - {"com.microsoft.MatMulNBits"}
    assert not missing, f"ONNX converters without a test case: {sorted(missing)}"
    opsets = {c.opset for c in CASES}
    assert min(opsets) >= 17 and max(opsets) == 21 and len(opsets) == 5, opsets


def test_symbolic_inputs_keep_dim_param_names(tmp_path):
    model = make_model([node("Relu", ["x"], ["y"])], [vi("x", F, ["batch", "seq", None])],
                       [vi("y", F, ["batch", "seq", None])])
    g = from_onnx(save(model, tmp_path))
    assert g.inputs[0].shape == ("batch", "seq", "x_2")


def test_gather_scalar_from_shape_is_scalar_dim(tmp_path):
    """Gather(Shape(x), scalar) gives a 0-d dim that Unsqueeze turns back into a 1-vector."""
    nodes = [node("Shape", ["x"], ["s"]), node("Gather", ["s", "i"], ["n"]), node("Unsqueeze", ["n", "a"], ["n1"]),
             node("Concat", ["n1", "m1"], ["shp"], axis=0), node("Reshape", ["x", "shp"], ["y"])]
    model = make_model(nodes, [vi("x", F, ["batch", 2, 3])], [vi("y", F, ["batch", 6])],
                       [init("i", np.int64(0)), ints("a", [0]), ints("m1", [-1])])
    g = check_against_ort(save(model, tmp_path))
    (rs,) = [n for n in g.nodes if n.op == "reshape"]
    assert rs.attrs["shape"] == ["batch", 6]
    assert not any(n.op in ("gather", "concat") for n in g.nodes), "shape arithmetic must not reach the IR"


# --- MatMulNBits: IR -> ONNX (nnforge backend) -> IR ----------------------------------------------
def test_matmulnbits_round_trip(tmp_path):
    from nnforge.backends.onnx import build_model
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    bias = torch.randn(16)
    enc = IntQuant.quantize(w, 4, group_size=32)
    g = Graph("q4")
    x = g.add_input("x", tensor("f32", "batch", 64))
    wv = g.add_weight("fc.weight", enc)
    bv = g.add_weight("fc.bias", Dense(bias))
    y = g.op("linear", x, wv, bv, name="fc")
    g.set_outputs([y])
    save_graph(g, tmp_path / "graph.json", tmp_path / "weights.safetensors")
    model, fallbacks = build_model(g, tmp_path / "weights.safetensors")
    assert not fallbacks
    assert any(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in model.graph.node)
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))

    g2 = from_onnx(path)
    lin = [n for n in g2.nodes if n.op == "linear"]
    assert len(lin) == 1 and not any(n.op == "matmul" for n in g2.nodes)
    enc2 = lin[0].inputs[1].encoding
    assert isinstance(enc2, IntQuant) and enc2.bits == 4 and enc2.group_size == 32 and enc2.shape == (16, 64)
    assert torch.equal(enc2.decode(), enc.decode())
    # the bias comes back either inside the linear or as the Add the backend put after MatMulNBits
    b2 = lin[0].inputs[2] if len(lin[0].inputs) > 2 else None
    if b2 is None:
        (add,) = [n for n in g2.nodes if n.op == "add"]
        assert add.inputs[0] is lin[0].output
        b2 = add.inputs[1]
    assert b2.is_weight and torch.equal(b2.encoding.decode(), bias)
    # the imported graph, the original graph and ORT agree
    xin = torch.randn(5, 64)
    want = ort_run(path, {"x": xin.numpy()})[0]
    got = run_graph(g2, [xin])[0]
    assert_close(got, want, 1e-4, "MatMulNBits import")
    torch.testing.assert_close(got, run_graph(g, [xin])[0], rtol=1e-5, atol=1e-5)


def test_matmulnbits_with_zero_points_round_trip(tmp_path):
    from nnforge.backends.onnx import build_model
    torch.manual_seed(1)
    w = torch.randn(8, 64) + 0.3
    enc = IntQuant.quantize(w, 4, group_size=16, symmetric=False)
    g = Graph("q4zp")
    x = g.add_input("x", tensor("f32", "batch", "seq", 64))
    g.set_outputs([g.op("linear", x, g.add_weight("w", enc), name="fc")])
    save_graph(g, tmp_path / "graph.json", tmp_path / "weights.safetensors")
    model, _ = build_model(g, tmp_path / "weights.safetensors")
    assert any(n.op_type == "MatMulNBits" for n in model.graph.node)
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    g2 = from_onnx(tmp_path / "model.onnx")
    (lin,) = [n for n in g2.nodes if n.op == "linear"]
    enc2 = lin.inputs[1].encoding
    assert isinstance(enc2, IntQuant) and enc2.zero_point is not None
    assert torch.equal(enc2.decode(), enc.decode())
    xin = torch.randn(2, 3, 64)
    assert_close(run_graph(g2, [xin])[0], ort_run(tmp_path / "model.onnx", {"x": xin.numpy()})[0], 1e-4, "zp")


def test_nnforge_onnx_output_round_trips_with_external_weights(tmp_path):
    """torch -> IR -> ONNX (weights read in place from weights.safetensors by offset) -> IR: the
    re-imported graph has the same weights and computes the same function."""
    from nnforge.backends.onnx import build_model
    from nnforge.frontend import from_torch
    from tests.conftest import tiny_mlp
    model = tiny_mlp()
    g = from_torch(model, (torch.randn(3, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    save_graph(g, tmp_path / "graph.json", tmp_path / "weights.safetensors")
    onnx_model, _ = build_model(g, tmp_path / "weights.safetensors")
    assert any(t.data_location == TensorProto.EXTERNAL for t in onnx_model.graph.initializer)
    onnx.save_model(onnx_model, str(tmp_path / "model.onnx"))
    g2 = from_onnx(tmp_path / "model.onnx")
    assert [v.name for v in g2.inputs] == [v.name for v in g.inputs] and g2.inputs[0].shape == ("batch", 16)
    lin1 = [n for n in g.nodes if n.op == "linear"]
    lin2 = [n for n in g2.nodes if n.op == "linear"]
    assert len(lin1) == len(lin2) == 2
    for a, b in zip(lin1, lin2):
        assert torch.equal(a.inputs[1].encoding.decode(), b.inputs[1].encoding.decode())
    x = torch.randn(7, 16)
    with torch.no_grad():
        torch.testing.assert_close(run_graph(g2, [x])[0], model(x), rtol=1e-5, atol=1e-5)


def test_custom_converter_and_output_names(tmp_path):
    assert "Softplus" not in CONVERTERS
    model = make_model([node("Softplus", ["x"], ["sp"], name="soft"), node("Relu", ["sp"], ["y"])], [X], [Y])
    path = save(model, tmp_path)
    with pytest.raises(UnsupportedOpsError, match="Softplus at node soft"):
        from_onnx(path)

    def softplus(cx):           # log(1 + exp(x))
        x = cx.value(0)
        one = cx.const(torch.tensor(1.0))
        return cx.emit("log", cx.emit("add", cx.emit("exp", x), one))

    g = from_onnx(path, converters={"Softplus": softplus}, output_names=["activation"], name="soft_model")
    assert g.name == "soft_model" and [v.name for v in g.outputs] == ["activation"]
    x = torch.randn(4, 6)
    torch.testing.assert_close(run_graph(g, [x])[0], torch.relu(torch.nn.functional.softplus(x)))


# --- errors -------------------------------------------------------------------------------------
def test_two_unknown_ops_are_both_listed(tmp_path):
    assert "TopK" not in CONVERTERS and "NonZero" not in CONVERTERS and "Einsum" not in CONVERTERS
    nodes = [node("Relu", ["x"], ["r"], name="relu0"),
             node("TopK", ["r", "k"], ["vals", "idx"], name="topk0", axis=-1),
             node("Einsum", ["r", "r"], ["e"], name="einsum0", equation="bi,bi->b"),
             node("Add", ["vals", "vals"], ["y"], name="after_topk")]
    model = make_model(nodes, [X], [vi("y", F, ["batch", 2]), vi("e", F, ["batch"])], [ints("k", [2])])
    path = save(model, tmp_path, "two_unknown.onnx")
    with pytest.raises(UnsupportedOpsError) as info:
        from_onnx(path)
    msg = str(info.value)
    assert [(i.op, i.node) for i in info.value.items] == [("TopK", "topk0"), ("Einsum", "einsum0")]
    assert "TopK at node topk0" in msg and "Einsum at node einsum0" in msg and "two_unknown.onnx" in msg
    assert "after_topk" not in msg        # users of an unsupported result are not extra problems


def test_unknown_domain_op_is_named_with_its_domain(tmp_path):
    nodes = [node("FusedGemm", ["x", "x"], ["y"], domain="com.microsoft", name="fg")]
    model = make_model(nodes, [vi("x", F, [6, 6])], [vi("y", F, [6, 6])], ms=True)
    with pytest.raises(UnsupportedOpsError, match=r"com\.microsoft\.FusedGemm at node fg"):
        from_onnx(save(model, tmp_path))


def test_converter_refusal_carries_reason(tmp_path):
    nodes = [node("CumSum", ["x", "ax"], ["y"], exclusive=1, name="cs")]
    model = make_model(nodes, [X], [Y], [init("ax", np.int64(1))])
    with pytest.raises(UnsupportedOpsError) as info:
        from_onnx(save(model, tmp_path))
    (item,) = info.value.items
    assert item.op == "CumSum" and item.node == "cs" and "exclusive" in item.reason


def test_failed_shape_rule_is_not_reported_as_an_unsupported_op(tmp_path):
    nodes = [node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = make_model(nodes, [X], [vi("y", F, ["batch", 3])], [init("w", np.ones((5, 3), np.float32))])
    with pytest.raises(ShapeRuleError) as info:
        from_onnx(save(model, tmp_path, "bad_matmul.onnx"))
    msg = str(info.value)
    assert not isinstance(info.value, UnsupportedOpsError) and "unsupported" not in msg
    (item,) = info.value.failed
    assert (item.op, item.node, item.inputs) == ("MatMul", "mm", "f32[batch, 6], f32[5, 3]")
    assert "MatMul at node mm (bad_matmul.onnx), inputs f32[batch, 6], f32[5, 3]" in msg
    assert "inner dimensions differ" in msg and "ONNX Runtime" in msg


def test_undecidable_shape_comparison_names_the_node_and_its_shape_values(tmp_path):
    """batch < seq holds for some sizes and not others: the Less node is supported, but this use of
    it cannot be decided while importing."""
    nodes = [node("Shape", ["x"], ["s"]),
             node("Gather", ["s", "i0"], ["b"], axis=0), node("Gather", ["s", "i1"], ["t"], axis=0),
             node("Less", ["b", "t"], ["lt"], name="cmp"), node("Cast", ["lt"], ["lf"], to=F),
             node("Add", ["x", "lf"], ["y"])]
    model = make_model(nodes, [vi("x", F, ["batch", "seq"])], [vi("y", F, ["batch", "seq"])],
                       [ints("i0", 0), ints("i1", 1)])
    with pytest.raises(ShapeRuleError) as info:
        from_onnx(save(model, tmp_path))
    (item,) = info.value.failed
    assert (item.op, item.node, item.inputs) == ("Less", "cmp", "shape value ['batch'], shape value ['seq']")
    assert "compares shape values batch and seq" in item.reason


def test_unsupported_ops_and_failed_nodes_are_reported_together(tmp_path):
    nodes = [node("Softplus", ["x"], ["sp"], name="soft"), node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = make_model(nodes, [X], [vi("sp", F, ["batch", 6]), vi("y", F, ["batch", 3])],
                       [init("w", np.ones((5, 3), np.float32))])
    with pytest.raises(UnsupportedOpsError) as info:
        from_onnx(save(model, tmp_path))
    assert [i.node for i in info.value.items] == ["soft"] and [f.node for f in info.value.failed] == ["mm"]
    assert "1 node(s) failed" in str(info.value) and "inner dimensions differ" in str(info.value)


# --- declared output shapes -----------------------------------------------------------------------
def test_output_declared_with_a_fixed_batch_is_refused_with_advice(tmp_path):
    """An exporter that specialised the batch to the example's 1 declares it fixed at the output
    while the input leaves it free."""
    nodes = [node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [X], [vi("y", F, [1, 6])])
    with pytest.raises(FrontendError) as info:
        from_onnx(save(model, tmp_path, "specialised.onnx"))
    msg = str(info.value)
    assert msg.startswith("specialised.onnx: graph output y is declared [1, 6] but the imported graph computes "
                          "[batch, 6]")
    assert "fixed axis 0" in msg and "sizes of at least 2" in msg


def test_output_declared_with_another_expression_is_refused(tmp_path):
    nodes = [node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [vi("x", F, ["batch", "seq"])], [vi("y", F, ["seq", "batch"])])
    with pytest.raises(FrontendError, match=r"graph output y is declared \[seq, batch\] but the imported graph "
                                            r"computes \[batch, seq\].*open an issue"):
        from_onnx(save(model, tmp_path))


@pytest.mark.parametrize("declared", [["batch", "seq", 4], ["batch", "seq*4//4", "2*2"], ["unk__0", "seq", 4],
                                      ["batch", "Floor(seq)", 4], [None, None, None]])
def test_declared_outputs_that_agree_or_say_nothing_checkable_pass(tmp_path, declared):
    nodes = [node("Reshape", ["x", "shape"], ["y"])]
    model = make_model(nodes, [vi("x", F, ["batch", "seq", 2, 2])], [vi("y", F, declared)], [ints("shape", [0, 0, 4])])
    assert from_onnx(save(model, tmp_path)).outputs[0].shape == ("batch", "seq", 4)


def test_old_opset_is_refused(tmp_path):
    graph = helper.make_graph([node("Relu", ["x"], ["y"])], "g", [X], [Y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    with pytest.raises(FrontendError, match=r"opset 11.*opset 13 or newer"):
        from_onnx(save(model, tmp_path))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FrontendError, match="no such ONNX file"):
        from_onnx(tmp_path / "absent.onnx")
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(FrontendError, match="not a readable ONNX model"):
        from_onnx(bad)


def _external_model(tmp_path: Path, location: str, offset: int = 0, length: int | None = 24,
                    name: str = "secret_w") -> Path:
    t = TensorProto()
    t.name, t.data_type = name, F
    t.dims.extend([6])
    t.data_location = TensorProto.EXTERNAL
    entries = [("location", location), ("offset", str(offset))]
    if length is not None:
        entries.append(("length", str(length)))
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph([node("Add", ["x", name], ["y"])], "g", [X], [Y], [t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model_dir = tmp_path / "model_dir"
    model_dir.mkdir(exist_ok=True)
    path = model_dir / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_external_data_in_model_dir_is_read(tmp_path):
    path = _external_model(tmp_path, "w.bin", offset=8)
    data = np.arange(6, dtype=np.float32) * 0.5
    (path.parent / "w.bin").write_bytes(b"\x00" * 8 + data.tobytes() + b"\x00" * 4)
    g = check_against_ort(path)
    assert torch.equal(g.weights["secret_w"].encoding.decode(), torch.from_numpy(data))


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "symlink_dir", "beyond_end", "no_length_offset"])
def test_unsafe_external_data_is_refused(tmp_path, kind):
    outside = tmp_path / "x.bin"
    outside.write_bytes(np.arange(6, dtype=np.float32).tobytes())
    if kind == "parent":
        path = _external_model(tmp_path, "../x.bin")
    elif kind == "absolute":
        path = _external_model(tmp_path, str(outside))
    elif kind == "symlink":
        path = _external_model(tmp_path, "link.bin")
        os.symlink(outside, path.parent / "link.bin")
    elif kind == "symlink_dir":
        path = _external_model(tmp_path, "sub/x.bin")
        os.symlink(tmp_path, path.parent / "sub")
    elif kind == "beyond_end":
        path = _external_model(tmp_path, "w.bin", offset=8, length=24)
        (path.parent / "w.bin").write_bytes(np.arange(6, dtype=np.float32).tobytes())      # 24 bytes < 8 + 24
    else:
        path = _external_model(tmp_path, "w.bin", offset=100, length=None)
        (path.parent / "w.bin").write_bytes(np.arange(6, dtype=np.float32).tobytes())
    with pytest.raises(FrontendError) as info:
        from_onnx(path)
    assert "secret_w" in str(info.value), str(info.value)


def test_external_data_length_disagreeing_with_dims_is_refused(tmp_path):
    path = _external_model(tmp_path, "w.bin", length=20)
    (path.parent / "w.bin").write_bytes(np.arange(6, dtype=np.float32).tobytes())
    with pytest.raises(FrontendError, match=r"secret_w.*20 bytes"):
        from_onnx(path)


def test_raw_data_size_disagreeing_with_dims_is_refused(tmp_path):
    t = TensorProto()
    t.name, t.data_type = "short_w", F
    t.dims.extend([6])
    t.raw_data = np.arange(5, dtype=np.float32).tobytes()           # 20 bytes for 6 floats
    graph = helper.make_graph([node("Add", ["x", "short_w"], ["y"])], "g", [X], [Y], [t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(FrontendError, match=r"short_w.*20 bytes.*24"):
        from_onnx(path)


def test_typed_data_count_disagreeing_with_dims_is_refused(tmp_path):
    t = TensorProto()                                                # float_data with 3 of 6 values
    t.name, t.data_type = "short_f", F
    t.dims.extend([6])
    t.float_data.extend([1.0, 2.0, 3.0])
    graph = helper.make_graph([node("Add", ["x", "short_f"], ["y"])], "g", [X], [Y], [t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(FrontendError, match="short_f"):
        from_onnx(path)


def test_bool_constant_node_stays_bool(tmp_path):
    """Small integer-like Constant nodes are held as shape vectors while importing; a bool one used
    as data (a Where condition) must come back as bool."""
    nodes = [node("Constant", [], ["mask"], value=helper.make_tensor("mv", BOOL, [6], [1, 0, 1, 1, 0, 0])),
             node("Where", ["mask", "x", "zero"], ["y"])]
    model = make_model(nodes, [X], [Y], [init("zero", np.float32(0))])
    check_against_ort(save(model, tmp_path, "bool_const.onnx"))


def test_int32_constant_node_stays_int32(tmp_path):
    nodes = [node("Constant", [], ["c"], value=helper.make_tensor("cv", I32, [6], [1, -2, 3, 4, 5, 6])),
             node("Add", ["i", "c"], ["y"])]
    model = make_model(nodes, [vi("i", I32, ["batch", 6])], [vi("y", I32, ["batch", 6])])
    check_against_ort(save(model, tmp_path, "int32_const.onnx"))


def test_int64_constant_node_as_data(tmp_path):
    nodes = [node("Constant", [], ["c"], value=helper.make_tensor("cv", I64, [6], [1, -2, 3, 4, 5, 6])),
             node("Mul", ["i", "c"], ["y"])]
    model = make_model(nodes, [vi("i", I64, ["batch", 6])], [vi("y", I64, ["batch", 6])])
    check_against_ort(save(model, tmp_path, "int64_const.onnx"))


# --- a real exporter: torch.onnx (dynamo) ResNet-18 -------------------------------------------------
def test_resnet18_dynamo_export_matches_onnxruntime(tmp_path):
    from nnforge.models.zoo import resnet18
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "resnet18.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=({0: batch},), external_data=False,
                          verbose=False, optimize=True)
    g = from_onnx(path)
    assert len(g.inputs) == 1 and g.inputs[0].shape[1:] == (3, 64, 64) and isinstance(g.inputs[0].shape[0], str)
    assert sum(n.op == "conv" for n in g.nodes) == 20
    assert sum(n.op == "linear" for n in g.nodes) + sum(n.op == "matmul" for n in g.nodes) == 1
    xin = torch.randn(3, 3, 64, 64)
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    want = ort_run(path, {name: xin.numpy()})
    got = run_graph(g, [xin])
    assert_close(got[0], want[0], 1e-4, "resnet18")
    with torch.no_grad():
        torch.testing.assert_close(got[0], model(xin), rtol=1e-4, atol=1e-4)

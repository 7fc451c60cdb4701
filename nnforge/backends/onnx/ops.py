"""Per-op lowering rules IR -> ONNX (opset 21), one small function per op, in LOWERINGS.

Each rule gets the builder, the node and the fallback list, reads its inputs by IR value name
(weights through :func:`operand`) and must produce ONNX outputs named like the node's outputs.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ...ir import Node, symbolic as sym
from ...ir.dtypes import bool_, float32, int32
from ...ir.ops.registry import broadcast_shapes
from ...registry import Registry
from ..base import BackendError
from . import weights as W
from .capabilities import GATHER_ROWS, MATMULNBITS
from .builder import OnnxBuilder, onnx_type

LOWERINGS = Registry("onnx lowering")
rule = LOWERINGS.register


def operand(b: OnnxBuilder, v, fallbacks) -> str | None:
    if v is None:
        return None
    return W.dense(b, v, fallbacks) if v.is_weight else v.name


def _ins(b, node, fallbacks):
    """The node's inputs by ONNX name; a layer's weight in the form the capability table gives it."""
    return [W.dense(b, v, fallbacks, W.lookup(b, node)) if W.is_layer_weight(node, i) else operand(b, v, fallbacks)
            for i, v in enumerate(node.inputs)]


def _out(node: Node) -> str:
    return node.outputs[0].name


_SIMPLE = {
    "neg": "Neg", "abs": "Abs", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "reciprocal": "Reciprocal",
    "sigmoid": "Sigmoid", "tanh": "Tanh", "erf": "Erf", "sin": "Sin", "cos": "Cos",
    "floor": "Floor", "ceil": "Ceil", "hardswish": "HardSwish", "not": "Not",
    "add": "Add", "sub": "Sub", "mul": "Mul", "pow": "Pow", "maximum": "Max", "minimum": "Min",
    "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual",
    "and": "And", "or": "Or", "xor": "Xor", "where": "Where", "matmul": "MatMul",
}


# ONNX arithmetic has no bool form; on bools torch's mul is a logical and, add a logical or.
_BOOL = {"mul": "And", "add": "Or"}


@rule(*_SIMPLE)
def _simple(b, node, fb):
    op = _SIMPLE[node.op]
    if node.op in _BOOL and node.outputs[0].dtype == bool_:
        op = _BOOL[node.op]
    b.node(op, _ins(b, node, fb), _out(node))


@rule("relu")
def _relu(b, node, fb):
    x = node.inputs[0]
    if x.dtype.is_float:
        b.node("Relu", _ins(b, node, fb), _out(node))
    else:       # ONNX Runtime implements Relu for floats only (the spec allows integers)
        b.node("Max", [operand(b, x, fb), b.scalar(0, x.dtype)], _out(node))


@rule("rsqrt")
def _rsqrt(b, node, fb):
    b.node("Reciprocal", [b.node("Sqrt", _ins(b, node, fb))], _out(node))


@rule("silu")
def _silu(b, node, fb):
    x = _ins(b, node, fb)[0]
    b.node("Mul", [x, b.node("Sigmoid", [x])], _out(node))


@rule("gelu")
def _gelu(b, node, fb):
    b.node("Gelu", _ins(b, node, fb), _out(node), approximate=node.attrs["approximate"])


@rule("hardsigmoid")
def _hardsigmoid(b, node, fb):
    b.node("HardSigmoid", _ins(b, node, fb), _out(node), alpha=1.0 / 6.0, beta=0.5)


@rule("leaky_relu")
def _leaky_relu(b, node, fb):
    b.node("LeakyRelu", _ins(b, node, fb), _out(node), alpha=node.attrs["negative_slope"])


@rule("ne")
def _ne(b, node, fb):
    b.node("Not", [b.node("Equal", _ins(b, node, fb))], _out(node))


@rule("div")
def _div(b, node, fb):
    a, c = _ins(b, node, fb)
    if not node.inputs[0].dtype.is_float:          # IR div is true division: ints give float32
        a = b.node("Cast", [a], to=onnx_type(float32))
        c = b.node("Cast", [c], to=onnx_type(float32))
    b.node("Div", [a, c], _out(node))


@rule("clamp")
def _clamp(b, node, fb):
    dt = node.inputs[0].dtype
    lo, hi = node.attrs["min"], node.attrs["max"]
    b.node("Clip", [_ins(b, node, fb)[0], None if lo is None else b.scalar(lo, dt),
                    None if hi is None else b.scalar(hi, dt)], _out(node))


@rule("cast")
def _cast(b, node, fb):
    b.node("Cast", _ins(b, node, fb), _out(node), to=onnx_type(node.attrs["dtype"]))


# --- layers with weights --------------------------------------------------------------------------
@rule("linear")
def lower_linear(b, node, fb):
    x, w, bias = (list(node.inputs) + [None])[:3]
    xin = operand(b, x, fb)         # x may itself be a weight (a folded constant)
    cap, why = W.lookup(b, node) if w.is_weight else (None, "")
    enc = w.encoding if w.is_weight else None
    # act-order: permute the activation columns instead of the weight, where the weight is
    # dequantised from its stored (permuted) codes; a weight decoded at export is in original order.
    perm = getattr(enc, "perm", None) if W.dequantize_ok(enc) else None
    if perm is not None:
        xin = b.node("Gather", [xin, b.ints(perm.tolist())], axis=-1)
    out = _out(node)
    bias_name = operand(b, bias, fb)
    if cap is MATMULNBITS:
        y = W.matmulnbits(b, xin, w, None if bias is not None else out)
        if bias is not None:
            b.node("Add", [y, bias_name], out)
        return
    if perm is not None:
        weight = W.dequantize(b, w, fb, why)     # stored column order matches the permuted activations
    else:
        weight = W.dense(b, w, fb, (cap, why)) if w.is_weight else operand(b, w, fb)
    if x.type.rank == 2:
        b.node("Gemm", [xin, weight, bias_name], out, transB=1)
        return
    # Flatten, not Reshape: ONNX Runtime 1.32's QDQ propagation moves an int8 activation
    # Quantize/DequantizeLinear pair across a Reshape and builds an invalid QuantizeLinear
    # (onnxruntime#27845), so W8A8 bundles with 3-D activations would not load; it leaves Flatten alone.
    flat = b.node("Flatten", [xin], axis=x.type.rank - 1)
    y = b.node("Gemm", [flat, weight, bias_name], transB=1)
    b.node("Reshape", [y, b.dims_1d(node.outputs[0].shape)], out)


@rule("conv")
def _conv(b, node, fb):
    a = node.attrs
    w = node.inputs[1]
    b.node("Conv", _ins(b, node, fb), _out(node), strides=a["stride"], pads=a["padding"], dilations=a["dilation"],
           group=a["groups"], kernel_shape=list(w.shape[2:]))


@rule("embedding")
def _embedding(b, node, fb):
    ids, w = node.inputs
    if w.is_weight and W.lookup(b, node)[0] is GATHER_ROWS:
        W.gather_rows(b, operand(b, ids, fb), w, _out(node), len(ids.shape))
        return
    idx, table = _ins(b, node, fb)
    b.node("Gather", [table, idx], _out(node), axis=0)


# --- rotations ----------------------------------------------------------------------------------


def _hadamard_factor(b, size: int, dtype, transposed: bool) -> str:
    """The initializer of ``hadamard_matrix(size)`` (or its transpose) in ``dtype``, one a graph."""
    from ...ir.hadamard import hadamard_matrix
    transposed = transposed and size & (size - 1) != 0       # a power of two's matrix is symmetric
    key = ("hadamard", size, dtype, transposed)
    if key not in b.memo:
        h = hadamard_matrix(size, dtype=dtype)
        b.memo[key] = b.const((h.T if transposed else h).numpy(), f"hadamard{size}")
    return b.memo[key]


@rule("hadamard")
def _hadamard(b, node, fb):
    import torch
    from ...ir.hadamard import hadamard_split
    x = node.inputs[0]
    block, dt = node.attrs["block"], x.dtype
    compute = torch.float64 if dt.name == "float64" else torch.float32   # float32, as the reference kernel
    y = operand(b, x, fb)
    if dt.name not in ("float32", "float64"):
        y = b.node("Cast", [y], to=onnx_type(float32))
    c = hadamard_split(block)
    a = block // c
    y = b.node("MatMul", [b.node("Reshape", [y, b.ints([-1, a, c])]), _hadamard_factor(b, c, compute, False)])
    if a > 1:              # H_a^T on the left, broadcast over the groups
        y = b.node("MatMul", [_hadamard_factor(b, a, compute, True), y])
    if dt.name in ("float32", "float64"):
        b.node("Reshape", [y, b.dims_1d(x.shape)], _out(node))
        return
    b.node("Cast", [b.node("Reshape", [y, b.dims_1d(x.shape)])], _out(node), to=onnx_type(dt))


# --- normalisation, softmax, pooling -----------------------------------------------------------
@rule("softmax", "log_softmax")
def _softmax(b, node, fb):
    b.node("Softmax" if node.op == "softmax" else "LogSoftmax", _ins(b, node, fb), _out(node),
           axis=node.attrs["axis"])


def _fill(b, shape, value, dt, what):
    if not all(isinstance(d, int) for d in shape):
        raise BackendError(f"{what} with a symbolic normalised shape needs explicit weight and bias")
    return b.const(np.full(shape, value, dtype=W.NP_TYPES[dt.name]))


@rule("layer_norm")
def _layer_norm(b, node, fb):
    x, w, bias = (list(node.inputs) + [None, None])[:3]
    axis = node.attrs["axis"] % x.type.rank
    scale = operand(b, w, fb) if w is not None else _fill(b, x.shape[axis:], 1.0, x.dtype, f"node {node.name}")
    b.node("LayerNormalization", [operand(b, x, fb), scale, operand(b, bias, fb)], _out(node), axis=axis,
           epsilon=node.attrs["eps"])


@rule("batch_norm")
def _batch_norm(b, node, fb):
    x, mean, var, w, bias = (list(node.inputs) + [None, None])[:5]
    c = x.shape[1]
    scale = operand(b, w, fb) if w is not None else _fill(b, [c], 1.0, x.dtype, f"node {node.name}")
    shift = operand(b, bias, fb) if bias is not None else _fill(b, [c], 0.0, x.dtype, f"node {node.name}")
    b.node("BatchNormalization", [operand(b, x, fb), scale, shift, operand(b, mean, fb), operand(b, var, fb)], _out(node),
           epsilon=node.attrs["eps"])


def _pool(b, node, fb, op_type, **attrs):
    """A pooling node; under ceil_mode, ONNX's shape inference (opset 21) counts a last window
    that starts in the end padding, which the IR (as torch and ONNX Runtime's kernels) drops: the
    result is then sliced to the IR's count, so static shapes agree downstream."""
    a = node.attrs
    want = list(node.outputs[0].shape[2:])
    nd, x = len(a["kernel"]), node.inputs[0]
    dil = a.get("dilation") or [1] * nd
    onnx_count = [-(-(x.shape[2 + i] + a["padding"][i] + a["padding"][nd + i] - dil[i] * (a["kernel"][i] - 1) - 1)
                    // a["stride"][i]) + 1 for i in range(nd)] if a["ceil_mode"] else want
    if onnx_count == want:
        b.node(op_type, _ins(b, node, fb), _out(node), **attrs)
        return
    y = b.node(op_type, _ins(b, node, fb), **attrs)
    b.node("Slice", [y, b.ints([0] * nd), b.ints(want), b.ints(list(range(2, 2 + nd)))], _out(node))


@rule("max_pool")
def _max_pool(b, node, fb):
    a = node.attrs
    _pool(b, node, fb, "MaxPool", kernel_shape=a["kernel"], strides=a["stride"], pads=a["padding"],
          dilations=a["dilation"], ceil_mode=int(a["ceil_mode"]))


@rule("avg_pool")
def _avg_pool(b, node, fb):
    a = node.attrs
    _pool(b, node, fb, "AveragePool", kernel_shape=a["kernel"], strides=a["stride"], pads=a["padding"],
          ceil_mode=int(a["ceil_mode"]), count_include_pad=int(a["count_include_pad"]))


@rule("adaptive_avg_pool")
def _adaptive(b, node, fb):
    x = node.inputs[0]
    size = node.attrs["output_size"]
    if all(s == 1 for s in size):
        b.node("GlobalAveragePool", [operand(b, x, fb)], _out(node))
        return
    spatial = x.shape[2:]
    if not all(isinstance(d, int) and d % s == 0 for d, s in zip(spatial, size)):
        raise BackendError(f"node {node.name}: adaptive_avg_pool from {list(spatial)} to {size} is not a fixed "
                           "window; ONNX has no adaptive pooling")
    kernel = [d // s for d, s in zip(spatial, size)]
    b.node("AveragePool", [operand(b, x, fb)], _out(node), kernel_shape=kernel, strides=kernel)


# --- reductions ---------------------------------------------------------------------------------
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_mean": "ReduceMean", "reduce_max": "ReduceMax",
           "reduce_min": "ReduceMin", "reduce_prod": "ReduceProd"}


@rule(*_REDUCE, "reduce_any", "reduce_all")
def _reduce(b, node, fb):
    x = _ins(b, node, fb)[0]
    axes = b.ints(node.attrs["axes"])
    keep = int(node.attrs["keepdim"])
    if node.op in ("reduce_sum", "reduce_prod") and node.inputs[0].dtype == bool_:
        # ONNX sums and multiplies no bools: count (or multiply) int32, then nonzero is true
        red = b.node(_REDUCE[node.op], [b.node("Cast", [x], to=onnx_type(int32)), axes], keepdims=keep)
        b.node("Cast", [red], _out(node), to=onnx_type(bool_))
        return
    if node.op in ("reduce_any", "reduce_all"):
        as_int = b.node("Cast", [x], to=onnx_type(int32))
        red = b.node("ReduceMax" if node.op == "reduce_any" else "ReduceMin", [as_int, axes], keepdims=keep)
        b.node("Cast", [red], _out(node), to=onnx_type(bool_))
        return
    b.node(_REDUCE[node.op], [x, axes], _out(node), keepdims=keep)


@rule("argmax")
def _argmax(b, node, fb):
    b.node("ArgMax", _ins(b, node, fb), _out(node), axis=node.attrs["axis"], keepdims=int(node.attrs["keepdim"]))


@rule("cumsum")
def _cumsum(b, node, fb):
    b.node("CumSum", [_ins(b, node, fb)[0], b.const(np.asarray(node.attrs["axis"], dtype=np.int64))], _out(node))


# --- shapes -------------------------------------------------------------------------------------
@rule("reshape")
def _reshape(b, node, fb):
    x = node.inputs[0]
    target = list(node.outputs[0].shape)
    if 0 in target:            # a real zero-size dim: 0 must not mean "copy" (allowzero)
        b.node("Reshape", [operand(b, x, fb), b.dims_1d(target)], _out(node), allowzero=1)
        return
    # ONNX Reshape copies a dim given as 0 from the input and infers one -1; using both, most
    # reshapes need no run-time shape arithmetic.
    spec = [0 if not isinstance(d, int) and i < x.type.rank and sym.equal(x.shape[i], d) else d
            for i, d in enumerate(target)]
    dynamic = [i for i, d in enumerate(spec) if not isinstance(d, int)]
    if len(dynamic) == 1:
        spec[dynamic[0]] = -1
    shape = b.ints(spec) if len(dynamic) <= 1 else b.dims_1d(target)
    b.node("Reshape", [operand(b, x, fb), shape], _out(node))


@rule("permute")
def _permute(b, node, fb):
    b.node("Transpose", _ins(b, node, fb), _out(node), perm=node.attrs["perm"])


@rule("expand")
def _expand(b, node, fb):
    x = node.inputs[0]
    target = list(node.attrs["shape"])
    lead = len(target) - x.type.rank
    # Expand broadcasts both ways, so 1 keeps an input dim that already has the target size.
    spec = [1 if i >= lead and sym.equal(x.shape[i - lead], d) else d for i, d in enumerate(target)]
    b.node("Expand", [operand(b, x, fb), b.dims_1d(spec)], _out(node))


@rule("slice")
def _slice(b, node, fb):
    x = node.inputs[0]
    a = node.attrs
    axis = a["axis"] % x.type.rank
    end = a["end"]
    end_name = b.ints([2 ** 63 - 1]) if sym.equal(end, x.shape[axis]) else b.dims_1d([end])
    b.node("Slice", [operand(b, x, fb), b.dims_1d([a["start"]]), end_name, b.ints([axis]), b.ints([a["step"]])],
           _out(node))


@rule("concat")
def _concat(b, node, fb):
    b.node("Concat", _ins(b, node, fb), _out(node), axis=node.attrs["axis"])


@rule("gather")
def _gather(b, node, fb):
    b.node("Gather", _ins(b, node, fb), _out(node), axis=node.attrs["axis"])


@rule("gather_elements")
def _gather_elements(b, node, fb):
    b.node("GatherElements", _ins(b, node, fb), _out(node), axis=node.attrs["axis"])


def _stacked_indices(b, names: list[str], values, shape) -> str:
    """Index tensors broadcast to ``shape`` and stacked on a last axis: the indices of GatherND and
    ScatterND, which take one int64 tensor (IR index tensors may mix int32 and int64)."""
    target = b.dims_1d(shape)
    names = [i if v.dtype.name == "int64" else b.node("Cast", [i], to=TensorProto.INT64) for i, v in zip(names, values)]
    parts = [b.node("Unsqueeze", [b.node("Expand", [i, target]), b.ints([-1])]) for i in names]
    return parts[0] if len(parts) == 1 else b.node("Concat", parts, axis=-1)


@rule("index")
def _index(b, node, fb):
    x, *idx = _ins(b, node, fb)
    shape = node.outputs[0].shape[: len(node.outputs[0].shape) - (node.inputs[0].type.rank - len(idx))]
    b.node("GatherND", [x, _stacked_indices(b, idx, node.inputs[1:], shape)], _out(node))


@rule("index_put")
def _index_put(b, node, fb):
    x, values, *idx = _ins(b, node, fb)
    shape = broadcast_shapes(*(v.shape for v in node.inputs[2:]))
    updates = b.node("Expand", [values, b.dims_1d(shape + node.inputs[0].shape[len(idx):])])
    b.node("ScatterND", [x, _stacked_indices(b, idx, node.inputs[2:], shape), updates], _out(node),
           reduction="add" if node.attrs["accumulate"] else "none")


@rule("topk_indices")
def _topk_indices(b, node, fb):
    # TopK orders ties by index, as the reference does; only its indices output is used
    b.node("TopK", [_ins(b, node, fb)[0], b.dims_1d([node.attrs["k"]])], [b.fresh(f"{_out(node)}_values"), _out(node)],
           axis=node.attrs["axis"], largest=int(node.attrs["largest"]), sorted=1)


@rule("pad")
def _pad(b, node, fb):
    x = node.inputs[0]
    if x.type.rank == 0:            # nothing to pad, and ONNX Runtime's Pad refuses rank 0
        b.node("Identity", [operand(b, x, fb)], _out(node))
        return
    b.node("Pad", [operand(b, x, fb), b.ints(node.attrs["pads"]), b.scalar(node.attrs["value"], x.dtype)],
           _out(node), mode="constant")


# --- creation -----------------------------------------------------------------------------------
@rule("arange")
def _arange(b, node, fb):
    a = node.attrs
    r = b.node("Range", [b.dim_scalar(a["start"]), b.dim_scalar(a["end"]), b.dim_scalar(a["step"])])
    dt = a["dtype"]
    b.node("Cast", [r], _out(node), to=onnx_type(dt))


@rule("full")
def _full(b, node, fb):
    a = node.attrs
    value = b.const(np.asarray([a["value"]], dtype=W.NP_TYPES[a["dtype"].name]))
    b.node("Expand", [value, b.dims_1d(a["shape"])], _out(node))


# --- activation quantisation --------------------------------------------------------------------
_QTYPES = {"int8": (TensorProto.INT8, np.int8), "uint8": (TensorProto.UINT8, np.uint8)}


@rule("fake_quant")
def _fake_quant(b, node, fb):
    a = node.attrs
    fmt = a["format"].name
    scale = b.scalar(a["scale"], node.inputs[0].dtype)
    if fmt == "int4":       # symmetric: the output type alone names the grid (opset 21)
        q = b.node("QuantizeLinear", [_ins(b, node, fb)[0], scale], output_dtype=TensorProto.INT4)
        b.node("DequantizeLinear", [q, scale], _out(node))
        return
    if fmt in _QTYPES:
        zp = b.const(np.asarray(a["zero_point"], dtype=_QTYPES[fmt][1]), "zero_point")
    else:       # float8: the zero point only carries the type (its value is 0)
        zp = b.raw(b.fresh("zero_point"), W.FLOAT8[node.attrs["format"].short], [], b"\x00")
    q = b.node("QuantizeLinear", [_ins(b, node, fb)[0], scale, zp])
    b.node("DequantizeLinear", [q, scale, zp], _out(node))


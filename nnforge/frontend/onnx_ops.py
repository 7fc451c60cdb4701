"""Converters from ONNX ops to IR ops, one small function per op type, collected in CONVERTERS.

A converter reads its node's inputs from the :class:`OnnxContext` and returns one entry per ONNX
output: an IR Value, a :class:`DimVec` (for shape arithmetic evaluated at import time), or None
for an output it does not produce (a converter that cannot handle a use raises UnsupportedError).
"""
from __future__ import annotations

import math

import torch

from ..ir import Dense, IntQuant, symbolic as sym
from ..ir.ops.shape import normalize_slice, resolve_reshape
from ..ir.ops.registry import broadcast_shapes
from ..ir.packing import unpack_bits
from ..registry import Registry
from .errors import FrontendError, UnsupportedError
from .onnx_context import DimVec, OnnxContext
from .onnx_tensors import ONNX_DTYPES, tensor_from_proto

CONVERTERS = Registry("onnx converter")
register = CONVERTERS.register


def _dt(cx: OnnxContext, i: int):
    v = cx.raw(i)
    return "int64" if isinstance(v, DimVec) else v.dtype


# --- unary ----------------------------------------------------------------------------------------
_UNARY = {"Neg": "neg", "Abs": "abs", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Reciprocal": "reciprocal",
          "Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Sin": "sin", "Cos": "cos",
          "Floor": "floor", "Ceil": "ceil", "HardSwish": "hardswish", "Not": "not"}


@register(*_UNARY)
def _unary(cx):
    v = cx.raw(0)
    if isinstance(v, DimVec) and cx.node.op_type == "Neg":
        return DimVec([sym.simplify(f"-({d})") if not isinstance(d, int) else -d for d in v.dims], v.scalar)
    return cx.emit(_UNARY[cx.node.op_type], cx.value(0))


@register("Identity", "Dropout")
def _identity(cx):
    return [cx.raw(0), None]


@register("IsNaN")
def _isnan(cx):
    x = cx.value(0)
    return cx.emit("ne", x, x)


@register("Gelu")
def _gelu(cx):
    return cx.emit("gelu", cx.value(0), approximate=cx.attr("approximate", "none"))


@register("LeakyRelu")
def _leaky(cx):
    return cx.emit("leaky_relu", cx.value(0), negative_slope=float(cx.attr("alpha", 0.01)))


@register("HardSigmoid")
def _hardsigmoid(cx):
    alpha, beta = float(cx.attr("alpha", 0.2)), float(cx.attr("beta", 0.5))
    x = cx.value(0)
    if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5:
        return cx.emit("hardsigmoid", x)
    lin = cx.emit("add", cx.emit("mul", x, _scalar(cx, alpha, x.dtype)), _scalar(cx, beta, x.dtype))
    return cx.emit("clamp", lin, min=0.0, max=1.0)


@register("PRelu")
def _prelu(cx):
    x, slope = cx.value(0), cx.value(1)
    neg = cx.emit("lt", x, _scalar(cx, 0, x.dtype))
    return cx.emit("where", neg, cx.emit("mul", x, slope), x)


def _scalar(cx, value, dt):
    return cx.const(torch.tensor(value, dtype=dt.torch_dtype if hasattr(dt, "torch_dtype") else dt))


@register("Clip")
def _clip(cx):
    x = cx.value(0)
    bounds = []
    for i, key in ((1, "min"), (2, "max")):
        if cx.opset < 11:
            bounds.append(cx.attr(key))
            continue
        t = cx.const_tensor(i) if cx.has(i) else None
        if cx.has(i) and t is None:
            raise UnsupportedError("Clip with non-constant bounds")
        bounds.append(None if t is None else t.item())
    return cx.emit("clamp", x, min=bounds[0], max=bounds[1])


@register("Cast")
def _cast(cx):
    to = ONNX_DTYPES.get(cx.attr("to"))
    if to is None:
        raise UnsupportedError(f"Cast to ONNX type {cx.attr('to')}")
    v = cx.raw(0)
    if isinstance(v, DimVec) and to in ("int64", "int32"):
        return v
    return cx.cast(cx.value(0), to)


@register("CastLike")
def _castlike(cx):
    return cx.cast(cx.value(0), _dt(cx, 1))


# --- binary ---------------------------------------------------------------------------------------
_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Equal": "eq", "Less": "lt",
           "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge", "And": "and", "Or": "or", "Xor": "xor"}
_DIM_ARITH = {"Add": sym.add, "Sub": sym.sub, "Mul": sym.mul, "Div": sym.floordiv,
              "Mod": lambda a, b: sym.simplify(f"({a}) % ({b})") if not (isinstance(a, int) and isinstance(b, int))
              else a % b,
              "Max": lambda a, b: max(a, b) if isinstance(a, int) and isinstance(b, int) else sym.simplify(f"max({a}, {b})"),
              "Min": lambda a, b: sym.minimum(a, b)}


def _dimvec_binary(cx) -> DimVec | None:
    """Arithmetic on shape values stays symbolic: both operands must be dim vectors or small
    integer constants."""
    a, b = cx.raw(0), cx.raw(1)
    if not (isinstance(a, DimVec) or isinstance(b, DimVec)) or cx.node.op_type not in _DIM_ARITH:
        return None
    da, db = cx.dims(0), cx.dims(1)
    if da is None or db is None:
        return None
    n = max(len(da), len(db))
    if len(da) not in (1, n) or len(db) not in (1, n):
        raise UnsupportedError(f"shape arithmetic on vectors of lengths {len(da)} and {len(db)}")
    da, db = da * (n // len(da)), db * (n // len(db))
    scalar = all(isinstance(x, DimVec) and x.scalar or (not isinstance(x, DimVec) and cx.const_tensor(i).dim() == 0)
                 for i, x in enumerate((a, b)))
    return DimVec([_DIM_ARITH[cx.node.op_type](p, q) for p, q in zip(da, db)], scalar)


_DIM_COMPARE = {"Equal": lambda d: d == 0, "Less": lambda d: d < 0, "LessOrEqual": lambda d: d <= 0,
                "Greater": lambda d: d > 0, "GreaterOrEqual": lambda d: d >= 0}


def _dim_sign(cx, a, b) -> int:
    """-1, 0 or 1 as ``a - b`` is for every size of the symbols; an error naming the node when
    it depends on the sizes."""
    d = sym.sub(a, b)
    if isinstance(d, int):
        return (d > 0) - (d < 0)
    if sym.provably_nonneg(sym.sub(d, 1)):
        return 1
    if sym.provably_nonneg(sym.sub(sym.simplify(f"-({d})"), 1)):
        return -1
    raise FrontendError(f"node {cx.node.name or cx.node.op_type} ({cx.node.op_type}) compares shape values {a} and "
                        f"{b}, whose order depends on the input sizes; give those sizes fixed values in the "
                        "ONNX file's inputs to import it")


def _dimvec_compare(cx):
    """A comparison of shape values is decided while importing (torch's legacy exporter writes
    Expand's target as Where(Equal(shape, -1), 1, shape)), so the shape stays known."""
    a, b = cx.raw(0), cx.raw(1)
    if not (isinstance(a, DimVec) or isinstance(b, DimVec)) or cx.node.op_type not in _DIM_COMPARE:
        return None
    da, db = cx.dims(0), cx.dims(1)
    if da is None or db is None:
        return None
    n = max(len(da), len(db))
    da, db = da * (n // len(da)), db * (n // len(db))
    out = torch.tensor([_DIM_COMPARE[cx.node.op_type](_dim_sign(cx, p, q)) for p, q in zip(da, db)])
    scalar = all(isinstance(x, DimVec) and x.scalar or (not isinstance(x, DimVec) and cx.const_tensor(i).dim() == 0)
                 for i, x in enumerate((a, b)))
    return cx.const(out.reshape(()) if scalar else out)


@register(*_BINARY, "Mod")
def _binary(cx):
    dv = _dimvec_binary(cx)
    if dv is None:
        dv = _dimvec_compare(cx)
    if dv is not None:
        return dv
    op = cx.node.op_type
    a, b = cx.value(0), cx.value(1)
    if op == "Mod":
        raise UnsupportedError("Mod on tensors")
    if op == "Pow":
        b = cx.cast(b, a.dtype)
    if op == "Div" and not a.dtype.is_float:
        # ONNX integer division truncates toward zero, as a cast from float does; float64 keeps
        # every int32 (and int64 below 2^53) exact.
        q = cx.emit("div", cx.cast(a, "float64"), cx.cast(b, "float64"))
        return cx.cast(q, a.dtype)
    return cx.emit(_BINARY[op], a, b)


@register("Max", "Min")
def _max_min(cx):
    if len(cx.node.input) == 2:
        dv = _dimvec_binary(cx)
        if dv is not None:
            return dv
    out = cx.value(0)
    for i in range(1, len(cx.node.input)):
        out = cx.emit("maximum" if cx.node.op_type == "Max" else "minimum", out, cx.value(i))
    return out


@register("Where")
def _where(cx):
    cond = cx.const_tensor(0)
    if cond is not None and cond.dim() <= 1 and any(isinstance(cx.raw(i), DimVec) for i in (1, 2)):
        x, y = cx.dims(1), cx.dims(2)
        if x is not None and y is not None:
            n = max(len(x), len(y), cond.numel())
            c, x, y = cond.reshape(-1).tolist() * (n // cond.numel()), x * (n // len(x)), y * (n // len(y))
            return DimVec([p if k else q for k, p, q in zip(c, x, y)])
    return cx.emit("where", cx.value(0), cx.value(1), cx.value(2))


# --- layers ---------------------------------------------------------------------------------------
def _to_rank2(cx, v, prepend: bool):
    shape = [1, v.shape[0]] if prepend else [v.shape[0], 1]
    return cx.emit("reshape", v, shape=shape)


@register("MatMul")
def _matmul(cx):
    a, b = cx.value(0), cx.value(1)
    squeeze = []
    if a.type.rank == 1:
        a = _to_rank2(cx, a, True)
        squeeze.append(-2)
    if b.type.rank == 1:
        b = _to_rank2(cx, b, False)
        squeeze.append(-1)
    out = cx.emit("matmul", a, b)
    if squeeze:
        shape = [d for i, d in enumerate(out.shape) if i - out.type.rank not in squeeze]
        out = cx.emit("reshape", out, shape=shape)
    return out


def _transpose2(cx, v):
    return cx.emit("permute", v, perm=[1, 0])


@register("Gemm")
def _gemm(cx):
    a, b = cx.value(0), cx.value(1)
    c = cx.value(2) if cx.has(2) else None
    alpha, beta = float(cx.attr("alpha", 1.0)), float(cx.attr("beta", 1.0))
    if cx.attr("transA", 0):
        a = _transpose2(cx, a)
    trans_b = bool(cx.attr("transB", 0))
    # alpha scales A @ B only, so a bias can join the linear layer only when alpha is 1.
    bias_ok = c is not None and beta == 1.0 and alpha == 1.0 and c.type.rank == 1
    if b.is_weight and (trans_b or isinstance(b.encoding, Dense)):
        weight = b if trans_b else cx.const(b.encoding.data.t().contiguous(), f"{b.name}.T")
        y = cx.emit("linear", a, weight, c if bias_ok else None)
    else:
        y = cx.emit("matmul", a, _transpose2(cx, b) if trans_b else b)
        if bias_ok:
            y = cx.emit("add", y, c)
    if alpha != 1.0:
        y = cx.emit("mul", y, _scalar(cx, alpha, y.dtype))
    if c is not None and not bias_ok:
        y = cx.emit("add", y, cx.emit("mul", c, _scalar(cx, beta, c.dtype)) if beta != 1.0 else c)
    return y


def _auto_pads(cx, x, kernel, strides, dilations):
    mode = cx.attr("auto_pad", "NOTSET")
    nd = len(kernel)
    if mode in ("NOTSET", ""):
        return list(cx.attr("pads", [0] * (2 * nd)))
    if mode == "VALID":
        return [0] * (2 * nd)
    begins, ends = [], []
    for i in range(nd):
        size = x.shape[2 + i]
        if not isinstance(size, int):
            raise UnsupportedError(f"auto_pad={mode} with a symbolic spatial size")
        out = -(-size // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return begins + ends


@register("Conv")
def _conv(cx):
    x, w = cx.value(0), cx.value(1)
    b = cx.value(2) if cx.has(2) else None
    nd = w.type.rank - 2
    kernel = list(cx.attr("kernel_shape", w.shape[2:]))
    strides = list(cx.attr("strides", [1] * nd))
    dilations = list(cx.attr("dilations", [1] * nd))
    pads = _auto_pads(cx, x, kernel, strides, dilations)
    return cx.emit("conv", x, w, b, stride=strides, padding=pads, dilation=dilations, groups=int(cx.attr("group", 1)))


@register("BatchNormalization")
def _batchnorm(cx):
    x, scale, bias, mean, var = (cx.value(i) for i in range(5))
    return [cx.emit("batch_norm", x, mean, var, scale, bias, eps=float(cx.attr("epsilon", 1e-5))), None, None]


@register("LayerNormalization")
def _layernorm(cx):
    x = cx.value(0)
    out = cx.emit("layer_norm", x, cx.value(1), cx.value(2) if cx.has(2) else None,
                  axis=int(cx.attr("axis", -1)), eps=float(cx.attr("epsilon", 1e-5)))
    return [out, None, None]


@register("Softmax", "LogSoftmax")
def _softmax(cx):
    if cx.opset < 13:
        raise UnsupportedError("Softmax before opset 13 (flattening semantics)")
    return cx.emit("softmax" if cx.node.op_type == "Softmax" else "log_softmax", cx.value(0),
                   axis=int(cx.attr("axis", -1)))


@register("MaxPool", "AveragePool")
def _pool(cx):
    x = cx.value(0)
    kernel = list(cx.attr("kernel_shape"))
    nd = len(kernel)
    strides = list(cx.attr("strides", [1] * nd))
    dilations = list(cx.attr("dilations", [1] * nd))
    pads = _auto_pads(cx, x, kernel, strides, dilations)
    ceil = bool(cx.attr("ceil_mode", 0))
    if cx.node.op_type == "MaxPool":
        return [cx.emit("max_pool", x, kernel=kernel, stride=strides, padding=pads, dilation=dilations,
                        ceil_mode=ceil), None]
    if dilations != [1] * nd:
        raise UnsupportedError("dilated average pooling")
    return cx.emit("avg_pool", x, kernel=kernel, stride=strides, padding=pads, ceil_mode=ceil,
                   count_include_pad=bool(cx.attr("count_include_pad", 0)))


@register("GlobalAveragePool")
def _gap(cx):
    x = cx.value(0)
    return cx.emit("adaptive_avg_pool", x, output_size=[1] * (x.type.rank - 2))


@register("GlobalMaxPool")
def _gmp(cx):
    x = cx.value(0)
    return cx.emit("reduce_max", x, axes=list(range(2, x.type.rank)), keepdim=True)


# --- reductions -----------------------------------------------------------------------------------
def _reduce_axes(cx, x):
    axes = cx.attr("axes")
    if axes is None and cx.has(1):
        axes = cx.dims(1)
        if axes is None:
            raise UnsupportedError("reduction axes that are not constant")
    if not axes:
        if cx.attr("noop_with_empty_axes", 0):
            return None
        axes = list(range(x.type.rank))
    return [a % x.type.rank for a in axes]


_REDUCE = {"ReduceSum": "reduce_sum", "ReduceMean": "reduce_mean", "ReduceMax": "reduce_max",
           "ReduceMin": "reduce_min", "ReduceProd": "reduce_prod"}


@register(*_REDUCE, "ReduceL2", "ReduceSumSquare", "ReduceL1")
def _reduce(cx):
    x = cx.value(0)
    axes = _reduce_axes(cx, x)
    if axes is None:
        return x
    keep = bool(cx.attr("keepdims", 1))
    op = cx.node.op_type
    if op in _REDUCE:
        return cx.emit(_REDUCE[op], x, axes=axes, keepdim=keep)
    if op == "ReduceL1":
        return cx.emit("reduce_sum", cx.emit("abs", x), axes=axes, keepdim=keep)
    summed = cx.emit("reduce_sum", cx.emit("mul", x, x), axes=axes, keepdim=keep)
    return cx.emit("sqrt", summed) if op == "ReduceL2" else summed


@register("ArgMax")
def _argmax(cx):
    if cx.attr("select_last_index", 0):
        raise UnsupportedError("ArgMax with select_last_index=1")
    return cx.emit("argmax", cx.value(0), axis=int(cx.attr("axis", 0)), keepdim=bool(cx.attr("keepdims", 1)))


@register("CumSum")
def _cumsum(cx):
    if cx.attr("exclusive", 0) or cx.attr("reverse", 0):
        raise UnsupportedError("CumSum with exclusive or reverse")
    axis = cx.dims(1)
    if axis is None:
        raise UnsupportedError("CumSum with a non-constant axis")
    return cx.emit("cumsum", cx.value(0), axis=int(axis[0]))


# --- shapes ---------------------------------------------------------------------------------------
@register("Shape")
def _shape(cx):
    x = cx.raw(0)
    shape = [len(x.dims)] if isinstance(x, DimVec) and not x.scalar else ([] if isinstance(x, DimVec) else list(x.shape))
    rank = len(shape)
    start, end = cx.attr("start", 0), cx.attr("end", rank)
    start, end = max(0, start + rank if start < 0 else start), min(rank, end + rank if end < 0 else end)
    return DimVec(shape[start:end])


@register("Size")
def _size(cx):
    return DimVec([sym.prod(cx.value(0).shape)], scalar=True)


@register("Reshape")
def _reshape(cx):
    x = cx.raw(0)
    spec = cx.dims(1)
    if spec is None:
        raise UnsupportedError("Reshape to a shape computed from tensor data")
    if isinstance(x, DimVec):
        if len(spec) == 1 and spec[0] in (-1, len(x.dims)) or spec == []:
            return DimVec(list(x.dims), scalar=spec == [])
        if not x.static:
            raise UnsupportedError(f"Reshape of the symbolic shape vector {x.dims} to {spec}")
        # torch's legacy exporter reshapes Pad's amounts to [-1, 2] to reorder them: a constant
        x = cx.value(0)
    if not cx.attr("allowzero", 0):
        spec = [x.shape[i] if d == 0 else d for i, d in enumerate(spec)]
    return cx.emit("reshape", x, shape=list(resolve_reshape(x.shape, spec)))


@register("Flatten")
def _flatten(cx):
    x = cx.value(0)
    axis = int(cx.attr("axis", 1))
    axis = axis + x.type.rank if axis < 0 else axis       # 0..rank inclusive
    return cx.emit("reshape", x, shape=[sym.prod(x.shape[:axis]), sym.prod(x.shape[axis:])])


def _axes_input(cx, rank):
    axes = cx.attr("axes")
    if axes is None and cx.has(1):
        axes = cx.dims(1)
        if axes is None:
            raise UnsupportedError("Squeeze/Unsqueeze axes that are not constant")
    return None if axes is None else [a % rank for a in axes]


@register("Squeeze")
def _squeeze(cx):
    x = cx.raw(0)
    if isinstance(x, DimVec):
        if len(x.dims) != 1:
            raise UnsupportedError("Squeeze of a shape vector with more than one entry")
        return DimVec(list(x.dims), scalar=True)
    axes = _axes_input(cx, x.type.rank)
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    return cx.emit("reshape", x, shape=[d for i, d in enumerate(x.shape) if i not in axes])


@register("Unsqueeze")
def _unsqueeze(cx):
    x = cx.raw(0)
    if isinstance(x, DimVec):
        if not x.scalar:
            raise UnsupportedError("Unsqueeze of a shape vector")
        return DimVec(list(x.dims))
    rank = x.type.rank + len(cx.attr("axes") or cx.dims(1) or [])
    axes = _axes_input(cx, rank)
    shape, it = [], iter(x.shape)
    for i in range(rank):
        shape.append(1 if i in axes else next(it))
    return cx.emit("reshape", x, shape=shape)


@register("Transpose")
def _transpose(cx):
    x = cx.value(0)
    perm = cx.attr("perm") or list(reversed(range(x.type.rank)))
    return cx.emit("permute", x, perm=list(perm))


@register("Expand")
def _expand(cx):
    x = cx.value(0)
    target = cx.dims(1)
    if target is None:
        raise UnsupportedError("Expand to a shape computed from tensor data")
    return cx.emit("expand", x, shape=list(broadcast_shapes(x.shape, tuple(target))))


@register("Slice")
def _slice(cx):
    x = cx.raw(0)
    starts, ends = cx.dims(1), cx.dims(2)
    axes = cx.dims(3) if cx.has(3) else None
    steps = cx.dims(4) if cx.has(4) else None
    if starts is None or ends is None or (cx.has(3) and axes is None) or (cx.has(4) and steps is None):
        raise UnsupportedError("Slice bounds that are not known at import time")
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    const = cx.const_tensor(0)
    if const is not None and all(isinstance(v, int) for v in [*starts, *ends, *axes, *steps]) and \
            (min(steps) < 0 or isinstance(x, DimVec) and not (axes == [0] and steps == [1])):
        return cx.const(_slice_constant(const, starts, ends, axes, steps))
    if isinstance(x, DimVec):
        if axes != [0] or steps[0] != 1 or not all(isinstance(v, int) for v in (starts[0], ends[0])):
            raise UnsupportedError("this Slice of a shape vector")
        n = len(x.dims)
        s, e = starts[0], ends[0]
        return DimVec(x.dims[slice(max(s, -n) if s < 0 else s, e if e < 2 ** 62 else n)])
    out = x
    for st, en, ax, step in zip(starts, ends, axes, steps):
        if not isinstance(step, int) or step < 1:
            raise UnsupportedError(f"Slice with step {step}")
        ax = ax % out.type.rank
        s, e, _ = normalize_slice(out.shape[ax], st if not isinstance(st, int) or st < 2 ** 62 else out.shape[ax],
                                  en if not isinstance(en, int) or -2 ** 62 < en < 2 ** 62 else
                                  (out.shape[ax] if en > 0 else 0), step)
        if s == 0 and step == 1 and sym.equal(e, out.shape[ax]):
            continue
        out = cx.emit("slice", out, axis=ax, start=s, end=e, step=step)
    return out


def _slice_constant(t: torch.Tensor, starts, ends, axes, steps) -> torch.Tensor:
    """ONNX Slice of a constant, any step (the legacy exporter reverses Pad's amounts with step -1):
    numpy's slicing clamps bounds as ONNX does."""
    index = [slice(None)] * t.dim()
    for st, en, ax, step in zip(starts, ends, axes, steps):
        index[ax % t.dim()] = slice(st, en, step)
    return torch.from_numpy(t.numpy()[tuple(index)].copy())


@register("Concat")
def _concat(cx):
    axis = int(cx.attr("axis"))
    raws = [cx.raw(i) for i in range(len(cx.node.input))]
    if any(isinstance(r, DimVec) for r in raws):
        parts = [cx.dims(i) for i in range(len(raws))]
        if all(p is not None for p in parts):
            return DimVec([d for p in parts for d in p])
    vals = [cx.value(i) for i in range(len(raws))]
    vals = [v for v in vals if not (v.type.is_static and v.shape[axis % v.type.rank] == 0)] or vals[:1]
    return vals[0] if len(vals) == 1 else cx.emit("concat", *vals, axis=axis % vals[0].type.rank)


@register("Split")
def _split(cx):
    x = cx.value(0)
    axis = int(cx.attr("axis", 0)) % x.type.rank
    n_out = len(cx.node.output)
    sizes = cx.attr("split") or (cx.dims(1) if cx.has(1) else None)
    if sizes is None:
        size = x.shape[axis]
        if not isinstance(size, int):
            raise UnsupportedError("even Split of a symbolic dimension")
        step = -(-size // n_out)
        sizes = [min(step, size - i * step) for i in range(n_out)]
    outs, start = [], 0
    for s in sizes:
        end = sym.add(start, s)
        outs.append(cx.emit("slice", x, axis=axis, start=start, end=end, step=1))
        start = end
    return outs


@register("Gather")
def _gather(cx):
    x = cx.raw(0)
    axis = int(cx.attr("axis", 0))
    if isinstance(x, DimVec):
        idx = cx.dims(1)
        if idx is None:
            raise UnsupportedError("Gather from a shape vector with non-constant indices")
        scalar = cx.const_tensor(1) is not None and cx.const_tensor(1).dim() == 0 or \
            isinstance(cx.raw(1), DimVec) and cx.raw(1).scalar
        return DimVec([x.dims[i] for i in idx], scalar=scalar)
    idx = cx.value(1)
    if idx.dtype.name not in ("int64", "int32"):
        idx = cx.cast(idx, "int64")
    return cx.emit("gather", x, idx, axis=axis)


def _wrap_negative(cx, idx, size):
    """ONNX gathers accept indices in [-size, size): negative ones count from the end."""
    if isinstance(size, int):
        size_v = cx.const(torch.tensor(size, dtype=torch.int64))
    else:
        size_v = cx.emit("arange", start=size, end=sym.add(size, 1), step=1, dtype="int64")
    neg = cx.emit("lt", idx, cx.const(torch.tensor(0, dtype=torch.int64)))
    return cx.emit("where", neg, cx.emit("add", idx, size_v), idx)


@register("GatherElements")
def _gather_elements(cx):
    x = cx.value(0)
    axis = int(cx.attr("axis", 0)) % x.type.rank
    idx = _wrap_negative(cx, cx.cast(cx.value(1), "int64"), x.shape[axis])
    return cx.emit("gather_elements", x, idx, axis=axis)


@register("GatherND")
def _gather_nd(cx):
    if cx.attr("batch_dims", 0):
        raise UnsupportedError("GatherND with batch_dims > 0")
    x, idx = cx.value(0), cx.cast(cx.value(1), "int64")
    k = idx.shape[-1]
    if not isinstance(k, int):
        raise UnsupportedError("GatherND with a symbolic index depth")
    lead = list(idx.shape[:-1])
    parts = []
    for j in range(k):
        s = cx.emit("slice", idx, axis=idx.type.rank - 1, start=j, end=j + 1, step=1)
        parts.append(cx.emit("reshape", s, shape=lead))
    return cx.emit("index", x, *parts)


@register("Pad")
def _pad(cx):
    if cx.attr("mode", "constant") != "constant":
        raise UnsupportedError(f"Pad mode {cx.attr('mode')}")
    x = cx.value(0)
    pads = cx.dims(1)
    if pads is None or not all(isinstance(p, int) for p in pads):
        raise UnsupportedError("Pad amounts that are not constant")
    if cx.has(3):
        axes = [a % x.type.rank for a in cx.dims(3)]
        full = [0] * (2 * x.type.rank)
        for i, a in enumerate(axes):
            full[a], full[x.type.rank + a] = pads[i], pads[len(axes) + i]
        pads = full
    value = cx.const_tensor(2).item() if cx.has(2) else 0.0
    return cx.emit("pad", x, pads=pads, value=value)


# --- creation -------------------------------------------------------------------------------------
@register("Constant")
def _constant(cx):
    from onnx import helper
    for a in cx.node.attribute:
        if a.name == "value":
            t = tensor_from_proto(a.t, None)
        elif a.name in ("value_float", "value_int", "value_floats", "value_ints"):
            v = helper.get_attribute_value(a)
            t = torch.tensor(v, dtype=torch.float32 if "float" in a.name else torch.int64)
        else:
            raise UnsupportedError(f"Constant with attribute {a.name}")
        # Shape arithmetic in ONNX is int64; other small integer constants stay tensors of their type.
        if t.dtype == torch.int64 and t.dim() <= 1 and t.numel() <= 64:
            return DimVec([int(v) for v in t.reshape(-1).tolist()], scalar=t.dim() == 0)
        return cx.const(t)
    raise UnsupportedError("Constant without a value")


@register("ConstantOfShape")
def _constant_of_shape(cx):
    shape = cx.dims(0)
    if shape is None:
        raise UnsupportedError("ConstantOfShape with a shape computed from tensor data")
    value = cx.attr("value")
    t = tensor_from_proto(value, None) if value is not None else torch.zeros(1)
    if all(isinstance(d, int) for d in shape):
        return cx.const(torch.full(shape, t.reshape(-1)[0].item(), dtype=t.dtype))
    return cx.emit("full", shape=shape, value=t.reshape(-1)[0].item(), dtype=t.dtype)


@register("Range")
def _range(cx):
    vals = [cx.dims(i) for i in range(3)]
    if any(v is None for v in vals):
        start, limit, delta = (cx.const_tensor(i) for i in range(3))
        if start is None or limit is None or delta is None:
            raise UnsupportedError("Range over non-constant float bounds")
        return cx.const(torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype))
    (start,), (limit,), (delta,) = vals
    if all(isinstance(v, int) for v in (start, limit, delta)):
        return cx.const(torch.arange(start, limit, delta, dtype=torch.int64))
    if not isinstance(delta, int) or delta < 1:
        raise UnsupportedError("Range with a symbolic or non-positive step")
    return cx.emit("arange", start=start, end=limit, step=delta, dtype="int64")


# --- quantised weights ----------------------------------------------------------------------------
def _int_codes(t: torch.Tensor, bits: int | None = None):
    """(signed?, bits) of a code tensor read from ONNX (int8/uint8, or 4-bit types unpacked)."""
    if t.dtype == torch.int8:
        return True, bits or 8
    if t.dtype == torch.uint8:
        return False, bits or 8
    raise UnsupportedError(f"DequantizeLinear of {t.dtype} codes")


@register("DequantizeLinear")
def _dequantize(cx):
    """Constant DequantizeLinear of a 2-D weight becomes an IntQuant weight (per tensor, per row,
    or blocks along the columns); other constant layouts are decoded to float."""
    x, scale = cx.const_tensor(0), cx.const_tensor(1)
    zp = cx.const_tensor(2) if cx.has(2) else None
    if x is None or scale is None or (cx.has(2) and zp is None):
        raise UnsupportedError("DequantizeLinear of activations (only constant weights are supported)")
    signed, bits = _int_codes(x, cx.code_bits.get(cx.node.input[0]))
    axis = int(cx.attr("axis", 1)) % max(x.dim(), 1)
    block = int(cx.attr("block_size", 0))
    rows, cols = (x.shape[0], x.shape[1]) if x.dim() == 2 else (None, None)
    z = torch.zeros_like(scale, dtype=torch.int64) if zp is None else zp.to(torch.int64)
    codes = x.to(torch.int64)
    if x.dim() == 2 and (scale.dim() == 0 or (axis == 0 and scale.dim() == 1 and not block)
                         or (axis == 1 and scale.dim() == 2 and block)):
        s2 = scale.reshape(1, 1) if scale.dim() == 0 else (scale.reshape(rows, 1) if scale.dim() == 1 else scale)
        z2 = z.reshape(s2.shape)
        half = 1 << (bits - 1)
        if not signed and bool((z2 == half).all()):
            enc = IntQuant.from_codes(codes - half, s2.float(), bits=bits, signed=True, shape=(rows, cols),
                                      group_size=block or cols)
        elif signed and bool((z2 == 0).all()):
            enc = IntQuant.from_codes(codes, s2.float(), bits=bits, signed=True, shape=(rows, cols),
                                      group_size=block or cols)
        else:
            off = half if signed else 0          # int codes with a zero point -> unsigned fields
            enc = IntQuant.from_codes(codes + off, s2.float(), bits=bits, signed=False, shape=(rows, cols),
                                      group_size=block or cols, zero_point=z2 + off)
        return cx.g.add_weight(cx.g.fresh_name(cx.node.input[0] + ".q"), enc)
    # Any other layout: decode here (the weight stays exact, its compression does not survive).
    sh = [1] * x.dim()
    if scale.dim() == 1 and not block:
        sh[axis] = -1
        dense = (codes - z.reshape(sh)) * scale.reshape(sh)
    else:
        rep = lambda t: t.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis]) if block else t
        dense = (codes - rep(z)) * rep(scale)
    return cx.const(dense.to(scale.dtype))


@register("com.microsoft.MatMulNBits")
def _matmulnbits(cx):
    k, n, bits, block = (int(cx.attr(a)) for a in ("K", "N", "bits", "block_size"))
    b, scales = cx.const_tensor(1), cx.const_tensor(2)
    if bits != 4 or b is None or scales is None or cx.has(4):
        raise UnsupportedError("MatMulNBits other than constant 4-bit weights without g_idx")
    groups = -(-k // block)
    codes = b.reshape(n, -1)[:, : (k + 1) // 2].contiguous()
    s2 = scales.reshape(n, groups).float()
    if cx.has(3):
        zp = unpack_bits(cx.const_tensor(3).reshape(n, -1).to(torch.uint8), 4, groups)
        enc = IntQuant((n, k), 4, False, codes.to(torch.uint8), s2, block, zp.to(torch.uint8))
    else:
        enc = IntQuant((n, k), 4, True, codes.to(torch.uint8), s2, block)
    w = cx.g.add_weight(cx.g.fresh_name(cx.node.input[1] + ".q"), enc)
    bias = cx.value(5) if cx.has(5) else None
    return cx.emit("linear", cx.value(0), w, bias)



"""Per-op lowering rules IR -> MIL (iOS 18 / macOS 15 opset), one small function per op, in
``LOWERINGS`` (as every backend).

Each rule gets the :class:`~.lower.Lowering` and the node and returns the MIL value of the node's
(single) output, in the MIL type that computes the IR dtype (fp16 / int32 / bool, see lower.py);
the lowering checks that type. Operands come from ``lw.arg`` (weights through
``weights.emit_weight``), dims from ``lw.dim`` / ``lw.shape``. An op or variant Core ML cannot
express raises :func:`no_equivalent`, naming the op and the node.
"""
from __future__ import annotations

import numpy as np

from ...ir import symbolic as sym
from ...registry import Registry
from ..base import BackendError
from .mil_types import mil_dtype

LOWERINGS = Registry("coreml lowering")
rule = LOWERINGS.register


def no_equivalent(node, detail: str = "") -> BackendError:
    return BackendError(f"core ml has no equivalent for op {node.op} (node {node.name}){detail}")


def _mb():
    from coremltools.converters.mil import Builder as mb      # imported lazily: coremltools is heavy
    return mb


def _x(lw, node, i=0):
    return lw.arg(node.inputs[i])


def _rank(node, i=0):
    return len(node.inputs[i].shape)


# --- elementwise ----------------------------------------------------------------------------------
_UNARY = {"exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "sigmoid": "sigmoid", "tanh": "tanh",
          "erf": "erf", "sin": "sin", "cos": "cos", "floor": "floor", "ceil": "ceil", "silu": "silu",
          "not": "logical_not"}


@rule(*_UNARY)
def _unary(lw, node):
    return getattr(_mb(), _UNARY[node.op])(x=_x(lw, node))


@rule("abs", "relu", "neg")
def _sign_ops(lw, node):
    mb, x, dt = _mb(), _x(lw, node), node.inputs[0].dtype
    if node.op == "neg":
        return mb.mul(x=x, y=lw.const(-1, dt))
    if dt.is_float:
        return getattr(mb, node.op)(x=x)
    # MIL's abs/relu take floats only; integers use select / maximum
    if node.op == "relu":
        return mb.maximum(x=x, y=lw.const(0, dt))
    return mb.select(cond=mb.less(x=x, y=lw.const(0, dt)), a=mb.mul(x=x, y=lw.const(-1, dt)), b=x)


@rule("reciprocal")
def _reciprocal(lw, node):
    # MIL's inverse adds an epsilon (1e-4 by default) to x; a plain division is exact
    return _mb().real_div(x=lw.const(1.0, "fp16"), y=_x(lw, node))


@rule("hardswish", "hardsigmoid")
def _hard(lw, node):
    mb, x = _mb(), _x(lw, node)
    y = mb.sigmoid_hard(x=x, alpha=1.0 / 6.0, beta=0.5)       # torch: relu6(x + 3) / 6
    return mb.mul(x=x, y=y) if node.op == "hardswish" else y


@rule("gelu")
def _gelu(lw, node):
    mode = "TANH_APPROXIMATION" if node.attrs["approximate"] == "tanh" else "EXACT"
    return _mb().gelu(x=_x(lw, node), mode=mode)


@rule("leaky_relu")
def _leaky_relu(lw, node):
    return _mb().leaky_relu(x=_x(lw, node), alpha=float(node.attrs["negative_slope"]))


@rule("clamp")
def _clamp(lw, node):
    # maximum/minimum rather than clip: clip needs both bounds and floats
    mb, x, dt = _mb(), _x(lw, node), node.inputs[0].dtype
    lo, hi = node.attrs["min"], node.attrs["max"]
    if lo is not None:
        x = mb.maximum(x=x, y=lw.const(lo, dt))
    if hi is not None:
        x = mb.minimum(x=x, y=lw.const(hi, dt))
    return x if (lo, hi) != (None, None) else mb.identity(x=x)


@rule("cast")
def _cast(lw, node):
    src, dst = mil_dtype(node.inputs[0].dtype), mil_dtype(node.attrs["dtype"])
    x = _x(lw, node)
    if src == dst:          # int64 <-> int32, fp32 <-> fp16: one MIL type computes both
        return x
    if src == "fp16" and dst == "int32":
        x = _mb().select(cond=_mb().less(x=x, y=np.float16(0)), a=_mb().ceil(x=x), b=_mb().floor(x=x))   # torch truncates
    return _mb().cast(x=x, dtype=dst)


_BINARY = {"add": "add", "sub": "sub", "mul": "mul", "pow": "pow", "maximum": "maximum", "minimum": "minimum",
           "eq": "equal", "ne": "not_equal", "lt": "less", "le": "less_equal", "gt": "greater",
           "ge": "greater_equal", "and": "logical_and", "or": "logical_or", "xor": "logical_xor"}
_BOOL = {"mul": "logical_and", "add": "logical_or", "maximum": "logical_or", "minimum": "logical_and"}


@rule(*_BINARY)
def _binary(lw, node):
    name = _BINARY[node.op]
    if node.op in _BOOL and node.inputs[0].dtype.name == "bool":       # torch's arithmetic on bools
        name = _BOOL[node.op]
    return getattr(_mb(), name)(x=_x(lw, node, 0), y=_x(lw, node, 1))


@rule("div")
def _div(lw, node):
    mb = _mb()
    a, b = _x(lw, node, 0), _x(lw, node, 1)
    if not node.inputs[0].dtype.is_float:       # IR div is true division: integers give a float
        a, b = mb.cast(x=a, dtype="fp16"), mb.cast(x=b, dtype="fp16")
    return mb.real_div(x=a, y=b)


@rule("where")
def _where(lw, node):
    return _mb().select(cond=_x(lw, node, 0), a=_x(lw, node, 1), b=_x(lw, node, 2))


# --- layers with weights --------------------------------------------------------------------------
@rule("linear")
def _linear(lw, node):
    mb = _mb()
    x, w, bias = (list(node.inputs) + [None])[:3]
    xv, wv = lw.arg(x), lw.arg(w)
    perm = lw.perms.get(w.name)
    if perm is not None:        # act-order weight kept in stored column order: permute x instead
        xv = mb.gather(x=xv, indices=np.asarray(perm, np.int32), axis=-1)
    bv = lw.arg(bias)
    if w.is_weight and (bias is None or bias.is_weight):
        return mb.linear(x=xv, weight=wv, bias=bv) if bv is not None else mb.linear(x=xv, weight=wv)
    y = mb.matmul(x=xv, y=wv, transpose_y=True)       # a computed weight: MIL linear wants constants
    return mb.add(x=y, y=bv) if bv is not None else y


@rule("matmul")
def _matmul(lw, node):
    return _mb().matmul(x=_x(lw, node, 0), y=_x(lw, node, 1))




@rule("hadamard")
def _hadamard(lw, node):
    # x viewed [groups, a, c] becomes H_a^T X H_c: the Kronecker factors of the block's matrix, so the
    # constants stay small however wide the block is
    from ...ir.hadamard import hadamard_matrix, hadamard_split
    mb, x = _mb(), _x(lw, node)
    block = node.attrs["block"]
    c = hadamard_split(block)
    a = block // c

    def factor(size):
        return mb.const(val=hadamard_matrix(size).numpy().astype(np.float16), name=lw.name(f"{node.name}_h{size}"))
    y = mb.matmul(x=mb.reshape(x=x, shape=np.asarray([-1, a, c], np.int32)), y=factor(c))
    if a > 1:
        y = mb.matmul(x=factor(a), y=y, transpose_x=True)
    return mb.reshape(x=y, shape=mb.shape(x=x))


def _pads(padding):
    """IR padding (all begins, then all ends) -> MIL's (begin, end) per spatial axis."""
    nd = len(padding) // 2
    return [p for i in range(nd) for p in (padding[i], padding[nd + i])]


@rule("conv")
def _conv(lw, node):
    a = node.attrs
    bias = lw.arg(node.inputs[2]) if len(node.inputs) > 2 else None
    kw = {"bias": bias} if bias is not None else {}
    return _mb().conv(x=_x(lw, node), weight=_x(lw, node, 1), strides=a["stride"], pad_type="custom",
                      pad=_pads(a["padding"]), dilations=a["dilation"], groups=a["groups"], **kw)


@rule("embedding")
def _embedding(lw, node):
    return _mb().gather(x=_x(lw, node, 1), indices=_x(lw, node, 0), axis=0)


# --- normalisation, softmax, pooling -----------------------------------------------------------
@rule("softmax")
def _softmax(lw, node):
    return _mb().softmax(x=_x(lw, node), axis=node.attrs["axis"])


@rule("log_softmax")
def _log_softmax(lw, node):
    mb, x = _mb(), _x(lw, node)
    return mb.sub(x=x, y=mb.reduce_log_sum_exp(x=x, axes=[node.attrs["axis"]], keep_dims=True))


@rule("layer_norm")
def _layer_norm(lw, node):
    rank = _rank(node)
    axes = list(range(node.attrs["axis"] % rank, rank))
    kw = {k: lw.arg(v) for k, v in zip(("gamma", "beta"), node.inputs[1:]) if v is not None}
    return _mb().layer_norm(x=_x(lw, node), axes=axes, epsilon=np.float16(node.attrs["eps"])
                            if node.attrs["eps"] >= 6e-8 else np.float16(6e-8), **kw)


@rule("rms_norm")
def _rms_norm(lw, node):
    # x * rsqrt(mean(x^2) + eps) taken on y = x / max|x| per row, as y * rsqrt(mean(y^2) + eps / m^2):
    # the program computes in fp16, where the square of an activation past 256 is past the range
    # (Gemma's hidden states pass it), while y's squares are at most 1
    mb = _mb()
    x = _x(lw, node)
    top = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True), y=np.float16(2 ** -14))
    y = mb.real_div(x=x, y=top)
    mean_sq = mb.reduce_mean(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)
    # eps / top^2 as (sqrt(eps) / top)^2: top^2 may pass the range, and a small eps is below fp16's
    root = mb.real_div(x=np.float16(np.sqrt(node.attrs["eps"])), y=top)
    eps = mb.mul(x=root, y=root)
    h = mb.mul(x=y, y=mb.rsqrt(x=mb.add(x=mean_sq, y=eps)))
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        w = lw.arg(node.inputs[1])
        if node.attrs["offset"]:
            w = mb.add(x=lw.const(node.attrs["offset"], "fp16"), y=w)
        h = mb.mul(x=h, y=w)
    return h


@rule("batch_norm")
def _batch_norm(lw, node):
    x, mean, var, w, b = (list(node.inputs) + [None, None])[:5]
    kw = {k: lw.arg(v) for k, v in (("gamma", w), ("beta", b)) if v is not None}
    return _mb().batch_norm(x=lw.arg(x), mean=lw.arg(mean), variance=lw.arg(var),
                            epsilon=np.float16(node.attrs["eps"]), **kw)


@rule("max_pool", "avg_pool")
def _pool(lw, node):
    a = node.attrs
    mb = _mb()
    common = dict(x=_x(lw, node), kernel_sizes=a["kernel"], strides=a["stride"], pad_type="custom",
                  pad=_pads(a["padding"]), ceil_mode=a["ceil_mode"])
    if node.op == "avg_pool":
        return mb.avg_pool(exclude_padding_from_average=not a["count_include_pad"], **common)
    if any(d != 1 for d in a["dilation"]):
        raise no_equivalent(node, f": max_pool with dilation {a['dilation']} (MIL pooling has no dilation)")
    return mb.max_pool(**common)


@rule("adaptive_avg_pool")
def _adaptive(lw, node):
    mb, x = _mb(), _x(lw, node)
    size = node.attrs["output_size"]
    spatial = node.inputs[0].shape[2:]
    if all(s == 1 for s in size):
        return mb.reduce_mean(x=x, axes=list(range(2, 2 + len(size))), keep_dims=True)
    if not all(isinstance(d, int) and d % s == 0 for d, s in zip(spatial, size)):
        raise no_equivalent(node, f": adaptive pooling from {list(spatial)} to {size} is not a fixed window")
    kernel = [d // s for d, s in zip(spatial, size)]
    return mb.avg_pool(x=x, kernel_sizes=kernel, strides=kernel, pad_type="valid")


# --- reductions ---------------------------------------------------------------------------------
@rule("reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod")
def _reduce(lw, node):
    return getattr(_mb(), node.op)(x=_x(lw, node), axes=node.attrs["axes"], keep_dims=node.attrs["keepdim"])


@rule("reduce_any", "reduce_all")
def _reduce_logic(lw, node):
    mb = _mb()
    as_int = mb.cast(x=_x(lw, node), dtype="int32")       # MIL reductions take no bools
    red = (mb.reduce_max if node.op == "reduce_any" else mb.reduce_min)(
        x=as_int, axes=node.attrs["axes"], keep_dims=node.attrs["keepdim"])
    return mb.cast(x=red, dtype="bool")


@rule("argmax")
def _argmax(lw, node):
    return _mb().reduce_argmax(x=_x(lw, node), axis=node.attrs["axis"], keep_dims=node.attrs["keepdim"])


@rule("cumsum")
def _cumsum(lw, node):
    return _mb().cumsum(x=_x(lw, node), axis=node.attrs["axis"])


# --- shapes -------------------------------------------------------------------------------------
@rule("reshape")
def _reshape(lw, node):
    target = list(node.outputs[0].shape)
    dynamic = [i for i, d in enumerate(target) if not isinstance(d, int)]
    if len(dynamic) == 1:       # one unknown dim: -1 keeps the shape a constant (no run-time arithmetic)
        target[dynamic[0]] = -1
        return _mb().reshape(x=_x(lw, node), shape=np.asarray(target, np.int32))
    return _mb().reshape(x=_x(lw, node), shape=lw.shape(target))


@rule("permute")
def _permute(lw, node):
    return _mb().transpose(x=_x(lw, node), perm=node.attrs["perm"])


@rule("expand")
def _expand(lw, node):
    mb, x = _mb(), _x(lw, node)
    target = list(node.attrs["shape"])
    src = node.inputs[0].shape
    lead = len(target) - len(src)
    if lead:
        x = mb.expand_dims(x=x, axes=list(range(lead)))
    src = (1,) * lead + tuple(src)
    # tile, not broadcasting: reps is the target size where the input has 1, else 1
    reps = [1 if sym.equal(s, t) else t for s, t in zip(src, target)]
    if all(r == 1 for r in reps):
        return mb.identity(x=x)
    return mb.tile(x=x, reps=lw.shape(reps))


@rule("slice")
def _slice(lw, node):
    mb = _mb()
    rank = _rank(node)
    a = node.attrs
    axis = a["axis"] % rank
    to_end = sym.equal(a["end"], node.inputs[0].shape[axis])
    begin = [0] * rank
    begin[axis] = a["start"]
    end = [0] * rank
    end[axis] = 0 if to_end else a["end"]
    stride = [1] * rank
    stride[axis] = a["step"]
    end_mask = [True] * rank
    end_mask[axis] = to_end
    return mb.slice_by_index(x=_x(lw, node), begin=lw.shape(begin), end=lw.shape(end), stride=stride,
                             end_mask=end_mask)


@rule("concat")
def _concat(lw, node):
    return _mb().concat(values=[lw.arg(v) for v in node.inputs], axis=node.attrs["axis"])


def _index_operand(lw, v, size):
    """Indices with negatives wrapped (MIL gathers take 0 <= i < size only)."""
    mb = _mb()
    if v.is_weight and isinstance(size, int):
        idx = v.encoding.decode().numpy().astype(np.int64)
        return mb.const(val=np.where(idx < 0, idx + size, idx).astype(np.int32), name=lw.name(f"{v.name}_wrapped"))
    i = lw.arg(v)
    return mb.select(cond=mb.less(x=i, y=np.int32(0)), a=mb.add(x=i, y=lw.dim(size)), b=i)


def _data(lw, v):
    """A gather's data operand: MIL gathers take no bools, so those go through int32 (see _undata)."""
    x = lw.arg(v)
    return _mb().cast(x=x, dtype="int32") if v.dtype.name == "bool" else x


def _undata(node, y):
    return _mb().cast(x=y, dtype="bool") if node.inputs[0].dtype.name == "bool" else y


@rule("gather")
def _gather(lw, node):
    x = node.inputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    return _undata(node, _mb().gather(x=_data(lw, x), indices=_index_operand(lw, node.inputs[1], x.shape[axis]),
                                      axis=axis))


@rule("gather_elements")
def _gather_elements(lw, node):
    y = _mb().gather_along_axis(x=_data(lw, node.inputs[0]), indices=_x(lw, node, 1), axis=node.attrs["axis"])
    return _undata(node, y)


def _coords(lw, x, idx):
    """The index tensors of x[i0, i1, ...] as gather_nd / scatter_nd coordinates: each broadcast
    to the common shape (adding zeros of the others), then stacked on a last axis."""
    mb = _mb()
    parts = [_index_operand(lw, v, x.shape[k]) for k, v in enumerate(idx)]
    zero = None
    for p in parts:
        z = mb.mul(x=p, y=np.int32(0))
        zero = z if zero is None else mb.add(x=zero, y=z)
    stacked = [mb.expand_dims(x=mb.add(x=p, y=zero), axes=[-1]) for p in parts]
    return stacked[0] if len(stacked) == 1 else mb.concat(values=stacked, axis=-1)


@rule("index")
def _index(lw, node):
    x, *idx = node.inputs
    return _undata(node, _mb().gather_nd(x=_data(lw, x), indices=_coords(lw, x, idx)))


@rule("index_put")
def _index_put(lw, node):
    mb = _mb()
    x, values, *idx = node.inputs
    coords = _coords(lw, x, idx)
    data = _data(lw, x)
    # scatter_nd takes updates of the indexed shape: the values broadcast onto zeros of it
    zeros = mb.fill(shape=mb.shape(x=mb.gather_nd(x=data, indices=coords)), value=lw.const(0, x.dtype))
    updates = mb.add(x=zeros, y=_data(lw, values))
    return _undata(node, mb.scatter_nd(data=data, indices=coords, updates=updates,
                                       mode="add" if node.attrs["accumulate"] else "update"))


@rule("topk_indices")
def _topk_indices(lw, node):
    mb, x = _mb(), node.inputs[0]
    axis, k = node.attrs["axis"] % x.type.rank, node.attrs["k"]
    if sym.equal(k, x.shape[axis]):
        return mb.argsort(x=_x(lw, node), axis=axis, ascending=not node.attrs["largest"])
    if not isinstance(k, int):
        raise no_equivalent(node, f": k = {k} is symbolic and not the whole axis; MIL topk takes a fixed k")
    return mb.topk(x=_x(lw, node), k=k, axis=axis, ascending=not node.attrs["largest"])[1]


@rule("pad")
def _pad(lw, node):
    x = node.inputs[0]
    if not x.dtype.is_float:
        raise no_equivalent(node, f": MIL pad takes floats only, this input is {x.dtype.name}")
    return _mb().pad(x=lw.arg(x), pad=np.asarray(_pads(node.attrs["pads"]), np.int32), mode="constant",
                     constant_val=np.float16(node.attrs["value"]))


# --- creation -----------------------------------------------------------------------------------
@rule("arange")
def _arange(lw, node):
    a = node.attrs
    mb = _mb()
    start, end = lw.dim(a["start"]), lw.dim(a["end"])
    if isinstance(start, int) and isinstance(end, int):
        return mb.const(val=np.arange(start, end, a["step"], dtype=np.int32))
    as_var = [np.int32(v) if isinstance(v, int) else v for v in (start, end, a["step"])]
    return mb.range_1d(start=as_var[0], end=as_var[1], step=as_var[2])


@rule("full")
def _full(lw, node):
    a = node.attrs
    value = lw.const(a["value"], a["dtype"])
    shape = lw.shape(a["shape"])
    if isinstance(shape, np.ndarray):
        return _mb().const(val=np.full(shape.tolist(), value, dtype=value.dtype))
    return _mb().fill(shape=shape, value=value)


# --- activation quantisation --------------------------------------------------------------------
@rule("fake_quant")
def _fake_quant(lw, node):
    a = node.attrs
    fmt = a["format"].name
    if fmt not in ("int8", "uint8"):
        raise no_equivalent(node, f": Core ML quantizes activations to int8/uint8 only, not {fmt}")
    mb = _mb()
    zp = np.asarray(a["zero_point"]).astype(np.int8 if fmt == "int8" else np.uint8)
    scale = np.float16(a["scale"])
    q = mb.quantize(input=_x(lw, node), scale=scale, zero_point=zp, output_dtype=fmt)
    return mb.dequantize(input=q, scale=scale, zero_point=zp)


def _round_half_even(mb, v):
    # MIL's round leaves x.5 to the compute unit (webmachinelearning/webnn#817: ANE and GPU differ),
    # torch rounds it to even: floor, then up past the half or at it from an odd floor. Exact in
    # fp16, where the quotients (at most 2^(b-1)/clip) keep their fraction bits.
    f = mb.floor(x=v)
    d = mb.sub(x=v, y=f)
    odd = mb.equal(x=mb.sub(x=f, y=mb.mul(x=mb.floor(x=mb.mul(x=f, y=np.float16(0.5))), y=np.float16(2))),
                   y=np.float16(1))
    up = mb.logical_or(x=mb.greater(x=d, y=np.float16(0.5)),
                       y=mb.logical_and(x=mb.equal(x=d, y=np.float16(0.5)), y=odd))
    return mb.select(cond=up, a=mb.add(x=f, y=np.float16(1)), b=f)


@rule("dynamic_quant")
def _dynamic_quant(lw, node):
    # codes from the row's (or group's) own amax, in the program's fp16; quantize takes const scales
    from ...ir.actquant import ACT_FORMATS, check
    from .capabilities import DYNAMIC_QUANT, MINIFLOAT_ACTIVATIONS
    a = node.attrs
    if a["format"] not in DYNAMIC_QUANT:
        raise no_equivalent(node, f": {a['format']} activations ({MINIFLOAT_ACTIVATIONS})")
    mb, x = _mb(), _x(lw, node)
    width = node.inputs[0].shape[-1]
    size = check(a["format"], a["group"], a["clip"], a["global_scale"], width, f"node {node.name}")
    top = (1 << (ACT_FORMATS[a["format"]][1] - 1)) - 1
    g = x if size == width else mb.reshape(x=x, shape=np.asarray([-1, size], np.int32))
    amax = mb.reduce_max(x=mb.abs(x=g), axes=[-1], keep_dims=True)
    if a["clip"] != 1:
        amax = mb.mul(x=amax, y=np.float16(a["clip"]))
    # the smallest fp16 subnormal stands for the reference's tiny floor: an all-zero row's codes are 0
    scale = mb.maximum(x=mb.real_div(x=amax, y=np.float16(top)), y=np.float16(2.0 ** -24))
    q = _round_half_even(mb, mb.real_div(x=g, y=scale))
    q = mb.minimum(x=mb.maximum(x=q, y=np.float16(-top - 1)), y=np.float16(top))
    y = mb.mul(x=q, y=scale)
    return y if size == width else mb.reshape(x=y, shape=mb.shape(x=x))

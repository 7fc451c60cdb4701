"""Converters from core-ATen ops to IR ops, one small function each, collected in CONVERTERS.

A converter receives the :class:`TorchContext` and the fx node and returns the IR value (or a
tuple of values, None for outputs it does not support). Types come from export's fake tensors
through ``cx.shape``/``cx.type_of``, so view-like ops take their output shape from torch itself.
"""
from __future__ import annotations

import torch
import torch.fx

from ..ir import symbolic as sym
from ..ir.ops.shape import normalize_slice
from ..registry import Registry
from .errors import UnsupportedError
from .torch_context import TorchContext

aten = torch.ops.aten
CONVERTERS = Registry("torch converter")
register = CONVERTERS.register

# Ops with no data effect after export (copies, aliases, runtime assertions).
SKIP = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
        aten.sym_constrain_range_for_size.default, aten.sym_constrain_range.default}
for _name in ("_assert_async", "_functional_assert_async"):
    for _ov in ("default", "msg"):
        if hasattr(getattr(aten, _name, None), _ov):
            SKIP.add(getattr(getattr(aten, _name), _ov))


def _tdt(cx: TorchContext, n) -> torch.dtype:
    return cx.meta(n).dtype


def _probe(cx, a):
    """Something torch.result_type accepts: an empty tensor of the operand's rank and dtype, or the scalar."""
    if isinstance(a, torch.fx.Node):
        m = cx.meta(a)
        if isinstance(m, torch.Tensor):
            return torch.empty([0] * m.dim(), dtype=m.dtype) if m.dim() else torch.empty((), dtype=m.dtype)
        raise UnsupportedError(f"operand {a.name} is a symbolic size, not a tensor")
    return a


def _common(cx, a, b) -> torch.dtype:
    return torch.result_type(_probe(cx, a), _probe(cx, b))


# --- identity / copies --------------------------------------------------------------------------
@register(aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default)
def _identity(cx, n):
    return cx.value(n.args[0])


@register(aten._to_copy.default, aten.to.dtype)
def _to(cx, n):
    return cx.cast(cx.value(n.args[0]), _tdt(cx, n))


# --- elementwise --------------------------------------------------------------------------------
_UNARY = {
    aten.neg.default: "neg", aten.abs.default: "abs", aten.exp.default: "exp", aten.log.default: "log",
    aten.sqrt.default: "sqrt", aten.rsqrt.default: "rsqrt", aten.reciprocal.default: "reciprocal",
    aten.relu.default: "relu", aten.sigmoid.default: "sigmoid", aten.tanh.default: "tanh",
    aten.erf.default: "erf", aten.silu.default: "silu", aten.sin.default: "sin", aten.cos.default: "cos",
    aten.floor.default: "floor", aten.ceil.default: "ceil", aten.hardswish.default: "hardswish",
    aten.hardsigmoid.default: "hardsigmoid", aten.logical_not.default: "not",
}


def _unary(cx, n):
    x = cx.value(n.args[0])
    op = _UNARY[n.target]
    if op == "not":
        x = cx.cast(x, torch.bool)
    elif op not in ("neg", "abs", "relu"):
        x = cx.cast(x, _tdt(cx, n))          # float-only ops on ints compute in the promoted float type
    return cx.emit(op, x)


register(*_UNARY)(_unary)


@register(aten.bitwise_not.default)
def _bitwise_not(cx, n):
    if _tdt(cx, n) != torch.bool:
        raise UnsupportedError("bitwise_not on integers")
    return cx.emit("not", cx.value(n.args[0]))


@register(aten.gelu.default)
def _gelu(cx, n):
    return cx.emit("gelu", cx.value(n.args[0]), approximate=n.kwargs.get("approximate", "none"))


@register(aten.leaky_relu.default)
def _leaky_relu(cx, n):
    slope = n.args[1] if len(n.args) > 1 else 0.01
    return cx.emit("leaky_relu", cx.value(n.args[0]), negative_slope=float(slope))


@register(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.hardtanh.default)
def _clamp(cx, n):
    lo, hi = None, None
    if n.target == aten.clamp.default:
        lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min")
        hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max")
    elif n.target == aten.clamp_min.default:
        lo = n.args[1]
    elif n.target == aten.clamp_max.default:
        hi = n.args[1]
    else:
        lo = n.args[1] if len(n.args) > 1 else -1.0
        hi = n.args[2] if len(n.args) > 2 else 1.0
    if isinstance(lo, torch.fx.Node) or isinstance(hi, torch.fx.Node):
        raise UnsupportedError("clamp with tensor bounds")
    return cx.emit("clamp", cx.cast(cx.value(n.args[0]), _tdt(cx, n)), min=lo, max=hi)


_BINARY = {
    aten.add.Tensor: "add", aten.add.Scalar: "add", aten.sub.Tensor: "sub", aten.sub.Scalar: "sub",
    aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", aten.div.Tensor: "div", aten.div.Scalar: "div",
    aten.pow.Tensor_Scalar: "pow", aten.pow.Tensor_Tensor: "pow", aten.maximum.default: "maximum",
    aten.minimum.default: "minimum",
}
_COMPARE = {
    aten.eq.Tensor: "eq", aten.eq.Scalar: "eq", aten.ne.Tensor: "ne", aten.ne.Scalar: "ne",
    aten.lt.Tensor: "lt", aten.lt.Scalar: "lt", aten.le.Tensor: "le", aten.le.Scalar: "le",
    aten.gt.Tensor: "gt", aten.gt.Scalar: "gt", aten.ge.Tensor: "ge", aten.ge.Scalar: "ge",
}
_LOGIC = {aten.logical_and.default: "and", aten.bitwise_and.Tensor: "and", aten.logical_or.default: "or",
          aten.bitwise_or.Tensor: "or", aten.logical_xor.default: "xor", aten.bitwise_xor.Tensor: "xor"}


def _binary(cx, n):
    op = _BINARY[n.target]
    a, b = n.args[0], n.args[1]
    out = _tdt(cx, n)
    alpha = n.kwargs.get("alpha", 1)
    va, vb = cx.operand(a, out), cx.operand(b, out)
    if alpha != 1:
        vb = cx.emit("mul", vb, cx.const(alpha, out), name=f"{n.name}_alpha")
    return cx.emit(op, va, vb)


register(*_BINARY)(_binary)


@register(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(cx, n):
    out = _tdt(cx, n)
    a, b = cx.operand(n.args[0], out), cx.operand(n.args[1], out)
    alpha = n.kwargs.get("alpha", 1)
    if alpha != 1:
        a = cx.emit("mul", a, cx.const(alpha, out), name=f"{n.name}_alpha")
    return cx.emit("sub", b, a)


@register(aten.pow.Scalar)
def _pow_scalar(cx, n):
    out = _tdt(cx, n)
    return cx.emit("pow", cx.operand(n.args[0], out), cx.operand(n.args[1], out))


@register(aten.div.Tensor_mode)
def _div_mode(cx, n):
    mode = n.kwargs.get("rounding_mode")
    out = _tdt(cx, n)
    if mode == "floor" and out.is_floating_point:
        q = cx.emit("div", cx.operand(n.args[0], out), cx.operand(n.args[1], out))
        return cx.emit("floor", q)
    if mode == "floor" and out in (torch.int64, torch.int32):
        # IR div of integers is float32 true division; its floor is exact while both operands are
        # below 2**24 in magnitude (integers float32 holds exactly), as index arithmetic is
        q = cx.emit("div", cx.operand(n.args[0], out), cx.operand(n.args[1], out), name=f"{n.name}_true")
        return cx.cast(cx.emit("floor", q, name=f"{n.name}_floor"), out)
    raise UnsupportedError(f"div with rounding_mode={mode!r} on {out}")


def _compare(cx, n):
    common = _common(cx, n.args[0], n.args[1])
    return cx.emit(_COMPARE[n.target], cx.operand(n.args[0], common), cx.operand(n.args[1], common))


register(*_COMPARE)(_compare)


def _logic(cx, n):
    if _tdt(cx, n) != torch.bool:
        raise UnsupportedError("bitwise ops on integers")
    return cx.emit(_LOGIC[n.target], cx.operand(n.args[0], torch.bool), cx.operand(n.args[1], torch.bool))


register(*_LOGIC)(_logic)


@register(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(cx, n):
    out = _tdt(cx, n)
    return cx.emit("where", cx.operand(n.args[0], torch.bool), cx.operand(n.args[1], out), cx.operand(n.args[2], out))


# --- linear algebra -----------------------------------------------------------------------------
@register(aten.linear.default)
def _linear(cx, n):
    x, w = cx.value(n.args[0]), cx.value(n.args[1])
    b = cx.value(n.args[2]) if len(n.args) > 2 and n.args[2] is not None else None
    name = w.name[: -len(".weight")] if w.is_weight and w.name.endswith(".weight") else None
    if name is not None and not w.name.startswith("const"):
        name = cx.g.fresh_name(name, node=True)
    return cx.emit("linear", x, w, b, name=name)


@register(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(cx, n):
    return cx.emit("matmul", cx.value(n.args[0]), cx.value(n.args[1]))


@register(aten.addmm.default)
def _addmm(cx, n):
    bias, a, b = (cx.value(x) for x in n.args[:3])
    beta, alpha = n.kwargs.get("beta", 1), n.kwargs.get("alpha", 1)
    mm = cx.emit("matmul", a, b, name=f"{n.name}_mm")
    if alpha != 1:
        mm = cx.emit("mul", mm, cx.const(alpha, _tdt(cx, n)), name=f"{n.name}_alpha")
    if beta != 1:
        bias = cx.emit("mul", bias, cx.const(beta, _tdt(cx, n)), name=f"{n.name}_beta")
    return cx.emit("add", mm, bias)


@register(aten.convolution.default)
def _conv(cx, n):
    x, w, b, stride, padding, dilation, transposed, _output_padding, groups = n.args
    if transposed:
        raise UnsupportedError("transposed convolution")
    nd = len(stride)
    name = cx.value(w).name
    name = name[: -len(".weight")] if name.endswith(".weight") else None
    return cx.emit("conv", cx.value(x), cx.value(w), None if b is None else cx.value(b),
                   name=cx.g.fresh_name(name, node=True) if name else None,
                   stride=list(stride), padding=list(padding) * 2 if len(padding) == nd else list(padding),
                   dilation=list(dilation), groups=groups)


@register(aten.embedding.default)
def _embedding(cx, n):
    w, idx = cx.value(n.args[0]), cx.value(n.args[1])
    name = w.name[: -len(".weight")] if w.name.endswith(".weight") else None
    return cx.emit("embedding", idx, w, name=cx.g.fresh_name(name, node=True) if name else None)


# --- normalisation, softmax, pooling ------------------------------------------------------------
@register(aten._softmax.default, aten.softmax.int)
def _softmax(cx, n):
    return cx.emit("softmax", cx.cast(cx.value(n.args[0]), _tdt(cx, n)), axis=n.args[1])


@register(aten._log_softmax.default, aten.log_softmax.int)
def _log_softmax(cx, n):
    return cx.emit("log_softmax", cx.cast(cx.value(n.args[0]), _tdt(cx, n)), axis=n.args[1])


@register(aten.native_layer_norm.default)
def _layer_norm(cx, n):
    x, shape, w, b, eps = n.args
    out = cx.emit("layer_norm", cx.value(x), None if w is None else cx.value(w), None if b is None else cx.value(b),
                  axis=-len(shape), eps=float(eps))
    return (out, None, None)          # mean and rstd outputs are not supported downstream


@register(aten._native_batch_norm_legit_no_training.default)
def _batch_norm(cx, n):
    x, w, b, mean, var, _momentum, eps = n.args
    out = cx.emit("batch_norm", cx.value(x), cx.value(mean), cx.value(var),
                  None if w is None else cx.value(w), None if b is None else cx.value(b), eps=float(eps))
    return (out, None, None)


def _pool_padding(padding, nd):
    padding = list(padding) or [0] * nd
    if len(padding) == 1:
        padding = padding * nd
    return padding * 2


@register(aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default)
def _max_pool(cx, n):
    args = list(n.args) + [None] * 6
    x, kernel, stride, padding, dilation, ceil_mode = args[:6]
    nd = len(kernel)
    out = cx.emit("max_pool", cx.value(x), kernel=list(kernel), stride=list(stride or kernel),
                  padding=_pool_padding(padding or [], nd), dilation=list(dilation or [1] * nd),
                  ceil_mode=bool(ceil_mode))
    return (out, None)


@register(aten.avg_pool2d.default, aten.avg_pool1d.default, aten.avg_pool3d.default)
def _avg_pool(cx, n):
    args = list(n.args) + [None] * 7
    x, kernel, stride, padding, ceil_mode, count_include_pad, divisor = args[:7]
    if divisor is not None:
        raise UnsupportedError("avg_pool with divisor_override")
    nd = len(kernel)
    return cx.emit("avg_pool", cx.value(x), kernel=list(kernel), stride=list(stride or kernel),
                   padding=_pool_padding(padding or [], nd), ceil_mode=bool(ceil_mode),
                   count_include_pad=True if count_include_pad is None else bool(count_include_pad))


@register(aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default, aten._adaptive_avg_pool3d.default)
def _adaptive(cx, n):
    size = n.args[1]
    return cx.emit("adaptive_avg_pool", cx.value(n.args[0]), output_size=[int(s) for s in size])


# --- reductions ---------------------------------------------------------------------------------
def _axes(cx, n, dims):
    rank = cx.meta(n.args[0]).dim()
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(rank))
    return [dims] if isinstance(dims, int) else list(dims)


def _reducer(op):
    def conv(cx, n):
        x = cx.value(n.args[0])
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        out_dt = _tdt(cx, n)
        x = cx.cast(x, out_dt)
        if x.type.rank == 0:
            return x
        return cx.emit(op, x, axes=_axes(cx, n, dims), keepdim=bool(keep))
    return conv


register(aten.sum.dim_IntList, aten.sum.default)(_reducer("reduce_sum"))
register(aten.mean.dim, aten.mean.default)(_reducer("reduce_mean"))
register(aten.amax.default)(_reducer("reduce_max"))
register(aten.amin.default)(_reducer("reduce_min"))
register(aten.prod.dim_int, aten.prod.default)(_reducer("reduce_prod"))
register(aten.any.dim, aten.any.dims, aten.any.default)(_reducer("reduce_any"))
register(aten.all.dim, aten.all.dims, aten.all.default)(_reducer("reduce_all"))
register(aten.max.default)(_reducer("reduce_max"))
register(aten.min.default)(_reducer("reduce_min"))


@register(aten.max.dim, aten.min.dim)
def _max_dim(cx, n):
    x, dim = cx.value(n.args[0]), n.args[1]
    keep = bool(n.args[2]) if len(n.args) > 2 else False
    values = cx.emit("reduce_max" if n.target == aten.max.dim else "reduce_min", x, axes=[dim], keepdim=keep)
    if n.target == aten.max.dim:
        return (values, cx.emit("argmax", x, axis=dim, keepdim=keep, name=f"{n.name}_indices"))
    return (values, None)


@register(aten.argmax.default)
def _argmax(cx, n):
    x = cx.value(n.args[0])
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = bool(n.args[2]) if len(n.args) > 2 else bool(n.kwargs.get("keepdim", False))
    if dim is None:
        # Over the flattened tensor; keepdim then means a result of shape [1] * rank.
        flat = cx.emit("reshape", x, shape=[-1], name=f"{n.name}_flat")
        idx = cx.emit("argmax", flat, axis=0, keepdim=False, name=f"{n.name}_scalar" if keep else None)
        return cx.emit("reshape", idx, shape=list(cx.shape(n))) if keep else idx
    return cx.emit("argmax", x, axis=dim, keepdim=keep)


@register(aten.cumsum.default)
def _cumsum(cx, n):
    return cx.emit("cumsum", cx.cast(cx.value(n.args[0]), _tdt(cx, n)), axis=n.args[1])


# --- shape and data movement --------------------------------------------------------------------
@register(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.squeeze.dim, aten.squeeze.dims,
          aten.squeeze.default, aten.unsqueeze.default, aten.flatten.using_ints, aten.view_copy.default)
def _reshape(cx, n):
    return cx.emit("reshape", cx.value(n.args[0]), shape=list(cx.shape(n)))


@register(aten.permute.default)
def _permute(cx, n):
    return cx.emit("permute", cx.value(n.args[0]), perm=[int(p) % max(cx.meta(n).dim(), 1) for p in n.args[1]])


@register(aten.transpose.int, aten.t.default)
def _transpose(cx, n):
    rank = cx.meta(n).dim()
    a, b = (n.args[1] % rank, n.args[2] % rank) if n.target == aten.transpose.int else (0, 1)
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return cx.emit("permute", cx.value(n.args[0]), perm=perm)


@register(aten.expand.default)
def _expand(cx, n):
    return cx.emit("expand", cx.value(n.args[0]), shape=list(cx.shape(n)))


@register(aten.slice.Tensor)
def _slice(cx, n):
    args = list(n.args) + [None] * 5
    x, dim, start, end, step = args[:5]
    xv = cx.value(x)
    axis = (dim or 0) % xv.type.rank
    size = xv.shape[axis]
    start = cx.dim(start) if start is not None else None
    end = cx.dim(end) if end is not None else None
    s, e, st = normalize_slice(size, start, end, step or 1)
    if isinstance(s, int) and s == 0 and st == 1 and sym.equal(e, size):
        return xv
    return cx.emit("slice", xv, axis=axis, start=s, end=e, step=st)


@register(aten.select.int)
def _select(cx, n):
    x, dim, index = n.args
    xv = cx.value(x)
    axis = dim % xv.type.rank
    i = cx.dim(index)
    if isinstance(i, int) and i < 0:
        i = sym.add(xv.shape[axis], i)
    picked = cx.emit("slice", xv, axis=axis, start=i, end=sym.add(i, 1), step=1, name=f"{n.name}_slice")
    return cx.emit("reshape", picked, shape=list(cx.shape(n)))


@register(aten.cat.default)
def _cat(cx, n):
    tensors = n.args[0]
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    out = _tdt(cx, n)
    vals = [cx.cast(cx.value(t), out) for t in tensors if cx.meta(t).numel() != 0 or len(tensors) == 1]
    if len(vals) == 1:
        return vals[0]
    return cx.emit("concat", *vals, axis=dim % cx.meta(n).dim())


@register(aten.split_with_sizes.default, aten.split.Tensor)
def _split(cx, n):
    x = cx.value(n.args[0])
    dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % x.type.rank
    parts = []
    start = 0
    for i, piece in enumerate(cx.meta(n)):
        size = cx.dim(piece.shape[dim])
        end = sym.add(start, size)
        parts.append(cx.emit("slice", x, axis=dim, start=start, end=end, step=1, name=f"{n.name}_{i}"))
        start = end
    return tuple(parts)


@register(aten.unbind.int)
def _unbind(cx, n):
    x = cx.value(n.args[0])
    dim = (n.args[1] if len(n.args) > 1 else 0) % x.type.rank
    parts = []
    for i, piece in enumerate(cx.meta(n)):
        s = cx.emit("slice", x, axis=dim, start=i, end=i + 1, step=1, name=f"{n.name}_{i}_slice")
        parts.append(cx.emit("reshape", s, shape=[cx.dim(d) for d in piece.shape], name=f"{n.name}_{i}"))
    return tuple(parts)


@register(aten.index_select.default)
def _index_select(cx, n):
    return cx.emit("gather", cx.value(n.args[0]), cx.value(n.args[2]), axis=n.args[1])


@register(aten.gather.default)
def _gather(cx, n):
    return cx.emit("gather_elements", cx.value(n.args[0]), cx.value(n.args[2]), axis=n.args[1])


@register(aten.index.Tensor)
def _index(cx, n):
    x, indices = n.args
    lead = next((k for k, i in enumerate(indices) if i is not None), len(indices))
    last = max((k for k, i in enumerate(indices) if i is not None), default=-1)
    picked = list(indices[lead:last + 1])       # trailing Nones: whole axes, as if not listed
    if any(i is None for i in picked):
        raise UnsupportedError("advanced indexing with index tensors on axes that are not next to each other "
                               "(a None, that is a whole axis, between two of them)")
    if lead == 0:
        return cx.emit("index", cx.value(x), *(cx.value(i) for i in picked))
    # x[:, :, i, j] (reflect and replicate padding, say): the indexed axes moved to the front, indexed,
    # and the whole leading axes moved back before the indexed result's axes
    rank = cx.meta(x).dim()
    order = list(range(lead, rank)) + list(range(lead))
    front = cx.emit("permute", cx.value(x), perm=order, name=f"{n.name}_front")
    got = cx.emit("index", front, *(cx.value(i) for i in picked), name=f"{n.name}_picked")
    out_rank = cx.meta(n).dim()
    return cx.emit("permute", got, perm=list(range(out_rank - lead, out_rank)) + list(range(out_rank - lead)))


@register(aten.constant_pad_nd.default)
def _pad(cx, n):
    x = cx.value(n.args[0])
    pad = list(n.args[1])
    value = n.args[2] if len(n.args) > 2 else 0.0
    r = x.type.rank
    begins, ends = [0] * r, [0] * r
    for i in range(len(pad) // 2):          # torch lists (begin, end) pairs from the last axis backwards
        begins[r - 1 - i], ends[r - 1 - i] = pad[2 * i], pad[2 * i + 1]
    if any(p < 0 for p in begins + ends):
        raise UnsupportedError("negative padding (cropping)")
    return cx.emit("pad", x, pads=begins + ends, value=value)


# --- creation -----------------------------------------------------------------------------------
def _static(shape) -> bool:
    return all(isinstance(d, int) for d in shape)


@register(aten.scalar_tensor.default)
def _scalar_tensor(cx, n):
    return cx.const(n.args[0], _tdt(cx, n))


_EMPTY = (aten.empty_permuted.default, aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default)


@register(aten.full.default, aten.full_like.default, aten.zeros_like.default, aten.ones_like.default,
          aten.zeros.default, aten.ones.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
          *_EMPTY)
def _full(cx, n):
    shape = cx.shape(n)
    t = n.target
    # an uninitialised tensor may hold anything; zeros make the graph deterministic
    if t in (aten.zeros_like.default, aten.zeros.default, aten.new_zeros.default) + _EMPTY:
        value = 0
    elif t in (aten.ones_like.default, aten.ones.default, aten.new_ones.default):
        value = 1
    elif t == aten.new_full.default:
        value = n.args[2]
    else:
        value = n.args[1]
    dt = _tdt(cx, n)
    if _static(shape):
        return cx.const(torch.full(shape, value, dtype=dt), dt)
    return cx.emit("full", shape=list(shape), value=value, dtype=dt)


@register(aten.arange.start_step, aten.arange.start, aten.arange.default)
def _arange(cx, n):
    args = list(n.args)
    if n.target == aten.arange.default:
        args = [0] + args
    start, end = args[0], args[1]
    step = args[2] if len(args) > 2 else n.kwargs.get("step", 1)
    dt = _tdt(cx, n)
    if not isinstance(start, torch.fx.Node) and not isinstance(end, torch.fx.Node):
        return cx.const(torch.arange(start, end, step, dtype=dt), dt)
    if not isinstance(step, int) or dt.is_floating_point:
        raise UnsupportedError("symbolic arange with a float step or dtype")
    return cx.emit("arange", start=cx.dim(start), end=cx.dim(end), step=step, dtype=dt)


@register(aten.linalg_vector_norm.default)
def _vector_norm(cx, n):
    x = cx.cast(cx.value(n.args[0]), _tdt(cx, n))
    order = n.args[1] if len(n.args) > 1 else n.kwargs.get("ord", 2)
    dims = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
    keep = bool(n.args[3] if len(n.args) > 3 else n.kwargs.get("keepdim", False))
    axes = _axes(cx, n, dims)
    if order == 2:
        sq = cx.emit("mul", x, x, name=f"{n.name}_sq")
        return cx.emit("sqrt", cx.emit("reduce_sum", sq, axes=axes, keepdim=keep, name=f"{n.name}_sum"))
    if order == 1:
        return cx.emit("reduce_sum", cx.emit("abs", x, name=f"{n.name}_abs"), axes=axes, keepdim=keep)
    if order == float("inf"):
        return cx.emit("reduce_max", cx.emit("abs", x, name=f"{n.name}_abs"), axes=axes, keepdim=keep)
    raise UnsupportedError(f"vector norm of order {order}")

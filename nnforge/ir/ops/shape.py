"""Data movement ops: reshape, permute, expand, slice, concat, gathers, pad.

Frontends lower view/flatten/squeeze/unsqueeze to ``reshape``, transpose to ``permute`` and
select/split to ``slice`` (+ ``reshape``), so each backend has few movement ops to support.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import symbolic as sym
from ..dtypes import int32, int64
from ..types import TensorType
from .registry import Attr, broadcast_dim, broadcast_shapes, defop, norm_axis, same_dtype


def resolve_reshape(in_shape, shape) -> tuple:
    """Target shape with its single -1 resolved against the input's element count."""
    if sum(1 for d in shape if d == -1) > 1:
        raise ValueError(f"reshape target {list(shape)} has more than one -1")
    for d in shape:
        if isinstance(d, int) and d < -1:
            raise ValueError(f"reshape target {list(shape)} has a negative dimension")
    total = sym.prod(in_shape)
    if -1 not in shape:
        if not sym.equal(sym.prod(shape), total):
            raise ValueError(f"cannot reshape {list(in_shape)} ({total} elements) to {list(shape)}")
        return tuple(shape)
    known = sym.prod(d for d in shape if d != -1)
    if known == 0:
        raise ValueError(f"reshape target {list(shape)} with a zero dimension cannot use -1")
    missing = sym.floordiv(total, known)
    if not sym.equal(sym.mul(missing, known), total):
        raise ValueError(f"cannot reshape {list(in_shape)} ({total} elements) to {list(shape)}")
    return tuple(missing if d == -1 else d for d in shape)


defop("reshape", ["x"], {"shape": Attr("dims")},
      infer=lambda x, shape: x.with_shape(resolve_reshape(x.shape, shape)),
      ref=lambda ctx, x, shape: x.reshape(ctx.dims(shape)), family="shape",
      doc="Row-major reshape; dims may be symbolic and at most one may be -1.")


def _permute_infer(x, perm):
    if sorted(perm) != list(range(x.rank)):
        raise ValueError(f"perm {perm} is not a permutation of the {x.rank} axes of {x}")
    return x.with_shape(tuple(x.shape[p] for p in perm))


defop("permute", ["x"], {"perm": Attr("ints")}, infer=_permute_infer,
      ref=lambda ctx, x, perm: x.permute(perm).contiguous(), family="shape")


def _expand_infer(x, shape):
    if len(shape) < x.rank:
        raise ValueError(f"expand target {list(shape)} has fewer dims than {x}")
    if any(d == -1 for d in shape):
        raise ValueError("expand target must be fully resolved (no -1)")
    lead = len(shape) - x.rank
    for i, d in enumerate(x.shape):
        t = shape[lead + i]
        if not (d == 1 or sym.equal(d, t)):
            broadcast_dim(d, t)      # raises for two different constants
    return x.with_shape(tuple(shape))


defop("expand", ["x"], {"shape": Attr("dims")}, infer=_expand_infer,
      ref=lambda ctx, x, shape: x.expand(ctx.dims(shape)).contiguous(), family="shape",
      doc="Broadcast x to exactly `shape` (dims of x must be 1 or equal).")


def _slice_infer(x, axis, start, end, step):
    a = norm_axis(axis, x.rank)
    if step < 1:
        raise ValueError(f"slice step must be >= 1, got {step}")
    for v in (start, end):
        if isinstance(v, int) and v < 0:
            raise ValueError("slice bounds must be normalised to 0 <= start <= end <= size "
                             "(use normalize_slice in frontends)")
    size = x.shape[a]
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, int) and isinstance(size, int) and v > size:
            raise ValueError(f"slice {name} {v} is past the end of axis {a} of size {size}")
    length = sym.floordiv(sym.add(sym.sub(end, start), step - 1), step)
    if isinstance(length, int) and length < 0:
        raise ValueError(f"slice [{start}:{end}] is empty-negative")
    return x.with_shape(x.shape[:a] + (length,) + x.shape[a + 1:])


def _slice_ref(ctx, x, axis, start, end, step):
    index = (slice(None),) * (axis % x.dim()) + (slice(ctx.dim(start), ctx.dim(end), step),)
    return x[index]


defop("slice", ["x"], {"axis": Attr("int"), "start": Attr("dim", 0), "end": Attr("dim"), "step": Attr("int", 1)},
      infer=_slice_infer, ref=_slice_ref, family="shape",
      doc="x[..., start:end:step, ...] along axis; bounds are non-negative and within the dim.")


def normalize_slice(size, start, end, step=1):
    """Python slice bounds (negative, past-the-end, None) -> IR bounds 0 <= start <= end <= size."""
    def norm(v, default):
        if v is None:
            return default
        if isinstance(v, int):
            if v < 0:
                v = sym.add(size, v)
                return max(v, 0) if isinstance(v, int) else v
            if isinstance(size, int):
                return min(v, size)
            return v if v < 2 ** 62 else size
        return sym.simplify(v)
    s, e = norm(start, 0), norm(end, size)
    if isinstance(s, int) and isinstance(e, int) and e < s:
        e = s
    return s, e, step


def _concat_infer(*xs, axis):
    dt = same_dtype(*xs)
    rank = xs[0].rank
    a = norm_axis(axis, rank)
    total = 0
    for x in xs:
        if x.rank != rank:
            raise ValueError(f"concat inputs differ in rank: {', '.join(str(t) for t in xs)}")
        for i in range(rank):
            if i != a and not sym.equal(x.shape[i], xs[0].shape[i]):
                raise ValueError(f"concat inputs differ outside axis {axis}: {', '.join(str(t) for t in xs)}")
        total = sym.add(total, x.shape[a])
    return TensorType(dt, xs[0].shape[:a] + (total,) + xs[0].shape[a + 1:])


defop("concat", ["xs*"], {"axis": Attr("int")}, infer=_concat_infer,
      ref=lambda ctx, *xs, axis: torch.cat(xs, axis), family="shape")


def _index_dtype(t):
    if t.dtype not in (int64, int32):
        raise TypeError(f"indices must be int64 or int32, got {t.dtype}")


def _gather_infer(x, indices, axis):
    _index_dtype(indices)
    a = norm_axis(axis, x.rank)
    return x.with_shape(x.shape[:a] + indices.shape + x.shape[a + 1:])


def _gather_ref(ctx, x, idx, axis):
    a = axis % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[a], idx)
    out = torch.index_select(x, a, idx.reshape(-1))
    return out.reshape(x.shape[:a] + idx.shape + x.shape[a + 1:])


defop("gather", ["x", "indices"], {"axis": Attr("int")}, infer=_gather_infer, ref=_gather_ref, family="shape",
      doc="Take slices along axis (ONNX Gather, torch index_select); negative indices count from the end.")


def _gather_elements_infer(x, indices, axis):
    _index_dtype(indices)
    norm_axis(axis, x.rank)
    if indices.rank != x.rank:
        raise ValueError(f"gather_elements indices {indices} must have the rank of {x}")
    return x.with_shape(indices.shape)


defop("gather_elements", ["x", "indices"], {"axis": Attr("int")}, infer=_gather_elements_infer,
      ref=lambda ctx, x, idx, axis: torch.gather(x, axis, idx), family="shape",
      doc="torch.gather / ONNX GatherElements.")


def _index_infer(x, *indices):
    for t in indices:
        _index_dtype(t)
    if len(indices) > x.rank:
        raise ValueError(f"{len(indices)} index tensors for {x}")
    return x.with_shape(broadcast_shapes(*(t.shape for t in indices)) + x.shape[len(indices):])


defop("index", ["x", "indices*"], infer=_index_infer, ref=lambda ctx, x, *idx: x[tuple(idx)], family="shape",
      doc="Advanced indexing of the leading len(indices) dims with broadcast index tensors (x[i0, i1, ...]).")


def _pad_infer(x, pads, value):
    if len(pads) != 2 * x.rank or any(p < 0 for p in pads):
        raise ValueError(f"pad needs {2 * x.rank} non-negative amounts (begins then ends), got {pads}")
    r = x.rank
    return x.with_shape(tuple(sym.add(x.shape[i], pads[i] + pads[r + i]) for i in range(r)))


def _pad_ref(ctx, x, pads, value):
    r = x.dim()
    torch_pad = []
    for i in reversed(range(r)):
        torch_pad += [pads[i], pads[r + i]]
    return F.pad(x, torch_pad, value=value)


defop("pad", ["x"], {"pads": Attr("ints"), "value": Attr("scalar", 0.0)}, infer=_pad_infer, ref=_pad_ref,
      family="shape", doc="Constant padding; pads lists begins for every axis, then ends.")


def _index_put_infer(x, values, *indices, accumulate):
    for t in indices:
        _index_dtype(t)
    if len(indices) > x.rank:
        raise ValueError(f"{len(indices)} index tensors for {x}")
    same_dtype(x, values)
    target = broadcast_shapes(*(t.shape for t in indices)) + x.shape[len(indices):]
    try:
        fits = broadcast_shapes(target, values.shape) == tuple(target)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"values {values} do not broadcast to the indexed shape {list(target)}")
    return x


def _index_put_ref(ctx, x, values, *indices, accumulate):
    return torch.index_put(x, tuple(indices), values, accumulate=accumulate)


defop("index_put", ["x", "values", "indices*"], {"accumulate": Attr("bool", False)}, infer=_index_put_infer,
      ref=_index_put_ref, family="shape",
      doc="x with x[i0, i1, ...] = values (broadcast), or += values when accumulate (index_add); the write "
          "side of index. Without accumulate, a position indexed twice takes one of its values.")

"""Reductions over a list of axes, argmax, top-k indices, and cumulative sum."""
from __future__ import annotations

import torch

from ..dtypes import bool_, int64
from .registry import Attr, defop, norm_axis


def _reduced_shape(x, axes, keepdim):
    if not axes:
        raise ValueError("reduction needs at least one axis (list every axis to reduce all)")
    norm = sorted({norm_axis(a, x.rank) for a in axes})
    if len(norm) != len(axes):
        raise ValueError(f"repeated axis in {axes}")
    if keepdim:
        return tuple(1 if i in norm else d for i, d in enumerate(x.shape))
    return tuple(d for i, d in enumerate(x.shape) if i not in norm)


def _reduce_infer(kind):
    def infer(x, axes, keepdim):
        shape = _reduced_shape(x, axes, keepdim)
        if kind == "logic":
            if x.dtype != bool_:
                raise TypeError(f"any/all need a bool input, got {x.dtype}")
            return x.with_shape(shape)
        if kind == "float" and not x.dtype.is_float:
            raise TypeError(f"mean needs a float input, got {x.dtype}")
        return x.with_shape(shape)
    return infer


def _amax(x, axes, keepdim):
    return torch.amax(x, dim=axes, keepdim=keepdim)


def _amin(x, axes, keepdim):
    return torch.amin(x, dim=axes, keepdim=keepdim)


def _prod(x, axes, keepdim):
    dt = x.dtype                      # torch promotes integer products to int64; the IR keeps the type
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = torch.prod(x, dim=a, keepdim=keepdim)
    return x.to(dt)


def _any(x, axes, keepdim):
    return torch.amax(x.to(torch.uint8), dim=axes, keepdim=keepdim).to(torch.bool)


def _all(x, axes, keepdim):
    return torch.amin(x.to(torch.uint8), dim=axes, keepdim=keepdim).to(torch.bool)


def _sum(x, axes, keepdim):
    return torch.sum(x, dim=axes, keepdim=keepdim).to(x.dtype)      # as _prod: no int64 promotion


def _mean(x, axes, keepdim):
    return torch.mean(x, dim=axes, keepdim=keepdim)


_REDUCE = {"sum": (_sum, "same"), "mean": (_mean, "float"), "max": (_amax, "same"),
           "min": (_amin, "same"), "prod": (_prod, "same"), "any": (_any, "logic"), "all": (_all, "logic")}
for _name, (_fn, _kind) in _REDUCE.items():
    defop(f"reduce_{_name}", ["x"], {"axes": Attr("ints"), "keepdim": Attr("bool", False)},
          infer=_reduce_infer(_kind),
          ref=lambda ctx, x, axes, keepdim, _fn=_fn: _fn(x, axes, keepdim),
          family="reduce")


def _argmax_infer(x, axis, keepdim):
    if x.dtype == bool_:
        raise TypeError("argmax needs a numeric input, got bool")
    return x.with_shape(_reduced_shape(x, [axis], keepdim)).with_dtype(int64)


defop("argmax", ["x"], {"axis": Attr("int"), "keepdim": Attr("bool", False)}, infer=_argmax_infer,
      ref=lambda ctx, x, axis, keepdim: torch.argmax(x, axis, keepdim=keepdim), family="reduce")


def _cumsum_infer(x, axis):
    if x.dtype == bool_:
        raise TypeError("cumsum needs a numeric input, got bool")
    norm_axis(axis, x.rank)
    return x


defop("cumsum", ["x"], {"axis": Attr("int")}, infer=_cumsum_infer,
      ref=lambda ctx, x, axis: torch.cumsum(x, axis, dtype=x.dtype), family="reduce")


def _topk_infer(x, k, axis, largest):
    if x.dtype == bool_:
        raise TypeError("topk_indices needs a numeric input, got bool")
    axis = norm_axis(axis, x.rank)
    size = x.shape[axis]
    if isinstance(k, int) and isinstance(size, int) and not 0 <= k <= size:
        raise ValueError(f"topk_indices k={k} is outside [0, {size}] (the size of axis {axis} of {x})")
    return x.with_shape(x.shape[:axis] + (k,) + x.shape[axis + 1:]).with_dtype(int64)


def _topk_ref(ctx, x, k, axis, largest):
    # a stable sort fixes the order of ties (lower index first), which torch.topk leaves open
    order = torch.sort(x, dim=axis, descending=largest, stable=True).indices
    return order.narrow(axis, 0, ctx.dim(k))


defop("topk_indices", ["x"], {"k": Attr("dim"), "axis": Attr("int", -1), "largest": Attr("bool", True)},
      infer=_topk_infer, ref=_topk_ref, family="reduce",
      doc="Indices of the k largest (or smallest) elements along axis, best first; ties in index order. "
          "The values are gather_elements(x, indices, axis); k = the axis' size is an argsort.")

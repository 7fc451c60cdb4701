"""Ops that create tensors whose shape depends on dimension symbols. Creations with static
shapes are folded into constants by the frontends instead."""
from __future__ import annotations

import torch

from .. import symbolic as sym
from ..types import TensorType
from .registry import Attr, defop


def _arange_infer(start, end, step, dtype):
    if step < 1:
        raise ValueError(f"arange step must be >= 1, got {step}")
    if not dtype.is_integer:
        raise TypeError(f"symbolic arange produces integers, got dtype {dtype}")
    return TensorType(dtype, (sym.floordiv(sym.add(sym.sub(end, start), step - 1), step),))


defop("arange", [], {"start": Attr("dim", 0), "end": Attr("dim"), "step": Attr("int", 1), "dtype": Attr("dtype", "int64")},
      infer=_arange_infer,
      ref=lambda ctx, start, end, step, dtype: torch.arange(ctx.dim(start), ctx.dim(end), step,
                                                            dtype=dtype.torch_dtype),
      family="creation", doc="Integers start, start+step, ... below end (end may be symbolic).")


def _full_infer(shape, value, dtype):
    if any(d == -1 for d in shape):
        raise ValueError("full needs a resolved shape")
    return TensorType(dtype, tuple(shape))


defop("full", [], {"shape": Attr("dims"), "value": Attr("scalar"), "dtype": Attr("dtype")}, infer=_full_infer,
      ref=lambda ctx, shape, value, dtype: torch.full(ctx.dims(shape), value, dtype=ctx.torch_dtype(dtype)),
      family="creation", doc="A tensor of the given (possibly symbolic) shape filled with value.")

"""Elementwise ops: unary math and activations, binary arithmetic/comparison with numpy
broadcasting (operands must share one dtype: frontends insert casts), where, clamp, cast."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dtypes import bool_, float32
from ..types import TensorType
from .registry import Attr, broadcast_shapes, defop, same_dtype


def _float_only(name):
    def infer(x, **_):
        if not x.dtype.is_float:
            raise TypeError(f"{name} needs a float input, got {x.dtype}")
        return x
    return infer


_FLOAT_UNARY = {
    "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "reciprocal": torch.reciprocal, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "erf": torch.erf,
    "silu": F.silu, "sin": torch.sin, "cos": torch.cos, "floor": torch.floor, "ceil": torch.ceil,
    "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
}
for _name, _fn in _FLOAT_UNARY.items():
    defop(_name, ["x"], infer=_float_only(_name), ref=lambda ctx, x, _fn=_fn: _fn(x), family="unary")


def _numeric(name):
    def infer(x, **_):
        if x.dtype == bool_:
            raise TypeError(f"{name} needs a numeric input, got bool")
        return x
    return infer


defop("neg", ["x"], infer=_numeric("neg"), ref=lambda ctx, x: torch.neg(x), family="unary")
defop("abs", ["x"], infer=_numeric("abs"), ref=lambda ctx, x: torch.abs(x), family="unary")
defop("relu", ["x"], infer=_numeric("relu"), ref=lambda ctx, x: torch.relu(x), family="unary")
defop("gelu", ["x"], {"approximate": Attr("str", "none", ("none", "tanh"))}, infer=_float_only("gelu"),
      ref=lambda ctx, x, approximate: F.gelu(x, approximate=approximate), family="unary",
      doc="GELU; approximate='tanh' is the tanh form, 'none' the erf form.")
defop("leaky_relu", ["x"], {"negative_slope": Attr("float", 0.01)}, infer=_float_only("leaky_relu"),
      ref=lambda ctx, x, negative_slope: F.leaky_relu(x, negative_slope), family="unary")


def _not_infer(x, **_):
    if x.dtype != bool_:
        raise TypeError(f"not needs a bool input, got {x.dtype}")
    return x


defop("not", ["x"], infer=_not_infer, ref=lambda ctx, x: torch.logical_not(x), family="unary")


def _clamp_ref(ctx, x, min, max):
    if min is None and max is None:
        return x                           # ONNX Clip without bounds: the identity
    # an integer x keeps its type (a float bound would promote it): bounds act truncated, as in
    # the backends, which make them constants of x's type
    return torch.clamp(x, min=min, max=max).to(x.dtype)


defop("clamp", ["x"], {"min": Attr("scalar", None), "max": Attr("scalar", None)}, infer=_numeric("clamp"),
      ref=_clamp_ref,
      family="unary", doc="Clamp to [min, max]; either bound may be None. relu6 is clamp(0, 6).")


def _cast_ref(ctx, x, dtype):
    return x.to(ctx.torch_dtype(dtype))


defop("cast", ["x"], {"dtype": Attr("dtype")}, infer=lambda x, dtype: x.with_dtype(dtype), ref=_cast_ref,
      family="unary")


# --- binary ---------------------------------------------------------------------------------------

def _arith_infer(a, b):
    return TensorType(same_dtype(a, b), broadcast_shapes(a.shape, b.shape))


def _div_infer(a, b):
    dt = same_dtype(a, b)
    return TensorType(dt if dt.is_float else float32, broadcast_shapes(a.shape, b.shape))


def _cmp_infer(a, b):
    same_dtype(a, b)
    return TensorType(bool_, broadcast_shapes(a.shape, b.shape))


def _logic_infer(a, b):
    if a.dtype != bool_ or b.dtype != bool_:
        raise TypeError(f"logical ops need bool inputs, got {a.dtype} and {b.dtype}")
    return TensorType(bool_, broadcast_shapes(a.shape, b.shape))


def _div_ref(ctx, a, b):
    out = torch.div(a, b)
    # Integer division is typed float32, which the interpreter computes in its float precision.
    return out if a.is_floating_point() else out.to(ctx.float_dtype)


_ARITH = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "pow": torch.pow,
          "maximum": torch.maximum, "minimum": torch.minimum}
for _name, _fn in _ARITH.items():
    defop(_name, ["a", "b"], infer=_arith_infer, ref=lambda ctx, a, b, _fn=_fn: _fn(a, b), family="binary")
defop("div", ["a", "b"], infer=_div_infer, ref=_div_ref, family="binary",
      doc="True division; integer operands give float32.")
_CMP = {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge}
for _name, _fn in _CMP.items():
    defop(_name, ["a", "b"], infer=_cmp_infer, ref=lambda ctx, a, b, _fn=_fn: _fn(a, b), family="compare")
_LOGIC = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}
for _name, _fn in _LOGIC.items():
    defop(_name, ["a", "b"], infer=_logic_infer, ref=lambda ctx, a, b, _fn=_fn: _fn(a, b), family="logic")


def _where_infer(cond, a, b):
    if cond.dtype != bool_:
        raise TypeError(f"where needs a bool condition, got {cond.dtype}")
    return TensorType(same_dtype(a, b), broadcast_shapes(cond.shape, a.shape, b.shape))


defop("where", ["cond", "a", "b"], infer=_where_infer, ref=lambda ctx, c, a, b: torch.where(c, a, b),
      family="select")

"""``dynamic_quant`` on ONNX Runtime (opset 21), as nnforge.ir.actquant computes it.

The row (or each block of ``group`` channels) is reshaped to ``[..., blocks, size]`` and its scale
computed from ``ReduceMax(Abs)`` in the interpreter's float32 order. int8, int4, E4M3 and MXFP8
then quantise in a blocked QuantizeLinear / DequantizeLinear pair (the scale one per block, as
opset 21 allows at run time); MXFP4 and NVFP4 round their E2M1 elements in elementwise ops, since
opset 21 has no 4-bit float type. E8M0 scales come from Log and a correction to the exact power of
two, E4M3 block scales from a saturating Cast to FLOAT8E4M3FN and back (round to nearest even).
Every result equals the interpreter's bit for bit (a float16 input's, its float32 result rounded).
"""
from __future__ import annotations

import math

from onnx import TensorProto

from ...ir.actquant import ACT_FORMATS, TINY, check
from ...ir.dtypes import dtype, float32
from ...ir.minifloat import max_exponent
from .builder import onnx_type
from .ops import operand, rule

# element (integer bits or minifloat) -> the type a blocked QuantizeLinear rounds to
_QDQ = {8: TensorProto.INT8, 4: TensorProto.INT4, "float8_e4m3fn": TensorProto.FLOAT8E4M3FN}
_SMALLEST_NORMAL = 2.0 ** -126


def _f(b, value) -> str:
    return b.scalar(value, float32)


def _qdq(b, groups: str, scale: str, size: int, element) -> str:
    """``groups`` ([..., blocks, size]) quantised to ``element`` with ``scale`` ([..., blocks, 1])
    and back: QuantizeLinear divides, rounds half to even and saturates, as the interpreter does."""
    q = b.node("QuantizeLinear", [groups, scale], axis=-1, block_size=size, output_dtype=_QDQ[element])
    return b.node("DequantizeLinear", [q, scale], axis=-1, block_size=size)


def _e8m0(b, amax: str, elem) -> str:
    """OCP MX's scale 2^(floor(log2 amax) - emax_elem), the exponent clamped to E8M0's [-127, 127]
    (minifloat.e8m0_exponent). Below the smallest normal float32 every amax gets 2^-127, as 0 does,
    so it is raised there first and Log stays finite."""
    a = b.node("Max", [amax, _f(b, _SMALLEST_NORMAL)])
    e = b.node("Floor", [b.node("Div", [b.node("Log", [a]), _f(b, math.log(2.0))])])
    # Log's rounding can leave e one off next to a power of two: exact powers put it right
    p = b.node("Pow", [_f(b, 2.0), e])
    down = b.node("Cast", [b.node("Greater", [p, a])], to=TensorProto.FLOAT)
    up = b.node("Cast", [b.node("LessOrEqual", [b.node("Mul", [p, _f(b, 2.0)]), a])], to=TensorProto.FLOAT)
    e = b.node("Sub", [b.node("Add", [b.node("Sub", [e, down]), up]), _f(b, max_exponent(elem))])
    return b.node("Pow", [_f(b, 2.0), b.node("Clip", [e, _f(b, -127.0), _f(b, 127.0)])])


def _e2m1(b, v: str) -> str:
    """``v`` rounded to the nearest E2M1 value, ties to even, saturating at 6: E2M1's values are
    evenly spaced between powers of two (steps of 0.5 below 2, 1 below 4, 2 up to 6), and within
    each run an even step count is an even code, so Round (half to even) of |v| / step is E2M1's."""
    a = b.node("Abs", [v])
    step = b.node("Where", [b.node("Less", [a, _f(b, 2.0)]), _f(b, 0.5),
                            b.node("Where", [b.node("Less", [a, _f(b, 4.0)]), _f(b, 1.0), _f(b, 2.0)])])
    r = b.node("Mul", [b.node("Round", [b.node("Div", [a, step])]), step])
    return b.node("Mul", [b.node("Min", [r, _f(b, 6.0)]), b.node("Sign", [v])])


def _e4m3(b, v: str) -> str:
    """``v`` rounded to E4M3 (nearest even, saturating at 448), back in float32."""
    return b.node("Cast", [b.node("Cast", [v], to=TensorProto.FLOAT8E4M3FN, saturate=1)], to=TensorProto.FLOAT)


def _nvfp4_scale(b, amax: str, peak: str, global_scale: float, elem) -> str:
    """NVFP4's block scales: ``amax / 6 / gs`` rounded to E4M3, times the tensor scale ``gs``
    (``global_scale``, or each row's largest ``peak`` / (6 * 448))."""
    if global_scale:
        gs = _f(b, global_scale)
    else:
        row = b.node("ReduceMax", [peak, b.ints([-2])], keepdims=1)
        gs = b.node("Max", [b.node("Div", [row, _f(b, elem.max_value * dtype("e4m3").max_value)]), _f(b, TINY)])
    return b.node("Mul", [_e4m3(b, b.node("Div", [b.node("Div", [amax, _f(b, elem.max_value)]), gs])), gs])


@rule("dynamic_quant")
def _dynamic_quant(b, node, fb):
    x = node.inputs[0]
    a = node.attrs
    size = check(a["format"], a["group"], a["clip"], a["global_scale"], x.shape[-1], node.name)
    kind, element, _, scale_kind = ACT_FORMATS[a["format"]]
    v = operand(b, x, fb)
    if x.dtype != float32:          # the interpreter quantises in float32
        v = b.node("Cast", [v], to=TensorProto.FLOAT)
    groups = b.node("Reshape", [v, b.ints([0] * (x.type.rank - 1) + [-1, size])])
    peak = b.node("ReduceMax", [b.node("Abs", [groups]), b.ints([-1])], keepdims=1)
    amax = peak if a["clip"] == 1.0 else b.node("Mul", [peak, _f(b, a["clip"])])
    if scale_kind == "float32":
        top = (1 << (element - 1)) - 1 if kind == "int" else dtype(element).max_value
        y = _qdq(b, groups, b.node("Max", [b.node("Div", [amax, _f(b, top)]), _f(b, TINY)]), size, element)
    elif element in _QDQ:           # mxfp8
        y = _qdq(b, groups, _e8m0(b, amax, dtype(element)), size, element)
    else:       # E2M1 elements; an NVFP4 block scale may round to 0, and its block to zeros
        scale = _e8m0(b, amax, dtype(element)) if scale_kind == "e8m0" else \
            _nvfp4_scale(b, amax, peak, a["global_scale"], dtype(element))
        positive = b.node("Greater", [scale, _f(b, 0.0)])
        safe = b.node("Where", [positive, scale, _f(b, 1.0)])
        q = b.node("Mul", [_e2m1(b, b.node("Div", [groups, safe])), safe])
        y = b.node("Where", [positive, q, _f(b, 0.0)])
    shaped = b.dims_1d(x.shape)
    if x.dtype == float32:
        b.node("Reshape", [y, shaped], node.outputs[0].name)
    else:
        b.node("Cast", [b.node("Reshape", [y, shaped])], node.outputs[0].name, to=onnx_type(x.dtype))

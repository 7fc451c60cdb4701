"""``dynamic_quant`` in Relax, as nnforge.ir.actquant computes it: the row (or each block of
``group`` channels) reshaped to ``[..., blocks, size]``, its scale from a max-of-abs reduction in
the interpreter's float32 order, then the elementwise rounding (Relax's round is half to even;
minifloat grids through kernels/minifloat_codes.round_value, exact). E8M0 scales are built from the
exponent field of the block's amax, so they are exact powers of two. Bit for bit the interpreter's.
"""
from __future__ import annotations

from ...ir.actquant import ACT_FORMATS, TINY, check
from ...ir.dtypes import dtype, float32
from ...ir.minifloat import max_exponent
from .ops import _minifloat_round, rule


def _e8m0_scale(emax: int):
    """A TE function: 2^(floor(log2 amax) - emax) for each (non-negative) amax, the exponent
    clamped to E8M0's [-127, 127] (minifloat.e8m0_exponent). A zero or subnormal amax has exponent
    field 0, so it clamps to 2^-127 as the interpreter's does."""
    from tvm import te, tirx

    def scale(*i, amax):
        field = tirx.shift_right(tirx.reinterpret("int32", amax(*i)), 23)
        e = tirx.max(tirx.min(field - 127 - emax, 127), -127)
        # a normal float32 from its exponent field; 2^-127 alone is subnormal
        return tirx.Select(e > -127, tirx.reinterpret("float32", tirx.shift_left(e + 127, 23)),
                           tirx.const(2.0 ** -127, "float32"))

    return lambda amax: te.compute(amax.shape, lambda *i: scale(*i, amax=amax), name="e8m0_scale")


@rule("dynamic_quant")
def _dynamic_quant(lw, node):
    from tvm import tirx
    from tvm.relax import op
    x = node.inputs[0]
    a = node.attrs
    size = check(a["format"], a["group"], a["clip"], a["global_scale"], x.shape[-1], node.name)
    kind, element, _, scale_kind = ACT_FORMATS[a["format"]]

    def f32(value):
        return lw.const(float(value), float32)

    def rounded(v, fmt):
        return lw.emit(lw.bb.call_te(_minifloat_round(dtype(fmt)), lw.emit(v)))

    xe = lw.arg(x)
    if x.dtype != float32:          # the interpreter quantises in float32
        xe = lw.emit(op.astype(xe, "float32"))
    groups = lw.emit(op.reshape(xe, lw.shape(x.shape[:-1]) + [tirx.floordiv(lw.dim(x.shape[-1]), size), size]))
    peak = lw.emit(op.max(op.abs(groups), axis=-1, keepdims=True))
    amax = peak if a["clip"] == 1.0 else lw.emit(op.multiply(peak, f32(a["clip"])))
    if kind == "int":
        top = (1 << (element - 1)) - 1
        scale = lw.emit(op.maximum(op.divide(amax, f32(top)), f32(TINY)))
        q = op.clip(op.round(op.divide(groups, scale)), float(-top - 1), float(top))
        y = op.multiply(lw.emit(q), scale)
    elif scale_kind == "float32":   # e4m3 per token or group
        scale = lw.emit(op.maximum(op.divide(amax, f32(dtype(element).max_value)), f32(TINY)))
        y = op.multiply(rounded(op.divide(groups, scale), element), scale)
    elif scale_kind == "e8m0":
        scale = lw.emit(lw.bb.call_te(_e8m0_scale(max_exponent(dtype(element))), amax))
        y = op.multiply(rounded(op.divide(groups, scale), element), scale)
    else:       # nvfp4: E4M3 block scales times a float32 tensor scale, static or each row's
        e2m1 = dtype(element).max_value
        if a["global_scale"]:
            gs = f32(a["global_scale"])
        else:
            row = op.max(peak, axis=-2, keepdims=True)
            gs = lw.emit(op.maximum(op.divide(row, f32(e2m1 * dtype("e4m3").max_value)), f32(TINY)))
        scale = lw.emit(op.multiply(rounded(op.divide(op.divide(amax, f32(e2m1)), gs), "e4m3"), gs))
        positive = lw.emit(op.greater(scale, f32(0.0)))         # a block scale may round to 0: its block is 0
        safe = lw.emit(op.where(positive, scale, f32(1.0)))
        q = op.multiply(rounded(op.divide(groups, safe), element), safe)
        y = op.where(positive, lw.emit(q), f32(0.0))
    y = op.reshape(lw.emit(y), lw.shape(x.shape))
    return y if x.dtype == float32 else op.astype(lw.emit(y), x.dtype.name)

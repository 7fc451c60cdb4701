"""``dynamic_quant`` as one TE computation, as nnforge.ir.actquant computes it: a max-of-abs
reduction per row (or block of ``group`` channels), the block's scale from it in the interpreter's
float32 order, then the elementwise rounding (``nearbyint``: half to even; minifloat grids through
kernels/minifloat_codes.round_value, exact). E8M0 scales are built from the exponent field of the
block's amax, so they are exact powers of two. Bit for bit the interpreter's.

The PrimFunc is opaque to FuseOps: fused with ops Relax legalises later, its symbolic shapes would
clash with the static ones of a copy of ``main`` specialised to fixed sizes (specialise.py).
"""
from __future__ import annotations

from ...ir.actquant import ACT_FORMATS, TINY, check
from ...ir.dtypes import dtype
from ...ir.minifloat import max_exponent
from .kernels.minifloat_codes import round_value
from .ops import rule


def _e8m0(amax, emax: int):
    """2^(floor(log2 amax) - emax) for a non-negative float32 ``amax``, the exponent clamped to
    E8M0's [-127, 127] (minifloat.e8m0_exponent). A zero or subnormal amax has exponent field 0,
    so it clamps to 2^-127 as the interpreter's does."""
    from tvm import tirx
    field = tirx.shift_right(tirx.reinterpret("int32", amax), 23)
    e = tirx.max(tirx.min(field - 127 - emax, 127), -127)
    # a normal float32 from its exponent field; 2^-127 alone is subnormal
    return tirx.Select(e > -127, tirx.reinterpret("float32", tirx.shift_left(e + 127, 23)),
                       tirx.const(2.0 ** -127, "float32"))


def _quantiser(fmt: str, size: int, clip: float, global_scale: float):
    """A TE function of ``x`` (float, ``[..., width]``): ``act_quantize(x, fmt, ...)`` in x's dtype."""
    from tvm import te, tirx
    kind, element, _, scale_kind = ACT_FORMATS[fmt]
    el = None if kind == "int" else dtype(element)

    def f32(v):
        return tirx.const(float(v), "float32")

    def fn(x):
        *lead, width = x.shape

        def value(*i):
            return x(*i) if x.dtype == "float32" else x(*i).astype("float32")
        k = te.reduce_axis((0, size), "k")
        peak = te.compute((*lead, tirx.floordiv(width, size)),
                          lambda *i: te.max(tirx.abs(value(*i[:-1], i[-1] * size + k)), axis=k), name="peak")
        if scale_kind == "e4m3" and not global_scale:       # nvfp4's tensor scale: each row's own
            j = te.reduce_axis((0, peak.shape[-1]), "j")
            row = te.compute(lead, lambda *i: te.max(peak(*i, j), axis=j), name="row_peak")
            top = f32(el.max_value * dtype("e4m3").max_value)      # a row peak maps to the top of both grids
            tensor_scale = te.compute(lead, lambda *i: tirx.max(row(*i) / top, f32(TINY)), name="tensor_scale")

        def block_scale(*i):
            amax = peak(*i) if clip == 1.0 else peak(*i) * f32(clip)
            if kind == "int":
                return tirx.max(amax / f32((1 << (element - 1)) - 1), f32(TINY))
            if scale_kind == "float32":
                return tirx.max(amax / f32(el.max_value), f32(TINY))
            if scale_kind == "e8m0":
                return _e8m0(amax, max_exponent(el))
            gs = f32(global_scale) if global_scale else tensor_scale(*i[:-1])
            return round_value(amax / f32(el.max_value) / gs, dtype("e4m3")) * gs
        scale = te.compute(peak.shape, block_scale, name="scale")

        def quantised(*i):
            s = scale(*i[:-1], tirx.floordiv(i[-1], size))
            if kind == "int":
                top = (1 << (element - 1)) - 1
                q = tirx.min(tirx.max(tirx.nearbyint(value(*i) / s), f32(-top - 1)), f32(top)) * s
            else:       # an NVFP4 block scale may round to 0: its block is then 0
                safe = tirx.Select(s > f32(0), s, f32(1))
                q = tirx.Select(s > f32(0), round_value(value(*i) / safe, el) * safe, f32(0))
            return q if x.dtype == "float32" else q.astype(x.dtype)
        return te.compute(x.shape, quantised, name="dynamic_quant")
    return fn


@rule("dynamic_quant")
def _dynamic_quant(lw, node):
    from .lower import OPAQUE
    x = node.inputs[0]
    a = node.attrs
    size = check(a["format"], a["group"], a["clip"], a["global_scale"], x.shape[-1], node.name)
    fn = _quantiser(a["format"], size, a["clip"], a["global_scale"])
    return lw.bb.call_te(fn, lw.arg(x), primfunc_name_hint="dynamic_quant", primfunc_attrs={"op_pattern": OPAQUE})

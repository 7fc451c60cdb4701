"""``dynamic_quant`` as one TE computation, as nnforge.ir.actquant computes it: a max-of-abs
reduction per row (or block of ``group`` channels), the block's scale from it in the interpreter's
float32 order, then the elementwise rounding (``nearbyint``: half to even; minifloat grids through
kernels/minifloat_codes.round_value, exact). E8M0 scales are built from the exponent field of the
block's amax, so they are exact powers of two. Bit for bit the interpreter's.

A per-token int8 / int4 node read only by integer linears (weights_intact.py) becomes its codes and
row scales instead (:func:`act_codes`, the same float32 operations).

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


def _f32(v):
    from tvm import tirx
    return tirx.const(float(v), "float32")


def _int_scale(amax, bits: int):
    """A block's scale on the ``bits``-bit integer grid: ``max(amax / (2^(b-1) - 1), TINY)``."""
    from tvm import tirx
    return tirx.max(amax / _f32((1 << (bits - 1)) - 1), _f32(TINY))


def _int_code(v, scale, bits: int):
    """``v``'s code on that grid as a float32: ``clamp(round_half_even(v / scale))``."""
    from tvm import tirx
    top = (1 << (bits - 1)) - 1
    return tirx.min(tirx.max(tirx.nearbyint(v / scale), _f32(-top - 1)), _f32(top))


def act_codes(fmt: str, clip: float):
    """A TE function of ``x`` (float32 ``[rows, width]``): the per-token int8 / int4 ``dynamic_quant``
    of ``x`` as [int8 codes ``[rows, width]``, float32 scale ``[rows]``], with :func:`_quantiser`'s
    float32 operations, so ``codes * scale`` is bit for bit the node's output (the integer linears
    of weights_intact.py read them)."""
    from tvm import te, tirx
    bits = ACT_FORMATS[fmt][1]

    def fn(x):
        rows, width = x.shape
        k = te.reduce_axis((0, width), "k")
        peak = te.compute((rows,), lambda i: te.max(tirx.abs(x[i, k]), axis=k), name="peak")
        scale = te.compute((rows,), lambda i: _int_scale(peak[i] if clip == 1.0 else peak[i] * _f32(clip), bits),
                           name="scale")
        codes = te.compute(x.shape, lambda i, j: _int_code(x[i, j], scale[i], bits).astype("int8"), name="codes")
        return [codes, scale]
    return fn


def _quantiser(fmt: str, size: int, clip: float, global_scale: float):
    """A TE function of ``x`` (float, ``[..., width]``): ``act_quantize(x, fmt, ...)`` in x's dtype."""
    from tvm import te, tirx
    kind, element, _, scale_kind = ACT_FORMATS[fmt]
    el = None if kind == "int" else dtype(element)
    f32 = _f32

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
                return _int_scale(amax, element)
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
                q = _int_code(value(*i), s, element) * s
            else:       # an NVFP4 block scale may round to 0: its block is then 0
                safe = tirx.Select(s > f32(0), s, f32(1))
                q = tirx.Select(s > f32(0), round_value(value(*i) / safe, el) * safe, f32(0))
            return q if x.dtype == "float32" else q.astype(x.dtype)
        return te.compute(x.shape, quantised, name="dynamic_quant")
    return fn


@rule("dynamic_quant")
def _dynamic_quant(lw, node):
    from .lower import OPAQUE
    from .weights_intact import act_quantizers, int_act_codes
    if node.name in act_quantizers(lw):     # read only by integer linears: codes and row scales
        return int_act_codes(lw, node)
    x = node.inputs[0]
    a = node.attrs
    size = check(a["format"], a["group"], a["clip"], a["global_scale"], x.shape[-1], node.name)
    fn = _quantiser(a["format"], size, a["clip"], a["global_scale"])
    return lw.bb.call_te(fn, lw.arg(x), primfunc_name_hint="dynamic_quant", primfunc_attrs={"op_pattern": OPAQUE})

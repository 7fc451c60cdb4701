"""Per-op lowering rules IR -> Relax, one small function per op, in ``LOWERINGS`` (as every backend).

Each rule gets the :class:`~.lower.Lowering` and the node and returns the Relax expression of the
node's (single) output; the lowering emits it and checks its dtype against the IR. Weights are
read through ``lw.arg`` (dense parameters); a layer op's weight after asking the capability
table (``lw.native``): linear layers through the kernels of weights.py, the others through
``lw.layer_weight``.
"""
from __future__ import annotations

from ...ir import Value, symbolic as sym
from ...ir.dtypes import DType, int32
from ...ir.ops.registry import broadcast_shapes
from ...registry import Registry
from ..base import BackendError
from . import threads
from .weight_arrays import _jsonable, c_name
from .weights import fusable_siblings, fused_linear_kernel, int8_bsr_kernel, linear_kernel
from .weights_intact import act_linears, int_act_linear

LOWERINGS = Registry("tvm lowering")
rule = LOWERINGS.register


# --- elementwise ----------------------------------------------------------------------------------
def _op(path: str):
    """A relax.op function by dotted path (looked up when a rule runs: tvm is imported lazily)."""
    def get():
        from tvm.relax import op
        obj = op
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj
    return get


_UNARY = {"exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "sigmoid": "sigmoid", "tanh": "tanh",
          "sin": "sin", "cos": "cos", "floor": "floor", "ceil": "ceil", "neg": "negative",
          "abs": "abs", "relu": "nn.relu", "silu": "nn.silu", "not": "logical_not"}


@rule(*_UNARY)
def _unary(lw, node):
    return _op(_UNARY[node.op])()(lw.arg(node.inputs[0]))


@rule("reciprocal")
def _reciprocal(lw, node):
    from tvm.relax import op
    x = node.inputs[0]
    return op.divide(lw.const(1.0, x.dtype), lw.arg(x))


@rule("hardswish", "hardsigmoid")
def _hard(lw, node):
    from tvm.relax import op
    x = node.inputs[0]
    xe = lw.arg(x)
    # torch: relu6(x + 3) / 6, times x for hardswish
    r6 = op.clip(op.add(xe, lw.const(3.0, x.dtype)), 0.0, 6.0)
    y = op.divide(lw.emit(r6), lw.const(6.0, x.dtype))
    return op.multiply(xe, lw.emit(y)) if node.op == "hardswish" else y


def _fast_erf(x):
    """erf through topi's rational approximation (float32 error ~1e-7): TIR's erf becomes a
    scalar libm call per element on x86, far slower than this vectorised polynomial. Other
    float types go through float32 (LLVM has no erf for them)."""
    from tvm import topi
    if x.dtype == "float32":
        return topi.fast_erf(x)
    return topi.cast(topi.fast_erf(topi.cast(x, "float32")), x.dtype)


@rule("erf")
def _erf(lw, node):
    return lw.bb.call_te(_fast_erf, lw.arg(node.inputs[0]))


@rule("gelu")
def _gelu(lw, node):
    from tvm import te
    from tvm.relax import op
    x = lw.arg(node.inputs[0])
    if node.attrs["approximate"] == "tanh":
        return op.nn.gelu_tanh(x)

    def gelu(t):        # x * (1/2 + erf(x / sqrt 2) / 2), as torch's exact form
        half = te.const(0.5, t.dtype)
        e = _fast_erf(te.compute(t.shape, lambda *i: t(*i) * te.const(0.7071067811865476, t.dtype)))
        return te.compute(t.shape, lambda *i: t(*i) * (half + e(*i) * half), name="gelu")
    return lw.bb.call_te(gelu, x)


@rule("leaky_relu")
def _leaky_relu(lw, node):
    from tvm.relax import op
    return op.nn.leakyrelu(lw.arg(node.inputs[0]), node.attrs["negative_slope"])


@rule("clamp")
def _clamp(lw, node):
    from tvm.relax import op
    x = node.inputs[0]
    y = lw.arg(x)
    lo, hi = node.attrs["min"], node.attrs["max"]
    if lo is not None:
        y = lw.emit(op.maximum(y, lw.const(lo, x.dtype)))
    if hi is not None:
        y = lw.emit(op.minimum(y, lw.const(hi, x.dtype)))
    return y


@rule("cast")
def _cast(lw, node):
    from tvm.relax import op
    x = node.inputs[0]
    to = node.attrs["dtype"]
    if to.name == "bool" and x.dtype.name != "bool":     # torch: nonzero is true
        return op.not_equal(lw.arg(x), lw.const(0, x.dtype))
    return op.astype(lw.arg(x), to.name)


_BINARY = {"add": "add", "sub": "subtract", "mul": "multiply", "pow": "power", "maximum": "maximum",
           "minimum": "minimum", "eq": "equal", "ne": "not_equal", "lt": "less", "le": "less_equal",
           "gt": "greater", "ge": "greater_equal", "and": "logical_and", "or": "logical_or", "xor": "logical_xor"}
# On bools torch's add is a logical or, its mul a logical and.
_BOOL = {"add": "logical_or", "mul": "logical_and"}


@rule(*_BINARY)
def _binary(lw, node):
    a, b = node.inputs
    if node.op == "pow" and not a.dtype.is_float:
        # TIR's power takes floats only: integer powers through float64 (exact while the result
        # fits its 53 bits), rounded back
        from tvm.relax import op
        p = op.power(lw.emit(op.astype(lw.arg(a), "float64")), lw.emit(op.astype(lw.arg(b), "float64")))
        return op.astype(lw.emit(op.round(lw.emit(p))), a.dtype.name)
    name = _BOOL.get(node.op) if a.dtype.name == "bool" and node.op in _BOOL else _BINARY[node.op]
    return _op(name)()(lw.arg(a), lw.arg(b))


@rule("div")
def _div(lw, node):
    from tvm.relax import op
    a, b = (lw.arg(v) for v in node.inputs)
    if not node.inputs[0].dtype.is_float:         # IR div is true division: ints give float32
        a, b = lw.emit(op.astype(a, "float32")), lw.emit(op.astype(b, "float32"))
    return op.divide(a, b)


@rule("where")
def _where(lw, node):
    from tvm.relax import op
    return op.where(*(lw.arg(v) for v in node.inputs))


# --- layers with weights --------------------------------------------------------------------------
def _flatten_rows(lw, x: Value):
    """(x as [rows, K], rows as a PrimExpr)."""
    from tvm.relax import op
    xe = lw.arg(x)
    if x.type.rank == 2:
        return xe, lw.dim(x.shape[0])
    rows = lw.dim(sym.prod(x.shape[:-1]))
    return lw.emit(op.reshape(xe, [rows, lw.dim(x.shape[-1])])), rows


def _dense_call(lw, gv, x2, rows, args: list, n: int, name: str):
    from tvm import relax
    return lw.emit(relax.call_tir(gv, [x2, *args], relax.TensorType([rows, lw.dim(n)], "float32")), name)


@rule("linear")
def _linear(lw, node):
    from tvm.relax import op
    x, w, bias = (list(node.inputs) + [None])[:3]
    out = node.outputs[0]
    if not w.is_weight:        # a computed weight
        return op.linear(lw.arg(x), lw.arg(w), lw.arg(bias))
    if node.name in act_linears(lw):    # int8 codes of a per-token dynamic_quant x int codes
        return int_act_linear(lw, node)
    cap, why = lw.native(node.op, w)
    kernel = cap.accepts if cap is not None else None         # a capabilities.Kernel, or None: dense GEMM
    if x.dtype.name != "float32":       # fp16 graphs: Relax linear (no kernel row takes their weights)
        return op.linear(lw.arg(x), lw.weight(w, why), lw.arg(bias))
    int8 = int8_bsr_kernel(lw, w, x, kernel) if kernel is not None and kernel.module == "bsr_int8" else None
    if int8 is not None:       # u8 x s8 SpMM: the kernel quantises the fake_quant's input itself
        gv, consts, n, src = int8
        x2, rows = _flatten_rows(lw, src)
        y = _dense_call(lw, gv, x2, rows, consts, n, node.name)
        if bias is not None:
            y = lw.emit(op.add(y, lw.arg(bias)))
        return lw.emit(op.reshape(y, lw.shape(out.shape))) if x.type.rank != 2 else y
    if node.name in lw.fused:  # made with a sibling's call
        return lw.fused.pop(node.name)
    group = fusable_siblings(lw, node, kernel)
    if len(group) > 1:
        return _stacked_linears(lw, group, kernel)[node.name]
    gv, consts, n, perm, fused_bias = linear_kernel(lw, w, kernel, why, node.name, sym.prod(x.shape[:-1]))
    x2, rows = _flatten_rows(lw, x)
    if perm is not None:       # act-order: the kernel's columns are in stored order
        x2 = lw.emit(op.take(x2, perm, axis=1))
    if fused_bias:             # the dense kernel adds the bias as it stores
        y = _dense_call(lw, gv, x2, rows, consts + [lw.arg(bias) if bias is not None else lw.zeros(n)], n, node.name)
    else:
        y = _dense_call(lw, gv, x2, rows, consts, n, node.name)
        if bias is not None:
            y = lw.emit(op.add(y, lw.arg(bias)))
    if x.type.rank != 2:
        y = lw.emit(op.reshape(y, lw.shape(out.shape)))
    return y


def _stacked_linears(lw, group: list, kernel) -> dict:
    """The outputs of the linear layers ``group`` (one input, :func:`fusable_siblings`) from one
    call of the lowbit kernel over their stacked weights, each sliced off its rows (and its bias
    added); the layers after the first take theirs from ``lw.fused``."""
    from tvm.relax import op
    x = group[0].inputs[0]
    gv, consts, sizes, perm = fused_linear_kernel(lw, [n.inputs[1] for n in group], kernel)
    x2, rows = _flatten_rows(lw, x)
    if perm is not None:       # act-order, one for every weight of the stack
        x2 = lw.emit(op.take(x2, perm, axis=1))
    y = _dense_call(lw, gv, x2, rows, consts, sum(sizes), f"{group[0].name}.stacked")
    outs, start = {}, 0
    for n, size in zip(group, sizes):
        part = lw.emit(op.strided_slice(y, axes=[1], begin=[start], end=[start + size]), n.name)
        start += size
        bias = n.inputs[2] if len(n.inputs) > 2 else None
        if bias is not None:
            part = lw.emit(op.add(part, lw.arg(bias)))
        outs[n.name] = lw.emit(op.reshape(part, lw.shape(n.outputs[0].shape))) if x.type.rank != 2 else part
    lw.fused.update({name: out for name, out in outs.items() if name != group[0].name})
    return outs


@rule("matmul")
def _matmul(lw, node):
    from tvm.relax import op
    from .kernels.dense import batch_matmul
    a, b = node.inputs
    out = node.outputs[0]
    fp32 = a.dtype.name == "float32"
    if fp32 and b.is_weight and b.type.rank == 2:
        # x @ W with a [K, N] weight: the dense kernel on W's panels, packed from [K, N] at load
        k, n = b.shape
        lw.layer_weight(node.op, b)
        kernel = lw.dense_kernel(n, k)
        lw.kernel_notes[b.name] = {"function": kernel.name, **_jsonable(kernel.notes)}
        x2, rows = _flatten_rows(lw, a)
        y = _dense_call(lw, lw.func(kernel.name, kernel.func), x2, rows, [lw.panels(b, transposed=True), lw.zeros(n)],
                        n, node.name)
        return op.reshape(y, lw.shape(out.shape)) if a.type.rank != 2 else y
    same_batch = a.type.rank == b.type.rank and all(sym.equal(p, q) for p, q in zip(a.shape[:-2], b.shape[:-2]))
    if fp32 and not b.is_weight and same_batch:
        batch = sym.prod(a.shape[:-2])
        k, n = a.shape[-1], b.shape[-1]
        a3 = lw.emit(op.reshape(lw.arg(a), lw.shape([batch, a.shape[-2], k])))
        b3 = lw.emit(op.reshape(lw.arg(b), lw.shape([batch, k, n])))
        kernel = batch_matmul("nf_bmm", k if isinstance(k, int) else None, n if isinstance(n, int) else None,
                              lw.target)
        name = c_name(f"nf_bmm_k{k if isinstance(k, int) else 'dyn'}_n{n if isinstance(n, int) else 'dyn'}")
        y = lw.call_kernel(name, kernel.func, [a3, b3], lw.shape([batch, a.shape[-2], n]))
        return op.reshape(y, lw.shape(out.shape))
    return op.matmul(lw.arg(a), lw.layer_weight(node.op, b) if b.is_weight else lw.arg(b))




def _hadamard_product(lw, x2, rows, size: int, name: str):
    """``x2 @ hadamard_matrix(size)`` for ``x2`` float32 ``[rows, size]`` on the dense kernel."""
    from ...ir.hadamard import hadamard_matrix
    kernel = lw.dense_kernel(size, size)
    panels = lw.matrix_panels(f"hadamard{size}", hadamard_matrix(size).numpy())
    return _dense_call(lw, lw.func(kernel.name, kernel.func), x2, rows, [panels, lw.zeros(size)], size, name)


@rule("hadamard")
def _hadamard(lw, node):
    from tvm.relax import op
    from ...ir.hadamard import hadamard_matrix, hadamard_split
    x = node.inputs[0]
    block, dt = node.attrs["block"], x.dtype.name
    groups = lw.dim(sym.prod(x.shape[:-1])) * (x.shape[-1] // block)
    xe = lw.arg(x)
    if dt == "float64":        # the dense kernel is float32: one Relax product a block
        h = lw.relax.const(hadamard_matrix(block).numpy(), "float64")
        return op.reshape(lw.emit(op.matmul(lw.emit(op.reshape(xe, [groups, block])), h)), lw.shape(x.shape))
    if dt != "float32":        # computed in float32, as the reference kernel does
        xe = lw.emit(op.astype(xe, "float32"))
    c = hadamard_split(block)
    a = block // c
    y = _hadamard_product(lw, lw.emit(op.reshape(xe, [groups * a, c])), groups * a, c, node.name)
    if a > 1:                  # H_a^T X_g is (X_g^T H_a)^T: the small factor on the transposed groups
        t = lw.emit(op.reshape(op.permute_dims(op.reshape(y, [groups, a, c]), [0, 2, 1]), [groups * c, a]))
        t = _hadamard_product(lw, t, groups * c, a, node.name)
        y = lw.emit(op.permute_dims(op.reshape(t, [groups, c, a]), [0, 2, 1]))
    y = op.reshape(y, lw.shape(x.shape))
    return y if dt == "float32" else op.astype(lw.emit(y), dt)


_CONV = {1: "conv1d", 2: "conv2d", 3: "conv3d"}


@rule("conv")
def _conv(lw, node):
    from tvm.relax import op
    x, w, bias = (list(node.inputs) + [None])[:3]
    a = node.attrs
    nd = w.type.rank - 2
    y = lw.emit(getattr(op.nn, _CONV[nd])(lw.arg(x), lw.layer_weight(node.op, w) if w.is_weight else lw.arg(w),
                                         strides=a["stride"], padding=a["padding"],
                                         dilation=a["dilation"], groups=a["groups"]))
    if bias is None:
        return y
    return op.add(y, lw.emit(op.reshape(lw.arg(bias), [w.shape[0]] + [1] * nd)))


@rule("embedding")
def _embedding(lw, node):
    from tvm.relax import op
    from .capabilities import LOWBIT, MINIFLOAT
    from .weights import embedding_rows
    idx, table = node.inputs
    linear = {"int": LOWBIT, "minifloat": MINIFLOAT}.get(table.encoding.kind) if table.is_weight else None
    if linear is not None and lw.native(node.op, table)[0] is not None:
        return embedding_rows(lw, table, idx, linear)
    # "clip": an out-of-range token id reads the last row instead of memory past the table
    return op.take(lw.layer_weight(node.op, table) if table.is_weight else lw.arg(table), lw.arg(idx), axis=0,
                   mode="clip")


# --- decoder ops (float32; the tvm backend's prepare writes out the others, see __init__.py) --------
@rule("cache_update")
def _cache_update(lw, node):
    from tvm.relax import op
    from .kernels.decoder import cache_update_func
    from .kernels.dense import vector_lanes
    cache, new, positions = node.inputs
    _, kvh, max_len, d = cache.shape
    c = lw.arg(cache)
    if not lw.only_reader(cache, node):     # another reader still needs the cache as it was
        c = lw.emit(op.add(c, op.zeros_like(c)), f"{node.name}.copy")
    gv = lw.func(f"nf_cache_update_{kvh}x{max_len}x{d}", cache_update_func(kvh, max_len, d, vector_lanes(lw.target)))
    return lw.relax.call_tir_inplace(gv, [c, lw.arg(new), lw.arg(positions)], [0],
                                     lw.relax.TensorType(lw.shape(cache.shape), "float32"))


@rule("attention")
def _attention(lw, node):
    from .kernels.decoder import attention_func
    from .kernels.dense import vector_lanes
    from .ops_kvcache import fused_attention
    fused = fused_attention(lw, node)          # K and V read from an encoded state
    if fused is not None:
        return fused
    q, k, v, positions = node.inputs
    _, h, _, d = q.shape
    kvh, max_len = k.shape[1], k.shape[2]
    a = node.attrs
    name = c_name(f"nf_attention_{h}x{kvh}x{max_len}x{d}_w{a['window']}_c{a['softcap']:g}_s{a['scale']:.9g}")
    # the threads of this process's pool, as the encoded caches' kernels take them (ops_kvcache)
    func = attention_func(h, kvh, max_len, d, float(a["scale"]), int(a["window"]), float(a["softcap"]),
                          vector_lanes(lw.target), threads.most())
    return lw.relax.call_tir(lw.func(name, func), [lw.arg(q), lw.arg(k), lw.arg(v), lw.arg(positions)],
                             lw.relax.TensorType(lw.shape(q.shape), "float32"))


NEVER_SWITCH = 2 ** 62        # rope's switch_at for an op without a long table


def _as(lw, v, dtype: str):
    """``v`` as the dtype a decoder kernel takes (int32 positions, a bf16 norm weight)."""
    from tvm.relax import op
    return lw.arg(v) if v.dtype.name == dtype else op.astype(lw.arg(v), dtype)


@rule("rope")
def _rope(lw, node):
    from .kernels.decoder import rope_func
    x, positions, inv_freq = node.inputs[:3]
    long = node.inputs[3] if len(node.inputs) > 3 else None
    _, h, _, d = x.shape
    a = node.attrs
    rotated = a["rotary_dim"] or d
    switch_at = int(a["switch_at"]) if long is not None else NEVER_SWITCH
    name = c_name(f"nf_rope_{h}x{d}_r{rotated}_{a['style']}_s{a['scale']:.9g}"
                  + (f"_long{switch_at}" if long is not None else ""))
    freqs = _as(lw, inv_freq, "float32")
    args = [lw.arg(x), _as(lw, positions, "int64"), freqs, _as(lw, long, "float32") if long is not None else freqs]
    return lw.relax.call_tir(lw.func(name, rope_func(h, d, rotated, a["style"], float(a["scale"]), switch_at)),
                             args, lw.relax.TensorType(lw.shape(x.shape), "float32"))


@rule("rms_norm")
def _rms_norm(lw, node):
    from tvm.relax import op
    from .kernels.decoder import rms_norm_func
    from .kernels.dense import vector_lanes
    x = node.inputs[0]
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    d = x.shape[-1]
    a = node.attrs
    rows = lw.shape([sym.prod(x.shape[:-1]), d])
    offset = float(a["offset"]) if weight is not None else 1.0     # no weight: zeros + 1 scale by exactly one
    name = c_name(f"nf_rms_norm_{d}_e{a['eps']:.9g}_o{offset:g}")
    func = rms_norm_func(d, float(a["eps"]), offset, vector_lanes(lw.target))
    x2 = lw.emit(op.reshape(lw.arg(x), rows))
    y = lw.call_kernel(name, func, [x2, _as(lw, weight, "float32") if weight is not None else lw.zeros(d)], rows)
    return op.reshape(y, lw.shape(x.shape))


# --- normalisation, softmax, pooling -----------------------------------------------------------
@rule("softmax", "log_softmax")
def _softmax(lw, node):
    from tvm.relax import op
    from .kernels.dense import softmax_func, vector_lanes
    x = node.inputs[0]
    if node.op == "softmax" and x.dtype.name == "float32" and node.attrs["axis"] % x.type.rank == x.type.rank - 1:
        # over the last axis (attention): the scheduled row-softmax kernel
        n = x.shape[-1]
        rows = sym.prod(x.shape[:-1])
        x2 = lw.emit(op.reshape(lw.arg(x), lw.shape([rows, n])))
        y = lw.call_kernel("nf_softmax", softmax_func(vector_lanes(lw.target)),
                           [x2, lw.relax.prim_value(lw.dim(n))], lw.shape([rows, n]))
        return op.reshape(y, lw.shape(x.shape))
    fn = op.nn.softmax if node.op == "softmax" else op.nn.log_softmax
    return fn(lw.arg(x), axis=node.attrs["axis"])


@rule("layer_norm")
def _layer_norm(lw, node):
    from tvm.relax import op
    x, w, bias = (list(node.inputs) + [None, None])[:3]
    axis = node.attrs["axis"] % x.type.rank
    norm_shape = lw.shape(x.shape[axis:])
    gamma = lw.arg(w) if w is not None else lw.emit(op.ones(norm_shape, x.dtype.name))
    beta = lw.arg(bias) if bias is not None else lw.emit(op.zeros(norm_shape, x.dtype.name))
    return op.nn.layer_norm(lw.arg(x), gamma, beta, axes=list(range(axis, x.type.rank)), epsilon=node.attrs["eps"])


@rule("batch_norm")
def _batch_norm(lw, node):
    from tvm.relax import op
    x, mean, var, w, bias = (list(node.inputs) + [None, None])[:5]
    per_channel = [x.shape[1]] + [1] * (x.type.rank - 2)

    def channel(v):
        return lw.emit(op.reshape(lw.arg(v), lw.shape(per_channel)))
    y = op.multiply(op.subtract(lw.arg(x), channel(mean)),
                    op.rsqrt(op.add(channel(var), lw.const(node.attrs["eps"], x.dtype))))
    y = lw.emit(y)
    if w is not None:
        y = lw.emit(op.multiply(y, channel(w)))
    return op.add(y, channel(bias)) if bias is not None else y


_POOL = {1: "1d", 2: "2d", 3: "3d"}


@rule("max_pool", "avg_pool")
def _pool(lw, node):
    from tvm.relax import op
    a = node.attrs
    nd = len(a["kernel"])
    common = dict(pool_size=a["kernel"], strides=a["stride"], padding=a["padding"], ceil_mode=a["ceil_mode"],
                  layout={1: "NCW", 2: "NCHW", 3: "NCDHW"}[nd])
    if node.op == "max_pool":
        return getattr(op.nn, f"max_pool{_POOL[nd]}")(lw.arg(node.inputs[0]), dilation=a["dilation"], **common)
    return getattr(op.nn, f"avg_pool{_POOL[nd]}")(lw.arg(node.inputs[0]), count_include_pad=a["count_include_pad"],
                                                  **common)


@rule("adaptive_avg_pool")
def _adaptive(lw, node):
    from tvm.relax import op
    size = node.attrs["output_size"]
    nd = len(size)
    return getattr(op.nn, f"adaptive_avg_pool{_POOL[nd]}")(lw.arg(node.inputs[0]), output_size=size,
                                                           layout={1: "NCW", 2: "NCHW", 3: "NCDHW"}[nd])


# --- reductions ---------------------------------------------------------------------------------
_REDUCE = {"reduce_sum": "sum", "reduce_mean": "mean", "reduce_max": "max", "reduce_min": "min",
           "reduce_prod": "prod"}


@rule(*_REDUCE)
def _reduce(lw, node):
    from tvm.relax import op
    x = node.inputs[0]
    fn = _op(_REDUCE[node.op])()
    if x.dtype.name == "bool":      # TIR has no max/min value for bool: reduce int32 (a sum counts), then != 0
        red = fn(lw.emit(op.astype(lw.arg(x), "int32")), axis=node.attrs["axes"], keepdims=node.attrs["keepdim"])
        return op.not_equal(lw.emit(red), lw.const(0, int32))
    return fn(lw.arg(x), axis=node.attrs["axes"], keepdims=node.attrs["keepdim"])


@rule("reduce_any", "reduce_all")
def _any_all(lw, node):
    from tvm.relax import op
    as_int = lw.emit(op.astype(lw.arg(node.inputs[0]), "int8"))
    red = (op.max if node.op == "reduce_any" else op.min)(as_int, axis=node.attrs["axes"], keepdims=node.attrs["keepdim"])
    return op.astype(lw.emit(red), "bool")


@rule("argmax")
def _argmax(lw, node):
    from tvm.relax import op
    return op.argmax(lw.arg(node.inputs[0]), axis=node.attrs["axis"], keepdims=node.attrs["keepdim"])


@rule("cumsum")
def _cumsum(lw, node):
    from tvm.relax import op
    x = node.inputs[0]
    return op.cumsum(lw.arg(x), axis=node.attrs["axis"] % x.type.rank, dtype=x.dtype.name)


# --- shapes -------------------------------------------------------------------------------------
@rule("reshape")
def _reshape(lw, node):
    from tvm.relax import op
    return op.reshape(lw.arg(node.inputs[0]), lw.shape(node.outputs[0].shape))


@rule("permute")
def _permute(lw, node):
    from tvm.relax import op
    return op.permute_dims(lw.arg(node.inputs[0]), node.attrs["perm"])


@rule("expand")
def _expand(lw, node):
    from tvm.relax import op
    return op.broadcast_to(lw.arg(node.inputs[0]), lw.shape(node.outputs[0].shape))


@rule("slice")
def _slice(lw, node):
    from tvm.relax import op
    x = node.inputs[0]
    a = node.attrs
    return op.strided_slice(lw.arg(x), axes=[a["axis"] % x.type.rank], begin=[lw.dim(a["start"])],
                            end=[lw.dim(a["end"])], strides=[a["step"]], assume_inbound=True)


@rule("concat")
def _concat(lw, node):
    from tvm.relax import op
    return op.concat([lw.arg(v) for v in node.inputs], axis=node.attrs["axis"])


@rule("gather")
def _gather(lw, node):
    from tvm.relax import op
    x, idx = node.inputs
    # "wrap" takes indices modulo the axis size: negative indices count from the end, as in the IR.
    return op.take(lw.arg(x), lw.arg(idx), axis=node.attrs["axis"] % x.type.rank, mode="wrap")


@rule("gather_elements")
def _gather_elements(lw, node):
    from tvm.relax import op
    x, idx = node.inputs
    return op.gather_elements(lw.arg(x), lw.arg(idx), axis=node.attrs["axis"] % x.type.rank)


@rule("index")
def _index(lw, node):
    from tvm.relax import op
    x, *idx = node.inputs
    if len(idx) == 1:
        # x[i] is a take along axis 0; index_tensor fused after an elementwise producer of its
        # indices fails TVM's FuseTIR ("global_name != fused")
        return op.take(lw.arg(x), lw.arg(idx[0]), axis=0, mode="wrap")
    return op.index_tensor(lw.arg(x), [lw.arg(i) for i in idx])


@rule("index_put")
def _index_put(lw, node):
    from tvm.relax import op
    x, values, *idx = node.inputs
    where = broadcast_shapes(*(i.shape for i in idx))
    # scatter_nd takes the index tensors broadcast and stacked on a last axis, as ONNX ScatterND
    parts = [op.expand_dims(op.broadcast_to(op.astype(lw.arg(i), "int64"), lw.shape(where)), -1) for i in idx]
    stacked = parts[0] if len(parts) == 1 else op.concat(parts, axis=-1)
    updates = op.broadcast_to(lw.arg(values), lw.shape(tuple(where) + tuple(x.shape[len(idx):])))
    return op.scatter_nd(lw.arg(x), stacked, updates, reduction="add" if node.attrs["accumulate"] else "update")


@rule("topk_indices")
def _topk_indices(lw, node):
    from tvm.relax import op
    x, k, axis = node.inputs[0], node.attrs["k"], node.attrs["axis"] % node.inputs[0].type.rank
    if sym.equal(k, x.shape[axis]):
        k = 0                                   # relax's topk takes k < 1 for "all": an argsort
    if not isinstance(k, int):
        raise BackendError(f"node {node.name} (topk_indices): k = {k} is symbolic and not the whole axis; "
                           "the tvm backend needs it fixed: compile with static shapes")
    return op.topk(lw.arg(x), k=k, axis=axis, ret_type="indices", largest=node.attrs["largest"], dtype="int64")


@rule("pad")
def _pad(lw, node):
    from tvm.relax import op
    x = node.inputs[0]
    pads = node.attrs["pads"]
    r = x.type.rank
    width = [p for i in range(r) for p in (pads[i], pads[r + i])]
    return op.nn.pad(lw.arg(x), width, "constant", float(node.attrs["value"]))


# --- creation -----------------------------------------------------------------------------------
@rule("arange")
def _arange(lw, node):
    from tvm.relax import op
    a = node.attrs
    return op.arange(lw.dim(a["start"]), lw.dim(a["end"]), a["step"], dtype=a["dtype"].name)


@rule("full")
def _full(lw, node):
    from tvm.relax import op
    a = node.attrs
    return op.full(lw.shape(a["shape"]), lw.const(a["value"], a["dtype"]), a["dtype"].name)


# --- activation quantisation --------------------------------------------------------------------
@rule("fake_quant")
def _fake_quant(lw, node):
    from tvm.relax import op
    x = node.inputs[0]
    a = node.attrs
    fmt = a["format"]
    scale = lw.const(a["scale"], x.dtype)
    v = lw.emit(op.divide(lw.arg(x), scale))
    if fmt.is_integer:
        lo, hi = fmt.int_range
        zp = lw.const(float(a["zero_point"]), x.dtype)
        q = lw.emit(op.clip(op.add(op.round(v), zp), float(lo), float(hi)))   # round: half to even
        y = lw.emit(op.multiply(op.subtract(q, zp), scale))
        return op.where(op.isnan(v), v, y)        # clip would turn NaN into a bound; torch keeps it
    if x.dtype.name != "float32":       # the rounding reads float32 bits: round there, come back
        r = lw.emit(lw.bb.call_te(_minifloat_round(fmt), lw.emit(op.astype(v, "float32"))))
        return op.multiply(lw.emit(op.astype(r, x.dtype.name)), scale)
    return op.multiply(lw.emit(lw.bb.call_te(_minifloat_round(fmt), v)), scale)


def _minifloat_round(fmt: DType):
    """A TE function rounding fp32 values to the nearest ``fmt`` value (kernels/minifloat_codes.py)."""
    from tvm import te
    from .kernels.minifloat_codes import round_value

    def fn(x):
        return te.compute(x.shape, lambda *i: round_value(x(*i), fmt), name="minifloat_round")
    return fn


from . import ops_kvcache  # noqa: E402,F401  (registers the encoded KV-cache rules)
from . import ops_actquant  # noqa: E402,F401  (registers dynamic_quant)

__all__ = ["LOWERINGS", "rule"]

"""Per-op proposers: inputs and attributes together, for ops whose inputs must be shaped to
each other (a linear's weight to its input, a conv's weight to its channels and groups, a
concat's operands along one axis, indices within the axis they index). ``PROPOSERS[op](gen)``
returns ``(inputs, attrs)`` or None; the op's ``infer`` still has the last word."""
from __future__ import annotations

import math

from ..ir import symbolic as sym
from ..ir.ops.quant import FAKE_QUANT_FORMATS
from .input_dist import SYMBOL, InputDist
from .proposals import (PROPOSERS, bool_operand, broadcast_variant, broadcastable, cast_dtype, fill_attrs, is_float,
                        static_axes, weight_leaf)

proposer = PROPOSERS.register


@proposer("linear")
def _linear(gen):
    rng = gen.rng
    x = gen.pick(lambda v: is_float(v) and v.type.rank >= 1 and isinstance(v.shape[-1], int))
    if x is None:
        return None
    k = x.shape[-1]
    n = rng.choice([1, 2, 3, 4, 8, 8, 12, 16, 16, 32, 64])
    r = rng.random()
    w = None
    if r < 0.1:         # a weight shared with another layer
        w = gen.pick(lambda v: v.is_weight and v.type.rank == 2 and v.shape[1] == k and v.dtype == x.dtype)
    if w is None:
        w = weight_leaf(gen, [n, k], k, "fc.weight", weight=r > 0.2 or rng.random() < 0.5)
    if w is None:
        return None
    bias = gen.leaf([w.shape[0]], x.dtype.name, weight=True, dist=InputDist("float", -0.5, 0.5), name="fc.bias") \
        if rng.random() < 0.6 else None
    return [x, w] + ([bias] if bias is not None else []), {}


@proposer("matmul")
def _matmul(gen):
    rng = gen.rng
    a = gen.pick(lambda v: is_float(v) and v.type.rank >= 2 and isinstance(v.shape[-1], int))
    if a is None:
        return None
    k, n = a.shape[-1], rng.choice([1, 2, 4, 8, 16])
    r = rng.random()
    if r < 0.5:
        b = weight_leaf(gen, [k, n], k, "mm.weight")
    elif r < 0.7:
        b = gen.pick(lambda v: v.dtype == a.dtype and v.type.rank >= 2 and sym.equal(v.shape[-2], k)
                     and broadcastable(v.shape[:-2], a.shape[:-2]))
        if b is None:
            return None
    else:
        batch = broadcast_variant(gen, a.shape[:-2]) if a.type.rank > 2 else []
        b = weight_leaf(gen, batch + [k, n], k, "mm.b", weight=None)
    return [a, b], {}


def _spatial_input(gen, ranks=(3, 4)):
    x = gen.pick(lambda v: is_float(v) and v.type.rank in ranks and all(isinstance(d, int) for d in v.shape[1:]))
    if x is None or gen.rng.random() < 0.3:
        rng = gen.rng
        nd = rng.choice([r - 2 for r in ranks])
        shape = [SYMBOL if gen.env and rng.random() < 0.7 else rng.choice([1, 2]), rng.choice([1, 2, 3, 4, 8])]
        shape += [rng.randint(3, 10) for _ in range(nd)]
        x = gen.leaf(shape, gen.fdt, weight=False)
    return x


@proposer("conv")
def _conv(gen):
    rng = gen.rng
    x = _spatial_input(gen)
    if x is None:
        return None
    c, spatial = x.shape[1], list(x.shape[2:])
    nd = len(spatial)
    groups = rng.choice([1, 1, 1, c] + [g for g in range(2, c) if c % g == 0])
    cout = groups * rng.choice([1, 2, 3])
    kernel = [rng.randint(1, min(3, s)) for s in spatial]
    stride = [rng.choice([1, 1, 2]) for _ in range(nd)]
    dilation = [rng.choice([1, 1, 2]) for _ in range(nd)]
    begins = [rng.choice([0, 0, 1, 2]) for _ in range(nd)]
    ends = list(begins) if rng.random() < 0.7 else [rng.choice([0, 1, 2]) for _ in range(nd)]
    fan_in = c // groups * math.prod(kernel)
    w = weight_leaf(gen, [cout, c // groups] + kernel, fan_in, "conv.weight")
    bias = gen.leaf([cout], gen.fdt, weight=True, dist=InputDist("float", -0.5, 0.5), name="conv.bias") \
        if rng.random() < 0.6 else None
    attrs = {"stride": stride, "padding": begins + ends, "dilation": dilation, "groups": groups}
    return [x, w] + ([bias] if bias is not None else []), attrs


def _pool(gen):
    rng = gen.rng
    x = _spatial_input(gen)
    if x is None:
        return None
    spatial = list(x.shape[2:])
    nd = len(spatial)
    kernel = [rng.randint(1, min(3, s)) for s in spatial]
    stride = [rng.choice([1, 2, 3]) for _ in range(nd)]
    begins = [rng.randint(0, k // 2) for k in kernel]
    ends = list(begins) if rng.random() < 0.8 else [rng.randint(0, k // 2) for k in kernel]
    return [x], {"kernel": kernel, "stride": stride, "padding": begins + ends, "ceil_mode": rng.random() < 0.3}


@proposer("max_pool")
def _max_pool(gen):
    p = _pool(gen)
    if p is None:
        return None
    ins, attrs = p
    attrs["dilation"] = [gen.rng.choice([1, 1, 2]) for _ in attrs["kernel"]]
    return ins, attrs


@proposer("avg_pool")
def _avg_pool(gen):
    p = _pool(gen)
    if p is None:
        return None
    ins, attrs = p
    attrs["count_include_pad"] = gen.rng.random() < 0.5
    return ins, attrs


@proposer("adaptive_avg_pool")
def _adaptive(gen):
    rng = gen.rng
    x = _spatial_input(gen)
    if x is None:
        return None
    size = []
    for s in x.shape[2:]:
        divisors = [d for d in range(1, s + 1) if s % d == 0]
        size.append(rng.choice([1] + divisors + ([rng.randint(1, s)] if rng.random() < 0.2 else [])))
    return [x], {"output_size": size}


@proposer("embedding")
def _embedding(gen):
    rng = gen.rng
    num, dim = rng.choice([4, 8, 16, 32]), rng.choice([4, 8, 16, 32])
    idx = None
    if rng.random() < 0.25:
        idx = gen.pick(lambda v: v in gen.ibound and v.dtype.name in ("int64", "int32")
                       and gen.ibound[v][0] >= 0 and gen.ibound[v][1] <= 64)
        if idx is not None:
            num = max(num, gen.ibound[idx][1])
    if idx is None:
        shape = gen.random_shape(rng.choice([1, 2]))
        idx = gen.leaf(shape, rng.choice(["int64", "int64", "int32"]), weight=rng.random() < 0.15,
                       dist=InputDist("int", 0, num), name="ids")
    table = gen.leaf([num, dim], gen.fdt, weight=True, dist=InputDist("float", -1, 1), name="emb.weight")
    return [idx, table], {}


@proposer("layer_norm")
def _layer_norm(gen):
    rng = gen.rng
    x = gen.pick(lambda v: is_float(v) and v.type.rank >= 1 and isinstance(v.shape[-1], int))
    if x is None:
        return None
    r = x.type.rank
    k = 1
    while k < r and isinstance(x.shape[r - k - 1], int) and rng.random() < 0.3:
        k += 1
    axis = r - k if rng.random() < 0.5 else -k
    norm = list(x.shape[r - k:])
    w = gen.leaf(norm, gen.fdt, weight=True, dist=InputDist("float", 0.5, 1.5), name="ln.weight") \
        if rng.random() < 0.7 else None
    b = gen.leaf(norm, gen.fdt, weight=True, dist=InputDist("float", -0.5, 0.5), name="ln.bias") \
        if rng.random() < 0.6 else None
    ins = [x, w, b] if b is not None else [x, w] if w is not None else [x]
    return ins, fill_attrs(gen, "layer_norm", ins, {"axis": axis})


@proposer("batch_norm")
def _batch_norm(gen):
    rng = gen.rng
    x = gen.pick(lambda v: is_float(v) and v.type.rank >= 2 and isinstance(v.shape[1], int))
    if x is None:
        return None
    c = [x.shape[1]]
    mean = gen.leaf(c, gen.fdt, weight=True, dist=InputDist("float", -1, 1), name="bn.mean")
    var = gen.leaf(c, gen.fdt, weight=True, dist=InputDist("float", 0.5, 2), name="bn.var")
    w = gen.leaf(c, gen.fdt, weight=True, dist=InputDist("float", 0.5, 1.5), name="bn.weight") \
        if rng.random() < 0.7 else None
    b = gen.leaf(c, gen.fdt, weight=True, dist=InputDist("float", -0.5, 0.5), name="bn.bias") \
        if rng.random() < 0.7 else None
    ins = [x, mean, var, w, b] if b is not None else [x, mean, var, w] if w is not None else [x, mean, var]
    return ins, fill_attrs(gen, "batch_norm", ins)


def _indices(gen, shape, lo, hi, name="idx"):
    return gen.leaf(shape, gen.rng.choice(["int64", "int64", "int32"]), weight=gen.rng.random() < 0.5,
                    dist=InputDist("int", lo, hi), name=name)


def _static_axis_operand(gen):
    """(x, axis, size) for an operand with a static axis to index along, or None."""
    x = gen.pick(lambda v: v.type.rank >= 1 and bool(static_axes(v)))
    if x is None:
        return None
    axis = gen.rng.choice(static_axes(x))
    return x, axis, x.shape[axis]


@proposer("gather")
def _gather(gen):
    rng = gen.rng
    picked = _static_axis_operand(gen)
    if picked is None:
        return None
    x, axis, n = picked
    idx = gen.pick(lambda v: v in gen.ibound and gen.ibound[v][0] >= -n and gen.ibound[v][1] <= n) \
        if rng.random() < 0.3 else None
    if idx is None:
        lo = -n if rng.random() < 0.3 else 0
        idx = _indices(gen, gen.random_shape(rng.choice([0, 1, 1, 2])), lo, n)
    return [x, idx], {"axis": axis - x.type.rank if rng.random() < 0.3 else axis}


@proposer("gather_elements")
def _gather_elements(gen):
    rng = gen.rng
    picked = _static_axis_operand(gen)
    if picked is None:
        return None
    x, axis, n = picked
    shape = list(x.shape)
    shape[axis] = rng.randint(1, n + 2)
    idx = _indices(gen, shape, 0, n)
    return [x, idx], {"axis": axis}


@proposer("index")
def _index(gen):
    rng = gen.rng
    x = gen.pick(lambda v: v.type.rank >= 1 and isinstance(v.shape[0], int))
    if x is None:
        return None
    k = 1
    while k < min(x.type.rank, 3) and isinstance(x.shape[k], int) and rng.random() < 0.4:
        k += 1
    m = rng.randint(1, 5)
    shapes = [[m], [m, 1], [1, m]] if rng.random() < 0.5 else [[m]]
    idx = [_indices(gen, rng.choice(shapes), 0, x.shape[i], name=f"idx{i}") for i in range(k)]
    return [x] + idx, {}


@proposer("concat")
def _concat(gen):
    rng = gen.rng
    x = gen.pick(lambda v: v.type.rank >= 1)
    if x is None:
        return None
    axes = static_axes(x) if rng.random() < 0.9 else list(range(x.type.rank))
    if not axes:
        return None
    axis = rng.choice(axes)
    ins = [x]
    for _ in range(rng.choice([1, 1, 2])):
        r = rng.random()
        if r < 0.3:
            ins.append(x)
            continue
        other = None
        if r < 0.6:
            other = gen.pick(lambda v: v.dtype == x.dtype and v.type.rank == x.type.rank and all(
                i == axis or sym.equal(p, q) for i, (p, q) in enumerate(zip(v.shape, x.shape))))
        if other is None:
            shape = list(x.shape)
            shape[axis] = rng.randint(1, 6)
            dist = InputDist("int", 0, 4) if x.dtype.is_integer else None
            other = gen.leaf(shape, x.dtype.name, dist=dist)
        ins.append(other)
    return ins, {"axis": axis - x.type.rank if rng.random() < 0.3 else axis}


@proposer("fake_quant")
def _fake_quant(gen):
    rng = gen.rng
    x = gen.pick(lambda v: v.dtype.name == "float32")
    if x is None:
        return None
    fmt = rng.choice(FAKE_QUANT_FORMATS)
    top = {"int8": 127, "uint8": 127, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0, "int4": 7}[fmt]
    amax = float(gen.c32[x].abs().max()) or 1.0
    scale = amax / top * rng.uniform(0.5, 1.5)
    zp = rng.choice([0, 0, 3, -5]) if fmt == "int8" else rng.choice([128, 120, 0]) if fmt == "uint8" else 0
    return [x], {"format": fmt, "scale": scale, "zero_point": zp}


@proposer("dynamic_quant")
def _dynamic_quant(gen):
    rng = gen.rng
    x = gen.pick(lambda v: v.dtype.name == "float32" and isinstance(v.shape[-1], int) if v.type.rank else False)
    if x is None:
        return None
    width = x.shape[-1]
    fixed = {"mxfp8": 32, "mxfp4": 32, "nvfp4": 16}
    formats = ["int8", "int4", "e4m3"] + [f for f, b in fixed.items() if width % b == 0]
    fmt = rng.choice(formats)
    if fmt in fixed:
        return [x], {"format": fmt}
    groups = [g for g in (0, 2, 4, 8) if g == 0 or (width % g == 0 and g < width)]
    return [x], {"format": fmt, "group": rng.choice(groups), "clip": rng.choice([1.0, 1.0, 0.9])}


@proposer("arange")
def _arange(gen):
    rng = gen.rng
    start = rng.randint(0, 3)
    end = SYMBOL if gen.env and rng.random() < 0.4 else start + rng.randint(1, 16)
    return [], {"start": start, "end": end, "step": rng.choice([1, 1, 2, 3]),
                "dtype": rng.choice(["int64", "int32"])}


@proposer("full")
def _full(gen):
    rng = gen.rng
    dtype = rng.choice([gen.fdt, gen.fdt, "int64", "bool"])
    value = rng.randint(-3, 5) if dtype == "int64" else rng.random() < 0.5 if dtype == "bool" else \
        round(rng.uniform(-2, 2), 3)
    return [], {"shape": gen.random_shape(), "value": value, "dtype": dtype}


def _bool_only(op):
    def propose_bool(gen):
        x = bool_operand(gen)
        attrs = None if x is None else fill_attrs(gen, op, [x])
        return None if attrs is None else ([x], attrs)
    return propose_bool


for _op in ("not", "reduce_any", "reduce_all"):
    proposer(_op)(_bool_only(_op))


@proposer("cast")
def _cast(gen):
    x = gen.pick()
    if x is None:
        return None
    return [x], {"dtype": cast_dtype(gen, [x], {})}


# --- decoder ops: heads [batch, heads, seq, head_dim], caches [batch, kv_heads, max_len, head_dim] ---
def _batch(gen):
    return SYMBOL if gen.env and gen.rng.random() < 0.7 else gen.rng.choice([1, 2])


def _positions(gen, batch, seq: int, limit: int):
    """Positions [batch, seq]: each row consecutive from its own start, an input drawn in
    [0, limit - seq], so fresh samples stay distinct slots below ``limit`` as the cache ops need."""
    ramp = gen.add("arange", [], {"start": 0, "end": seq, "dtype": "int64"})
    ramp = ramp and gen.add("reshape", [ramp], {"shape": [1, seq]})
    start = gen.leaf([batch, 1], "int64", weight=None if isinstance(batch, int) else False,
                     dist=InputDist("int", 0, limit - seq + 1), name="start")
    return None if ramp is None or start is None else gen.add("add", [ramp, start], {})


def _heads(gen, name: str, heads, seq, dims, pred=lambda v: True):
    """An existing rank-4 float value that ``pred`` accepts (now and then), else a new input
    [batch, heads, seq, dim] with sizes drawn from the given choices."""
    rng = gen.rng
    x = gen.pick(lambda v: is_float(v) and v.type.rank == 4 and all(isinstance(d, int) for d in v.shape[1:])
                 and pred(v)) if rng.random() < 0.5 else None
    shape = [_batch(gen), rng.choice(heads), rng.choice(seq), rng.choice(dims)]
    return x or gen.leaf(shape, gen.fdt, weight=False, name=name)


@proposer("rms_norm")
def _rms_norm(gen):
    rng = gen.rng
    x = gen.pick(lambda v: is_float(v) and v.type.rank >= 1 and isinstance(v.shape[-1], int))
    if x is None:
        return None
    offset = rng.choice([0.0, 0.0, 1.0])          # 1.0: Gemma's (1 + weight), weights near 0
    attrs = {"eps": rng.choice([1e-6, 1e-5]), "offset": offset}
    if not offset and rng.random() < 0.2:
        return [x], {"eps": attrs["eps"]}
    w = gen.leaf([x.shape[-1]], x.dtype.name, weight=True,
                 dist=InputDist("float", *((-0.5, 0.5) if offset else (0.5, 1.5))), name="norm.weight")
    return [x, w], attrs


@proposer("rope")
def _rope(gen):
    rng = gen.rng
    x = _heads(gen, "heads", (1, 2, 4), (1, 2, 3, 5), (2, 4, 6, 8), pred=lambda v: v.shape[3] % 2 == 0)
    if x is None:
        return None
    d = x.shape[3]
    rotary_dim = rng.choice([0, 0, 0] + list(range(2, d, 2)))
    inv_freq = gen.leaf([(rotary_dim or d) // 2], "float32", weight=True, dist=InputDist("float", 0.01, 1.0),
                        name="inv_freq")
    pos = _positions(gen, x.shape[0], x.shape[2], 64)
    return None if pos is None else ([x, pos, inv_freq], {"scale": rng.choice([1.0, 1.0, 1.2]),
                                                          "style": rng.choice(["half", "interleaved"]),
                                                          "rotary_dim": rotary_dim})


@proposer("cache_update")
def _cache_update(gen):
    rng = gen.rng
    new = _heads(gen, "new", (1, 2), (1, 2, 4), (2, 4, 8))
    if new is None:
        return None
    b, kvh, s, d = new.shape
    max_len = s + rng.choice([0, 1, 3, 8])
    cache = gen.leaf([b, kvh, max_len, d], new.dtype.name, weight=False, name="cache")
    pos = _positions(gen, b, s, max_len)
    return None if cache is None or pos is None else ([cache, new, pos], {})


@proposer("attention")
def _attention(gen):
    rng = gen.rng
    k = _heads(gen, "cache", (1, 2), (2, 4, 9), (2, 4, 8))
    if k is None:
        return None
    b, kvh, max_len, d = k.shape
    v = gen.pick(lambda u: u is not k and u.dtype == k.dtype and u.type.same_as(k.type)) \
        or gen.leaf(list(k.shape), k.dtype.name, weight=False, name="cache")
    q = gen.leaf([b, kvh * rng.choice([1, 2, 3]), rng.randint(1, max_len), d], k.dtype.name, weight=False, name="q")
    pos = None if q is None else _positions(gen, b, q.shape[2], max_len)
    if v is None or pos is None:
        return None
    return [q, k, v, pos], {"scale": d ** -0.5, "window": rng.choice([0, 0, 1, 2, 4]),
                            "softcap": rng.choice([0.0, 0.0, 5.0, 50.0])}

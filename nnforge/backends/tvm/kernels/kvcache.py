"""TensorIR kernels of the encoded KV caches (docs/kv_cache.md): ``kv_cache_write`` in place on the
state tensors, and attention reading the stored encoding directly.

The writes round exactly as ``nnforge/ir/kvcache.py`` does (float32 divisions, never a multiply
by a reciprocal; ``nearbyint``, ties to even; float16 scales saturating), so their codes and
scales are the interpreter's on the same keys and values. They are called with
``call_tir_inplace``: a step touches the rows it writes (kv4: the groups it completes and the
window), never the whole state.

Attention reads the codes where the float attention kernel (decoder.py) reads float rows, over the
same visible slots, and never materialises the float cache:

- ``kv8`` / ``kv-fp8``: a token's scale is one number, so it multiplies the q.k dot product of the
  codes, and the softmax weight before the p.v sum (E4M3 codes are read as float16 patterns,
  ``minifloat_codes.code_value``, whose power of two goes into the same product);
- ``kv4`` (KIVI): a key group's per-channel scale and minimum fold into the query once per group
  (``q * s`` deinterleaved into the even and odd channels of the packed nibbles, and ``q . m``), so
  each key costs the dot product of the nibbles; a value token's scale multiplies its softmax weight
  and its minimum sums into one number per query, added once. Tokens still in the float window
  are read as floats.

A ``kv_cache_read`` that is not fused (read by something other than an attention that reads both
caches in the same encoding) runs :func:`read_func`, the dequantised cache.
"""
from __future__ import annotations

from .minifloat_codes import SCALE_FACTOR, code_value, e4m3_code

FP16_MAX = 65504.0
PER_TOKEN = {"kv8": ("int8", 127.0), "kv-fp8": ("uint8", 448.0)}      # code dtype, max|x| maps onto


def _f16(v):
    """float32 -> float16, nearest even, saturating at 65504 (ir/kvcache.f16)."""
    from tvm import tirx
    return tirx.Cast("float16", tirx.min(tirx.max(v, tirx.const(-FP16_MAX, "float32")),
                                         tirx.const(FP16_MAX, "float32")))


def _ratio(x, s):
    """``x / s`` where ``s > 0``, else 0 (the reference's guard against an all-zero token)."""
    from tvm import tirx
    zero, one = tirx.const(0, "float32"), tirx.const(1, "float32")
    return tirx.Select(s > zero, x / tirx.Select(s > zero, s, one), zero)


def _code(kind: str, ratio):
    from tvm import tirx
    if kind == "kv-fp8":
        return e4m3_code(ratio)
    return tirx.Cast("int8", tirx.min(tirx.max(tirx.nearbyint(ratio), tirx.const(-127, "float32")),
                                      tirx.const(127, "float32")))


def _value(kind: str, code):
    """A code as float32, up to :func:`_unit` (which the token's scale carries)."""
    return code_value("e4m3" if kind == "kv-fp8" else "int", code)


def _unit(kind: str) -> float:
    return SCALE_FACTOR["e4m3"] if kind == "kv-fp8" else 1.0


def _code4(x, m, s):
    """kv4's code of ``x`` (int32 0..15): clamp(round((x - m) / s), 0, 15), 0 where s is 0."""
    from tvm import tirx
    q = tirx.min(tirx.max(tirx.nearbyint(_ratio(x - m, s)), tirx.const(0, "float32")), tirx.const(15, "float32"))
    return tirx.Cast("int32", q)


def _lanes(n: int, lanes: int) -> int:
    return lanes if n % lanes == 0 else 1


def per_token_write_func(kind: str, kv_heads: int, max_len: int, head_dim: int, lanes: int):
    """PrimFunc ``(new [b, kvh, s, d] f32, positions [b, s], codes [b, kvh, L, d], scale [b, kvh,
    L, 1] f16)`` writing each new token's codes and scale at its slot (``kv8``: int8, ``kv-fp8``:
    E4M3 bit patterns), in place. Tokens run in parallel."""
    from tvm.script import tirx as T
    code_dtype, top = PER_TOKEN[kind]
    vec = _lanes(head_dim, lanes)
    chunks = head_dim // vec
    f32 = "float32"

    @T.prim_func(private=True, s_tir=True)
    def write(n_h: T.handle, p_h: T.handle, c_h: T.handle, s_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        new = T.match_buffer(n_h, (b, kv_heads, s, head_dim), f32)
        pos = T.match_buffer(p_h, (b, s), "int64")
        codes = T.match_buffer(c_h, (b, kv_heads, max_len, head_dim), code_dtype)
        scale = T.match_buffer(s_h, (b, kv_heads, max_len, 1), "float16")
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads * s):
                part = T.alloc_buffer((vec,), f32, scope="local")
                sc = T.alloc_buffer((1,), f32, scope="local")
                bi = r // (kv_heads * s)
                h = r // s % kv_heads
                j = r % s
                slot = T.max(T.min(pos[bi, j], T.int64(max_len - 1)), T.int64(0))
                for dv in T.vectorized(vec):
                    part[dv] = T.float32(0)
                for do in range(chunks):
                    for dv in T.vectorized(vec):
                        part[dv] = T.max(part[dv], T.fabs(new[bi, h, j, do * vec + dv]))
                sc[0] = T.float32(0)
                for dv in range(vec):
                    sc[0] = T.max(sc[0], part[dv])
                scale[bi, h, slot, 0] = _f16(sc[0] / T.float32(top))
                sc[0] = T.Cast(f32, scale[bi, h, slot, 0])
                for do in range(chunks):
                    for dv in T.vectorized(vec):
                        codes[bi, h, slot, do * vec + dv] = _code(kind, _ratio(new[bi, h, j, do * vec + dv], sc[0]))
    return write


def kv4_write_func(role: str, kv_heads: int, max_len: int, head_dim: int, group: int, residual: int, where: str):
    """PrimFunc ``(new [b, kvh, s, d] f32, positions [b, s], codes, scale, min, window)`` (the kv4
    state of a K or V cache, ir/kvcache.KV4.parts) writing a step in place: the groups (keys) or
    tokens (values) the step completes are quantised from the window's and the step's float
    values, and the window then holds the tokens not yet quantised. Each row's positions must be
    consecutive and within the cache: an assertion naming ``where`` otherwise. (batch, kv head)
    pairs run in parallel."""
    from tvm import tirx
    from tvm.script import tirx as T
    g_len, r_len = group, residual
    w_len = max(1, residual + group - 1)
    half = head_dim // 2
    groups = -(-max_len // group)
    srows = groups if role == "k" else max_len
    scols = head_dim if role == "k" else 1
    f32 = "float32"
    broken = (f"{where}: a kv4 cache needs each row's positions consecutive, continuing the sequence, and "
              f"within its {max_len} slots; feed tokens in order, or use kv8 for this cache")

    def quantized(n):
        return T.int64(g_len) * (T.max(n - T.int64(r_len), T.int64(0)) // T.int64(g_len))

    def value(new, window, bi, h, p, p0, d):
        """The float value of position ``p`` (the window's for earlier steps, else the step's)."""
        return tirx.if_then_else(p < p0, window[bi, h, p % T.int64(w_len), d], new[bi, h, T.max(p - p0, 0), d])

    @T.prim_func(private=True, s_tir=True)
    def write(n_h: T.handle, p_h: T.handle, c_h: T.handle, s_h: T.handle, m_h: T.handle, w_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        new = T.match_buffer(n_h, (b, kv_heads, s, head_dim), f32)
        pos = T.match_buffer(p_h, (b, s), "int64")
        codes = T.match_buffer(c_h, (b, kv_heads, max_len, half), "uint8")
        scale = T.match_buffer(s_h, (b, kv_heads, srows, scols), "float16")
        mins = T.match_buffer(m_h, (b, kv_heads, srows, scols), "float16")
        window = T.match_buffer(w_h, (b, kv_heads, w_len, head_dim), f32)
        with T.sblock("root"):
            for r in range(b * s):
                assert pos[r // s, r % s] == pos[r // s, 0] + r % s, broken
                assert pos[r // s, 0] >= T.int64(0) and pos[r // s, 0] + s <= T.int64(max_len), broken
            for r in T.parallel(b * kv_heads):
                lo = T.alloc_buffer((head_dim,), f32, scope="local")
                hi = T.alloc_buffer((head_dim,), f32, scope="local")
                bi = r // kv_heads
                h = r % kv_heads
                p0 = pos[bi, 0]
                q_old = quantized(p0)
                q_new = quantized(p0 + s)
                if role == "k":
                    for gi in range((q_new - q_old) // T.int64(g_len)):
                        first = q_old + gi * T.int64(g_len)
                        g = first // T.int64(g_len)
                        for d in range(head_dim):
                            lo[d] = value(new, window, bi, h, first, p0, d)
                            hi[d] = lo[d]
                        for t in range(1, g_len):
                            for d in range(head_dim):
                                lo[d] = T.min(lo[d], value(new, window, bi, h, first + t, p0, d))
                                hi[d] = T.max(hi[d], value(new, window, bi, h, first + t, p0, d))
                        for d in range(head_dim):
                            scale[bi, h, g, d] = _f16((hi[d] - lo[d]) / T.float32(15))
                            mins[bi, h, g, d] = _f16(lo[d])
                            lo[d] = T.Cast(f32, mins[bi, h, g, d])
                            hi[d] = T.Cast(f32, scale[bi, h, g, d])
                        for t in range(g_len):
                            for i in range(half):
                                codes[bi, h, first + t, i] = T.Cast("uint8", _code4(
                                    value(new, window, bi, h, first + t, p0, 2 * i), lo[2 * i], hi[2 * i])
                                    | (_code4(value(new, window, bi, h, first + t, p0, 2 * i + 1), lo[2 * i + 1],
                                              hi[2 * i + 1]) << 4))
                else:
                    for t in range(q_new - q_old):
                        lo[0] = value(new, window, bi, h, q_old + t, p0, 0)
                        hi[0] = lo[0]
                        for d in range(1, head_dim):
                            lo[0] = T.min(lo[0], value(new, window, bi, h, q_old + t, p0, d))
                            hi[0] = T.max(hi[0], value(new, window, bi, h, q_old + t, p0, d))
                        scale[bi, h, q_old + t, 0] = _f16((hi[0] - lo[0]) / T.float32(15))
                        mins[bi, h, q_old + t, 0] = _f16(lo[0])
                        lo[0] = T.Cast(f32, mins[bi, h, q_old + t, 0])
                        hi[0] = T.Cast(f32, scale[bi, h, q_old + t, 0])
                        for i in range(half):
                            codes[bi, h, q_old + t, i] = T.Cast("uint8", _code4(
                                value(new, window, bi, h, q_old + t, p0, 2 * i), lo[0], hi[0])
                                | (_code4(value(new, window, bi, h, q_old + t, p0, 2 * i + 1), lo[0], hi[0]) << 4))
                # each window row holds the one position of q_new .. n-1 (fewer than w_len) that maps
                # onto it, or zeros; a position before the step is already there
                for wr in range(w_len):
                    for d in range(head_dim):
                        if q_new + (T.int64(wr) - q_new) % T.int64(w_len) >= p0 + s:
                            window[bi, h, wr, d] = T.float32(0)
                        elif q_new + (T.int64(wr) - q_new) % T.int64(w_len) >= p0:
                            window[bi, h, wr, d] = new[bi, h, q_new + (T.int64(wr) - q_new) % T.int64(w_len) - p0, d]
    return write


def per_token_attention_func(kind: str, heads: int, kv_heads: int, max_len: int, head_dim: int, scale: float,
                             window: int, softcap: float, lanes: int):
    """PrimFunc ``(q [b, h, s, d], k codes, k scale, v codes, v scale, positions [b, s], out)``:
    causal grouped-query attention over each query's visible slots (as decoder.attention_func) on
    ``kv8`` / ``kv-fp8`` codes, each token's scale taken out of its dot products. The query heads
    sharing a kv head run together, so each K and V row is decoded once for all of them;
    (batch, kv head, query) triples run in parallel."""
    from tvm.script import tirx as T
    code_dtype, _ = PER_TOKEN[kind]
    grp = heads // kv_heads
    seen = window if window else max_len + 1
    vec = _lanes(head_dim, lanes)
    chunks = head_dim // vec
    unit = _unit(kind)
    f32 = "float32"

    @T.prim_func(private=True, s_tir=True)
    def attention(q_h: T.handle, kc_h: T.handle, ks_h: T.handle, vc_h: T.handle, vs_h: T.handle, p_h: T.handle,
                  o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, heads, s, head_dim), f32)
        kc = T.match_buffer(kc_h, (b, kv_heads, max_len, head_dim), code_dtype)
        ks = T.match_buffer(ks_h, (b, kv_heads, max_len, 1), "float16")
        vc = T.match_buffer(vc_h, (b, kv_heads, max_len, head_dim), code_dtype)
        vs = T.match_buffer(vs_h, (b, kv_heads, max_len, 1), "float16")
        pos = T.match_buffer(p_h, (b, s), "int64")
        out = T.match_buffer(o_h, (b, heads, s, head_dim), f32)
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads * s):
                scores = T.alloc_buffer((grp, max_len), f32, scope="global")
                acc = T.alloc_buffer((grp, head_dim), f32, scope="local")
                part = T.alloc_buffer((grp, vec), f32, scope="local")      # partial sums, per head
                span = T.alloc_buffer((2,), "int64", scope="local")     # first slot, slot count
                top = T.alloc_buffer((grp,), f32, scope="local")
                total = T.alloc_buffer((grp,), f32, scope="local")
                bi = r // (kv_heads * s)
                kh = r // s % kv_heads
                j = r % s
                span[1] = T.max(T.min(pos[bi, j], T.int64(max_len - 1)), T.int64(0)) + T.int64(1)
                span[0] = T.max(span[1] - T.int64(seen), T.int64(0))
                span[1] = span[1] - span[0]
                for hg in range(grp):
                    top[hg] = T.min_value(f32)
                for t in range(span[1]):
                    # the heads unrolled inside a chunk: its codes are decoded once, in registers
                    for hg in T.unroll(grp):
                        for dv in T.vectorized(vec):
                            part[hg, dv] = T.float32(0)
                    for do in range(chunks):
                        for hg in T.unroll(grp):
                            for dv in T.vectorized(vec):
                                part[hg, dv] = part[hg, dv] + q[bi, kh * grp + hg, j, do * vec + dv] * _value(
                                    kind, kc[bi, kh, span[0] + t, do * vec + dv])
                    for hg in range(grp):
                        scores[hg, t] = T.float32(0)
                        for dv in range(vec):
                            scores[hg, t] = scores[hg, t] + part[hg, dv]
                        scores[hg, t] = scores[hg, t] * (T.Cast(f32, ks[bi, kh, span[0] + t, 0])
                                                         * T.float32(unit * scale))
                        if softcap > 0:
                            scores[hg, t] = T.tanh(scores[hg, t] / T.float32(softcap)) * T.float32(softcap)
                        top[hg] = T.max(top[hg], scores[hg, t])
                for hg in range(grp):
                    total[hg] = T.float32(0)
                    for t in range(span[1]):
                        scores[hg, t] = T.exp(scores[hg, t] - top[hg])
                        total[hg] = total[hg] + scores[hg, t]
                for t in range(span[1]):
                    for hg in range(grp):
                        scores[hg, t] = scores[hg, t] * (T.Cast(f32, vs[bi, kh, span[0] + t, 0]) * T.float32(unit))
                # a chunk of channels at a time over every token, its sums held in registers
                for do in range(chunks):
                    for hg in T.unroll(grp):
                        for dv in T.vectorized(vec):
                            part[hg, dv] = T.float32(0)
                    for t in range(span[1]):
                        for hg in T.unroll(grp):
                            for dv in T.vectorized(vec):
                                part[hg, dv] = part[hg, dv] + scores[hg, t] * _value(
                                    kind, vc[bi, kh, span[0] + t, do * vec + dv])
                    for hg in T.unroll(grp):
                        for dv in T.vectorized(vec):
                            acc[hg, do * vec + dv] = part[hg, dv]
                for hg in range(grp):
                    total[hg] = T.float32(1) / total[hg]
                    for do in range(chunks):
                        for dv in T.vectorized(vec):
                            out[bi, kh * grp + hg, j, do * vec + dv] = acc[hg, do * vec + dv] * total[hg]
    return attention


def kv4_attention_func(heads: int, kv_heads: int, max_len: int, head_dim: int, group: int, residual: int,
                       scale: float, window: int, softcap: float, lanes: int):
    """PrimFunc ``(q [b, h, s, d], k codes, k scale, k min, k window, v codes, v scale, v min, v
    window, positions [b, s], out)``: causal grouped-query attention over each query's visible
    slots on a kv4 K and V state. A row's first ``q(n)`` slots (n: its largest position + 1) are
    read as codes, the rest from the windows. The packed nibbles are read as even and odd
    channels, vectorised over bytes, once per token for all the query heads sharing a kv head;
    (batch, kv head, query) triples run in parallel."""
    from tvm.script import tirx as T
    grp = heads // kv_heads
    seen = window if window else max_len + 1
    w_len = max(1, residual + group - 1)
    groups = -(-max_len // group)
    half = head_dim // 2
    vec = _lanes(head_dim, lanes)
    hvec = _lanes(half, lanes)
    chunks, hchunks = head_dim // vec, half // hvec
    f32 = "float32"

    def nib(byte, high: bool):
        return T.Cast(f32, (byte >> T.uint8(4)) if high else (byte & T.uint8(15)))

    @T.prim_func(private=True, s_tir=True)
    def attention(q_h: T.handle, kc_h: T.handle, ks_h: T.handle, km_h: T.handle, kw_h: T.handle, vc_h: T.handle,
                  vs_h: T.handle, vm_h: T.handle, vw_h: T.handle, p_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, heads, s, head_dim), f32)
        kc = T.match_buffer(kc_h, (b, kv_heads, max_len, half), "uint8")
        ks = T.match_buffer(ks_h, (b, kv_heads, groups, head_dim), "float16")
        km = T.match_buffer(km_h, (b, kv_heads, groups, head_dim), "float16")
        kw = T.match_buffer(kw_h, (b, kv_heads, w_len, head_dim), f32)
        vc = T.match_buffer(vc_h, (b, kv_heads, max_len, half), "uint8")
        vs = T.match_buffer(vs_h, (b, kv_heads, max_len, 1), "float16")
        vm = T.match_buffer(vm_h, (b, kv_heads, max_len, 1), "float16")
        vw = T.match_buffer(vw_h, (b, kv_heads, w_len, head_dim), f32)
        pos = T.match_buffer(p_h, (b, s), "int64")
        out = T.match_buffer(o_h, (b, heads, s, head_dim), f32)
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads * s):
                scores = T.alloc_buffer((grp, max_len), f32, scope="global")
                qe = T.alloc_buffer((grp, half), f32, scope="local")     # q * s, even channels
                qo = T.alloc_buffer((grp, half), f32, scope="local")     # odd channels
                parts = T.alloc_buffer((2, grp, hvec), f32, scope="local")   # partial sums, per head
                qs = T.alloc_buffer((head_dim,), f32, scope="local")
                ae = T.alloc_buffer((grp, half), f32, scope="local")     # p * s * codes, even channels
                ao = T.alloc_buffer((grp, half), f32, scope="local")
                aw = T.alloc_buffer((grp, head_dim), f32, scope="local")  # p * window rows
                part = T.alloc_buffer((vec,), f32, scope="local")
                span = T.alloc_buffer((4,), "int64", scope="local")   # first slot, count, q(n), coded slots
                num = T.alloc_buffer((4, grp), f32, scope="local")    # max score, sum, q . min, sum of p * min
                bi = r // (kv_heads * s)
                kh = r // s % kv_heads
                j = r % s
                span[2] = T.int64(-1)
                for i in range(s):
                    span[2] = T.max(span[2], pos[bi, i])
                span[2] = T.min(span[2], T.int64(max_len - 1)) + T.int64(1)
                span[2] = T.int64(group) * (T.max(span[2] - T.int64(residual), T.int64(0)) // T.int64(group))
                span[1] = T.max(T.min(pos[bi, j], T.int64(max_len - 1)), T.int64(0)) + T.int64(1)
                span[0] = T.max(span[1] - T.int64(seen), T.int64(0))
                span[1] = span[1] - span[0]
                # slots span[0] .. span[0] + span[3] - 1 are codes, the rest of the span the window's
                span[3] = T.max(T.min(span[2] - span[0], span[1]), T.int64(0))
                for g in range(T.Select(span[3] > T.int64(0), (span[0] + span[3] - T.int64(1)) // T.int64(group)
                                        - span[0] // T.int64(group) + T.int64(1), T.int64(0))):
                    # q * s and q . m in channel order (vectorised), then q * s split into even and odd
                    for hg in range(grp):
                        for dv in T.vectorized(vec):
                            part[dv] = T.float32(0)
                        for do in range(chunks):
                            for dv in T.vectorized(vec):
                                qs[do * vec + dv] = q[bi, kh * grp + hg, j, do * vec + dv] * T.Cast(
                                    f32, ks[bi, kh, span[0] // T.int64(group) + g, do * vec + dv])
                                part[dv] = part[dv] + q[bi, kh * grp + hg, j, do * vec + dv] * T.Cast(
                                    f32, km[bi, kh, span[0] // T.int64(group) + g, do * vec + dv])
                        for i in range(half):
                            qe[hg, i] = qs[2 * i]
                            qo[hg, i] = qs[2 * i + 1]
                        num[2, hg] = T.float32(0)
                        for dv in range(vec):
                            num[2, hg] = num[2, hg] + part[dv]
                    # the group's slots within the span, as offsets from span[0]
                    for t in range(T.max(span[0], (span[0] // T.int64(group) + g) * T.int64(group)) - span[0],
                                   T.min(span[0] + span[3], (span[0] // T.int64(group) + g + T.int64(1))
                                         * T.int64(group)) - span[0]):
                        # the heads unrolled inside a chunk: its nibbles are decoded once, in registers
                        for hg in T.unroll(grp):
                            for dv in T.vectorized(hvec):
                                parts[0, hg, dv] = T.float32(0)
                                parts[1, hg, dv] = T.float32(0)
                        for io in range(hchunks):
                            for hg in T.unroll(grp):
                                for dv in T.vectorized(hvec):
                                    parts[0, hg, dv] = parts[0, hg, dv] + qe[hg, io * hvec + dv] * nib(
                                        kc[bi, kh, span[0] + t, io * hvec + dv], False)
                                    parts[1, hg, dv] = parts[1, hg, dv] + qo[hg, io * hvec + dv] * nib(
                                        kc[bi, kh, span[0] + t, io * hvec + dv], True)
                        for hg in range(grp):
                            scores[hg, t] = num[2, hg]
                            for dv in range(hvec):
                                scores[hg, t] = scores[hg, t] + (parts[0, hg, dv] + parts[1, hg, dv])
                for t in range(span[3], span[1]):
                    for hg in range(grp):
                        for dv in T.vectorized(vec):
                            part[dv] = T.float32(0)
                        for do in range(chunks):
                            for dv in T.vectorized(vec):
                                part[dv] = part[dv] + q[bi, kh * grp + hg, j, do * vec + dv] * kw[
                                    bi, kh, (span[0] + t) % T.int64(w_len), do * vec + dv]
                        scores[hg, t] = T.float32(0)
                        for dv in range(vec):
                            scores[hg, t] = scores[hg, t] + part[dv]
                for hg in range(grp):
                    num[0, hg] = T.min_value(f32)
                    for t in range(span[1]):
                        scores[hg, t] = scores[hg, t] * T.float32(scale)
                        if softcap > 0:
                            scores[hg, t] = T.tanh(scores[hg, t] / T.float32(softcap)) * T.float32(softcap)
                        num[0, hg] = T.max(num[0, hg], scores[hg, t])
                for hg in range(grp):
                    num[1, hg] = T.float32(0)
                    for t in range(span[1]):
                        scores[hg, t] = T.exp(scores[hg, t] - num[0, hg])
                        num[1, hg] = num[1, hg] + scores[hg, t]
                    for d in T.vectorized(head_dim):
                        aw[hg, d] = T.float32(0)
                    num[3, hg] = T.float32(0)
                for t in range(span[3]):
                    for hg in range(grp):
                        num[3, hg] = num[3, hg] + scores[hg, t] * T.Cast(f32, vm[bi, kh, span[0] + t, 0])
                        scores[hg, t] = scores[hg, t] * T.Cast(f32, vs[bi, kh, span[0] + t, 0])
                # a chunk of channels at a time over every token, its sums held in registers
                for io in range(hchunks):
                    for hg in T.unroll(grp):
                        for dv in T.vectorized(hvec):
                            parts[0, hg, dv] = T.float32(0)
                            parts[1, hg, dv] = T.float32(0)
                    for t in range(span[3]):
                        for hg in T.unroll(grp):
                            for dv in T.vectorized(hvec):
                                parts[0, hg, dv] = parts[0, hg, dv] + scores[hg, t] * nib(
                                    vc[bi, kh, span[0] + t, io * hvec + dv], False)
                                parts[1, hg, dv] = parts[1, hg, dv] + scores[hg, t] * nib(
                                    vc[bi, kh, span[0] + t, io * hvec + dv], True)
                    for hg in T.unroll(grp):
                        for dv in T.vectorized(hvec):
                            ae[hg, io * hvec + dv] = parts[0, hg, dv]
                            ao[hg, io * hvec + dv] = parts[1, hg, dv]
                for t in range(span[3], span[1]):
                    for hg in range(grp):
                        for do in range(chunks):
                            for dv in T.vectorized(vec):
                                aw[hg, do * vec + dv] = aw[hg, do * vec + dv] + scores[hg, t] * vw[
                                    bi, kh, (span[0] + t) % T.int64(w_len), do * vec + dv]
                for hg in range(grp):
                    num[1, hg] = T.float32(1) / num[1, hg]
                    for i in range(half):
                        out[bi, kh * grp + hg, j, 2 * i] = (ae[hg, i] + aw[hg, 2 * i] + num[3, hg]) * num[1, hg]
                        out[bi, kh * grp + hg, j, 2 * i + 1] = (ao[hg, i] + aw[hg, 2 * i + 1] + num[3, hg]) \
                            * num[1, hg]
    return attention


def read_func(kind: str, role: str, kv_heads: int, max_len: int, head_dim: int, group: int = 1,
              residual: int = 0):
    """PrimFunc ``(positions [b, s], *state, out [b, kvh, L, d] f32)``: the float cache the state
    stands for (ir/kvcache ``read``), for a ``kv_cache_read`` that no attention kernel fuses.
    (batch, kv head) pairs run in parallel."""
    from tvm.script import tirx as T
    f32 = "float32"
    if kind in PER_TOKEN:
        code_dtype, _ = PER_TOKEN[kind]
        unit = _unit(kind)

        @T.prim_func(private=True, s_tir=True)
        def read(p_h: T.handle, c_h: T.handle, s_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            b, s = T.int64(), T.int64()
            T.match_buffer(p_h, (b, s), "int64")
            codes = T.match_buffer(c_h, (b, kv_heads, max_len, head_dim), code_dtype)
            sc = T.match_buffer(s_h, (b, kv_heads, max_len, 1), "float16")
            out = T.match_buffer(o_h, (b, kv_heads, max_len, head_dim), f32)
            with T.sblock("root"):
                for r in T.parallel(b * kv_heads):
                    for t, d in T.grid(max_len, head_dim):
                        out[r // kv_heads, r % kv_heads, t, d] = _value(kind, codes[r // kv_heads, r % kv_heads, t, d]) \
                            * (T.Cast(f32, sc[r // kv_heads, r % kv_heads, t, 0]) * T.float32(unit))
        return read

    w_len = max(1, residual + group - 1)
    half = head_dim // 2
    srows, scols = (-(-max_len // group), head_dim) if role == "k" else (max_len, 1)

    def row(t):
        return t // T.int64(group) if role == "k" else t

    def col(d):
        return d if role == "k" else 0

    @T.prim_func(private=True, s_tir=True)
    def read4(p_h: T.handle, c_h: T.handle, s_h: T.handle, m_h: T.handle, w_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        pos = T.match_buffer(p_h, (b, s), "int64")
        codes = T.match_buffer(c_h, (b, kv_heads, max_len, half), "uint8")
        sc = T.match_buffer(s_h, (b, kv_heads, srows, scols), "float16")
        mn = T.match_buffer(m_h, (b, kv_heads, srows, scols), "float16")
        win = T.match_buffer(w_h, (b, kv_heads, w_len, head_dim), f32)
        out = T.match_buffer(o_h, (b, kv_heads, max_len, head_dim), f32)
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads):
                n = T.alloc_buffer((2,), "int64", scope="local")     # tokens written, tokens quantised
                bi = r // kv_heads
                h = r % kv_heads
                n[0] = T.int64(-1)
                for i in range(s):
                    n[0] = T.max(n[0], pos[bi, i])
                n[0] = T.min(n[0], T.int64(max_len - 1)) + T.int64(1)
                n[1] = T.int64(group) * (T.max(n[0] - T.int64(residual), T.int64(0)) // T.int64(group))
                for t, d in T.grid(T.int64(max_len), T.int64(head_dim)):
                    if t < n[1]:
                        out[bi, h, t, d] = T.Cast(f32, (codes[bi, h, t, d // 2] >> T.Cast("uint8", d % 2 * 4))
                                                  & T.uint8(15)) * T.Cast(f32, sc[bi, h, row(t), col(d)]) \
                            + T.Cast(f32, mn[bi, h, row(t), col(d)])
                    elif t < n[0]:
                        out[bi, h, t, d] = win[bi, h, t % T.int64(w_len), d]
                    else:
                        out[bi, h, t, d] = T.float32(0)
    return read4


__all__ = ["PER_TOKEN", "kv4_attention_func", "kv4_write_func", "per_token_attention_func", "per_token_write_func",
           "read_func"]

"""Attention on an encoded KV cache's state (docs/kv_cache.md), one kernel that reads the codes where
the float attention kernel (decoder.attention_func) reads float rows, over the same visible slots,
and never materialises the float cache. The query heads sharing a kv head run together, so each
K and V row is decoded once for all of them (:func:`head_block` cuts the groups of few kv heads):

- ``kv8`` / ``kv-fp8``: a token's scale is one number per group of channels (kv-fp8: one group), so
  it multiplies that group's share of the q.k dot product of the codes, and the softmax weight
  before the group's p.v sums (E4M3 codes are read as float16 patterns,
  ``minifloat_codes.code_value``, whose power of two goes into the same product);
- ``kv4`` (KIVI): a key group's per-channel scale and minimum fold into the query once per group
  (``q * s`` deinterleaved into the even and odd channels of the packed nibbles, and ``q . m``), so
  each key costs the dot product of its nibbles; a value token's scale multiplies its softmax
  weight and its minimum sums into one number per query, added once. Tokens still in the float
  window are read as floats.
- ``kv-nvfp4``: the packed E2M1 codes (read as float16 patterns, as kv-fp8's) are summed per block
  of 16 channels against the query's even and odd channels, each block's sum multiplied by its
  E4M3 scale and the total by the token's float16 scale; on the value side the softmax weight times
  a block's scale weighs that block's codes.

A ``kv-f16`` cache needs no kernel here: its float16 rows are what the float attention kernel
reads, widened in registers (``decoder.attention_func(..., cache_dtype="float16")``).
"""
from __future__ import annotations

from ....ir.kvcache import KVNVFP4
from .kvcache import E2M1_UNIT, E4M3_UNIT, PER_TOKEN, code_float, code_unit, e2m1_float, fit_lanes
from .minifloat_codes import code_value


def head_block(heads: int, kv_heads: int, threads: int) -> tuple[int, int]:
    """(query heads one kernel iteration runs together, blocks per kv head): a kv head's whole
    group (its K and V rows decoded once for all of them) while the kv heads fill the ``threads``
    a decode step runs on (at most one row per query head), else the largest block that does."""
    group = heads // kv_heads
    want = max(1, min(threads, heads))
    for size in range(group, 0, -1):
        if group % size == 0 and kv_heads * (group // size) >= want:
            return size, group // size
    return 1, group


def per_token_attention_func(kind: str, heads: int, kv_heads: int, max_len: int, head_dim: int, scale: float,
                             window: int, softcap: float, lanes: int, threads: int = 1, group: int | None = None):
    """PrimFunc ``(q [b, h, s, d], k codes, k scale, v codes, v scale, positions [b, s], out)``:
    causal grouped-query attention over each query's visible slots (as decoder.attention_func) on
    ``kv8`` / ``kv-fp8`` codes, each token's scale per ``group`` channels (None: the head) taken
    out of its share of the dot products. The query heads sharing a kv head run together (in
    blocks, :func:`head_block`), so each K and V row is decoded once for all of them; (batch, head
    block, query) triples run in parallel."""
    from tvm.script import tirx as T
    code_dtype, _ = PER_TOKEN[kind]
    grp, blocks = head_block(heads, kv_heads, threads)
    seen = window if window else max_len + 1
    group = group or head_dim
    n_groups = head_dim // group
    vec = fit_lanes(group, lanes)
    chunks = group // vec
    unit = code_unit(kind)
    # with several scales a token, each group's softmax weights (p times its scale) go in rows of
    # their own below the scores; one scale a token weighs the scores in place
    wrow = grp if n_groups > 1 else 0
    f32 = "float32"

    @T.prim_func(private=True, s_tir=True)
    def attention(q_h: T.handle, kc_h: T.handle, ks_h: T.handle, vc_h: T.handle, vs_h: T.handle, p_h: T.handle,
                  o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, heads, s, head_dim), f32)
        kc = T.match_buffer(kc_h, (b, kv_heads, max_len, head_dim), code_dtype)
        ks = T.match_buffer(ks_h, (b, kv_heads, max_len, n_groups), "float16")
        vc = T.match_buffer(vc_h, (b, kv_heads, max_len, head_dim), code_dtype)
        vs = T.match_buffer(vs_h, (b, kv_heads, max_len, n_groups), "float16")
        pos = T.match_buffer(p_h, (b, s), "int64")
        out = T.match_buffer(o_h, (b, heads, s, head_dim), f32)
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads * blocks * s):
                scores = T.alloc_buffer((grp + wrow, max_len), f32, scope="global")
                acc = T.alloc_buffer((grp, head_dim), f32, scope="local")
                part = T.alloc_buffer((grp, vec), f32, scope="local")      # partial sums, per head
                scaled = T.alloc_buffer((grp, vec), f32, scope="local")    # the groups' scaled partial sums
                span = T.alloc_buffer((2,), "int64", scope="local")     # first slot, slot count
                top = T.alloc_buffer((grp,), f32, scope="local")
                total = T.alloc_buffer((grp,), f32, scope="local")
                bi = r // (kv_heads * blocks * s)
                kb = r // s % (kv_heads * blocks)       # the block of query heads
                kh = kb // T.int64(blocks)
                j = r % s
                span[1] = T.max(T.min(pos[bi, j], T.int64(max_len - 1)), T.int64(0)) + T.int64(1)
                span[0] = T.max(span[1] - T.int64(seen), T.int64(0))
                span[1] = span[1] - span[0]
                for hg in range(grp):
                    top[hg] = T.min_value(f32)
                for t in range(span[1]):
                    if n_groups > 1:
                        for hg in T.unroll(grp):
                            for dv in T.vectorized(vec):
                                scaled[hg, dv] = T.float32(0)
                    for gi in range(n_groups):
                        # the heads unrolled inside a chunk: its codes are decoded once, in registers
                        for hg in T.unroll(grp):
                            for dv in T.vectorized(vec):
                                part[hg, dv] = T.float32(0)
                        for do in range(chunks):
                            for hg in T.unroll(grp):
                                for dv in T.vectorized(vec):
                                    part[hg, dv] = part[hg, dv] + q[bi, kb * grp + hg, j, gi * group + do * vec + dv] \
                                        * code_float(kind, kc[bi, kh, span[0] + t, gi * group + do * vec + dv])
                        if n_groups > 1:
                            # the group's scale on its partial sums, still in lanes: one horizontal sum a token
                            for hg in T.unroll(grp):
                                for dv in T.vectorized(vec):
                                    scaled[hg, dv] = scaled[hg, dv] + part[hg, dv] * T.Cast(
                                        f32, ks[bi, kh, span[0] + t, gi])
                    for hg in range(grp):
                        scores[hg, t] = T.float32(0)
                        if n_groups > 1:
                            for dv in range(vec):
                                scores[hg, t] = scores[hg, t] + scaled[hg, dv]
                            scores[hg, t] = scores[hg, t] * T.float32(unit * scale)
                        else:
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
                for gi in range(n_groups):
                    for t in range(span[1]):
                        for hg in range(grp):
                            scores[wrow + hg, t] = scores[hg, t] * (T.Cast(f32, vs[bi, kh, span[0] + t, gi])
                                                                    * T.float32(unit))
                    # a chunk of the group's channels at a time over every token, its sums held in registers
                    for do in range(chunks):
                        for hg in T.unroll(grp):
                            for dv in T.vectorized(vec):
                                part[hg, dv] = T.float32(0)
                        for t in range(span[1]):
                            for hg in T.unroll(grp):
                                for dv in T.vectorized(vec):
                                    part[hg, dv] = part[hg, dv] + scores[wrow + hg, t] * code_float(
                                        kind, vc[bi, kh, span[0] + t, gi * group + do * vec + dv])
                        for hg in T.unroll(grp):
                            for dv in T.vectorized(vec):
                                acc[hg, gi * group + do * vec + dv] = part[hg, dv]
                for hg in range(grp):
                    total[hg] = T.float32(1) / total[hg]
                    for do in range(head_dim // vec):
                        for dv in T.vectorized(vec):
                            out[bi, kb * grp + hg, j, do * vec + dv] = acc[hg, do * vec + dv] * total[hg]
    return attention


def kv4_attention_func(heads: int, kv_heads: int, max_len: int, head_dim: int, group: int, residual: int,
                       scale: float, window: int, softcap: float, lanes: int, threads: int = 1):
    """PrimFunc ``(q [b, h, s, d], k codes, k scale, k min, k window, v codes, v scale, v min, v
    window, positions [b, s], out)``: causal grouped-query attention over each query's visible
    slots on a kv4 K and V state. A row's first ``q(n)`` slots (n: its largest position + 1) are
    read as codes, the rest from the windows. The packed nibbles are read as even and odd
    channels, vectorised over bytes, once per token for the query heads of a block (:func:`head_block`);
    (batch, head block, query) triples run in parallel."""
    from tvm.script import tirx as T
    grp, blocks = head_block(heads, kv_heads, threads)
    seen = window if window else max_len + 1
    w_len = max(1, residual + group - 1)
    groups = -(-max_len // group)
    half = head_dim // 2
    vec = fit_lanes(head_dim, lanes)
    hvec = fit_lanes(half, lanes)
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
            for r in T.parallel(b * kv_heads * blocks * s):
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
                bi = r // (kv_heads * blocks * s)
                kb = r // s % (kv_heads * blocks)       # the block of query heads
                kh = kb // T.int64(blocks)
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
                                qs[do * vec + dv] = q[bi, kb * grp + hg, j, do * vec + dv] * T.Cast(
                                    f32, ks[bi, kh, span[0] // T.int64(group) + g, do * vec + dv])
                                part[dv] = part[dv] + q[bi, kb * grp + hg, j, do * vec + dv] * T.Cast(
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
                                part[dv] = part[dv] + q[bi, kb * grp + hg, j, do * vec + dv] * kw[
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
                        out[bi, kb * grp + hg, j, 2 * i] = (ae[hg, i] + aw[hg, 2 * i] + num[3, hg]) * num[1, hg]
                        out[bi, kb * grp + hg, j, 2 * i + 1] = (ao[hg, i] + aw[hg, 2 * i + 1] + num[3, hg]) \
                            * num[1, hg]
    return attention


def nvfp4_attention_func(heads: int, kv_heads: int, max_len: int, head_dim: int, scale: float, window: int,
                         softcap: float, threads: int = 1):
    """PrimFunc ``(q [b, h, s, d], k codes, k block_scale, k scale, v codes, v block_scale, v scale,
    positions [b, s], out)``: causal grouped-query attention over each query's visible slots on a
    kv-nvfp4 K and V state. The packed nibbles are read as even and odd channels, a block of 16
    channels (8 bytes, vectorised) at a time, once per token for the query heads of a block
    (:func:`head_block`); (batch, head block, query) triples run in parallel."""
    from tvm.script import tirx as T
    grp, blocks = head_block(heads, kv_heads, threads)
    seen = window if window else max_len + 1
    nb, bb = head_dim // KVNVFP4.BLOCK, KVNVFP4.BLOCK // 2        # blocks a row, bytes a block
    half = head_dim // 2
    f32 = "float32"
    # the code values are read short of powers of two; the product's goes in once, with the scales
    unit = E2M1_UNIT * E4M3_UNIT

    def e4m3(code):
        return code_value("e4m3", code)

    @T.prim_func(private=True, s_tir=True)
    def attention(q_h: T.handle, kc_h: T.handle, kb_h: T.handle, ks_h: T.handle, vc_h: T.handle, vb_h: T.handle,
                  vs_h: T.handle, p_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, heads, s, head_dim), f32)
        kc = T.match_buffer(kc_h, (b, kv_heads, max_len, half), "uint8")
        kb = T.match_buffer(kb_h, (b, kv_heads, max_len, nb), "uint8")
        ks = T.match_buffer(ks_h, (b, kv_heads, max_len, 1), "float16")
        vc = T.match_buffer(vc_h, (b, kv_heads, max_len, half), "uint8")
        vb = T.match_buffer(vb_h, (b, kv_heads, max_len, nb), "uint8")
        vs = T.match_buffer(vs_h, (b, kv_heads, max_len, 1), "float16")
        pos = T.match_buffer(p_h, (b, s), "int64")
        out = T.match_buffer(o_h, (b, heads, s, head_dim), f32)
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads * blocks * s):
                scores = T.alloc_buffer((grp, max_len), f32, scope="global")
                qe = T.alloc_buffer((grp, half), f32, scope="local")     # the query's even channels
                qo = T.alloc_buffer((grp, half), f32, scope="local")     # odd channels
                ae = T.alloc_buffer((grp, half), f32, scope="local")     # sums of p * step * codes, even
                ao = T.alloc_buffer((grp, half), f32, scope="local")
                part = T.alloc_buffer((grp, bb), f32, scope="local")     # a block's partial sums, per head
                w = T.alloc_buffer((grp,), f32, scope="local")
                span = T.alloc_buffer((2,), "int64", scope="local")     # first slot, slot count
                top = T.alloc_buffer((grp,), f32, scope="local")
                total = T.alloc_buffer((grp,), f32, scope="local")
                bi = r // (kv_heads * blocks * s)
                kbk = r // s % (kv_heads * blocks)       # the block of query heads
                kh = kbk // T.int64(blocks)
                j = r % s
                span[1] = T.max(T.min(pos[bi, j], T.int64(max_len - 1)), T.int64(0)) + T.int64(1)
                span[0] = T.max(span[1] - T.int64(seen), T.int64(0))
                span[1] = span[1] - span[0]
                for hg in range(grp):
                    top[hg] = T.min_value(f32)
                    for i in range(half):
                        qe[hg, i] = q[bi, kbk * grp + hg, j, 2 * i]
                        qo[hg, i] = q[bi, kbk * grp + hg, j, 2 * i + 1]
                for t in range(span[1]):
                    for hg in range(grp):
                        scores[hg, t] = T.float32(0)
                    for k in range(nb):
                        # the heads unrolled inside a block: its nibbles are decoded once, in registers
                        for hg in T.unroll(grp):
                            for dv in T.vectorized(bb):
                                part[hg, dv] = qe[hg, k * bb + dv] * e2m1_float(kc[bi, kh, span[0] + t, k * bb + dv],
                                                                                False) \
                                    + qo[hg, k * bb + dv] * e2m1_float(kc[bi, kh, span[0] + t, k * bb + dv], True)
                        for hg in range(grp):
                            w[hg] = T.float32(0)
                            for dv in range(bb):
                                w[hg] = w[hg] + part[hg, dv]
                            scores[hg, t] = scores[hg, t] + w[hg] * e4m3(kb[bi, kh, span[0] + t, k])
                    for hg in range(grp):
                        scores[hg, t] = scores[hg, t] * (T.Cast(f32, ks[bi, kh, span[0] + t, 0])
                                                         * T.float32(scale * unit))
                        if softcap > 0:
                            scores[hg, t] = T.tanh(scores[hg, t] / T.float32(softcap)) * T.float32(softcap)
                        top[hg] = T.max(top[hg], scores[hg, t])
                for hg in range(grp):
                    total[hg] = T.float32(0)
                    for t in range(span[1]):
                        scores[hg, t] = T.exp(scores[hg, t] - top[hg])
                        total[hg] = total[hg] + scores[hg, t]
                    for i in range(half):
                        ae[hg, i] = T.float32(0)
                        ao[hg, i] = T.float32(0)
                for t in range(span[1]):
                    for hg in range(grp):
                        scores[hg, t] = scores[hg, t] * (T.Cast(f32, vs[bi, kh, span[0] + t, 0])
                                                         * T.float32(unit))
                    for k in range(nb):
                        for hg in range(grp):
                            w[hg] = scores[hg, t] * e4m3(vb[bi, kh, span[0] + t, k])
                        for hg in T.unroll(grp):
                            for dv in T.vectorized(bb):
                                ae[hg, k * bb + dv] = ae[hg, k * bb + dv] + w[hg] * e2m1_float(
                                    vc[bi, kh, span[0] + t, k * bb + dv], False)
                                ao[hg, k * bb + dv] = ao[hg, k * bb + dv] + w[hg] * e2m1_float(
                                    vc[bi, kh, span[0] + t, k * bb + dv], True)
                for hg in range(grp):
                    total[hg] = T.float32(1) / total[hg]
                    for i in range(half):
                        out[bi, kbk * grp + hg, j, 2 * i] = ae[hg, i] * total[hg]
                        out[bi, kbk * grp + hg, j, 2 * i + 1] = ao[hg, i] * total[hg]
    return attention


__all__ = ["head_block", "kv4_attention_func", "nvfp4_attention_func", "per_token_attention_func"]

"""TensorIR kernels of the decoder ops ``cache_update``, ``attention``, ``rope`` and ``rms_norm``
(float32).

Their primitive forms (passes/decompose.py) are correct on every backend but cost what a static
cache costs when written out in dense ops: the cache update is a one-hot product over every slot,
and attention scores every slot and masks the ones no query sees, so one decode step reads and
writes the whole cache of every layer whatever the context length. These kernels do what
llama.cpp's and ONNX Runtime GenAI's decode paths do instead:

- ``cache_update`` writes the new rows at their slots *in place* (the lowering calls it with
  ``call_tir_inplace``: the cache output is the cache input's buffer), so a step touches
  ``tokens x kv_heads x head_dim`` values of the cache;
- ``attention`` loops each query row over the slots it sees only, ``[positions - window + 1,
  positions]`` read from the positions tensor at run time, so a step at context ``c`` reads ``c``
  slots of K and V, not ``max_len``.

Both clamp slots to the cache (a position past it reads and writes the last slot instead of
memory outside the buffer); the runner that feeds positions keeps them inside, and the reference
kernels refuse them.

``rope`` and ``rms_norm`` are one kernel each where their primitive forms are a chain of small
ones (the angle table, its cosine and sine, the rotation; the square, the mean, the scaling): a
decode step runs these ops on one token per layer, so what it pays for is each kernel launch and
the VM's shape and allocation work around it, not the arithmetic.
"""
from __future__ import annotations


def cache_update_func(kv_heads: int, max_len: int, head_dim: int, lanes: int):
    """PrimFunc ``(cache [b, kvh, L, d], new [b, kvh, s, d], positions [b, s])`` writing
    ``new[:, :, j]`` into ``cache[:, :, positions[:, j]]``; the cache is updated in place."""
    from tvm.script import tirx as T
    vec = lanes if head_dim % lanes == 0 else 1

    @T.prim_func(private=True, s_tir=True)
    def cache_update(c_h: T.handle, n_h: T.handle, p_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        cache = T.match_buffer(c_h, (b, kv_heads, max_len, head_dim), "float32")
        new = T.match_buffer(n_h, (b, kv_heads, s, head_dim), "float32")
        pos = T.match_buffer(p_h, (b, s), "int64")
        with T.sblock("root"):
            for bi, h, j in T.grid(b, kv_heads, s):
                for do in range(head_dim // vec):
                    for dv in T.vectorized(vec):
                        cache[bi, h, T.max(T.min(pos[bi, j], T.int64(max_len - 1)), T.int64(0)),
                              do * vec + dv] = new[bi, h, j, do * vec + dv]
    return cache_update


def attention_func(heads: int, kv_heads: int, max_len: int, head_dim: int, scale: float, window: int,
                   softcap: float, lanes: int, threads: int = 1, cache_dtype: str = "float32"):
    """PrimFunc ``(q [b, h, s, d], k [b, kvh, L, d], v [b, kvh, L, d], positions [b, s], out [b, h,
    s, d])``: causal grouped-query attention, each query row over its visible slots only. The
    query heads sharing a kv head run together (in blocks: kvcache_attention.head_block), so each K
    and V row is read once for all of them, as the encoded-cache kernels read their codes; (batch,
    head block, query) triples run in parallel. Three passes over the slots: scores and their
    maximum, exponentials and their sum, then the weighted sum of V rows a chunk of channels at a
    time, its sums held in registers. K and V are ``cache_dtype``: float32, or float16 (a kv-f16
    cache's state, widened to float32 in registers as each chunk is loaded)."""
    from tvm.script import tirx as T
    from .kvcache_attention import head_block
    grp, blocks = head_block(heads, kv_heads, threads)
    seen = window if window else max_len + 1        # slots a query sees, at most
    vec = lanes if head_dim % lanes == 0 else 1
    chunks = head_dim // vec
    f32 = "float32"
    if cache_dtype not in ("float32", "float16"):
        raise ValueError(f"attention_func reads a float32 or float16 cache, not {cache_dtype}")

    def row(x):         # a K or V element as float32
        return x if cache_dtype == f32 else T.Cast(f32, x)

    @T.prim_func(private=True, s_tir=True)
    def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, p_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, heads, s, head_dim), f32)
        k = T.match_buffer(k_h, (b, kv_heads, max_len, head_dim), cache_dtype)
        v = T.match_buffer(v_h, (b, kv_heads, max_len, head_dim), cache_dtype)
        pos = T.match_buffer(p_h, (b, s), "int64")
        out = T.match_buffer(o_h, (b, heads, s, head_dim), f32)
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads * blocks * s):
                scores = T.alloc_buffer((grp, max_len), f32, scope="global")
                acc = T.alloc_buffer((grp, head_dim), f32, scope="local")
                part = T.alloc_buffer((grp, vec), f32, scope="local")      # partial sums, per head
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
                    for hg in T.unroll(grp):
                        for dv in T.vectorized(vec):
                            part[hg, dv] = T.float32(0)
                    for do in range(chunks):
                        for hg in T.unroll(grp):
                            for dv in T.vectorized(vec):
                                part[hg, dv] = part[hg, dv] + q[bi, kb * grp + hg, j, do * vec + dv] * row(k[
                                    bi, kh, span[0] + t, do * vec + dv])
                    for hg in range(grp):
                        scores[hg, t] = T.float32(0)
                        for dv in range(vec):
                            scores[hg, t] = scores[hg, t] + part[hg, dv]
                        scores[hg, t] = scores[hg, t] * T.float32(scale)
                        if softcap > 0:
                            scores[hg, t] = T.tanh(scores[hg, t] / T.float32(softcap)) * T.float32(softcap)
                        top[hg] = T.max(top[hg], scores[hg, t])
                for hg in range(grp):
                    total[hg] = T.float32(0)
                    for t in range(span[1]):
                        scores[hg, t] = T.exp(scores[hg, t] - top[hg])
                        total[hg] = total[hg] + scores[hg, t]
                for do in range(chunks):
                    for hg in T.unroll(grp):
                        for dv in T.vectorized(vec):
                            part[hg, dv] = T.float32(0)
                    for t in range(span[1]):
                        for hg in T.unroll(grp):
                            for dv in T.vectorized(vec):
                                part[hg, dv] = part[hg, dv] + scores[hg, t] * row(v[bi, kh, span[0] + t,
                                                                                    do * vec + dv])
                    for hg in T.unroll(grp):
                        for dv in T.vectorized(vec):
                            acc[hg, do * vec + dv] = part[hg, dv]
                for hg in range(grp):
                    total[hg] = T.float32(1) / total[hg]
                    for do in range(chunks):
                        for dv in T.vectorized(vec):
                            out[bi, kb * grp + hg, j, do * vec + dv] = acc[hg, do * vec + dv] * total[hg]
    return attention


def rope_func(heads: int, head_dim: int, rotary_dim: int, style: str, scale: float, switch_at: int):
    """PrimFunc ``(x [b, h, s, d], positions [b, s], inv_freq [r/2], inv_freq_long [r/2], out)``: the
    rotary embedding of the ``rope`` op. Angles are ``float(position) * inv_freq`` in float32, as the
    reference computes them; a call whose largest position + 1 exceeds ``switch_at`` uses the long
    table (an op without one passes ``inv_freq`` twice). Rows ``(b, s)`` run in parallel."""
    from tvm.script import tirx as T
    half = rotary_dim // 2
    f32 = "float32"
    # "half" pairs dim i with i + r/2 (Llama's rotate_half); "interleaved" pairs 2i with 2i + 1
    lo, hi = (lambda i: i, lambda i: i + half) if style == "half" else (lambda i: 2 * i, lambda i: 2 * i + 1)

    @T.prim_func(private=True, s_tir=True)
    def rope(x_h: T.handle, p_h: T.handle, f_h: T.handle, l_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        x = T.match_buffer(x_h, (b, heads, s, head_dim), f32)
        pos = T.match_buffer(p_h, (b, s), "int64")
        short = T.match_buffer(f_h, (half,), f32)
        long = T.match_buffer(l_h, (half,), f32)
        out = T.match_buffer(o_h, (b, heads, s, head_dim), f32)
        with T.sblock("root"):
            top = T.alloc_buffer((1,), "int64", scope="local")
            freq = T.alloc_buffer((half,), f32, scope="global")
            top[0] = T.int64(-1)
            for r in range(b * s):
                top[0] = T.max(top[0], pos[r // s, r % s])
            for i in range(half):
                freq[i] = T.if_then_else(top[0] + T.int64(1) > T.int64(switch_at), long[i], short[i])
            for r in T.parallel(b * s):
                cs = T.alloc_buffer((2, half), f32, scope="local")
                for i in range(half):
                    cs[0, i] = T.cos(T.Cast(f32, pos[r // s, r % s]) * freq[i]) * T.float32(scale)
                    cs[1, i] = T.sin(T.Cast(f32, pos[r // s, r % s]) * freq[i]) * T.float32(scale)
                for h in range(heads):
                    for i in range(half):
                        out[r // s, h, r % s, lo(i)] = (x[r // s, h, r % s, lo(i)] * cs[0, i]
                                                        - x[r // s, h, r % s, hi(i)] * cs[1, i])
                        out[r // s, h, r % s, hi(i)] = (x[r // s, h, r % s, hi(i)] * cs[0, i]
                                                        + x[r // s, h, r % s, lo(i)] * cs[1, i])
                    for i in range(head_dim - rotary_dim):
                        out[r // s, h, r % s, rotary_dim + i] = x[r // s, h, r % s, rotary_dim + i]
    return rope


def rms_norm_func(dim: int, eps: float, offset: float, lanes: int):
    """PrimFunc ``(x [rows, dim], weight [dim], out [rows, dim])``: ``x * rsqrt(mean(x^2) + eps) *
    (offset + weight)`` per row in float32, the sum of squares in ``lanes`` partial sums (an op
    without a weight passes zeros with offset 1). Rows run in parallel."""
    from tvm.script import tirx as T
    vec = lanes if dim % lanes == 0 else 1
    chunks = dim // vec
    f32 = "float32"

    @T.prim_func(private=True, s_tir=True)
    def rms_norm(x_h: T.handle, w_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, dim), f32)
        w = T.match_buffer(w_h, (dim,), f32)
        out = T.match_buffer(o_h, (rows, dim), f32)
        with T.sblock("root"):
            for r in T.parallel(rows):
                part = T.alloc_buffer((vec,), f32, scope="local")
                norm = T.alloc_buffer((1,), f32, scope="local")
                for dv in T.vectorized(vec):
                    part[dv] = T.float32(0)
                for do in range(chunks):
                    for dv in T.vectorized(vec):
                        part[dv] = part[dv] + x[r, do * vec + dv] * x[r, do * vec + dv]
                norm[0] = T.float32(0)
                for dv in range(vec):
                    norm[0] = norm[0] + part[dv]
                norm[0] = T.rsqrt(norm[0] / T.float32(dim) + T.float32(eps))
                for do in range(chunks):
                    for dv in T.vectorized(vec):
                        out[r, do * vec + dv] = x[r, do * vec + dv] * norm[0] * (
                            T.float32(offset) + w[do * vec + dv])

    return rms_norm


__all__ = ["attention_func", "cache_update_func", "rms_norm_func", "rope_func"]

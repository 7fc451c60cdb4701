"""TensorIR kernels of the kv-gear4 cache (docs/kv_cache.md): the in-place write, which quantises
each completed group as kv4 does after taking its outliers out and approximates its error at low
rank op for op in ir/ordered.py's float32 order (so the state, factors included, is the
interpreter's bit for bit), and the dequantised read (kv-gear4 has no fused attention kernel yet).
kvcache.py holds the other encodings' kernels and the rounding these share.
"""
from __future__ import annotations

from ....ir.kvcache import KVGear4
from .kvcache import code4, f16_sat, safe_ratio, window_macros


def _rounded(v):
    """float32 ``v`` (a product) rounded on its own: TVM builds with LLVM's floating-point
    contraction on, which would fuse a product into the add that takes it (one rounding, where
    ir/ordered.py rounds twice)."""
    from tvm import tirx
    return tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", v)


def _pow2(n: int) -> tuple[int, int]:
    """(the power of two ir/ordered.tree_sum pads ``n`` values to, its log2)."""
    width = 1 << max(n - 1, 0).bit_length()
    return width, width.bit_length() - 1


def gear4_write_func(role: str, kv_heads: int, max_len: int, head_dim: int, group: int, residual: int, rank: int,
                     outliers: int, where: str):
    """PrimFunc ``(new [b, kvh, s, d] f32, positions [b, s], codes, scale, min, window, outlier,
    outlier_index, a, b)`` (the kv-gear4 state, ir/kvcache.KVGear4.parts) writing a step in place:
    each group of G tokens the step completes has its outliers taken out, is quantised as kv4
    quantises it, and its error approximated at rank ``rank`` by subspace iteration, op for op in
    ir/ordered.py's float32 order; the window then holds the tokens not yet quantised. Positions
    as kv4's (an assertion naming ``where``). (batch, kv head) pairs run in parallel."""
    from tvm import tirx
    from tvm.script import tirx as T
    enc = KVGear4(role, group, residual, rank, outliers)
    g_len, rk = group, rank
    w_len = enc.window
    half = head_dim // 2
    groups = -(-max_len // group)
    srows = groups if role == "k" else max_len
    scols = head_dim if role == "k" else 1
    index_dtype = {p.name: p.dtype.name for p in enc.parts(max_len, head_dim)}["outlier_index"]
    wg, lg = _pow2(group)
    wd, ld = _pow2(head_dim)
    f32 = "float32"
    quantized, value, check, refill = window_macros("kv-gear4", max_len, head_dim, group, residual, where)

    @T.macro
    def tree(tmp, width, levels):
        # tmp[0] = ir/ordered.tree_sum of tmp[0 .. width - 1] (zeros past the values)
        for lv in range(levels):
            for i in range(T.shift_right(T.int32(width), lv + 1)):
                tmp[i] = tmp[i] + tmp[i + T.shift_right(T.int32(width), lv + 1)]

    @T.macro
    def gram_schmidt(x, n, width, levels, tmp, dot):
        # ir/ordered.gram_schmidt on the columns of x [n, rank], in place
        for j in range(rk):
            for qc in range(j):
                for i in range(width):
                    tmp[i] = T.Select(i < n, _rounded(x[T.min(i, n - 1), qc] * x[T.min(i, n - 1), j]), T.float32(0))
                tree(tmp, width, levels)
                dot[0] = tmp[0]
                for i in range(n):
                    x[i, j] = x[i, j] - _rounded(dot[0] * x[i, qc])
            for i in range(width):
                tmp[i] = T.Select(i < n, _rounded(x[T.min(i, n - 1), j] * x[T.min(i, n - 1), j]), T.float32(0))
            tree(tmp, width, levels)
            dot[0] = T.sqrt(tmp[0])
            for i in range(n):
                x[i, j] = safe_ratio(x[i, j], dot[0])

    @T.prim_func(private=True, s_tir=True)
    def write(n_h: T.handle, p_h: T.handle, c_h: T.handle, s_h: T.handle, m_h: T.handle, w_h: T.handle,
              o_h: T.handle, i_h: T.handle, a_h: T.handle, b_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        new = T.match_buffer(n_h, (b, kv_heads, s, head_dim), f32)
        pos = T.match_buffer(p_h, (b, s), "int64")
        codes = T.match_buffer(c_h, (b, kv_heads, max_len, half), "uint8")
        scale = T.match_buffer(s_h, (b, kv_heads, srows, scols), "float16")
        mins = T.match_buffer(m_h, (b, kv_heads, srows, scols), "float16")
        window = T.match_buffer(w_h, (b, kv_heads, w_len, head_dim), f32)
        out_v = T.match_buffer(o_h, (b, kv_heads, max_len, outliers), "float16")
        out_i = T.match_buffer(i_h, (b, kv_heads, max_len, outliers), index_dtype)
        fa = T.match_buffer(a_h, (b, kv_heads, max_len, rk), "float16")
        fb = T.match_buffer(b_h, (b, kv_heads, groups * rk, head_dim), "float16")
        with T.sblock("root"):
            check(pos, b, s)
            for r in T.parallel(b * kv_heads):
                ex = T.alloc_buffer((g_len, head_dim), f32, scope="global")    # the group: kept values, then errors
                vv = T.alloc_buffer((head_dim, rk), f32, scope="global")
                uu = T.alloc_buffer((g_len, rk), f32, scope="global")
                tmp = T.alloc_buffer((max(wg, wd),), f32, scope="global")
                mag = T.alloc_buffer((head_dim,), f32, scope="global")
                lo = T.alloc_buffer((head_dim,), f32, scope="global")
                hi = T.alloc_buffer((head_dim,), f32, scope="global")
                dot = T.alloc_buffer((1,), f32, scope="local")
                best = T.alloc_buffer((1,), "int32", scope="local")
                bi = r // kv_heads
                h = r % kv_heads
                p0 = pos[bi, 0]
                q_old = quantized(p0)
                q_new = quantized(p0 + s)
                for gi in range((q_new - q_old) // T.int64(g_len)):
                    first = q_old + gi * T.int64(g_len)
                    g = first // T.int64(g_len)
                    for t, d in T.grid(g_len, head_dim):
                        ex[t, d] = value(new, window, bi, h, first + t, p0, d)
                    # each token's outliers: largest magnitude first, equal ones lower index first
                    for t in range(g_len):
                        for d in range(head_dim):
                            mag[d] = T.fabs(ex[t, d])
                        for o in range(outliers):
                            best[0] = 0
                            dot[0] = T.float32(-1)          # below every magnitude: taken ones are marked so
                            for d in range(head_dim):
                                if mag[d] > dot[0]:
                                    dot[0] = mag[d]
                                    best[0] = d
                            out_v[bi, h, first + t, o] = f16_sat(ex[t, best[0]])
                            out_i[bi, h, first + t, o] = T.Cast(index_dtype, best[0])
                            mag[best[0]] = T.float32(-1)
                        for o in range(outliers):
                            ex[t, T.Cast("int32", out_i[bi, h, first + t, o])] = T.float32(0)
                    # kv4's codes of the kept values, and their error (0 at the outliers)
                    if role == "k":
                        for d in range(head_dim):
                            lo[d] = ex[0, d]
                            hi[d] = lo[d]
                        for t, d in T.grid(g_len - 1, head_dim):
                            lo[d] = T.min(lo[d], ex[t + 1, d])
                            hi[d] = T.max(hi[d], ex[t + 1, d])
                        for d in range(head_dim):
                            scale[bi, h, g, d] = f16_sat((hi[d] - lo[d]) / T.float32(15))
                            mins[bi, h, g, d] = f16_sat(lo[d])
                            lo[d] = T.Cast(f32, mins[bi, h, g, d])
                            hi[d] = T.Cast(f32, scale[bi, h, g, d])
                    for t in range(g_len):
                        if role == "v":
                            lo[0] = ex[t, 0]
                            hi[0] = lo[0]
                            for d in range(1, head_dim):
                                lo[0] = T.min(lo[0], ex[t, d])
                                hi[0] = T.max(hi[0], ex[t, d])
                            scale[bi, h, first + t, 0] = f16_sat((hi[0] - lo[0]) / T.float32(15))
                            mins[bi, h, first + t, 0] = f16_sat(lo[0])
                            lo[0] = T.Cast(f32, mins[bi, h, first + t, 0])
                            hi[0] = T.Cast(f32, scale[bi, h, first + t, 0])
                            for d in range(1, head_dim):
                                lo[d] = lo[0]
                                hi[d] = hi[0]
                        for i in range(half):
                            codes[bi, h, first + t, i] = T.Cast("uint8", code4(ex[t, 2 * i], lo[2 * i], hi[2 * i])
                                                                | (code4(ex[t, 2 * i + 1], lo[2 * i + 1],
                                                                          hi[2 * i + 1]) << 4))
                        for d in range(head_dim):
                            ex[t, d] = ex[t, d] - (_rounded(T.Cast(f32, code4(ex[t, d], lo[d], hi[d])) * hi[d])
                                                   + lo[d])
                        for o in range(outliers):
                            ex[t, T.Cast("int32", out_i[bi, h, first + t, o])] = T.float32(0)
                    # the error's rank-r approximation: subspace iteration from the Walsh signs
                    for k, j in T.grid(head_dim, rk):
                        vv[k, j] = T.Select(tirx.popcount(k & j) % 2 == 1, T.float32(-1), T.float32(1))
                    for it in range(enc.ITERATIONS):
                        for i, j in T.grid(g_len, rk):
                            for k in range(wd):
                                tmp[k] = T.Select(k < head_dim, _rounded(ex[i, T.min(k, head_dim - 1)]
                                                                         * vv[T.min(k, head_dim - 1), j]), T.float32(0))
                            tree(tmp, wd, ld)
                            uu[i, j] = tmp[0]
                        gram_schmidt(uu, g_len, wg, lg, tmp, dot)
                        for k, j in T.grid(head_dim, rk):
                            for i in range(wg):
                                tmp[i] = T.Select(i < g_len, _rounded(ex[T.min(i, g_len - 1), k]
                                                                      * uu[T.min(i, g_len - 1), j]), T.float32(0))
                            tree(tmp, wg, lg)
                            vv[k, j] = tmp[0]
                        gram_schmidt(vv, head_dim, wd, ld, tmp, dot)
                    for i, j in T.grid(g_len, rk):
                        for k in range(wd):
                            tmp[k] = T.Select(k < head_dim, _rounded(ex[i, T.min(k, head_dim - 1)]
                                                                     * vv[T.min(k, head_dim - 1), j]), T.float32(0))
                        tree(tmp, wd, ld)
                        fa[bi, h, first + i, j] = f16_sat(tmp[0])
                    for j, k in T.grid(rk, head_dim):
                        fb[bi, h, g * T.int64(rk) + j, k] = f16_sat(vv[k, j])
                refill(new, window, bi, h, p0, s, q_new)
    return write


def gear4_read_func(role: str, kv_heads: int, max_len: int, head_dim: int, group: int, residual: int, rank: int,
                     outliers: int):
    """kv-gear4's: kv4's codes dequantised, plus each token's row of A times its group's B (the
    rank-1 terms added in order), the outliers put back; the window's tokens as floats."""
    from tvm.script import tirx as T
    enc = KVGear4(role, group, residual, rank, outliers)
    w_len = enc.window
    half = head_dim // 2
    groups = -(-max_len // group)
    srows, scols = (groups, head_dim) if role == "k" else (max_len, 1)
    index_dtype = {p.name: p.dtype.name for p in enc.parts(max_len, head_dim)}["outlier_index"]
    f32 = "float32"

    def row(t):
        return t // T.int64(group) if role == "k" else t

    def col(d):
        return d if role == "k" else 0

    @T.prim_func(private=True, s_tir=True)
    def read(p_h: T.handle, c_h: T.handle, s_h: T.handle, m_h: T.handle, w_h: T.handle, o_h: T.handle,
             i_h: T.handle, a_h: T.handle, b_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        pos = T.match_buffer(p_h, (b, s), "int64")
        codes = T.match_buffer(c_h, (b, kv_heads, max_len, half), "uint8")
        sc = T.match_buffer(s_h, (b, kv_heads, srows, scols), "float16")
        mn = T.match_buffer(m_h, (b, kv_heads, srows, scols), "float16")
        win = T.match_buffer(w_h, (b, kv_heads, w_len, head_dim), f32)
        out_v = T.match_buffer(o_h, (b, kv_heads, max_len, outliers), "float16")
        out_i = T.match_buffer(i_h, (b, kv_heads, max_len, outliers), index_dtype)
        fa = T.match_buffer(a_h, (b, kv_heads, max_len, rank), "float16")
        fb = T.match_buffer(b_h, (b, kv_heads, groups * rank, head_dim), "float16")
        out = T.match_buffer(out_h, (b, kv_heads, max_len, head_dim), f32)
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads):
                n = T.alloc_buffer((2,), "int64", scope="local")     # tokens written, tokens quantised
                lr = T.alloc_buffer((1,), f32, scope="local")
                bi = r // kv_heads
                h = r % kv_heads
                n[0] = T.int64(-1)
                for i in range(s):
                    n[0] = T.max(n[0], pos[bi, i])
                n[0] = T.min(n[0], T.int64(max_len - 1)) + T.int64(1)
                n[1] = T.int64(group) * (T.max(n[0] - T.int64(residual), T.int64(0)) // T.int64(group))
                for t in range(T.int64(max_len)):
                    if t < n[1]:
                        for d in range(T.int64(head_dim)):
                            lr[0] = _rounded(T.Cast(f32, fa[bi, h, t, 0]) * T.Cast(
                                f32, fb[bi, h, t // T.int64(group) * T.int64(rank), d]))
                            for j in range(1, rank):
                                lr[0] = lr[0] + _rounded(T.Cast(f32, fa[bi, h, t, j]) * T.Cast(
                                    f32, fb[bi, h, t // T.int64(group) * T.int64(rank) + j, d]))
                            out[bi, h, t, d] = (_rounded(T.Cast(f32, (codes[bi, h, t, d // 2] >> T.Cast(
                                "uint8", d % 2 * 4)) & T.uint8(15)) * T.Cast(f32, sc[bi, h, row(t), col(d)]))
                                + T.Cast(f32, mn[bi, h, row(t), col(d)])) + lr[0]
                        for o in range(outliers):
                            out[bi, h, t, T.Cast("int64", out_i[bi, h, t, o])] = T.Cast(f32, out_v[bi, h, t, o])
                    else:
                        for d in range(T.int64(head_dim)):
                            if t < n[0]:
                                out[bi, h, t, d] = win[bi, h, t % T.int64(w_len), d]
                            else:
                                out[bi, h, t, d] = T.float32(0)
    return read


__all__ = ["gear4_read_func", "gear4_write_func"]

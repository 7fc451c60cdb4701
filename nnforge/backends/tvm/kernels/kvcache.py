"""TensorIR kernels of the encoded KV caches (docs/kv_cache.md): ``kv_cache_write`` in place on the
state tensors, and the dequantised cache for a ``kv_cache_read`` that no attention kernel fuses
(kvcache_attention.py reads the codes directly; a kv-f16 cache's float16 rows are read by the float
attention kernel, decoder.attention_func).

The writes round exactly as ``nnforge/ir/kvcache.py`` does (float32 divisions, never a multiply
by a reciprocal; ``nearbyint``, ties to even; float16 scales saturating), so their codes and
scales are the interpreter's on the same keys and values (kv-gear4's low-rank factors too: its
power iteration follows ir/ordered.py op for op). They are called with ``call_tir_inplace``: a step
touches the rows it writes (kv4, kv-gear4: the groups it completes and the window), never the
whole state. kv-gear4's kernels are in kvcache_gear.py.
"""
from __future__ import annotations

from ....ir.kvcache import KVNVFP4
from .minifloat_codes import FLOAT_UNIT, SCALE_FACTOR, code_value, minifloat_code

FP16_MAX = 65504.0
PER_TOKEN = {"kv8": ("int8", 127.0), "kv-fp8": ("uint8", 448.0)}      # code dtype, max|x| maps onto
# what a code_value of an E4M3 / E2M1 code is multiplied by to give the code's value (a power of
# two, so the product is exact)
E4M3_UNIT = SCALE_FACTOR["e4m3"]
E2M1_UNIT = FLOAT_UNIT["e2m1"] * SCALE_FACTOR["e2m1"]


def f16_sat(v):
    """float32 -> float16, nearest even, saturating at 65504 (ir/kvcache.f16)."""
    from tvm import tirx
    return tirx.Cast("float16", tirx.min(tirx.max(v, tirx.const(-FP16_MAX, "float32")),
                                         tirx.const(FP16_MAX, "float32")))


def safe_ratio(x, s):
    """``x / s`` where ``s > 0``, else 0 (the reference's guard against an all-zero token)."""
    from tvm import tirx
    zero, one = tirx.const(0, "float32"), tirx.const(1, "float32")
    return tirx.Select(s > zero, x / tirx.Select(s > zero, s, one), zero)


def _code(kind: str, ratio):
    from tvm import tirx
    if kind == "kv-fp8":
        return minifloat_code(ratio, "e4m3")
    return tirx.Cast("int8", tirx.min(tirx.max(tirx.nearbyint(ratio), tirx.const(-127, "float32")),
                                      tirx.const(127, "float32")))


def code_float(kind: str, code):
    """A code as float32, up to :func:`code_unit` (which the token's scale carries)."""
    return code_value("e4m3" if kind == "kv-fp8" else "int", code)


def code_unit(kind: str) -> float:
    """The power of two a :func:`code_float` value is short of the code's value."""
    return SCALE_FACTOR["e4m3"] if kind == "kv-fp8" else 1.0


def code4(x, m, s):
    """kv4's code of ``x`` (int32 0..15): clamp(round((x - m) / s), 0, 15), 0 where s is 0."""
    from tvm import tirx
    q = tirx.min(tirx.max(tirx.nearbyint(safe_ratio(x - m, s)), tirx.const(0, "float32")), tirx.const(15, "float32"))
    return tirx.Cast("int32", q)


def fit_lanes(n: int, lanes: int) -> int:
    """``lanes`` when they divide ``n`` (a vectorised loop), else 1."""
    return lanes if n % lanes == 0 else 1


def per_token_write_func(kind: str, kv_heads: int, max_len: int, head_dim: int, lanes: int, group: int | None = None):
    """PrimFunc ``(new [b, kvh, s, d] f32, positions [b, s], codes [b, kvh, L, d], scale [b, kvh,
    L, d / group] f16)`` writing each new token's codes and scales at its slot (``kv8``: int8, a
    scale per ``group`` channels; ``kv-fp8``: E4M3 bit patterns, one scale, ``group`` None: the
    head), in place. Tokens run in parallel."""
    from tvm.script import tirx as T
    code_dtype, top = PER_TOKEN[kind]
    group = group or head_dim
    n_groups = head_dim // group
    vec = fit_lanes(group, lanes)
    chunks = group // vec
    f32 = "float32"

    @T.prim_func(private=True, s_tir=True)
    def write(n_h: T.handle, p_h: T.handle, c_h: T.handle, s_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        new = T.match_buffer(n_h, (b, kv_heads, s, head_dim), f32)
        pos = T.match_buffer(p_h, (b, s), "int64")
        codes = T.match_buffer(c_h, (b, kv_heads, max_len, head_dim), code_dtype)
        scale = T.match_buffer(s_h, (b, kv_heads, max_len, n_groups), "float16")
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads * s):
                part = T.alloc_buffer((vec,), f32, scope="local")
                sc = T.alloc_buffer((1,), f32, scope="local")
                bi = r // (kv_heads * s)
                h = r // s % kv_heads
                j = r % s
                slot = T.max(T.min(pos[bi, j], T.int64(max_len - 1)), T.int64(0))
                for gi in range(n_groups):
                    for dv in T.vectorized(vec):
                        part[dv] = T.float32(0)
                    for do in range(chunks):
                        for dv in T.vectorized(vec):
                            part[dv] = T.max(part[dv], T.fabs(new[bi, h, j, gi * group + do * vec + dv]))
                    sc[0] = T.float32(0)
                    for dv in range(vec):
                        sc[0] = T.max(sc[0], part[dv])
                    scale[bi, h, slot, gi] = f16_sat(sc[0] / T.float32(top))
                    sc[0] = T.Cast(f32, scale[bi, h, slot, gi])
                    for do in range(chunks):
                        for dv in T.vectorized(vec):
                            codes[bi, h, slot, gi * group + do * vec + dv] = _code(
                                kind, safe_ratio(new[bi, h, j, gi * group + do * vec + dv], sc[0]))
    return write


def f16_write_func(kv_heads: int, max_len: int, head_dim: int, lanes: int):
    """PrimFunc ``(new [b, kvh, s, d] f32, positions [b, s], values [b, kvh, L, d] f16)`` writing
    each new token's values rounded to float16 (``kv-f16``, saturating as ir/kvcache.f16) at its
    slot, in place. Tokens run in parallel."""
    from tvm.script import tirx as T
    vec = fit_lanes(head_dim, lanes)
    chunks = head_dim // vec

    @T.prim_func(private=True, s_tir=True)
    def write(n_h: T.handle, p_h: T.handle, v_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        new = T.match_buffer(n_h, (b, kv_heads, s, head_dim), "float32")
        pos = T.match_buffer(p_h, (b, s), "int64")
        values = T.match_buffer(v_h, (b, kv_heads, max_len, head_dim), "float16")
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads * s):
                bi = r // (kv_heads * s)
                h = r // s % kv_heads
                j = r % s
                slot = T.max(T.min(pos[bi, j], T.int64(max_len - 1)), T.int64(0))
                for do in range(chunks):
                    for dv in T.vectorized(vec):
                        values[bi, h, slot, do * vec + dv] = f16_sat(new[bi, h, j, do * vec + dv])
    return write


def nvfp4_step(block_code, s2):
    """A kv-nvfp4 block's step, its E4M3 block scale times the token's float16 scale ``s2`` (as
    float32), rounded as ir/kvcache.KVNVFP4 rounds it."""
    from tvm import tirx
    return code_value("e4m3", block_code) * tirx.const(E4M3_UNIT, "float32") * s2


def e2m1_float(byte, high: bool):
    """The E2M1 code of a packed byte's low (first) or high nibble as float32, up to
    :data:`E2M1_UNIT` (which a kernel multiplies in once, with the scales)."""
    from tvm import tirx
    code = tirx.shift_right(byte, tirx.const(4, "uint8")) if high else byte    # code_value drops the high bits
    return code_value("e2m1", code)


def nvfp4_write_func(kv_heads: int, max_len: int, head_dim: int, lanes: int):
    """PrimFunc ``(new [b, kvh, s, d] f32, positions [b, s], codes [b, kvh, L, d/2] u8, block_scale
    [b, kvh, L, d/16] u8, scale [b, kvh, L, 1] f16)`` writing each new token at its slot, in place:
    the float16 token scale, an E4M3 scale per block of 16 values and the E2M1 codes packed two a
    byte (low nibble first). Tokens run in parallel."""
    from tvm.script import tirx as T
    blk = KVNVFP4.BLOCK
    blocks, half = head_dim // blk, head_dim // 2
    top = KVNVFP4.SCALE_TOP * KVNVFP4.TOP
    vec = fit_lanes(head_dim, lanes)
    chunks = head_dim // vec
    f32 = "float32"

    @T.prim_func(private=True, s_tir=True)
    def write(n_h: T.handle, p_h: T.handle, c_h: T.handle, b_h: T.handle, s_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        new = T.match_buffer(n_h, (b, kv_heads, s, head_dim), f32)
        pos = T.match_buffer(p_h, (b, s), "int64")
        codes = T.match_buffer(c_h, (b, kv_heads, max_len, half), "uint8")
        bscale = T.match_buffer(b_h, (b, kv_heads, max_len, blocks), "uint8")
        scale = T.match_buffer(s_h, (b, kv_heads, max_len, 1), "float16")
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads * s):
                part = T.alloc_buffer((vec,), f32, scope="local")
                sc = T.alloc_buffer((2,), f32, scope="local")      # the token's scale, a block's
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
                scale[bi, h, slot, 0] = f16_sat(sc[0] / T.float32(top))
                sc[0] = T.Cast(f32, scale[bi, h, slot, 0])
                for k in range(blocks):
                    sc[1] = T.float32(0)
                    for i in range(blk):
                        sc[1] = T.max(sc[1], T.fabs(new[bi, h, j, k * blk + i]))
                    bscale[bi, h, slot, k] = minifloat_code(safe_ratio(sc[1] / T.float32(KVNVFP4.TOP), sc[0]), "e4m3")
                    sc[1] = nvfp4_step(bscale[bi, h, slot, k], sc[0])
                    for i in range(blk // 2):
                        codes[bi, h, slot, k * (blk // 2) + i] = minifloat_code(
                            safe_ratio(new[bi, h, j, k * blk + 2 * i], sc[1]), "e2m1") | (minifloat_code(
                                safe_ratio(new[bi, h, j, k * blk + 2 * i + 1], sc[1]), "e2m1") << T.uint8(4))
    return write


def window_macros(kind: str, max_len: int, head_dim: int, group: int, residual: int, where: str):
    """(quantized(n), value(new, window, bi, h, p, p0, d), check(pos, b, s), refill(new, window, bi,
    h, p0, s, q_new)): what kv4's and kv-gear4's writes share. ``check`` asserts each row's positions
    consecutive and within the cache (the message names ``where``); ``refill`` leaves in the window
    the tokens q_new .. n-1."""
    from tvm import tirx
    from tvm.script import tirx as T
    w_len = max(1, residual + group - 1)
    broken = (f"{where}: a {kind} cache needs each row's positions consecutive, continuing the sequence, and "
              f"within its {max_len} slots; feed tokens in order, or use kv8 for this cache")

    def quantized(n):
        return T.int64(group) * (T.max(n - T.int64(residual), T.int64(0)) // T.int64(group))

    def value(new, window, bi, h, p, p0, d):
        """The float value of position ``p`` (the window's for earlier steps, else the step's)."""
        return tirx.if_then_else(p < p0, window[bi, h, p % T.int64(w_len), d], new[bi, h, T.max(p - p0, 0), d])

    @T.macro
    def check(pos, b, s):
        for r in range(b * s):
            assert pos[r // s, r % s] == pos[r // s, 0] + r % s, broken
            assert pos[r // s, 0] >= T.int64(0) and pos[r // s, 0] + s <= T.int64(max_len), broken

    @T.macro
    def refill(new, window, bi, h, p0, s, q_new):
        # each window row holds the one position of q_new .. n-1 (fewer than w_len) that maps
        # onto it, or zeros; a position before the step is already there
        for wr in range(w_len):
            for d in range(head_dim):
                if q_new + (T.int64(wr) - q_new) % T.int64(w_len) >= p0 + s:
                    window[bi, h, wr, d] = T.float32(0)
                elif q_new + (T.int64(wr) - q_new) % T.int64(w_len) >= p0:
                    window[bi, h, wr, d] = new[bi, h, q_new + (T.int64(wr) - q_new) % T.int64(w_len) - p0, d]
    return quantized, value, check, refill


def kv4_write_func(role: str, kv_heads: int, max_len: int, head_dim: int, group: int, residual: int, where: str):
    """PrimFunc ``(new [b, kvh, s, d] f32, positions [b, s], codes, scale, min, window)`` (the kv4
    state of a K or V cache, ir/kvcache.KV4.parts) writing a step in place: the groups (keys) or
    tokens (values) the step completes are quantised from the window's and the step's float
    values, and the window then holds the tokens not yet quantised. Each row's positions must be
    consecutive and within the cache: an assertion naming ``where`` otherwise. (batch, kv head)
    pairs run in parallel."""
    from tvm.script import tirx as T
    g_len = group
    w_len = max(1, residual + group - 1)
    half = head_dim // 2
    groups = -(-max_len // group)
    srows = groups if role == "k" else max_len
    scols = head_dim if role == "k" else 1
    f32 = "float32"
    quantized, value, check, refill = window_macros("kv4", max_len, head_dim, group, residual, where)

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
            check(pos, b, s)
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
                            scale[bi, h, g, d] = f16_sat((hi[d] - lo[d]) / T.float32(15))
                            mins[bi, h, g, d] = f16_sat(lo[d])
                            lo[d] = T.Cast(f32, mins[bi, h, g, d])
                            hi[d] = T.Cast(f32, scale[bi, h, g, d])
                        for t in range(g_len):
                            for i in range(half):
                                codes[bi, h, first + t, i] = T.Cast("uint8", code4(
                                    value(new, window, bi, h, first + t, p0, 2 * i), lo[2 * i], hi[2 * i])
                                    | (code4(value(new, window, bi, h, first + t, p0, 2 * i + 1), lo[2 * i + 1],
                                              hi[2 * i + 1]) << 4))
                else:
                    for t in range(q_new - q_old):
                        lo[0] = value(new, window, bi, h, q_old + t, p0, 0)
                        hi[0] = lo[0]
                        for d in range(1, head_dim):
                            lo[0] = T.min(lo[0], value(new, window, bi, h, q_old + t, p0, d))
                            hi[0] = T.max(hi[0], value(new, window, bi, h, q_old + t, p0, d))
                        scale[bi, h, q_old + t, 0] = f16_sat((hi[0] - lo[0]) / T.float32(15))
                        mins[bi, h, q_old + t, 0] = f16_sat(lo[0])
                        lo[0] = T.Cast(f32, mins[bi, h, q_old + t, 0])
                        hi[0] = T.Cast(f32, scale[bi, h, q_old + t, 0])
                        for i in range(half):
                            codes[bi, h, q_old + t, i] = T.Cast("uint8", code4(
                                value(new, window, bi, h, q_old + t, p0, 2 * i), lo[0], hi[0])
                                | (code4(value(new, window, bi, h, q_old + t, p0, 2 * i + 1), lo[0], hi[0]) << 4))
                refill(new, window, bi, h, p0, s, q_new)
    return write


def read_func(kind: str, role: str, kv_heads: int, max_len: int, head_dim: int, group: int = 1,
              residual: int = 0, rank: int = 0, outliers: int = 0):
    """PrimFunc ``(positions [b, s], *state, out [b, kvh, L, d] f32)``: the float cache the state
    stands for (ir/kvcache ``read``), for a ``kv_cache_read`` that no attention kernel fuses.
    ``group``: kv8's and kv-fp8's channels a scale, kv4's and kv-gear4's tokens a key group.
    (batch, kv head) pairs run in parallel."""
    from tvm.script import tirx as T
    f32 = "float32"
    if kind in PER_TOKEN:
        code_dtype, _ = PER_TOKEN[kind]
        unit = code_unit(kind)

        @T.prim_func(private=True, s_tir=True)
        def read(p_h: T.handle, c_h: T.handle, s_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            b, s = T.int64(), T.int64()
            T.match_buffer(p_h, (b, s), "int64")
            codes = T.match_buffer(c_h, (b, kv_heads, max_len, head_dim), code_dtype)
            sc = T.match_buffer(s_h, (b, kv_heads, max_len, head_dim // group), "float16")
            out = T.match_buffer(o_h, (b, kv_heads, max_len, head_dim), f32)
            with T.sblock("root"):
                for r in T.parallel(b * kv_heads):
                    for t, d in T.grid(max_len, head_dim):
                        out[r // kv_heads, r % kv_heads, t, d] = code_float(
                            kind, codes[r // kv_heads, r % kv_heads, t, d]) * (
                            T.Cast(f32, sc[r // kv_heads, r % kv_heads, t, d // group]) * T.float32(unit))
        return read

    if kind == "kv-nvfp4":
        return _nvfp4_read_func(kv_heads, max_len, head_dim)
    if kind == "kv-f16":
        return _f16_read_func(kv_heads, max_len, head_dim)
    if kind == "kv-gear4":
        from .kvcache_gear import gear4_read_func
        return gear4_read_func(role, kv_heads, max_len, head_dim, group, residual, rank, outliers)
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


def _f16_read_func(kv_heads: int, max_len: int, head_dim: int):
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def read(p_h: T.handle, v_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        T.match_buffer(p_h, (b, s), "int64")
        values = T.match_buffer(v_h, (b, kv_heads, max_len, head_dim), "float16")
        out = T.match_buffer(o_h, (b, kv_heads, max_len, head_dim), "float32")
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads):
                for t, d in T.grid(max_len, head_dim):
                    out[r // kv_heads, r % kv_heads, t, d] = T.Cast("float32",
                                                                    values[r // kv_heads, r % kv_heads, t, d])
    return read


def _nvfp4_read_func(kv_heads: int, max_len: int, head_dim: int):
    from tvm.script import tirx as T
    blk = KVNVFP4.BLOCK
    f32 = "float32"

    @T.prim_func(private=True, s_tir=True)
    def read(p_h: T.handle, c_h: T.handle, b_h: T.handle, s_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b, s = T.int64(), T.int64()
        T.match_buffer(p_h, (b, s), "int64")
        codes = T.match_buffer(c_h, (b, kv_heads, max_len, head_dim // 2), "uint8")
        bscale = T.match_buffer(b_h, (b, kv_heads, max_len, head_dim // blk), "uint8")
        sc = T.match_buffer(s_h, (b, kv_heads, max_len, 1), "float16")
        out = T.match_buffer(o_h, (b, kv_heads, max_len, head_dim), f32)
        with T.sblock("root"):
            for r in T.parallel(b * kv_heads):
                bi = r // kv_heads
                h = r % kv_heads
                for t, i in T.grid(max_len, head_dim // 2):
                    step = nvfp4_step(bscale[bi, h, t, 2 * i // blk], T.Cast(f32, sc[bi, h, t, 0]))
                    out[bi, h, t, 2 * i] = e2m1_float(codes[bi, h, t, i], False) * T.float32(E2M1_UNIT) * step
                    out[bi, h, t, 2 * i + 1] = e2m1_float(codes[bi, h, t, i], True) * T.float32(E2M1_UNIT) * step
    return read


__all__ = ["E2M1_UNIT", "E4M3_UNIT", "PER_TOKEN", "code4", "code_float", "code_unit", "e2m1_float", "f16_sat",
           "f16_write_func", "fit_lanes", "kv4_write_func", "nvfp4_step", "nvfp4_write_func", "per_token_write_func", "read_func",
           "safe_ratio", "window_macros"]

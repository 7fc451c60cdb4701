"""Decode attention over a KV cache read in its stored encoding: the ``attention`` op (causal
grouped-query attention, sliding window, softcap) for a query block of any length, with K and V
given as the state tensors the cache holds, decoded in registers a tile at a time.

Unlike the weight modules beside it this one packs nothing: the layouts it reads are the cache
encodings' (``nnforge/ir/kvcache.py``), so a bundle records no source for it.

    CacheView(rows, scale=None, codes="float" | "int8" | "e4m3", group=head_dim)
        rows [b, kv_heads, max_len, head_dim]: float32 / float16 values, int8 codes (kv8) or E4M3
        bit patterns (kv-fp8); scale [b, kv_heads, max_len, head_dim / group] float16, one per
        token and group of ``group`` channels; a value is ``code * scale``, as the reference reads it.
    >>> out = attention(q, CacheView(k), CacheView(v), positions, scale=d ** -0.5)

One program per (batch row, kv head, block of query tokens): the query heads that share the kv
head (and, in a prefill chunk, a few query tokens) are rows of one tile, so each cache row is
read once for the whole group, and the loop runs over the slots those queries see (the earliest
window start to the last position, read from ``positions`` on the device, each row masked to its
own), with an online softmax in float32. Nothing depends on the positions on the host, so a
decode step that calls it can be captured in a CUDA graph and replayed at any position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import KernelError, interpreting

try:
    import triton
    import triton.language as tl
except ModuleNotFoundError:          # the capability table says why (kernel_module)
    triton = tl = None

CODES = {"float": 0, "int8": 1, "e4m3": 2}
# elements of the [query heads, slots, head_dim] product a program holds at once: the broadcast
# product lives in registers, so the slot tile shrinks as heads x head_dim grows
TILE_ELEMENTS = 8192
# the interpreter pays per operation, not per element: far larger tiles, far fewer programs
INTERP_TILE_ELEMENTS = 1 << 18
# query tokens (of a prefill chunk) one program takes; a decode step has one
MAX_QUERY_BLOCK = 16


@dataclass
class CacheView:
    """One cache (K or V) as its state stores it (see the module doc)."""
    rows: torch.Tensor
    scale: torch.Tensor | None = None
    codes: str = "float"
    group: int | None = None


if triton is not None:
    from .minifloat import _to_f16

    @triton.jit
    def _load_tile(ptr, s_ptr, row, srow, slots, valid, offs_d, mask_d, stride_t, sstride_t,
                   CODE: tl.constexpr, GROUP: tl.constexpr):
        """float32 [BLOCK_N, BLOCK_D] values of cache rows ``slots`` (0 where not ``valid``)."""
        m = valid[:, None] & mask_d[None, :]
        c = tl.load(ptr + row + slots.to(tl.int64)[:, None] * stride_t + offs_d[None, :], mask=m, other=0)
        if CODE == 0:
            return c.to(tl.float32)
        s = tl.load(s_ptr + srow + slots.to(tl.int64)[:, None] * sstride_t + (offs_d // GROUP)[None, :],
                    mask=m, other=0).to(tl.float32)
        if CODE == 1:
            return c.to(tl.float32) * s
        return _to_f16(c.to(tl.int32), 4, 3, 7).to(tl.float32) * s

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, pos_ptr, o_ptr,
                                 sq_b, sq_h, sq_s, sk_b, sk_h, sk_t, sks_b, sks_h, sks_t,
                                 sv_b, sv_h, sv_t, svs_b, svs_h, svs_t, sp_b, so_b, so_h, so_s,
                                 KVH, G, S, D, scale, softcap, window,
                                 BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_D: tl.constexpr, K_CODE: tl.constexpr, K_GROUP: tl.constexpr,
                                 V_CODE: tl.constexpr, V_GROUP: tl.constexpr, SOFTCAP: tl.constexpr):
        # rows of the tile: (query token, query head of this kv head) pairs, each with its own position
        pid = tl.program_id(0)
        b = pid // KVH
        kvh = pid % KVH
        r = tl.arange(0, BLOCK_S * BLOCK_G)
        j = tl.program_id(1) * BLOCK_S + r // BLOCK_G
        head = kvh * G + r % BLOCK_G
        mask_r = (j < S) & (r % BLOCK_G < G)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        q_rows = b.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h + j.to(tl.int64) * sq_s
        q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        p = tl.load(pos_ptr + b.to(tl.int64) * sp_b + j, mask=mask_r, other=0).to(tl.int32)
        lo = tl.where(window > 0, tl.maximum(p - window + 1, 0), 0)
        start = tl.min(tl.where(mask_r, lo, 2147483647), axis=0)
        stop = tl.max(tl.where(mask_r, p + 1, 0), axis=0)
        k_row = b.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h
        ks_row = b.to(tl.int64) * sks_b + kvh.to(tl.int64) * sks_h
        v_row = b.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h
        vs_row = b.to(tl.int64) * svs_b + kvh.to(tl.int64) * svs_h
        m_i = tl.full((BLOCK_S * BLOCK_G,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_S * BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_S * BLOCK_G, BLOCK_D), tl.float32)
        for t0 in range(start, stop, BLOCK_N):
            slots = t0 + tl.arange(0, BLOCK_N)
            inside = slots < stop
            k = _load_tile(k_ptr, ks_ptr, k_row, ks_row, slots, inside, offs_d, mask_d, sk_t, sks_t, K_CODE, K_GROUP)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
            if SOFTCAP:
                # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf, and Triton has no tanh of its own
                s = (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0)) * softcap
            visible = (slots[None, :] <= p[:, None]) & (slots[None, :] >= lo[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # a row that has seen no slot yet stays at -inf: exp against 0 keeps its sums at 0, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            e = tl.exp(s - m_use[:, None])
            v = _load_tile(v_ptr, vs_ptr, v_row, vs_row, slots, inside, offs_d, mask_d, sv_t, svs_t, V_CODE, V_GROUP)
            l_i = l_i * alpha + tl.sum(e, axis=1)
            acc = acc * alpha[:, None] + tl.sum(e[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        out = acc / tl.where(mask_r, l_i, 1.0)[:, None]
        o_rows = b.to(tl.int64) * so_b + head.to(tl.int64) * so_h + j.to(tl.int64) * so_s
        tl.store(o_ptr + o_rows[:, None] + offs_d[None, :], out, mask=mask_r[:, None] & mask_d[None, :])


def _check_view(name: str, c: CacheView, q: torch.Tensor) -> int:
    """The view's channels per scale (its ``group``), after checking its tensors against ``q``."""
    if c.codes not in CODES:
        raise KernelError(f"attention: {name} cache codes {c.codes!r} is not one of {', '.join(CODES)}")
    r = c.rows
    if r.dim() != 4 or r.shape[0] != q.shape[0] or r.shape[3] != q.shape[3] or r.stride(3) != 1:
        raise KernelError(f"attention: {name} cache rows must be [batch {q.shape[0]}, kv_heads, max_len, "
                          f"{q.shape[3]}] with contiguous channels, got {list(r.shape)} strides {list(r.stride())}")
    want = {"float": (torch.float32, torch.float16, torch.bfloat16), "int8": (torch.int8,), "e4m3": (torch.uint8,)}
    if r.dtype not in want[c.codes]:
        raise KernelError(f"attention: {name} cache of {c.codes} codes must hold "
                          f"{' or '.join(str(t) for t in want[c.codes])}, got {r.dtype}")
    if c.codes == "float":
        return r.shape[3]
    group = c.group or r.shape[3]
    s = c.scale
    if s is None or s.dim() != 4 or list(s.shape) != [*r.shape[:3], r.shape[3] // group] or s.stride(3) != 1 \
            or r.shape[3] % group:
        raise KernelError(f"attention: {name} cache of {c.codes} codes needs a scale [{', '.join(map(str, r.shape[:3]))}, "
                          f"{r.shape[3] // group}] (one per token and group of {group} channels), got "
                          f"{None if s is None else list(s.shape)}")
    return group


def attention(q: torch.Tensor, k: CacheView, v: CacheView, positions: torch.Tensor, *, scale: float,
              window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """The ``attention`` op's value: float32 [b, h, s, d] for float32 ``q`` [b, h, s, d] over the
    caches ``k``, ``v`` (:class:`CacheView`), query j of row i at slot ``positions[i, j]``.
    Positions must lie in the cache (the caller checks them: this kernel does not read the host)."""
    if q.dim() != 4 or q.dtype != torch.float32 or positions.dim() != 2:
        raise KernelError(f"attention: q must be float32 [batch, heads, seq, head_dim] and positions [batch, seq], "
                          f"got q {q.dtype} {list(q.shape)}, positions {list(positions.shape)}")
    k_group, v_group = _check_view("k", k, q), _check_view("v", v, q)
    b, h, s, d = q.shape
    kvh = k.rows.shape[1]
    if v.rows.shape[:3] != k.rows.shape[:3] or kvh == 0 or h % kvh or list(positions.shape) != [b, s]:
        raise KernelError(f"attention: q {list(q.shape)}, k {list(k.rows.shape)}, v {list(v.rows.shape)} and positions "
                          f"{list(positions.shape)} do not fit (heads a multiple of kv heads, one position per query)")
    q = q if q.stride(3) == 1 else q.contiguous()
    positions = positions if positions.stride(1) == 1 else positions.contiguous()
    out = torch.empty_like(q)
    if q.numel() == 0:
        return out
    g = h // kvh
    block_g, block_d = triton.next_power_of_2(g), triton.next_power_of_2(d)
    budget = INTERP_TILE_ELEMENTS if interpreting() else TILE_ELEMENTS
    block_s = min(triton.next_power_of_2(s), max(1, budget // (16 * block_g * block_d)), MAX_QUERY_BLOCK)
    block_n = max(1, min(64, budget // (block_s * block_g * block_d)))
    block_n = 1 << (block_n.bit_length() - 1)
    ks = k.scale if k.scale is not None else k.rows
    vs = v.scale if v.scale is not None else v.rows
    _decode_attention_kernel[(b * kvh, triton.cdiv(s, block_s))](
        q, k.rows, ks, v.rows, vs, positions, out,
        q.stride(0), q.stride(1), q.stride(2), *k.rows.stride()[:3], *ks.stride()[:3],
        *v.rows.stride()[:3], *vs.stride()[:3], positions.stride(0), out.stride(0), out.stride(1), out.stride(2),
        kvh, g, s, d, float(scale), float(softcap) if softcap else 1.0, int(window),
        BLOCK_G=block_g, BLOCK_S=block_s, BLOCK_N=block_n, BLOCK_D=block_d,
        K_CODE=CODES[k.codes], K_GROUP=k_group, V_CODE=CODES[v.codes], V_GROUP=v_group, SOFTCAP=bool(softcap))
    return out


__all__ = ["CacheView", "attention", "CODES"]

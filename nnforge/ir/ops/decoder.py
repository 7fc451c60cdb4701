"""The ops a decoder LM needs beyond the others: RMS normalisation, rotary embeddings, the KV-cache
write and causal attention over the cache (grouped-query heads, sliding window, logit softcap).

Shapes follow transformers: activations ``[batch, heads, seq, head_dim]``, caches
``[batch, kv_heads, max_len, head_dim]``, ``positions`` ``[batch, seq]`` (each token's 0-based
position: the cache slot it writes and the last slot it reads). Kernels compute in float32 (or
the interpreter's wider float) with the operation order of transformers' eager code, so they are
the reference the decoder frontend and every backend are checked against.
"""
from __future__ import annotations

import math

import torch

from .. import symbolic as sym
from ..dtypes import int32, int64
from .registry import Attr, defop, same_dtype

ROPE_STYLES = ("half", "interleaved")
# Elements of one block of attention scores: queries are taken in chunks so that a long prompt
# against a long cache never holds a [batch, heads, seq, max_len] score tensor at once.
SCORE_BLOCK = 1 << 21


def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    """float32, or the input's own type when it is wider (the float64 interpreter)."""
    return torch.promote_types(dt, torch.float32)


def _activation(t, op: str, what: str, rank: int | None = None):
    if t.dtype.kind != "float":
        raise TypeError(f"{op} {what} must be a float tensor, got {t}")
    if rank is not None and t.rank != rank:
        raise ValueError(f"{op} {what} must have rank {rank}, got {t}")


def _positions(positions, batch, seq, op: str):
    if positions.dtype not in (int64, int32):
        raise TypeError(f"{op} positions must be int64 or int32, got {positions}")
    if positions.rank != 2 or not (sym.equal(positions.shape[0], batch) and sym.equal(positions.shape[1], seq)):
        raise ValueError(f"{op} positions {positions} must be [{batch}, {seq}] (batch, seq)")


def _same_dims(op: str, a_name: str, a, b_name: str, b, axes) -> None:
    for axis in axes:
        if not sym.equal(a.shape[axis], b.shape[axis]):
            raise ValueError(f"{op} {a_name} {a} and {b_name} {b} differ on axis {axis}")


def _finite(op: str, name: str, v: float, *, positive: bool = False, nonnegative: bool = False) -> None:
    if not math.isfinite(v) or (positive and v <= 0) or (nonnegative and v < 0):
        want = "a positive finite" if positive else "a non-negative finite" if nonnegative else "a finite"
        raise ValueError(f"{op} {name} must be {want} number, got {v}")


def check_positions_in_cache(positions: torch.Tensor, max_len: int, op: str) -> None:
    """Refuse positions outside the cache's slots 0..max_len-1, naming the first one found."""
    if positions.numel() == 0:
        return
    bad = (positions < 0) | (positions >= max_len)
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{op}: position {int(positions[b, j])} (batch row {b}, token {j}) is outside the cache's "
                         f"{max_len} slots 0..{max_len - 1}: the sequence is longer than the max_len the graph was "
                         "built for; build it with a larger max_len")


# --- rms_norm ------------------------------------------------------------------------------------
def _rms_norm_infer(x, weight=None, *, eps, offset):
    _activation(x, "rms_norm", "input")
    if x.rank < 1:
        raise ValueError(f"rms_norm needs an input of rank >= 1, got {x}")
    _finite("rms_norm", "eps", eps, positive=True)
    _finite("rms_norm", "offset", offset)
    if weight is None:
        if offset != 0.0:
            raise ValueError(f"rms_norm offset {offset} needs a weight (the scale is offset + weight); "
                             "pass the weight, or leave offset at 0")
        return x
    same_dtype(x, weight)
    if weight.rank != 1 or not sym.equal(weight.shape[0], x.shape[-1]):
        raise ValueError(f"rms_norm weight {weight} must be [{x.shape[-1]}] (the last dim of {x})")
    return x


def _rms_norm_ref(ctx, x, weight=None, *, eps, offset):
    h = x.to(_compute_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        # Gemma's order: (offset + weight) in float32, then the cast. With offset 0 it is
        # Llama's weight * h, as a float32 product is the same whichever side is cast first.
        h = h * (offset + weight.to(h.dtype))
    return h.to(x.dtype)


defop("rms_norm", ["x", "weight?"], {"eps": Attr("float"), "offset": Attr("float", 0.0)},
      infer=_rms_norm_infer, ref=_rms_norm_ref, family="decoder",
      doc="x * rsqrt(mean(x^2, -1) + eps) * (offset + weight), in float32 (Gemma: offset 1).")


# --- rope ----------------------------------------------------------------------------------------
def _rope_infer(x, positions, inv_freq, inv_freq_long=None, *, scale, style, rotary_dim, switch_at):
    _activation(x, "rope", "input", rank=4)
    _positions(positions, x.shape[0], x.shape[2], "rope")
    _activation(inv_freq, "rope", "inv_freq", rank=1)
    _finite("rope", "scale", scale, positive=True)
    if inv_freq_long is not None:
        _activation(inv_freq_long, "rope", "inv_freq_long", rank=1)
        if not inv_freq_long.same_as(inv_freq):
            raise ValueError(f"rope inv_freq_long {inv_freq_long} must have inv_freq's shape {inv_freq}")
        if switch_at < 1:
            raise ValueError(f"rope with inv_freq_long needs switch_at >= 1 (the length past which it is used), "
                             f"got {switch_at}")
    d = x.shape[3]
    if rotary_dim < 0 or rotary_dim % 2:
        raise ValueError(f"rope rotary_dim must be even and >= 0 (0: the whole head dim), got {rotary_dim}")
    if isinstance(d, int) and (rotary_dim > d or (rotary_dim == 0 and d % 2)):
        raise ValueError(f"rope rotary_dim {rotary_dim or d} must be even and at most the head dim {d}")
    rotated = rotary_dim or d
    if not sym.equal(sym.mul(inv_freq.shape[0], 2), rotated):
        raise ValueError(f"rope inv_freq {inv_freq} must hold one frequency per rotated pair "
                         f"({rotated} rotated dims: [{sym.floordiv(rotated, 2)}])")
    return x


def _rotate(x: torch.Tensor, style: str) -> torch.Tensor:
    """Each pair (a, b) becomes (-b, a): Llama's rotate_half pairs i with i + d/2, the
    interleaved (GPT-J, GGUF) form pairs 2i with 2i + 1."""
    if style == "half":
        a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-b, a), dim=-1)
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _rope_ref(ctx, x, positions, inv_freq, inv_freq_long=None, *, scale, style, rotary_dim, switch_at):
    rotated = rotary_dim or x.shape[-1]
    ct = _compute_dtype(x.dtype)
    if inv_freq_long is not None and positions.numel() and int(positions.max()) + 1 > switch_at:
        inv_freq = inv_freq_long
    freqs = positions[..., None].to(ct) * inv_freq.to(ct)                       # [b, s, rotated/2]
    emb = torch.cat((freqs, freqs), -1) if style == "half" else torch.repeat_interleave(freqs, 2, -1)
    cos = (emb.cos() * scale).to(x.dtype)[:, None]                               # [b, 1, s, rotated]
    sin = (emb.sin() * scale).to(x.dtype)[:, None]
    rot = x[..., :rotated]
    out = rot * cos + _rotate(rot, style) * sin
    return torch.cat((out, x[..., rotated:]), -1) if rotated < x.shape[-1] else out


defop("rope", ["x", "positions", "inv_freq", "inv_freq_long?"],
      {"scale": Attr("float", 1.0), "style": Attr("str", "half", ROPE_STYLES), "rotary_dim": Attr("int", 0),
       "switch_at": Attr("int", 0)},
      infer=_rope_infer, ref=_rope_ref, family="decoder",
      doc="Rotary embedding of x [b, h, s, d] at positions [b, s]: angles positions x inv_freq, cos/sin "
          "times scale; style half (Llama) or interleaved (GPT-J) pairs; dims past rotary_dim (0: d) pass. "
          "With inv_freq_long, a call whose largest position + 1 exceeds switch_at uses it instead "
          "(Phi-3's longrope, as transformers switches per forward call).")


# --- cache_update --------------------------------------------------------------------------------
def _cache_update_infer(cache, new, positions):
    _activation(cache, "cache_update", "cache", rank=4)
    _activation(new, "cache_update", "new", rank=4)
    same_dtype(cache, new)
    _same_dims("cache_update", "new", new, "cache", cache, (0, 1, 3))
    _positions(positions, cache.shape[0], new.shape[2], "cache_update")
    s, max_len = new.shape[2], cache.shape[2]
    if isinstance(s, int) and isinstance(max_len, int) and s > max_len:
        raise ValueError(f"cache_update writes {s} tokens into a cache of {max_len} slots")
    return cache


def _cache_update_ref(ctx, cache, new, positions):
    check_positions_in_cache(positions, cache.shape[2], "cache_update")
    pos = positions.to(torch.int64)
    if pos.shape[1] > 1:
        ordered = pos.sort(-1).values
        twice = ordered[:, 1:] == ordered[:, :-1]
        if bool(twice.any()):
            b, j = (int(i) for i in twice.nonzero()[0])
            raise ValueError(f"cache_update: batch row {b} writes slot {int(ordered[b, j])} twice; each token of a "
                             "row needs its own position")
    index = pos[:, None, :, None].expand(new.shape)
    return cache.clone().scatter_(2, index, new.to(cache.dtype))


defop("cache_update", ["cache", "new", "positions"], infer=_cache_update_infer, ref=_cache_update_ref,
      family="decoder",
      doc="The cache [b, kvh, L, d] with new[:, :, j] written at slot positions[:, j] (distinct, < L).")


# --- attention -----------------------------------------------------------------------------------
def _attention_infer(q, k, v, positions, *, scale, window, softcap):
    _activation(q, "attention", "q", rank=4)
    _activation(k, "attention", "k", rank=4)
    _activation(v, "attention", "v", rank=4)
    same_dtype(q, k, v)
    if not k.same_as(v):
        raise ValueError(f"attention k {k} and v {v} must have one shape [batch, kv_heads, max_len, head_dim]")
    _same_dims("attention", "q", q, "k", k, (0, 3))
    h, kvh = q.shape[1], k.shape[1]
    if isinstance(h, int) and isinstance(kvh, int) and (kvh == 0 or h % kvh):
        raise ValueError(f"attention q has {h} heads, not a multiple of the {kvh} kv heads of k and v")
    _positions(positions, q.shape[0], q.shape[2], "attention")
    _finite("attention", "scale", scale, positive=True)
    _finite("attention", "softcap", softcap, nonnegative=True)
    if window < 0:
        raise ValueError(f"attention window must be >= 0 (0: no sliding window), got {window}")
    return q


def _attention_ref(ctx, q, k, v, positions, *, scale, window, softcap):
    b, h, s, d = q.shape
    kvh, max_len = k.shape[1], k.shape[2]
    if kvh == 0 or h % kvh:
        raise ValueError(f"attention q has {h} heads, not a multiple of the {kvh} kv heads of k and v")
    check_positions_in_cache(positions, max_len, "attention")
    out = torch.empty_like(q)
    if q.numel() == 0:
        return out
    pos = positions.to(torch.int64)
    # Slots no query sees only add exact zeros to the softmax: leave them out.
    hi = int(pos.max()) + 1
    lo = max(0, int(pos.min()) - window + 1) if window else 0
    k, v = k[:, :, lo:hi], v[:, :, lo:hi]
    slots = torch.arange(lo, hi)
    ct = _compute_dtype(q.dtype)
    # The g query heads that share one kv head are rows of one product (no repeat_kv copy).
    g = h // kvh
    qg = q.reshape(b, kvh, g, s, d)
    chunk = max(1, SCORE_BLOCK // (b * h * (hi - lo)))
    for j0 in range(0, s, chunk):
        j1 = min(s, j0 + chunk)
        c = j1 - j0
        rows = qg[:, :, :, j0:j1].reshape(b, kvh, g * c, d)
        scores = (torch.matmul(rows, k.transpose(2, 3)) * scale).view(b, kvh, g, c, hi - lo)
        if softcap:
            scores.div_(softcap).tanh_().mul_(softcap)
        p = pos[:, j0:j1, None]                                                  # [b, c, 1]
        visible = slots <= p
        if window:
            visible &= p - slots < window
        scores.masked_fill_(~visible[:, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=ct).to(q.dtype)
        ctx_rows = torch.matmul(probs.view(b, kvh, g * c, hi - lo), v)
        out[:, :, j0:j1] = ctx_rows.view(b, h, c, d)
    return out


defop("attention", ["q", "k", "v", "positions"],
      {"scale": Attr("float"), "window": Attr("int", 0), "softcap": Attr("float", 0.0)},
      infer=_attention_infer, ref=_attention_ref, family="decoder",
      doc="Causal grouped-query attention of q [b, h, s, d] over the cache k, v [b, kvh, L, d]: query j "
          "sees slot t iff t <= positions[:, j] and (window == 0 or positions[:, j] - t < window); "
          "softcap c > 0 maps logits to tanh(logits / c) * c; softmax in float32.")

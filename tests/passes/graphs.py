"""Graphs shared by the pass tests, built from real (seeded torch-initialised) weights."""
from __future__ import annotations

import torch

from nnforge.ir import Dense, Graph, tensor
from tests.conftest import tiny_mlp


def mlp_graph(model=None) -> Graph:
    """conftest.tiny_mlp as IR: x[batch, 16] -> fc1 (16->32) -> gelu -> fc2 (32->8)."""
    model = model or tiny_mlp()
    fc1, fc2 = model[0], model[2]
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", 16))
    w1 = g.add_weight("fc1.weight", Dense(fc1.weight.detach().clone()))
    b1 = g.add_weight("fc1.bias", Dense(fc1.bias.detach().clone()))
    w2 = g.add_weight("fc2.weight", Dense(fc2.weight.detach().clone()))
    b2 = g.add_weight("fc2.bias", Dense(fc2.bias.detach().clone()))
    h = g.op("linear", x, w1, b1, name="fc1")
    a = g.op("gelu", h, name="act")
    g.set_outputs([g.op("linear", a, w2, b2, name="fc2")])
    return g


def inputs(n: int = 6, seed: int = 0, features: int = 16) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed))


def weight_bytes(g: Graph) -> int:
    return sum(v.encoding.nbytes for v in g.weights.values())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(-1).double(), b.reshape(-1).double(), dim=0))


# --- a decoder attention block (the decoder ops) -------------------------------------------------
B, H, KVH, L, D = 2, 4, 2, 16, 8


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def decoder_block(*, window=0, softcap=0.0, style="half", rotary_dim=0, offset=0.0, group=H // KVH,
                  switch_at=0) -> Graph:
    """One attention block over a cache: norm, rotary q/k, cache write, attention. ``switch_at``:
    a second rope table (longrope) for calls past that length."""
    heads = KVH * group
    g = Graph("block")
    x = g.add_input("x", tensor("f32", "batch", heads, "seq", D))
    kv = g.add_input("kv", tensor("f32", "batch", KVH, "seq", D))
    pos = g.add_input("positions", tensor("i64", "batch", "seq"))
    cache = g.add_input("cache", tensor("f32", "batch", KVH, L, D))
    w = g.add_weight("norm.weight", Dense(_randn(D, seed=3) * 0.1))
    rotated = rotary_dim or D
    inv = g.add_weight("inv_freq", Dense(1.0 / 10000 ** (torch.arange(0, rotated, 2).float() / rotated)))
    tables, extra = (inv,), {}
    if switch_at:
        tables = (inv, g.add_weight("inv_freq_long", Dense(inv.encoding.decode(torch.float32) / 3.0)))
        extra = {"switch_at": switch_at}
    q = g.op("rope", g.op("rms_norm", x, w, eps=1e-6, offset=offset), pos, *tables, style=style,
             rotary_dim=rotary_dim, scale=1.25, **extra)
    k = g.op("rope", kv, pos, *tables, style=style, rotary_dim=rotary_dim, **extra)
    new_cache = g.op("cache_update", cache, k, pos)
    out = g.op("attention", q, new_cache, new_cache, pos, scale=D ** -0.5, window=window, softcap=softcap)
    g.set_outputs([out, new_cache])
    return g


def decoder_inputs(seq, start, group=H // KVH, seed=0):
    """Inputs for decoder_block: ``seq`` tokens from position ``start`` (row 1 one further on),
    the cache filled up to the last slot they read."""
    positions = torch.arange(start, start + seq).repeat(B, 1)
    positions[1] += 1                                  # rows at different places in their sequence
    cache = torch.zeros(B, KVH, L, D)
    cache[:, :, :start + 1] = _randn(B, KVH, start + 1, D, seed=seed + 2)
    return [_randn(B, KVH * group, seq, D, seed=seed), _randn(B, KVH, seq, D, seed=seed + 1), positions, cache]

"""The decoder ops written out in the primitive ops every backend lowers: what a backend without its
own kernel for ``rms_norm``, ``rope``, ``cache_update`` or ``attention`` asks for in its
``prepare`` (like the decomposition tables of torch._decomp and TVM Relax's legalisation).

    >>> DecomposeOps(ops=["attention", "cache_update"])(graph)

Each form computes what the op's reference kernel computes, in the same float32 order, with two
differences a backend with a native kernel does not have: ``attention`` scores every cache slot and
masks the ones no query sees (the reference skips them; both give those slots an exact zero weight,
so cache slots must hold finite values, as a cache that starts at zeros does), and
``cache_update`` is a one-hot product that does not refuse out-of-cache or repeated positions (the
runner that feeds positions keeps them inside the cache).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ir import Graph, Node, Value, symbolic as sym
from ..ir.dtypes import float32
from ..registry import Registry
from .base import Pass, PassContext, PassError, register_pass

# op -> function writing its primitive form before the node; returns the value replacing its output
FORMS: Registry[Callable[["_Builder", Node], Value]] = Registry("decomposition")


class _Builder:
    """New nodes named after the node they replace, and shared scalar constants."""

    def __init__(self, graph: Graph, node: Node):
        self.g, self.node = graph, node

    def op(self, op: str, *inputs, **attrs) -> Value:
        name = self.g.fresh_name(f"{self.node.name}.{op}", node=True)
        return self.g.add_node(op, inputs, attrs, name=name, meta=dict(self.node.meta)).output

    def const(self, value, dt) -> Value:
        """A scalar as a ``full`` node, not a weight: prepare passes run after the bundle's weights
        are written, and a backend reads its weights from there."""
        return self.op("full", shape=[], value=value, dtype=dt)

    def cast(self, v: Value, dt) -> Value:
        return v if v.dtype == dt else self.op("cast", v, dtype=dt)

    @staticmethod
    def compute_dtype(v: Value):
        """float32, or ``v``'s own type when it is wider (the ops' kernels compute so)."""
        return v.dtype if v.dtype.is_float and v.dtype.bits > 32 else float32

    def compute(self, v: Value) -> Value:
        return self.cast(v, self.compute_dtype(v))


@FORMS.register("rms_norm")
def _rms_norm(b: _Builder, n: Node) -> Value:
    x = n.inputs[0]
    weight = n.inputs[1] if len(n.inputs) > 1 else None
    h = b.compute(x)
    mean_sq = b.op("reduce_mean", b.op("mul", h, h), axes=[-1], keepdim=True)
    h = b.op("mul", h, b.op("rsqrt", b.op("add", mean_sq, b.const(n.attrs["eps"], h.dtype))))
    if weight is not None:
        w = b.cast(weight, h.dtype)
        if n.attrs["offset"]:
            w = b.op("add", b.const(n.attrs["offset"], h.dtype), w)
        h = b.op("mul", h, w)
    return b.cast(h, x.dtype)


@FORMS.register("rope")
def _rope(b: _Builder, n: Node) -> Value:
    x, positions, inv_freq = n.inputs[:3]
    long = n.inputs[3] if len(n.inputs) > 3 else None
    batch, heads, seq, d = x.shape
    if long is not None:            # the long table once the call's largest position + 1 passes switch_at
        top = b.op("reduce_max", positions, axes=[0, 1], keepdim=False)
        past = b.op("ge", top, b.const(n.attrs["switch_at"], positions.dtype))
        inv_freq = b.op("where", past, long, inv_freq)
    rotated = n.attrs["rotary_dim"] or d
    half = rotated // 2
    style, scale = n.attrs["style"], n.attrs["scale"]
    ct = b.compute_dtype(x)
    pos = b.op("reshape", b.cast(positions, ct), shape=[batch, seq, 1])
    freqs = b.op("mul", pos, b.cast(inv_freq, ct))                               # [b, s, r/2]
    if style == "half":
        emb = b.op("concat", freqs, freqs, axis=-1)
    else:                                                                         # f0 f0 f1 f1 ...
        pairs = b.op("expand", b.op("reshape", freqs, shape=[batch, seq, half, 1]), shape=[batch, seq, half, 2])
        emb = b.op("reshape", pairs, shape=[batch, seq, rotated])

    def table(fn: str) -> Value:
        t = b.op(fn, emb)
        if scale != 1.0:
            t = b.op("mul", t, b.const(scale, ct))
        return b.op("reshape", b.cast(t, x.dtype), shape=[batch, 1, seq, rotated])

    cos, sin = table("cos"), table("sin")
    rot = x if rotated == d else b.op("slice", x, axis=3, start=0, end=rotated)
    if style == "half":
        first = b.op("slice", rot, axis=3, start=0, end=half)
        second = b.op("slice", rot, axis=3, start=half, end=rotated)
        turned = b.op("concat", b.op("neg", second), first, axis=3)
    else:                                                                         # (a, b) -> (-b, a) per pair
        even = b.op("slice", rot, axis=3, start=0, end=rotated, step=2)
        odd = b.op("slice", rot, axis=3, start=1, end=rotated, step=2)
        shape5 = [batch, heads, seq, half, 1]
        turned = b.op("reshape", b.op("concat", b.op("reshape", b.op("neg", odd), shape=shape5),
                                      b.op("reshape", even, shape=shape5), axis=4),
                      shape=[batch, heads, seq, rotated])
    out = b.op("add", b.op("mul", rot, cos), b.op("mul", turned, sin))
    if rotated == d:
        return out
    return b.op("concat", out, b.op("slice", x, axis=3, start=rotated, end=d), axis=3)


def _slots(b: _Builder, positions: Value, cache: Value) -> tuple[Value, Value]:
    """Positions as [b, 1, s, 1] and the cache's slot numbers [max_len] in the positions' type."""
    batch, seq = positions.shape
    pos = b.op("reshape", positions, shape=[batch, 1, seq, 1])
    return pos, b.op("arange", start=0, end=cache.shape[2], dtype=positions.dtype)


@FORMS.register("cache_update")
def _cache_update(b: _Builder, n: Node) -> Value:
    cache, new, positions = n.inputs
    batch, kv_heads, max_len, d = cache.shape
    seq = new.shape[2]
    pos, slots = _slots(b, positions, cache)
    hit = b.op("eq", b.op("reshape", pos, shape=[batch, seq, 1]), slots)          # [b, s, L]
    # one-hot [b, kvh, L, s] @ new [b, kvh, s, d]: each written slot gets its one token's row
    onehot = b.op("permute", b.cast(hit, cache.dtype), perm=[0, 2, 1])
    onehot = b.op("expand", b.op("reshape", onehot, shape=[batch, 1, max_len, seq]),
                  shape=[batch, kv_heads, max_len, seq])
    written = b.op("matmul", onehot, new)
    any_hit = b.op("reshape", b.op("reduce_any", hit, axes=[1]), shape=[batch, 1, max_len, 1])
    return b.op("where", any_hit, written, cache)


@FORMS.register("attention")
def _attention(b: _Builder, n: Node) -> Value:
    """Scores are computed as k [L, d] @ q^T [d, g*s] per kv head and then transposed, so that the
    cache is never transposed nor copied per query head (repeat_kv): only q and the scores move.
    The g query heads that share a kv head are rows of one product, and the softmax runs over the
    last axis (where compilers schedule it well)."""
    q, k, v, positions = n.inputs
    batch, heads, seq, d = q.shape
    kv_heads, max_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    rows = group * seq if isinstance(seq, int) else sym.mul(group, seq)
    qt = b.op("permute", b.op("reshape", q, shape=[batch, kv_heads, rows, d]), perm=[0, 1, 3, 2])  # [b, kvh, d, g*s]
    scores = b.op("permute", b.op("matmul", k, qt), perm=[0, 1, 3, 2])              # [b, kvh, g*s, L]
    scores = b.op("mul", scores, b.const(n.attrs["scale"], q.dtype))
    if n.attrs["softcap"]:
        cap = b.const(n.attrs["softcap"], q.dtype)
        scores = b.op("mul", b.op("tanh", b.op("div", scores, cap)), cap)
    batch_p, seq_p = positions.shape
    pos = b.op("reshape", positions, shape=[batch_p, 1, 1, seq_p, 1])              # [b, 1, 1, s, 1]
    slots = b.op("arange", start=0, end=max_len, dtype=positions.dtype)             # [L]
    visible = b.op("le", slots, pos)                                                # [b, 1, 1, s, L]
    if n.attrs["window"]:
        near = b.op("lt", b.op("sub", pos, slots), b.const(n.attrs["window"], positions.dtype))
        visible = b.op("and", visible, near)
    ct = b.compute_dtype(q)
    scores = b.op("reshape", b.cast(scores, ct), shape=[batch, kv_heads, group, seq, max_len])
    # Hidden slots get the lowest finite float, as transformers' masks do, not -inf: the softmax
    # weight underflows to the same exact zero (a visible slot always exists: a token's own), and
    # not every compiler takes an infinite constant (TVM's relax build does not).
    lowest = torch.finfo(ct.torch_dtype).min
    scores = b.op("where", visible, scores, b.const(lowest, ct))
    probs = b.cast(b.op("softmax", scores, axis=-1), q.dtype)
    out = b.op("matmul", b.op("reshape", probs, shape=[batch, kv_heads, rows, max_len]), v)   # [b, kvh, g*s, d]
    return b.op("reshape", out, shape=[batch, heads, seq, d])


@register_pass
@dataclass
class DecomposeOps(Pass):
    """Every node of the ops named (all the ops with a primitive form when ``ops`` is None)
    replaced by its primitive form, except those whose output is of a dtype in ``keep_dtypes`` (the
    ones a backend's own kernel takes); the pass records how many of each it rewrote."""
    name = "decompose"
    exact = True
    ops: list | None = None
    keep_dtypes: list | None = None

    def __post_init__(self):
        if self.ops is not None:
            unknown = sorted(set(self.ops) - set(FORMS))
            if unknown:
                raise PassError(f"{self.name}: no primitive form for op(s) {', '.join(unknown)}; "
                                f"ops with one: {', '.join(sorted(FORMS))}")

    def _wanted(self, graph: Graph) -> list[Node]:
        ops = set(FORMS if self.ops is None else self.ops)
        keep = set(self.keep_dtypes or ())
        return [n for n in graph.nodes if n.op in ops and n.output.dtype.name not in keep]

    def applies(self, graph: Graph) -> bool:
        return bool(self._wanted(graph))

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        counts: dict[str, int] = {}
        for node in self._wanted(graph):
            with graph.inserting_before(node):
                value = FORMS[node.op](_Builder(graph, node), node)
            graph.replace_uses(node.output, value)
            graph.remove_node(node)
            graph.rename(value, node.output.name)           # graph outputs keep their names
            counts[node.op] = counts.get(node.op, 0) + 1
        if counts:
            ctx.record("decomposed", counts)
        return graph


def decomposable() -> frozenset[str]:
    """The ops this pass can write out."""
    return frozenset(FORMS)


__all__ = ["DecomposeOps", "FORMS", "decomposable"]

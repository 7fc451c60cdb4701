"""The KV-cache encoding pass: a decoder's float caches become encoded state (docs/kv_cache.md).

Each selected ``cache_update`` of a state input ``cache.{i}.k`` (paired with the output
``cache.{i}.k.next``) becomes a ``kv_cache_write`` of that cache's state tensors
(``cache.{i}.k.codes`` ... each paired with its ``.next``) and a ``kv_cache_read`` that attention
reads. A recipe selects caches with ``layers`` / ``exclude`` patterns on the cache-update node
(``model.layers.3.self_attn.k_cache``) or the cache input (``cache.3.k``).

    >>> EncodeKVCache(encoding="kv4", group_size=64, residual=64, exclude=["model.layers.0.*"])(graph)
"""
from __future__ import annotations

import fnmatch
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..frontend.decoders.builder import SLOTS
from ..ir import Graph, Node, TensorType
from ..ir.graph import STATE_NEXT as NEXT
from ..ir.kvcache import CACHE_ENCODINGS, CacheEncodingError, cache_encoding
from .base import Pass, PassContext, PassError, register_pass



@dataclass
class _Cache:
    node: Node            # the cache_update
    past: str             # its state input's name
    role: str             # "k" or "v": the attention slot it feeds


def _caches(graph: Graph) -> list[_Cache]:
    """The float caches the pass can encode: cache_update nodes of a state input whose result is
    that input's ``.next`` output and the k or v of attention nodes."""
    pairs = dict(graph.state_pairs())
    outputs = {v.name: v for v in graph.outputs}
    readers: dict = {}
    for n in graph.nodes:
        if n.op == "attention":
            for slot, role in ((1, "k"), (2, "v")):
                readers.setdefault(n.inputs[slot], set()).add(role)
    found = []
    for n in graph.nodes:
        if n.op != "cache_update" or n.inputs[0].producer is not None or n.inputs[0].name not in pairs:
            continue
        if outputs.get(pairs[n.inputs[0].name]) is not n.output:
            continue
        roles = readers.get(n.output, set())
        if len(roles) != 1:
            raise PassError(f"kv_cache: cache {n.inputs[0].name} (node {n.name}) is read as "
                            f"{'both k and v' if roles else 'neither k nor v'} of attention; an encoded cache "
                            "is a K or a V cache: leave this one out (exclude=[...])")
        found.append(_Cache(n, n.inputs[0].name, roles.pop()))
    return found


@register_pass
@dataclass
class EncodeKVCache(Pass):
    """Encode a decoder's KV caches: ``encoding`` kv8 (int8, a float16 scale per token and group of
    ``group_size`` channels, default 64), kv4 (KIVI: int4 keys per channel in groups of
    ``group_size`` tokens, values per token, a float window of the ``residual`` most recent
    tokens), kv-fp8 (E4M3, per-token scales), kv-nvfp4 (E2M1 with E4M3
    scales per 16 values and a float16 scale per token), kv-gear4 (kv4 plus ``outliers`` float16
    values per token and a rank-``rank`` approximation of each group's error) or kv-f16 (each value
    in float16); ``layers`` / ``exclude`` select caches by cache-update node or cache input name."""
    name = "kv_cache"
    rewrites_state = True
    encoding: str = "kv8"
    group_size: int | None = None
    residual: int | None = None
    rank: int | None = None
    outliers: int | None = None
    layers: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.encoding not in CACHE_ENCODINGS:
            raise PassError(f"kv_cache: unknown encoding {self.encoding!r}; choose from {', '.join(CACHE_ENCODINGS)}")
        for key in ("layers", "exclude"):
            value = getattr(self, key)
            if isinstance(value, str):
                setattr(self, key, [value])
            elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PassError(f"kv_cache: option {key} must be a list of strings, got {value!r}")
        try:
            # the encoding's defaults fill the options left out, so the record and the ops name them
            defaults = cache_encoding(self.encoding, "k", **self.options()).attrs()
            self.group_size, self.residual = defaults.get("group"), defaults.get("residual")
            self.rank, self.outliers = defaults.get("rank"), defaults.get("outliers")
            cache_encoding(self.encoding, "v", **self.options())
        except CacheEncodingError as e:
            raise PassError(f"kv_cache: {e}") from None

    def options(self) -> dict:
        """The encoding's options as cache_encoding takes them (None: its default)."""
        return {"group": self.group_size, "residual": self.residual, "rank": self.rank, "outliers": self.outliers}

    def applies(self, graph: Graph) -> bool:
        return bool(_caches(graph))

    def select(self, graph: Graph) -> list[_Cache]:
        """The selected caches, in graph order; a pattern that matches no cache is an error naming
        the caches there are."""
        caches = _caches(graph)
        if not caches:
            raise PassError(f"kv_cache: graph {graph.name} has no KV cache (a cache_update of a state input "
                            "read by attention): KV-cache encodings apply to decoder LMs only")
        names = [(c.node.name, c.past) for c in caches]

        def hit(c: _Cache, patterns) -> bool:
            return any(fnmatch.fnmatchcase(n, p) for n in (c.node.name, c.past) for p in patterns)

        some = ", ".join(f"{a} ({b})" for a, b in names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        for key in ("layers", "exclude"):
            for p in getattr(self, key):
                if p != "*" and not any(fnmatch.fnmatchcase(x, p) for pair in names for x in pair):
                    raise PassError(f"kv_cache: {key} pattern {p!r} matches no KV cache of graph {graph.name}; its "
                                    f"caches (node, input): {some}")
        out = [c for c in caches if hit(c, self.layers) and not hit(c, self.exclude)]
        if not out:
            raise PassError(f"kv_cache: selects no KV cache of graph {graph.name} (layers={self.layers}, "
                            f"exclude={self.exclude}); its caches (node, input): {some}")
        return out

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if any(v.name == SLOTS for v in graph.inputs):
            raise PassError(f"kv_cache: graph {graph.name} has token reduction (kv-evict/kv-merge), and the runner "
                            "reduces float caches only: drop the encoding preset, or the reduction")
        kinds: Counter = Counter()
        for cache in self.select(graph):
            encode_cache(graph, cache, self.encoding, self.options())
            kinds[f"{self.encoding} {cache.role}"] += 1
        ctx.record("caches", sum(kinds.values()))
        ctx.record("encodings", dict(kinds))
        return graph


def encode_cache(graph: Graph, cache: _Cache, kind: str, options: dict) -> None:
    """Replace ``cache``'s float state by the encoding's state tensors, its update by a
    kv_cache_write and the attention's read by a kv_cache_read, in place."""
    node, past = cache.node, graph.inputs[[v.name for v in graph.inputs].index(cache.past)]
    new, positions = node.inputs[1], node.inputs[2]
    batch, kv_heads, max_len, head_dim = past.shape
    enc = cache_encoding(kind, cache.role, **options)
    try:
        enc.check_head_dim(head_dim, f"cache {past.name} (node {node.name})")
    except CacheEncodingError as e:
        raise PassError(f"kv_cache: {e}") from None
    attrs = {"encoding": kind, "role": cache.role, "max_len": max_len, "head_dim": head_dim, **enc.attrs()}
    at = graph.inputs.index(past)
    state = [graph.add_input(f"{past.name}.{p.name}", TensorType(p.dtype, (batch, kv_heads, p.rows, p.cols)))
             for p in enc.parts(max_len, head_dim)]
    old_out = node.output
    with graph.inserting_before(node):
        write = graph.add_node("kv_cache_write", [new, positions, *state], attrs, name=f"{node.name}.write",
                               output_names=[f"{v.name}{NEXT}" for v in state])
        read = graph.add_node("kv_cache_read", [positions, *write.outputs], attrs, name=f"{node.name}.read").output
    i = next(j for j, v in enumerate(graph.outputs) if v is old_out)
    graph.outputs = graph.outputs[:i] + list(write.outputs) + graph.outputs[i + 1:]
    graph.replace_uses(old_out, read)
    graph.remove_node(node)
    graph.remove_input(past)
    rest = [v for v in graph.inputs if all(v is not s for s in state)]
    graph.inputs = rest[:at] + state + rest[at:]          # the state where the float cache was


def cache_report(graph: Graph, max_len: int) -> dict:
    """What a bundle's manifest records of a decoder's KV cache: each cache's encoding (``float32``
    for one left as it was), the state's real bytes per token of ``max_len`` (per sequence, all
    layers, K and V) beside the float32 cache's, and how much of it is fixed-size (kv4's windows of
    recent tokens), so that what each further token of context costs is read off too."""
    from ..ir.ops.kvcache import encoding_of
    caches, fixed = {}, 0
    for n in graph.nodes:
        if n.op == "kv_cache_write":
            past = n.inputs[2].name.rsplit(".", 1)[0]
            enc = encoding_of(n.attrs)
            caches[past] = {"node": n.name.removesuffix(".write"), **enc.describe()}
            parts = enc.parts(n.attrs["max_len"], n.attrs["head_dim"])
            fixed += sum(_bytes(v) for v, p in zip(n.inputs[2:], parts) if p.fixed)
        elif n.op == "cache_update" and n.inputs[0].producer is None:
            caches[n.inputs[0].name] = {"node": n.name, "encoding": "float32"}
    inputs = {v.name: v for v in graph.inputs}
    total = sum(_bytes(inputs[i]) for i, _ in graph.state_pairs())
    # the float32 cache each one stands for: the read node's output, or the float state itself
    float_total = sum(4 * math.prod(graph.node(rec["node"] + ".read").output.shape[1:] if rec["encoding"] != "float32"
                                    else inputs[name].shape[1:]) for name, rec in caches.items())
    return {"caches": caches, "bytes_per_token": total / max_len, "float32_bytes_per_token": float_total / max_len,
            "fixed_bytes": fixed, "bytes_per_token_past_fixed": (total - fixed) / max_len,
            "what": "the state's bytes per token of max_len, one sequence, every layer's K and V (encoded parts, "
                    "scales and float windows included); fixed_bytes: the parts whose size does not grow with the "
                    "context (float windows of recent tokens), bytes_per_token_past_fixed: the rest per token"}


def _bytes(v) -> int:
    """Bytes of one sequence's share of state tensor ``v`` (batch axis first)."""
    return v.dtype.torch_dtype.itemsize * math.prod(d for d in v.shape[1:])


def compared_outputs(graph: Graph, outputs: list) -> list:
    """``outputs`` (the graph's, in order) with each encoded cache's state as its encoding has a
    backend's checked (``CacheEncoding.compared_state``): what the runtime check compares."""
    from ..ir.ops.kvcache import encoding_of
    index = {id(v): i for i, v in enumerate(graph.outputs)}
    out, dropped = list(outputs), set()
    for n in graph.nodes:
        at = [index.get(id(v)) for v in n.outputs] if n.op == "kv_cache_write" else [None]
        if None in at:
            continue
        parts = encoding_of(n.attrs).compared_state([torch.as_tensor(out[i]) for i in at])
        for i, part in zip(at, parts):
            out[i] = part
        dropped |= set(at[len(parts):])
    return [o for i, o in enumerate(out) if i not in dropped]


__all__ = ["EncodeKVCache", "encode_cache", "cache_report", "compared_outputs"]

"""The token-reduction pass: a decoder graph whose runner evicts or merges KV-cache tokens to keep
the cache within a budget (docs/kv_cache.md, "Token reduction").

Once tokens leave or merge, a token's cache slot is no longer its position. The pass adds one
input, ``slots`` (int64 [batch, seq], the slot each new token is written to), and gives it to every
cache write and to attention's mask in place of ``positions``; rotary embeddings (and learned
position embeddings) keep reading ``positions``, so kept keys keep the rotation they were written
with and new tokens continue at their true position. It also makes each attention's rotated
queries an output, ``attention.{i}.q``, from which the runner scores the cache (H2O's accumulated
attention). The reduction itself (which tokens go, which merge) runs in the runner
(``nnforge/kvreduce.py``); its settings go into the manifest's ``decoder.kv_reduce``.

    >>> ReduceKVCache(method="evict", budget=256)(graph).inputs[-1].name
    'slots'
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..frontend.decoders.builder import POSITIONS, SLOTS
from ..ir import Graph, Node
from ..kvreduce import SCORES
from .base import Pass, PassContext, PassError, register_pass
from .kvcache import cache_report
METHODS = ("evict", "merge")


def query_output(layer: int) -> str:
    return f"attention.{layer}.q"


def _layer_of(cache_input: str) -> int:
    """``cache.{i}.k`` -> i."""
    return int(cache_input.split(".")[1])


def _attentions(graph: Graph) -> list[tuple[Node, Node, Node]]:
    """(attention, its K cache_update, its V cache_update) for every attention over a float cache
    kept as state."""
    pairs = dict(graph.state_pairs())
    found = []
    for n in graph.nodes:
        if n.op != "attention":
            continue
        updates = [n.inputs[i].producer for i in (1, 2)]
        if not all(u is not None and u.op == "cache_update" and u.inputs[0].producer is None
                   and u.inputs[0].name in pairs for u in updates):
            continue
        found.append((n, *updates))
    return found


def reduction_layers(graph: Graph) -> list[dict]:
    """What the runner needs per attention to score and reduce its cache: the cache inputs, the
    query output, and the attention's scale, softcap and window."""
    return [{"layer": _layer_of(k.inputs[0].name), "k": k.inputs[0].name, "v": v.inputs[0].name,
             "q": query_output(_layer_of(k.inputs[0].name)), "scale": att.attrs["scale"],
             "softcap": att.attrs.get("softcap", 0.0), "window": att.attrs.get("window", 0)}
            for att, k, v in _attentions(graph)]


@register_pass
@dataclass
class ReduceKVCache(Pass):
    """Keep a decoder's KV cache within ``budget`` tokens (or ``budget_bytes``, converted with the
    state's bytes per token) by ``method`` evict (the older tokens of the highest attention
    ``score`` kept: ``peak``, the largest weight any query gave a token, or ``sum``, its
    accumulated attention as H2O ranks heavy hitters) or merge (adjacent keys of cosine similarity
    >= ``threshold`` averaged, weighted by attention, KVMerger; where none is that similar, the
    token of the lowest score goes); the ``recent`` most recent tokens (default half the budget)
    are always kept as they are. The graph gains the ``slots`` input and ``attention.{i}.q``
    outputs; the runner reduces."""
    name = "kv_reduce"
    rewrites_state = True            # it goes after weight passes, as the KV-cache encodings do
    adds_io: ClassVar[tuple[str, ...]] = (SLOTS, "attention.*.q")
    method: str = "evict"
    budget: int | None = None
    budget_bytes: int | None = None
    recent: int | None = None
    threshold: float = 0.8
    # peak rather than H2O's sum: a sum favours old tokens (more queries have seen them) and a
    # fact read once, as a passkey is, gets few but strong weights (docs/kv_cache.md)
    score: str = "peak"

    def __post_init__(self):
        if self.method not in METHODS:
            raise PassError(f"kv_reduce: unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if (self.budget is None) == (self.budget_bytes is None):
            raise PassError("kv_reduce: give the cache budget as budget (tokens) or budget_bytes, exactly one")
        for key in ("budget", "budget_bytes"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 2):
                raise PassError(f"kv_reduce: {key} {value!r}: give a whole number of at least 2 (one recent "
                                "token and one other)")
        if self.recent is not None and (not isinstance(self.recent, int) or self.recent < 1):
            raise PassError(f"kv_reduce: recent {self.recent!r}: give a whole number of tokens >= 1")
        if self.budget is not None and self.recent is not None and self.recent >= self.budget:
            raise PassError(f"kv_reduce: recent {self.recent} must be below the budget {self.budget}, which "
                            "leaves no slot to choose")
        if self.score not in SCORES:
            raise PassError(f"kv_reduce: unknown score {self.score!r}; choose from {', '.join(SCORES)}")
        if not -1.0 <= float(self.threshold) <= 1.0:
            raise PassError(f"kv_reduce: threshold {self.threshold}: a cosine similarity, in [-1, 1]")

    def applies(self, graph: Graph) -> bool:
        return bool(_attentions(graph))

    def tokens(self, graph: Graph, max_len: int) -> int:
        """The budget in tokens (``budget_bytes`` over the state's bytes per token)."""
        if self.budget is not None:
            return self.budget
        per_token = cache_report(graph, max_len)["bytes_per_token"]
        tokens = int(self.budget_bytes // per_token)
        if tokens < 2:
            raise PassError(f"kv_reduce: budget_bytes {self.budget_bytes} holds {tokens} token(s) at "
                            f"{per_token:g} bytes per token (every layer's K and V): give at least "
                            f"{math.ceil(2 * per_token)}")
        return tokens

    def settings(self, graph: Graph) -> dict:
        """The manifest's ``decoder.kv_reduce``: the budget in tokens and what the runner needs."""
        att = _attentions(graph)
        if not att:
            raise PassError(f"kv_reduce: graph {graph.name} has no attention over a float KV cache kept as state")
        max_len = att[0][1].inputs[0].shape[2]
        budget = self.tokens(graph, max_len)
        recent = self.recent if self.recent is not None else max(1, budget // 2)
        if budget >= max_len:
            raise PassError(f"kv_reduce: a budget of {budget} tokens leaves no room for new tokens in the cache's "
                            f"{max_len} slots: give a budget below {max_len}, or compile with a larger max_len")
        if recent >= budget:
            raise PassError(f"kv_reduce: recent {recent} must be below the budget {budget}")
        layers = reduction_layers(graph)
        for layer in layers:
            # attention masks the window by slots: exact while the last window - 1 tokens stay in place
            if layer["window"] and layer["window"] - 1 >= budget:
                raise PassError(f"kv_reduce: layer {layer['layer']} attends over a sliding window of "
                                f"{layer['window']} tokens, which a budget of {budget} cannot hold in place: "
                                f"give a budget of at least {layer['window']}")
        limit = [n.inputs[1].shape[0] for n in graph.nodes if n.op == "embedding" and n.inputs[0].name == POSITIONS]
        return {"method": self.method, "budget": budget, "recent": recent, "threshold": float(self.threshold),
                "score": self.score,
                "slots": SLOTS, "max_positions": limit[0] if limit else None, "layers": layers}

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if any(n.op in ("kv_cache_write", "kv_cache_read") for n in graph.nodes):
            raise PassError(f"kv_reduce: graph {graph.name} has an encoded KV cache (kv8, kv4, kv-fp8, ...); the runner "
                            "reduces float caches only: drop the encoding preset, or the reduction")
        settings = self.settings(graph)               # refuses a budget the graph cannot take
        positions = graph.value(POSITIONS)
        slots = graph.add_input(SLOTS, positions.type)
        # a sequence that has lost no token writes slot == position: what a check batch feeds it
        graph.meta.setdefault("input_copies", {})[SLOTS] = POSITIONS
        for att, k, v in _attentions(graph):
            for node in (att, k, v):
                node.inputs = [slots if x is positions else x for x in node.inputs]
            q = att.inputs[0]
            graph.rename(q, query_output(_layer_of(k.inputs[0].name)))
            graph.outputs.append(q)
        ctx.record("method", settings["method"])
        ctx.record("budget_tokens", settings["budget"])
        ctx.record("recent", settings["recent"])
        return graph


def reduction_record(graph: Graph, passes) -> dict | None:
    """The manifest's ``decoder.kv_reduce`` for a graph the recipe's ``passes`` made (None when
    none of them reduces tokens)."""
    found = [p for p in passes if isinstance(p, ReduceKVCache)]
    return found[-1].settings(graph) if found else None


__all__ = ["ReduceKVCache", "reduction_record", "reduction_layers", "query_output", "SLOTS", "METHODS"]

"""Token reduction in the runner: a decoder's KV cache kept within a budget of tokens by evicting
(attention-score based, as H2O: a recent window always kept, the older tokens ranked by the
largest attention any query gave them, or by their accumulated attention as H2O ranks them) or
merging (KVMerger: adjacent keys of high cosine similarity averaged with their values, weighted by
attention) between steps.

The graph (``passes/kvreduce.py``) writes each new token at the next free cache ``slot`` and masks
attention by slots, while rotary embeddings use the token's true position; so the runner may
compact the cache (kept tokens keep their rotation, the order of slots stays the order of
tokens) and each step continues at the next free slot. :class:`CacheReducer` scores the cache from
the step's query outputs and reduces it once it holds more than the budget.

    >>> reducer = CacheReducer(Reduction.from_section(manifest["decoder"]["kv_reduce"]))
    >>> cache = reducer.after_step(cache, outputs, slots)     # at most budget tokens held
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import NnforgeError


SCORES = ("peak", "sum")


class ReductionError(NnforgeError, ValueError):
    """A token-reduction setting or cache the runner cannot take; the message says what to do."""


@dataclass(frozen=True)
class Reduction:
    """The manifest's ``decoder.kv_reduce``: ``method`` evict or merge, ``budget`` tokens held
    between steps, the ``recent`` tokens always kept as they are, the merge ``threshold``, the
    ``score`` older tokens are ranked by (``peak``: the largest attention weight any query gave
    them; ``sum``: their accumulated attention, H2O's), and per attention layer its cache inputs,
    query output, scale, softcap and window."""
    method: str
    budget: int
    recent: int
    threshold: float
    layers: tuple[dict, ...]
    slots: str = "slots"
    max_positions: int | None = None
    score: str = "sum"

    @classmethod
    def from_section(cls, section: Mapping) -> "Reduction":
        try:
            r = cls(method=section["method"], budget=int(section["budget"]), recent=int(section["recent"]),
                    threshold=float(section["threshold"]), layers=tuple(dict(x) for x in section["layers"]),
                    slots=section.get("slots", "slots"), max_positions=section.get("max_positions"),
                    # a bundle compiled before the score was recorded ranked by accumulated attention
                    score=section.get("score", "sum"))
        except (KeyError, TypeError, ValueError) as e:
            raise ReductionError(f"the manifest's decoder.kv_reduce section is incomplete ({e}): recompile the "
                                 "bundle with a kv-evict-<budget> or kv-merge-<budget> recipe") from None
        if r.method not in ("evict", "merge") or not 1 <= r.recent < r.budget:
            raise ReductionError(f"decoder.kv_reduce: method {r.method!r}, budget {r.budget}, recent {r.recent}: "
                                 "give method evict or merge and 1 <= recent < budget")
        if r.score not in SCORES:
            raise ReductionError(f"decoder.kv_reduce: score {r.score!r}: give one of {', '.join(SCORES)}")
        return r

    def protected(self, layer: dict) -> int:
        """The most recent tokens a layer keeps in place: the recent window, and a sliding window's
        last window - 1 tokens, so that attention's slot mask sees exactly the tokens it would."""
        return max(self.recent, int(layer["window"]) - 1 if layer["window"] else 0)


def attention_mass(q: torch.Tensor, k: torch.Tensor, slots: torch.Tensor, count: int, layer: dict) -> torch.Tensor:
    """The attention each of the first ``count`` cache slots got from the step's queries ``q``
    [b, h, n, d] (summed over queries and the heads sharing a kv head): [b, kv_heads, count],
    with the graph's scale, softcap and slot mask."""
    return attention_weights(q, k, slots, count, layer).sum(dim=(2, 3))


def attention_weights(q: torch.Tensor, k: torch.Tensor, slots: torch.Tensor, count: int, layer: dict) -> torch.Tensor:
    """The attention weights of the step's queries ``q`` [b, h, n, d] over the first ``count``
    cache slots, [b, kv_heads, heads per kv head, n, count], with the graph's scale, softcap and
    slot mask."""
    b, h, n, d = q.shape
    kvh = k.shape[1]
    qg = q.to(torch.float32).reshape(b, kvh, h // kvh, n, d)
    keys = k[:, :, :count].to(torch.float32)
    scores = torch.einsum("bkgnd,bktd->bkgnt", qg, keys) * float(layer["scale"])
    if layer["softcap"]:
        scores = torch.tanh(scores / layer["softcap"]) * layer["softcap"]
    t = torch.arange(count)
    s = slots.to(torch.int64)[:, None, None, :, None]                     # [b, 1, 1, n, 1]
    visible = t <= s
    if layer["window"]:
        visible &= s - t < int(layer["window"])
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)


class CacheReducer:
    """The runner's side of token reduction for one sequence batch: how many slots are filled,
    and per layer each slot's accumulated attention mass, the largest attention weight it got
    (its peak) and how many tokens it stands for."""

    def __init__(self, reduction: Reduction):
        self.reduction = reduction
        self.reset()

    def reset(self) -> None:
        self.count = 0
        # per K cache input, [b, kvh, max_len]: "sum" (float64, the accumulated attention mass),
        # "peak" (float64), "tokens" (int64, how many tokens are merged into each slot); a score
        # names the statistic it ranks by
        self.stats: dict[str, dict[str, torch.Tensor]] = {}

    def after_step(self, cache: dict[str, torch.Tensor], outputs: Mapping, slots: torch.Tensor) -> dict:
        """The cache after a step that wrote ``slots`` [b, n] (the next free ones): its slots'
        attention mass updated from the step's queries, and reduced to the budget when it holds more."""
        n = slots.shape[1]
        self.count += n
        for layer in self.reduction.layers:
            k = cache[layer["k"]]
            if layer["q"] not in outputs:
                raise ReductionError(f"the step returned no {layer['q']}: a bundle with token reduction outputs each "
                                     "attention's queries; recompile it with the kv-evict/kv-merge recipe")
            if layer["k"] not in self.stats:
                shape = (k.shape[0], k.shape[1], k.shape[2])
                self.stats[layer["k"]] = {"sum": torch.zeros(shape, dtype=torch.float64),
                                          "peak": torch.zeros(shape, dtype=torch.float64),
                                          "tokens": torch.zeros(shape, dtype=torch.int64)}
            stats, c = self.stats[layer["k"]], self.count
            w = attention_weights(torch.as_tensor(outputs[layer["q"]]), k, slots, c, layer).double()
            stats["sum"][:, :, :c] += w.sum(dim=(2, 3))
            stats["peak"][:, :, :c] = torch.maximum(stats["peak"][:, :, :c], w.amax(dim=(2, 3)))
            stats["tokens"][:, :, c - n:c] = 1
        if self.count <= self.reduction.budget:
            return cache
        cache = dict(cache)
        reduce = _evict if self.reduction.method == "evict" else _merge
        for layer in self.reduction.layers:
            cache[layer["k"]], cache[layer["v"]], self.stats[layer["k"]] = reduce(
                cache[layer["k"]], cache[layer["v"]], self.stats[layer["k"]], self.reduction.score, self.count,
                self.reduction.budget, self.reduction.protected(layer), self.reduction.threshold)
        self.count = self.reduction.budget
        return cache


def _compact(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``rows`` (each [kept, ...]) stacked over batch and heads into the first slots of a zero
    tensor shaped as ``like``: the slots past the kept tokens empty, as in a fresh cache."""
    out = torch.zeros_like(like)
    b, h = like.shape[:2]
    for i in range(b):
        for j in range(h):
            r = rows[i * h + j]
            out[i, j, :r.shape[0]] = r
    return out


def _evict(k, v, stats, score, count, budget, protected, threshold):
    """Keep the ``protected`` most recent slots and, of the older ones, those of the highest
    ``score`` statistic, in their order."""
    older = count - protected
    keep = torch.topk(stats[score][:, :, :older], budget - protected, dim=-1).indices.sort(-1).values
    recent = torch.arange(older, count).expand(*keep.shape[:2], protected)
    index = torch.cat([keep, recent], dim=-1)                           # [b, kvh, budget]

    def take(x):
        out = torch.zeros_like(x)
        idx = index.reshape(*index.shape, *([1] * (x.dim() - 3))).expand(*index.shape, *x.shape[3:])
        out[:, :, :budget] = torch.gather(x, 2, idx)
        return out
    return take(k), take(v), {name: take(x) for name, x in stats.items()}


def _merge(k, v, stats, score, count, budget, protected, threshold):
    """Per kv head, until ``budget`` slots are left: of the adjacent older pairs (neither in the
    ``protected`` recent window), the one of most similar keys is merged into one slot (keys and
    values averaged, weighted by attention mass, by tokens when neither got any; the masses and
    token counts add, the peaks take the larger); when no pair reaches ``threshold``, the older
    slot of the lowest ``score`` statistic is evicted instead."""
    names = list(stats)
    rows: dict[str, list] = {name: [] for name in ["k", "v", *names]}
    b, h = k.shape[:2]
    for i in range(b):
        for j in range(h):
            hk, hv = k[i, j, :count].clone(), v[i, j, :count].clone()
            hs = {name: stats[name][i, j, :count].clone() for name in names}
            hm, ht = hs["sum"], hs["tokens"]
            while hk.shape[0] > budget:
                older = hk.shape[0] - protected
                drop = None
                if older >= 2:
                    a, c = hk[:older - 1].float(), hk[1:older].float()
                    sims = torch.nn.functional.cosine_similarity(a, c, dim=-1)
                    t = int(torch.argmax(sims))
                    if float(sims[t]) >= threshold:
                        total = hm[t] + hm[t + 1]
                        w = float(hm[t + 1] / total) if total > 0 else float(ht[t + 1] / (ht[t] + ht[t + 1]))
                        # a + (b - a) * w: two equal rows merge into exactly that row
                        hk[t] = hk[t] + (hk[t + 1] - hk[t]) * w
                        hv[t] = hv[t] + (hv[t + 1] - hv[t]) * w
                        hm[t], ht[t] = total, ht[t] + ht[t + 1]
                        hs["peak"][t] = torch.maximum(hs["peak"][t], hs["peak"][t + 1])
                        drop = t + 1
                if drop is None:
                    drop = int(torch.argmin(hs[score][:older]))
                keep = torch.arange(hk.shape[0]) != drop
                hk, hv = hk[keep], hv[keep]
                hs = {name: x[keep] for name, x in hs.items()}
                hm, ht = hs["sum"], hs["tokens"]
            rows["k"].append(hk)
            rows["v"].append(hv)
            for name in names:
                rows[name].append(hs[name])
    return (_compact(rows["k"], k), _compact(rows["v"], v),
            {name: _compact(rows[name], stats[name]) for name in names})


__all__ = ["CacheReducer", "Reduction", "ReductionError", "SCORES", "attention_mass", "attention_weights"]

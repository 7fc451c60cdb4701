"""Structured pruning that shrinks the graph (ZipLM, Kurtic et al. 2023): MLP channels, attention
heads and whole residual sub-blocks. The result has smaller weights and fewer heads; nothing is
masked at run time.

A structure is a group of input columns of a consuming linear B (one column per MLP channel,
``head_dim`` columns per head). With H = XᵀX of B's calibration inputs, removing the group S
costs ``tr(W_S ((H⁻¹)_SS)⁻¹ W_Sᵀ)`` in B's output, and the least-squares optimal change of the
remaining columns, ``δW = -W_S ((H⁻¹)_SS)⁻¹ (H⁻¹)_S:``, absorbs it (OBS for groups). Groups go
one at a time (``block`` at a time if asked), updating W and H⁻¹ after each. B's bias takes part
as a constant input column that is never removed, so it absorbs the removed channels' means.

The model runs once over the calibration set (:func:`..quantize.calibrate.run_calibration`):
at each B the pass prunes with inputs computed by the already-pruned layers before it, zeroing
the removed columns so the rest of the sweep sees the pruned model; the graph is shrunk after
the sweep. A global budget (``scope="global"`` or a ``speedup`` goal) first sweeps once to
measure every layer's removal curve, then allocates removals across layers by normalised
saliency per unit of latency saved, then prunes in a second sweep.

    >>> PruneMLP(fraction=0.25)(graph, PassContext(calibration=batches))
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...ir import Dense, Graph
from ..base import Pass, PassContext, PassError, register_pass
from ...ir.simplify import eliminate_dead_code
from ..quantize.calibrate import run_calibration
from ..quantize.gptq import inverse_from_cholesky
from .reach import WeightReach
from .structures import (HeadGroup, find_attention_heads, find_mlp_channels,
                         find_residual_branches, reinfer, replace_weight, rescale_heads)

CRITERIA = ("obs", "magnitude")
STRUCTURE_SHAPES = {"mlp": "linear -> activation -> linear", "heads": "Q/K/V -> attention -> output projection"}
MAX_STEPS = 64
SCOPES = ("layer", "global")


# --- OBS for groups of columns ---------------------------------------------------------------------
def _inverse_spd(a: torch.Tensor, what: str) -> torch.Tensor:
    try:
        return inverse_from_cholesky(torch.linalg.cholesky(a))
    except torch.linalg.LinAlgError:
        raise PassError(f"{what}: the calibration Hessian is not positive definite; raise damp or add "
                        "calibration data") from None


def obs_remove(w: torch.Tensor, h: torch.Tensor, groups: torch.Tensor, count: int, *, criterion: str = "obs",
               update: bool = True, damp: float = 0.01, block: int = 1, what: str = "layer",
               dtype: torch.dtype = torch.float64):
    """Remove ``count`` column groups (rows of ``groups``) from ``w`` [rows, cols] greedily.

    Returns the new weight (removed columns zero, the rest updated when ``update``), the removed
    group ids in removal order, and each removal's OBS error increase. Columns not in any group
    (e.g. a bias column) are never removed. ``block`` > 1 removes that many of the cheapest
    groups per step, jointly (fewer, larger steps for layers with thousands of channels)."""
    W = w.detach().to(dtype).clone()
    H = h.detach().to(dtype).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    # Dampening relative to each column's own energy, not the mean: a channel's scale (relu(s*x)/s
    # is the same model for any s > 0) must not change which channels look cheap to remove.
    H += torch.diag(damp * torch.diag(H))
    Hinv = _inverse_spd(H, what)
    alive = torch.ones(groups.shape[0], dtype=torch.bool)
    order, losses = [], []
    while len(order) < count:
        Wg = W[:, groups].permute(1, 2, 0)                                  # [G, k, rows]
        if criterion == "magnitude":
            sal = (Wg ** 2).sum((1, 2))
        elif groups.shape[1] == 1:                                          # one column: w²/[H⁻¹]cc
            sal = (Wg[:, 0] ** 2).sum(1) / torch.diag(Hinv)[groups[:, 0]]
        else:
            Hg = Hinv[groups.unsqueeze(2), groups.unsqueeze(1)]            # [G, k, k]
            sal = torch.einsum("gkr,gkl,glr->g", Wg, torch.linalg.inv(Hg), Wg)
        sal = torch.where(alive, sal, torch.full_like(sal, float("inf")))
        pick = torch.topk(sal, min(block, count - len(order)), largest=False).indices
        idx = groups[pick].reshape(-1)
        Hs_inv = torch.linalg.inv(Hinv[idx][:, idx])
        Ws = W[:, idx]
        losses += [float((Ws @ Hs_inv * Ws).sum()) / len(pick)] * len(pick)     # a block's cost, shared
        if update:
            W -= Ws @ Hs_inv @ Hinv[idx, :]
        W[:, idx] = 0.0
        Hinv -= Hinv[:, idx] @ Hs_inv @ Hinv[idx, :]
        Hinv[idx, idx] = 1.0                 # decoupled: later solves stay well-posed
        alive[pick] = False
        order += pick.tolist()
    return W.to(w.dtype), order, losses


# --- latency cost model ----------------------------------------------------------------------------
def cost_scale(target) -> tuple[float, float, str]:
    """(cost per weight byte, cost per FLOP per token, unit): seconds from the target's memory
    bandwidth and fp32 peak when it has them, else one unit per byte and per FLOP."""
    mem = getattr(target, "memory", {}) or {}
    comp = getattr(target, "compute", {}) or {}
    bw, peak = mem.get("bandwidth_gbps"), comp.get("fp32_tflops")
    if bw and peak:
        return 1.0 / (bw * 1e9), 1.0 / (peak * 1e12), "s"
    return 1.0, 1.0, "bytes+flops"


def _layer_cost(rows: int, cols: int, bias: bool, itemsize: int, scale) -> float:
    return scale[0] * itemsize * (rows * cols + (rows if bias else 0)) + scale[1] * 2 * rows * cols


def model_cost(graph: Graph, scale) -> float:
    """Modeled cost of every linear: weight bytes plus FLOPs per token."""
    total = 0.0
    for n in graph.nodes:
        if n.op == "linear" and n.inputs[1] is not None and n.inputs[1].is_weight:
            rows, cols = n.inputs[1].shape
            total += _layer_cost(rows, cols, len(n.inputs) > 2 and n.inputs[2] is not None,
                                 n.inputs[1].encoding.nbytes // max(rows * cols, 1), scale)
    return total


def group_cost(s, scale) -> float:
    """Cost one group (channel or head) of structure ``s`` adds: its rows of every source, its
    columns of the sink."""
    width = s.groups().shape[1]
    cost = 0.0
    for src in s.sources:
        rows, cols = src.inputs[1].shape
        bias = len(src.inputs) > 2 and src.inputs[2] is not None
        cost += _layer_cost(width, cols, bias, src.inputs[1].encoding.nbytes // (rows * cols), scale)
    rows, cols = s.sink.inputs[1].shape
    return cost + _layer_cost(rows, width, False, s.sink.inputs[1].encoding.nbytes // (rows * cols), scale)


# --- the passes ------------------------------------------------------------------------------------
@dataclass
class StructuredPrune(Pass):
    """Shared options. ``fraction`` of each layer's groups (``scope="layer"``) or of all groups
    (``scope="global"``), or a modeled ``speedup`` goal; ``criterion`` "obs" or "magnitude"
    (ablation); ``update`` False removes without the least-squares update (ablation);
    ``max_fraction`` caps any one layer under a global budget; ``block`` groups removed per
    greedy step (0: one at a time up to 64 steps per layer, evenly sized blocks beyond);
    ``exclude`` names sink layers (fnmatch) to leave whole."""
    kinds: ClassVar[tuple[str, ...]] = ()
    needs_calibration = True
    fraction: float | None = None
    speedup: float | None = None
    scope: str = "layer"
    criterion: str = "obs"
    update: bool = True
    damp: float = 0.01
    max_fraction: float = 0.9
    block: int = 0
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        n = self.name
        if (self.fraction is None) == (self.speedup is None):
            raise PassError(f"{n}: give exactly one of fraction or speedup")
        if self.fraction is not None and (isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float))
                                          or not 0 <= self.fraction < 1):
            raise PassError(f"{n}: fraction must be in [0, 1), got {self.fraction!r}")
        if self.speedup is not None and (not isinstance(self.speedup, (int, float)) or not self.speedup > 1):
            raise PassError(f"{n}: speedup must be a number above 1, got {self.speedup!r}")
        if self.scope not in SCOPES:
            raise PassError(f"{n}: scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.criterion not in CRITERIA:
            raise PassError(f"{n}: criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise PassError(f"{n}: damp must be in [0, 1), got {self.damp!r}")
        if not isinstance(self.max_fraction, (int, float)) or not 0 < self.max_fraction < 1:
            raise PassError(f"{n}: max_fraction must be in (0, 1), got {self.max_fraction!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 0:
            raise PassError(f"{n}: block must be a non-negative integer (0: automatic), got {self.block!r}")
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]

    # structures -------------------------------------------------------------------------------
    def structures(self, graph: Graph) -> list:
        import fnmatch
        found = []
        if "mlp" in self.kinds:
            found += find_mlp_channels(graph)
        if "heads" in self.kinds:
            found += find_attention_heads(graph)
        for p in self.exclude:
            if not any(fnmatch.fnmatchcase(s.name, p) for s in found):
                names = ", ".join(s.name for s in found[:6]) + (f", ... ({len(found)} in all)" if len(found) > 6 else "")
                raise PassError(f"{self.name}: exclude pattern {p!r} matches no prunable layer; they are: "
                                f"{names or 'none'}")
        found = [s for s in found if not any(fnmatch.fnmatchcase(s.name, p) for p in self.exclude)]
        for s in found:
            for node in s.sources + [s.sink]:
                if not isinstance(node.inputs[1].encoding, Dense):
                    raise PassError(f"{self.name}: layer {node.name} is already "
                                    f"{node.inputs[1].encoding.describe()}; run structured pruning before "
                                    "quantisation or sparsity passes")
        return found

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if self.fraction == 0:
            return graph
        found = self.structures(graph)
        if not found:
            raise PassError(f"{self.name}: graph {graph.name} has no {' or '.join(self.kinds)} structure to prune "
                            "(looked for linear -> activation -> linear and Q/K/V -> attention -> output projection)")
        bytes_before = sum(v.encoding.nbytes for v in graph.weights.values())
        reach = WeightReach.of(graph)
        reached = {n.inputs[1].name for s in found for n in s.sources + [s.sink]}
        if self.speedup is None and self.scope == "layer":
            counts = {s.name: self._layer_count(s) for s in found}
        else:
            counts = self._allocate(graph, found, ctx)
        if not any(counts.values()):
            return graph
        removed = self._sweep(graph, ctx, found, counts, measure=False)
        for s in found:
            if counts[s.name]:
                self._shrink(graph, s, removed[s.name])
        eliminate_dead_code(graph)
        ctx.record("removed", {s.name: {"kind": "heads" if isinstance(s, HeadGroup) else "mlp",
                                        "of": s.groups().shape[0], "removed": sorted(removed[s.name][0])}
                               for s in found if counts[s.name]})
        ctx.record("weight_bytes", {"before": bytes_before,
                                    "after": sum(v.encoding.nbytes for v in graph.weights.values())})
        reach.report(ctx, self.name, reached, unselected=f"not in a {' or '.join(STRUCTURE_SHAPES[k] for k in self.kinds)} "
                     "structure, the only ones this pass shrinks")
        return graph

    def _layer_count(self, s) -> int:
        total = s.groups().shape[0]
        count = int(round(self.fraction * total))
        if count >= total:
            raise PassError(f"{self.name}: fraction {self.fraction} would remove all {total} "
                            f"{'heads' if isinstance(s, HeadGroup) else 'channels'} of layer {s.name}; lower it")
        return count

    # the calibration sweep ---------------------------------------------------------------------
    def _sweep(self, graph: Graph, ctx: PassContext, found: list, counts: dict, *, measure: bool) -> dict:
        """Run the calibration set once; at each sink prune ``counts[name]`` groups (or, when
        ``measure``, record the removal curve without changing anything)."""
        by_sink = {s.sink.name: s for s in found}
        out = {}

        def before(node, args):
            s = by_sink.get(node.name)
            if s is None or (not measure and not counts[s.name]):
                return
            x_cols = node.inputs[1].shape[1]
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            bias = bias if bias is not None and bias.is_weight else None
            H = torch.zeros(x_cols + 1, x_cols + 1, dtype=torch.float64)
            for batch in args:
                X = batch[0].reshape(-1, x_cols).float()
                X = torch.cat([X, torch.ones(X.shape[0], 1)], 1)                    # the bias column
                H += (X.T @ X).double()          # fp32 products per batch, fp64 sum over batches
            dtype = graph.weights[node.inputs[1].name].encoding.data.dtype
            W = graph.weights[node.inputs[1].name].encoding.data.to(torch.float64)
            b = graph.weights[bias.name].encoding.data.to(torch.float64) if bias is not None else None
            if b is None:                                   # no bias to absorb the means
                H, Wa = H[:x_cols, :x_cols], W
            else:
                Wa = torch.cat([W, b.unsqueeze(1)], 1)
            energy = float((W @ H[:x_cols, :x_cols] * W).sum()) or 1.0
            total = s.groups().shape[0]
            k = min(int(self.max_fraction * total), total - 1) if measure else counts[s.name]
            # Automatic block: exact one-at-a-time up to MAX_STEPS removals, then that many rounds.
            block = self.block or max(1, -(-k // MAX_STEPS))
            Wn, order, losses = obs_remove(Wa, H, s.groups(), k, criterion=self.criterion, update=self.update,
                                           damp=self.damp, block=block, what=f"{self.name}: layer {node.name}",
                                           dtype=torch.float32)
            out[s.name] = (order, [l_ / energy for l_ in losses], Wn)
            if not measure:
                graph.set_encoding(node.inputs[1].name, Dense(Wn[:, :x_cols].to(dtype)))
                if b is not None:
                    graph.set_encoding(bias.name, Dense(Wn[:, x_cols].to(graph.weights[bias.name].dtype.torch_dtype)))

        run_calibration(graph, ctx.calibration, before, who=self.name, progress=ctx.progress)
        return out

    def _allocate(self, graph: Graph, found: list, ctx: PassContext) -> dict:
        """Per-layer counts under a global budget: removals in order of normalised OBS error
        per unit of cost saved (ZipLM), each layer's own greedy order kept."""
        curves = self._sweep(graph, ctx, found, {}, measure=True)
        scale = cost_scale(ctx.target)
        if self.speedup is not None:
            costs = {s.name: group_cost(s, scale) for s in found}
            total = model_cost(graph, scale)
            goal = total * (1 - 1 / self.speedup)
        else:
            costs = {s.name: 1.0 for s in found}
            goal = round(self.fraction * sum(s.groups().shape[0] for s in found))
        heap = [(curves[s.name][1][0] / costs[s.name], s.name, 0) for s in found if curves[s.name][1]]
        heapq.heapify(heap)
        counts = {s.name: 0 for s in found}
        saved = 0.0
        while saved < goal - 1e-9 and heap:
            _, name, j = heapq.heappop(heap)
            counts[name] = j + 1
            saved += costs[name]
            losses = curves[name][1]
            if j + 1 < len(losses):
                heapq.heappush(heap, (losses[j + 1] / costs[name], name, j + 1))
        if saved < goal - 1e-9:
            raise PassError(f"{self.name}: the goal is out of reach: removing up to max_fraction={self.max_fraction} "
                            f"of every layer's {'/'.join(self.kinds)} saves {saved:.4g} of the {goal:.4g} needed"
                            + (f" for speedup {self.speedup}" if self.speedup else ""))
        if self.speedup is not None:
            left = model_cost(graph, scale) - saved
            ctx.record("modeled_speedup", round(model_cost(graph, scale) / left, 4))
            ctx.record("cost_unit", scale[2])
        ctx.record("allocation", {k: v for k, v in counts.items()})
        return counts

    # the rewrite -------------------------------------------------------------------------------
    def _shrink(self, graph: Graph, s, result) -> None:
        order, _, _ = result
        groups = s.groups()
        total = groups.shape[0]
        keep_groups = torch.tensor(sorted(set(range(total)) - set(order)), dtype=torch.long)
        keep_cols = groups[keep_groups].reshape(-1)
        if isinstance(s, HeadGroup):
            width = s.heads * s.head_dim
            for src in s.sources:
                rows = torch.arange(src.inputs[1].shape[0])
                _shrink_rows(graph, src, torch.isin((rows // s.head_dim) % s.heads, keep_groups))
            for node in s.rescale:
                rescale_heads(node, s.states[node.output][0], s.heads, len(keep_groups))
            touched = s.sources + s.region + [s.sink]
        else:
            width = s.channels
            for src in s.sources:
                mask = torch.zeros(width, dtype=torch.bool)
                mask[keep_cols] = True
                _shrink_rows(graph, src, mask)
            touched = s.sources + s.region + [s.sink]
        w = s.sink.inputs[1]
        replace_weight(graph, w, w.encoding.data[:, keep_cols], s.sink)
        reinfer(graph, touched)


def _shrink_rows(graph: Graph, node, mask: torch.Tensor) -> None:
    w = node.inputs[1]
    replace_weight(graph, w, w.encoding.data[mask], node)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = node.inputs[2]
        if b.is_weight:
            replace_weight(graph, b, b.encoding.data[mask], node)


@register_pass
@dataclass
class PruneMLP(StructuredPrune):
    """Remove MLP intermediate channels (rows of fc1/gate/up, columns of fc2/down)."""
    name = "prune_mlp"
    kinds = ("mlp",)


@register_pass
@dataclass
class PruneHeads(StructuredPrune):
    """Remove attention heads (head_dim rows of Q, K, V, columns of the output projection; the
    head counts in the attention's reshapes follow)."""
    name = "prune_heads"
    kinds = ("heads",)


@register_pass
@dataclass
class PruneStructured(StructuredPrune):
    """MLP channels and heads together under one budget (a ``speedup`` goal, or a global
    ``fraction`` of all groups), ZipLM's joint search."""
    name = "prune_structured"
    kinds = ("mlp", "heads")

    def __post_init__(self):
        super().__post_init__()
        if self.speedup is None and self.scope != "global":
            raise PassError(f"{self.name}: give speedup, or fraction with scope=\"global\" (per-layer fractions "
                            "are prune_mlp and prune_heads)")


@register_pass
@dataclass
class PruneBlocks(Pass):
    """Drop ``count`` whole residual sub-blocks (``add(x, f(x))`` -> ``x + E[f(x)]``): those whose
    branch varies least relative to the residual stream on the calibration set. ``kinds``:
    "any", "attention" or "mlp"; ``compensate`` False drops the branch's mean too."""
    name = "prune_blocks"
    needs_calibration = True
    count: int = 1
    kinds: str = "any"
    compensate: bool = True

    def __post_init__(self):
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise PassError(f"{self.name}: count must be a non-negative integer, got {self.count!r}")
        if self.kinds not in ("any", "attention", "mlp"):
            raise PassError(f"{self.name}: kinds must be any, attention or mlp, got {self.kinds!r}")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        if self.count == 0:
            return graph
        branches = [b for b in find_residual_branches(graph) if self.kinds in ("any", b.kind)]
        if self.count > len(branches):
            raise PassError(f"{self.name}: count {self.count} exceeds the {len(branches)} removable "
                            f"{'' if self.kinds == 'any' else self.kinds + ' '}sub-blocks of graph {graph.name}")
        by_add = {b.add.name: b for b in branches}
        stats = {}

        def before(node, args):
            b = by_add.get(node.name)
            if b is None:
                return
            i = next(j for j, v in enumerate(node.inputs) if v is b.branch)
            ys = torch.cat([a[i].reshape(-1, a[i].shape[-1]).double() for a in args])
            outs = torch.cat([(a[0] + a[1]).reshape(-1, ys.shape[1]).double() for a in args])
            mean = ys.mean(0)
            stats[b.name] = (float(((ys - mean) ** 2).sum() / (outs ** 2).sum().clamp_min(1e-30)), mean)

        run_calibration(graph, ctx.calibration, before, who=self.name, progress=ctx.progress)
        chosen = sorted(branches, key=lambda b: stats[b.name][0])[: self.count]
        for b in chosen:
            is_output = any(v is b.add.output for v in graph.outputs)
            if self.compensate or is_output:          # an output keeps its name: x + 0 stays an add
                mean = stats[b.name][1] if self.compensate else torch.zeros_like(stats[b.name][1])
                c = graph.add_weight(graph.fresh_name(f"{b.name}.mean"), Dense(mean.to(b.branch.dtype.torch_dtype)))
                b.add.inputs = [c if v is b.branch else v for v in b.add.inputs]
            else:
                graph.replace_uses(b.add.output, b.skip)
        eliminate_dead_code(graph)
        ctx.record("removed", {b.name: {"kind": b.kind, "relative_variance": round(stats[b.name][0], 6)}
                               for b in chosen})
        return graph


__all__ = ["obs_remove", "cost_scale", "model_cost", "PruneMLP", "PruneHeads", "PruneStructured", "PruneBlocks",
           "StructuredPrune"]

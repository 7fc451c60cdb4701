"""How much of a model a pruning pass reached, said out loud.

A recipe that prunes only the classifier of a convolutional network still makes a smaller bundle,
so its summary must say which share of the model's weight parameters the pass pruned and which
layers it left, by kind and why; a large share left gets a warning naming the kinds and what to
do.

    >>> reach = WeightReach.of(graph)
    >>> reach.skip(node, "depthwise conv: one input channel per group leaves no columns to group")
    >>> reach.report(ctx, "prune_magnitude", reached={"fc.weight"})
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...ir import WEIGHT_OPS, Graph, Node
from ...ir.ops import WEIGHT_SLOT

# A pass that leaves at least this share of the model's weight parameters unpruned warns: below it
# the untouched rest (norms, a small embedding) is what any recipe leaves.
WARN_UNREACHED = 0.1


def layer_kind(node: Node) -> str:
    """The kind a summary groups a layer under: its op, with grouped and depthwise convs apart."""
    if node.op != "conv" or node.attrs.get("groups", 1) == 1:
        return node.op
    w = node.inputs[WEIGHT_SLOT]
    return "depthwise conv" if w.shape[1] == 1 else "grouped conv"


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


@dataclass
class WeightReach:
    """Every weight of a weight-carrying layer (each weight once, by its first layer), and why a
    pass left the ones it did not prune."""
    layers: dict[str, Node]                          # weight name -> first layer reading it
    size: dict[str, int]                             # weight name -> parameters before the pass
    why: dict[str, str] = field(default_factory=dict)  # weight name -> why it was left

    @classmethod
    def of(cls, graph: Graph) -> "WeightReach":
        layers: dict[str, Node] = {}
        for n in graph.nodes:
            w = n.inputs[WEIGHT_SLOT] if n.op in WEIGHT_OPS and len(n.inputs) > WEIGHT_SLOT else None
            if w is not None and w.is_weight:
                layers.setdefault(w.name, n)
        return cls(layers, {name: n.inputs[WEIGHT_SLOT].encoding.numel for name, n in layers.items()})

    def skip(self, node: Node, why: str) -> None:
        """Note that the pass leaves ``node``'s weight, and why (the first reason given stands)."""
        self.why.setdefault(node.inputs[WEIGHT_SLOT].name, why)

    def report(self, ctx, who: str, reached: set[str], unselected: str = "not selected by the pass") -> None:
        """Record ``reach`` (weights pruned, of how many before the pass, the fraction) and ``not_reached`` (per kind
        and reason: layers, weights) in ``ctx``; warn when the share left is large. A weight neither
        reached nor skipped with a reason is put down to ``unselected``."""
        size = self.size
        total = sum(size.values())
        done = sum(size[w] for w in reached if w in size)
        groups: dict[tuple[str, str], list[int]] = {}
        for name, node in self.layers.items():
            if name in reached:
                continue
            g = groups.setdefault((layer_kind(node), self.why.get(name, unselected)), [0, 0])
            g[0] += 1
            g[1] += size[name]
        fraction = done / total if total else 0.0
        ctx.record("reach", {"weights": done, "of": total, "fraction": round(fraction, 4)})
        left = [{"kind": k, "layers": n, "weights": w, "why": why} for (k, why), (n, w) in groups.items()]
        ctx.record("not_reached", left)
        if total and total - done >= WARN_UNREACHED * total:
            parts = "; ".join(f"{g['kind']} layers: {_count(g['weights'])} of {_count(total)} weights "
                              f"({g['layers']} layer{'s' if g['layers'] != 1 else ''}) not pruned: {g['why']}"
                              for g in sorted(left, key=lambda g: -g["weights"]))
            ctx.warn(f"{who} pruned {fraction:.0%} of the model's weights ({_count(done)} of {_count(total)}); "
                     f"{parts}")


__all__ = ["WeightReach", "layer_kind", "WARN_UNREACHED"]

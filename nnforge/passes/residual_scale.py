"""A decoder's residual stream carried divided by a power of two, for a backend that computes in
fp16: the hidden states of some checkpoints pass fp16's range (+-65504) in the reference itself
(Gemma 3 270M's do), while everything that reads the stream is an RMS norm, which does not see a
common factor. So the stream's first value and every block output added to it are multiplied by
``factor``, and each RMS norm reading it takes ``eps * factor**2``: the same function in real
arithmetic, exact in floats up to the rounding of the epsilon (the factor is a power of two).

    >>> ScaleResidual(factor=0.125)(graph)

The stream is found from the first ``rms_norm``'s input: a chain of ``add`` nodes, each adding a
block's output, whose values only RMS norms and the next add read. A graph where anything else
reads it (a parallel block, a learned scale on the stream) is left as it is, and the pass records
why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ir import Graph, Node, Value
from ..ir.encodings import Dense
from .base import Pass, PassContext, PassError, register_pass


def residual_stream(graph: Graph) -> tuple[list[Value], list[Node], list[Node]] | str:
    """(the stream's values, the adds that extend it, the RMS norms reading it), or why ``graph``
    has no stream this pass can scale."""
    first = next((n for n in graph.nodes if n.op == "rms_norm"), None)
    if first is None:
        return "the graph has no rms_norm"
    uses = graph.uses()
    outputs = set(graph.outputs)
    values, adds, norms = [first.inputs[0]], [], []
    while True:
        r = values[-1]
        if r in outputs:
            return f"the residual value {r.name} is a graph output"
        nxt = None
        for node, slot in uses.get(r, []):
            if node.op == "rms_norm" and slot == 0:
                norms.append(node)
            elif node.op == "add" and nxt is None:
                nxt = node
            else:
                return f"{node.name} ({node.op}) reads the residual value {r.name}"
        if nxt is None:
            break
        adds.append(nxt)
        values.append(nxt.output)
    if not adds:
        return "no add extends the value the first rms_norm reads"
    return values, adds, norms


@register_pass
@dataclass
class ScaleResidual(Pass):
    """The residual stream times ``factor`` (a power of two below 1), each RMS norm on it with its
    epsilon times ``factor**2`` (module docstring); records the adds and norms it changed, or why
    it changed nothing."""
    name = "scale_residual"
    factor: float = 0.125

    def __post_init__(self):
        f = self.factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1 or \
                math.frexp(float(f))[0] != 0.5:
            raise PassError(f"{self.name}: factor must be a power of two below 1 (0.5, 0.25, ...), got {f!r}")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        found = residual_stream(graph)
        if isinstance(found, str):
            ctx.record("unchanged", found)
            return graph
        values, adds, norms = found
        factor = float(self.factor)
        # each add's other operand (the block output), taken before the stream's first value is replaced
        others = [0 if add.inputs[1] is r else 1 for add, r in zip(adds, values)]
        first = values[0]
        readers = [(n, s) for n, s in graph.uses()[first]]
        producer = first.producer
        anchor = graph.nodes[graph.nodes.index(producer) + 1] if producer is not None else graph.nodes[0]
        with graph.inserting_before(anchor):
            scaled = self._times(graph, first, factor)
        for node, slot in readers:
            node.inputs[slot] = scaled
        folded = 0
        for add, other in zip(adds, others):
            if self._fold(graph, add.inputs[other], factor):
                folded += 1
                continue
            with graph.inserting_before(add):
                add.inputs[other] = self._times(graph, add.inputs[other], factor)
        for norm in norms:
            norm.attrs["eps"] = norm.attrs["eps"] * factor * factor
        ctx.record("scaled", {"factor": factor, "adds": len(adds), "rms_norms": len(norms),
                              "folded_into_norms": folded})
        return graph

    @staticmethod
    def _fold(graph: Graph, v: Value, factor: float) -> bool:
        """Scale a block output made by an RMS norm (a post-norm, as Gemma 2 and 3 have) through
        its weight, when nothing else reads the output or the weight: the unscaled output then never
        exists, which matters to a fixed-point design whose range it would pass. Exact: the factor
        is a power of two and the reference forms ``offset + weight`` in float32 first."""
        node = v.producer
        if node is None or node.op != "rms_norm" or len(node.inputs) < 2 or v in graph.outputs:
            return False
        weight = node.inputs[1]
        uses = graph.uses()
        if len(uses.get(v, [])) != 1 or len(uses.get(weight, [])) != 1 or not weight.is_weight \
                or type(weight.encoding) is not Dense:
            return False
        data = weight.encoding.data
        if node.attrs["offset"] != 0.0 and data.dtype != torch.float32:
            return False                # offset + weight would round in the weight's own dtype
        scaled = ((node.attrs["offset"] + data.to(torch.float32)) * factor).to(data.dtype)
        node.inputs[1] = graph.add_weight(graph.fresh_name(f"{weight.name}.scaled"), Dense(scaled))
        node.attrs["offset"] = 0.0
        graph.remove_unused_weights()
        return True

    @staticmethod
    def _times(graph: Graph, v: Value, factor: float) -> Value:
        k = graph.op("full", shape=[], value=factor, dtype=v.dtype, name=graph.fresh_name(f"{v.name}.scale", node=True))
        return graph.op("mul", v, k, name=graph.fresh_name(f"{v.name}.scaled", node=True))


__all__ = ["ScaleResidual", "residual_stream"]

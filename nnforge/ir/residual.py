"""A decoder's residual stream carried divided by a power of two: the graph rewrite that the
``scale_residual`` pass (passes/residual_scale.py) runs for fp16 backends and that the hls backend's
activation fit (backends/hls/ranges.py) applies when a fixed-point format cannot hold the stream.

The stream's first value and every block output added to it are multiplied by ``factor``, and each
RMS norm reading it takes ``eps * factor**2``: the same function in real arithmetic, exact in floats
up to the rounding of the epsilon (the factor is a power of two). The stream is found from the
first ``rms_norm``'s input: a chain of ``add`` nodes, each adding a block's output, whose values
only RMS norms and the next add read; a graph where anything else reads it is left as it is.

    >>> scale_residual(graph, 0.125)      # {"factor": ..., "adds": ..., ...} or why nothing changed
"""
from __future__ import annotations

import torch

from .encodings import Dense
from .graph import Graph, Node, Value


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


def scale_residual(graph: Graph, factor: float) -> dict | str:
    """Scale ``graph``'s residual stream by ``factor`` in place (module docstring): what changed
    ({"factor", "adds", "rms_norms", "folded_into_norms"}), or why nothing did."""
    found = residual_stream(graph)
    if isinstance(found, str):
        return found
    values, adds, norms = found
    factor = float(factor)
    # each add's other operand (the block output), taken before the stream's first value is replaced
    others = [0 if add.inputs[1] is r else 1 for add, r in zip(adds, values)]
    first = values[0]
    readers = [(n, s) for n, s in graph.uses()[first]]
    producer = first.producer
    anchor = graph.nodes[graph.nodes.index(producer) + 1] if producer is not None else graph.nodes[0]
    with graph.inserting_before(anchor):
        scaled = _times(graph, first, factor)
    for node, slot in readers:
        node.inputs[slot] = scaled
    folded = 0
    for add, other in zip(adds, others):
        if _fold(graph, add.inputs[other], factor):
            folded += 1
            continue
        with graph.inserting_before(add):
            add.inputs[other] = _times(graph, add.inputs[other], factor)
    for norm in norms:
        norm.attrs["eps"] = norm.attrs["eps"] * factor * factor
    return {"factor": factor, "adds": len(adds), "rms_norms": len(norms), "folded_into_norms": folded}


def _fold(graph: Graph, v: Value, factor: float) -> bool:
    """Scale a block output made by an RMS norm (a post-norm, as Gemma 2 and 3 have) through its
    weight, when nothing else reads the output or the weight: the unscaled output then never
    exists, which matters to a fixed-point design whose range it would pass. Exact: the factor is a
    power of two and the reference forms ``offset + weight`` in float32 first."""
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


def _times(graph: Graph, v: Value, factor: float) -> Value:
    k = graph.op("full", shape=[], value=factor, dtype=v.dtype, name=graph.fresh_name(f"{v.name}.scale", node=True))
    return graph.op("mul", v, k, name=graph.fresh_name(f"{v.name}.scaled", node=True))


__all__ = ["residual_stream", "scale_residual"]

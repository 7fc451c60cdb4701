"""A graph cut into the blocks recovery tunes one at a time: its transformer layers (or residual
stages), found by the layer index in node names.

Importers keep the module path in node names (``bert.encoder.layer.3.attention.self.query``,
``model.layers.3.self_attn.q_proj``, ``layer2.1.conv1``): a block is the run of nodes from the first
node of one layer (the first name with a numeric path component, up to it: ``model.layers.3``) to
the node before the first node of the next, so the glue between layers (reshapes, residual adds)
belongs to the layer before it. A node whose own name has no layer index takes its weights' (a
``native_layer_norm_3`` reading ``layers.1.norm.weight`` opens layer 1). What precedes the first layer (embeddings, masks, rotary
tables) is the prologue, what follows the last node of the last layer (a final norm, the LM head,
pooling) the epilogue; neither is tuned. A graph whose names carry no layer index is one block.

A block's inputs are the activations it reads that were made before it; its outputs the values it
makes that a later node or the graph's outputs read: what its reconstruction must match.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...ir import Graph, Node, Value

_LAYER = re.compile(r"^(.*?[./]\d+)(?=[./]|$)")


def layer_key(name: str) -> str | None:
    """The layer a node name belongs to (its path up to the first numeric component), or None."""
    m = _LAYER.match(name)
    return m.group(1) if m else None


@dataclass
class Block:
    name: str
    nodes: list[Node]
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    weights: list[Value] = field(default_factory=list)       # read by this block's nodes and no other's


@dataclass
class Cut:
    prologue: list[Node]
    blocks: list[Block]
    epilogue: list[Node]


def node_layer(node: Node) -> str | None:
    """The layer of a node: from its name, else from the first of its weights whose name has one."""
    k = layer_key(node.name)
    if k is None:
        k = next((layer_key(v.name) for v in node.inputs if v is not None and v.is_weight and layer_key(v.name)), None)
    return k


def cut(graph: Graph) -> Cut:
    """``graph``'s prologue, blocks and epilogue (see the module docstring)."""
    nodes = graph.nodes
    starts, keys = [], []
    layers = [node_layer(n) for n in nodes]
    for i, k in enumerate(layers):
        if k is not None and k not in keys:
            keys.append(k)
            starts.append(i)
    if not keys:
        return _with_boundaries(graph, Cut([], [Block(graph.name, list(nodes))], []))
    end = max(i for i, k in enumerate(layers) if k == keys[-1]) + 1
    bounds = starts + [end]
    blocks = [Block(k, list(nodes[a:b])) for k, a, b in zip(keys, bounds, bounds[1:])]
    return _with_boundaries(graph, Cut(list(nodes[:starts[0]]), blocks, list(nodes[end:])))


def _with_boundaries(graph: Graph, c: Cut) -> Cut:
    owner: dict[Node, int] = {}
    for i, b in enumerate(c.blocks):
        for n in b.nodes:
            owner[n] = i
    readers: dict[Value, set[int]] = {}           # value -> blocks reading it (-1: prologue/epilogue)
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None:
                readers.setdefault(v, set()).add(owner.get(n, -1))
    outputs = set(graph.outputs)
    for i, b in enumerate(c.blocks):
        made = {o for n in b.nodes for o in n.outputs}
        seen_in, seen_w = set(), set()
        for n in b.nodes:
            for v in n.inputs:
                if v is None or v in made:
                    continue
                if v.is_weight:
                    if v not in seen_w and readers.get(v, set()) == {i}:
                        seen_w.add(v)
                        b.weights.append(v)
                elif v not in seen_in:
                    seen_in.add(v)
                    b.inputs.append(v)
        b.outputs = [o for n in b.nodes for o in n.outputs
                     if o in outputs or any(r != i for r in readers.get(o, ()))]
    return c


__all__ = ["Block", "Cut", "cut", "layer_key", "node_layer"]

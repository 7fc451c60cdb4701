"""Shrinking a failing graph to a small repro (delta debugging on the graph's structure).

``still_fails(graph, inputs)`` is the property to keep; the reducer tries, in order,

1. one output at a time;
2. cutting the graph at each node (that node's value as the only output), earliest first;
3. the failing node alone, fed the values it read as new graph inputs;
4. bypassing a node (its readers read one of its inputs of the same type instead);

and drops unused inputs and weights after each accepted step. Inputs travel as a dict by name, so
a graph that lost inputs takes the ones it kept.

    >>> small, small_inputs = reduce_graph(graph, inputs, still_fails, budget_s=60)
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..ir import Graph, GraphError, Interpreter, Value, symbolic as sym, verify
from ..passes import eliminate_dead_code

Inputs = dict[str, torch.Tensor]


def with_outputs(graph: Graph, outputs: list[Value]) -> Graph:
    """A new graph computing ``outputs`` (values of ``graph``) from the inputs it still reads."""
    g = graph.copy()
    index = {v.name: v for v in g.values()}
    g.set_outputs([index[v.name] for v in outputs])
    eliminate_dead_code(g)
    used = set(g.uses()) | set(g.outputs)
    needed = set()
    for n in g.nodes:
        for o in n.outputs:
            for d in o.shape:
                if isinstance(d, str):
                    needed.add(d)
    keep = []
    for v in g.inputs:
        if v in used or needed & {d for d in v.shape if isinstance(d, str)}:
            keep.append(v)
            needed -= set(v.shape)
    if len(keep) == len(g.inputs):
        return verify(g)
    out = Graph(g.name)
    out.meta = dict(g.meta)
    vmap = {v: out.add_input(v.name, v.type) for v in keep}
    for name, v in g.weights.items():
        vmap[v] = out.add_weight(name, v.encoding)
    for n in g.nodes:
        node = out.add_node(n.op, [None if v is None else vmap[v] for v in n.inputs], n.attrs, name=n.name,
                            output_names=[o.name for o in n.outputs], meta=n.meta)
        vmap.update(zip(n.outputs, node.outputs))
    out.set_outputs([vmap[v] for v in g.outputs])
    return verify(out)


def bypass(graph: Graph, node_name: str, input_index: int) -> Graph | None:
    """``graph`` with node ``node_name``'s output replaced by its input ``input_index`` (same type)."""
    g = graph.copy()
    node = g.node(node_name)
    src = node.inputs[input_index]
    out = node.outputs[0]
    if src is None or not src.type.same_as(out.type):
        return None
    if out in g.outputs:
        if src.producer is None:
            return None
        g.set_outputs([src if v is out else v for v in g.outputs])
    g.replace_uses(out, src)
    try:
        return with_outputs(g, g.outputs)
    except GraphError:
        return None


def isolate(graph: Graph, inputs: Inputs) -> tuple[Graph, Inputs] | None:
    """The last node of a one-output graph alone: the values it reads become graph inputs holding
    what they held in ``graph`` (None when one has a computed symbolic dim, which inputs cannot)."""
    if len(graph.outputs) != 1 or graph.outputs[0].producer is None:
        return None
    node = graph.outputs[0].producer
    read = [v for v in dict.fromkeys(node.inputs) if v is not None and not v.is_weight]
    if any(not isinstance(d, int) and not sym.is_symbol(d) for v in read for d in v.shape):
        return None
    values = capture(graph, [inputs[v.name] for v in graph.inputs])
    g = Graph(graph.name)
    vmap = {v: g.add_input(v.name, v.type) for v in read}
    for v in node.inputs:
        if v is not None and v.is_weight:
            vmap[v] = g.add_weight(v.name, v.encoding)
    out = g.add_node(node.op, [None if v is None else vmap[v] for v in node.inputs], node.attrs, name=node.name,
                     output_names=[o.name for o in node.outputs])
    g.set_outputs(out.outputs)
    return verify(g), {**inputs, **{v.name: values[v] for v in read}}


def capture(graph: Graph, inputs: list) -> dict:
    values = dict(zip(graph.inputs, inputs))

    def keep(node, outs):
        values.update(zip(node.outputs, outs))
    Interpreter(graph).run(*inputs, capture=keep)
    return values


def _take(inputs: Inputs, g: Graph) -> list[torch.Tensor]:
    return [inputs[v.name] for v in g.inputs]


def reduce_graph(graph: Graph, inputs: Inputs, still_fails: Callable[[Graph, list], bool],
                 budget_s: float = 90.0) -> Graph:
    """The smallest graph found within ``budget_s`` for which ``still_fails(g, inputs in g's
    order)`` holds (``graph`` itself when nothing smaller does). ``inputs`` gains the values of
    the inputs an isolated node reads."""
    deadline = time.monotonic() + budget_s
    best = graph

    def check(g: Graph | None) -> bool:
        if g is None or time.monotonic() > deadline:
            return False
        try:
            return still_fails(g, _take(inputs, g))
        except Exception:      # noqa: BLE001 — a candidate that cannot even run is not a repro
            return False

    if len(best.outputs) > 1:
        for v in best.outputs:
            cand = with_outputs(best, [v])
            if check(cand):
                best = cand
                break
    for node in list(best.nodes)[:-1]:            # earliest failing cut
        if len(node.outputs) != 1:
            continue
        cand = with_outputs(best, [node.outputs[0]])
        if len(cand.nodes) < len(best.nodes) and check(cand):
            best = cand
            break
    if len(best.nodes) > 1:                       # the failing node alone, on the values it read
        iso = isolate(best, inputs)
        if iso is not None:
            inputs.update(iso[1])
            if check(iso[0]):
                return iso[0]
    changed = True
    while changed and time.monotonic() < deadline:
        changed = False
        for node in reversed(list(best.nodes)):
            for i in range(len(node.inputs)):
                cand = bypass(best, node.name, i)
                if cand is not None and len(cand.nodes) < len(best.nodes) and check(cand):
                    best, changed = cand, True
                    break
            if changed:
                break
    return best

"""The verifier: well-formedness rules, each a small function that yields messages.

Run after every pass (the PassManager does) and on every graph read from disk. All problems are
reported at once, each naming the node, value or weight at fault.

    >>> verify(graph)            # raises GraphError listing every problem
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

from . import symbolic as sym
from .graph import MAX_NAME_LEN, NAME_RE, Graph, GraphError
from .ops import OPS

MAX_ELEMENTS = 1 << 40          # a single tensor larger than this is treated as a malformed graph
MAX_RANK = 16

Rule = Callable[[Graph], Iterator[str]]


def _names(g: Graph) -> Iterator[str]:
    seen: dict[str, str] = {}
    for v in g.values():
        if not isinstance(v.name, str) or not NAME_RE.match(v.name) or len(v.name) > MAX_NAME_LEN:
            yield f"value {v.name!r} has an invalid name"
        where = v.kind if v.producer is None else f"output of node {v.producer.name}"
        if v.name in seen:
            yield f"value name {v.name!r} is defined twice ({seen[v.name]} and {where})"
        seen.setdefault(v.name, where)
    node_names: set[str] = set()
    for n in g.nodes:
        if not isinstance(n.name, str) or not NAME_RE.match(n.name) or len(n.name) > MAX_NAME_LEN:
            yield f"node {n.name!r} has an invalid name"
        if n.name in node_names:
            yield f"node name {n.name!r} is used twice"
        node_names.add(n.name)


def _ops_and_attrs(g: Graph) -> Iterator[str]:
    for n in g.nodes:
        where = f"node {n.name} ({n.op})"
        if n.op not in OPS:
            yield f"{where}: unknown op"
            continue
        op = OPS[n.op]
        try:
            op.check_arity(len(n.inputs), where)
            checked = op.check_attrs(n.attrs, where)
        except GraphError as e:
            yield str(e)
            continue
        if checked != n.attrs:
            yield f"{where}: attributes are not in canonical form ({n.attrs} vs {checked})"


def _ssa_and_order(g: Graph) -> Iterator[str]:
    defined = set(g.inputs) | set(g.weights.values())
    producers = {}
    for n in g.nodes:
        for o in n.outputs:
            if o in producers:
                yield f"value {o.name} is produced by both {producers[o].name} and {n.name}"
            producers[o] = n
            if o.producer is not n:
                yield f"value {o.name} lists producer {getattr(o.producer, 'name', None)} but node {n.name} defines it"
    for name, w in g.weights.items():
        if w.encoding is None or w.name != name:
            yield f"weight {name} is not registered consistently (name {w.name}, encoding {w.encoding})"
    unsorted = False
    for n in g.nodes:
        for i, v in enumerate(n.inputs):
            if v is None or v in defined:
                continue
            if v in producers:
                unsorted = True
                yield f"node {n.name} reads {v.name} (input {i}) before node {producers[v].name} defines it"
            else:
                yield f"node {n.name} reads dangling value {v.name} (input {i}), defined nowhere in the graph"
        defined.update(n.outputs)
    if unsorted:
        try:
            g.copy().toposort()
            yield "nodes are not in topological order (Graph.toposort() can fix it)"
        except GraphError as e:
            yield str(e)
    if not g.outputs:
        yield f"graph {g.name} has no outputs"
    for v in g.outputs:
        if v not in defined:
            yield f"graph output {v.name} is defined nowhere in the graph"


def _types(g: Graph) -> Iterator[str]:
    for n in g.nodes:
        if n.op not in OPS or any(v is not None and v.type is None for v in n.inputs):
            continue
        where = f"node {n.name} ({n.op})"
        try:
            inferred = OPS[n.op].infer_types([None if v is None else v.type for v in n.inputs], n.attrs, where)
        except GraphError as e:
            yield str(e)
            continue
        if len(inferred) != len(n.outputs):
            yield f"{where}: has {len(n.outputs)} outputs, its op defines {len(inferred)}"
            continue
        for o, t in zip(n.outputs, inferred):
            if not o.type.same_as(t):
                yield f"{where}: output {o.name} is typed {o.type} but its inputs give {t}"


def _weights(g: Graph) -> Iterator[str]:
    for name, v in g.weights.items():
        enc = v.encoding
        if tuple(enc.shape) != tuple(v.shape):
            yield f"weight {name}: encoding shape {tuple(enc.shape)} differs from its type {v.type}"
        if enc.dtype != v.dtype:
            yield f"weight {name}: encoding decodes to {enc.dtype}, its type says {v.dtype}"


def _symbols_and_sizes(g: Graph) -> Iterator[str]:
    bound = set()
    for v in g.inputs:
        for axis, d in enumerate(v.shape):
            if isinstance(d, str) and not sym.is_symbol(d):
                yield f"input {v.name} axis {axis}: input dims must be ints or plain symbols, got {d!r}"
            bound |= sym.symbols(d)
    for v in g.values():
        if v.type.rank > MAX_RANK:
            yield f"value {v.name} has rank {v.type.rank}, above the cap of {MAX_RANK}"
        free = set().union(*(sym.symbols(d) for d in v.shape)) - bound
        if free:
            yield f"value {v.name} ({v.type}) uses symbol(s) {', '.join(sorted(free))} that no graph input defines"
        static = [d for d in v.shape if isinstance(d, int)]
        if any(d < 0 for d in static) or math.prod(static) > MAX_ELEMENTS:
            yield f"value {v.name} has an absurd shape {v.type} (more than {MAX_ELEMENTS} elements or negative)"


RULES: list[Rule] = [_names, _ops_and_attrs, _ssa_and_order, _types, _weights, _symbols_and_sizes]


def check(graph: Graph) -> list[str]:
    """All problems found, as messages (empty when the graph is well-formed)."""
    problems: list[str] = []
    for rule in RULES:
        problems.extend(rule(graph))
    return problems


def verify(graph: Graph) -> Graph:
    problems = check(graph)
    if problems:
        shown = "\n  ".join(problems[:25])
        more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        raise GraphError(f"graph {graph.name} is malformed ({len(problems)} problem(s)):\n  {shown}{more}")
    return graph

"""The verifier: well-formedness rules, each a small function that yields messages.

Run after every pass (the PassManager does) and on every graph read from disk. All problems are
reported at once, each naming the node, value or weight at fault. Every rule walks the graph
iteratively, in time linear in its size (a 100,000-node chain verifies in about a second), and
the caps below bound what a graph may declare: a graph over a count cap is reported as such
before any other rule walks it.

    >>> verify(graph)            # raises GraphError listing every problem
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

from . import symbolic as sym
from .graph import MAX_NAME_LEN, NAME_RE, Graph, GraphError
from .ops import OPS

# Caps on what a graph may declare (a graph beyond them is treated as malformed, not run):
MAX_ELEMENTS = 1 << 40          # elements of one tensor (symbols counted as 1)
MAX_RANK = 16                   # axes of one tensor
MAX_NODES = 1 << 20             # nodes in a graph (a 70B-parameter LLM has a few thousand)
MAX_WEIGHTS = 1 << 20           # named weights in a graph
MAX_GRAPH_IO = 1 << 16          # graph inputs, and graph outputs
MAX_NODE_IO = 1 << 16           # inputs plus outputs of one node
MAX_WEIGHT_BYTES = 1 << 40      # bytes all weights take as stored (1 TiB)
MAX_ATTR_ITEMS = 1 << 10        # items in one list attribute (shapes, pads, axes ...)
MAX_ATTR_TEXT = 1 << 10         # characters in one string attribute

Rule = Callable[[Graph], Iterator[str]]


def _valid(name) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME_LEN and NAME_RE.fullmatch(name) is not None


def _where(v) -> str:
    return v.kind if v.producer is None else f"output of node {v.producer.name}"


def _names(g: Graph) -> Iterator[str]:
    seen: dict = {}
    for v in g.values():
        if not _valid(v.name):
            yield f"value {v.name!r} has an invalid name"
            continue
        if v.name in seen:
            yield f"value name {v.name!r} is defined twice ({_where(seen[v.name])} and {_where(v)})"
        else:
            seen[v.name] = v
    node_names: set[str] = set()
    for n in g.nodes:
        if not _valid(n.name):
            yield f"node {n.name!r} has an invalid name"
        elif n.name in node_names:
            yield f"node name {n.name!r} is used twice"
        else:
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
    for v in g.inputs:
        if v.producer is not None or v.encoding is not None:
            where = f"node {v.producer.name}" if v.producer is not None else "a weight encoding"
            yield f"graph input {v.name} is not a plain input (it has {where})"
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
            g.topological_order()
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
            if o.type != t and not o.type.same_as(t):
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
    verdicts: dict = {}                 # type -> message tails: most values share a few types
    for v in g.values():
        tails = verdicts.get(v.type)
        if tails is None:
            tails = verdicts[v.type] = list(_type_problems(v.type, bound))
        for tail in tails:
            yield f"value {v.name}{tail}"


def _type_problems(t, bound: set) -> Iterator[str]:
    if t.rank > MAX_RANK:
        yield f" has rank {t.rank}, above the cap of {MAX_RANK}"
    free = set().union(*(sym.symbols(d) for d in t.shape)) - bound
    if free:
        yield f" ({t}) uses symbol(s) {', '.join(sorted(free))} that no graph input defines"
    ones = dict.fromkeys(set().union(*(sym.symbols(d) for d in t.shape)), 1)
    try:
        sizes = [sym.evaluate(d, ones) for d in t.shape]      # every symbol at its smallest size
    except sym.DimError:
        sizes = [d for d in t.shape if isinstance(d, int)]
    if any(d < 0 for d in t.shape if isinstance(d, int)) or math.prod(max(d, 0) for d in sizes) > MAX_ELEMENTS:
        yield f" has an absurd shape {t} (more than {MAX_ELEMENTS} elements or negative)"


def _counts(g: Graph) -> Iterator[str]:
    for what, n, cap in (("nodes", len(g.nodes), MAX_NODES), ("weights", len(g.weights), MAX_WEIGHTS),
                         ("inputs", len(g.inputs), MAX_GRAPH_IO), ("outputs", len(g.outputs), MAX_GRAPH_IO)):
        if n > cap:
            yield f"graph {g.name} has {n:,} {what}, above the cap of {cap:,}"


def _limits(g: Graph) -> Iterator[str]:
    total = 0
    for name, v in g.weights.items():
        if v.encoding is not None:
            total += v.encoding.nbytes
    if total > MAX_WEIGHT_BYTES:
        yield f"graph {g.name}: its weights take {total:,} bytes, above the cap of {MAX_WEIGHT_BYTES:,}"
    for n in g.nodes:
        if len(n.inputs) + len(n.outputs) > MAX_NODE_IO:
            yield (f"node {n.name} ({n.op}) has {len(n.inputs):,} inputs and {len(n.outputs):,} outputs, "
                   f"above the cap of {MAX_NODE_IO:,} in all")
        for key, a in n.attrs.items():
            if isinstance(a, (list, tuple)) and len(a) > MAX_ATTR_ITEMS:
                yield f"node {n.name} ({n.op}): attribute {key} has {len(a):,} items, above the cap of {MAX_ATTR_ITEMS}"
            elif isinstance(a, str) and len(a) > MAX_ATTR_TEXT:
                yield (f"node {n.name} ({n.op}): attribute {key} is {len(a):,} characters long, "
                       f"above the cap of {MAX_ATTR_TEXT}")


RULES: list[Rule] = [_limits, _names, _ops_and_attrs, _ssa_and_order, _types, _weights, _symbols_and_sizes]


def check(graph: Graph) -> list[str]:
    """All problems found, as messages (empty when the graph is well-formed). A graph over a count
    cap (nodes, weights, inputs, outputs) is reported for that alone: no other rule walks it."""
    problems = list(_counts(graph))
    if problems:
        return problems
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

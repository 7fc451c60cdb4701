"""Fix a graph's dimension symbols to integers: the static form that backends generating fixed-size
hardware (the hls backend) need.

Every node is re-added with its ``dim`` / ``dims`` attributes evaluated, so output types are
inferred again from concrete inputs; each one must equal the original symbolic type evaluated with
the same values, which catches a graph whose symbolic shapes were wrong for those sizes.

    >>> static = specialize(graph, {"batch": 1, "seq": 128})
"""
from __future__ import annotations

from . import symbolic as sym
from .graph import Graph, GraphError
from .types import TensorType


def _dims(shape, env: dict[str, int], where: str) -> tuple:
    try:
        return tuple(sym.evaluate(d, env) if isinstance(d, str) else d for d in shape)
    except sym.DimError as e:
        raise GraphError(f"{where}: {e}") from None


def symbol_names(graph: Graph) -> set[str]:
    """The dimension symbols the graph's inputs introduce."""
    return {name for v in graph.inputs for d in v.shape if isinstance(d, str) for name in sym.symbols(d)}


def bind_symbols(graph: Graph, dims: dict[str, int] | None = None, shapes: dict[str, list] | None = None) -> dict:
    """Values for every symbol of ``graph``: from ``dims`` first, then read off ``shapes`` (input name
    -> concrete shape, e.g. the example inputs'). A symbol with neither, two disagreeing sizes in
    ``shapes``, or a value below 1 is a GraphError naming it."""
    dims = dict(dims or {})
    unknown = sorted(set(dims) - symbol_names(graph))
    if unknown:
        raise GraphError(f"graph {graph.name}: no dimension symbol(s) {', '.join(unknown)}; its symbols: "
                         f"{', '.join(sorted(symbol_names(graph))) or 'none (all shapes are static)'}")
    seen: dict[str, tuple[int, str]] = {}
    for v in graph.inputs:
        shape = (shapes or {}).get(v.name)
        if shape is None:
            continue
        if len(shape) != len(v.shape):
            raise GraphError(f"input {v.name}: rank {len(v.shape)} {list(v.shape)}, example shape {list(shape)}")
        for axis, (d, n) in enumerate(zip(v.shape, shape)):
            if isinstance(d, str) and sym.is_symbol(d):
                if d in seen and seen[d][0] != n:
                    raise GraphError(f"dimension {d} is {n} in input {v.name} but {seen[d][0]} in {seen[d][1]}")
                seen.setdefault(d, (int(n), v.name))
    env = {s: (dims[s] if s in dims else seen[s][0]) for s in sorted(symbol_names(graph)) if s in dims or s in seen}
    missing = sorted(symbol_names(graph) - set(env))
    if missing:
        raise GraphError(f"graph {graph.name}: no size for dimension symbol(s) {', '.join(missing)}")
    bad = [f"{s}={n}" for s, n in env.items() if not isinstance(n, int) or isinstance(n, bool) or n < 1]
    if bad:
        raise GraphError(f"graph {graph.name}: dimension sizes must be integers >= 1, got {', '.join(bad)}")
    return env


def specialize(graph: Graph, env: dict[str, int]) -> Graph:
    """A copy of ``graph`` with every symbol replaced by its value in ``env`` (all symbols needed)."""
    missing = sorted(symbol_names(graph) - set(env))
    if missing:
        raise GraphError(f"graph {graph.name}: no size for dimension symbol(s) {', '.join(missing)}")
    if not symbol_names(graph):
        return graph
    g = Graph(graph.name)
    g.meta = dict(graph.meta)
    g.meta["specialized_dims"] = dict(env)
    vmap = {}
    for v in graph.inputs:
        vmap[v] = g.add_input(v.name, TensorType(v.dtype, _dims(v.shape, env, f"input {v.name}")))
    for name, v in graph.weights.items():
        vmap[v] = g.add_weight(name, v.encoding)
        vmap[v].type = v.type
    for n in graph.nodes:
        where = f"node {n.name} ({n.op})"
        attrs = dict(n.attrs)
        for key, spec in n.opdef.attrs.items():
            a = attrs.get(key)
            if spec.kind == "dim" and isinstance(a, str):
                attrs[key] = _dims([a], env, where)[0]
            elif spec.kind == "dims" and a is not None:
                attrs[key] = list(_dims(a, env, where))
        new = g.add_node(n.op, [None if v is None else vmap[v] for v in n.inputs], attrs, name=n.name,
                         output_names=[o.name for o in n.outputs], meta=dict(n.meta))
        for o, no in zip(n.outputs, new.outputs):
            want = _dims(o.shape, env, f"{where} output {o.name}")
            if tuple(no.shape) != want or no.dtype != o.dtype:
                raise GraphError(f"{where}: output {o.name} is {no.type} with {env}, but the graph says "
                                 f"{o.type} (= {list(want)})")
            vmap[o] = no
    g.outputs = [vmap[v] for v in graph.outputs]
    return g

"""Graph simplifications every stage may use: dead code elimination, constant folding, the
algebraic identities of the IR's ops, and the static form of a graph at given sizes. The passes
of ``nnforge.passes.cleanup`` run them as recorded steps; a runtime that builds a fixed-size design
for new sizes at load (the hls backend) uses :func:`static_form` directly.

Local rewrites are tables of ``(ops, fn)`` rules (tinygrad's PatternMatcher style): ``fn(graph,
node)`` returns the value that replaces the node's output, or None for "no match". One short
comment per rule says what it matches.

    >>> rewrite(graph, SIMPLIFY_RULES); eliminate_dead_code(graph)
    >>> static = static_form(graph, {"batch": 2, "seq": 16})
"""
from __future__ import annotations

import math
from typing import Callable

from . import symbolic as sym
from .encodings import Dense
from .graph import Graph, Node, Value
from .ops import RunContext, get_op
from .specialize import specialize

Rule = tuple[tuple[str, ...], Callable[[Graph, Node], Value | None]]


def rewrite(graph: Graph, rules: list[Rule], max_rounds: int = 10) -> int:
    """Apply ``rules`` over the graph until nothing changes; returns the number of rewrites."""
    by_op: dict[str, list] = {}
    for ops, fn in rules:
        for op in ops:
            by_op.setdefault(op, []).append(fn)
    total = 0
    for _ in range(max_rounds):
        changed = 0
        for node in list(graph.nodes):
            if len(node.outputs) != 1:
                continue
            for fn in by_op.get(node.op, ()):
                new = fn(graph, node)
                if new is not None and new is not node.output and _redirect(graph, node.output, new):
                    changed += 1
                    break
        if not changed:
            break
        total += changed
        eliminate_dead_code(graph)
    return total


def _redirect(graph: Graph, old: Value, new: Value) -> bool:
    """Replace ``old`` by ``new``; a graph output keeps its name (the signature must not change).
    Returns whether anything changed."""
    if old in graph.outputs and new.producer is not None and new not in graph.outputs \
            and new.name not in {v.name for v in graph.inputs}:
        old_name = old.name
        graph.replace_uses(old, new)
        graph.rename(old, graph.fresh_name(f"{old_name}_replaced"))   # frees the name of the dead value
        graph.rename(new, old_name)
        return True
    if old in graph.outputs:
        return False        # cannot rename an input or weight into an output; keep the node
    graph.replace_uses(old, new)
    return True


def eliminate_dead_code(graph: Graph) -> int:
    """Remove nodes whose outputs nothing reads, then unused weights; returns nodes removed."""
    live = set(graph.outputs)
    keep = []
    for node in reversed(graph.nodes):
        if any(o in live for o in node.outputs):
            keep.append(node)
            live.update(v for v in node.inputs if v is not None)
    removed = len(graph.nodes) - len(keep)
    if removed:
        kept = set(keep)
        graph.remove_nodes([n for n in graph.nodes if n not in kept])
    graph.remove_unused_weights()
    return removed


def _symbolic_attrs(node) -> bool:
    """True when an attribute holds a symbolic dim: arange(seq, seq + 1) has a static shape but
    a value known only at run time."""
    specs = get_op(node.op).attrs
    for key, v in node.attrs.items():
        if key in specs and specs[key].kind in ("dim", "dims"):
            if any(isinstance(d, str) for d in (v if isinstance(v, (list, tuple)) else [v])):
                return True
    return False


def fold_constants(graph: Graph, max_growth: float = 1.0, min_elements: int = 1 << 16) -> int:
    """Evaluate nodes whose inputs are all dense constants (and nodes with no inputs and a static
    shape) into new weights; returns how many. Outputs larger than ``max_growth`` times their
    inputs (and ``min_elements``) are not folded, and encoded weights are never decoded here."""
    folded = 0
    outputs = set(graph.outputs)
    for node in list(graph.nodes):
        if len(node.outputs) != 1 or node.output in outputs:
            continue
        ins = [v for v in node.inputs if v is not None]
        if not all(v.is_weight and isinstance(v.encoding, Dense) for v in ins):
            continue
        out = node.output
        if not out.type.is_static or _symbolic_attrs(node):
            continue
        in_size = sum(v.encoding.numel for v in ins)
        if math.prod(out.shape) > max(min_elements, max_growth * in_size):
            continue
        args = [None if v is None else v.encoding.data for v in node.inputs]
        value = get_op(node.op).run(RunContext(), args, node.attrs)[0]
        # .clone(): a kernel may return a view of its input (reshape, slice, a no-op cast),
        # and weights sharing storage cannot be saved to safetensors
        const = graph.add_weight(graph.fresh_name(f"{out.name}_folded"), Dense(value.to(out.dtype.torch_dtype).clone()))
        graph.replace_uses(out, const)
        folded += 1
    eliminate_dead_code(graph)
    return folded


def _const_value(v: Value):
    if v is not None and v.is_weight and isinstance(v.encoding, Dense) and v.encoding.numel <= 1:
        return v.encoding.data.reshape(-1)[0].item() if v.encoding.numel else None
    return None


def _keeps_type(node: Node, v: Value) -> bool:
    return v.type.same_as(node.output.type)


def _identity_operand(neutral, commutes):
    def fn(g, node):
        a, b = node.inputs
        if _const_value(b) == neutral and _keeps_type(node, a):
            return a
        if commutes and _const_value(a) == neutral and _keeps_type(node, b):
            return b
        return None
    return fn


def _reshape_noop(g, node):
    x = node.inputs[0]
    return x if _keeps_type(node, x) else None


def _reshape_of_reshape(g, node):
    x = node.inputs[0]
    if x.producer is not None and x.producer.op == "reshape":
        with g.inserting_before(node):
            return g.op("reshape", x.producer.inputs[0], shape=list(node.output.shape), name=g.fresh_name(node.name, node=True))
    return None


def _permute_identity(g, node):
    return node.inputs[0] if node.attrs["perm"] == sorted(node.attrs["perm"]) else None


def _slice_full(g, node):
    x = node.inputs[0]
    a = node.attrs
    full = a["start"] == 0 and a["step"] == 1 and sym.equal(a["end"], x.shape[a["axis"] % x.type.rank])
    return x if full else None


SIMPLIFY_RULES: list[Rule] = [
    (("add",), _identity_operand(0, True)),          # x + 0 -> x
    (("sub",), _identity_operand(0, False)),         # x - 0 -> x
    (("mul",), _identity_operand(1, True)),          # x * 1 -> x
    (("div",), _identity_operand(1, False)),         # x / 1 -> x
    (("reshape", "expand", "cast"), _reshape_noop),  # to its own type -> x
    (("reshape",), _reshape_of_reshape),             # reshape(reshape(x)) -> reshape(x)
    (("permute",), _permute_identity),               # identity permutation -> x
    (("slice",), _slice_full),                       # x[0:size:1] -> x
]


def simplify(graph: Graph) -> int:
    """Apply :data:`SIMPLIFY_RULES` until nothing changes; returns the number of rewrites."""
    return rewrite(graph, SIMPLIFY_RULES)


def static_form(graph: Graph, env: dict[str, int]) -> Graph:
    """``graph`` with its dimension symbols fixed to ``env`` (:func:`~.specialize.specialize`) and
    what only the sizes made constant (aranges, masks, shape arithmetic) folded away."""
    static = specialize(graph, env)
    if static is not graph:
        fold_constants(static)
        simplify(static)
        eliminate_dead_code(static)
    return static


__all__ = ["Rule", "rewrite", "eliminate_dead_code", "fold_constants", "simplify", "static_form", "SIMPLIFY_RULES"]

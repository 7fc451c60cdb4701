"""Finding the structures that structured pruning removes, and rewriting the graph once they go.

Three kinds, found from the graph's dataflow, never from layer names:

* :class:`ChannelGroup` — the hidden channels between "source" linears (rows) and one "sink"
  linear (columns) through elementwise ops only: an MLP (fc1 -> gelu -> fc2, or gated
  up/gate -> silu * -> down). Removing channel c deletes row c of every source and column c of
  the sink.
* :class:`HeadGroup` — attention heads. The head axis is followed through the attention core as
  ``(axis, inner)``: along ``axis`` the index splits as ``(outer, head, inner)``, so one state
  covers a pure ``[.., heads, ..]`` axis, a head axis merged with the batch (``12*batch``) and
  the fused ``heads*head_dim`` feature axis of the Q/K/V and output projections alike. Every
  reshape/full/expand that carries it gets its head count rescaled.
* :class:`ResidualBranch` — ``add(x, f(x))`` where ``f`` holds weights and only feeds the add:
  dropping it leaves x (plus a constant).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...ir import Dense, Graph, Node, Value
from ...ir import symbolic as sym
from ...ir.types import TensorType
from ..base import PassError

# Elementwise ops a channel or head axis passes through unchanged.
UNARY = {"relu", "gelu", "leaky_relu", "neg", "abs", "clamp", "cast", "not", "exp", "log", "sqrt", "rsqrt",
         "reciprocal", "sigmoid", "tanh", "erf", "silu", "sin", "cos", "floor", "ceil", "hardswish", "hardsigmoid"}
BINARY = {"add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
          "and", "or", "xor", "where"}
NONLINEAR = UNARY - {"neg", "cast", "not", "clamp"}


def is_linear_with_weight(node: Node) -> bool:
    return (node.op == "linear" and len(node.inputs) > 1 and node.inputs[1] is not None
            and node.inputs[1].is_weight)


def _probe_envs(graph: Graph) -> list[dict[str, int]]:
    """Two bindings of every dimension symbol to large distinct primes: the head's position is
    found with integer arithmetic, and two bindings rule out a coincidental fit."""
    names = sorted(graph.symbols())
    primes = [(1009, 2003), (1013, 2011), (1019, 2017), (1021, 2027), (1031, 2029), (1033, 2039)]
    return [{n: primes[i % len(primes)][k] + 40 * (i // len(primes)) for i, n in enumerate(names)} for k in (0, 1)]


def _concrete(shape, env) -> list[int]:
    return [sym.evaluate(d, env) for d in shape]


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


# --- MLP channels ----------------------------------------------------------------------------------
@dataclass
class ChannelGroup:
    """Hidden channels between ``sources`` (linears whose rows are channels) and ``sink``."""
    sources: list[Node]
    sink: Node
    region: list[Node]             # elementwise nodes in between (their types shrink)
    channels: int

    @property
    def name(self) -> str:
        return self.sink.name

    def groups(self) -> torch.Tensor:
        return torch.arange(self.channels).unsqueeze(1)


def _channel_region(graph: Graph, start: Node, uses) -> ChannelGroup | None:
    """The channel group reached from linear ``start``; None when the channels leak anywhere
    but elementwise ops and one linear's input."""
    width = start.output.shape[-1]
    if not isinstance(width, int):
        return None
    seen, sources, region, sinks = {start.output}, [start], [], []
    work = [start.output]
    while work:
        v = work.pop()
        if any(o is v for o in graph.outputs):
            return None
        for node, slot in uses.get(v, []):
            if is_linear_with_weight(node) and slot == 0:
                if node not in sinks:
                    sinks.append(node)
                continue
            if node.op not in UNARY | BINARY or node.output.shape[-1] != width:
                return None
            if node not in region:
                region.append(node)
            for other in node.inputs:
                if other is None or other in seen:
                    continue
                d = other.shape[-1] if other.type.rank else 1
                if d == 1:
                    continue                               # broadcast scalar/bias: not a channel
                p = other.producer
                if p is not None and is_linear_with_weight(p) and other.type.rank == v.type.rank:
                    sources.append(p)                      # a gated MLP's second projection
                    seen.add(other)
                    work.append(other)
                    continue
                return None
            if node.output not in seen:
                seen.add(node.output)
                work.append(node.output)
    if len(sinks) != 1 or not any(n.op in NONLINEAR for n in region):
        return None
    order = {n: i for i, n in enumerate(graph.nodes)}
    return ChannelGroup(sorted(sources, key=order.get), sinks[0], sorted(region, key=order.get), width)


def find_mlp_channels(graph: Graph) -> list[ChannelGroup]:
    """Every MLP channel group in graph order (one per sink)."""
    uses = graph.uses()
    out, sinks = [], set()
    for node in graph.nodes:
        if not is_linear_with_weight(node):
            continue
        grp = _channel_region(graph, node, uses)
        if grp is not None and grp.sink not in sinks:
            sinks.add(grp.sink)
            out.append(grp)
    return out


# --- attention heads -------------------------------------------------------------------------------
@dataclass
class HeadGroup:
    """The heads of one attention: Q/K/V (or fused QKV) ``sources``, the output projection
    ``sink``, and every node in between whose types carry the head axis."""
    sources: list[Node]
    sink: Node
    heads: int
    head_dim: int
    states: dict = field(repr=False, default_factory=dict)    # Value -> (axis, inner)
    region: list[Node] = field(default_factory=list)
    rescale: list[Node] = field(default_factory=list)         # reshape/full/expand to rewrite

    @property
    def name(self) -> str:
        return self.sink.name

    def groups(self) -> torch.Tensor:
        return torch.arange(self.heads * self.head_dim).reshape(self.heads, self.head_dim)


class _Refuse(Exception):
    def __init__(self, node: Node, why: str):
        super().__init__(f"node {node.name} ({node.op}): {why}")


def _map_reshape(node: Node, state, heads: int, envs) -> tuple[int, int]:
    """Where the head lands after a row-major reshape: the output axis whose stride range holds
    the head's stride, and the new inner factor; refused when the head straddles two axes."""
    axis, inner = state
    found = set()
    for env in envs:
        xs, ys = _concrete(node.inputs[0].shape, env), _concrete(node.output.shape, env)
        if xs[axis] % (heads * inner):
            raise _Refuse(node, f"input axis {axis} (size {xs[axis]}) does not hold {heads} heads")
        stride = inner * _prod(xs[axis + 1:])
        for b in range(len(ys) - 1, -1, -1):
            t = _prod(ys[b + 1:])
            if t <= stride < t * ys[b]:
                if stride % t or ys[b] % (heads * (stride // t)):
                    raise _Refuse(node, "the reshape splits the head axis across two axes")
                found.add((b, stride // t))
                break
        else:
            raise _Refuse(node, "the head axis does not survive the reshape")
    if len(found) != 1:
        raise _Refuse(node, "the head axis position depends on the batch/sequence sizes")
    return found.pop()


def _propagate(node: Node, slot: int, state, heads: int, head_dim: int, envs):
    """The head state of ``node``'s output given input ``slot`` carries ``state``; "sink" for
    an output projection; raises _Refuse for anything not known to be safe."""
    axis, inner = state
    x = node.inputs[slot]
    r = x.type.rank
    op = node.op
    if op == "linear":
        width = x.shape[-1]
        if slot == 0 and axis == r - 1 and inner == head_dim and width == heads * head_dim \
                and is_linear_with_weight(node):
            return "sink"
        raise _Refuse(node, "a linear reads the head axis other than as an output projection's features")
    if op == "reshape":
        return _map_reshape(node, state, heads, envs)
    if op == "permute":
        return node.attrs["perm"].index(axis), inner
    if op in UNARY:
        return state
    if op in BINARY or op == "expand":
        return axis + node.output.type.rank - r, inner
    if op in ("softmax", "log_softmax"):
        if node.attrs["axis"] % r == axis:
            raise _Refuse(node, "softmax runs across heads")
        return state
    if op.startswith("reduce_"):
        axes = [a % r for a in node.attrs["axes"]]
        if axis in axes:
            raise _Refuse(node, "reduces across heads")
        return (axis if node.attrs["keepdim"] else axis - sum(a < axis for a in axes)), inner
    if op == "slice":
        if node.attrs["axis"] % r == axis:
            raise _Refuse(node, "slices the head axis")
        return state
    if op == "matmul":
        if r < 3 or axis >= r - 2:
            raise _Refuse(node, "a matmul contracts over the head axis")
        return axis + node.output.type.rank - r, inner
    raise _Refuse(node, f"op {op} on the head axis is not supported by head pruning")


def _head_region(graph: Graph, merge: Node, sink: Node, uses, envs) -> HeadGroup:
    heads, head_dim = merge.inputs[0].shape[-2:]
    order = {n: i for i, n in enumerate(graph.nodes)}
    # Sources: the linears met walking back from the merge reshape (the previous layer's
    # linears are never reached: Q/K/V stop the walk).
    sources, stack, seen = [], [merge.inputs[0]], set()
    while stack:
        v = stack.pop()
        if v in seen or v.producer is None:
            continue
        seen.add(v)
        p = v.producer
        if is_linear_with_weight(p):
            if p not in sources:
                sources.append(p)
            continue
        stack += [u for u in p.inputs if u is not None]
    sources = [s for s in sources if isinstance(s.output.shape[-1], int) and s.output.shape[-1] % (heads * head_dim) == 0]
    if not sources:
        raise PassError(f"prune_heads: node {merge.name}: no Q/K/V linear found before the attention")
    states = {s.output: (s.output.type.rank - 1, head_dim) for s in sources}
    work = [s.output for s in sources]
    region, sinks, rescale = [], [], []
    try:
        while work:
            v = work.pop()
            if any(o is v for o in graph.outputs):
                raise _Refuse(v.producer, "a head-carrying value is a graph output")
            for node, slot in uses.get(v, []):
                out = _propagate(node, slot, states[v], heads, head_dim, envs)
                if out == "sink":
                    if node not in sinks:
                        sinks.append(node)
                    continue
                if node not in region:
                    region.append(node)
                if node.op in ("reshape", "expand"):
                    _check_rescalable(node, out[0], heads)
                    if node not in rescale:
                        rescale.append(node)
                prev = states.get(node.output)
                if prev is not None and prev != out:
                    raise _Refuse(node, f"the head axis arrives as {prev} and as {out}")
                if prev is None:
                    states[node.output] = out
                    work.append(node.output)
        # Other operands of head-carrying nodes: broadcast along the head axis, or head-carrying
        # themselves, or a constant fill whose shape can be rescaled.
        for node in list(region):
            rank = node.output.type.rank
            out_axis = states[node.output][0]
            for u in node.inputs:
                if u is None or node.op in ("reshape", "permute", "slice") or node.op in UNARY:
                    continue
                a = out_axis - (rank - u.type.rank)
                if u in states:
                    if states[u] != (a, states[node.output][1]):
                        raise _Refuse(node, f"operand {u.name} carries the head axis at {states[u]}, not {a}")
                    continue
                if a < 0 or u.shape[a] == 1:
                    continue
                if u.producer is not None and u.producer.op == "full" and all(
                        n in region for n, _ in uses.get(u, [])):
                    states[u] = (a, states[node.output][1])
                    _check_rescalable(u.producer, a, heads)
                    region.append(u.producer)
                    rescale.append(u.producer)
                    continue
                raise _Refuse(node, f"operand {u.name} has {u.shape[a]} entries along the head axis and does not "
                                    "come from the attention's projections")
    except _Refuse as e:
        raise PassError(f"prune_heads: cannot prune the heads of the attention before {sink.name}: {e}") from None
    if sinks != [sink]:
        raise PassError(f"prune_heads: node {merge.name}: the heads reach {len(sinks)} output projections "
                        f"({', '.join(n.name for n in sinks)}); exactly one is supported")
    return HeadGroup(sorted(sources, key=order.get), sink, heads, head_dim, states,
                     sorted(region, key=order.get), sorted(rescale, key=order.get))


def _check_rescalable(node: Node, axis: int, heads: int) -> None:
    d = node.attrs["shape"][axis]
    if d == -1:
        return
    q = sym.floordiv(d, heads)
    if not (isinstance(d, int) or sym.equal(sym.mul(q, heads), d)) or (isinstance(d, int) and d % heads):
        raise _Refuse(node, f"its shape entry {d!r} on the head axis is not a constant multiple of the "
                            f"head count {heads}")


def find_attention_heads(graph: Graph) -> list[HeadGroup]:
    """Every attention in graph order. An attention is an output-projection linear whose input
    is a reshape merging ``[.., heads, head_dim]`` into one feature axis, with an
    activation-by-activation matmul before it."""
    uses = graph.uses()
    envs = _probe_envs(graph)
    out = []
    for node in graph.nodes:
        if not is_linear_with_weight(node):
            continue
        merge = node.inputs[0].producer
        if merge is None or merge.op != "reshape" or merge.inputs[0].type.rank < 3:
            continue
        h, hd = merge.inputs[0].shape[-2:]
        if not (isinstance(h, int) and isinstance(hd, int) and h > 1 and node.inputs[0].shape[-1] == h * hd):
            continue
        if not _has_attention_core(merge):
            continue
        out.append(_head_region(graph, merge, node, uses, envs))
    return out


def _has_attention_core(merge: Node) -> bool:
    stack, seen = [merge.inputs[0]], set()
    while stack:
        v = stack.pop()
        if v in seen or v.producer is None:
            continue
        seen.add(v)
        p = v.producer
        if p.op == "matmul" and not any(u.is_weight for u in p.inputs):
            return True
        if not is_linear_with_weight(p):
            stack += [u for u in p.inputs if u is not None]
    return False


# --- residual branches -----------------------------------------------------------------------------
@dataclass
class ResidualBranch:
    add: Node
    skip: Value                    # x in add(x, f(x))
    branch: Value                  # f(x)
    nodes: list[Node]              # the branch's nodes that depend on x
    kind: str                      # "attention" or "mlp"

    @property
    def name(self) -> str:
        return self.add.name


def find_residual_branches(graph: Graph) -> list[ResidualBranch]:
    """Every ``add(x, f(x))`` whose branch f holds a linear and feeds only the add."""
    uses = graph.uses()
    out = []
    for node in graph.nodes:
        if node.op != "add" or any(v is None or v.is_weight for v in node.inputs):
            continue
        for skip, branch in (node.inputs, node.inputs[::-1]):
            if skip.type.same_as(branch.type) and skip.type.same_as(node.output.type):
                nodes = _between(skip, branch)
                if nodes is not None and any(is_linear_with_weight(n) for n in nodes) and \
                        _exclusive(nodes, node, uses, graph):
                    kind = "attention" if any(n.op == "softmax" for n in nodes) else "mlp"
                    out.append(ResidualBranch(node, skip, branch, nodes, kind))
                    break
    return out


def _between(x: Value, y: Value) -> list[Node] | None:
    """Nodes on paths from x to y (None when y does not depend on x)."""
    memo: dict = {}
    order, stack = [], [y]
    while stack:                    # iterative post-order: does each ancestor depend on x?
        v = stack[-1]
        if v in memo or v is x or v.producer is None:
            memo.setdefault(v, v is x)
            stack.pop()
            continue
        pending = [u for u in v.producer.inputs if u is not None and u not in memo]
        if pending:
            stack += pending
            continue
        stack.pop()
        memo[v] = any(memo[u] for u in v.producer.inputs if u is not None)
        if memo[v]:
            order.append(v.producer)
    return order if memo.get(y) else None


def _exclusive(nodes: list[Node], add: Node, uses, graph: Graph) -> bool:
    inside = set(nodes) | {add}
    for n in nodes:
        for o in n.outputs:
            if any(o is v for v in graph.outputs) or any(u not in inside for u, _ in uses.get(o, [])):
                return False
    return True


# --- rewriting -------------------------------------------------------------------------------------
def replace_weight(graph: Graph, value: Value, data: torch.Tensor, user: Node) -> Value:
    """Give ``user`` a new, differently shaped weight in place of ``value`` (same name)."""
    readers = [n for n, _ in graph.uses().get(value, [])]
    if any(n is not user for n in readers):
        raise PassError(f"weight {value.name} is shared by {', '.join(sorted({n.name for n in readers}))}; "
                        "structured pruning needs each pruned layer to own its weight")
    if not isinstance(value.encoding, Dense):
        raise PassError(f"weight {value.name} of {user.name} is already {value.encoding.describe()}: run "
                        "structured pruning before quantisation or sparsity passes")
    name = value.name
    graph.remove_weight(name)
    new = graph.add_weight(name, Dense(data.to(value.encoding.data.dtype)))
    user.inputs = [new if v is value else v for v in user.inputs]
    return new


def reinfer(graph: Graph, nodes) -> None:
    """Recompute the output types of ``nodes`` (in graph order) after their inputs shrank."""
    todo = set(nodes)
    for node in graph.nodes:
        if node in todo:
            types = node.opdef.infer_types([None if v is None else v.type for v in node.inputs], node.attrs,
                                           where=f"node {node.name} ({node.op})")
            for o, t in zip(node.outputs, types):
                o.type = TensorType(t.dtype, t.shape)


def rescale_heads(node: Node, axis: int, heads: int, kept: int) -> None:
    shape = list(node.attrs["shape"])
    d = shape[axis]
    if d != -1:
        shape[axis] = d // heads * kept if isinstance(d, int) else sym.mul(sym.floordiv(d, heads), kept)
    node.attrs = dict(node.attrs, shape=shape)

"""The graph IR: an ordered list of nodes in SSA form over typed values, with named weights.

A :class:`Value` is defined exactly once: as a graph input, as a weight (it then carries a weight
:class:`~nnforge.ir.encodings.Encoding`), or as an output of one :class:`Node`. Nodes are kept in
an order where every value is defined before it is used. Passes edit a graph in place through the
methods here; :func:`nnforge.ir.verifier.verify` checks the result.

    >>> from nnforge.ir import Graph, tensor, Dense
    >>> import torch
    >>> g = Graph("tiny")
    >>> x = g.add_input("x", tensor("f32", "batch", 4))
    >>> w = g.add_weight("fc.weight", Dense(torch.randn(3, 4)))
    >>> y = g.op("linear", x, w, None, name="fc")
    >>> g.set_outputs([g.op("relu", y)])
"""
from __future__ import annotations

import heapq
import re
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from .errors import GraphError
from .ops import get_op
from .printer import format_graph
from .types import TensorType

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# A graph's state (a decoder's KV cache): input X is carried to the next call as output X + STATE_NEXT.
STATE_NEXT = ".next"
MAX_NAME_LEN = 200


def check_name(name: str, what: str) -> str:
    # fullmatch: NAME_RE's $ alone would also accept a name ending in a newline
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or len(name) > MAX_NAME_LEN:
        raise GraphError(f"invalid {what} name {name!r}: names must match {NAME_RE.pattern} "
                         f"and be at most {MAX_NAME_LEN} characters")
    return name


class _Names(set):
    """The names taken in one namespace of a graph. :meth:`fresh` finds the lowest free
    ``base_i`` in amortised constant time (a 100,000-node graph of unnamed ``relu`` nodes builds
    in linear time): ``_next[base]`` is a suffix below which every ``base_j`` is taken, lowered
    again when such a name is given back."""

    def __init__(self, names=()):
        super().__init__(names)
        self._next: dict[str, int] = {}

    def discard(self, name) -> None:
        super().discard(name)
        base, sep, num = name.rpartition("_") if isinstance(name, str) else ("", "", "")
        if sep and num.isascii() and num.isdigit() and int(num) < self._next.get(base, 0):
            self._next[base] = int(num)

    def fresh(self, base: str) -> str:
        if base not in self:
            return base
        i = self._next.get(base, 1)
        while f"{base}_{i}" in self:
            i += 1
        self._next[base] = i
        return f"{base}_{i}"


def sanitize_name(raw: str) -> str:
    """Map any text to a valid IR name (frontends keep the original in ``meta``)."""
    name = re.sub(r"[^A-Za-z0-9_.]", "_", str(raw)).strip(".") or "v"
    if not (name[0].isalpha() or name[0] == "_"):
        name = "v_" + name
    return name[:MAX_NAME_LEN]


class Value:
    """A typed SSA value. ``producer`` is the defining node (None for inputs and weights);
    ``encoding`` is set exactly for weights."""

    __slots__ = ("name", "type", "producer", "encoding")

    def __init__(self, name: str, type: TensorType, producer: "Node | None" = None, encoding=None):
        self.name = name
        self.type = type
        self.producer = producer
        self.encoding = encoding

    @property
    def kind(self) -> str:
        if self.encoding is not None:
            return "weight"
        return "input" if self.producer is None else "node"

    @property
    def is_weight(self) -> bool:
        return self.encoding is not None

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self):
        return self.type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One operation: ``op`` names an entry of the op registry; ``inputs`` may hold None for an
    absent optional input; ``attrs`` are validated against the op's schema; ``meta`` carries
    provenance (source location, module path) and is never read by the semantics."""

    __slots__ = ("op", "inputs", "outputs", "attrs", "name", "meta")

    def __init__(self, op: str, inputs: list, outputs: list[Value], attrs: dict, name: str, meta: dict):
        self.op, self.inputs, self.outputs, self.attrs, self.name, self.meta = op, inputs, outputs, attrs, name, meta

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise GraphError(f"node {self.name} ({self.op}) has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    @property
    def opdef(self):
        return get_op(self.op)

    def input(self, slot: str):
        """The input bound to the schema slot named ``slot`` (e.g. ``node.input("weight")``)."""
        return self.inputs[self.opdef.slot_index(slot, len(self.inputs))]

    def __repr__(self) -> str:
        return f"<Node {self.name}: {self.op}>"


class Graph:
    def __init__(self, name: str = "graph"):
        self.name = sanitize_name(name)
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.weights: dict[str, Value] = {}
        self.meta: dict[str, Any] = {}
        self._value_names = _Names()
        self._node_names = _Names()
        self._insert_at: int | None = None

    # --- building ------------------------------------------------------------------------------
    def fresh_name(self, base: str, *, node: bool = False) -> str:
        """A valid name starting with ``base`` that is not used yet."""
        return (self._node_names if node else self._value_names).fresh(sanitize_name(base))

    def _claim(self, name: str, what: str) -> str:
        check_name(name, what)
        if name in self._value_names:
            raise GraphError(f"{what} name {name!r} is already used in graph {self.name}")
        self._value_names.add(name)
        return name

    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self._claim(name, "input"), type)
        self.inputs.append(v)
        return v

    def add_weight(self, name: str, encoding) -> Value:
        v = Value(self._claim(name, "weight"), TensorType(encoding.dtype, tuple(encoding.shape)), encoding=encoding)
        self.weights[name] = v
        return v

    def add_node(self, op: str, inputs: Iterable, attrs: dict | None = None, *, name: str | None = None,
                 output_names: list[str] | None = None, meta: dict | None = None) -> Node:
        """Append (or insert, inside :meth:`inserting_before`) a node; output types are inferred."""
        opdef = get_op(op)
        inputs = list(inputs)
        for i, v in enumerate(inputs):
            if v is not None and not isinstance(v, Value):
                raise GraphError(f"input {i} of new {op} node is {type(v).__name__}, not a Value")
        node_name = check_name(name, "node") if name else self.fresh_name(op, node=True)
        if node_name in self._node_names:
            raise GraphError(f"node name {node_name!r} is already used in graph {self.name}")
        attrs = opdef.check_attrs(attrs or {}, where=f"node {node_name} ({op})")
        types = opdef.infer_types([None if v is None else v.type for v in inputs], attrs,
                                  where=f"node {node_name} ({op})")
        if output_names is None:
            output_names = [self.fresh_name(node_name)] if len(types) == 1 else [
                self.fresh_name(f"{node_name}.{i}") for i in range(len(types))]
        if len(output_names) != len(types):
            raise GraphError(f"node {node_name} ({op}) produces {len(types)} outputs, "
                             f"{len(output_names)} names were given")
        node = Node(op, inputs, [], attrs, node_name, dict(meta or {}))
        node.outputs = [Value(self._claim(n, "value"), t, node) for n, t in zip(output_names, types)]
        self._node_names.add(node_name)
        if self._insert_at is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self._insert_at, node)
            self._insert_at += 1
        return node

    def op(self, op: str, *inputs, name: str | None = None, meta: dict | None = None, **attrs) -> Value:
        """Add a single-output node and return its value: ``g.op("add", a, b)``."""
        return self.add_node(op, inputs, attrs, name=name, meta=meta).output

    @contextmanager
    def inserting_before(self, node: Node) -> Iterator[None]:
        """New nodes go right before ``node`` instead of at the end (like fx's inserting_before)."""
        prev = self._insert_at
        self._insert_at = self.nodes.index(node)
        try:
            yield
        finally:
            self._insert_at = prev

    def set_outputs(self, values: list[Value]) -> None:
        self.outputs = list(values)

    # --- queries -------------------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.weights.values()
        for n in self.nodes:
            yield from n.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(f"graph {self.name} has no value named {name!r}")

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"graph {self.name} has no node named {name!r}")

    def uses(self) -> dict[Value, list[tuple[Node, int]]]:
        """Map each used value to the (node, input index) pairs that read it."""
        out: dict[Value, list[tuple[Node, int]]] = {}
        for n in self.nodes:
            for i, v in enumerate(n.inputs):
                if v is not None:
                    out.setdefault(v, []).append((n, i))
        return out

    def symbols(self) -> dict[str, tuple[Value, int]]:
        """Each dimension symbol, with the graph input and axis it is read from at run time."""
        out: dict[str, tuple[Value, int]] = {}
        for v in self.inputs:
            for axis, d in enumerate(v.shape):
                if isinstance(d, str) and d not in out:
                    out[d] = (v, axis)
        return out

    def state_pairs(self) -> list[tuple[str, str]]:
        """(input, output) names of the graph's state, in input order: each input ``X`` that has an
        output ``X.next``, which the runner feeds back as ``X`` on the next call."""
        outputs = {v.name for v in self.outputs}
        return [(v.name, v.name + STATE_NEXT) for v in self.inputs if v.name + STATE_NEXT in outputs]

    def signature(self) -> dict:
        """Names and types of inputs and outputs: what every pass must keep."""
        return {"inputs": [(v.name, str(v.type)) for v in self.inputs],
                "outputs": [(v.name, str(v.type)) for v in self.outputs]}

    # --- editing -------------------------------------------------------------------------------
    def replace_uses(self, old: Value, new: Value) -> int:
        """Make every reader of ``old`` (nodes and graph outputs) read ``new``; returns the count."""
        count = 0
        for n in self.nodes:
            for i, v in enumerate(n.inputs):
                if v is old:
                    n.inputs[i] = new
                    count += 1
        for i, v in enumerate(self.outputs):
            if v is old:
                self.outputs[i] = new
                count += 1
        return count

    def remove_node(self, node: Node) -> None:
        used = self.uses()
        readers = [f"{n.name}" for o in node.outputs for n, _ in used.get(o, [])]
        readers += [f"graph output {o.name}" for o in node.outputs if any(o is v for v in self.outputs)]
        if readers:
            raise GraphError(f"cannot remove node {node.name}: its outputs are read by {', '.join(readers)}")
        self.nodes.remove(node)
        self._node_names.discard(node.name)
        for o in node.outputs:
            self._value_names.discard(o.name)

    def remove_input(self, value: Value) -> None:
        """Drop graph input ``value``, which no node or graph output may read any more."""
        readers = [n.name for n in self.nodes if any(v is value for v in n.inputs)]
        readers += ["a graph output"] if any(v is value for v in self.outputs) else []
        if readers:
            raise GraphError(f"cannot remove input {value.name}: it is read by {', '.join(readers)}")
        self.inputs = [v for v in self.inputs if v is not value]
        self._value_names.discard(value.name)

    def remove_nodes(self, nodes) -> None:
        """Drop ``nodes`` (no use check: for passes that already know they are dead)."""
        dead = set(nodes)
        self.nodes = [n for n in self.nodes if n not in dead]
        for n in dead:
            self._node_names.discard(n.name)
            for o in n.outputs:
                self._value_names.discard(o.name)

    def rename(self, value: Value, name: str) -> None:
        """Give ``value`` a new name (which must be valid and unused)."""
        if name == value.name:
            return
        self._claim(name, "value")
        self._value_names.discard(value.name)
        if value.is_weight:
            self.weights = {(name if k == value.name else k): v for k, v in self.weights.items()}
        value.name = name

    def name_outputs(self, names: list[str]) -> None:
        """Give computed graph outputs user-facing names. A wanted name held by an intermediate
        value is taken from it (the intermediate gets a fresh one); a name held by an input, a
        weight or an output already named makes the output take a fresh variant instead.
        Outputs that are inputs or weights, or appear twice, keep their names."""
        if len(names) != len(self.outputs):
            raise GraphError(f"graph {self.name} has {len(self.outputs)} outputs but {len(names)} output names "
                             "were given")
        by_name = {v.name: v for v in self.values()}
        fixed = {v for v in self.outputs if v.producer is None or self.outputs.count(v) > 1}
        for v, want in zip(self.outputs, names):
            want = sanitize_name(want)
            if v in fixed or v.name == want:
                fixed.add(v)
                continue
            holder = by_name.get(want)
            if holder is not None and (holder in fixed or holder.producer is None):
                want = self.fresh_name(want)
            elif holder is not None:
                moved = self.fresh_name(want)
                self.rename(holder, moved)
                by_name[moved] = holder
            by_name.pop(v.name, None)
            self.rename(v, want)
            by_name[want] = v
            fixed.add(v)

    def remove_weight(self, name: str) -> None:
        self.weights.pop(name)
        self._value_names.discard(name)

    def set_encoding(self, name: str, encoding) -> None:
        """Replace how weight ``name`` is stored; its logical shape must not change."""
        v = self.weights[name]
        if tuple(encoding.shape) != tuple(v.shape):
            raise GraphError(f"weight {name}: new encoding has shape {tuple(encoding.shape)}, "
                             f"the weight has {tuple(v.shape)}; use a graph rewrite to change shapes")
        v.encoding = encoding
        v.type = TensorType(encoding.dtype, v.type.shape)

    def remove_unused_weights(self) -> list[str]:
        used = {v for v in self.uses()} | set(self.outputs)
        dead = [n for n, v in self.weights.items() if v not in used]
        for n in dead:
            self.remove_weight(n)
        return dead

    def toposort(self) -> None:
        """Reorder nodes so that each value is defined before use (stable; raises on a cycle)."""
        self.nodes = self.topological_order()

    def topological_order(self) -> list[Node]:
        """The nodes in an order where each value is defined before it is read, ties kept in the
        current order (Kahn's algorithm, iterative). A cycle raises a GraphError that names the
        nodes on one cycle and the order data flows round it:

            graph mlp has a cycle through nodes: act, fc1, fc2 (data flows fc1 -> act -> fc2 -> fc1)
        """
        nodes = self.nodes
        index = {n: i for i, n in enumerate(nodes)}
        if len(index) != len(nodes):
            twice = next(n for i, n in enumerate(nodes) if index[n] != i)
            raise GraphError(f"graph {self.name}: node {twice.name} appears twice in the node list")
        producer = {o: n for n in nodes for o in n.outputs}
        indeg = [0] * len(nodes)
        readers: list[list[int]] = [[] for _ in nodes]
        for i, n in enumerate(nodes):
            for v in {id(v): v for v in n.inputs if v is not None}.values():
                p = producer.get(v)
                if p is not None:
                    indeg[i] += 1
                    readers[index[p]].append(i)
        ready = [i for i, d in enumerate(indeg) if d == 0]
        heapq.heapify(ready)
        out = []
        while ready:
            i = heapq.heappop(ready)
            out.append(nodes[i])
            for r in readers[i]:
                indeg[r] -= 1
                if indeg[r] == 0:
                    heapq.heappush(ready, r)
        if len(out) == len(nodes):
            return out
        # Every node left waits on a value of another node left: walking those reads back from one
        # of them must come round to a node already seen, which closes a cycle.
        stuck = [n for i, n in enumerate(nodes) if indeg[i] > 0]
        seen: dict[Node, int] = {}
        path: list[Node] = []
        n = stuck[0]
        while n not in seen:
            seen[n] = len(path)
            path.append(n)
            n = next(producer[v] for v in n.inputs
                     if v is not None and v in producer and indeg[index[producer[v]]] > 0)
        cycle = path[seen[n]:][::-1]                      # in the direction data flows,
        first = min(range(len(cycle)), key=lambda k: index[cycle[k]])
        cycle = cycle[first:] + cycle[:first]             # from its first node in graph order
        names = sorted(m.name for m in cycle)
        flow = [m.name for m in cycle] + [cycle[0].name]
        if len(flow) > 12:
            flow = flow[:5] + [f"... ({len(cycle)} nodes) ..."] + flow[-5:]
        rest = len(stuck) - len(cycle)
        raise GraphError(f"graph {self.name} has a cycle through nodes: {', '.join(names[:10])}"
                         f"{', ...' if len(names) > 10 else ''} (data flows {' -> '.join(flow)})"
                         + (f"; {rest} more node(s) wait on the cycle" if rest else ""))

    def copy(self) -> "Graph":
        """A structural copy: new Values and Nodes; weight encodings (immutable) are shared."""
        g = Graph(self.name)
        g.meta = dict(self.meta)
        vmap: dict[Value, Value] = {}
        for v in self.inputs:
            vmap[v] = g.add_input(v.name, v.type)
        for name, v in self.weights.items():
            vmap[v] = g.add_weight(name, v.encoding)
            vmap[v].type = v.type
        # Outputs first, then inputs: a graph whose node order is not (yet) topological copies too,
        # in the order it has (the verifier copies such graphs to report their order).
        copies = []
        for n in self.nodes:
            new = Node(n.op, [], [], dict(n.attrs), n.name, dict(n.meta))
            new.outputs = [Value(o.name, o.type, new) for o in n.outputs]
            for o, no in zip(n.outputs, new.outputs):
                vmap[o] = no
                g._value_names.add(o.name)
            g._node_names.add(n.name)
            copies.append((n, new))
        for n, new in copies:
            missing = [v for v in n.inputs if v is not None and v not in vmap]
            if missing:
                raise GraphError(f"graph {self.name}: node {n.name} reads {missing[0].name}, which is not in the graph")
            new.inputs = [None if v is None else vmap[v] for v in n.inputs]
            g.nodes.append(new)
        g.outputs = [vmap[v] for v in self.outputs]
        return g

    # --- views ---------------------------------------------------------------------------------
    def to_networkx(self):
        """A networkx DiGraph for analysis: one vertex per node, input and weight; edges carry the
        value name. Vertex attribute ``kind`` is "node", "input" or "weight"."""
        import networkx as nx
        G = nx.DiGraph(name=self.name)
        for v in self.inputs:
            G.add_node(f"input:{v.name}", kind="input", type=str(v.type))
        for v in self.weights.values():
            G.add_node(f"weight:{v.name}", kind="weight", type=str(v.type))
        src = {v: f"input:{v.name}" for v in self.inputs}
        src.update({v: f"weight:{v.name}" for v in self.weights.values()})
        for n in self.nodes:
            G.add_node(n.name, kind="node", op=n.op)
            for o in n.outputs:
                src[o] = n.name
        for n in self.nodes:
            for v in n.inputs:
                if v is not None and v in src:
                    G.add_edge(src[v], n.name, value=v.name)
        return G

    def __str__(self) -> str:
        return format_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self.inputs)} inputs, {len(self.nodes)} nodes, {len(self.weights)} weights>"

"""Lossless serialisation: the graph structure as JSON, weight tensors as safetensors.

Reading never executes anything from the files: JSON is parsed, tensors are read by safetensors,
every op, attribute, encoding and name is checked against the registries, output types are
re-inferred and compared with the recorded ones, and the result is verified. Sizes are checked
before anything is built: the file sizes, the JSON nesting depth (scanned before the recursive
``json`` parser sees the text), and the counts and ranks the verifier caps
(:data:`nnforge.ir.verifier.MAX_NODES` and friends).

    >>> save_graph(g, "graph.json", "weights.safetensors")
    >>> g2 = load_graph("graph.json", "weights.safetensors")
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from .dtypes import DType, dtype as _dtype
from .encodings import EncodingError, encoding_from_parts
from .graph import Graph, GraphError, Node, Value
from .types import TensorType
from .verifier import MAX_GRAPH_IO, MAX_NODE_IO, MAX_NODES, MAX_RANK, MAX_WEIGHT_BYTES, MAX_WEIGHTS, verify

FORMAT = "nnforge.graph"
VERSION = 1
SEP = "::"      # separates weight name and field in safetensors keys (names cannot contain ':')

MAX_JSON_BYTES = 1 << 30        # graph.json size (far above what a 100,000-node chain takes)
MAX_JSON_DEPTH = 64             # nesting of [ and { in graph.json (the format itself uses under 12)
MAX_WEIGHTS_FILE_BYTES = MAX_WEIGHT_BYTES + (100 << 20)     # the weights plus a safetensors header


class SerializationError(GraphError):
    """A serialised graph is unreadable or inconsistent; the message names the file and entry."""


def _type_json(t: TensorType) -> dict:
    return {"dtype": t.dtype.name, "shape": list(t.shape)}


def _attr_json(v):
    if isinstance(v, DType):
        return v.name
    return v


def graph_to_dict(g: Graph) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON document and the tensors (by safetensors key) that describe ``g``."""
    _check_depth(g.meta, f"graph {g.name}: meta")
    for n in g.nodes:
        _check_depth(n.meta, f"node {n.name}: meta")
    tensors: dict[str, torch.Tensor] = {}
    weights = []
    for name, v in g.weights.items():
        keys = {}
        for field, t in v.encoding.tensors().items():
            key = f"{name}{SEP}{field}"
            tensors[key] = t.contiguous()
            keys[field] = key
        weights.append({"name": name, "encoding": v.encoding.kind, "params": v.encoding.params(), "tensors": keys})
    nodes = [{"name": n.name, "op": n.op, "inputs": [None if v is None else v.name for v in n.inputs],
              "outputs": [{"name": o.name, **_type_json(o.type)} for o in n.outputs],
              "attrs": {k: _attr_json(a) for k, a in n.attrs.items()}, "meta": n.meta} for n in g.nodes]
    doc = {"format": FORMAT, "version": VERSION, "name": g.name, "meta": g.meta,
           "inputs": [{"name": v.name, **_type_json(v.type)} for v in g.inputs],
           "weights": weights, "nodes": nodes, "outputs": [v.name for v in g.outputs]}
    return doc, tensors


def save_graph(g: Graph, json_path, weights_path) -> None:
    from safetensors.torch import save_file
    doc, tensors = graph_to_dict(g)
    Path(json_path).write_text(json.dumps(doc, indent=1))
    save_file(tensors, os.fspath(weights_path), metadata={"format": "pt", "producer": "nnforge"})


# --- reading ------------------------------------------------------------------------------------
_ESCAPE = re.compile(r"\\.", re.S)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` in JSON ``text``, brackets inside strings not
    counted. Linear time, no recursion: escapes are dropped first, so a string is a plain
    ``"..."`` run and an unclosed one cannot make the scan quadratic."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("", text)))
    depth = peak = 0
    for start in range(0, len(brackets), 1 << 20):
        chunk = np.frombuffer(brackets[start:start + (1 << 20)].encode("ascii"), dtype=np.uint8)
        run = depth + np.cumsum(np.where((chunk == 91) | (chunk == 123), 1, -1))
        peak, depth = max(peak, int(run.max())), int(run[-1])
    return peak


def _check_depth(obj, where: str) -> None:
    """Refuse lists and dicts nested deeper than MAX_JSON_DEPTH (walked with a stack)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if depth > MAX_JSON_DEPTH:
                raise SerializationError(f"{where} is nested deeper than the cap of {MAX_JSON_DEPTH} levels")
            stack.extend((x, depth + 1) for x in (item.values() if isinstance(item, dict) else item))


def _entries(doc: dict, key: str, cap: int, source: str, kind=dict) -> list:
    items = doc[key]
    if not isinstance(items, list) or not all(isinstance(e, kind) for e in items):
        raise SerializationError(f"{source}: field {key!r} must be a list of "
                                 f"{'objects' if kind is dict else 'names'}")
    if len(items) > cap:
        raise SerializationError(f"{source}: {len(items):,} {key}, above the cap of {cap:,}")
    return items


def _meta(entry: dict, where: str) -> dict:
    meta = entry.get("meta")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise SerializationError(f"{where}: meta must be an object, got {type(meta).__name__}")
    _check_depth(meta, f"{where}: meta")
    return meta


def _parse_type(entry: dict, where: str) -> TensorType:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if isinstance(shape, list) and len(shape) > MAX_RANK:
        raise SerializationError(f"{where}: rank {len(shape)}, above the cap of {MAX_RANK}")
    try:
        return TensorType(_dtype(entry["dtype"]), tuple(entry["shape"]))
    except (KeyError, TypeError, ValueError) as e:
        raise SerializationError(f"{where}: bad type {entry!r}: {e}") from None


def _forward_ref(nodes: list, at: int, name, where: str, graph: str) -> str:
    """Why node ``at`` reads ``name`` before it is defined: no node defines it, a later node does
    (nodes out of order), or the nodes read each other round a cycle (named by Graph's check)."""
    later = next((e.get("name") for e in nodes[at:] for o in e["outputs"]
                  if isinstance(o, dict) and o.get("name") == name), None)
    prefix = f"{where}: input {name!r} is not defined before it"
    if later is None:
        return f"{prefix}: no input, weight or node of the graph defines it"
    skeleton, values, reads = Graph(graph), {}, []
    try:                                    # nodes and values without types: enough to order them
        for e in nodes:
            n = Node(str(e.get("op")), [], [], {}, str(e.get("name")), {})
            n.outputs = [values.setdefault(o["name"], Value(o["name"], None, n)) for o in e["outputs"]]
            skeleton.nodes.append(n)
            reads.append(e["inputs"])
        for n, ins in zip(skeleton.nodes, reads):
            n.inputs = [values.get(i) if isinstance(i, str) else None for i in ins]
        skeleton.topological_order()
    except GraphError as err:
        return f"{prefix} but by node {later}, which depends on it: {err}"
    except (KeyError, TypeError, AttributeError):
        pass
    return f"{prefix} but by node {later} further down: graph.json must list nodes in topological order"


def graph_from_dict(doc: dict, tensors: dict[str, torch.Tensor], *, source: str = "graph") -> Graph:
    """Rebuild and verify a graph from its JSON document and its tensors; every error is a
    SerializationError whose message starts with ``source`` (the file) and names the entry."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SerializationError(f"{source}: not an nnforge graph (format field is {doc.get('format')!r})"
                                 if isinstance(doc, dict) else f"{source}: not an nnforge graph")
    if doc.get("version") != VERSION:
        raise SerializationError(f"{source}: graph format version {doc.get('version')!r}, this nnforge reads {VERSION}")
    try:
        inputs = _entries(doc, "inputs", MAX_GRAPH_IO, source)
        weights = _entries(doc, "weights", MAX_WEIGHTS, source)
        nodes = _entries(doc, "nodes", MAX_NODES, source)
        outputs = _entries(doc, "outputs", MAX_GRAPH_IO, source, kind=str)
        g = Graph(doc["name"])
        g.meta = dict(_meta(doc, f"{source}: graph"))
        values = {}
        for e in inputs:
            values[e["name"]] = g.add_input(e["name"], _parse_type(e, f"{source}: input {e.get('name')}"))
        used_keys = set()
        for e in weights:
            where = f"{source}: weight {e.get('name')}"
            parts = {}
            for field, key in e["tensors"].items():
                if key not in tensors:
                    raise SerializationError(f"{where}: tensor {key!r} is missing from the weights file")
                parts[field] = tensors[key]
                used_keys.add(key)
            _check_depth(e["params"], f"{where}: params")
            try:
                enc = encoding_from_parts(e["encoding"], e["params"], parts)
            except (EncodingError, KeyError, TypeError) as err:
                raise SerializationError(f"{where}: {err}") from None
            values[e["name"]] = g.add_weight(e["name"], enc)
        extra = sorted(set(tensors) - used_keys)
        if extra:
            raise SerializationError(f"{source}: weights file has tensors no weight refers to: {', '.join(extra[:5])}")
        for at, e in enumerate(nodes):
            node_where = f"node {e.get('name')} ({e.get('op')})"
            where = f"{source}: {node_where}"
            if not isinstance(e["inputs"], list) or not isinstance(e["outputs"], list) \
                    or not all(isinstance(o, dict) for o in e["outputs"]):
                raise SerializationError(f"{where}: inputs must be a list of names, outputs a list of objects")
            if len(e["inputs"]) + len(e["outputs"]) > MAX_NODE_IO:
                raise SerializationError(f"{where}: {len(e['inputs']):,} inputs and {len(e['outputs']):,} outputs, "
                                         f"above the cap of {MAX_NODE_IO:,} in all")
            ins = []
            for name in e["inputs"]:
                if name is not None and name not in values:
                    raise SerializationError(_forward_ref(nodes, at, name, where, g.name))
                ins.append(None if name is None else values[name])
            try:
                node = g.add_node(e["op"], ins, e["attrs"], name=e["name"],
                                  output_names=[o["name"] for o in e["outputs"]], meta=_meta(e, where))
            except GraphError as err:          # the message may name the node already
                raise SerializationError(f"{where}: {str(err).removeprefix(node_where + ': ')}") from None
            for o, rec in zip(node.outputs, e["outputs"]):
                if rec.get("dtype") == o.type.dtype.name and rec.get("shape") == list(o.type.shape):
                    values[o.name] = o          # recorded exactly as save_graph writes it
                    continue
                recorded = _parse_type(rec, where)
                if not o.type.same_as(recorded):
                    raise SerializationError(f"{where}: recorded output type {rec} disagrees with "
                                             f"the inferred {o.type}")
                values[o.name] = o
        for name in outputs:
            if name not in values:
                raise SerializationError(f"{source}: graph output {name!r} is not defined")
        g.set_outputs([values[n] for n in outputs])
    except (KeyError, TypeError, AttributeError) as e:
        raise SerializationError(f"{source}: missing or malformed field {e}") from None
    except SerializationError:
        raise
    except GraphError as e:
        raise SerializationError(f"{source}: {e}") from None
    try:
        return verify(g)
    except GraphError as e:
        raise SerializationError(f"{source}: {e}") from None


def _check_size(path, cap: int, what: str) -> None:
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise SerializationError(f"{path}: cannot read {what}: {e}") from None
    if size > cap:
        raise SerializationError(f"{path}: {what} file is {size:,} bytes, above the cap of {cap:,}")


def load_graph(json_path, weights_path) -> Graph:
    """Read a graph saved by :func:`save_graph`; every error names the file at fault."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    _check_size(json_path, MAX_JSON_BYTES, "graph JSON")
    try:
        text = Path(json_path).read_text()
    except (OSError, ValueError) as e:
        raise SerializationError(f"{json_path}: cannot read graph JSON: {e}") from None
    depth = json_depth(text)                # before json.loads, which recurses once per level
    if depth > MAX_JSON_DEPTH:
        raise SerializationError(f"{json_path}: graph JSON is nested {depth:,} levels deep, above the cap of "
                                 f"{MAX_JSON_DEPTH}")
    try:
        doc = json.loads(text)
    except RecursionError:
        raise SerializationError(f"{json_path}: graph JSON is nested deeper than the cap of {MAX_JSON_DEPTH}") from None
    except ValueError as e:
        raise SerializationError(f"{json_path}: cannot read graph JSON: {e}") from None
    _check_size(weights_path, MAX_WEIGHTS_FILE_BYTES, "weights")
    try:
        tensors = load_file(os.fspath(weights_path))
    except (OSError, SafetensorError, ValueError) as e:
        raise SerializationError(f"{weights_path}: cannot read weights: {e}") from None
    return graph_from_dict(doc, tensors, source=str(json_path))

"""Lossless serialisation: the graph structure as JSON, weight tensors as safetensors.

Reading never executes anything from the files: JSON is parsed, tensors are read by safetensors,
every op, attribute, encoding and name is checked against the registries, output types are
re-inferred and compared with the recorded ones, and the result is verified.

    >>> save_graph(g, "graph.json", "weights.safetensors")
    >>> g2 = load_graph("graph.json", "weights.safetensors")
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .dtypes import DType, dtype as _dtype
from .encodings import EncodingError, encoding_from_parts
from .graph import Graph, GraphError
from .ops import get_op
from .types import TensorType
from .verifier import verify

FORMAT = "nnforge.graph"
VERSION = 1
SEP = "::"      # separates weight name and field in safetensors keys (names cannot contain ':')


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


def _parse_type(entry: dict, where: str) -> TensorType:
    try:
        return TensorType(_dtype(entry["dtype"]), tuple(entry["shape"]))
    except (KeyError, TypeError, ValueError) as e:
        raise SerializationError(f"{where}: bad type {entry!r}: {e}") from None


def graph_from_dict(doc: dict, tensors: dict[str, torch.Tensor], *, source: str = "graph") -> Graph:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SerializationError(f"{source}: not an nnforge graph (format field is {doc.get('format')!r})"
                                 if isinstance(doc, dict) else f"{source}: not an nnforge graph")
    if doc.get("version") != VERSION:
        raise SerializationError(f"{source}: graph format version {doc.get('version')!r}, this nnforge reads {VERSION}")
    try:
        g = Graph(doc["name"])
        g.meta = dict(doc.get("meta") or {})
        values = {}
        for e in doc["inputs"]:
            values[e["name"]] = g.add_input(e["name"], _parse_type(e, f"{source}: input {e.get('name')}"))
        used_keys = set()
        for e in doc["weights"]:
            where = f"{source}: weight {e.get('name')}"
            parts = {}
            for field, key in e["tensors"].items():
                if key not in tensors:
                    raise SerializationError(f"{where}: tensor {key!r} is missing from the weights file")
                parts[field] = tensors[key]
                used_keys.add(key)
            try:
                enc = encoding_from_parts(e["encoding"], e["params"], parts)
            except (EncodingError, KeyError, TypeError) as err:
                raise SerializationError(f"{where}: {err}") from None
            values[e["name"]] = g.add_weight(e["name"], enc)
        extra = sorted(set(tensors) - used_keys)
        if extra:
            raise SerializationError(f"{source}: weights file has tensors no weight refers to: {', '.join(extra[:5])}")
        for e in doc["nodes"]:
            where = f"{source}: node {e.get('name')}"
            ins = []
            for name in e["inputs"]:
                if name is not None and name not in values:
                    raise SerializationError(f"{where} ({e.get('op')}): input {name!r} is not defined before it")
                ins.append(None if name is None else values[name])
            try:
                node = g.add_node(e["op"], ins, e["attrs"], name=e["name"],
                                  output_names=[o["name"] for o in e["outputs"]], meta=e.get("meta") or {})
            except GraphError as err:
                raise SerializationError(f"{where} ({e.get('op')}): {err}") from None
            for o, rec in zip(node.outputs, e["outputs"]):
                if not o.type.same_as(_parse_type(rec, where)):
                    raise SerializationError(f"{where} ({node.op}): recorded output type {rec} disagrees with "
                                             f"the inferred {o.type}")
                values[o.name] = o
        for name in doc["outputs"]:
            if name not in values:
                raise SerializationError(f"{source}: graph output {name!r} is not defined")
        g.set_outputs([values[n] for n in doc["outputs"]])
    except (KeyError, TypeError) as e:
        raise SerializationError(f"{source}: missing or malformed field {e}") from None
    return verify(g)


def load_graph(json_path, weights_path) -> Graph:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        doc = json.loads(Path(json_path).read_text())
    except (OSError, ValueError) as e:
        raise SerializationError(f"{json_path}: cannot read graph JSON: {e}") from None
    try:
        tensors = load_file(os.fspath(weights_path))
    except (OSError, SafetensorError, ValueError) as e:
        raise SerializationError(f"{weights_path}: cannot read weights: {e}") from None
    return graph_from_dict(doc, tensors, source=str(json_path))

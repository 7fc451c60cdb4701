"""The figures a bundle's manifest records about its compression: bytes and bits per weight for
the whole model and for the compressed layers apart, each weight layer's encoding, its weight's
SQNR against fp32 and its output's agreement with the fp32 model on held-out inputs.
``graph_compression`` needs the compressed graph alone, so ``nf.verify`` recomputes it
(:mod:`nnforge.claims`).

    >>> fp32_outs, outs, per_layer = layer_fidelity(original, compressed, inputs)
    >>> compression_report(original, compressed, per_layer)["compressed_bits_per_weight"]
"""
from __future__ import annotations

import math

import torch

from .ir import Graph, Interpreter, WEIGHT_OPS
from .ir.encodings import Dense
from .numerics import compare


def compression_report(original: Graph, compressed: Graph, layer_outputs: dict | None = None) -> dict:
    """:func:`graph_compression` of ``compressed`` with the bytes before, and per weight layer the
    weight's SQNR against its fp32 original (where the layer kept its shape) and, from
    ``layer_outputs`` (:func:`layer_fidelity`), its output's agreement with the fp32 model on
    held-out inputs."""
    report = graph_compression(compressed)
    for row in report["layers"]:
        before = original.weights.get(row["weight"])
        if row["compressed"] and before is not None and list(before.shape) == row["shape"]:
            row["weight_sqnr_db"] = _round_db(_weight_sqnr(before.encoding, compressed.weights[row["weight"]].encoding))
        if layer_outputs and row["layer"] in layer_outputs:
            row.update(layer_outputs[row["layer"]])
    before = sum(v.encoding.nbytes for v in original.weights.values())
    return {"bytes_before": before, "ratio": round(before / max(report["bytes_after"], 1), 4), **report}


def graph_compression(graph: Graph) -> dict:
    """What a compressed graph alone says about its compression: bytes, bits per weight for the
    whole model and for its compressed layers apart, and each weight layer's encoding (``nf.verify``
    recomputes this from a bundle's graph and compares it with the manifest)."""
    layers = []
    for n in graph.nodes:
        if n.op not in WEIGHT_OPS or len(n.inputs) < 2 or n.inputs[1] is None or not n.inputs[1].is_weight:
            continue
        w = n.inputs[1]
        enc = w.encoding
        layers.append({"layer": n.name, "op": n.op, "weight": w.name, "shape": list(w.shape),
                       "encoding": enc.describe(), "bits_per_weight": round(enc.bits_per_weight, 4),
                       "bytes": enc.nbytes, "compressed": not isinstance(enc, Dense)})
    stored = [v for v in graph.weights.values() if v.dtype.is_float or not isinstance(v.encoding, Dense)]
    params = sum(_numel(v.shape) for v in stored)
    layer_params = sum(_numel(layer["shape"]) for layer in layers)
    packed = [layer for layer in layers if layer["compressed"]]
    packed_params = sum(_numel(layer["shape"]) for layer in packed)
    return {"bytes_after": sum(v.encoding.nbytes for v in graph.weights.values()),
            "model_bits_per_weight": round(8 * sum(v.encoding.nbytes for v in stored) / max(params, 1), 4),
            "layer_bits_per_weight": round(8 * sum(layer["bytes"] for layer in layers) / max(layer_params, 1), 4),
            "compressed_layers": len(packed), "weight_layers": len(layers),
            "compressed_bits_per_weight": round(8 * sum(layer["bytes"] for layer in packed) / packed_params, 4)
            if packed_params else None,
            "layers": layers}


def _numel(shape) -> int:
    return int(torch.Size([int(d) for d in shape]).numel())


def _round_db(x: float):
    return "inf" if math.isinf(x) else round(x, 2)


def _weight_sqnr(before, after) -> float:
    w = before.decode(torch.float64) if before.dtype.is_float else before.decode()
    d = after.decode(torch.float64).reshape(w.shape)
    noise = float(((d - w.double()) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(float((w.double() ** 2).sum()), 1e-300) / noise)


def layer_fidelity(original: Graph, compressed: Graph, inputs: tuple,
                   compressed_inputs: tuple | None = None) -> tuple[list, list, dict]:
    """(fp32 outputs, compressed outputs, per weight layer of the compressed graph: its output's
    SQNR and cosine against the same layer of the fp32 graph) on one batch (``compressed_inputs``:
    the same batch as the compressed graph takes it, when its inputs differ: an encoded KV cache's
    state). Layers that a pass renamed or reshaped (low-rank pairs, pruned channels) have no
    counterpart and are left out."""
    kept: dict[str, torch.Tensor] = {}
    wanted = {n.name for n in compressed.nodes if n.op in WEIGHT_OPS}

    def keep(node, outs):
        if node.name in wanted and outs and isinstance(outs[0], torch.Tensor) and outs[0].is_floating_point():
            kept[node.name] = outs[0]
    fp32 = Interpreter(original).run(*inputs, capture=keep)
    per_layer: dict[str, dict] = {}

    def score(node, outs):
        ref = kept.pop(node.name, None)
        if ref is None or not outs or tuple(outs[0].shape) != tuple(ref.shape):
            return
        m = compare([outs[0]], [ref])
        per_layer[node.name] = {"output_sqnr_db": _round_db(m["sqnr_db"]), "output_cosine_min": round(m["cosine_min"], 6)}
    expected = Interpreter(compressed).run(*(inputs if compressed_inputs is None else compressed_inputs),
                                           capture=score)
    return fp32, expected, per_layer

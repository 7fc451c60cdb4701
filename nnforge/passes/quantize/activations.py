"""Activation quantisation (W8A8 with int8 or FP8 E4M3 activations) and SmoothQuant.

``quantize_activations`` puts a ``fake_quant`` with a static per-tensor scale, calibrated on the
calibration set, in front of every selected layer's input (layers reading the same value share
one). Run it after the weight quantiser: the calibration then sees the quantised model.

``smooth_quant`` (Xiao et al., 2023) moves activation outliers into the weights before both:
per input channel j, s_j = max|X_j|^alpha / max|W_:j|^(1-alpha); the layer computes
(X / s) (W s)ᵀ, the same product with flatter activations. 1/s is folded into a preceding
layer_norm when the layers are its only readers, else it is an explicit multiply.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ...ir import Dense, Graph, Node, Value, dtype
from ..base import LayerSelection, Pass, PassContext, PassError, register_pass
from .calibrate import run_calibration

_ACT_FORMATS = {"int8": "int8", "uint8": "uint8", "e4m3": "float8_e4m3fn", "fp8": "float8_e4m3fn",
                "float8_e4m3fn": "float8_e4m3fn", "e5m2": "float8_e5m2", "float8_e5m2": "float8_e5m2"}


def _linear_groups(graph: Graph, sel: LayerSelection) -> dict[Value, list[Node]]:
    """Selected linear layers with dense weights, grouped by the activation they read."""
    groups: dict[Value, list[Node]] = defaultdict(list)
    for node in sel.select(graph):
        if node.op == "linear":
            groups[node.inputs[0]].append(node)
    return groups


def _collect(graph: Graph, inputs: set, ctx: PassContext, who: str, per_channel: bool) -> dict:
    """Per-tensor min/max (or per-channel absolute max) of each value in ``inputs`` over the
    calibration set, seen where a selected layer reads it."""
    stats: dict = {}

    def before(node: Node, args):
        x_val = node.inputs[0] if node.inputs else None
        if x_val not in inputs or x_val in stats and stats[x_val][0] is not node:
            return
        acc = None
        for batch in args:
            x = batch[0].float()
            if per_channel:
                cur = x.reshape(-1, x.shape[-1]).abs().amax(0)
                acc = cur if acc is None else torch.maximum(acc, cur)
            else:
                cur = torch.stack([x.min(), x.max()])
                acc = cur if acc is None else torch.stack([torch.minimum(acc[0], cur[0]),
                                                           torch.maximum(acc[1], cur[1])])
        stats[x_val] = (node, acc)

    run_calibration(graph, ctx.calibration, before, who=who, progress=ctx.progress)
    return {v: s for v, (_, s) in stats.items()}


@register_pass
@dataclass
class QuantizeActivations(LayerSelection, Pass):
    """Static per-tensor quantisation of the inputs of linear layers: ``format`` int8 (symmetric),
    uint8 (with a zero point), e4m3 or e5m2; scales from the calibration set's range."""
    name = "quantize_activations"
    needs_calibration = True
    format: str = "int8"

    def __post_init__(self):
        super().__post_init__()
        if self.format not in _ACT_FORMATS:
            raise PassError(f"{self.name}: unknown activation format {self.format!r}; known: "
                            f"{', '.join(sorted(_ACT_FORMATS))}")
        if set(self.ops) - {"linear", "conv"}:
            raise PassError(f"{self.name}: activation quantisation covers linear layers")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        fmt = dtype(_ACT_FORMATS[self.format])
        groups = _linear_groups(graph, self)
        stats = _collect(graph, set(groups), ctx, self.name, per_channel=False)
        scales = {}
        for x, nodes in groups.items():
            lo, hi = (float(t) for t in stats[x])
            if fmt.name == "uint8":
                lo, hi = min(lo, 0.0), max(hi, 0.0)
                scale = max(hi - lo, 1e-12) / 255.0
                zp = int(round(-lo / scale))
            else:
                top = 127.0 if fmt.is_integer else fmt.max_value
                scale, zp = max(abs(lo), abs(hi), 1e-12) / top, 0
            first = min(nodes, key=graph.nodes.index)
            with graph.inserting_before(first):
                q = graph.op("fake_quant", x, format=fmt, scale=scale, zero_point=zp,
                             name=graph.fresh_name(f"{first.name}_act_quant", node=True))
            for n in nodes:
                n.inputs[0] = q
            scales[first.name] = round(scale, 8)
        ctx.record("activations", len(scales))
        ctx.record("scales", scales)
        return graph


@register_pass
@dataclass
class SmoothQuant(LayerSelection, Pass):
    """Migrate activation outliers into the weights (see the module docstring); ``alpha`` in [0, 1]
    sets how much of the range moves. Run before weight and activation quantisation."""
    name = "smooth_quant"
    needs_calibration = True
    alpha: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise PassError(f"{self.name}: alpha must be in [0, 1], got {self.alpha!r}")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        groups = {x: nodes for x, nodes in _linear_groups(graph, self).items()
                  if all(isinstance(n.inputs[1].encoding, Dense) for n in nodes)}
        act_max = _collect(graph, set(groups), ctx, self.name, per_channel=True)
        readers = graph.uses()
        folded = inserted = 0
        for x, nodes in groups.items():
            weights = [n.inputs[1].encoding.data.float() for n in nodes]
            w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
            a = act_max[x].clamp(min=1e-5)
            s = (a.pow(self.alpha) / w_max.clamp(min=1e-5).pow(1 - self.alpha)).clamp(min=1e-5)
            for n, w in zip(nodes, weights):
                graph.set_encoding(n.inputs[1].name, Dense((w * s).to(n.inputs[1].encoding.data.dtype)))
            ln = x.producer
            only_these = {r for r, _ in readers.get(x, [])} == set(nodes) and x not in graph.outputs
            if ln is not None and ln.op == "layer_norm" and only_these and _fold_into_layer_norm(graph, ln, s):
                folded += 1
                continue
            inv = graph.add_weight(graph.fresh_name(f"{nodes[0].name}.smooth_inv"), Dense((1.0 / s).to(x.dtype.torch_dtype)))
            first = min(nodes, key=graph.nodes.index)
            with graph.inserting_before(first):
                y = graph.op("mul", x, inv, name=graph.fresh_name(f"{first.name}_smooth", node=True))
            for n in nodes:
                n.inputs[0] = y
            inserted += 1
        ctx.record("folded_into_layer_norm", folded)
        ctx.record("multiplies_inserted", inserted)
        return graph


def _fold_into_layer_norm(graph: Graph, ln: Node, s: torch.Tensor) -> bool:
    """Divide a layer_norm's scale and shift by ``s`` (over its last axis only)."""
    w = ln.inputs[1] if len(ln.inputs) > 1 else None
    b = ln.inputs[2] if len(ln.inputs) > 2 else None
    if w is None or not w.is_weight or not isinstance(w.encoding, Dense) or w.shape != tuple(s.shape):
        return False
    if b is not None and (not b.is_weight or not isinstance(b.encoding, Dense)):
        return False
    graph.set_encoding(w.name, Dense(w.encoding.data / s.to(w.encoding.data.dtype)))
    if b is not None:
        graph.set_encoding(b.name, Dense(b.encoding.data / s.to(b.encoding.data.dtype)))
    return True

"""Mixed precision: a weight format per layer, chosen to minimise error under a budget.

1. Sensitivity of every (layer, candidate format): the Hessian estimate tr(ΔW H ΔWᵀ) with ΔW the
   format's RTN error and H = 2XᵀX/n from the calibration set (one pass over the model), or, with
   ``sensitivity="output"``, the error of the model's outputs when that layer alone is quantised.
2. Budget: average bits per weight over the selected layers (scales included), or a latency in
   milliseconds turned into bytes through the target's memory bandwidth (weight streaming bound).
3. Assignment: an exact multiple-choice knapsack by dynamic programming over the budget,
   discretised to at most ``BUDGET_UNITS`` steps.
4. Quantisation: each chosen format runs with ``method`` (GPTQ or RTN) on its layers.

The figures record which layer got which format, with its bits and sensitivity.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from ...ir import Graph, Interpreter, Node
from ...ir.encodings import rows_cols
from ..base import LayerSelection, Pass, PassContext, PassError, register_pass
from .calibrate import run_calibration
from .formats import FormatError, parse_format, quantize_rtn
from .gptq import QuantizeGPTQ, hessian_of
from .rtn import QuantizeRTN

BUDGET_UNITS = 100000
DEFAULT_CANDIDATES = [{"format": "int8"}, {"format": "uint4", "group_size": 128}, {"format": "uint3", "group_size": 128}]


def _spec(c: dict) -> str:
    return c["format"] + (f" g{c['group_size']}" if c.get("group_size") else "")


def knapsack(errors: np.ndarray, costs: np.ndarray, budget: float) -> list[int]:
    """Choice per layer minimising the summed error with summed cost <= budget. Exact over costs
    rounded to a grid of budget / BUDGET_UNITS (so the chosen total may exceed the budget by at
    most half a grid step per layer). errors, costs: [layers, choices]."""
    n, k = errors.shape
    unit = max(budget / BUDGET_UNITS, 1e-12)
    c = np.round(costs / unit).astype(np.int64)
    cap = int(np.floor(budget / unit + 1e-9))
    if c.min(1).sum() > cap:
        raise PassError(f"mixed_precision: the budget cannot be met even with the smallest format for every layer "
                        f"({costs.min(1).sum():.0f} > {budget:.0f} bits)")
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((n, cap + 1), dtype=np.int8)
    for i in range(n):
        new = np.full(cap + 1, inf)
        for j in range(k):
            w = c[i, j]
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = dp[:cap + 1 - w] + errors[i, j]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        dp = new
    end = int(np.argmin(dp))
    picks = []
    for i in reversed(range(n)):
        j = int(choice[i, end])
        picks.append(j)
        end -= c[i, j]
    return picks[::-1]


@register_pass
@dataclass
class MixedPrecision(LayerSelection, Pass):
    """Per-layer formats under a ``bits`` (average bits per weight) or ``latency_ms`` budget; see
    the module docstring. ``candidates`` are format configs like ``{"format": "uint4",
    "group_size": 128}``."""
    name = "mixed_precision"
    needs_calibration = True
    bits: float | None = None
    latency_ms: float | None = None
    candidates: list = field(default_factory=lambda: [dict(c) for c in DEFAULT_CANDIDATES])
    sensitivity: str = "hessian"
    method: str = "gptq"

    def __post_init__(self):
        super().__post_init__()
        if (self.bits is None) == (self.latency_ms is None):
            raise PassError(f"{self.name}: give exactly one budget: bits (per weight) or latency_ms")
        if self.bits is not None and (not isinstance(self.bits, (int, float)) or not 1 <= self.bits <= 32):
            raise PassError(f"{self.name}: bits must be a number of bits per weight in [1, 32], got {self.bits!r}")
        if self.sensitivity not in ("hessian", "output"):
            raise PassError(f"{self.name}: sensitivity must be 'hessian' or 'output', got {self.sensitivity!r}")
        if self.method not in ("gptq", "rtn"):
            raise PassError(f"{self.name}: method must be 'gptq' or 'rtn', got {self.method!r}")
        if not isinstance(self.candidates, list) or not self.candidates:
            raise PassError(f"{self.name}: candidates must be a non-empty list of format configs")
        self.formats = []
        for c in self.candidates:
            if not isinstance(c, dict) or set(c) - {"format", "group_size"} or "format" not in c:
                raise PassError(f"{self.name}: candidate {c!r} must be a table with 'format' and optionally "
                                "'group_size'")
            try:
                self.formats.append(parse_format(c["format"], group_size=c.get("group_size")))
            except FormatError as e:
                raise PassError(f"{self.name}: candidate {c!r}: {e}") from None

    def _budget_bits(self, total_weights: int, ctx: PassContext) -> float:
        if self.bits is not None:
            return self.bits * total_weights
        bw = (getattr(ctx.target, "memory", None) or {}).get("bandwidth_gbps")
        if not bw:
            raise PassError(f"{self.name}: latency_ms needs a target with memory.bandwidth_gbps "
                            f"(target {getattr(ctx.target, 'name', None)!r} has none)")
        return self.latency_ms / 1000.0 * bw * 1e9 * 8

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        layers = [(n, n.inputs[1]) for n in self.select(graph) if n.op in ("linear", "conv")]
        seen, uniq = set(), []
        for n, w in layers:
            if w.name not in seen and w.dtype.is_float:
                seen.add(w.name)
                uniq.append((n, w))
        if not uniq:
            raise PassError(f"{self.name}: no selected linear/conv layer with a float weight")
        errors = self._sensitivities(graph, uniq, ctx)
        costs = np.array([[f.bits_per_weight(rows_cols(w.shape)[1]) * w.encoding.numel for f in self.formats]
                          for _, w in uniq])
        total = sum(w.encoding.numel for _, w in uniq)
        picks = knapsack(errors, costs, self._budget_bits(total, ctx))
        by_format = defaultdict(list)
        assignment = {}
        for i, ((n, w), j) in enumerate(zip(uniq, picks)):
            by_format[j].append(n.name)
            assignment[n.name] = {"format": _spec(self.candidates[j]),
                                  "bits": round(float(costs[i, j]) / w.encoding.numel, 4),
                                  "sensitivity": float(errors[i, j])}
        for j, names in by_format.items():
            cls = QuantizeGPTQ if self.method == "gptq" else QuantizeRTN
            opts = dict(self.candidates[j], layers=names, ops=["linear", "conv"], ragged_groups=True)
            graph = cls(**opts).run(graph, ctx)
        avg = float(sum(costs[i, j] for i, j in enumerate(picks)) / total)
        ctx.record("assignment", assignment)
        ctx.record("bits_per_weight", round(avg, 4))
        ctx.record("formats", {_spec(self.candidates[j]): len(v) for j, v in by_format.items()})
        return graph

    def _sensitivities(self, graph: Graph, layers: list, ctx: PassContext) -> np.ndarray:
        errors = np.zeros((len(layers), len(self.formats)))
        if self.sensitivity == "hessian":
            wanted = {n.name for n, _ in layers}
            hessians: dict = {}

            def before(node: Node, args):
                # a grouped conv has no single matmul view (its weight holds C/groups input
                # channels): its layers are weighed by the plain weight error below
                if node.name in wanted and (node.op == "linear" or node.attrs["groups"] == 1):
                    H, rows = None, 0
                    for batch in args:
                        h, r = hessian_of(batch[0], node)
                        H, rows = (h if H is None else H + h), rows + r
                    hessians[node.name] = 2.0 * H / max(rows, 1)

            run_calibration(graph, ctx.calibration, before, who=f"{self.name} (sensitivity)", progress=ctx.progress)
            for i, (n, w) in enumerate(layers):
                W = w.encoding.data.float().reshape(rows_cols(w.shape))
                H = hessians.get(n.name)
                if H is None:
                    H = torch.eye(W.shape[1])
                # Relative to the layer's output energy: layers after a normalisation matter by how
                # much of their signal they lose, not by their raw scale.
                energy = float(torch.einsum("ij,jk,ik->", W, H, W)) or 1.0
                for j, f in enumerate(self.formats):
                    dW = quantize_rtn(W, f).decode().reshape(W.shape) - W
                    errors[i, j] = float(torch.einsum("ij,jk,ik->", dW, H, dW)) / energy
            return errors
        batches = list(ctx.calibration)[:2]
        ref = [Interpreter(graph).run(*b) for b in batches]
        for i, (n, w) in enumerate(layers):
            original = w.encoding
            for j, f in enumerate(self.formats):
                graph.set_encoding(w.name, quantize_rtn(original.data, f, out_dtype=w.dtype))
                outs = [Interpreter(graph).run(*b) for b in batches]
                errors[i, j] = sum(float((o - r).pow(2).sum()) for out, rr in zip(outs, ref) for o, r in zip(out, rr))
            graph.set_encoding(w.name, original)
        return errors

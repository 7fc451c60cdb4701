"""EoRA (Liu et al., 2024): quantise a layer, then add a low-rank path that compensates the
quantisation error where the layer's inputs actually lie.

For a weight W and its quantised form Q(W), the error E = W - Q(W) is projected into the
eigenspace of the input covariance C = XᵀX / n = Q Λ Qᵀ (E' = E Q Λ^½), truncated to ``rank`` by
SVD and mapped back (Λ^-½ Qᵀ), so the factors minimise ||(E - BA) Xᵀ||_F: output error, not
weight error. The layer becomes ``linear(x, Q(W), bias) + linear(linear(x, A), B)``, every part a
plain matmul for the backends; the factors can be quantised too (``factor_format``, e.g. "int8").
EoRA adds rank * (in + out) numbers per layer by design: the pass records the extra bytes.

Why one combined pass, ``quantize_eora``: the error needs the original weight, which a graph
after ``quantize_gptq`` no longer holds (keeping a copy of every dense weight in the graph would
double what a bundle stores). Running the quantiser inside the pass also lets one calibration
sweep do both: each layer is quantised (GPTQ by default, or RTN) and compensated with the same
input statistics, and later layers see inputs computed by the compensated ones. Every option of
``quantize_gptq`` applies; ``method="rtn"`` quantises round-to-nearest instead.

    >>> QuantizeEoRA(format="uint3", group_size=128, ragged_groups=True, rank=64)(graph, ctx)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...ir import Graph, Node
from ...ir.encodings import rows_cols
from ..base import PassContext, PassError, register_pass
from ..quantize.calibrate import run_calibration
from ..quantize.coverage import CalibrationCoverage, report_damping
from ..quantize.formats import quantize_rtn
from ..quantize.gptq import QuantizeGPTQ, gptq_quantize
from .svd import CovarianceCache, factor_weight_format, factors, spectrum, split_lowrank


def output_error(d: torch.Tensor, cov: torch.Tensor) -> float:
    """tr(D C Dᵀ): the mean squared output error of a weight error D on inputs of covariance C."""
    d = d.to(torch.float64)
    return float(((d @ cov.to(torch.float64)) * d).sum())


@register_pass
@dataclass
class QuantizeEoRA(QuantizeGPTQ):
    """Weight quantisation (any ``quantize_gptq`` option; ``method`` "gptq" or "rtn") plus an
    EoRA compensation path of ``rank`` per linear layer (see the module docstring)."""
    name = "quantize_eora"
    ops: list[str] = field(default_factory=lambda: ["linear"])
    method: str = "gptq"
    rank: int = 64
    factor_format: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.ops != ["linear"]:
            raise PassError(f"{self.name}: ops must be [\"linear\"]: EoRA compensates linear layers, got {self.ops}")
        if self.method not in ("gptq", "rtn"):
            raise PassError(f"{self.name}: method must be \"gptq\" or \"rtn\", got {self.method!r}")
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise PassError(f"{self.name}: rank must be a positive integer, got {r!r}")
        self.factor_fmt = factor_weight_format(self.factor_format, self.name)

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        targets = {node.name: (node, w) for node, w in self.targets(graph)}
        for node, w in targets.values():
            if self.rank > min(rows_cols(w.shape)):
                raise PassError(f"{self.name}: rank {self.rank} exceeds the rank of layer {node.name} ({w.name}, "
                                f"{list(w.shape)}), at most {min(rows_cols(w.shape))}")
        covs = CovarianceCache(graph, [n for n, _ in targets.values()])
        layers: dict[str, dict] = {}
        coverage, raised = CalibrationCoverage(), {}

        def before(node: Node, args):
            if node.name not in targets:
                return
            _, w = targets[node.name]
            cov = covs.collect(node, args)
            rows, cols = rows_cols(w.shape)
            coverage.note(node.name, covs.rows(node), cols)
            W = w.encoding.data.to(torch.float32).reshape(rows, cols)
            if self.method == "gptq":
                base, figs = gptq_quantize(W.reshape(w.shape), 2.0 * cov, self.weight_format,
                                           act_order=self.act_order, static_groups=self.static_groups,
                                           damp=self.damp, block_size=self.block_size, out_dtype=w.dtype,
                                           layer=node.name)
                if figs["damp"] != self.damp:
                    raised[node.name] = figs["damp"]
            else:
                base = quantize_rtn(W.reshape(w.shape), self.weight_format, out_dtype=w.dtype)
            err = W - base.decode(torch.float32).reshape(rows, cols)
            sp = spectrum(err, cov, damp=self.damp, whitening="eigen", where=f"{self.name}: layer {node.name}")
            if sp.damp != self.damp:
                raised[node.name] = max(sp.damp, raised.get(node.name, sp.damp))
            enc = factors(sp, self.rank, w.shape, dtype=w.dtype.torch_dtype, fmt=self.factor_fmt, base=base)
            graph.set_encoding(w.name, enc)
            before_err = output_error(err, cov)
            after_err = output_error(err - (enc.b.decode(torch.float32) @ enc.a.decode(torch.float32)), cov)
            layers[node.name] = {"weight": w.name, "base_bytes": base.nbytes,
                                 "extra_bytes": enc.a.nbytes + enc.b.nbytes,
                                 "error_kept": round(after_err / before_err, 6) if before_err > 0 else 0.0}

        run_calibration(graph, ctx.calibration, before, who=self.name, progress=ctx.progress, until=targets)
        kept = split_lowrank(graph, [v["weight"] for v in layers.values()], tag="eora")
        extra = sum(v["extra_bytes"] for v in layers.values())
        base = sum(v["base_bytes"] for v in layers.values())
        ctx.record("layers", len(layers))
        ctx.record("rank", self.rank)
        ctx.record("encodings", sorted({graph.weights[v["weight"]].encoding.describe() for v in layers.values()}))
        ctx.record("base_bytes", base)
        ctx.record("extra_bytes", extra)
        ctx.record("extra_fraction", round(extra / max(base, 1), 6))
        ctx.record("output_error_kept", {k: v["error_kept"] for k, v in layers.items()})
        if kept:
            ctx.record("kept_encoded", kept)
        coverage.report(ctx, self.name, plain="round-to-nearest" if self.method == "gptq"
                        else "round-to-nearest without the low-rank path")
        report_damping(ctx, self.name, self.damp, raised)
        return graph


__all__ = ["QuantizeEoRA", "output_error"]

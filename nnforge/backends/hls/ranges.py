"""The activation format fitted to the values a design meets, as hls4ml's profiling sets precisions.

A design computes every activation in one fixed-point format, ``ap_fixed<act_width, act_int>``
(the target's options), which saturates past +-2^(act_int-1). Most models fit the default, but a
decoder's residual stream can grow far past its other activations: Gemma 3 270M's passes 10^5, a
few hundred times its largest linear output. A saturated stream does not fail loudly; the logits
come out as noise. So before planning a design, the compile runs the reference interpreter on its
first held-out batch and, where any activation passes the format's range:

1. The residual stream is carried divided by a power of two (``nnforge.ir.residual``, the rewrite
   the ``scale_residual`` pass runs: the same function in real arithmetic; RMS norms do not see a
   common factor), small enough that the stream fits in the integer bits the other activations
   need.
2. ``act_int`` rises to the bits those activations need, with one spare bit for inputs larger than
   the batch seen, and ``act_width`` rises with it to keep the fractional bits, as far as the
   design's 64-bit sums allow (a norm or attention sums squares or products of two activations).

A fit that would leave fewer than ``MIN_FRAC`` fractional bits is refused, naming the value and
its magnitude. The entry records what was measured and chosen (``activation_fit``), and a load
applies the same scale to the bundle's graph, so the runner rebuilds the design the compile wrote.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ...ir import Graph, Interpreter, residual
from ..base import BackendError
from .project import HlsOptions

MIN_FRAC = 8           # fewer fractional bits than this would round a unit-scale activation to 1/256
SPARE_BITS = 1         # headroom over the largest magnitude the held-out batch showed
# Masks written as the float minimum (or infinities) saturate to the format's end by design
# (logic.py): such values are not magnitudes to fit.
SENTINEL = 1e30


def int_bits(magnitude: float) -> int:
    """The ``act_int`` whose range +-2^(act_int-1) holds ``magnitude`` with SPARE_BITS to spare."""
    return max(1, math.floor(math.log2(max(magnitude, 1e-30))) + 2 + SPARE_BITS)


def width_limit(graph: Graph) -> tuple[int, str]:
    """The widest ``act_width`` the design's kernels can sum in 64 bits (the checks of
    project._check_widths and the attention and pow kernels), and the node that sets it."""
    best, where = 32, "raw activations are int32 in memory"
    for node in graph.nodes:
        n = None
        if node.op in ("rms_norm", "layer_norm"):
            n = node.inputs[0].shape[-1]
        elif node.op == "attention":
            n = node.inputs[0].shape[-1]
        elif node.op == "matmul" and not any(v.is_weight for v in node.inputs):
            n = node.inputs[0].shape[-1]
        if isinstance(n, int):
            w = (62 - math.ceil(math.log2(max(n, 2)))) // 2
            if w < best:
                best, where = w, f"node {node.name} ({node.op}) sums {n} products of two activations in 64 bits"
        elif node.op == "pow" and 31 < best:
            best, where = 31, f"node {node.name} (pow) multiplies two activations in 64 bits"
    return best, where


def magnitudes(graph: Graph, inputs: list) -> dict[str, float]:
    """The largest magnitude of each float activation of ``graph`` on ``inputs``, leaving out
    sentinel entries (SENTINEL and past, infinities)."""
    seen: dict[str, float] = {}

    def note(name: str, t) -> None:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            a = t.detach().abs()
            a = a[a < SENTINEL]
            if a.numel():
                seen[name] = max(seen.get(name, 0.0), float(a.max()))

    def capture(node, outs):
        for v, t in zip(node.outputs, outs):
            note(v.name, t)

    for v, x in zip(graph.inputs, inputs):
        note(v.name, torch.as_tensor(x))
    Interpreter(graph).run(*[torch.as_tensor(x) for x in inputs], capture=capture)
    return seen


def scale_residual(graph: Graph, factor: float) -> Graph:
    """``graph`` with its residual stream times ``factor`` (nnforge.ir.residual), in place."""
    residual.scale_residual(graph, factor)
    return graph


def fit(graph: Graph, opts: HlsOptions, reference: list | None) -> tuple[Graph, HlsOptions, dict | None]:
    """(the graph to plan, the options to plan it with, the entry's ``activation_fit`` record or
    None when the target's format holds every activation of ``reference``)."""
    if reference is None:
        return graph, opts, None
    seen = magnitudes(graph, reference)
    if not seen:
        return graph, opts, None
    top = max(seen, key=seen.get)
    if int_bits(seen[top]) - SPARE_BITS <= opts.act_int:       # fits (the spare bit is asked of a change only)
        return graph, opts, None
    record = {"measured_on": "the first held-out batch, by the reference interpreter",
              "largest": {"value": top, "magnitude": seen[top]},
              "target_format": [opts.act_width, opts.act_int]}
    factor = 1.0
    found = residual.residual_stream(graph)
    if not isinstance(found, str):
        values, adds, _ = found
        stream = {v.name for v in values}
        # block outputs made by a post-norm are scaled through its weight; every other value keeps
        # its magnitude (an RMS norm's output does not see the stream's factor)
        folded = {a.inputs[i].name for a in adds for i in (0, 1) if a.inputs[i].producer is not None
                  and a.inputs[i].producer.op == "rms_norm" and a.inputs[i].name not in stream}
        rest = max([m for k, m in seen.items() if k not in stream and k not in folded], default=0.0)
        grown = max([seen[k] for k in stream | folded if k in seen], default=0.0)
        need = max(opts.act_int, int_bits(rest))
        while grown * factor >= 2.0 ** (need - 1 - SPARE_BITS) and factor > 2.0 ** -20:
            factor /= 2
        if factor < 1.0:
            graph = scale_residual(graph, factor)
            record["residual_scale"] = factor
            record["stream"] = {"values": len(stream), "magnitude": grown, "rest_magnitude": rest}
            seen = magnitudes(graph, reference)
            top = max(seen, key=seen.get)
    act_int = max(opts.act_int, int_bits(seen[top]))
    limit, why = width_limit(graph)
    width = min(opts.act_width + act_int - opts.act_int, limit)
    if width - act_int < MIN_FRAC:
        raise BackendError(f"value {top} reaches {seen[top]:.4g} on the first held-out batch, which needs act_int = "
                           f"{act_int}; the widest activation the design can sum is act_width = {limit} ({why}), "
                           f"leaving {width - act_int} fractional bits (at least {MIN_FRAC} are needed)")
    fitted = replace(opts, act_width=width, act_int=act_int)
    HlsOptions.from_dict(fitted.to_dict(), "fitted activation format")          # its consistency checks
    record["format"] = [width, act_int]
    return graph, fitted, record

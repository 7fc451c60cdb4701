"""Comparing outputs: cosine similarity, SQNR and error against a reference, and tolerances.

    >>> m = compare(outputs, reference)
    >>> m["cosine_min"], m["sqnr_db"], m["max_abs_error"]
"""
from __future__ import annotations

import math

import torch

# What the bundle's runtime must reproduce of the reference interpreter on the same (compressed)
# graph: backends may reorder float sums and use their own fused kernels, but not change results.
BACKEND_TOLERANCE = {"cosine_min": 0.9999}
# Graphs that round activations at run time (W8A8) cannot be held to that: a last-bit difference
# in a float sum moves a value across a rounding boundary, one code flips, and the flips multiply
# layer by layer (in a W8A8 encoder a few codes in a million differ after the first layer, a large
# share after the last). Two correct implementations then differ about as much as either differs
# from fp32, so the backend is held to being no further from fp32 than this many times the
# reference's own distance (1 - cosine), plus a floor.
ROUNDED_ACTIVATIONS_SLACK = 2.0
ROUNDED_ACTIVATIONS_FLOOR = 1e-4


def within_rounding(backend_vs_fp32: dict, reference_vs_fp32: dict) -> tuple[bool, float]:
    """(passes, lowest allowed cosine) for a graph that rounds activations at run time."""
    allowed = 1.0 - (ROUNDED_ACTIVATIONS_SLACK * (1.0 - reference_vs_fp32["cosine_min"]) + ROUNDED_ACTIVATIONS_FLOOR)
    return backend_vs_fp32["cosine_min"] >= allowed, allowed
# Uncompressed fp32 graphs must match the original model this closely (issue contract: >= 0.99999).
FP32_TOLERANCE = {"cosine_min": 0.99999}


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def compare(outputs, references) -> dict:
    """Agreement of ``outputs`` with ``references`` (lists of tensors or arrays, same order).

    cosine_min is the smallest cosine similarity over outputs and over rows (the leading axis,
    e.g. one per sentence); sqnr_db the worst output's signal-to-quantisation-noise ratio."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")
    cos_min, cos_means, sqnrs, max_abs, exact = 1.0, [], [], 0.0, []
    for out, ref in zip(outputs, references):
        out, ref = _as_tensor(out), _as_tensor(ref)
        if tuple(out.shape) != tuple(ref.shape):
            raise ValueError(f"output shape {tuple(out.shape)} differs from reference {tuple(ref.shape)}")
        if not ref.is_floating_point():
            exact.append(float((out == ref).double().mean()) if ref.numel() else 1.0)
            continue
        o, r = out.double(), ref.double()
        # Non-finite elements must match exactly (NaN for NaN, the same infinity); left in, they
        # would make the cosine NaN, which min() skips: a NaN output would read as cosine 1.
        odd = ~torch.isfinite(o) | ~torch.isfinite(r)
        if bool(odd.any()):
            same = (o == r) | (torch.isnan(o) & torch.isnan(r))
            if not bool(same[odd].all()):
                cos_min = -1.0
                cos_means.append(-1.0)
                sqnrs.append(-math.inf)
                max_abs = math.inf
                continue
            o, r = o.masked_fill(odd, 0.0), r.masked_fill(odd, 0.0)
        rows_o = o.reshape(o.shape[0], -1) if o.dim() > 1 else o.reshape(1, -1)
        rows_r = r.reshape(rows_o.shape)
        cos = torch.nn.functional.cosine_similarity(rows_o, rows_r, dim=-1, eps=1e-30)
        both_zero = (rows_o.abs().sum(-1) == 0) & (rows_r.abs().sum(-1) == 0)
        cos = torch.where(both_zero, torch.ones_like(cos), cos)
        cos_min = min(cos_min, float(cos.min()))
        cos_means.append(float(cos.mean()))
        noise = float(((o - r) ** 2).sum())
        signal = float((r ** 2).sum())
        sqnrs.append(math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise))
        max_abs = max(max_abs, float((o - r).abs().max()) if o.numel() else 0.0)
    return {"cosine_min": cos_min, "cosine_mean": min(cos_means) if cos_means else 1.0,
            "sqnr_db": min(sqnrs) if sqnrs else math.inf, "max_abs_error": max_abs,
            "exact_match": min(exact) if exact else None}


def within(metrics: dict, tolerance: dict) -> bool:
    ok = metrics["cosine_min"] >= tolerance.get("cosine_min", -1.0)
    if "sqnr_db" in tolerance:
        ok = ok and metrics["sqnr_db"] >= tolerance["sqnr_db"]
    if metrics.get("exact_match") is not None:
        ok = ok and metrics["exact_match"] >= tolerance.get("exact_match", 1.0)
    return ok


def json_safe(metrics: dict) -> dict:
    """Infinite SQNR (identical outputs) as a string, so manifests stay standard JSON."""
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in metrics.items()}

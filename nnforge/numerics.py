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


# The ops that round activations at run time: fake-quantised activations (static or dynamic
# scales: a dynamic_quant's codes flip as a fake_quant's do, and its scale moves with the row's
# largest value too), and an encoded KV cache, which rounds every key and value it stores and feeds
# them back to later layers and steps (a deep decoder's codes flip in cascade as a W8A8 encoder's do).
ROUNDING_OPS = ("fake_quant", "dynamic_quant", "kv_cache_write")


def rounds_at_run_time(graph) -> bool:
    """Whether ``graph`` (an nnforge Graph) rounds activations at run time (ROUNDING_OPS)."""
    return any(n.op in ROUNDING_OPS for n in graph.nodes)


def within_rounding(backend_vs_fp32: dict, reference_vs_fp32: dict) -> tuple[bool, float]:
    """(passes, lowest allowed cosine) for a graph that rounds activations at run time."""
    allowed = 1.0 - (ROUNDED_ACTIVATIONS_SLACK * (1.0 - reference_vs_fp32["cosine_min"]) + ROUNDED_ACTIVATIONS_FLOOR)
    return backend_vs_fp32["cosine_min"] >= allowed, allowed
# An encoded KV cache's state is an output holding integer codes: they re-round the keys and values
# the backend computed in its own float order, so a last-bit difference upstream flips a code (or a
# float16 scale, and with it codes of that token) exactly where the reference's value lies on a
# rounding boundary. The logits stay held to BACKEND_TOLERANCE; the state's codes to this share of
# equal elements (a wrong lowering differs in most of them).
ENCODED_STATE_TOLERANCE = {**BACKEND_TOLERANCE, "exact_match": 0.99}
# Uncompressed fp32 graphs must match the original model this closely (issue contract: >= 0.99999).
FP32_TOLERANCE = {"cosine_min": 0.99999}


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def compare(outputs, references, *, nan_equal: bool = False) -> dict:
    """Agreement of ``outputs`` with ``references`` (lists of tensors or arrays, same order).

    cosine_min is the smallest cosine similarity over outputs and over rows (the leading axis,
    e.g. one per sentence); sqnr_db the worst output's signal-to-quantisation-noise ratio.
    Non-finite elements must match exactly (the same infinity); a NaN output never scores as a
    match unless ``nan_equal`` (a runtime reproducing a graph that is allowed NaN outputs)."""
    rows = row_cosines(outputs, references, nan_equal=nan_equal)
    cos_min, cos_means, sqnrs, max_abs, exact = 1.0, [], [], 0.0, []
    for cos, out, ref in rows:
        if cos is None:             # integer or boolean output: the share of equal elements
            exact.append(float((out == ref).double().mean()) if ref.numel() else 1.0)
            continue
        if out is None:             # non-finite elements that do not match
            cos_min = -1.0
            cos_means.append(-1.0)
            sqnrs.append(-math.inf)
            max_abs = math.inf
            continue
        cos_min = min(cos_min, float(cos.min()))
        cos_means.append(float(cos.mean()))
        sqnrs.append(_sqnr_db(out, ref))
        max_abs = max(max_abs, float((out - ref).abs().max()) if out.numel() else 0.0)
    return {"cosine_min": cos_min, "cosine_mean": min(cos_means) if cos_means else 1.0,
            "sqnr_db": min(sqnrs) if sqnrs else math.inf, "max_abs_error": max_abs,
            "exact_match": min(exact) if exact else None}


def _sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    noise = float(((out - ref) ** 2).sum())
    signal = float((ref ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def row_cosines(outputs, references, *, nan_equal: bool = False) -> list[tuple]:
    """Per output: (cosine of each row, output, reference) in float64 with matching non-finite
    elements zeroed; (None, out, ref) for an integer/boolean output; (-1 per row, None, None)
    where non-finite elements do not match. Left in, a NaN would make the cosine NaN, which
    ``min()`` skips: a NaN output would read as cosine 1."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")
    out_rows = []
    for out, ref in zip(outputs, references):
        out, ref = _as_tensor(out), _as_tensor(ref)
        if tuple(out.shape) != tuple(ref.shape):
            raise ValueError(f"output shape {tuple(out.shape)} differs from reference {tuple(ref.shape)}")
        if not ref.is_floating_point():
            out_rows.append((None, out, ref))
            continue
        o, r = out.double(), ref.double()
        rows_o = o.reshape(o.shape[0], -1) if o.dim() > 1 else o.reshape(1, -1)
        odd = ~torch.isfinite(o) | ~torch.isfinite(r)
        if bool(odd.any()):
            same = (o == r) | (torch.isnan(o) & torch.isnan(r) if nan_equal else torch.zeros_like(odd))
            if not bool(same[odd].all()):
                out_rows.append((torch.full((rows_o.shape[0],), -1.0, dtype=torch.float64), None, None))
                continue
            o, r = o.masked_fill(odd, 0.0), r.masked_fill(odd, 0.0)
            rows_o = o.reshape(rows_o.shape)
        rows_r = r.reshape(rows_o.shape)
        cos = torch.nn.functional.cosine_similarity(rows_o, rows_r, dim=-1, eps=1e-30)
        both_zero = (rows_o.abs().sum(-1) == 0) & (rows_r.abs().sum(-1) == 0)
        out_rows.append((torch.where(both_zero, torch.ones_like(cos), cos), o, r))
    return out_rows


# A fresh sample's mean cosine is expected within this many standard errors of the held-out one.
FRESH_SAMPLE_Z = 3.0


class Fidelity:
    """:func:`fidelity` taken one batch at a time, so that no more than one batch's outputs need be
    held (a decoder's held-out batches each carry every layer's KV cache).

        >>> f = Fidelity(); f.add(outputs, references); f.result()["cosine_min"]
    """

    def __init__(self):
        self.batches: list[dict] = []
        self.cosines: list[torch.Tensor] = []

    def add(self, outputs, references) -> None:
        self.batches.append(compare(outputs, references))
        self.cosines += [cos for cos, _, _ in row_cosines(outputs, references) if cos is not None]

    def result(self) -> dict:
        batches = self.batches
        cos = torch.cat(self.cosines) if self.cosines else torch.ones(1, dtype=torch.float64)
        n = int(cos.numel())
        stderr = float(cos.std() / math.sqrt(n)) if n > 1 else math.inf
        exact = [b["exact_match"] for b in batches if b["exact_match"] is not None]
        return {"cosine_min": min(b["cosine_min"] for b in batches), "cosine_mean": float(cos.mean()),
                "sqnr_db": min(b["sqnr_db"] for b in batches),
                "max_abs_error": max(b["max_abs_error"] for b in batches),
                "exact_match": min(exact) if exact else None, "rows": n, "cosine_mean_stderr": stderr,
                "fresh_inputs_margin": FRESH_SAMPLE_Z * stderr}


def fidelity(outputs_per_batch, references_per_batch) -> dict:
    """:func:`compare` over several batches (each a list of outputs), plus what the figures rest
    on: ``rows`` compared, the standard error of the mean cosine over rows, and the margin within
    which the mean cosine of fresh inputs from the same distribution is expected
    (:data:`FRESH_SAMPLE_Z` standard errors)."""
    f = Fidelity()
    for o, r in zip(outputs_per_batch, references_per_batch, strict=True):
        f.add(o, r)
    return f.result()


def nonfinite(tensors) -> list[str]:
    """``name: how many NaN / inf of how many`` for each named tensor holding non-finite values."""
    out = []
    for name, t in tensors:
        t = _as_tensor(t)
        if not t.is_floating_point() or t.numel() == 0 or bool(torch.isfinite(t).all()):
            continue
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        if nan or inf:
            what = " and ".join(f"{k} {w}" for k, w in ((nan, "NaN"), (inf, "inf")) if k)
            out.append(f"{name} holds {what} of {t.numel()} values")
    return out


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

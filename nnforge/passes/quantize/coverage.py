"""Whether a calibration set is big enough for the Hessians a pass estimates from it.

GPTQ, SparseGPT and EoRA each read a layer's inputs as a matrix X (one row per token, or per
im2col position of a convolution) and use H = 2XᵀX/n, a [cols, cols] matrix, where ``cols`` is
the layer's input width. With fewer rows than columns H is singular (damping alone makes it
invertible) and its inverse, which decides where GPTQ pushes each rounding error, fits the few
rows seen rather than the inputs the model will meet: GPTQ can then do worse than plain
round-to-nearest. The estimate settles as rows per column grow; ``MIN_TOKENS_PER_COLUMN`` is where
a pass stops warning. A Hessian that is not positive definite even so has its damping raised
(``upper_inverse`` in :mod:`.gptq`); :func:`report_damping` says which layers needed it.

    >>> cover = CalibrationCoverage()
    >>> cover.note("mlp.down", rows=128, cols=256)
    >>> cover.report(ctx, "quantize_gptq")        # ctx.warn(...) naming mlp.down and 0.5
"""
from __future__ import annotations

import math

from ..base import PassContext

# Rows of X per input column below which a pass warns: the usual GPTQ calibration (128 windows of
# 2048 tokens for layers a few thousand columns wide) sits well above it, and below it the
# Hessian-based result still moves with the calibration sample (see docs/presets.md).
MIN_TOKENS_PER_COLUMN = 8
# layers named in a warning; the rest are counted
SHOWN = 4


class CalibrationCoverage:
    """Calibration rows per input column of every layer a pass estimated a Hessian for."""

    def __init__(self, minimum: float = MIN_TOKENS_PER_COLUMN):
        self.minimum = minimum
        self.ratios: dict[str, tuple[int, int]] = {}

    def note(self, layer: str, rows: int, cols: int) -> None:
        self.ratios[layer] = (rows, cols)

    def too_few(self) -> dict[str, float]:
        """Layer -> rows per column, for the layers below the minimum, fewest first."""
        low = {k: r / c for k, (r, c) in self.ratios.items() if c and r / c < self.minimum}
        return {k: round(v, 3) for k, v in sorted(low.items(), key=lambda kv: kv[1])}

    def report(self, ctx: PassContext, who: str, plain: str = "round-to-nearest") -> None:
        """Record ``too_few_tokens_per_column`` and warn, naming the layers, their ratios and what
        to do, when any layer is below the minimum; nothing otherwise. ``plain``: the method without
        a Hessian that the pass's result may fall below."""
        low = self.too_few()
        if not low:
            return
        ctx.record("too_few_tokens_per_column", low)
        shown = ", ".join(f"{k} ({self.ratios[k][0]} rows / {self.ratios[k][1]} columns = {v:g})"
                          for k, v in list(low.items())[:SHOWN])
        more = f" and {len(low) - SHOWN} more" if len(low) > SHOWN else ""
        singular = " (fewer rows than columns: a singular Hessian)" if min(low.values()) < 1 else ""
        worst = max(low, key=lambda k: self.minimum * self.ratios[k][1] - self.ratios[k][0])
        rows, cols = self.ratios[worst]
        ctx.warn(f"{who}: the calibration set gives {len(low)} of {len(self.ratios)} layers fewer than "
                 f"{self.minimum:g} calibration tokens per input column{singular}: {shown}{more}. Their Hessians "
                 f"are estimated from too few rows, so {who} may do worse than {plain} on them; pass more "
                 f"calibration data (more or longer sequences or windows: {worst} needs "
                 f"{math.ceil(self.minimum * cols)} rows, it saw {rows})")


def report_damping(ctx: PassContext, who: str, damp: float, raised: dict[str, float]) -> None:
    """Record ``damp_raised`` (layer -> the damping its Hessian took) and warn, naming the layers,
    when any layer's Hessian needed more damping than ``damp``."""
    if not raised:
        return
    ctx.record("damp_raised", dict(raised))
    shown = ", ".join(f"{k} ({v:g})" for k, v in list(raised.items())[:SHOWN])
    more = f" and {len(raised) - SHOWN} more" if len(raised) > SHOWN else ""
    ctx.warn(f"{who}: the Hessians of {len(raised)} layer(s) were not positive definite with damp={damp:g}, so "
             f"their damping was raised: {shown}{more}. A singular Hessian comes from too few or too similar "
             "calibration inputs: pass more calibration data, or set damp in the recipe to choose the damping")

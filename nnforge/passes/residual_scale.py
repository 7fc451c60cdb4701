"""A decoder's residual stream carried divided by a power of two, for a backend that computes in
fp16: the hidden states of some checkpoints pass fp16's range (+-65504) in the reference itself
(Gemma 3 270M's do), while everything that reads the stream is an RMS norm, which does not see a
common factor. The rewrite is ``nnforge.ir.residual.scale_residual`` (the hls backend's activation
fit applies it too); this pass runs it from a recipe and records what it changed, or why it
changed nothing (a graph where something other than RMS norms and the next add reads the stream).

    >>> ScaleResidual(factor=0.125)(graph)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..ir import Graph
from ..ir.residual import scale_residual
from .base import Pass, PassContext, PassError, register_pass


@register_pass
@dataclass
class ScaleResidual(Pass):
    """The residual stream times ``factor`` (a power of two below 1), each RMS norm on it with its
    epsilon times ``factor**2``; records the adds and norms it changed, or why it changed nothing."""
    name = "scale_residual"
    factor: float = 0.125

    def __post_init__(self):
        f = self.factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1 or \
                math.frexp(float(f))[0] != 0.5:
            raise PassError(f"{self.name}: factor must be a power of two below 1 (0.5, 0.25, ...), got {f!r}")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        done = scale_residual(graph, self.factor)
        if isinstance(done, str):
            ctx.record("unchanged", done)
        else:
            ctx.record("scaled", done)
        return graph


__all__ = ["ScaleResidual"]

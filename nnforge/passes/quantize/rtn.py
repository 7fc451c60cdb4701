"""Round-to-nearest weight quantisation: the baseline every other quantiser is measured against."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ...ir import Graph
from ..base import Pass, PassContext, register_pass
from .common import WeightQuantConfig
from .formats import quantize_rtn


@register_pass
@dataclass
class QuantizeRTN(WeightQuantConfig, Pass):
    """Weight-only RTN to any :mod:`format <.formats>`: integers 2..8 bits (symmetric or with a
    zero point), OCP minifloats, MX and NVFP4 blocks; per tensor, channel or group."""
    name = "quantize_rtn"

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        kinds: Counter = Counter()
        for node, w in self.targets(graph):
            enc = quantize_rtn(w.encoding.data, self.weight_format, out_dtype=w.dtype)
            graph.set_encoding(w.name, enc)
            kinds[enc.describe()] += 1
        ctx.record("layers", sum(kinds.values()))
        ctx.record("encodings", dict(kinds))
        return graph

"""Round-to-nearest weight quantisation: the baseline every other quantiser is measured against."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...ir import Dense, Graph, IntQuant
from ...ir.encodings import rows_cols
from ..base import LayerSelection, Pass, PassContext, PassError, register_pass


@register_pass
@dataclass
class QuantizeRTN(LayerSelection, Pass):
    """Weight-only integer RTN: ``bits`` in 2..8, symmetric (signed codes) or asymmetric (unsigned
    codes + zero point), per output channel (``group_size=None``) or per group of ``group_size``
    input columns. Layers whose columns the group size does not divide are quantised per channel
    and listed in the pass figures."""
    name = "quantize_rtn"
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "float32"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise PassError(f"quantize_rtn: bits must be an integer in 2..8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise PassError(f"quantize_rtn: group_size must be a positive integer or None, got {self.group_size!r}")
        if self.scale_dtype not in ("float32", "float16"):
            raise PassError(f"quantize_rtn: scale_dtype must be float32 or float16, got {self.scale_dtype!r}")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        done, per_channel = {}, []
        for node in self.select(graph):
            w = node.input("weight")
            if w.name in done or not isinstance(w.encoding, Dense) or not w.dtype.is_float:
                continue
            _, cols = rows_cols(w.shape)
            gs = self.group_size
            if gs is not None and cols % gs:
                per_channel.append(node.name)
                gs = None
            enc = IntQuant.quantize(w.encoding.data, self.bits, group_size=gs, symmetric=self.symmetric,
                                    scale_dtype=getattr(torch, self.scale_dtype))
            graph.set_encoding(w.name, enc)
            done[w.name] = enc.describe()
        ctx.record("layers", len(done))
        if per_channel:
            ctx.record("per_channel_fallback", per_channel)
        return graph

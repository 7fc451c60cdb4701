"""Fixing a graph's sizes: the pass a backend that builds fixed-size hardware asks for before
lowering (``Backend.prepare``: the hls backend).

    >>> SpecializeShapes(dims={"seq": 128}, shapes={"ids": [2, 128]})(graph)
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import GraphError
from ..ir.simplify import static_form
from ..ir.specialize import bind_symbols
from .base import Pass, PassContext, PassError, register_pass


@register_pass
@dataclass
class SpecializeShapes(Pass):
    """Every dimension symbol fixed (``dims`` first, then read off ``shapes``: input name ->
    shape), and what only the sizes made constant folded away (:func:`nnforge.ir.simplify
    .static_form`). Records the sizes as its ``symbols`` figure, which the pipeline hands to the
    backend (``LowerContext.symbols``)."""
    name = "specialize_shapes"
    exact = True
    keeps_signature = False
    dims: dict | None = None
    shapes: dict | None = None

    def __post_init__(self):
        for key in ("dims", "shapes"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, dict):
                raise PassError(f"{self.name}: {key} must be a table of name = size(s), got {value!r}")

    def run(self, graph, ctx: PassContext):
        try:
            env = bind_symbols(graph, self.dims, self.shapes)
            static = static_form(graph, env)
        except GraphError as e:
            raise PassError(f"{self.name}: every dimension must be fixed: {e} (give sizes with the target "
                            "option dims, e.g. with_options(dims={'seq': 128}))") from None
        ctx.record("symbols", dict(env))
        return static

"""An IR graph as a ``torch.nn.Module`` that torch.export can trace: every node runs through its op's
reference kernel (the interpreter's dispatch), every encoded weight is a submodule of integer
buffers that decodes itself in ``forward`` (see :mod:`.weights`).

Dimension symbols are bound from the inputs' sizes on every call, as the interpreter binds them.

    >>> module, fallbacks = GraphModule.build(graph)
    >>> module(x)      # == nnforge.ir.run_graph(graph, [x]) (same float operations on the CPU)
"""
from __future__ import annotations

import torch

from ...ir import Graph, symbolic as sym
from ...ir.ops import RunContext, get_op
from ..base import Fallback
from .weights import weight_module


class GraphModule(torch.nn.Module):
    """Runs ``graph`` node by node with the registry's reference kernels, in fp32."""

    def __init__(self, graph: Graph, fallbacks: list[Fallback]):
        super().__init__()
        self.graph = graph
        self.weight_slots: dict[str, str] = {}            # weight name -> submodule name
        self.decoders = torch.nn.ModuleDict()
        used = {v.name for n in graph.nodes for v in n.inputs if v is not None and v.is_weight}
        used |= {v.name for v in graph.outputs if v.is_weight}
        for i, name in enumerate(w for w in graph.weights if w in used):
            slot = f"w{i}"
            self.weight_slots[name] = slot
            self.decoders[slot] = weight_module(graph.weights[name].encoding, name, fallbacks)
        # the inputs' symbolic axes, bound from the actual sizes on every call
        self.symbol_axes = [(i, axis, d) for i, v in enumerate(graph.inputs) for axis, d in enumerate(v.shape)
                            if isinstance(d, str) and sym.is_symbol(d)]

    @classmethod
    def build(cls, graph: Graph) -> tuple["GraphModule", list[Fallback]]:
        """The module and the fallbacks its weights took."""
        fallbacks: list[Fallback] = []
        return cls(graph, fallbacks).eval(), fallbacks

    def forward(self, *inputs):
        g = self.graph
        env = {}
        for i, axis, d in self.symbol_axes:
            env.setdefault(d, inputs[i].shape[axis])
        ctx = RunContext(env=env, float_dtype=torch.float32)
        vals = {v: (x.to(torch.float32) if x.is_floating_point() else x) for v, x in zip(g.inputs, inputs)}
        weights: dict[str, torch.Tensor] = {}

        def weight(name):
            if name not in weights:
                weights[name] = self.decoders[self.weight_slots[name]]()
            return weights[name]

        for node in g.nodes:
            args = [None if v is None else weight(v.name) if v.is_weight else vals[v] for v in node.inputs]
            outs = get_op(node.op).run(ctx, args, node.attrs)
            for o, t in zip(node.outputs, outs):
                vals[o] = t
        outs = tuple(weight(v.name) if v.is_weight else vals[v] for v in g.outputs)
        return outs[0] if len(outs) == 1 else outs


__all__ = ["GraphModule"]

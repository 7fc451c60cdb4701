"""An IR graph as a ``torch.nn.Module`` that torch.export can trace: every node runs through its op's
reference kernel (the interpreter's dispatch; :mod:`.linalg_kernels` for the few torch-mlir cannot
lower to linalg), every encoded weight is a submodule of integer
buffers that decodes itself in ``forward`` (see :mod:`.weights`).

Dimension symbols are bound from the inputs' sizes on every call, as the interpreter binds them.

    >>> module, fallbacks = GraphModule.build(graph, target)
    >>> module(x)      # == nnforge.ir.run_graph(graph, [x]) (same float operations on the CPU)
"""
from __future__ import annotations

import torch
from torch.fx.traceback import annotate

from ...ir import Graph, WEIGHT_OPS, symbolic as sym
from ...ir.ops import WEIGHT_SLOT, RunContext, get_op
from ..base import Fallback
from .linalg_kernels import KERNELS, MULTI_OUTPUT, Hadamard
from .weights import Site, weight_module

# The keys under which every traced op carries the IR node it came from (torch.export keeps them in
# each FX node's meta["custom"]), so that a failure further down can name the node.
NODE_KEY, OP_KEY = "nnforge_node", "nnforge_op"


def layer_ops(graph: Graph) -> dict[str, str]:
    """Weight name -> the op of the first layer (linear, matmul, conv, embedding) reading it as its
    weight; weights only other ops read (biases, norm parameters, constants) are not in it."""
    ops: dict[str, str] = {}
    for n in graph.nodes:
        w = n.inputs[WEIGHT_SLOT] if n.op in WEIGHT_OPS and len(n.inputs) > WEIGHT_SLOT else None
        if w is not None and w.is_weight:
            ops.setdefault(w.name, n.op)
    return ops


class GraphModule(torch.nn.Module):
    """Runs ``graph`` node by node with the registry's reference kernels, in fp32."""

    def __init__(self, graph: Graph, target, fallbacks: list[Fallback]):
        super().__init__()
        self.graph = graph
        self.weight_slots: dict[str, str] = {}            # weight name -> submodule name
        self.decoders = torch.nn.ModuleDict()
        used = {v.name for n in graph.nodes for v in n.inputs if v is not None and v.is_weight}
        used |= {v.name for v in graph.outputs if v.is_weight}
        layers = layer_ops(graph)
        for i, name in enumerate(w for w in graph.weights if w in used):
            slot = f"w{i}"
            self.weight_slots[name] = slot
            self.decoders[slot] = weight_module(graph.weights[name].encoding, name,
                                                Site(layers.get(name), target, fallbacks))
        self.hadamard = Hadamard(n.attrs["block"] for n in graph.nodes if n.op == "hadamard")
        # the inputs' symbolic axes, bound from the actual sizes on every call
        self.symbol_axes = [(i, axis, d) for i, v in enumerate(graph.inputs) for axis, d in enumerate(v.shape)
                            if isinstance(d, str) and sym.is_symbol(d)]

    @classmethod
    def build(cls, graph: Graph, target=None) -> tuple["GraphModule", list[Fallback]]:
        """The module for ``target`` (what the capability table's checks read) and the fallbacks
        its weights took."""
        fallbacks: list[Fallback] = []
        return cls(graph, target, fallbacks).eval(), fallbacks

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
            with annotate({NODE_KEY: node.name, OP_KEY: node.op}):
                args = [None if v is None else weight(v.name) if v.is_weight else vals[v] for v in node.inputs]
                if node.op == "hadamard":
                    outs = [self.hadamard(*args, **node.attrs)]
                elif node.op in KERNELS:
                    outs = KERNELS[node.op](ctx, *args, **node.attrs)
                    outs = outs if node.op in MULTI_OUTPUT else [outs]
                else:
                    outs = get_op(node.op).run(ctx, args, node.attrs)
            for o, t in zip(node.outputs, outs):
                vals[o] = t
        outs = tuple(weight(v.name) if v.is_weight else vals[v] for v in g.outputs)
        return outs[0] if len(outs) == 1 else outs


__all__ = ["GraphModule", "NODE_KEY", "OP_KEY"]

"""The reference interpreter: runs any graph with torch on the CPU, decoding encoded weights.

It is the ground truth every pass and backend is checked against. Dispatch is per op through the
registry's reference kernels (like torch.fx's ``Interpreter.run_node``); values are freed after
their last use so large graphs run in bounded memory.

    >>> outs = Interpreter(graph).run(x)                       # fp32
    >>> outs = Interpreter(graph, dtype=torch.float64).run(x)  # fp64 on request
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import NnforgeError
from . import symbolic as sym
from .graph import Graph, GraphError, Node
from .ops import RunContext, get_op


class InterpreterError(NnforgeError, RuntimeError):
    """A node failed while running; the message names it."""


def _to_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, order="C"))      # 0-d stays 0-d
    if isinstance(x, (int, float, bool)):
        return torch.tensor(x)
    raise TypeError(f"input {name}: expected a torch tensor or numpy array, got {type(x).__name__}")


def bind_inputs(graph: Graph, inputs) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Match ``inputs`` (a sequence in graph-input order, or a mapping by name) to the graph's
    inputs, check dtypes and shapes, and bind every dimension symbol."""
    if isinstance(inputs, Mapping):
        missing = [v.name for v in graph.inputs if v.name not in inputs]
        extra = sorted(set(inputs) - {v.name for v in graph.inputs})
        if missing or extra:
            raise GraphError(f"graph {graph.name} inputs: missing {missing or 'none'}, unexpected {extra or 'none'}")
        inputs = [inputs[v.name] for v in graph.inputs]
    inputs = list(inputs)
    if len(inputs) != len(graph.inputs):
        raise GraphError(f"graph {graph.name} takes {len(graph.inputs)} inputs "
                         f"({', '.join(v.name for v in graph.inputs)}), got {len(inputs)}")
    tensors = [_to_tensor(x, v.name) for x, v in zip(inputs, graph.inputs)]
    env: dict[str, int] = {}
    for t, v in zip(tensors, graph.inputs):
        if t.dtype != v.dtype.torch_dtype:
            raise GraphError(f"input {v.name}: expected dtype {v.dtype}, got {t.dtype}")
        if t.dim() != v.type.rank:
            raise GraphError(f"input {v.name}: expected rank {v.type.rank} {v.type}, got shape {tuple(t.shape)}")
        for axis, (d, n) in enumerate(zip(v.shape, t.shape)):
            if sym.is_symbol(d):
                if env.setdefault(d, n) != n:
                    raise GraphError(f"input {v.name} axis {axis}: symbol {d} is {env[d]} elsewhere, got {n}")
    for t, v in zip(tensors, graph.inputs):
        for axis, (d, n) in enumerate(zip(v.shape, t.shape)):
            if not sym.is_symbol(d) and sym.evaluate(d, env) != n:
                raise GraphError(f"input {v.name} axis {axis}: expected size {d} = {sym.evaluate(d, env)}, got {n}")
    return tensors, env


# Decoded copies of encoded weights kept between runs, at most this many bytes: past it (a
# quantised model of a billion parameters decodes to gigabytes of float32) a weight is decoded
# where it is read and dropped after. A decode that copies nothing (a float32 Dense) is always kept.
DECODED_CACHE_BYTES = 1 << 30


class Interpreter:
    def __init__(self, graph: Graph, dtype: torch.dtype = torch.float32):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError("the reference interpreter computes in float32 or float64")
        self.graph = graph
        self.dtype = dtype
        self._weights: dict[str, torch.Tensor] = {}
        self._cached_bytes = 0
        self._last_use = self._compute_last_use()

    def _compute_last_use(self) -> dict:
        last: dict = {}
        for i, n in enumerate(self.graph.nodes):
            for v in n.inputs:
                if v is not None:
                    last[v] = i
        for v in self.graph.outputs:
            last[v] = len(self.graph.nodes)
        return last

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() and t.dtype != self.dtype else t

    def weight(self, name: str) -> torch.Tensor:
        """The decoded weight, in the interpreter's compute precision (cached up to
        DECODED_CACHE_BYTES of copies)."""
        hit = self._weights.get(name)
        if hit is not None:
            return hit
        enc = self.graph.weights[name].encoding
        try:
            t = self._cast(enc.decode(self.dtype if enc.dtype.is_float else None))
        except Exception as e:
            raise InterpreterError(f"weight {name} ({enc.describe()}) failed to decode: {e}") from e
        shared = any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                     for x in enc.tensors().values() if isinstance(x, torch.Tensor))
        size = 0 if shared else t.numel() * t.element_size()
        if self._cached_bytes + size <= DECODED_CACHE_BYTES:
            self._weights[name] = t
            self._cached_bytes += size
        return t

    def run(self, *inputs, capture: Callable[[Node, list[torch.Tensor]], None] | None = None) -> list[torch.Tensor]:
        """Run the graph. ``inputs`` positional (or one mapping by input name); ``capture`` is
        called with each node and its outputs, for tools that inspect intermediate values."""
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            inputs = inputs[0]
        tensors, env = bind_inputs(self.graph, inputs)
        ctx = RunContext(env=env, float_dtype=self.dtype)
        vals: dict = {v: self._cast(t) for v, t in zip(self.graph.inputs, tensors)}
        for i, node in enumerate(self.graph.nodes):
            args = []
            for v in node.inputs:
                if v is None:
                    args.append(None)
                elif v.is_weight:
                    args.append(self.weight(v.name))    # decoded on first use, then cached
                elif v in vals:
                    args.append(vals[v])
                else:
                    raise InterpreterError(f"node {node.name} ({node.op}) reads {v.name}, which no input or earlier "
                                           "node has computed (nodes out of order, or a dangling value: "
                                           "nnforge.ir.verify names the problem)")
            try:
                outs = get_op(node.op).run(ctx, args, node.attrs)
            except Exception as e:
                raise InterpreterError(f"node {node.name} ({node.op}) failed: {e}") from e
            if len(outs) != len(node.outputs):
                raise InterpreterError(f"node {node.name} ({node.op}) returned {len(outs)} outputs, "
                                       f"expected {len(node.outputs)}")
            for o, t in zip(node.outputs, outs):
                vals[o] = t
            if capture is not None:
                capture(node, outs)
            for v in node.inputs:
                if v is not None and not v.is_weight and self._last_use.get(v, -1) <= i and v in vals:
                    del vals[v]
        missing = [v.name for v in self.graph.outputs if not v.is_weight and v not in vals]
        if missing:
            raise InterpreterError(f"graph output(s) {', '.join(missing[:5])} of graph {self.graph.name} were never "
                                   "computed (nnforge.ir.verify names the problem)")
        return [self.weight(v.name) if v.is_weight else vals[v] for v in self.graph.outputs]


def run_graph(graph: Graph, inputs: Sequence | Mapping, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """One-shot convenience around :class:`Interpreter`."""
    interp = Interpreter(graph, dtype)
    return interp.run(inputs) if isinstance(inputs, Mapping) else interp.run(*inputs)

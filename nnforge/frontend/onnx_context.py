"""OnnxContext and DimVec, the state ONNX converters share; apart from onnx_import.py, which runs them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ir import Dense, Graph, Value, dtype as to_dtype, sanitize_name, symbolic as sym
from ..ir.ops import RunContext, get_op
from .errors import FrontendError

FOLD_LIMIT = 1 << 20        # constant-fold node outputs up to this many elements


@dataclass
class DimVec:
    """A small integer tensor (0-d or 1-d) whose entries are dims known while importing:
    the result of Shape() and arithmetic on it."""
    dims: list
    scalar: bool = False

    @property
    def static(self) -> bool:
        return all(isinstance(d, int) for d in self.dims)


class OnnxContext:
    """State shared by ONNX converters."""

    def __init__(self, graph: Graph, opset: int):
        self.g = graph
        self.opset = opset
        self.env: dict[str, object] = {}          # ONNX name -> Value | DimVec | None (absent optional)
        self.node = None
        self.code_bits: dict[str, int] = {}      # initializers read from 4-bit ONNX types

    # --- reading ------------------------------------------------------------------------------
    def has(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] != ""

    def raw(self, i: int):
        if not self.has(i):
            return None
        name = self.node.input[i]
        if name not in self.env:
            raise FrontendError(f"node {self.node.name or self.node.op_type} reads {name!r}, which is defined nowhere")
        return self.env[name]

    def value(self, i: int) -> Value | None:
        """Input ``i`` as an IR value (dim vectors with known entries become constants)."""
        v = self.raw(i)
        return v if v is None or isinstance(v, Value) else self.materialize(v, self.node.input[i])

    def materialize(self, v: "DimVec", name: str) -> Value:
        if v.static:
            return self.const(torch.tensor(v.dims[0] if v.scalar else v.dims, dtype=torch.int64))
        # A size used as data (a mask built from Range and a sequence length) is computed at run
        # time: arange(d, d + 1) holds d, for any expression the IR's dims can state.
        parts = [self.const(torch.tensor([d], dtype=torch.int64)) if isinstance(d, int) else
                 self.emit("arange", start=d, end=sym.add(d, 1), step=1, dtype="int64") for d in v.dims]
        out = parts[0] if len(parts) == 1 else self.emit("concat", *parts, axis=0)
        return self.emit("reshape", out, shape=[]) if v.scalar else out

    def const_tensor(self, i: int) -> torch.Tensor | None:
        """Input ``i`` as a tensor when it is a constant, else None."""
        v = self.raw(i)
        if isinstance(v, DimVec):
            return torch.tensor(v.dims[0] if v.scalar else v.dims, dtype=torch.int64) if v.static else None
        if isinstance(v, Value) and v.is_weight and isinstance(v.encoding, Dense):
            return v.encoding.data
        return None

    def dims(self, i: int) -> list | None:
        """Input ``i`` as a list of dims (from a dim vector or an integer constant), else None."""
        v = self.raw(i)
        if isinstance(v, DimVec):
            return list(v.dims)
        t = self.const_tensor(i)
        if t is not None and not t.is_floating_point() and t.dim() <= 1:
            return [int(x) for x in t.reshape(-1).tolist()]
        return None

    def attr(self, name: str, default=None):
        from onnx import helper
        for a in self.node.attribute:
            if a.name == name:
                v = helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    # --- emitting -----------------------------------------------------------------------------
    def const(self, t: torch.Tensor, base: str = "const") -> Value:
        return self.g.add_weight(self.g.fresh_name(base), Dense(t))

    def emit(self, op: str, *inputs, **attrs) -> Value:
        """Add an IR node; if every input is a constant, fold it into a constant instead."""
        base = self.node.name or self.node.output[0] or self.node.op_type
        name = self.g.fresh_name(sanitize_name(base), node=True)
        meta = {"source_op": self.node.op_type}
        if self.node.name:
            meta["onnx_node"] = self.node.name
        ins = [v for v in inputs if v is not None]
        if ins and all(v.is_weight and isinstance(v.encoding, Dense) for v in ins):
            opdef = get_op(op)
            attrs_n = opdef.check_attrs(attrs, where=f"node {name} ({op})")
            t = opdef.infer_types([None if v is None else v.type for v in inputs], attrs_n, f"node {name} ({op})")[0]
            if t.is_static and math.prod(t.shape) <= FOLD_LIMIT:
                args = [None if v is None else v.encoding.data for v in inputs]
                out = opdef.run(RunContext(), args, attrs_n)[0]
                return self.const(out.to(t.dtype.torch_dtype), f"{name}_const")
        return self.g.add_node(op, inputs, attrs, name=name, output_names=[self.g.fresh_name(name)], meta=meta).output

    def cast(self, v: Value, dt) -> Value:
        dt = to_dtype(dt)
        return v if v.dtype == dt else self.emit("cast", v, dtype=dt)

"""TorchContext, the state torch converters share; apart from torch_export.py, which runs them."""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
import torch.fx

from ..ir import Dense, Graph, Value, dtype as to_dtype, symbolic as sym
from ..ir.types import TensorType
from .errors import FrontendError, UnsupportedError

Converter = Callable[["TorchContext", torch.fx.Node], Any]


def source_line(node: torch.fx.Node) -> str:
    """'file.py:93' of the innermost user frame that produced ``node``, if known."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not frames:
        return ""
    path, line = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def sympy_to_dim(expr, names: dict[str, str]) -> sym.Dim:
    """A torch/sympy size expression -> IR dim text, renaming symbols by ``names``."""
    import sympy
    out: dict[int, str] = {}
    stack = [(expr, False)]
    while stack:                                   # iterative post-order over the sympy tree
        e, ready = stack.pop()
        if e.is_Integer:
            out[id(e)] = str(int(e))
            continue
        if e.is_Symbol:
            out[id(e)] = names.get(e.name, e.name)
            continue
        if not ready:
            stack.append((e, True))
            stack += [(a, False) for a in e.args]
            continue
        args = [out[id(a)] for a in e.args]
        fname = type(e).__name__
        if isinstance(e, sympy.Add):
            out[id(e)] = "(" + " + ".join(args) + ")"
        elif isinstance(e, sympy.Mul):
            out[id(e)] = "(" + "*".join(args) + ")"
        elif isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 0:
            out[id(e)] = "(" + "*".join([args[0]] * int(e.exp)) + ")"
        elif fname == "FloorDiv":
            out[id(e)] = f"(({args[0]})//({args[1]}))"
        elif fname in ("Mod", "PythonMod"):
            out[id(e)] = f"(({args[0]}) % ({args[1]}))"
        elif fname in ("Max", "Min"):
            out[id(e)] = f"{fname.lower()}({', '.join(args)})"
        else:
            raise FrontendError(f"size expression {expr} uses {fname}, which nnforge dims cannot express")
    return sym.simplify(out[id(expr)])


class TorchContext:
    """State shared by converters while one ExportedProgram is translated."""

    def __init__(self, ep: torch.export.ExportedProgram, graph: Graph, sym_names: dict[str, str]):
        self.ep = ep
        self.g = graph
        self.sym_names = sym_names
        self.values: dict[torch.fx.Node, Any] = {}
        self.node: torch.fx.Node | None = None
        self._consts: dict[tuple, Value] = {}

    # --- reading fx arguments -------------------------------------------------------------------
    def meta(self, n):
        return n.meta.get("val") if isinstance(n, torch.fx.Node) else n

    def value(self, arg) -> Value:
        """The IR value of a tensor argument."""
        if isinstance(arg, torch.fx.Node):
            v = self.values.get(arg)
            if isinstance(v, Value):
                return v
            raise UnsupportedError(f"argument {arg.name} is not a tensor value")
        raise UnsupportedError(f"expected a tensor argument, got {arg!r}")

    def dim(self, d) -> sym.Dim:
        """An int / SymInt / fx node holding a SymInt -> IR dim."""
        if isinstance(d, torch.fx.Node):
            d = self.meta(d)
        if isinstance(d, torch.SymInt):
            return sympy_to_dim(d.node.expr, self.sym_names)
        if isinstance(d, int) and not isinstance(d, bool):
            return d
        raise UnsupportedError(f"expected an integer size, got {d!r}")

    def shape(self, n) -> tuple:
        """Shape of fx node ``n`` (from export's fake tensor) as IR dims."""
        return tuple(self.dim(d) for d in self.meta(n).shape)

    def type_of(self, n) -> TensorType:
        v = self.meta(n)
        return TensorType(to_dtype(v.dtype), tuple(self.dim(d) for d in v.shape))

    # --- emitting -------------------------------------------------------------------------------
    def emit(self, op: str, *inputs, name: str | None = None, **attrs) -> Value:
        n = self.node
        meta = {"source_op": str(n.target)} if n is not None else {}
        if n is not None:
            if source_line(n):
                meta["source"] = source_line(n)
            if module_path(n):
                meta["module"] = module_path(n)
        base = name or (n.name if n is not None else op)
        node_name = self.g.fresh_name(base, node=True)
        return self.g.add_node(op, inputs, attrs, name=node_name, output_names=[self.g.fresh_name(node_name)],
                               meta=meta).output

    def const(self, value, dt: torch.dtype) -> Value:
        """A constant weight: python scalars become 0-d tensors; equal scalars are shared."""
        if isinstance(value, torch.Tensor):
            return self.g.add_weight(self.g.fresh_name("const"), Dense(value.detach().clone()))
        key = (str(dt), repr(value))
        if key not in self._consts:
            t = torch.tensor(value, dtype=dt)
            self._consts[key] = self.g.add_weight(self.g.fresh_name("const"), Dense(t))
        return self._consts[key]

    def cast(self, v: Value, dt) -> Value:
        dt = to_dtype(dt)
        return v if v.dtype == dt else self.emit("cast", v, dtype=dt, name=f"{self.node.name}_cast")

    def operand(self, arg, dt: torch.dtype) -> Value:
        """A tensor or Python scalar operand, as a value of torch dtype ``dt``."""
        if isinstance(arg, torch.fx.Node) and isinstance(self.values.get(arg), Value):
            return self.cast(self.values[arg], dt)
        if isinstance(arg, (bool, int, float)):
            return self.const(arg, dt)
        if isinstance(arg, torch.fx.Node) and isinstance(self.meta(arg), (torch.SymInt, torch.SymFloat)):
            raise UnsupportedError(f"a tensor op reads the symbolic size {arg.name} as a value")
        raise UnsupportedError(f"unsupported operand {arg!r}")

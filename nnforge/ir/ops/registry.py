"""The op registry: each op's schema, shape/dtype rule and reference kernel, defined together.

Input slots are written ``"x"`` (required), ``"bias?"`` (optional: None or left off at the end)
and ``"xs*"`` (variadic, last, at least one). Attributes are typed; ``check_attrs`` fills defaults,
normalises values and rejects unknown names, so every node in a graph carries a complete,
canonical attribute dict. Kernels receive torch tensors and a :class:`RunContext`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ...registry import Registry
from .. import symbolic as sym
from ..dtypes import DType, dtype as _dtype
from ..errors import GraphError
from ..types import TensorType

REQUIRED = object()
ATTR_KINDS = ("int", "float", "bool", "str", "ints", "floats", "dims", "dim", "dtype", "scalar")


@dataclass(frozen=True)
class Attr:
    kind: str
    default: Any = REQUIRED
    choices: tuple | None = None

    def __post_init__(self):
        assert self.kind in ATTR_KINDS, self.kind


@dataclass
class RunContext:
    """What a reference kernel may need besides its inputs: the bound dimension symbols and the
    float type the interpreter computes in."""
    env: dict[str, int] = field(default_factory=dict)
    float_dtype: torch.dtype = torch.float32

    def dim(self, d) -> int:
        return sym.evaluate(d, self.env)

    def dims(self, ds) -> list[int]:
        return [d if isinstance(d, int) else sym.evaluate(d, self.env) for d in ds]

    def torch_dtype(self, dt: DType) -> torch.dtype:
        """Float types follow the interpreter's compute precision; others map directly."""
        return self.float_dtype if dt.kind == "float" else dt.torch_dtype


@dataclass
class OpDef:
    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Attr]
    infer: Callable[..., TensorType | list[TensorType]]
    ref: Callable[..., torch.Tensor | list[torch.Tensor]]
    doc: str = ""
    family: str = ""

    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].endswith("*")

    def slot_names(self) -> list[str]:
        return [s.rstrip("?*") for s in self.inputs]

    def slot_index(self, slot: str, n_inputs: int) -> int:
        names = self.slot_names()
        if slot not in names:
            raise KeyError(f"op {self.name} has no input slot {slot!r}; slots: {names}")
        i = names.index(slot)
        if i >= n_inputs:
            raise KeyError(f"input slot {slot!r} of {self.name} is absent")
        return i

    def check_arity(self, n: int, where: str) -> None:
        required = sum(1 for s in self.inputs if not s.endswith(("?", "*")))
        if self.variadic:
            ok = n >= len(self.inputs)
        else:
            ok = required <= n <= len(self.inputs)
        if not ok:
            want = f"at least {len(self.inputs)}" if self.variadic else (
                f"{required}" if required == len(self.inputs) else f"{required} to {len(self.inputs)}")
            raise GraphError(f"{where}: takes {want} inputs ({', '.join(self.inputs)}), got {n}")

    def check_attrs(self, attrs: dict, where: str) -> dict:
        unknown = sorted(set(attrs) - set(self.attrs))
        if unknown:
            raise GraphError(f"{where}: unknown attribute(s) {', '.join(unknown)}; "
                             f"{self.name} takes: {', '.join(self.attrs) or 'none'}")
        out = {}
        for key, spec in self.attrs.items():
            if key in attrs:
                out[key] = _normalize_attr(attrs[key], spec, f"{where}: attribute {key}")
            elif spec.default is REQUIRED:
                raise GraphError(f"{where}: missing required attribute {key} ({spec.kind})")
            elif spec.default is None:
                out[key] = None
            else:
                out[key] = _normalize_attr(spec.default, spec, f"{where}: default of attribute {key}")
        return out

    def infer_types(self, types: list[TensorType | None], attrs: dict, where: str) -> list[TensorType]:
        self.check_arity(len(types), where)
        for slot, t in zip(self._slots_for(len(types)), types):
            if t is None and not slot.endswith("?"):
                raise GraphError(f"{where}: required input {slot.rstrip('*')} is missing")
        try:
            out = self.infer(*types, **attrs)
        except (GraphError, sym.DimError, ValueError, TypeError, IndexError, ZeroDivisionError) as e:
            raise GraphError(f"{where}: {e}") from None
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def _slots_for(self, n: int) -> list[str]:
        if self.variadic:
            return list(self.inputs[:-1]) + [self.inputs[-1]] * (n - len(self.inputs) + 1)
        return list(self.inputs[:n])

    def run(self, ctx: RunContext, inputs: list, attrs: dict) -> list[torch.Tensor]:
        out = self.ref(ctx, *inputs, **attrs)
        return list(out) if isinstance(out, (list, tuple)) else [out]


def _normalize_attr(v, spec: Attr, where: str):
    k = spec.kind
    if v is None and spec.default is None:
        return None
    try:
        if k == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError
            out = int(v)
        elif k == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError
            out = float(v)
        elif k == "bool":
            if not isinstance(v, bool):
                raise TypeError
            out = v
        elif k == "str":
            if not isinstance(v, str):
                raise TypeError
            out = v
        elif k == "scalar":
            if not isinstance(v, (bool, int, float)):
                raise TypeError
            out = v
        elif k == "ints":
            if not isinstance(v, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in v):
                raise TypeError
            out = [int(i) for i in v]
        elif k == "floats":
            if not isinstance(v, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, (int, float)) for i in v):
                raise TypeError
            out = [float(i) for i in v]
        elif k == "dims":
            if not isinstance(v, (list, tuple)):
                raise TypeError
            out = [_norm_dim(d) for d in v]
        elif k == "dim":
            out = _norm_dim(v)
        else:  # dtype
            out = _dtype(v)
    except TypeError:
        raise GraphError(f"{where} must be of kind {k}, got {v!r}") from None
    except sym.DimError as e:
        raise GraphError(f"{where}: {e}") from None
    if spec.choices is not None and out not in spec.choices:
        raise GraphError(f"{where} must be one of {', '.join(map(str, spec.choices))}, got {out!r}")
    return out


def _norm_dim(d):
    if isinstance(d, bool):
        raise TypeError
    if isinstance(d, int):
        return d          # negative sentinels (-1 in reshape) are checked by the op itself
    if isinstance(d, str):
        return sym.simplify(d)
    raise TypeError


OPS: Registry[OpDef] = Registry("op")


def defop(name: str, inputs, attrs=None, *, infer, ref, doc: str = "", family: str = "") -> OpDef:
    """Define an op and enter it in ``OPS`` under ``name`` (a second op of that name is refused)."""
    return OPS.register(name)(OpDef(name, tuple(inputs), dict(attrs or {}), infer, ref, doc, family))


def get_op(name: str) -> OpDef:
    """The op called ``name``; an unknown name is a GraphError listing the known ops."""
    return OPS.lookup(name, GraphError)


# --- shared shape helpers ----------------------------------------------------------------------

def broadcast_dim(a, b):
    if sym.equal(a, b) or b == 1:
        return a
    if a == 1:
        return b
    if isinstance(a, int) and isinstance(b, int):
        raise ValueError(f"cannot broadcast dimensions {a} and {b}")
    # Undecidable statically (a symbol against another): valid broadcasting yields the larger.
    return sym.simplify(f"max({a}, {b})")


def broadcast_shapes(*shapes) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        d = 1
        for s in shapes:
            j = i - (rank - len(s))
            if j >= 0:
                d = broadcast_dim(d, s[j])
        out.append(d)
    return tuple(out)


def norm_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


def same_dtype(*types: TensorType) -> DType:
    dts = {t.dtype for t in types if t is not None}
    if len(dts) > 1:
        raise TypeError(f"inputs must share one dtype, got {', '.join(sorted(d.name for d in dts))}")
    return dts.pop()


def numel_static(shape) -> int | None:
    return math.prod(shape) if all(isinstance(d, int) for d in shape) else None

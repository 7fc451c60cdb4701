"""Mask logic for the hls backend: comparisons, and / or / not, where and casts on int / bool /
activation values (template ``nf::ewise`` in ``nnforge/hls/nf_logic.h``), with their lowering rules.

Operands are raw integers (act: value * 2^F, int: the integer, bool: 0/1). A constant operand is
placed in weight memory as int32 raw values at the format it is compared or selected in; float
constants saturate there (finfo(float32).min becomes the activation minimum, -2^(act_int-1)), and
so do the values they are compared with, so a mask test such as ``scores == finfo.min`` keeps its
meaning in fixed point.

    >>> LOWERINGS["eq"](plan, node, "n_eq")       # [Ewise(op="eq", ...)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..base import BackendError
from . import emulate as E
from .layers import Layer, broadcast_strides, pad4, struct
from .project import CTYPES, LOWERINGS, OPERAND_RULES, _dense, value_kind
from .routing import gather_axis, take_rows
from .weights import WeightMemory

COMPARE = {"eq": "OP_EQ", "ne": "OP_NE", "lt": "OP_LT", "le": "OP_LE", "gt": "OP_GT", "ge": "OP_GE"}
OPS = {**COMPARE, "and": "OP_AND", "or": "OP_OR", "not": "OP_NOT", "where": "OP_WHERE", "cast": "OP_CAST",
       "trunc": "OP_TRUNC", "min": "OP_MIN", "max": "OP_MAX"}
# ops whose output is one of their inputs' elements, so its bound is theirs (see int_bound)
SAME_ELEMENTS = {"reshape", "permute", "slice", "expand", "concat", "cast", "gather_elements", "index", "index_put",
                 "minimum", "maximum", "where"}


@dataclass
class Ewise(Layer):
    """One nf::ewise call: up to three operands (value or constant), broadcast to ``out_shape``."""
    op: str = "eq"
    shapes: list = field(default_factory=list)      # operand shapes
    kinds: list = field(default_factory=list)       # operand kinds ("act" | "int" | "bool")
    consts: list = field(default_factory=list)      # raw int array per operand, or None (a value)
    out_shape: tuple = ()
    out_kind: str = "bool"
    shift: int = 0
    offs: list = field(default_factory=list)

    def place(self, mem: WeightMemory, act: E.Fixed) -> None:
        self.offs = [mem.add_i32(c) if c is not None else 0 for c in self.consts]

    def config(self):
        d, _ = pad4(self.out_shape)
        fields = [("unsigned", f"d{i}", d[i]) for i in range(4)]
        for k, tag in enumerate("abc"):
            shape = self.shapes[k] if k < len(self.shapes) else ()
            _, s = pad4(self.out_shape, broadcast_strides(shape, self.out_shape))
            fields += [("unsigned", f"{tag}_s{i}", s[i]) for i in range(4)]
        for k, tag in enumerate("abc"):
            const = k < len(self.consts) and self.consts[k] is not None
            fields += [("bool", f"{tag}_const", const), ("unsigned long", f"{tag}_off", self.offs[k] if const else 0)]
        fields.append(("int", "shift", self.shift))
        return struct(self.cfg, f"{self.node}: {self.op} {[list(s) for s in self.shapes]} -> {list(self.out_shape)}",
                      fields)

    def call(self, ids):
        args, types, it = [], [], iter(self.inputs)
        for k in range(3):
            if k < len(self.consts) and self.consts[k] is None:
                args.append(ids[next(it)])
                types.append(CTYPES[self.kinds[k]])
            else:
                args.append("(const act_t *)0")
                types.append("act_t")
        return (f"nf::ewise<{', '.join(types)}, {CTYPES[self.out_kind]}, {self.cfg}, nf::{OPS[self.op]}>"
                f"({', '.join(args)}, {ids[self.output]}, wmem);")

    def emulate(self, env, fmt):
        it, vals = iter(self.inputs), []
        for k, shape in enumerate(self.shapes):
            v = self.consts[k] if self.consts[k] is not None else env[next(it)]
            vals.append(np.asarray(v, np.int64).reshape(shape))
        return E.ewise(self.op, vals, self.out_shape, self.shift, self.out_kind, fmt)


def _operand(plan, v, kind: str, node):
    """(value name or None, raw constant or None) of operand ``v`` read at ``kind``'s format."""
    if not v.is_weight:
        return v.name, None
    t = _dense(v, f"node {node.name} ({v.name})")
    act = plan.opts.act
    if kind == "act":
        return None, E.from_float(t.numpy(), act)
    return None, np.clip(np.floor(t.numpy() + 0.5), *E.INT32).astype(np.int64)


def _layer(plan, node, name, op, operands, kinds, out_kind, shift=0):
    out = node.output
    if len(out.shape) > 4:
        raise BackendError(f"node {node.name} ({node.op}): rank {len(out.shape)} > 4")
    pairs = [_operand(plan, v, k, node) for v, k in zip(operands, kinds)]
    if all(c is not None for _, c in pairs):
        raise BackendError(f"node {node.name} ({node.op}): every operand is a constant (fold it before lowering)")
    return [Ewise(name, node.name, [n for n, _ in pairs if n is not None], out.name, op=op,
                  shapes=[tuple(v.shape) for v in operands], kinds=kinds, consts=[c for _, c in pairs],
                  out_shape=tuple(out.shape), out_kind=out_kind, shift=shift)]


def _compare(op):
    def rule(plan, node, name):
        a, b = node.inputs
        kinds = {value_kind(v) for v in (a, b) if not v.is_weight}       # a constant takes the other's format
        if len(kinds) > 1:
            raise BackendError(f"node {node.name} ({op}): operands {a.dtype.name} and {b.dtype.name} differ")
        kind = kinds.pop() if kinds else "act"
        return _layer(plan, node, name, op, [a, b], [kind, kind], "bool")
    return rule


def _logic(op):
    def rule(plan, node, name):
        return _layer(plan, node, name, op, list(node.inputs), ["bool"] * len(node.inputs), "bool")
    return rule


@LOWERINGS.register("where")
def _where(plan, node, name):
    c, a, b = node.inputs
    k = value_kind(node.output)
    return _layer(plan, node, name, "where", [c, a, b], ["bool", k, k], k)


def int_bound(v) -> int | None:
    """The largest magnitude an int / bool value can hold where the graph proves it: constants,
    booleans, top-k indices (below their axis' size) and what only moves or picks such elements;
    None where it proves nothing (a graph input, a sum)."""
    todo, seen, bound = [v], set(), 0
    while todo:
        u = todo.pop()
        if u is None or u.name in seen:
            continue
        seen.add(u.name)
        p = u.producer
        if u.is_weight:
            bound = max(bound, int(u.encoding.decode(torch.float64).abs().max().item()) if u.encoding.numel else 0)
        elif value_kind(u) == "bool":
            bound = max(bound, 1)
        elif p is not None and p.op == "topk_indices":
            bound = max(bound, p.inputs[0].shape[p.attrs["axis"] % len(p.inputs[0].shape)] - 1)
        elif p is not None and p.op in SAME_ELEMENTS and value_kind(u) == "int":
            data = p.inputs[1:] if p.op == "where" else p.inputs[:2] if p.op == "index_put" else \
                p.inputs[:1] if p.op in ("gather_elements", "index") else p.inputs
            if p.op == "cast" and value_kind(p.inputs[0]) == "act":
                return None
            todo.extend(data)
        else:
            return None
    return bound


def check_exact_in_act(plan, node, v) -> None:
    """An int value read as an activation must fit its integer part, or indices computed from it
    (the routing of a mixture-of-experts layer) would saturate into other indices."""
    top, b = (1 << (plan.opts.act_int - 1)) - 1, int_bound(v)
    if b is not None and b > top:
        raise BackendError(f"node {node.name} ({node.op}): integer {v.name} reaches {b}, beyond the {top} that "
                           f"act_int = {plan.opts.act_int} holds exactly; raise the target option act_int to at "
                           f"least {b.bit_length() + 1} (or use shorter inputs)")


def int_as_act(plan, node, v, name: str, layers: list, tag: str):
    """``v`` itself when it is an activation or a constant; an int / bool value is cast into the
    activation format first (a temporary, its layer appended to ``layers``)."""
    if v.is_weight or value_kind(v) == "act":
        return v
    check_exact_in_act(plan, node, v)
    tmp = plan.temp(f"{node.name}.{tag}.as_act", f"t_{name[2:]}_{tag}", v.shape)
    layers.append(Ewise(f"{name}_{tag}", node.name, [v.name], tmp, op="cast", shapes=[tuple(v.shape)],
                        kinds=[value_kind(v)], consts=[None], out_shape=tuple(v.shape), out_kind="act",
                        shift=plan.opts.act.frac))
    return _Named(tmp, tuple(v.shape))


def _int_operands_as_act(plan, node, a, b, name: str, layers: list):
    # int / int is a float division in the IR: integers enter the divider as activations
    return tuple(int_as_act(plan, node, v, name, layers, tag) for v, tag in ((a, "a"), (b, "b")))


OPERAND_RULES["div"] = _int_operands_as_act


@dataclass(frozen=True)
class _Named:
    """A temporary value where a rule expects an IR value: its name and shape."""
    name: str
    shape: tuple
    is_weight: bool = False


@LOWERINGS.register("cast")
def _cast(plan, node, name):
    x, out = node.inputs[0], node.output
    src, dst = value_kind(x), value_kind(out)
    op = "cast"
    if dst == "bool" or src == dst or (src, dst) == ("bool", "int"):
        shift = 0
    elif dst == "act" and src in ("int", "bool"):
        check_exact_in_act(plan, node, x)
        shift = plan.opts.act.frac
    elif dst == "int" and src == "act":          # torch's float -> int: toward zero
        op, shift = "trunc", plan.opts.act.frac
    else:
        raise BackendError(f"node {node.name} (cast): {x.dtype.name} -> {out.dtype.name} is not supported by the hls "
                           f"backend (it casts to bool, bool to int, between int and float, and bool to float)")
    return _layer(plan, node, name, op, [x], [src], dst, shift)


def _extremum(op):
    def rule(plan, node, name):
        a, b = node.inputs
        kind = value_kind(node.output)
        if kind == "bool" or any(value_kind(v) != kind for v in (a, b) if not v.is_weight):
            raise BackendError(f"node {node.name} ({node.op}): operands {a.dtype.name} and {b.dtype.name}; the hls "
                               f"backend takes two ints or two activations")
        return _layer(plan, node, name, op, [a, b], [kind, kind], kind)
    return rule


LOWERINGS.register("minimum")(_extremum("min"))
LOWERINGS.register("maximum")(_extremum("max"))


for _op in COMPARE:
    LOWERINGS.register(_op)(_compare(_op))
for _op in ("and", "or", "not"):
    LOWERINGS.register(_op)(_logic(_op))


@dataclass
class Reduce(Layer):
    """nf::reduce: sum (act / int), mean (act) or any (bool) over the middle of [outer, n, inner]."""
    op: str = "sum"
    outer: int = 1
    n: int = 1
    inner: int = 1
    in_kind: str = "act"
    out_kind: str = "act"

    def config(self):
        return struct(self.cfg, f"{self.node}: reduce {self.op} over {self.n} ([{self.outer}, {self.n}, {self.inner}])",
                      [("unsigned", "outer", self.outer), ("unsigned", "n", self.n), ("unsigned", "inner", self.inner)])

    def call(self, ids):
        op = {"sum": "nf::RED_SUM", "mean": "nf::RED_MEAN", "any": "nf::RED_ANY"}[self.op]
        return (f"nf::reduce<{CTYPES[self.in_kind]}, {CTYPES[self.out_kind]}, {self.cfg}, {op}>"
                f"({ids[self.inputs[0]]}, {ids[self.output]});")

    def emulate(self, env, fmt):
        x = np.asarray(env[self.inputs[0]], np.int64).reshape(self.outer, self.n, self.inner)
        if self.op == "any":
            return (x != 0).any(axis=1).astype(np.int64)
        s = x.sum(axis=1)
        if self.op == "mean":
            s = E.mean_round(s, self.n)
        return np.clip(s, *E.INT32).astype(np.int64) if self.out_kind == "int" else E.saturate(s, fmt)


def _reduce(op):
    def rule(plan, node, name):
        x = node.inputs[0]
        rank = len(x.shape)
        axes = sorted({a % rank for a in node.attrs["axes"]}) if node.attrs.get("axes") else list(range(rank))
        if axes != list(range(axes[0], axes[-1] + 1)):
            raise BackendError(f"node {node.name} (reduce_{op}): axes {axes} are not contiguous")
        k_in, k_out = value_kind(x), value_kind(node.output)
        want = {"sum": ({"act", "int"}, k_in), "mean": ({"act"}, "act"), "any": ({"bool"}, "bool")}[op]
        if k_in not in want[0] or k_out != want[1]:
            raise BackendError(f"node {node.name} (reduce_{op}): {x.dtype.name} -> {node.output.dtype.name} is not "
                               f"supported by the hls backend")
        n = math.prod(x.shape[axes[0]:axes[-1] + 1])
        if op != "any" and k_in == "act" and plan.opts.act_width + math.ceil(math.log2(max(n, 2))) > 62:
            raise BackendError(f"node {node.name} (reduce_{op}): a 64-bit sum of {n} activations may overflow")
        return [Reduce(name, node.name, [x.name], node.output.name, op=op, outer=math.prod(x.shape[:axes[0]]), n=n,
                       inner=math.prod(x.shape[axes[-1] + 1:]), in_kind=k_in, out_kind=k_out)]
    return rule


@dataclass
class Sqrt(Layer):
    """nf::sqrt_fixed: round-half-up square root in the activation format (x <= 0 -> 0)."""
    n: int = 0

    def config(self):
        return ""

    def call(self, ids):
        return f"nf::sqrt_fixed<act_t, {self.n}>({ids[self.inputs[0]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        return E.sqrt_fixed(env[self.inputs[0]], fmt)


@LOWERINGS.register("sqrt")
def _sqrt(plan, node, name):
    if plan.opts.act_width + plan.opts.act.frac + 2 > 64:
        raise BackendError(f"node {node.name} (sqrt): raw * 2^(F+2) needs act_width + F + 2 <= 64 bits")
    return [Sqrt(name, node.name, [node.inputs[0].name], node.output.name, n=math.prod(node.output.shape))]


LOWERINGS.register("reduce_sum")(_reduce("sum"))
LOWERINGS.register("reduce_mean")(_reduce("mean"))
LOWERINGS.register("reduce_any")(_reduce("any"))


@dataclass
class Gather(Layer):
    """nf::gather: y[o] = x[offsets[o]] with a constant offset table (any element type)."""
    offsets: np.ndarray = None
    kind: str = "act"
    offsets_off: int = 0

    def place(self, mem: WeightMemory, act: E.Fixed) -> None:
        self.offsets_off = mem.add_i32(self.offsets)

    def config(self):
        return struct(self.cfg, f"{self.node}: gather {self.offsets.size} elements by a constant offset table",
                      [("unsigned", "n_out", self.offsets.size), ("unsigned long", "offsets_off", self.offsets_off)])

    def call(self, ids):
        return f"nf::gather<{CTYPES[self.kind]}, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]}, wmem);"

    def emulate(self, env, fmt):
        return np.asarray(env[self.inputs[0]]).reshape(-1)[self.offsets.reshape(-1)]


@LOWERINGS.register("index")
def _index(plan, node, name):
    x, *idx = node.inputs
    if len(idx) == 1 and idx[0] is not None and not idx[0].is_weight:
        return take_rows(plan, node, name)
    if not all(v is not None and v.is_weight for v in idx):
        raise BackendError(f"node {node.name} (index): the hls backend indexes with constant index tensors, or with "
                           f"one computed index tensor (x[i]); got {len(idx)} index tensors")
    flat = np.arange(math.prod(x.shape), dtype=np.int64).reshape(x.shape)
    offsets = flat[tuple(_dense(v, f"node {node.name} index").numpy().astype(np.int64) for v in idx)]
    return [Gather(name, node.name, [x.name], node.output.name, offsets=offsets.reshape(-1),
                   kind=value_kind(node.output))]


@LOWERINGS.register("gather_elements")
def _gather_elements(plan, node, name):
    x, idx = node.inputs
    if not idx.is_weight:
        return gather_axis(plan, node, name)
    axis = node.attrs["axis"] % len(x.shape)
    ind = _dense(idx, f"node {node.name} indices").numpy().astype(np.int64)
    # torch.gather: the output has the indices' shape, which may be smaller than x's off the axis
    flat = np.arange(math.prod(x.shape), dtype=np.int64).reshape(x.shape)
    flat = flat[tuple(slice(None) if d == axis else slice(0, n) for d, n in enumerate(ind.shape))]
    offsets = np.take_along_axis(flat, ind, axis)
    return [Gather(name, node.name, [x.name], node.output.name, offsets=offsets.reshape(-1),
                   kind=value_kind(node.output))]

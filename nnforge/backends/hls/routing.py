"""The routing ops of mixture-of-experts layers for the hls backend: top-k (and argsort), running
sums, floor, and gathers and scatters by indices the design computes (templates in
``nnforge/hls/nf_route.h``), with their lowering rules. Indices are int values, exact end to end;
what torch's router does in floating point (floor of a division, a histogram's bin) is exact here
while the integers fit the activation format, which :func:`.logic.check_exact_in_act` proves where
the graph allows.

Top-k ranks raw fixed-point values: scores that round to one value tie, and ties go to the lower
index (the reference's stable order), so a near-tie in float can pick another expert here.

    >>> LOWERINGS["topk_indices"](plan, node, "n_topk")     # [TopK(k=2, largest=True, ...)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass


from ..base import BackendError
from . import emulate as E
from .layers import Layer, broadcast_strides, pad4, row_major_strides, struct
from .project import CTYPES, LOWERINGS, value_kind


def _split(shape, axis: int) -> tuple[int, int, int]:
    """[outer, n, inner] of ``shape`` around ``axis``."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


@dataclass
class TopK(Layer):
    """nf::topk over the middle axis of [outer, n, inner]."""
    outer: int = 1
    n: int = 1
    inner: int = 1
    k: int = 1
    largest: bool = True
    kind: str = "act"

    def config(self):
        return struct(self.cfg, f"{self.node}: {'largest' if self.largest else 'smallest'} {self.k} of {self.n} "
                      f"([{self.outer}, {self.n}, {self.inner}])",
                      [("unsigned", "outer", self.outer), ("unsigned", "n", self.n), ("unsigned", "inner", self.inner),
                       ("unsigned", "k", self.k), ("bool", "largest", self.largest)])

    def call(self, ids):
        return f"nf::topk<{CTYPES[self.kind]}, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        return E.topk(env[self.inputs[0]], self.outer, self.n, self.inner, self.k, self.largest)


@dataclass
class Cumsum(Layer):
    """nf::cumsum over the middle axis of [outer, n, inner]."""
    outer: int = 1
    n: int = 1
    inner: int = 1
    kind: str = "act"

    def config(self):
        return struct(self.cfg, f"{self.node}: running sum over {self.n} ([{self.outer}, {self.n}, {self.inner}])",
                      [("unsigned", "outer", self.outer), ("unsigned", "n", self.n), ("unsigned", "inner", self.inner)])

    def call(self, ids):
        t = CTYPES[self.kind]
        return f"nf::cumsum<{t}, {t}, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        return E.cumsum(env[self.inputs[0]], self.outer, self.n, self.inner, self.kind, fmt)


@dataclass
class Floor(Layer):
    n: int = 0

    def config(self):
        return ""

    def call(self, ids):
        return f"nf::floor_fixed<act_t, {self.n}>({ids[self.inputs[0]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        return E.floor_fixed(env[self.inputs[0]], fmt)


@dataclass
class TakeRows(Layer):
    """nf::take_rows: x[idx] with one index tensor computed by the design."""
    n_idx: int = 1
    n_rows: int = 1
    row: int = 1
    kind: str = "act"

    def config(self):
        return struct(self.cfg, f"{self.node}: {self.n_idx} rows of {self.n_rows} by computed indices",
                      [("unsigned", "n_idx", self.n_idx), ("unsigned", "n_rows", self.n_rows), ("unsigned", "row", self.row)])

    def call(self, ids):
        return (f"nf::take_rows<{CTYPES[self.kind]}, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.inputs[1]]}, "
                f"{ids[self.output]});")

    def emulate(self, env, fmt):
        return E.take_rows(env[self.inputs[0]], env[self.inputs[1]], self.n_rows)


@dataclass
class GatherAxis(Layer):
    """nf::gather_axis: torch.gather with indices computed by the design."""
    shape: tuple = ()
    strides: tuple = ()
    axis: int = 0
    n_axis: int = 1
    kind: str = "act"

    def config(self):
        d, s = pad4(self.shape, self.strides)
        return struct(self.cfg, f"{self.node}: gather {list(self.shape)} along axis {self.axis} of {self.n_axis}",
                      [("unsigned", f"d{i}", d[i]) for i in range(4)] + [("unsigned", f"s{i}", s[i]) for i in range(4)]
                      + [("unsigned", "axis", self.axis + 4 - len(self.shape)), ("unsigned", "n_axis", self.n_axis)])

    def call(self, ids):
        return (f"nf::gather_axis<{CTYPES[self.kind]}, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.inputs[1]]}, "
                f"{ids[self.output]});")

    def emulate(self, env, fmt):
        return E.gather_axis(env[self.inputs[0]], env[self.inputs[1]], self.shape, self.strides, self.axis, self.n_axis)


@dataclass
class ScatterRows(Layer):
    """nf::scatter_rows: index_put with one index tensor computed by the design."""
    n_idx: int = 1
    n_rows: int = 1
    row: int = 1
    v_si: int = 0
    v_sc: int = 0
    accumulate: bool = False
    kind: str = "act"

    def config(self):
        return struct(self.cfg, f"{self.node}: {'add' if self.accumulate else 'put'} {self.n_idx} rows of "
                      f"{self.n_rows} by computed indices",
                      [("unsigned", "n_idx", self.n_idx), ("unsigned", "n_rows", self.n_rows), ("unsigned", "row", self.row),
                       ("unsigned", "v_si", self.v_si), ("unsigned", "v_sc", self.v_sc),
                       ("bool", "accumulate", self.accumulate)])

    def call(self, ids):
        x, v, idx = (ids[n] for n in self.inputs)
        return f"nf::scatter_rows<{CTYPES[self.kind]}, {self.cfg}>({x}, {v}, {idx}, {ids[self.output]});"

    def emulate(self, env, fmt):
        x, v, idx = (env[n] for n in self.inputs)
        return E.scatter_rows(x, v, idx, self.n_rows, self.row, self.v_si, self.v_sc, self.accumulate, self.kind, fmt)


@LOWERINGS.register("topk_indices")
def _topk(plan, node, name):
    x = node.inputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    outer, n, inner = _split(x.shape, axis)
    return [TopK(name, node.name, [x.name], node.output.name, outer=outer, n=n, inner=inner, k=node.output.shape[axis],
                 largest=bool(node.attrs["largest"]), kind=value_kind(x))]


@LOWERINGS.register("cumsum")
def _cumsum(plan, node, name):
    x = node.inputs[0]
    kind = value_kind(x)
    if kind == "bool":
        raise BackendError(f"node {node.name} (cumsum): bool input; cast it to an integer first")
    outer, n, inner = _split(x.shape, node.attrs["axis"] % len(x.shape))
    if kind == "act" and plan.opts.act_width + math.ceil(math.log2(max(n, 2))) > 62:
        raise BackendError(f"node {node.name} (cumsum): a 64-bit sum of {n} activations may overflow")
    return [Cumsum(name, node.name, [x.name], node.output.name, outer=outer, n=n, inner=inner, kind=kind)]


@LOWERINGS.register("floor")
def _floor(plan, node, name):
    return [Floor(name, node.name, [node.inputs[0].name], node.output.name, n=math.prod(node.output.shape))]


def take_rows(plan, node, name):
    """index(x, idx) with one index tensor the design computes."""
    x, idx = node.inputs
    return [TakeRows(name, node.name, [x.name, idx.name], node.output.name, n_idx=math.prod(idx.shape),
                     n_rows=x.shape[0], row=math.prod(x.shape[1:]), kind=value_kind(x))]


def gather_axis(plan, node, name):
    """gather_elements(x, idx, axis) with indices the design computes."""
    x, idx = node.inputs
    if len(x.shape) > 4:
        raise BackendError(f"node {node.name} (gather_elements): rank {len(x.shape)} > 4")
    axis = node.attrs["axis"] % len(x.shape)
    return [GatherAxis(name, node.name, [x.name, idx.name], node.output.name, shape=tuple(idx.shape),
                       strides=tuple(row_major_strides(x.shape)), axis=axis, n_axis=x.shape[axis], kind=value_kind(x))]


@LOWERINGS.register("index_put")
def _index_put(plan, node, name):
    x, values, *idx = node.inputs
    if len(idx) != 1 or idx[0] is None or len(idx[0].shape) != 1:
        raise BackendError(f"node {node.name} (index_put): the hls backend writes rows by one 1-D index tensor "
                           f"(x[i] = v); got {len(idx)} index tensor(s)")
    i, kind = idx[0], value_kind(x)
    target = (i.shape[0],) + tuple(x.shape[1:])
    vs = broadcast_strides(values.shape, target)
    row_vs, dense = vs[1:], row_major_strides(target[1:])
    if any(row_vs) and list(row_vs) != dense:
        raise BackendError(f"node {node.name} (index_put): values {list(values.shape)} broadcast to "
                           f"{list(target)} partly along a row; the hls backend takes whole rows or one value per index")
    v_sc = 1 if any(row_vs) else 0
    v_si = vs[0]
    return [ScatterRows(name, node.name, [x.name, values.name, i.name], node.output.name, n_idx=i.shape[0],
                        n_rows=x.shape[0], row=math.prod(x.shape[1:]), v_si=v_si, v_sc=v_sc,
                        accumulate=bool(node.attrs["accumulate"]), kind=kind)]

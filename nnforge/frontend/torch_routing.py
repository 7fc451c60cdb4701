"""Converters for the routing ops of mixture-of-experts layers: top-k and sort, histc, index_put
(which index_add and index_copy export to), and the grouped matmul transformers' experts run (``aten._grouped_mm`` or its opaque
fallback op). Every output keeps a static shape.

The grouped matmul multiplies row i of a [S, in] input (rows sorted by expert, ``offs`` holding each
expert's end row) by its expert's [in, out] weight. Which rows go to which expert is data, so it is
written out densely: every row through every expert's weight in one broadcast matmul, then each row
keeps the product of its own expert (rows past the last offset are zero, as the fallback leaves
them). That costs E times the grouped product's arithmetic and keeps shapes static on every
backend; a later grouped kernel can replace it without touching the routing around it.
"""
from __future__ import annotations

import torch
import torch.fx

from ..ir.ops.registry import broadcast_shapes
from .errors import UnsupportedError
from .torch_context import TorchContext
from .torch_ops import register

aten = torch.ops.aten


def _arg(n: torch.fx.Node, i: int, name: str, default=None):
    """Argument ``i`` (keyword ``name``) of ``n``, or ``default``."""
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _topk(cx: TorchContext, x, k, axis: int, largest: bool, name: str):
    """(values, indices) of the k best elements of ``x`` along ``axis``."""
    xv = cx.value(x)
    indices = cx.emit("topk_indices", xv, k=k, axis=axis, largest=largest, name=f"{name}_indices")
    values = cx.emit("gather_elements", xv, indices, axis=axis, name=f"{name}_values")
    return values, indices


@register(aten.topk.default)
def _topk_conv(cx, n):
    axis = _arg(n, 2, "dim", -1) % cx.meta(n.args[0]).dim()
    return _topk(cx, n.args[0], cx.dim(n.args[1]), axis, bool(_arg(n, 3, "largest", True)), n.name)


@register(aten.sort.default, aten.sort.stable)
def _sort(cx, n):
    if n.target == aten.sort.stable:           # (self, *, stable, dim, descending)
        dim, descending = n.kwargs.get("dim", -1), n.kwargs.get("descending", False)
    else:
        dim, descending = _arg(n, 1, "dim", -1), _arg(n, 2, "descending", False)
    x = n.args[0]
    axis = dim % max(cx.meta(x).dim(), 1)
    return _topk(cx, x, cx.shape(x)[axis], axis, bool(descending), n.name)


@register(aten.histc.default)
def _histc(cx, n):
    bins, lo, hi = _arg(n, 1, "bins", 100), _arg(n, 2, "min", 0), _arg(n, 3, "max", 0)
    if lo == hi:
        raise UnsupportedError("histc with min == max takes its range from the data; give the range explicitly")
    dt = cx.meta(n).dtype
    x = cx.emit("reshape", cx.cast(cx.value(n.args[0]), dt), shape=[-1], name=f"{n.name}_flat")
    # torch's bin rule: floor((x - min) * bins / (max - min)), with x == max in the last bin
    scaled = cx.emit("div", cx.emit("mul", cx.emit("sub", x, cx.const(lo, dt), name=f"{n.name}_shift"),
                                    cx.const(bins, dt), name=f"{n.name}_scale"),
                     cx.const(hi - lo, dt), name=f"{n.name}_width")
    bin_of = cx.emit("cast", cx.emit("floor", scaled, name=f"{n.name}_floor"), dtype=torch.int64,
                     name=f"{n.name}_bin")
    bin_of = cx.emit("minimum", bin_of, cx.const(bins - 1, torch.int64), name=f"{n.name}_last")
    inside = cx.emit("and", cx.emit("ge", x, cx.const(lo, dt), name=f"{n.name}_ge"),
                     cx.emit("le", x, cx.const(hi, dt), name=f"{n.name}_le"), name=f"{n.name}_inside")
    every_bin = cx.const(torch.arange(bins), torch.int64)
    hit = cx.emit("eq", cx.emit("reshape", bin_of, shape=[-1, 1], name=f"{n.name}_column"), every_bin,
                  name=f"{n.name}_onehot")
    hit = cx.emit("and", hit, cx.emit("reshape", inside, shape=[-1, 1], name=f"{n.name}_inside_column"),
                  name=f"{n.name}_counted")
    return cx.emit("reduce_sum", cx.emit("cast", hit, dtype=dt, name=f"{n.name}_ones"), axes=[0], keepdim=False)


def _index_put_after(cx: TorchContext, n, xv, values, indices: list, skipped: int, accumulate: bool):
    """index_put of ``indices`` on the axes after the first ``skipped`` ones (x[:, :, i] += v): those
    axes are brought to the front, where index_put indexes, and back."""
    if not skipped:
        return cx.emit("index_put", xv, values, *indices, accumulate=accumulate)
    rank, used = xv.type.rank, len(indices)
    perm = list(range(skipped, skipped + used)) + list(range(skipped)) + list(range(skipped + used, rank))
    back = [perm.index(i) for i in range(rank)]
    where = broadcast_shapes(*(i.shape for i in indices))
    # values broadcast to torch's indexed shape x[:skipped] + where + x[skipped+used:], then moved alike
    indexed = list(xv.shape[:skipped]) + list(where) + list(xv.shape[skipped + used:])
    values = cx.emit("expand", cx.emit("reshape", values, shape=[1] * (len(indexed) - values.type.rank)
                                       + list(values.shape), name=f"{n.name}_values_rank"),
                     shape=indexed, name=f"{n.name}_values")
    r = len(where)
    vperm = list(range(skipped, skipped + r)) + list(range(skipped)) + list(range(skipped + r, len(indexed)))
    moved = cx.emit("index_put", cx.emit("permute", xv, perm=perm, name=f"{n.name}_front"),
                    cx.emit("permute", values, perm=vperm, name=f"{n.name}_values_front"), *indices,
                    accumulate=accumulate, name=f"{n.name}_at_front")
    return cx.emit("permute", moved, perm=back)


@register(aten.index_put.default)
def _index_put(cx, n):
    x, indices, values = n.args[:3]
    indices = list(indices)
    while indices and indices[-1] is None:
        indices.pop()
    skipped = 0
    while skipped < len(indices) and indices[skipped] is None:
        skipped += 1
    if not indices or any(i is None for i in indices[skipped:]):
        raise UnsupportedError("index_put with None (whole) dimensions between its index tensors")
    xv = cx.value(x)
    return _index_put_after(cx, n, xv, cx.cast(cx.value(values), xv.dtype), [cx.value(i) for i in indices[skipped:]],
                            skipped, bool(_arg(n, 3, "accumulate", False)))


def _grouped_mm(cx: TorchContext, n, x, weight, offs):
    if offs is None or cx.meta(x).dim() != 2 or cx.meta(weight).dim() != 3:
        raise UnsupportedError("grouped matmul other than a [rows, in] input by [experts, in, out] weights "
                               "with offsets")
    xv, wv = cx.value(x), cx.value(weight)
    rows, cols = cx.shape(x)
    experts = cx.shape(weight)[0]
    ends = cx.cast(cx.value(offs), torch.int64)
    # expert of row i: how many experts end at or before it
    row = cx.emit("reshape", cx.emit("arange", start=0, end=rows, dtype=torch.int64, name=f"{n.name}_rows"),
                  shape=[rows, 1], name=f"{n.name}_row_column")
    past = cx.emit("cast", cx.emit("ge", row, ends, name=f"{n.name}_past"), dtype=torch.int64,
                   name=f"{n.name}_past_count")
    expert = cx.emit("reduce_sum", past, axes=[1], keepdim=False, name=f"{n.name}_expert")
    every = cx.emit("matmul", cx.emit("reshape", xv, shape=[1, rows, cols], name=f"{n.name}_batch"), wv,
                    name=f"{n.name}_every_expert")                                  # [E, S, out]
    mine = cx.emit("eq", cx.emit("reshape", expert, shape=[1, rows, 1], name=f"{n.name}_expert_column"),
                   cx.const(torch.arange(experts).reshape(experts, 1, 1), torch.int64), name=f"{n.name}_mine")
    kept = cx.emit("where", mine, every, cx.const(0, cx.meta(n).dtype), name=f"{n.name}_kept")
    return cx.emit("reduce_sum", kept, axes=[0], keepdim=False)


@register(aten._grouped_mm.default)
def _aten_grouped_mm(cx, n):
    if _arg(n, 3, "bias") is not None:
        raise UnsupportedError("grouped matmul with a bias")
    return _grouped_mm(cx, n, n.args[0], n.args[1], _arg(n, 2, "offs"))


@register("transformers.grouped_mm_fallback.default")
def _transformers_grouped_mm(cx, n):
    """transformers' grouped matmul for dtypes torch's own does not take: an opaque custom op, named
    by string so that nnforge need not import transformers to know it."""
    return _grouped_mm(cx, n, *n.args[:3])

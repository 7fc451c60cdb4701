"""AWQ (Lin et al., 2024): activation-aware per-channel weight scaling, searched on calibration data.

A few input channels carry most of a layer's activation magnitude; their weight columns matter
most, and int4 groups round them as coarsely as the rest. AWQ multiplies those columns by
``s_j = mean|X_j|^r`` (normalised around 1) before quantisation and divides the input by ``s``:
the same product in real arithmetic, with the salient columns on a finer share of their group's
grid. ``r`` is searched on a grid per group of layers reading one activation, by the output error
of the quantised layers on sampled calibration rows; ``r = 0`` (no scaling) is on the grid, so the
search never does worse there than plain round-to-nearest. Then, per layer, each group's clipping
range is searched (AWQ's auto-clip) by the same output error, per output row.

1/s is folded into what produces the input when only these layers read it: an RMS norm or
LayerNorm's weight, or the rows of a linear (V for the attention output projection through the
heads' reshapes is not followed; an MLP's up projection through the gate multiply is). Otherwise it
is an explicit multiply. The pass rewrites plain weights; the weight quantiser runs after it
(``w4-awq``: AWQ then round-to-nearest on the grid it searched for).

    >>> AWQ(format="uint4", group_size=128)(graph, PassContext(calibration=batches))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...ir import Dense, Graph, Node, Value
from ..base import LayerSelection, Pass, PassContext, PassError, register_pass
from .activations import _collect, _linear_groups
from .formats import FormatError, grouped, parse_format


def fake_quantize_weight(w: torch.Tensor, fmt) -> torch.Tensor:
    """``w`` [rows, cols] rounded to ``fmt``'s grid and back, as round-to-nearest would store it."""
    rows, cols = w.shape
    groups, _ = grouped(w, fmt)
    scale, zp = fmt.fit(groups, fmt.global_scale(w))
    q = fmt.snap(groups, scale[..., None], None if zp is None else zp[..., None])
    return q.reshape(rows, -1)[:, :cols]


def _output_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, fmt, ys) -> float:
    return sum(float((x @ (fake_quantize_weight(w * s, fmt) / s).T - y).pow(2).sum()) for w, y in zip(weights, ys))


def search_scales(x: torch.Tensor, weights: list[torch.Tensor], fmt, grid: int) -> tuple[torch.Tensor, float]:
    """The per-input-channel scales (and their exponent ``r``) with the least output error of the
    quantised ``weights`` on rows ``x``."""
    ys = [x @ w.T for w in weights]
    mean = x.abs().mean(0).clamp(min=1e-8)
    ones = torch.ones_like(mean)
    best = (None, 0.0, ones)
    for i in range(grid):
        r = i / grid
        s = mean.pow(r)
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4) if i else ones
        err = _output_error(x, weights, s, fmt, ys)
        if best[0] is None or err < best[0]:
            best = (err, r, s)
    return best[2], best[1]


def search_clip(x: torch.Tensor, w: torch.Tensor, fmt, steps: int = 10, shrink: float = 0.5) -> torch.Tensor:
    """``w`` with each (row, group)'s range clipped to the fraction of its largest magnitude, out of
    ``1, 1 - shrink/steps, ...``, whose quantised output on rows ``x`` errs least."""
    rows, cols = w.shape
    groups, gs = grouped(w, fmt)
    xg = torch.nn.functional.pad(x, (0, groups.shape[1] * gs - cols)).reshape(len(x), -1, gs)   # [n, G, gs]
    amax = groups.abs().amax(-1, keepdim=True)
    best_err = torch.full(groups.shape[:2], float("inf"))
    best = groups.clone()
    for i in range(steps + 1):
        cap = amax * (1 - shrink * i / steps)
        clipped = torch.maximum(torch.minimum(groups, cap), -cap)
        scale, zp = fmt.fit(clipped, fmt.global_scale(clipped))
        q = fmt.snap(clipped, scale[..., None], None if zp is None else zp[..., None])
        err = torch.einsum("ngk,rgk->nrg", xg, q - groups).pow(2).sum(0)                        # [rows, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], clipped, best)
    return best.reshape(rows, -1)[:, :cols]


def _only_readers(graph: Graph, v: Value, nodes: list[Node]) -> bool:
    return {n for n, _ in graph.uses().get(v, [])} == set(nodes) and v not in graph.outputs


def _plain(v: Value | None) -> bool:
    return v is not None and v.is_weight and type(v.encoding) is Dense


def _fold_inverse(graph: Graph, x: Value, nodes: list[Node], s: torch.Tensor) -> str | None:
    """Divide what produces ``x`` by ``s`` where that is exact and nothing else reads it; the kind
    of fold, or None."""
    node = x.producer
    if node is None or not _only_readers(graph, x, nodes):
        return None
    uses = graph.uses()
    own = lambda v: _plain(v) and len(uses.get(v, [])) == 1          # noqa: E731
    if node.op == "rms_norm" and len(node.inputs) > 1 and own(node.inputs[1]):
        w = node.inputs[1]
        data = w.encoding.data.to(torch.float32)
        offset = node.attrs["offset"]
        graph.set_encoding(w.name, Dense(((offset + data) / s - offset).to(w.encoding.data.dtype)))
        return "rms_norm"
    if node.op == "layer_norm" and len(node.inputs) > 1 and own(node.inputs[1]):
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and not own(bias):
            return None
        for v in (node.inputs[1], bias):
            if v is not None:
                graph.set_encoding(v.name, Dense((v.encoding.data.to(torch.float32) / s).to(v.encoding.data.dtype)))
        return "layer_norm"
    if node.op == "mul":                 # a gated MLP's act(gate) * up: the linear side takes it
        for side in node.inputs:
            lin = side.producer
            if lin is not None and lin.op == "linear" and _only_readers(graph, side, [node]) \
                    and _fold_rows(graph, lin, s, own):
                return "linear through mul"
        return None
    if node.op == "linear" and _fold_rows(graph, node, s, own):
        return "linear"
    return None


def _fold_rows(graph: Graph, lin: Node, s: torch.Tensor, own) -> bool:
    w, bias = lin.inputs[1], (lin.inputs[2] if len(lin.inputs) > 2 else None)
    if not own(w) or (bias is not None and not own(bias)) or w.shape[0] != s.numel():
        return False
    graph.set_encoding(w.name, Dense((w.encoding.data.to(torch.float32) / s[:, None]).to(w.encoding.data.dtype)))
    if bias is not None:
        graph.set_encoding(bias.name, Dense((bias.encoding.data.to(torch.float32) / s).to(bias.encoding.data.dtype)))
    return True


@register_pass
@dataclass
class AWQ(LayerSelection, Pass):
    """Search and apply AWQ's per-channel scales (``grid`` exponents) and, with ``clip``, each
    group's clipping range, for weights to be quantised to ``format`` in groups of ``group_size``,
    on ``sample_rows`` calibration rows (module docstring). Leaves the weights in float for the
    quantiser that follows."""
    name = "awq"
    needs_calibration = True
    format: str = "uint4"
    group_size: int | None = 128
    grid: int = 20
    clip: bool = True
    sample_rows: int = 2048

    def __post_init__(self):
        super().__post_init__()
        try:
            self._fmt = parse_format(self.format, group_size=self.group_size)
        except FormatError as e:
            raise PassError(f"{self.name}: {e}") from None
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise PassError(f"{self.name}: grid must be a positive integer, got {self.grid!r}")
        if isinstance(self.sample_rows, bool) or not isinstance(self.sample_rows, int) or self.sample_rows < 16:
            raise PassError(f"{self.name}: sample_rows must be an integer >= 16, got {self.sample_rows!r}")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        groups = {x: nodes for x, nodes in _linear_groups(graph, self).items()
                  if all(_plain(n.inputs[1]) and n.inputs[1].encoding.data.dim() == 2 for n in nodes)}
        stats = _collect(graph, set(groups), ctx, self.name, sample_rows=self.sample_rows)
        ratios, folds, multiplies = {}, {}, 0
        for x, nodes in groups.items():
            rows = torch.cat([f[0] for f in stats[x].folds]).to(torch.float32)
            weights = [n.inputs[1].encoding.data.to(torch.float32) for n in nodes]
            s, r = search_scales(rows, weights, self._fmt, self.grid)
            ratios[nodes[0].name] = r
            if r:
                kind = _fold_inverse(graph, x, nodes, s)
                if kind is None:
                    inv = graph.add_weight(graph.fresh_name(f"{nodes[0].name}.awq_inv"),
                                           Dense((1.0 / s).to(x.dtype.torch_dtype)))
                    first = min(nodes, key=graph.nodes.index)
                    with graph.inserting_before(first):
                        y = graph.op("mul", x, inv, name=graph.fresh_name(f"{first.name}_awq", node=True))
                    for n in nodes:
                        n.inputs[0] = y
                    kind, multiplies = "multiply", multiplies + 1
                folds[nodes[0].name] = kind
            xs = rows / s
            for n, w in zip(nodes, weights):
                w = w * s
                if self.clip:
                    w = search_clip(xs[: min(len(xs), 512)], w, self._fmt)
                graph.set_encoding(n.inputs[1].name, Dense(w.to(n.inputs[1].encoding.data.dtype)))
        ctx.record("ratios", ratios)
        ctx.record("folded_into", folds)
        ctx.record("multiplies_inserted", multiplies)
        return graph


__all__ = ["AWQ", "search_scales", "search_clip", "fake_quantize_weight"]

"""N:M, block and unstructured sparsity: magnitude pruning and SparseGPT, stored as ``Sparse``.

``prune_magnitude`` keeps the largest weights (per group of M for N:M; by the sum of squares of
each block for block patterns; per layer for unstructured). ``prune_sparsegpt`` (Frantar &
Alistarh, 2023) prunes column by column like GPTQ quantises: with H = 2XᵀX/n from calibration
inputs, the weights to drop are those of least saliency w² / [H⁻¹]_jj² (chosen per group of M
columns for N:M as the sweep reaches it; per lazy block of columns for block and unstructured
patterns, a block's saliency being the sum over its RxC weights), and each removal's error is
pushed onto the columns not yet visited (the OBS update). With ``format`` it quantises the kept
weights on that grid in the same sweep (joint sparsify + quantise), groups running along the
compressed columns as MARLIN stores 2:4 + int4.

Like GPTQ, SparseGPT runs the model once over the calibration set (see
``quantize.calibrate.run_calibration``): each layer's Hessian comes from inputs computed by the
already-pruned layers before it, and layers reading the same input (Q, K, V) share one Hessian.

Per-layer sparsity for block/unstructured patterns: one ``sparsity`` for all, ``layer_sparsity``
(layer-name pattern -> sparsity, first match wins), or ``schedule="sensitivity"``: every layer's
relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) is measured for sparsities within ±0.1 of the
target under magnitude pruning (one extra pass over the calibration set, unpruned model), and an
exact knapsack picks the per-layer sparsities that minimise the summed error at the same overall
sparsity, so layers whose output suffers more per removed weight are pruned less.
"""
from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ...ir import Dense, EncodingError, Graph, Node, Sparse, Value, dtype as ir_dtype
from ...ir.encodings import Encoding, rows_cols
from ...ir.ops import WEIGHT_SLOT
from ...ir.sparse import SparsePattern
from ..base import LayerSelection, Pass, PassContext, PassError, register_pass
from ..quantize.calibrate import run_calibration
from ..quantize.coverage import CalibrationCoverage, report_damping
from ..quantize.formats import FormatError, WeightFormat, parse_format
from ..quantize.gptq import hessian_of, obs_problem, upper_inverse
from ..quantize.mixed import knapsack
from .reach import WeightReach

SCHEDULES = ("uniform", "sensitivity")
# The sensitivity schedule keeps each layer within the target +- SPREAD (OWL's lambda): a narrow
# spread beats a uniform schedule, a wide one falls below it, because the layer-wise error measure
# misjudges layers pushed far from the target.
SENSITIVITY_SPREAD = 0.1
SENSITIVITY_STEP = 0.025


# --- masks ------------------------------------------------------------------------------------
def nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive columns of ``score`` [rows, cols]."""
    rows = score.shape[0]
    grouped = score.reshape(rows, -1, m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(2, grouped.topk(n, dim=-1).indices, True)
    return keep.reshape(score.shape)


def fraction_keep(score: torch.Tensor, pattern: SparsePattern, sparsity: float) -> torch.Tensor:
    """Drop the ``sparsity`` fraction of lowest-scoring entries of ``score`` [rows, cols] (of
    blocks, scored by the sum over each block, for block patterns); ties go in index order."""
    rows, cols = score.shape
    r, c = (pattern.r, pattern.c) if pattern.kind == "block" else (1, 1)
    blocks = score.reshape(rows // r, r, cols // c, c).sum((1, 3))
    drop = int(round(sparsity * blocks.numel()))
    keep = torch.ones(blocks.numel(), dtype=torch.bool)
    keep[torch.argsort(blocks.flatten(), stable=True)[:drop]] = False
    return keep.reshape(blocks.shape).repeat_interleave(r, 0).repeat_interleave(c, 1)


def magnitude_keep(w: torch.Tensor, pattern: SparsePattern, sparsity: float) -> torch.Tensor:
    """The mask magnitude pruning keeps for ``w`` [rows, cols]."""
    score = w.detach().to(torch.float32) ** 2
    if pattern.kind == "nm":
        return nm_keep(score, pattern.n, pattern.m)
    return fraction_keep(score, pattern, sparsity)


# --- SparseGPT --------------------------------------------------------------------------------
def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, pattern, sparsity: float = 0.5, *, damp: float = 0.01,
                    block_size: int = 128, fmt: WeightFormat | None = None, layer: str = "") -> tuple[Sparse, dict]:
    """SparseGPT of weight ``w`` (columns: all but the first axis) with Hessian ``h`` [cols, cols].
    ``sparsity`` is used by block and unstructured patterns (N:M fixes its own). With ``fmt`` the
    kept weights are quantised in the same sweep: for N:M on groups of ``fmt.group_size`` kept
    columns; for block patterns (a symmetric integer format, one scale per output row, fitted on
    the rows a first sweep without quantisation prunes and updates) the values become integer codes and the scales the
    encoding's ``row_scale``. Returns the encoding and figures: the Hessian-weighted error
    (``loss``) and the damping used (``damp``, raised where the Hessian needed more: see
    ``quantize.gptq.upper_inverse``). ``layer`` names the layer in errors."""
    p = SparsePattern.parse(pattern)
    shape = tuple(w.shape)
    rows, cols = rows_cols(shape)
    p.check_shape(rows, cols, f"weight of shape {shape}")
    W, H = obs_problem(w, h, "sparsegpt")
    where = f"layer {layer}: " if layer else ""
    Hinv, damp = upper_inverse(H, damp, f"sparsegpt: {where}the Hessian of a {rows}x{cols} weight")

    joint = fmt is not None
    kept_cols = cols // p.m * p.n if p.kind == "nm" else cols
    gs = min(fmt.group_size or kept_cols, kept_cols) if joint else 0
    # A lazy block must hold whole N:M groups, whole RxC blocks, and with joint quantisation the
    # whole column span of each quantisation group, whose scale is fitted when the sweep reaches it.
    unit = {"nm": p.m, "block": p.c}.get(p.kind, 1)
    row_scaled = joint and p.kind == "block"
    span = gs * p.m // p.n if joint and not row_scaled else unit
    block = span * max(1, block_size // span)
    if row_scaled:
        # Row scales fitted on the original row clip: the OBS updates grow the kept weights. Fit
        # them on the pruned and updated rows of a first sweep without quantisation instead.
        g, zp = None, None
        pruned = sparsegpt_prune(w, h, p, sparsity, damp=damp, block_size=block_size, layer=layer)[0].decode()
        scale, _ = fmt.fit(pruned.reshape(rows, 1, cols))
    elif joint:
        g = fmt.global_scale(W)
        n_groups = -(-kept_cols // gs)
        scale = torch.zeros(rows, n_groups)
        zp = None if fmt.kind == "float" or fmt.symmetric else torch.zeros(rows, n_groups, dtype=torch.int64)
    Q = torch.zeros_like(W)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    losses = torch.zeros(rows)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if p.kind == "nm":
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        else:
            keep1 = fraction_keep(W1 ** 2 / d1 ** 2, p, sparsity)
        for i in range(i2 - i1):
            if p.kind == "nm" and i % p.m == 0:
                keep1[:, i:i + p.m] = nm_keep(W1[:, i:i + p.m] ** 2 / d1[i:i + p.m] ** 2, p.n, p.m)
            if joint and not row_scaled and i % span == 0:
                # Fit on the values the group would keep now; the final mask may still move a little.
                seg = W1[:, i:i + span]
                tentative = nm_keep(seg ** 2 / d1[i:i + span] ** 2, p.n, p.m)
                s, z = fmt.fit(seg[tentative].reshape(rows, 1, -1), g)
                grp = (i1 + i) // span
                scale[:, grp] = s[:, 0]
                if zp is not None:
                    zp[:, grp] = z[:, 0]
            w_col = W1[:, i]
            q = w_col * keep1[:, i]
            if joint:
                grp = 0 if row_scaled else (i1 + i) // span
                q = fmt.snap(q, scale[:, grp], None if zp is None else zp[:, grp]) * keep1[:, i]
            Q1[:, i] = q
            err = (w_col - q) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        losses += (Err1 ** 2).sum(1) / 2
        Q[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    out_dtype = w.dtype
    if row_scaled:
        def encode_codes(v: torch.Tensor) -> Encoding:
            return fmt.encode(v.reshape(len(v), -1), torch.ones(1, 1), None, shape=tuple(v.shape), group_size=p.r * p.c,
                              out_dtype=ir_dtype(out_dtype))
        codes = torch.round(Q / scale).reshape(shape)
        enc = Sparse.from_mask(codes, keep.reshape(shape), p, encode_codes,
                               row_scale=scale[:, 0].to(fmt.scale_format.torch_dtype))
        return enc, {"loss": float(losses.sum()), "damp": damp}
    if joint:
        def encode_values(v: torch.Tensor) -> Encoding:
            return fmt.encode(v, scale, zp, shape=tuple(v.shape), group_size=gs, global_scale=g,
                              out_dtype=ir_dtype(out_dtype))
    else:
        def encode_values(v: torch.Tensor) -> Encoding:
            return Dense(v.to(out_dtype))
    enc = Sparse.from_mask(Q.reshape(shape), keep.reshape(shape), p, encode_values)
    return enc, {"loss": float(losses.sum()), "damp": damp}


# --- Hessians shared by layers reading the same input -------------------------------------------
def _hessian_key(node: Node):
    # conv attrs hold lists (stride, padding, ...): made hashable for the key
    attrs = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in node.attrs.items()))
    return node.inputs[0], node.op, attrs if node.op == "conv" else ()


class _Hessians:
    """H = 2XᵀX/n per layer input, computed once for the layers that read it (Q, K and V) and
    dropped after the last of them, so memory holds a block's Hessians, not the model's."""

    def __init__(self, nodes: list[Node]):
        self.left = Counter(_hessian_key(n) for n in nodes)
        self.cache: dict = {}

    def take(self, node: Node, args) -> tuple[torch.Tensor, int]:
        """The layer's Hessian and the calibration rows it was estimated from."""
        key = _hessian_key(node)
        if key not in self.cache:
            H, n = None, 0
            for batch in args:
                h, rows = hessian_of(batch[0], node)
                H = h if H is None else H + h
                n += rows
            self.cache[key] = (2.0 * H / max(n, 1), n)
        self.left[key] -= 1
        return self.cache[key] if self.left[key] > 0 else self.cache.pop(key)


def _plain_matmul(node: Node) -> bool:
    """Whether a layer is one matmul over its 2-D weight view (what a Hessian describes)."""
    return node.op == "linear" or (node.op == "conv" and node.attrs.get("groups", 1) == 1
                                   and len(node.input("weight").shape) == 4)


def _conv_problem(node: Node) -> str | None:
    """Why a conv's weight is left unpruned: a sparse pattern runs over a conv's im2col view
    [out, in*kh*kw], one matmul only when the conv has a single group."""
    if node.op != "conv" or node.attrs.get("groups", 1) == 1:
        return None
    if node.input("weight").shape[1] == 1:
        return ("depthwise: one input channel per group, so each output reads only its own kh*kw window and "
                "there is no shared im2col matmul for a sparse kernel to skip work in")
    return (f"groups={node.attrs['groups']}: its [out, in/groups*kh*kw] view is one matmul per group, not one "
            "that a block or N:M kernel runs")


# --- the passes -------------------------------------------------------------------------------
@dataclass
class SparsityConfig(LayerSelection):
    """Options both sparsity passes share (see the module docstring)."""
    ops: list[str] = field(default_factory=lambda: ["linear", "conv"])
    pattern: str = "2:4"
    sparsity: float | None = None
    layer_sparsity: dict = field(default_factory=dict)
    schedule: str = "uniform"

    def __post_init__(self):
        super().__post_init__()
        if "matmul" in self.ops:
            raise PassError(f"{self.name}: matmul weights are [K, N], not [out, in]; prune linear layers")
        try:
            self.sparse_pattern = SparsePattern.parse(self.pattern)
        except EncodingError as e:
            raise PassError(f"{self.name}: option pattern: {e}") from None
        p = self.sparse_pattern
        if self.sparsity is not None and (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
                                          or not 0 < self.sparsity < 1):
            raise PassError(f"{self.name}: sparsity must be a fraction of weights removed in (0, 1), got "
                            f"{self.sparsity!r}")
        if not isinstance(self.layer_sparsity, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
                for k, v in self.layer_sparsity.items()):
            raise PassError(f"{self.name}: layer_sparsity must map layer-name patterns to fractions in [0, 1), got "
                            f"{self.layer_sparsity!r}")
        if self.schedule not in SCHEDULES:
            raise PassError(f"{self.name}: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if p.kind == "nm":
            fixed = 1 - p.n / p.m
            if self.sparsity is not None and abs(self.sparsity - fixed) > 1e-9:
                raise PassError(f"{self.name}: pattern {p.name} removes {fixed:.0%} of the weights by definition; "
                                f"drop option sparsity={self.sparsity} or pick another N:M")
            if self.layer_sparsity or self.schedule != "uniform":
                raise PassError(f"{self.name}: layer_sparsity and schedule='sensitivity' apply to block and "
                                f"unstructured patterns; {p.name} fixes every layer's sparsity")
        if self.layer_sparsity and self.schedule != "uniform":
            raise PassError(f"{self.name}: give layer_sparsity or schedule='sensitivity', not both")

    def prune_targets(self, graph: Graph) -> tuple[list[tuple[Node, Value]], WeightReach]:
        """(first node, weight) for every selected float weight, each once, and the model's weights
        with a reason for each layer left out; a layer the pattern does not fit, or one already
        compressed, is an error naming it."""
        reach = WeightReach.of(graph)
        seen, out = set(), []
        for node in self.select(graph):
            w = node.inputs[WEIGHT_SLOT]
            if w.name in seen:
                continue
            if not w.dtype.is_float:
                reach.skip(node, f"{w.dtype} weights are not float")
                continue
            seen.add(w.name)
            if not isinstance(w.encoding, Dense):
                raise PassError(f"{self.name}: layer {node.name} ({w.name}) is already encoded as "
                                f"{w.encoding.describe()}; prune before quantising (prune_sparsegpt's format "
                                f"option quantises the kept weights), or exclude the layer")
            why = _conv_problem(node)
            if why is not None:
                reach.skip(node, why)
                continue
            rows, cols = rows_cols(w.shape)
            try:
                self.sparse_pattern.check_shape(rows, cols, f"weight {w.name} {list(w.shape)}")
            except EncodingError as e:
                if node.op == "conv":   # a stem over few input channels: the rest of the net still prunes
                    reach.skip(node, f"{e}; the pattern does not tile its [out, in*kh*kw] view")
                    continue
                raise PassError(f"{self.name}: layer {node.name}: {e}; exclude it (exclude=[\"{node.name}\"]) or "
                                f"choose another pattern") from None
            out.append((node, w))
        if not out:
            raise PassError(f"{self.name}: no selected layer has a float weight to prune (layers={self.layers}, "
                            f"exclude={self.exclude}, ops={self.ops})")
        for node in reach.layers.values():
            if node.op not in self.ops:
                hint = "; matmul weights are [K, N], not [out, in]" if node.op == "matmul" else (
                    f"; add \"{node.op}\" to ops to prune them" if node.op != "embedding" else "")
                reach.skip(node, f"{node.op} is not in ops={self.ops}{hint}")
            elif not self.matches(node):
                reach.skip(node, "left out by the layers / exclude options")
        return out, reach

    def plan(self, graph: Graph, items: list[tuple[Node, Value]], ctx: PassContext) -> dict[str, float]:
        """Sparsity (fraction removed) per weight name."""
        p = self.sparse_pattern
        if p.kind == "nm":
            return {w.name: 1 - p.n / p.m for _, w in items}
        default = 0.5 if self.sparsity is None else float(self.sparsity)
        if self.schedule == "sensitivity":
            return self._sensitivity_plan(graph, items, ctx, default)
        out = {}
        for node, w in items:
            hit = next((v for k, v in self.layer_sparsity.items()
                        if fnmatch.fnmatchcase(node.name, k) or fnmatch.fnmatchcase(w.name, k)), default)
            out[w.name] = float(hit)
        return out

    def _sensitivity_plan(self, graph, items, ctx, target: float) -> dict[str, float]:
        if not ctx.calibration:
            raise PassError(f"{self.name}: schedule='sensitivity' measures each layer's output error on calibration "
                            "data; pass calibration=[input tuples shaped like example_inputs]")
        steps = round(SENSITIVITY_SPREAD / SENSITIVITY_STEP)
        grid = sorted({round(min(max(target + k * SENSITIVITY_STEP, 0.0), 0.99), 4) for k in range(-steps, steps + 1)})
        errors = self._curves(graph, items, ctx, grid)
        sizes = np.array([w.encoding.numel for _, w in items], dtype=np.float64)
        costs = sizes[:, None] * (1 - np.array(grid))[None, :]            # weights kept
        picks = knapsack(errors, costs, (1 - target) * sizes.sum())
        return {w.name: grid[j] for (_, w), j in zip(items, picks)}

    def _curves(self, graph, items, ctx, grid) -> np.ndarray:
        """Relative output error of each layer under magnitude pruning at each grid sparsity."""
        nodes = {n.name: (i, w) for i, (n, w) in enumerate(items)}
        hessians = _Hessians([n for n, _ in items if _plain_matmul(n)])
        errors = np.zeros((len(items), len(grid)))

        def before(node: Node, args):
            hit = nodes.get(node.name)
            if hit is None:
                return
            i, w = hit
            rows, cols = rows_cols(w.shape)
            W = w.encoding.data.to(torch.float32).reshape(rows, cols)
            H = hessians.take(node, args)[0] if _plain_matmul(node) else torch.eye(cols)
            base = float(((W @ H) * W).sum()) or 1.0
            for j, s in enumerate(grid):
                D = W * ~magnitude_keep(W, self.sparse_pattern, s)
                errors[i, j] = float(((D @ H) * D).sum()) / base

        run_calibration(graph, ctx.calibration, before, who=f"{self.name} (sensitivity)", progress=ctx.progress,
                        until=nodes)
        return errors


def _record(ctx: PassContext, who: str, pattern: SparsePattern, encodings: dict[str, Sparse], reach: WeightReach,
            reached: set[str], extra: dict | None = None):
    numel = sum(e.numel for e in encodings.values())
    ctx.record("pattern", pattern.name)
    ctx.record("layers", len(encodings))
    ctx.record("sparsity", {n: round(1 - e.density, 4) for n, e in encodings.items()})
    ctx.record("overall_sparsity", round(sum(e.numel - e.values.numel for e in encodings.values()) / numel, 4))
    ctx.record("bits_per_weight", round(8 * sum(e.nbytes for e in encodings.values()) / numel, 3))
    ctx.record("encodings", dict(Counter(e.describe() for e in encodings.values())))
    for k, v in (extra or {}).items():
        ctx.record(k, v)
    reach.report(ctx, who, reached)


@register_pass
@dataclass
class PruneMagnitude(SparsityConfig, Pass):
    """Keep the largest weights under ``pattern`` ("2:4", "4:8", "1:4", "block4x1", "block1x4",
    "block16x1", "unstructured", ...); ``sparsity`` (default 0.5), ``layer_sparsity`` or
    ``schedule`` set how much block/unstructured patterns remove per layer."""
    name = "prune_magnitude"

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        items, reach = self.prune_targets(graph)
        plan = self.plan(graph, items, ctx)
        encodings = {}
        for node, w in items:
            data = w.encoding.data
            rows, cols = rows_cols(w.shape)
            keep = magnitude_keep(data.reshape(rows, cols), self.sparse_pattern, plan[w.name])
            enc = Sparse.from_mask(data, keep.reshape(data.shape), self.sparse_pattern)
            graph.set_encoding(w.name, enc)
            encodings[node.name] = enc
        _record(ctx, self.name, self.sparse_pattern, encodings, reach, {w.name for _, w in items})
        return graph


@register_pass
@dataclass
class PruneSparseGPT(SparsityConfig, Pass):
    """SparseGPT (see the module docstring); needs calibration. ``damp``: fraction of the mean
    Hessian diagonal added to it; ``block_size``: columns per lazy update; ``format`` (with
    ``group_size`` counted in kept columns, a shorter last group allowed) quantises the kept
    weights of an N:M pattern jointly, e.g. ``format="uint4", group_size=128``, with scales stored in
    ``scale_dtype``."""
    name = "prune_sparsegpt"
    needs_calibration = True
    damp: float = 0.01
    block_size: int = 128
    format: str | None = None
    group_size: int | None = None
    scale_dtype: str = "float32"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise PassError(f"{self.name}: damp must be in [0, 1), got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise PassError(f"{self.name}: block_size must be a positive integer, got {self.block_size!r}")
        self.weight_format = None
        if self.format is None:
            if self.group_size is not None:
                raise PassError(f"{self.name}: group_size applies to the format of the kept weights; give format too")
            return
        p = self.sparse_pattern
        if p.kind == "unstructured":
            raise PassError(f"{self.name}: format (joint quantisation) needs an N:M or block pattern; unstructured "
                            "kept values have no row or group layout to share scales")
        try:
            self.weight_format = parse_format(self.format, group_size=self.group_size, scale_dtype=self.scale_dtype)
        except FormatError as e:
            raise PassError(f"{self.name}: {e}") from None
        f = self.weight_format
        if p.kind == "block" and (f.kind != "int" or not f.symmetric or f.group_size is not None or f.per_tensor):
            raise PassError(f"{self.name}: with block pattern {p.name}, format must be a symmetric integer format with "
                            f"one scale per output row (such as 'int8', no group_size), got {f.describe()}: a kept "
                            "block spans several rows, so integer SpMM kernels rescale once per row")
        gs = self.weight_format.group_size
        if gs is not None and gs % p.n:
            raise PassError(f"{self.name}: group_size {gs} must be a multiple of N={p.n} so that quantisation groups "
                            f"hold whole {p.name} groups")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        items, reach = self.prune_targets(graph)
        plan = self.plan(graph, items, ctx)
        todo = {n.name: w for n, w in items if _plain_matmul(n)}
        hessians = _Hessians([n for n, _ in items if n.name in todo])
        encodings, losses, magnitude = {}, {}, []
        coverage, raised = CalibrationCoverage(), {}
        for node, w in items:
            if node.name not in todo:           # no single matmul for a Hessian to describe
                magnitude.append(node.name)
                rows, cols = rows_cols(w.shape)
                keep = magnitude_keep(w.encoding.data.reshape(rows, cols), self.sparse_pattern, plan[w.name])
                encodings[node.name] = Sparse.from_mask(w.encoding.data, keep.reshape(w.shape), self.sparse_pattern)
                graph.set_encoding(w.name, encodings[node.name])

        def before(node: Node, args):
            w = todo.get(node.name)
            if w is None:
                return
            H, rows = hessians.take(node, args)
            coverage.note(node.name, rows, H.shape[0])
            enc, figs = sparsegpt_prune(w.encoding.data, H, self.sparse_pattern, plan[w.name], damp=self.damp,
                                        block_size=self.block_size, fmt=self.weight_format, layer=node.name)
            graph.set_encoding(w.name, enc)
            encodings[node.name] = enc
            losses[node.name] = round(figs["loss"], 6)
            if figs["damp"] != self.damp:
                raised[node.name] = figs["damp"]

        run_calibration(graph, ctx.calibration, before, who=self.name, progress=ctx.progress, until=todo)
        extra = {"hessian_weighted_error": losses}
        if magnitude:
            extra["magnitude_instead"] = magnitude
        _record(ctx, self.name, self.sparse_pattern, encodings, reach, {w.name for _, w in items}, extra)
        coverage.report(ctx, self.name, plain="magnitude pruning")
        report_damping(ctx, self.name, self.damp, raised)
        return graph


__all__ = ["PruneMagnitude", "PruneSparseGPT", "SparsityConfig", "sparsegpt_prune", "magnitude_keep", "nm_keep",
           "fraction_keep"]

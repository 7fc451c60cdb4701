"""GPTQ (Frantar et al., 2022): quantise a layer's weight column by column, pushing each
column's rounding error onto the columns not yet quantised through the inverse Hessian of the
layer's inputs, H = 2 XᵀX / n.

Works with any :class:`~.formats.WeightFormat` (integer or minifloat grids, per channel, per
group, MX/NVFP4 blocks), since it only needs a scale fit and a nearest-point function. Options:
dampening (a fraction of the mean diagonal added to H, raised per layer where H needs more: see
:func:`upper_inverse`), lazy block updates (``block_size``
columns at a time), act-order (columns in order of decreasing Hessian diagonal) and static
groups (scales fitted once on the original weight, in original column order).

Where act-order is stored: with per-channel or per-tensor scales, or static groups, the codes go
back to original column order and no permutation is stored. With groups fitted along the
act-order (the accurate choice), codes and groups are stored in act-order with ``perm`` in the
encoding, and backends permute the activations once (a Gather), never the weight at run time.

The pass runs the model once over the calibration set (see :mod:`.calibrate`): each layer's
Hessian comes from the inputs it receives with every earlier layer already quantised, and layers
that read the same input (Q, K and V) share one Hessian.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...ir import Dense, Graph, Node
from ...ir.encodings import Encoding, rows_cols
from ..base import Pass, PassContext, PassError, register_pass
from .calibrate import run_calibration
from .common import WeightQuantConfig
from .coverage import CalibrationCoverage, report_damping
from .formats import WeightFormat, grouped, quantize_rtn


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, fmt: WeightFormat, *, act_order: bool = True,
                  static_groups: bool = False, damp: float = 0.01, block_size: int = 128,
                  out_dtype="float32", layer: str = "", outliers: float = 0.0) -> tuple[Encoding, dict]:
    """GPTQ of weight ``w`` (any shape; columns are all but the first axis) with Hessian ``h``
    [cols, cols]. Returns the encoding and figures: the Hessian-weighted error (``loss``) and the
    damping used (``damp``: above the one asked for when the Hessian needed more, see
    :func:`upper_inverse`). ``layer`` names the layer in errors.

    ``outliers`` (SpQR, Dettmers et al. 2023): about that fraction of the weights, those whose
    rounding would cost most (``((w - q) / d)^2`` over the layer's threshold, ``d`` the inverse
    Hessian's Cholesky diagonal), are kept exact and left out of their group's scale fit; the
    figures then hold ``outlier_delta``, the [rows, cols] corrections (original column order, zero
    elsewhere) that the grid's values need to become them. Needs groups fitted during the sweep; a
    layer no wider than one group keeps none."""
    shape = tuple(w.shape)
    rows, cols = rows_cols(shape)
    W, H = obs_problem(w, h, "gptq")
    g = fmt.global_scale(W)
    gs = cols if fmt.per_tensor or fmt.group_size is None else min(fmt.group_size, cols)
    groups_fixed = fmt.per_tensor or gs == cols or static_groups
    if groups_fixed:
        # One scale per row (or tensor), or static groups: fitted on the original weight.
        groups, gs = grouped(W, fmt)
        scale, zp = fmt.fit(groups, g)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp = upper_inverse(H, damp, f"gptq: {_layer(layer)}the Hessian of a {rows}x{cols} weight")

    orig_col = perm if perm is not None else torch.arange(cols)
    if outliers and static_groups:
        raise PassError(f"gptq: {_layer(layer)}outliers need groups fitted during the sweep (static_groups off)")
    if groups_fixed:            # a layer no wider than one group: its scales are fitted up front, outliers and all
        outliers = 0.0
    tau = _outlier_threshold(W, Hinv, fmt, g, gs, outliers) if outliers else None
    delta = torch.zeros_like(W) if outliers else None
    kept = torch.zeros(W.shape, dtype=torch.bool) if outliers else None
    if not groups_fixed:
        n_groups = -(-cols // gs)
        scale = torch.zeros(rows, n_groups)
        zp = torch.zeros(rows, n_groups, dtype=torch.int64) if not (fmt.kind == "float" or fmt.symmetric) else None
    Q = torch.zeros_like(W)
    losses = torch.zeros(rows)
    # Lazy batch updates need whole groups inside a block, so a block holds a multiple of gs columns.
    block = block_size if groups_fixed else gs * max(1, block_size // gs)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not groups_fixed and j % gs == 0:
                grp = j // gs
                wg = W1[:, i:i + gs]
                if outliers:
                    s0, z0 = fmt.fit(wg.unsqueeze(1), g)
                    sens = ((wg - fmt.snap(wg, s0, z0)) / torch.diag(Hinv1)[i:i + gs]) ** 2
                    kept[:, j:j + wg.shape[1]] = sens > tau
                    wg = torch.where(kept[:, j:j + wg.shape[1]], torch.zeros_like(wg), wg)
                s, z = fmt.fit(wg.unsqueeze(1), g)
                scale[:, grp] = s[:, 0]
                if zp is not None:
                    zp[:, grp] = z[:, 0]
            col_group = (orig_col[j] // gs) if groups_fixed else j // gs
            s_col = scale[:, col_group]
            z_col = None if zp is None else zp[:, col_group]
            w_col = W1[:, i]
            q = fmt.snap(w_col, s_col, z_col)
            Q1[:, i] = q
            if outliers:
                delta[:, j] = torch.where(kept[:, j], w_col - q, torch.zeros_like(q))
                q = torch.where(kept[:, j], w_col, q)
            d = Hinv1[i, i]
            err = (w_col - q) / d
            losses += (w_col - q) ** 2 / d ** 2 / 2
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if groups_fixed:
        if perm is not None:
            unperm = torch.empty_like(Q)
            unperm[:, perm] = Q
            Q = unperm
        enc = fmt.encode(Q, scale, zp, shape=shape, group_size=gs, global_scale=g, out_dtype=out_dtype)
    else:
        enc = fmt.encode(Q, scale, zp, shape=shape, group_size=gs, perm=perm, global_scale=g, out_dtype=out_dtype)
    figures = {"loss": float(losses.sum()), "damp": damp}
    if outliers:
        if perm is not None:
            delta = torch.empty_like(delta).index_copy_(1, perm, delta)
        figures["outlier_delta"] = delta
    return enc, figures


def _outlier_threshold(W: torch.Tensor, Hinv: torch.Tensor, fmt: WeightFormat, g, gs: int, fraction: float) -> float:
    """The sensitivity above which a ``fraction`` of the weights count as outliers, from their
    round-to-nearest errors in groups of ``gs`` along the sweep's column order."""
    rows, cols = W.shape
    pad = -cols % gs
    groups = F.pad(W, (0, pad)).reshape(rows, -1, gs)
    scale, zp = fmt.fit(groups, g)
    q = fmt.snap(groups, scale[..., None], None if zp is None else zp[..., None]).reshape(rows, -1)[:, :cols]
    sens = (((W - q) / torch.diag(Hinv)) ** 2).flatten()
    k = max(1, min(sens.numel(), round((1 - fraction) * sens.numel())))
    return float(torch.kthvalue(sens, k).values)


def _layer(name: str) -> str:
    return f"layer {name}: " if name else ""


def obs_problem(w: torch.Tensor, h: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The [rows, cols] float32 weight and a copy of its Hessian for an OBS-style sweep (GPTQ,
    SparseGPT): columns no calibration input ever reached (zero diagonal) are zeroed and given a
    unit diagonal, so the Hessian stays invertible and they cost nothing."""
    rows, cols = rows_cols(tuple(w.shape))
    if h.shape != (cols, cols):
        raise PassError(f"{who}: Hessian {tuple(h.shape)} does not match {cols} input columns")
    W = w.detach().to(torch.float32).reshape(rows, cols).clone()
    H = h.detach().to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


# Damping is raised tenfold per failed factorisation up to this fraction of the mean diagonal: at the
# cap the damping weighs as much as the average input column, and what fails there is not a matter
# of damping (non-finite or indefinite statistics).
DAMP_CAP = 1.0


def damping_steps(damp: float) -> list[float]:
    """``damp`` and the dampings tried after it, tenfold each (from 0.001 when ``damp`` is 0), up to
    :data:`DAMP_CAP`."""
    steps = [damp]
    while steps[-1] < DAMP_CAP:
        steps.append(min(DAMP_CAP, steps[-1] * 10 if steps[-1] > 0 else 0.001))
    return steps


def upper_inverse(H: torch.Tensor, damp: float, what: str) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of (H + d * mean(diag H) * I)^-1, which the OBS sweeps read row
    by row, and the damping ``d`` it took: ``damp`` or, where the factorisation fails (a singular
    Hessian from too little calibration data, or rounding), the first of :func:`damping_steps`
    that works. Dampens ``H`` in place. ``what`` names the layer in the errors."""
    if not bool(torch.isfinite(H).all()):
        raise PassError(f"{what} has non-finite entries: the layer's calibration inputs overflow float32 when "
                        "squared; check the calibration data (its scale) or exclude the layer")
    mean = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0])
    added = 0.0
    steps = damping_steps(damp)
    for d in steps:
        H += (d - added) * mean * eye
        added = d
        try:
            return torch.linalg.cholesky(inverse_from_cholesky(torch.linalg.cholesky(H)), upper=True), d
        except torch.linalg.LinAlgError:
            continue
    raise PassError(f"{what} is not positive definite with damping {', '.join(f'{d:g}' for d in steps)} (x the mean "
                    "diagonal); its calibration statistics are broken: check the calibration data reaching the "
                    "layer, or exclude the layer") from None


def inverse_from_cholesky(L: torch.Tensor) -> torch.Tensor:
    """H^-1 from H's lower Cholesky factor: a triangular solve against I, not
    ``torch.cholesky_inverse``, which is several times slower on CPU builds of torch and would be
    most of GPTQ's time."""
    return torch.cholesky_solve(torch.eye(L.shape[0], dtype=L.dtype), L)


def hessian_of(x: torch.Tensor, node: Node) -> tuple[torch.Tensor, int]:
    """XᵀX of a layer input as the layer's matmul sees it, and the number of rows of X."""
    if node.op == "linear":
        X = x.reshape(-1, x.shape[-1])
    else:                                                   # conv: im2col, columns like the weight's
        a = node.attrs
        kernel = tuple(node.input("weight").shape[2:])
        if len(kernel) != 2:
            raise PassError(f"gptq: node {node.name}: only 2-d convolutions are supported")
        pad = a["padding"]
        x = F.pad(x, [pad[1], pad[3], pad[0], pad[2]])
        X = F.unfold(x, kernel, dilation=a["dilation"], stride=a["stride"])     # [N, C*kh*kw, L]
        X = X.transpose(1, 2).reshape(-1, X.shape[1])
    X = X.to(torch.float32)
    return X.T @ X, X.shape[0]


@register_pass
@dataclass
class QuantizeGPTQ(WeightQuantConfig, Pass):
    """GPTQ weight quantisation to any format (see :func:`gptq_quantize`); needs calibration.
    ``outliers`` (SpQR): the fraction of each linear's weights kept exact beside the grid, as a
    sparse linear (1x1 blocks, fp32 values: CSR) added to the quantised one's output."""
    name = "quantize_gptq"
    needs_calibration = True
    act_order: bool = True
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    outliers: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise PassError(f"{self.name}: damp must be in [0, 1), got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise PassError(f"{self.name}: block_size must be a positive integer, got {self.block_size!r}")
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, (int, float)) or \
                not 0 <= self.outliers < 0.5:
            raise PassError(f"{self.name}: outliers must be a fraction in [0, 0.5), got {self.outliers!r}")
        if self.outliers and (self.static_groups or self.weight_format.group_size is None
                              or self.weight_format.per_tensor):
            raise PassError(f"{self.name}: outliers are left out of their group's scale fit, which needs groups "
                            "(group_size) fitted during the sweep (static_groups off)")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        targets = {}
        skipped = []
        for node, w in self.targets(graph):
            if node.op == "linear" or (node.op == "conv" and node.attrs["groups"] == 1 and len(w.shape) == 4):
                targets[node.name] = w
            else:
                skipped.append(node.name)          # GPTQ needs a plain matmul view: RTN for these
                graph.set_encoding(w.name, quantize_rtn(w.encoding.data, self.weight_format, out_dtype=w.dtype))
        hessians: dict = {}                         # input value -> (H, rows); Q/K/V share theirs
        kinds: Counter = Counter()
        losses = {}
        coverage = CalibrationCoverage()
        raised: dict[str, float] = {}
        deltas: dict[str, torch.Tensor] = {}

        def before(node: Node, args):
            w = targets.get(node.name)
            if w is None or not _is_dense(graph, w.name) or node.name in deltas:
                return
            # conv attrs hold lists (stride, padding, ...): made hashable for the key
            attrs = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in node.attrs.items()))
            key = (node.inputs[0], node.op, attrs if node.op == "conv" else ())
            if key not in hessians:
                H, n = None, 0
                for batch in args:
                    h, rows = hessian_of(batch[0], node)
                    H = h if H is None else H + h
                    n += rows
                hessians[key] = (2.0 * H / max(n, 1), n)
            H, n = hessians[key]
            coverage.note(node.name, n, H.shape[0])
            enc, figs = gptq_quantize(graph.weights[w.name].encoding.data, H, self.weight_format,
                                      act_order=self.act_order, static_groups=self.static_groups, damp=self.damp,
                                      block_size=self.block_size, out_dtype=w.dtype, layer=node.name,
                                      outliers=self.outliers if _outliers_fit(graph, node) else 0.0)
            if "outlier_delta" in figs:
                # later layers calibrate on what this one will compute: the grid plus its outliers
                deltas[node.name] = (enc, figs["outlier_delta"])
                graph.set_encoding(w.name, Dense((enc.decode(torch.float32) + figs["outlier_delta"].reshape(
                    enc.shape)).to(w.encoding.data.dtype)))
            else:
                graph.set_encoding(w.name, enc)
            kinds[enc.describe()] += 1
            losses[node.name] = round(figs["loss"], 6)
            if figs["damp"] != self.damp:
                raised[node.name] = figs["damp"]
            # Hessians of inputs no later target reads are dropped to bound memory.
            for k in [k for k in hessians if k[0] is node.inputs[0]]:
                if not any(n.inputs[0] is k[0] for n in _pending(graph, targets, node)):
                    del hessians[k]

        run_calibration(graph, ctx.calibration, before, who=self.name, progress=ctx.progress, until=targets)
        if deltas:
            for name, (enc, _) in deltas.items():
                graph.set_encoding(targets[name].name, enc)
            ctx.record("outliers", add_outlier_linears(graph, {k: d for k, (_, d) in deltas.items()}))
        ctx.record("layers", sum(kinds.values()))
        ctx.record("encodings", dict(kinds))
        ctx.record("hessian_weighted_error", losses)
        if skipped:
            ctx.record("rtn_instead", skipped)
        coverage.report(ctx, self.name)
        report_damping(ctx, self.name, self.damp, raised)
        return graph


def add_outlier_linears(graph: Graph, deltas: dict[str, torch.Tensor]) -> dict:
    """Beside each linear named in ``deltas``, a linear with its outliers' corrections as a CSR
    weight (``Sparse`` in 1x1 blocks, fp32 values) on the same input, added to its output; the
    share of the layer's weights each holds."""
    from ...ir.sparse import Sparse
    shares = {}
    for name, delta in deltas.items():
        node = graph.node(name)
        keep = delta != 0
        if not bool(keep.any()):
            continue
        w = node.inputs[1]
        stem = w.name[:-len(".weight")] if w.name.endswith(".weight") else w.name
        sparse = graph.add_weight(graph.fresh_name(f"{stem}.outliers.weight"),
                                  Sparse.from_mask(delta.reshape(w.shape), keep.reshape(w.shape), "block1x1",
                                                   lambda v: Dense(v.to(torch.float32))))
        out = node.output
        readers = [(n, i) for n, i in graph.uses().get(out, [])]
        at = graph.nodes.index(node) + 1
        with graph.inserting_before(graph.nodes[at]) if at < len(graph.nodes) else contextlib.nullcontext():
            d = graph.op("linear", node.inputs[0], sparse, None, name=graph.fresh_name(f"{name}.outliers", node=True),
                         meta=dict(node.meta))
            y = graph.op("add", out, d, name=graph.fresh_name(f"{name}.outliers_add", node=True), meta=dict(node.meta))
        for reader, i in readers:
            reader.inputs[i] = y
        shares[name] = round(float(keep.float().mean()), 5)
    return shares


def _outliers_fit(graph: Graph, node: Node) -> bool:
    """Whether a linear can take a parallel outlier linear: its output is not a graph output (whose
    name the added sum would have to take over)."""
    return node.op == "linear" and node.output not in graph.outputs


def _is_dense(graph: Graph, name: str) -> bool:
    return isinstance(graph.weights[name].encoding, Dense)


def _pending(graph: Graph, targets: dict, node: Node):
    """Target nodes after ``node`` whose weights are still dense."""
    seen = False
    for n in graph.nodes:
        if n is node:
            seen = True
            continue
        if seen and n.name in targets and _is_dense(graph, targets[n.name].name):
            yield n

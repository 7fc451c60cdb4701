"""Low-rank factorisation of linear layers: truncated SVD (``lowrank_svd``) and activation-aware,
whitened SVD as in SVD-LLM (``lowrank_asvd``).

A layer ``y = x Wᵀ + b`` with ``W`` [out, in] becomes ``y = (x Aᵀ) Bᵀ + b`` with ``A`` [rank, in]
and ``B`` [out, rank]: fewer numbers and fewer multiply-adds whenever rank * (in + out) < in * out
(a rank that saves nothing is refused, naming the layer). Plain SVD minimises ||W - BA||_F;
ASVD minimises the error of the layer's *outputs*, ||(W - BA) Xᵀ||_F over the calibration inputs
X: with C = XᵀX + damping = S Sᵀ (Cholesky), the best rank-r approximation of W S, truncated and
mapped back through S⁻¹, is that minimiser (SVD-LLM, Wang et al. 2024). The singular values are
split evenly between the factors (B = U √Σ, A = √Σ Vᵀ S⁻¹) so both have similar ranges, which is
what per-channel int8 factors (``factor_format``) need.

Where the factorisation lives. While a pass computes it, the factorisation is the weight's
encoding (:class:`~nnforge.ir.lowrank.LowRank`): the weight keeps its name and shape, the
calibration sweep runs each layer compressed (so ASVD fits every layer to inputs computed by the
already-factored layers before it, as GPTQ does), and nothing else in the graph changes. Then one
rewrite (:func:`split_lowrank`) turns each LowRank weight whose readers are all linear layers into
two linear nodes: the original node keeps its name, bias and output and reads ``B``, and a new node
``<layer>.lowrank_a`` before it reads ``A``. Every backend therefore runs plain matmuls, with the
factor weights Dense or quantised, and the manifest reports both. A weight also read by something
else (a tied embedding, say) keeps the LowRank encoding, which those readers decode; the pass
records it under ``kept_encoded``.

Rank, one of: ``rank`` (the same for every layer), ``rank_ratio`` (fraction of min(in, out)),
``energy`` (the fewest singular values holding that fraction of the squared Frobenius norm; for
ASVD, of the layer's output energy), or ``param_budget`` (fraction of the selected layers'
parameters to keep: one rank ratio for every layer, the largest that fits — see :func:`allocate`
for why not a greedy per-component allocation; each layer gets at least rank 1 and never a rank
that saves nothing). With
``param_budget`` ASVD sweeps the calibration set twice: once over the uncompressed model for the
spectra the allocation needs all at once, then, as with the other rules, layer by layer over the
compressed one to fit the factors.

    >>> graph = LowRankASVD(param_budget=0.5)(graph, PassContext(calibration=batches))
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
import torch

from ...ir import Dense, Graph, LowRank, Node, Value
from ...ir.encodings import Encoding, rows_cols
from ..base import LayerSelection, Pass, PassContext, PassError, register_pass
from ..quantize.calibrate import run_calibration
from ..quantize.formats import FormatError, WeightFormat, parse_format, quantize_rtn
from ..quantize.coverage import report_damping
from ..quantize.gptq import damping_steps, hessian_of

RANK_OPTIONS = ("rank", "rank_ratio", "energy", "param_budget")


# --- the factorisation ------------------------------------------------------------------------
@dataclass
class Spectrum:
    """W S = U diag(s) Vhᵀ with S the whitening (identity for plain SVD); ``vh`` is stored
    already mapped back (Vh S⁻¹), so truncating to r gives W ≈ U_r diag(s_r) vh_r."""
    u: torch.Tensor      # [rows, k]
    s: torch.Tensor      # [k], descending
    vh: torch.Tensor     # [k, cols]
    damp: float = 0.0    # the damping the whitening took (raised where the covariance needed more)


def damped(cov: torch.Tensor, damp: float) -> torch.Tensor:
    """C + damp * mean(diag C) * I in float64 (identity when C is all zeros: no information)."""
    c = cov.to(torch.float64)
    mean = float(torch.diagonal(c).mean()) if c.numel() else 0.0
    return c + (damp * mean if mean > 0 else 1.0) * torch.eye(c.shape[0], dtype=torch.float64)


def spectrum(w: torch.Tensor, cov: torch.Tensor | None = None, *, damp: float = 0.01,
             whitening: str = "cholesky", where: str = "") -> Spectrum:
    """The (whitened) SVD of ``w`` [rows, cols]. ``cov`` is XᵀX of the layer's inputs [cols, cols];
    ``whitening`` "cholesky" (S = chol(C), SVD-LLM) or "eigen" (S = Q Λ^½ for C = Q Λ Qᵀ, EoRA):
    both give the rank-r minimiser of ||(W - W_r) Xᵀ||_F, they differ only in the factor basis.
    A covariance not positive definite with ``damp`` (a singular one, from fewer calibration rows
    than columns) takes the first of ``damping_steps(damp)`` that makes it so; the spectrum says
    which (``damp``)."""
    W = w.detach().to(torch.float64)
    if cov is None:
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        return Spectrum(U, s, Vh)
    if not bool(torch.isfinite(cov).all()):
        raise PassError(f"{where}: the input covariance has non-finite entries: the layer's calibration inputs "
                        "overflow when squared; check the calibration data (its scale) or exclude the layer")
    steps = damping_steps(damp)
    for d in steps:
        C = damped(cov, d)
        if whitening == "cholesky":
            L, info = torch.linalg.cholesky_ex(C)
            if int(info):
                continue
            U, s, Vh = torch.linalg.svd(W @ L, full_matrices=False)
            return Spectrum(U, s, torch.linalg.solve_triangular(L, Vh, upper=False, left=False), d)
        lam, Q = torch.linalg.eigh(C)
        # eigenvalues within eigh's rounding of zero would whiten by their noise
        if float(lam.min()) <= len(lam) * torch.finfo(torch.float64).eps * float(lam.max().abs()):
            continue
        root = lam.sqrt()
        U, s, Vh = torch.linalg.svd((W @ Q) * root, full_matrices=False)
        return Spectrum(U, s, (Vh / root) @ Q.T, d)
    raise PassError(f"{where}: the input covariance is not positive definite with damping "
                    f"{', '.join(f'{d:g}' for d in steps)} (x the mean diagonal); its calibration statistics are "
                    "broken: check the calibration data reaching the layer, or exclude the layer")


def factors(sp: Spectrum, rank: int, shape, *, dtype: torch.dtype, fmt: WeightFormat | None = None,
            base: Encoding | None = None) -> LowRank:
    """The rank-``rank`` truncation as a LowRank encoding, singular values split evenly between
    the factors; factors quantised per channel to ``fmt`` when given."""
    root = sp.s[:rank].sqrt()
    # contiguous: LAPACK hands back column-major U, and a strided factor would be stored strided
    b = (sp.u[:, :rank] * root).to(torch.float32).contiguous()
    a = (root[:, None] * sp.vh[:rank]).to(torch.float32).contiguous()
    enc = (lambda t: quantize_rtn(t, fmt, out_dtype=dtype)) if fmt is not None else (lambda t: Dense(t.to(dtype)))
    return LowRank(tuple(shape), enc(a), enc(b), base)


def factor_weight_format(spec: str | None, who: str) -> WeightFormat | None:
    """The grid the low-rank factors are stored on (None: dense), checked once for every pass."""
    if spec is None:
        return None
    try:
        return parse_format(spec)
    except FormatError as e:
        raise PassError(f"{who}: factor_format: {e}") from None


def saves_params(rank: int, rows: int, cols: int) -> bool:
    return rank * (rows + cols) < rows * cols


def allocate(spectra: list[torch.Tensor], shapes: list[tuple[int, int]], fraction: float) -> list[int]:
    """Ranks under a budget of ``fraction`` of the layers' parameters: one rank ratio for every
    layer (rank = ratio x min(rows, cols), at least 1, at most the largest rank that still saves
    parameters), the largest ratio that fits. On the default model this beats spending the budget
    greedily on each layer's singular components by relative energy per parameter (ASVD's way,
    which falls below a uniform ratio keeping less), because a layer's share of the model's error
    is not its share of its own spectrum. ``spectra`` are
    singular values, descending (they bound each layer's rank)."""
    total = sum(r * c for r, c in shapes)
    budget = fraction * total
    floor = sum(r + c for r, c in shapes)
    if floor > budget:
        raise PassError(f"param_budget {fraction} keeps {budget:.0f} of {total} parameters, less than rank 1 in "
                        f"every selected layer needs ({floor}); raise param_budget or select fewer layers")
    caps = [max(1, min(len(s), (r * c - 1) // (r + c))) for s, (r, c) in zip(spectra, shapes)]

    def ranks(ratio: float) -> list[int]:
        return [max(1, min(cap, int(ratio * min(r, c)))) for cap, (r, c) in zip(caps, shapes)]

    def params(rs: list[int]) -> int:
        return sum(k * (r + c) for k, (r, c) in zip(rs, shapes))

    lo, hi = 0.0, 1.0
    for _ in range(40):                     # bisection on the ratio: params(ranks(ratio)) is monotone
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(ranks(mid)) <= budget else (lo, mid)
    return ranks(lo)


# --- the rewrite ------------------------------------------------------------------------------
def _after(graph: Graph, node: Node):
    """Insert right after ``node``."""
    i = graph.nodes.index(node)
    return graph.inserting_before(graph.nodes[i + 1]) if i + 1 < len(graph.nodes) else contextlib.nullcontext()


def _factor_weights(graph: Graph, w: Value, enc: LowRank, tag: str) -> tuple[Value, Value]:
    stem = w.name[:-len(".weight")] if w.name.endswith(".weight") else w.name
    return (graph.add_weight(graph.fresh_name(f"{stem}.{tag}_a.weight"), enc.a),
            graph.add_weight(graph.fresh_name(f"{stem}.{tag}_b.weight"), enc.b))


def _splittable(graph: Graph, w: Value, uses) -> bool:
    readers = uses.get(w, [])
    return bool(readers) and w not in graph.outputs and all(n.op == "linear" and i == 1 for n, i in readers)


def split_lowrank(graph: Graph, names: list[str], tag: str = "lowrank") -> list[str]:
    """Rewrite every linear reading one of the LowRank weights ``names`` as linear nodes (see the
    module docstring; with a base: base linear + linear(linear(x, A), B), added). Returns the
    weights left encoded because some reader is not a linear layer."""
    kept = []
    uses = graph.uses()
    for name in names:
        w = graph.weights[name]
        enc = w.encoding
        if not _splittable(graph, w, uses):
            kept.append(name)
            continue
        a_w, b_w = _factor_weights(graph, w, enc, tag)
        for node, _ in uses[w]:
            x = node.inputs[0]
            if enc.base is None:
                with graph.inserting_before(node):
                    h = graph.op("linear", x, a_w, None, name=graph.fresh_name(f"{node.name}.{tag}_a", node=True),
                                 meta=dict(node.meta))
                node.inputs[0], node.inputs[1] = h, b_w
                continue
            out = node.output
            with _after(graph, node):
                h = graph.op("linear", x, a_w, None, name=graph.fresh_name(f"{node.name}.{tag}_a", node=True),
                             meta=dict(node.meta))
                d = graph.op("linear", h, b_w, None, name=graph.fresh_name(f"{node.name}.{tag}_b", node=True),
                             meta=dict(node.meta))
                y = graph.op("add", out, d, name=graph.fresh_name(f"{node.name}.{tag}_add", node=True),
                             meta=dict(node.meta))
            for reader, i in uses.get(out, []):
                reader.inputs[i] = y
            if out in graph.outputs:
                # the graph output keeps its name: the sum takes it over from the base linear
                old = out.name
                graph.rename(out, graph.fresh_name(f"{old}_base"))
                graph.rename(y, old)
                graph.outputs = [y if v is out else v for v in graph.outputs]
        if enc.base is None:
            graph.remove_weight(name)
        else:
            graph.set_encoding(name, enc.base)
        uses = graph.uses()
    return kept


# --- the passes -------------------------------------------------------------------------------
@dataclass
class LowRankConfig(LayerSelection):
    """Options shared by the low-rank passes (see the module docstring for the rank rules).
    ``factor_format`` (e.g. "int8") quantises both factors per channel, round-to-nearest.
    ``skip_unprofitable`` leaves a layer dense where the rank chosen for it saves nothing,
    instead of refusing."""
    ops: list[str] = field(default_factory=lambda: ["linear"])
    rank: int | None = None
    rank_ratio: float | None = None
    energy: float | None = None
    param_budget: float | None = None
    factor_format: str | None = None
    skip_unprofitable: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.ops != ["linear"]:
            raise PassError(f"{self.name}: ops must be [\"linear\"]: low-rank passes factor linear layers, got "
                            f"{self.ops}")
        given = [k for k in RANK_OPTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise PassError(f"{self.name}: give exactly one of {', '.join(RANK_OPTIONS)}; got "
                            f"{' and '.join(given) if given else 'none'}")
        self._check_rank_option()
        self.factor_fmt = factor_weight_format(self.factor_format, self.name)

    def _check_rank_option(self):
        r = self.rank
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise PassError(f"{self.name}: rank must be a positive integer, got {r!r}")
        for key, hi_open in (("rank_ratio", False), ("energy", False), ("param_budget", True)):
            v = getattr(self, key)
            if v is None:
                continue
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v and (v < 1 if hi_open else v <= 1)
            if not ok:
                raise PassError(f"{self.name}: {key} must be in (0, 1{')' if hi_open else ']'}, got {v!r}")

    def layer_rank(self, node: Node, w: Value, s: torch.Tensor) -> int | None:
        """The rank of one layer by rank / rank_ratio / energy; None to leave it dense (with
        ``skip_unprofitable``). Refuses a rank the matrix does not have or that saves nothing."""
        rows, cols = rows_cols(w.shape)
        full = min(rows, cols)
        if self.rank is not None:
            r = self.rank
            if r > full:
                raise PassError(f"{self.name}: rank {r} exceeds the rank of layer {node.name} ({w.name}, "
                                f"{list(w.shape)}), at most {full}")
        elif self.rank_ratio is not None:
            r = max(1, round(self.rank_ratio * full))
        else:
            e = torch.cumsum(s.to(torch.float64) ** 2, 0)
            r = min(int(torch.searchsorted(e, self.energy * e[-1])) + 1, full) if float(e[-1]) > 0 else 1
        if saves_params(r, rows, cols):
            return r
        if self.skip_unprofitable:
            return None
        raise PassError(f"{self.name}: rank {r} saves nothing in layer {node.name} ({w.name}, {list(w.shape)}): "
                        f"{r * (rows + cols)} factor parameters against {rows * cols} dense; choose a rank below "
                        f"{-(-rows * cols // (rows + cols))}, exclude the layer (exclude=[\"{node.name}\"]) or set "
                        "skip_unprofitable=true")

    def targets(self, graph: Graph) -> tuple[dict[str, tuple[Node, Value]], list[str]]:
        """{first node name: (node, weight)} for each selected dense float weight, and the
        selected layers whose weight is already encoded (left alone)."""
        out, encoded, seen = {}, [], set()
        for node in self.select(graph):
            w = node.inputs[1]
            if w.name in seen:
                continue
            seen.add(w.name)
            if isinstance(w.encoding, Dense) and w.dtype.is_float:
                out[node.name] = (node, w)
            else:
                encoded.append(node.name)
        return out, encoded


class _LowRankPass(LowRankConfig, Pass):
    """Runs a factorisation over the selected layers and records what it did."""

    def _spectrum(self, node: Node, w: Value, cov) -> Spectrum:
        return spectrum(w.encoding.data.reshape(rows_cols(w.shape)), cov, where=f"{self.name}: layer {node.name}")

    def _factor(self, w: Value, sp: Spectrum, r: int) -> LowRank:
        return factors(sp, r, w.shape, dtype=w.dtype.torch_dtype, fmt=self.factor_fmt)

    def _finish(self, graph: Graph, ctx: PassContext, done: dict[str, tuple[Node, Value, int]],
                skipped: list[str], encoded: list[str]) -> Graph:
        ranks, params = {}, {}
        for layer, (node, w, r) in done.items():
            rows, cols = rows_cols(w.shape)
            ranks[layer] = r
            params[layer] = {"dense": rows * cols, "factors": r * (rows + cols)}
        kept = split_lowrank(graph, [w.name for _, w, _ in done.values()])
        dense = sum(p["dense"] for p in params.values())
        ctx.record("layers", len(done))
        ctx.record("ranks", ranks)
        ctx.record("params", params)
        ctx.record("params_kept", round(sum(p["factors"] for p in params.values()) / max(dense, 1), 6))
        if skipped:
            ctx.record("left_dense", skipped)
        if encoded:
            ctx.record("already_encoded", encoded)
        if kept:
            ctx.record("kept_encoded", kept)
        return graph

    def _allocate(self, targets, covs) -> dict[str, int]:
        """Each layer's rank under ``param_budget`` (see :func:`allocate`)."""
        spectra = [self._spectrum(n, w, covs.get(k) if covs else None).s for k, (n, w) in targets.items()]
        ranks = allocate(spectra, [rows_cols(w.shape) for _, w in targets.values()], self.param_budget)
        return dict(zip(targets, ranks))


@register_pass
@dataclass
class LowRankSVD(_LowRankPass):
    """Truncated SVD of each selected linear weight (see the module docstring); no calibration."""
    name = "lowrank_svd"

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        targets, encoded = self.targets(graph)
        fixed = self._allocate(targets, None) if self.param_budget is not None else {}
        done, skipped = {}, []
        for k, (node, w) in targets.items():
            sp = self._spectrum(node, w, None)
            r = fixed[k] if fixed else self.layer_rank(node, w, sp.s)
            if r is None:
                skipped.append(k)
                continue
            graph.set_encoding(w.name, self._factor(w, sp, r))
            done[k] = (node, w, r)
        return self._finish(graph, ctx, done, skipped, encoded)


@register_pass
@dataclass
class LowRankASVD(_LowRankPass):
    """Activation-aware (whitened) SVD, as SVD-LLM: truncation minimises the layer's output
    error on the calibration inputs; ``damp`` is the fraction of the covariance's mean diagonal
    added before the Cholesky factorisation. Needs calibration."""
    name = "lowrank_asvd"
    needs_calibration = True
    damp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise PassError(f"{self.name}: damp must be in [0, 1), got {self.damp!r}")

    def _spectrum(self, node: Node, w: Value, cov) -> Spectrum:
        return spectrum(w.encoding.data.reshape(rows_cols(w.shape)), cov, damp=self.damp,
                        where=f"{self.name}: layer {node.name}")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        targets, encoded = self.targets(graph)
        nodes = [n for n, _ in targets.values()]
        fixed = {}
        if self.param_budget is not None:
            # the allocation needs every spectrum at once: a first sweep over the dense model
            dense = CovarianceCache(graph, nodes, keep_all=True)

            def collect(node: Node, args):
                if node.name in targets:
                    dense.collect(node, args)

            run_calibration(graph, ctx.calibration, collect, who=self.name, progress=ctx.progress)
            fixed = self._allocate(targets, dense.by_layer)
        covs = CovarianceCache(graph, nodes)
        done, skipped, raised = {}, [], {}

        def before(node: Node, args):
            if node.name not in targets:
                return
            _, w = targets[node.name]
            sp = self._spectrum(node, w, covs.collect(node, args))
            if sp.damp != self.damp:
                raised[node.name] = sp.damp
            r = fixed[node.name] if fixed else self.layer_rank(node, w, sp.s)
            if r is None:
                skipped.append(node.name)
                return
            graph.set_encoding(w.name, self._factor(w, sp, r))
            done[node.name] = (node, w, r)

        run_calibration(graph, ctx.calibration, before, who=self.name, progress=ctx.progress)
        graph = self._finish(graph, ctx, done, skipped, encoded)
        report_damping(ctx, self.name, self.damp, raised)
        return graph


class CovarianceCache:
    """XᵀX / n of each selected layer's input over all calibration batches (n rows), computed once
    per input value (Q, K and V share theirs) and dropped after its last reader unless ``keep_all``."""

    def __init__(self, graph: Graph, nodes: list[Node], *, keep_all: bool = False):
        self.keep_all = keep_all
        self.last = {n.inputs[0]: n for n in nodes}          # graph order: the last reader wins
        self.cache: dict[Value, torch.Tensor] = {}
        self.by_layer: dict[str, torch.Tensor] = {}
        self.counts: dict[Value, int] = {}            # calibration rows behind each input's covariance

    def collect(self, node: Node, args) -> torch.Tensor:
        x = node.inputs[0]
        if x not in self.cache:
            parts = [hessian_of(b[0], node) for b in args]
            self.counts[x] = sum(n for _, n in parts)
            self.cache[x] = sum(h for h, _ in parts) / max(self.counts[x], 1)
        cov = self.cache[x]
        if self.keep_all:
            self.by_layer[node.name] = cov
        elif self.last.get(x) is node:
            del self.cache[x]
        return cov

    def rows(self, node: Node) -> int:
        """How many calibration rows the covariance of ``node``'s input was estimated from."""
        return self.counts[node.inputs[0]]


__all__ = ["LowRankSVD", "LowRankASVD", "LowRankConfig", "Spectrum", "spectrum", "factors", "allocate",
           "split_lowrank", "saves_params", "damped", "CovarianceCache"]

"""Weight palettisation by 1-D k-means, and the ``palettize`` pass.

Each group of weights (a whole tensor, or ``group_size`` consecutive output channels) is
clustered into 2^bits values, which become its look-up table (:class:`~nnforge.ir.Palettized`).
As in coremltools' ``OpPalettizerConfig`` (mode "kmeans", ``granularity="per_grouped_channel"``).

Sensitivity weighting follows SqueezeLLM (Kim et al., 2023): the centroids minimise
``sum_ij imp_ij (w_ij - c(w_ij))^2`` rather than the plain squared error, where the importance of
weight w_ij is the diagonal of the layer's input Hessian XᵀX at column j (how much energy the
input feeding that weight carries), broadcast over the rows. It pulls the table entries towards
the weights the layer output is most sensitive to.

Why the clustering is cheap: in one dimension every k-means cluster is a contiguous run of the
sorted values, cut at the midpoints between neighbouring centroids. Sorting each group once and
keeping prefix sums of ``imp``, ``imp * w`` (and ``imp * w^2`` for the error) makes a Lloyd
iteration a ``searchsorted`` of the k-1 midpoints plus a few gathers: O(k log N) per group instead
of O(N k), batched over all groups. The same sums price a restart's result without touching the
values, so several k-means++ seedings cost little more than one.

    >>> lut, idx, info = kmeans_1d(w.reshape(4, -1), 16, generator=torch.Generator().manual_seed(0))
"""
from __future__ import annotations

import math
import zlib
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...ir import Dense, Graph, Node, Palettized, Value
from ...ir.encodings import rows_cols
from ...ir.ops import WEIGHT_SLOT
from ..base import LayerSelection, Pass, PassContext, PassError, register_pass
from ..quantize.calibrate import run_calibration

INITS = ("kmeans++", "uniform")
WEIGHTINGS = ("none", "hessian")
LUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def init_sample(k: int) -> int:
    """How many values of a group k-means++ seeds from: the seeding is sequential in k and
    Lloyd's iterations, over all values, do the fine placement, so a random subset with a few
    dozen values per cluster is enough."""
    return max(4096, 64 * k)


@dataclass
class KMeansInfo:
    iters: int               # Lloyd iterations run
    converged: bool          # stopped by the tolerance, not by the iteration limit
    inertia: torch.Tensor    # [G] weighted squared error of each group under its final LUT


def assign_nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every value: x [G, N], centroids [G, k] (any order)
    -> int64 [G, N] indices into ``centroids``."""
    c, order = torch.sort(centroids.to(x.dtype), dim=1)
    mid = (c[:, 1:] + c[:, :-1]) / 2
    return order.gather(1, torch.searchsorted(mid.contiguous(), x.contiguous(), right=True))


def _draw(p: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
    """``n`` indices per row of ``p`` [G, N] (non-negative), drawn with replacement with
    probability proportional to p, by inverting the cumulative sum (torch.multinomial is far
    slower on rows this long)."""
    cdf = p.double().cumsum(1)
    u = torch.rand(p.shape[0], n, generator=gen, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=p.shape[1] - 1)


def _kmeans_pp(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy weighted k-means++ seeding (Arthur & Vassilvitskii, 2007; the greedy variant
    scikit-learn uses), all groups at once: each seed is the best of 2 + ln(k) candidates drawn
    with probability proportional to importance times squared distance to the seeds so far."""
    G, N = x.shape
    trials = 2 + int(math.log(k)) if k > 1 else 1
    seeds = torch.empty(G, k, dtype=x.dtype)
    seeds[:, :1] = x.gather(1, _draw(w, gen, 1))
    d2 = (x - seeds[:, :1]) ** 2
    for j in range(1, k):
        p = w * d2
        # A group whose points all sit on seeds already (fewer distinct values than k) has no
        # mass left; any of its points is as good a seed as another.
        p = torch.where(p.sum(1, keepdim=True) > 0, p, w)
        cand = x.gather(1, _draw(p, gen, trials))                              # [G, trials]
        d2_cand = torch.minimum(d2.unsqueeze(1), (x.unsqueeze(1) - cand.unsqueeze(2)) ** 2)
        best = (w.unsqueeze(1) * d2_cand).sum(2).argmin(1)                    # [G]
        seeds[:, j] = cand.gather(1, best.unsqueeze(1))[:, 0]
        d2 = d2_cand[torch.arange(G), best]
    return seeds


def _uniform(x: torch.Tensor, k: int) -> torch.Tensor:
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    t = (torch.arange(k, dtype=x.dtype) + 0.5) / k
    return lo + (hi - lo) * t


class _SortedGroups:
    """Each group's values sorted once, with prefix sums of w, w*x and w*x^2, so that the mass,
    mean and squared error of any contiguous run of sorted values cost two lookups.

    ``copies`` runs that many independent clusterings of every group side by side (restarts):
    row r*G + g of the centroids is copy r of group g. Only the sorted values are repeated (the
    search needs one sorted row per centroid row); the prefix sums are shared."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, copies: int = 1):
        G = x.shape[0]
        xs, order = torch.sort(x, dim=1)
        self.ws = w.gather(1, order)
        # float64: a cluster's sums are differences of two prefix sums over up to millions of values.
        wd, xd = self.ws.double(), xs.double()
        zero = torch.zeros(G, 1, dtype=torch.float64)
        self.pw, self.pwx, self.pwxx = (torch.cat([zero, t.cumsum(1)], 1) for t in (wd, wd * xd, wd * xd * xd))
        self.row = torch.arange(G).repeat(copies).unsqueeze(1)              # centroid row -> group
        self.base = self.row * self.pw.shape[1]
        self.xs = xs.repeat(copies, 1) if copies > 1 else xs
        self.span = (xs[:, -1] - xs[:, 0]).double().clamp(min=torch.finfo(torch.float32).tiny)[self.row[:, 0]]

    def runs(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For sorted centroids c [rows, k]: the cut positions [rows, k-1] between
        nearest-centroid runs, and each run's start and end [rows, k] in the sorted values."""
        R, N = self.xs.shape
        cut = torch.searchsorted(self.xs, ((c[:, 1:] + c[:, :-1]) / 2).float().contiguous())
        bounds = torch.cat([torch.zeros(R, 1, dtype=torch.int64), cut, torch.full((R, 1), N)], 1)
        return cut, bounds[:, :-1], bounds[:, 1:]

    def _sums(self, prefix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        flat = prefix.view(-1)
        return (flat.index_select(0, (self.base + hi).view(-1)) - flat.index_select(0, (self.base + lo).view(-1))) \
            .view(hi.shape)

    def lloyd(self, c: torch.Tensor, iters: int, tol: float) -> tuple[torch.Tensor, int, bool]:
        """Lloyd iterations from centroids c [rows, k] (float64); returns (sorted centroids,
        iterations run, converged)."""
        n_iter = 0
        for n_iter in range(1, iters + 1):
            c = torch.sort(c, dim=1).values
            cut, lo, hi = self.runs(c)
            mass = self._sums(self.pw, lo, hi)
            new = torch.where(mass > 0, self._sums(self.pwx, lo, hi) / mass.clamp(min=1e-300), c)
            empty = hi == lo
            if bool(empty.any()):
                new = self._reseed(new, empty, cut)
            shift = float(((new - c).abs().amax(1) / self.span).max())
            c = new
            if shift <= tol:
                return torch.sort(c, dim=1).values, n_iter, True
        return torch.sort(c, dim=1).values, n_iter, False

    def inertia(self, c: torch.Tensor) -> torch.Tensor:
        """[rows] weighted squared error of every value to its nearest centroid in sorted c."""
        _, lo, hi = self.runs(c)
        return (self._sums(self.pwxx, lo, hi) - 2 * c * self._sums(self.pwx, lo, hi)
                + c * c * self._sums(self.pw, lo, hi)).sum(1).clamp(min=0)

    def _reseed(self, c, empty, cut) -> torch.Tensor:
        """Move each empty cluster onto a value with the largest weighted error under the current
        centroids (the m-th empty cluster of a row takes its m-th worst value), as scikit-learn
        does; a group with fewer distinct values than clusters keeps duplicates."""
        R, k = c.shape
        N = self.xs.shape[1]
        label = torch.searchsorted(cut, torch.arange(N).expand(R, -1).contiguous(), right=True)
        xs = self.xs.double()
        err = self.ws[self.row[:, 0]].double() * (xs - c.gather(1, label)) ** 2
        worst = torch.topk(err, min(k, N), dim=1).indices
        rank = (empty.cumsum(1) - 1).clamp(max=worst.shape[1] - 1, min=0)
        return torch.where(empty, xs.gather(1, worst.gather(1, rank)), c)


def kmeans_1d(x: torch.Tensor, k: int, *, weights: torch.Tensor | None = None, init: str = "kmeans++",
              iters: int = 100, tol: float = 1e-6, restarts: int = 1,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, KMeansInfo]:
    """Weighted Lloyd k-means of each row of ``x`` [G, N] into ``k`` values, all groups at once.

    ``weights`` [G, N] (positive) is each value's importance (None: all equal). Stops after
    ``iters`` iterations or when no centroid of any group moved by more than ``tol`` times its
    group's value range. Empty clusters are re-seeded at the values with the largest weighted
    error. With k-means++ seeding, ``restarts`` seedings run side by side and each group keeps
    its best (weighted objectives have many poor local optima). Returns (centroids [G, k]
    float32, sorted; indices int64 [G, N] of each value's nearest centroid; info).

        >>> lut, idx, info = kmeans_1d(torch.randn(2, 1000), 8)
        >>> lut.gather(1, idx).shape
        torch.Size([2, 1000])
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans_1d expects values [groups, n], got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans_1d needs at least one cluster, got k={k}")
    if init not in INITS:
        raise ValueError(f"unknown k-means init {init!r}; choose from {', '.join(INITS)}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x = x.detach().to(torch.float32)
    w = torch.ones_like(x) if weights is None else weights.detach().to(torch.float32).expand_as(x)
    G, N = x.shape
    if x.numel() == 0:
        return torch.zeros(G, k), torch.zeros(x.shape, dtype=torch.int64), KMeansInfo(0, True, torch.zeros(G))
    copies = max(1, restarts) if init == "kmeans++" else 1
    if init == "kmeans++":
        keep = torch.randperm(N, generator=gen)[:init_sample(k)] if N > init_sample(k) else slice(None)
        c0 = _kmeans_pp(x[:, keep].repeat(copies, 1), w[:, keep].repeat(copies, 1), k, gen)
    else:
        c0 = _uniform(x, k)
    groups = _SortedGroups(x, w, copies)
    c, n_iter, converged = groups.lloyd(c0.double(), iters, tol)
    best = groups.inertia(c).reshape(copies, G).argmin(0)
    lut = c.reshape(copies, G, k)[best, torch.arange(G)].float()
    idx = assign_nearest(x, lut)
    inertia = (w * (x - lut.gather(1, idx)) ** 2).sum(1)
    return lut, idx, KMeansInfo(n_iter, converged, inertia)


def input_importance(x: torch.Tensor, node: Node) -> torch.Tensor:
    """diag(XᵀX) of a layer input as its matmul sees it: one figure per weight column (for a
    conv, the im2col columns ordered like the flattened weight [in, kh, kw])."""
    x = x.to(torch.float32)
    if node.op == "linear":
        return (x.reshape(-1, x.shape[-1]) ** 2).sum(0)
    a = node.attrs
    kernel = tuple(node.input("weight").shape[2:])
    pad = a["padding"]
    # unfold only copies (or zero-pads) inputs, so unfolding the squares gives squared columns
    x2 = F.pad(x ** 2, [pad[1], pad[3], pad[0], pad[2]])
    return F.unfold(x2, kernel, dilation=a["dilation"], stride=a["stride"]).sum((0, 2))


def palettize_weight(w: torch.Tensor, bits: int, *, group_size: int | None = None,
                     importance: torch.Tensor | None = None, lut_dtype=torch.float16, init: str = "kmeans++",
                     iters: int = 100, tol: float = 1e-6, restarts: int = 1,
                     generator: torch.Generator | None = None, out_dtype="float32") -> tuple[Palettized, dict]:
    """k-means palettisation of ``w`` (rows = first axis) with one LUT per ``group_size`` rows
    (None: per tensor). ``importance`` [cols] weights column j's squared errors (SqueezeLLM).
    Returns the encoding and figures (relative error, weighted relative error, iterations)."""
    shape = tuple(w.shape)
    rows, cols = rows_cols(shape)
    gs = rows if group_size is None else group_size
    W = w.detach().to(torch.float32).reshape(rows // gs, gs * cols)
    imp = None
    if importance is not None:
        h = importance.detach().to(torch.float32).reshape(cols)
        # Columns no calibration input ever reached still count a little, so every value has
        # positive mass and k-means never divides by zero.
        h = h + 1e-6 * h.mean().clamp(min=torch.finfo(torch.float32).tiny)
        imp = h.repeat(gs).unsqueeze(0).expand_as(W)
    lut, _, info = kmeans_1d(W, 1 << bits, weights=imp, init=init, iters=iters, tol=tol, restarts=restarts,
                             generator=generator)
    lut = lut.to(lut_dtype)
    # Rounding the LUT to float16 can reorder near-equal entries: re-pick each nearest entry.
    idx = assign_nearest(W, lut.float())
    enc = Palettized.from_indices(idx, lut, bits=bits, shape=shape, group_size=gs, out_dtype=out_dtype)
    err = enc.decode(torch.float32).reshape(W.shape) - W
    weights = imp if imp is not None else torch.ones_like(W)
    figs = {"rel_error": float(err.norm() / W.norm().clamp(min=1e-30)),
            "weighted_rel_error": float(((weights * err ** 2).sum() / (weights * W ** 2).sum().clamp(min=1e-30))
                                        ** 0.5),
            "iters": info.iters}
    return enc, figs


@register_pass
@dataclass
class Palettize(LayerSelection, Pass):
    """k-means palettisation of linear/conv weights (embeddings too, with ``ops``).

    bits: index width, 1..8 (2^bits table entries). group_size: None for one LUT per tensor,
    else the number of output channels (rows) sharing a LUT; it must divide each layer's rows.
    weighting: "none", or "hessian" for SqueezeLLM-style sensitivity (needs calibration; layers
    without a matmul view, such as embeddings or grouped convs, are clustered unweighted).
    lut_dtype: "float16" or "float32". init: "kmeans++" or "uniform". restarts: k-means++ seedings
    per LUT, the best kept. iters / tol: Lloyd limits.
    """
    name = "palettize"
    bits: int = 4
    group_size: int | None = None
    weighting: str = "none"
    lut_dtype: str = "float16"
    init: str = "kmeans++"
    restarts: int = 4
    iters: int = 100
    tol: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if "matmul" in self.ops:
            raise PassError(f"{self.name}: matmul weights are [K, N], not [out, in]; palettize linear layers "
                            "(the cleanup passes turn matmul + add with a 2-D weight into linear)")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise PassError(f"{self.name}: bits must be an integer in 1..8 (a LUT of 2^bits entries), "
                            f"got {self.bits!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise PassError(f"{self.name}: group_size must be a positive number of rows per LUT, or None for "
                            f"one LUT per tensor; got {self.group_size!r}")
        for option, value, choices in (("weighting", self.weighting, WEIGHTINGS), ("lut_dtype", self.lut_dtype,
                                       tuple(LUT_DTYPES)), ("init", self.init, INITS)):
            if value not in choices:
                raise PassError(f"{self.name}: unknown {option} {value!r}; choose from {', '.join(choices)}")
        for option in ("iters", "restarts"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PassError(f"{self.name}: {option} must be a positive integer, got {value!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or self.tol < 0:
            raise PassError(f"{self.name}: tol must be a number >= 0, got {self.tol!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.weighting == "hessian"

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        if self.needs_calibration and not ctx.calibration:
            raise PassError(f"{self.name}: weighting=\"hessian\" needs calibration data to measure each layer's "
                            "input Hessian; pass calibration=[input tuples shaped like example_inputs] (to "
                            "nnforge.compile or PassContext), or use weighting=\"none\"")
        return self.run(graph, ctx)

    def targets(self, graph: Graph) -> list[tuple[Node, Value]]:
        """(first node, weight) for every selected dense float weight, each once; checks that
        group_size divides every layer's rows before any work is done."""
        seen, out = set(), []
        for node in self.select(graph):
            w = node.inputs[WEIGHT_SLOT]
            if w.name in seen or not isinstance(w.encoding, Dense) or not w.dtype.is_float:
                continue
            seen.add(w.name)
            rows, _ = rows_cols(w.shape)
            if self.group_size is not None and rows % self.group_size:
                raise PassError(f"{self.name}: layer {node.name} ({w.name}, {list(w.shape)}) has {rows} rows (output "
                                f"channels), which group_size {self.group_size} does not divide; choose a group "
                                f"size that divides it, exclude the layer (exclude=[\"{node.name}\"]), or use "
                                "group_size=None for one LUT per tensor")
            out.append((node, w))
        return out

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        targets = self.targets(graph)
        kinds: Counter = Counter()
        per_layer: dict[str, dict] = {}
        stored = [0, 0]                                  # bytes, weights

        def encode(node: Node, w: Value, importance=None):
            # Seeded per layer, so a layer's LUT does not depend on which other layers are selected.
            gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + zlib.crc32(w.name.encode()))
            enc, figs = palettize_weight(graph.weights[w.name].encoding.data, self.bits, group_size=self.group_size,
                                         importance=importance, lut_dtype=LUT_DTYPES[self.lut_dtype],
                                         init=self.init, iters=self.iters, tol=self.tol, restarts=self.restarts,
                                         generator=gen,
                                         out_dtype=w.dtype)
            graph.set_encoding(w.name, enc)
            kinds[enc.describe()] += 1
            stored[0] += enc.nbytes
            stored[1] += enc.numel
            per_layer[node.name] = {k: round(v, 6) if isinstance(v, float) else v for k, v in figs.items()}
            per_layer[node.name]["weighted"] = importance is not None

        weighted = {}
        unweighted = []
        for node, w in targets:
            if self.weighting == "hessian" and _has_matmul_view(node, w):
                weighted[node.name] = w
            else:
                if self.weighting == "hessian":
                    unweighted.append(node.name)
                # Encoded before the sweep, so the weighted layers after it see its real output.
                encode(node, w)
        if weighted:
            def before(node: Node, args):
                w = weighted.get(node.name)
                if w is None or not isinstance(graph.weights[w.name].encoding, Dense):
                    return
                encode(node, w, sum(input_importance(batch[0], node) for batch in args))

            run_calibration(graph, ctx.calibration, before, who=self.name, progress=ctx.progress, until=weighted)
        ctx.record("layers", sum(kinds.values()))
        ctx.record("encodings", dict(kinds))
        ctx.record("bits_per_weight", round(8 * stored[0] / max(stored[1], 1), 4))
        ctx.record("per_layer", per_layer)
        if unweighted:
            ctx.record("unweighted", unweighted)
        return graph


def _has_matmul_view(node: Node, w: Value) -> bool:
    """Whether the layer's weight columns line up with input features (the Hessian's axes)."""
    return node.op == "linear" or (node.op == "conv" and node.attrs.get("groups", 1) == 1 and len(w.shape) == 4)

"""Activation quantisation (W8A8, W4A8, W4A4, NVFP4) and SmoothQuant.

``quantize_activations`` puts a ``fake_quant`` with a static per-tensor scale, calibrated on the
calibration set, or a ``dynamic_quant`` whose scales each token computes from its own values (per
token, per group of channels, MX and NVFP4 blocks), in front of every selected layer's input
(layers reading the same value share one). Run it after the weight quantiser: the calibration then
sees the quantised model.

``smooth_quant`` (Xiao et al., 2023) moves activation outliers into the weights before both:
per input channel j, s_j = max|X_j|^alpha / max|W_:j|^(1-alpha); the layer computes
(X / s) (W s)ᵀ, the same product with flatter activations. 1/s is folded into a preceding
layer_norm when the layers are its only readers, else it is an explicit multiply.

One alpha does not fit every layer: migrating the outliers of a GELU output into the FFN's second
weight (BERT's ``output.dense``) makes a few weight columns dominate every row's scale, and on
all-MiniLM-L6-v2 a global alpha of 0.5 leaves W8A8 fidelity below no smoothing at all. So
``alpha="auto"`` (the default) picks, per group of layers reading one activation, the alpha on a
grid — or no smoothing — whose W8A8 output error on sampled calibration rows is least.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ...ir import Dense, Graph, GraphError, Node, Value, dtype
from ...ir.actquant import ACT_FORMATS, check as check_dynamic
from ...ir.ops.quant import fake_quantize
from ..base import LayerSelection, Pass, PassContext, PassError, register_pass
from .calibrate import run_calibration
from .formats import FormatError, parse_format, quantize_rtn

_BLOCK_FORMATS = ("mxfp8", "mxfp4", "nvfp4")      # block scales: dynamic whatever ``dynamic`` says
_ACT_FORMATS = {"int8": "int8", "uint8": "uint8", "int4": "int4", "e4m3": "float8_e4m3fn", "fp8": "float8_e4m3fn",
                "float8_e4m3fn": "float8_e4m3fn", "e5m2": "float8_e5m2", "float8_e5m2": "float8_e5m2"}


def _linear_groups(graph: Graph, sel: LayerSelection) -> dict[Value, list[Node]]:
    """Selected linear layers with dense weights, grouped by the activation they read."""
    groups: dict[Value, list[Node]] = defaultdict(list)
    for node in sel.select(graph):
        if node.op == "linear":
            groups[node.inputs[0]].append(node)
    return groups


@dataclass
class ActStats:
    """Per-channel min and max of an activation over the calibration set and, for a search, two
    folds (even and odd batches), each with a sample of its rows and its own per-channel min/max:
    a choice is scored on one fold's rows with the other fold's ranges (static ranges fitted and
    scored on the same rows never clip, and would favour flattening the activations too far)."""
    lo: torch.Tensor
    hi: torch.Tensor
    folds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _collect(graph: Graph, inputs: set, ctx: PassContext, who: str, sample_rows: int = 0) -> dict:
    """:class:`ActStats` of each value in ``inputs``, seen where its first selected reader reads it;
    with ``sample_rows``, folds holding that many rows (tokens) in all, drawn evenly from the batches."""
    stats: dict = {}
    gen = torch.Generator().manual_seed(0)

    def before(node: Node, args):
        x_val = node.inputs[0] if node.inputs else None
        if x_val not in inputs or x_val in stats:
            return
        flat = [b[0].float().reshape(-1, b[0].shape[-1]) for b in args]
        lows, highs = torch.stack([f.amin(0) for f in flat]), torch.stack([f.amax(0) for f in flat])
        st = ActStats(lows.amin(0), highs.amax(0))
        if sample_rows:
            per = -(-sample_rows // len(flat))
            for part in ([i for i in range(len(flat)) if i % 2 == k] for k in (0, 1)):
                if part:
                    rows = torch.cat([flat[i][torch.randperm(len(flat[i]), generator=gen)[:per]] for i in part])
                    st.folds.append((rows, lows[part].amin(0), highs[part].amax(0)))
        stats[x_val] = st

    # stop after the last reader: what follows (a decoder's LM head over the whole vocabulary, for
    # every batch) is neither needed nor held
    readers = [n.name for n in graph.nodes if n.inputs and n.inputs[0] in inputs]
    run_calibration(graph, ctx.calibration, before, who=who, progress=ctx.progress, until=readers)
    return stats


def act_format(name: str, who: str):
    if name not in _ACT_FORMATS:
        raise PassError(f"{who}: unknown activation format {name!r}; known: {', '.join(sorted(_ACT_FORMATS))}")
    return dtype(_ACT_FORMATS[name])


def act_grid(fmt, lo: float, hi: float) -> tuple[float, int]:
    """Static per-tensor (scale, zero point) for values seen in [lo, hi]: the range maps onto the
    whole grid (symmetric for int8 and FP8, with a zero point for uint8)."""
    if fmt.name == "uint8":
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max(hi - lo, 1e-12) / 255.0
        return scale, int(round(-lo / scale))
    top = float(fmt.int_range[1]) if fmt.is_integer else fmt.max_value
    return max(abs(lo), abs(hi), 1e-12) / top, 0


@register_pass
@dataclass
class QuantizeActivations(LayerSelection, Pass):
    """Quantisation of the inputs of linear layers (readers of one value share it).

    Static (the default for int8, uint8, int4, e4m3, e5m2): one per-tensor scale from the calibration
    set's range, a ``fake_quant``. Dynamic (``dynamic=True``, or a block format): a
    ``dynamic_quant`` whose scales come from each token's own values at run time
    (nnforge.ir.actquant): int8, int4 and e4m3 per token (or per ``group_size`` channels, with
    ``clip`` scaling each range), mxfp8 / mxfp4 per block of 32, nvfp4 per block of 16 with its
    tensor scale calibrated (static) or, with ``dynamic=True``, taken per token."""
    name = "quantize_activations"
    format: str = "int8"
    dynamic: bool = False
    group_size: int = 0
    clip: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if set(self.ops) - {"linear", "conv"}:
            raise PassError(f"{self.name}: activation quantisation covers linear layers")
        if not isinstance(self.dynamic, bool):
            raise PassError(f"{self.name}: dynamic must be true or false, got {self.dynamic!r}")
        if self._runs_dynamic:
            if self.format not in ACT_FORMATS:
                raise PassError(f"{self.name}: unknown dynamic activation format {self.format!r}; known: "
                                f"{', '.join(ACT_FORMATS)}")
            try:
                check_dynamic(self.format, self.group_size, self.clip, 0.0,
                              self.group_size or ACT_FORMATS[self.format][2] or 1, self.name)
            except ValueError as e:
                raise PassError(str(e)) from None
        else:
            act_format(self.format, self.name)
            if self.group_size or self.clip != 1.0:
                raise PassError(f"{self.name}: group_size and clip shape dynamic scales; static {self.format} "
                                "activations have one scale per tensor (set dynamic = true)")

    @property
    def _runs_dynamic(self) -> bool:
        return self.dynamic or self.format in _BLOCK_FORMATS

    @property
    def needs_calibration(self) -> bool:
        """Static scales (and nvfp4's static tensor scale) come from calibration data."""
        return not self._runs_dynamic or (self.format == "nvfp4" and not self.dynamic)

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        groups = _linear_groups(graph, self)
        stats = _collect(graph, set(groups), ctx, self.name) if self.needs_calibration else {}
        scales = {}
        for x, nodes in groups.items():
            first = min(nodes, key=graph.nodes.index)
            name = graph.fresh_name(f"{first.name}_act_quant", node=True)
            with graph.inserting_before(first):
                if self._runs_dynamic:
                    gs = 0.0
                    if self.format == "nvfp4" and not self.dynamic:
                        amax = max(float(stats[x].lo.abs().max()), float(stats[x].hi.abs().max()))
                        gs = max(amax, 1e-12) / (6.0 * 448.0)
                    try:
                        q = graph.op("dynamic_quant", x, format=self.format, group=self.group_size, clip=self.clip,
                                     global_scale=gs, name=name)
                    except GraphError as e:
                        raise PassError(f"{self.name}: layer {first.name}: {e}") from None
                    scales[first.name] = round(gs, 10) if gs else "dynamic"
                else:
                    fmt = act_format(self.format, self.name)
                    scale, zp = act_grid(fmt, float(stats[x].lo.min()), float(stats[x].hi.max()))
                    q = graph.op("fake_quant", x, format=fmt, scale=scale, zero_point=zp, name=name)
                    scales[first.name] = round(scale, 8)
            for n in nodes:
                n.inputs[0] = q
        ctx.record("activations", len(scales))
        ctx.record("scales", scales)
        return graph


ALPHA_GRID = tuple(i / 10 for i in range(11))


@register_pass
@dataclass
class SmoothQuant(LayerSelection, Pass):
    """Migrate activation outliers into the weights (see the module docstring). ``alpha`` in
    [0, 1] sets how much of the range moves, for every layer; ``"auto"`` chooses it per group of
    layers (or leaves the group alone) by the error of ``weight_format`` weights times
    ``act_format`` activations on ``sample_rows`` calibration rows. Run before weight and
    activation quantisation."""
    name = "smooth_quant"
    needs_calibration = True
    alpha: float | str = "auto"
    weight_format: str = "int8"
    act_format: str = "int8"
    sample_rows: int = 2048

    def __post_init__(self):
        super().__post_init__()
        if self.alpha != "auto" and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                     or not 0 <= self.alpha <= 1):
            raise PassError(f"{self.name}: alpha must be in [0, 1] or 'auto', got {self.alpha!r}")
        try:
            self._wfmt = parse_format(self.weight_format)
        except FormatError as e:
            raise PassError(f"{self.name}: weight_format: {e}") from None
        self._afmt = act_format(self.act_format, self.name)
        if isinstance(self.sample_rows, bool) or not isinstance(self.sample_rows, int) or self.sample_rows < 16:
            raise PassError(f"{self.name}: sample_rows must be an integer >= 16, got {self.sample_rows!r}")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        groups = {x: nodes for x, nodes in _linear_groups(graph, self).items()
                  if all(isinstance(n.inputs[1].encoding, Dense) for n in nodes)}
        auto = self.alpha == "auto"
        stats = _collect(graph, set(groups), ctx, self.name, sample_rows=self.sample_rows if auto else 0)
        readers = graph.uses()
        folded = inserted = 0
        chosen: dict[str, float | None] = {}
        for x, nodes in groups.items():
            weights = [n.inputs[1].encoding.data.float() for n in nodes]
            st = stats[x]
            alpha = self._choose_alpha(st, weights) if auto else float(self.alpha)
            chosen[nodes[0].name] = alpha
            if alpha is None:
                continue
            s = smoothing_factors(st.lo, st.hi, weights, alpha)
            for n, w in zip(nodes, weights):
                graph.set_encoding(n.inputs[1].name, Dense((w * s).to(n.inputs[1].encoding.data.dtype)))
            ln = x.producer
            only_these = {r for r, _ in readers.get(x, [])} == set(nodes) and x not in graph.outputs
            if ln is not None and ln.op == "layer_norm" and only_these and _fold_into_layer_norm(graph, ln, s):
                folded += 1
                continue
            inv = graph.add_weight(graph.fresh_name(f"{nodes[0].name}.smooth_inv"), Dense((1.0 / s).to(x.dtype.torch_dtype)))
            first = min(nodes, key=graph.nodes.index)
            with graph.inserting_before(first):
                y = graph.op("mul", x, inv, name=graph.fresh_name(f"{first.name}_smooth", node=True))
            for n in nodes:
                n.inputs[0] = y
            inserted += 1
        ctx.record("folded_into_layer_norm", folded)
        ctx.record("multiplies_inserted", inserted)
        ctx.record("alpha", chosen)
        return graph

    def _choose_alpha(self, st: ActStats, weights: list[torch.Tensor]) -> float | None:
        """The grid alpha (None: no smoothing) with the least relative output error of the
        quantised layers, on each fold's rows, smoothed and quantised with factors and ranges from
        the other fold alone (both are fitted to per-channel maxima, which vary between samples)."""
        best, best_err = None, None
        for alpha in (None, *ALPHA_GRID):
            err = norm = 0.0
            for k, (x, _, _) in enumerate(st.folds):
                _, lo, hi = st.folds[1 - k] if len(st.folds) == 2 else st.folds[k]
                s = torch.ones_like(hi) if alpha is None else smoothing_factors(lo, hi, weights, alpha)
                scale, zp = act_grid(self._afmt, float((lo / s).min()), float((hi / s).max()))
                xq = fake_quantize(x / s, self._afmt, scale, zp)
                for w in weights:
                    y = x @ w.T
                    err += float((xq @ quantize_rtn(w * s, self._wfmt).decode(torch.float32).T - y).pow(2).sum())
                    norm += float(y.pow(2).sum())
            err /= norm or 1.0
            if best_err is None or err < best_err:
                best, best_err = alpha, err
        return best


def smoothing_factors(lo: torch.Tensor, hi: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:j|^(1-alpha), over every layer reading X (whose per-channel
    minimum and maximum are ``lo`` and ``hi``)."""
    a = torch.maximum(lo.abs(), hi.abs()).clamp(min=1e-5)
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    return (a.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def _fold_into_layer_norm(graph: Graph, ln: Node, s: torch.Tensor) -> bool:
    """Divide a layer_norm's scale and shift by ``s`` (over its last axis only)."""
    w = ln.inputs[1] if len(ln.inputs) > 1 else None
    b = ln.inputs[2] if len(ln.inputs) > 2 else None
    if w is None or not w.is_weight or not isinstance(w.encoding, Dense) or w.shape != tuple(s.shape):
        return False
    if b is not None and (not b.is_weight or not isinstance(b.encoding, Dense)):
        return False
    graph.set_encoding(w.name, Dense(w.encoding.data / s.to(w.encoding.data.dtype)))
    if b is not None:
        graph.set_encoding(b.name, Dense(b.encoding.data / s.to(b.encoding.data.dtype)))
    return True

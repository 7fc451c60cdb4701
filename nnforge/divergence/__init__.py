"""Where accuracy goes: a per-layer account of how a bundle's compressed graph, and its runtime,
depart from the fp32 model.

:func:`compare_layers` runs the fp32 graph and the bundle's compressed graph on the reference
interpreter with the same inputs, matches their values by name, and reports one row per float
value both compute (weight layers are the rows whose node reads a weight). With ``F`` the fp32
run's value, ``C`` the compressed run's and ``L`` the node re-run on the fp32 run's inputs with the
bundle's weights (and any node a pass put in front of it, such as activation rounding):

* ``sqnr_db``, ``cosine``: ``C`` against ``F`` (:func:`nnforge.numerics.compare`: the cosine is the
  minimum over the leading axis, as in the manifest's ``fidelity_vs_fp32``).
* own error ``L - F``: what this node adds by itself (``own_sqnr_db``, ``own_cosine``);
  inherited error ``C - L``: what reaches it from upstream, carried through the node.
  ``C - F = (L - F) + (C - L)`` exactly, so the noise powers relative to the signal (``noise`` =
  ``|C - F|^2 / |F|^2`` = 10^(-SQNR/10)) add up: ``noise = own_noise + inherited_noise +
  cross_noise``, the cross term being ``2 <L - F, C - L> / |F|^2``.
* ``share``: each compressed weight's part of the end-to-end error. The weights are switched from
  fp32 to their encodings one at a time in graph order (run k has the first k encoded), and the
  output differences ``d_k = out_k - out_(k-1)`` telescope: ``C_out - F_out = residual + sum d_k``,
  the residual ``out_0 - F_out`` being what is not in the weights (activation rounding, rewritten
  structure). A weight's share is ``<d_k, e> / <e, e>`` with ``e = C_out - F_out`` over all float
  outputs: shares and residual sum to 1, and a share times the end-to-end noise is the noise that
  weight causes at the outputs. The graph outputs' rows are the end-to-end figures themselves.

Where the bundle's runtime runs here, each row also has the runtime's value against the reference
interpreter's, and :attr:`Report.first_departure` is the first row, in graph order, beyond the
manifest's tolerance: where a backend bug starts. ONNX Runtime shows every value (each becomes an
output of a copy of model.onnx; the copy's outputs are checked against the bundle's own), an FPGA
design every activation (from its bit-accurate emulation, checked equal to the C-simulation); other
runtimes (tvm, Triton) are compared at the graph outputs only.

A bundle holds the compressed graph and the fp32 *outputs*, not the fp32 weights: pass ``original``
(the fp32 Graph, or a torch module or .onnx path imported with ``inputs``); for zoo models (the
default model included) it is rebuilt from the zoo. It must reproduce the bundle's stored fp32
outputs on the reference inputs, or it is refused.

    >>> report = compare_layers("bundles/minilm-onnx-w3-gptq")
    >>> print(report.format_table())
    >>> report.write_json("divergence.json"); report.write_plot("sqnr.svg")     # and sqnr.png
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..errors import NnforgeError
from ..ir import Graph, Interpreter, WEIGHT_OPS
from ..ir.interpreter import bind_inputs
from ..ir.ops import RunContext, get_op
from ..numerics import BACKEND_TOLERANCE, FP32_TOLERANCE, compare, json_safe, within, within_rounding
from .report import format_table


class DivergenceError(NnforgeError, ValueError):
    """The comparison cannot be made (no fp32 weights, an original that is not the bundle's model)."""


@dataclass
class Row:
    """One value computed by both graphs (see the module docstring for the figures)."""
    index: int                      # position of its node in the compressed graph
    node: str
    op: str
    value: str
    weight: str | None              # the weight the node reads, for weight layers
    encoding: str | None
    sqnr_db: float
    cosine: float
    own_sqnr_db: float
    own_cosine: float
    inherited_sqnr_db: float
    noise: float
    own_noise: float
    inherited_noise: float
    cross_noise: float
    nonfinite: int = 0              # positions where C or L and F disagree on an inf/NaN (left out)
    share: float | None = None      # part of the end-to-end error (first node reading a weight)
    backend: dict | None = None     # the runtime's value: vs the reference interpreter and vs fp32


@dataclass
class Report:
    bundle: str
    target: str
    backend_name: str
    recipe: str
    inputs: list                    # input shapes
    end_to_end: dict                # compressed outputs vs fp32 (numerics.compare)
    rows: list[Row]
    attribution: dict | None = None   # {"residual": float, "weights": [{weight, node, share}]}
    backend: dict = field(default_factory=dict)   # {"inspected": bool, "why"/"tolerance"/...}

    @property
    def layers(self) -> list[Row]:
        """Rows of weight layers, in graph order."""
        return [r for r in self.rows if r.weight is not None]

    @property
    def first_departure(self) -> Row | None:
        """The first row where the runtime leaves the reference interpreter beyond tolerance."""
        return next((r for r in self.rows if r.backend and not r.backend["within"]), None)

    def worst(self, n: int = 10, by: str = "own_sqnr_db") -> list[Row]:
        """The ``n`` weight layers with the lowest ``by`` (or the highest, for ``share``)."""
        if by == "share":
            return sorted((r for r in self.layers if r.share is not None), key=lambda r: -r.share)[:n]
        return sorted(self.layers, key=lambda r: getattr(r, by))[:n]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [json_safe({k: v for k, v in asdict(r).items()}) for r in self.rows]
        d["end_to_end"] = json_safe(self.end_to_end)
        dep = self.first_departure
        d["first_departure"] = None if dep is None else dep.node
        return d

    def write_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def format_table(self, top: int = 10) -> str:
        return format_table(self, top)

    def write_plot(self, path) -> list[Path]:
        """SQNR by value (nnforge.plots.sqnr_figure) as ``path`` (.svg or .png) and the other
        format beside it; returns both paths."""
        from .. import plots
        return plots.save(plots.sqnr_figure(self), path)


# --- inputs and the fp32 graph --------------------------------------------------------------------
def _inputs(graph: Graph, inputs) -> list[torch.Tensor]:
    tensors, _ = bind_inputs(graph, inputs)
    return tensors


def fp32_graph(bundle, original=None, inputs=None) -> Graph:
    """The bundle's model in fp32 as a graph with the compressed graph's value names: ``original``
    (a Graph, torch module or model path), or the zoo model the bundle was compiled from, imported
    and cleaned up as ``nnforge.compile`` does before compressing."""
    from ..passes import PassManager, cleanup_passes
    from ..frontend import import_model
    if original is None and bundle.manifest["recipe"]["name"] == "fp32":
        graph = bundle.graph()                  # nothing compressed: the bundle's graph is the fp32 one
    elif isinstance(original, Graph):
        graph = original
    elif original is not None:
        graph, _ = import_model(original, tuple(inputs))
    else:
        model, example, dyn, ins, outs = _zoo_model_of(bundle)
        graph, _ = import_model(model, example, dynamic_shapes=dyn, input_names=ins, output_names=outs)
    return PassManager(cleanup_passes()).run(graph)


def _zoo_model_of(bundle):
    """The zoo entry whose module holds the bundle's uncompressed (dense float) weights: the one the
    manifest names first, then the others (``nnforge compile default`` names its graph after the
    module class, DefaultModel)."""
    from ..ir import Dense
    from ..models import ZOO, zoo_model
    name = bundle.manifest["model"]["name"]
    dense = {w.name: w.encoding.data for w in bundle.graph().weights.values()
             if isinstance(w.encoding, Dense) and w.encoding.data.is_floating_point()}
    for candidate in ([name] if name in ZOO else []) + [n for n in ZOO if n != name]:
        entry = zoo_model(candidate)
        state = entry[0].state_dict()
        shared = [k for k in dense if k in state and tuple(state[k].shape) == tuple(dense[k].shape)]
        same = sum(torch.equal(dense[k], state[k].to(dense[k].dtype)) for k in shared)
        if shared and 2 * same >= len(shared):
            return entry
    raise DivergenceError(f"bundle {bundle.path} holds compressed weights only, and its model {name!r} is not a "
                          f"zoo model ({', '.join(ZOO)}): pass the fp32 model (original=, or --model MODEL on the "
                          "command line)")


def _check_original(bundle, fp32_outs: list, reference_fp32: list) -> None:
    metrics = compare(fp32_outs, reference_fp32)
    if not within(metrics, FP32_TOLERANCE):
        raise DivergenceError(f"the fp32 model given for bundle {bundle.path} is not the one it was compiled from: "
                              f"on the bundle's reference inputs it agrees with the stored fp32 outputs to cosine "
                              f"{metrics['cosine_min']:.6f} < {FP32_TOLERANCE['cosine_min']}")


# --- the reference runs ---------------------------------------------------------------------------
class _Switched(Interpreter):
    """The compressed graph with some weights given as tensors (fp32 or decoded, shared across runs)."""

    def __init__(self, graph: Graph, given: Mapping[str, torch.Tensor]):
        super().__init__(graph)
        self._given = given

    def weight(self, name: str) -> torch.Tensor:
        return self._given[name] if name in self._given else super().weight(name)


def _sqnr(noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(1 / max(noise, 1e-300))


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def _finite(*ts: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """The row-shaped tensors with every position where one is not finite (masked attention
    scores: -inf) left out, i.e. zeroed in all; and how many such positions they disagree at."""
    ts = [_rows(t) for t in ts]
    bad = ~torch.isfinite(ts[0])
    for t in ts[1:]:
        bad |= ~torch.isfinite(t)
    if not bad.any():
        return ts, 0
    ref = ts[-1][bad]
    differ = torch.zeros_like(ref, dtype=torch.bool)
    for t in ts[:-1]:
        differ |= ~((t[bad] == ref) | (torch.isnan(t[bad]) & torch.isnan(ref)))
    return [t.masked_fill(bad, 0.0) for t in ts], int(differ.sum())


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of [rows, n] tensors."""
    return torch.linalg.vecdot(a, b)


def _cosine(ab, aa, bb) -> float:
    """The smallest row cosine, as numerics.compare: rows zero in both count as 1."""
    cos = ab / torch.clamp(torch.sqrt(aa * bb), min=1e-30)
    cos = torch.where((aa == 0) & (bb == 0), torch.ones_like(cos), cos)
    return float(cos.min())


def _figures(c: torch.Tensor, l: torch.Tensor, f: torch.Tensor) -> dict:
    """SQNR, cosine and noise powers of ``c`` (and ``l``) against ``f``; numerics.compare's
    definitions, computed once per value in float64 over the positions where all are finite."""
    (c, l, f), nonfinite = _finite(c, l, f)
    ff = _dot(f, f)
    signal = max(float(ff.sum()), 1e-300)
    e_own, e_inh = l - f, c - l
    n_own = float(_dot(e_own, e_own).sum()) / signal
    n_inh = float(_dot(e_inh, e_inh).sum()) / signal
    cross = 2 * float(_dot(e_own, e_inh).sum()) / signal
    e = e_own + e_inh
    n = float(_dot(e, e).sum()) / signal
    return {"sqnr_db": _sqnr(n), "cosine": _cosine(_dot(c, f), _dot(c, c), ff), "own_sqnr_db": _sqnr(n_own),
            "own_cosine": _cosine(_dot(l, f), _dot(l, l), ff), "inherited_sqnr_db": _sqnr(n_inh), "noise": n,
            "own_noise": n_own, "inherited_noise": n_inh, "cross_noise": cross, "nonfinite": nonfinite}


def _vs(a: torch.Tensor, ref: torch.Tensor) -> dict:
    """cosine_min, sqnr_db and max_abs_error of ``a`` against ``ref`` (as numerics.compare)."""
    (a2, r2), nonfinite = _finite(a, ref)
    rr, e = _dot(r2, r2), a2 - r2
    noise = float(_dot(e, e).sum()) / max(float(rr.sum()), 1e-300)
    return {"cosine_min": _cosine(_dot(a2, r2), _dot(a2, a2), rr), "sqnr_db": _sqnr(noise),
            "max_abs_error": float(e.abs().max()) if e.numel() else 0.0, "nonfinite": nonfinite}


def _layer_weight(node) -> str | None:
    if node.op in WEIGHT_OPS and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].is_weight:
        return node.inputs[1].name
    return next((v.name for v in node.inputs if v is not None and v.is_weight and v.encoding.kind != "dense"), None)


def _signature(node) -> tuple:
    return node.op, node.attrs, tuple(None if v is None else v.name for v in node.inputs)


def _runs(fp32: Graph, graph: Graph, inputs: list, backend_values: dict) -> tuple[list, list, list[Row], Interpreter]:
    """(fp32 outputs, compressed outputs, rows, the compressed graph's interpreter)."""
    f_vals: dict[str, torch.Tensor] = {v.name: t for v, t in zip(fp32.inputs, inputs)}

    f_nodes: dict[str, tuple] = {}          # value name -> (op, attrs, inputs) of the fp32 node computing it

    def keep(node, outs):
        for o, t in zip(node.outputs, outs):
            f_vals[o.name] = t
            f_nodes[o.name] = _signature(node)
    f_outs = Interpreter(fp32).run(*inputs, capture=keep)
    _, env = bind_inputs(graph, inputs)
    ctx = RunContext(env=env, float_dtype=torch.float32)
    interp = Interpreter(graph)
    local: dict[str, torch.Tensor] = {}      # values of nodes fp32 lacks, on the fp32 inputs' path
    rows: list[Row] = []
    index = {n: i for i, n in enumerate(graph.nodes)}

    def matched(v, t) -> bool:
        f = f_vals.get(v.name)
        return f is not None and tuple(f.shape) == tuple(t.shape) and f.dtype == t.dtype

    def same_as_fp32(node) -> bool:
        """The node reads no weight and only fp32 values, and fp32 has it as it is: L is F."""
        return all(v is None or (not v.is_weight and v.name not in local) for v in node.inputs) and \
            all(f_nodes.get(o.name) == _signature(node) for o in node.outputs)

    def _args(node) -> list:
        args = []
        for v in node.inputs:
            if v is None:
                args.append(None)
            elif v.is_weight:
                args.append(interp.weight(v.name))
            else:
                args.append(local[v.name] if v.name in local else f_vals[v.name])
        return args

    def step(node, outs):
        if same_as_fp32(node):
            own = [f_vals.get(o.name, c) for o, c in zip(node.outputs, outs)]
        else:
            own = get_op(node.op).run(ctx, _args(node), node.attrs)
        w = _layer_weight(node)
        for o, c, l in zip(node.outputs, outs, own):
            if not matched(o, c):
                local[o.name] = l
                continue
            if not c.is_floating_point():
                continue
            row = Row(index[node], node.name, node.op, o.name, w, graph.weights[w].encoding.describe() if w else None,
                      **_figures(c, l, f_vals[o.name]))
            b = backend_values.pop(o.name, None)
            if b is not None:
                row.backend = _backend_figures(torch.as_tensor(b), c, f_vals[o.name], graph)
            rows.append(row)
    c_outs = interp.run(*inputs, capture=step)
    return f_outs, c_outs, rows, interp


def _flat(outs) -> torch.Tensor:
    return torch.cat([o.double().flatten() for o in outs if o.is_floating_point()])


def _attribution(fp32: Graph, graph: Graph, inputs: list, f_outs, c_outs, interp: Interpreter) -> dict:
    """Telescoping shares of the end-to-end error, one per compressed weight (module docstring)."""
    f_interp = Interpreter(fp32)
    f_w = {name: f_interp.weight(name) for name in fp32.weights}
    order: list[str] = []
    for node in graph.nodes:
        for v in node.inputs:
            if v is not None and v.is_weight and v.name not in order and v.name in f_w:
                fw, cw = f_w[v.name], interp.weight(v.name)
                if fw.shape == cw.shape and fw.dtype == cw.dtype and not torch.equal(fw, cw):
                    order.append(v.name)
    e = _flat(c_outs) - _flat(f_outs)
    ee = float(e @ e)
    if ee == 0:
        return {"residual": 0.0, "weights": [], "end_to_end_noise": 0.0}
    given = {name: f_w[name] for name in order}
    prev = _flat(_Switched(graph, given).run(*inputs))
    residual = float((prev - _flat(f_outs)) @ e) / ee
    shares = []
    for k, name in enumerate(order):
        given[name] = interp.weight(name)
        out = _flat(c_outs) if k == len(order) - 1 else _flat(_Switched(graph, given).run(*inputs))
        shares.append({"weight": name, "share": float((out - prev) @ e) / ee})
        prev = out
    return {"residual": residual, "weights": shares,
            "end_to_end_noise": ee / max(float(_flat(f_outs) @ _flat(f_outs)), 1e-300)}


# --- the bundle's runtime -------------------------------------------------------------------------
def _backend_figures(b: torch.Tensor, c: torch.Tensor, f: torch.Tensor, graph: Graph) -> dict:
    b = b.to(c.dtype).reshape(c.shape) if b.numel() == c.numel() else b
    vs_ref, vs_fp32 = _vs(b, c), _vs(b, f)
    if any(n.op == "fake_quant" for n in graph.nodes) and not within(vs_ref, BACKEND_TOLERANCE):
        ok, _ = within_rounding(vs_fp32, _vs(c, f))
    else:
        ok = within(vs_ref, BACKEND_TOLERANCE)
    ok = ok and vs_ref["nonfinite"] == 0
    return {"cosine_vs_reference": vs_ref["cosine_min"], "max_abs_vs_reference": vs_ref["max_abs_error"],
            "sqnr_db_vs_fp32": vs_fp32["sqnr_db"], "cosine_vs_fp32": vs_fp32["cosine_min"],
            "nonfinite_vs_reference": vs_ref["nonfinite"], "within": bool(ok)}


def _backend_values(bundle, graph: Graph, inputs: list) -> tuple[dict, dict]:
    """(IR value name -> the runtime's value, what was done), or ({}, why not)."""
    from ..bundle import runtime_problems
    from ..targets import get_target
    name = bundle.manifest["backend"]["name"]
    ok, why = get_target(bundle.target).can_run()
    problems = runtime_problems(bundle.manifest) if ok else [why]
    if problems:
        return {}, {"name": name, "inspected": False, "why": "; ".join(problems)}
    runner = bundle.load()
    wanted = [v for n in graph.nodes for v in n.outputs if v.dtype.is_float]
    shown = runner.values([t.numpy() for t in inputs], wanted)
    if shown is not None:
        values, info = shown
    else:                               # the runtime's outputs only
        outs = runner(*[t.numpy() for t in inputs])
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        values = {v.name: np.asarray(o) for v, o in zip(graph.outputs, outs)}
        info = {"exposed": 0, "outputs_only": f"the {name} runtime does not show intermediate values: its outputs "
                                              "alone are compared"}
    tol = bundle.manifest["numerics"].get("tolerance", BACKEND_TOLERANCE)
    return values, {"name": name, "inspected": True, "tolerance": tol, **info}


# --- the entry point ------------------------------------------------------------------------------
def compare_layers(bundle, inputs=None, *, original=None, backends: bool = True, attribute: bool = True) -> Report:
    """Per-layer divergence of a bundle from its fp32 model (see the module docstring).

    bundle: a Bundle or its path. inputs: tensors in graph-input order or a mapping by input name
    (default: the bundle's reference inputs). original: the fp32 model (Graph, torch module or
    model path; default: rebuilt from the zoo). backends: also inspect the bundle's runtime where it
    runs here. attribute: compute each weight's share of the end-to-end error (one extra run of
    the graph per compressed weight).

        >>> r = compare_layers("bundles/mlp-onnx-w8", original=fp32_graph)
        >>> r.worst(3)[0].node, r.first_departure
    """
    from ..bundle import Bundle
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    graph = bundle.graph()
    ref_inputs, _, ref_fp32 = bundle.reference()
    tensors = _inputs(graph, ref_inputs if inputs is None else inputs)
    fp32 = fp32_graph(bundle, original, tensors)
    if inputs is not None:
        _check_original(bundle, Interpreter(fp32).run(*_inputs(fp32, ref_inputs)), ref_fp32)
    values, info = {}, {"name": bundle.manifest["backend"]["name"], "inspected": False, "why": "not asked for"}
    if backends:
        from ..backends.base import BackendError
        from ..bundle import BundleError
        try:
            values, info = _backend_values(bundle, graph, tensors)
        except (BackendError, BundleError) as e:     # the interpreter's account stands without it
            info["why"] = f"the runtime failed: {e}"
    f_outs, c_outs, rows, interp = _runs(fp32, graph, tensors, values)
    if inputs is None:
        _check_original(bundle, f_outs, ref_fp32)
    report = Report(str(bundle.path), bundle.target, bundle.manifest["backend"]["name"],
                    bundle.manifest["recipe"]["name"], [list(t.shape) for t in tensors],
                    compare(c_outs, f_outs), rows, backend=info)
    if attribute:
        report.attribution = _attribution(fp32, graph, tensors, f_outs, c_outs, interp)
        first = {}
        for r in rows:
            first.setdefault(r.weight, r)
        for s in report.attribution["weights"]:
            if s["weight"] in first:
                first[s["weight"]].share = s["share"]
                s["node"] = first[s["weight"]].node
    dep = report.first_departure
    if info.get("inspected"):
        info["first_departure"] = None if dep is None else dep.node
    return report

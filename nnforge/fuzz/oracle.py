"""Running one graph on one backend and judging it against the reference interpreter.

The judgement is the bundle check of :func:`nnforge.pipeline.runtime_check`: the backend's outputs
must be within ``BACKEND_TOLERANCE`` of the interpreter on the same (compressed) graph; a graph
that rounds activations at run time (``fake_quant``, ``dynamic_quant``) may instead be no further from the fp32
original than ``within_rounding`` allows. Integer and boolean outputs must match exactly, and
every output must have the dtype and shape the graph declares.

A backend that declines a graph (a BackendError at lowering naming an op or type it has no rule
for) is *unsupported*, not a failure.

    >>> run = run_backend(graph, "onnx", [inputs])
    >>> run.status, judge(graph, original, inputs, run.outputs[0]).ok
"""
from __future__ import annotations

import re
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backends.base import BackendError, get_backend
from ..ir import Graph, Interpreter
from ..numerics import BACKEND_TOLERANCE, compare, within, within_rounding
from .stability import ROUNDING_OPS
from ..targets import get_target

def fuzz_target(backend: str):
    """The target the fuzzer compiles for with ``backend``: the first one of that backend whose
    bundles run here, else the first one of that backend (a target name is taken as it is)."""
    from ..targets import list_targets
    mine = [t for t in list_targets() if t.backend == backend]
    if not mine:
        return get_target(backend)
    return next((t for t in mine if t.can_run()[0]), mine[0])


# A BackendError raised while lowering means "this backend does not take this graph" when the
# backend raised it itself (no exception under it) or it says so in these words; never when it
# reports a failure (an invalid model, a failed compile, a rule that broke its own contract).
UNSUPPORTED = ("has no lowering for op", "has no ONNX tensor type", "no numpy form", "ONNX has no",
               "needs explicit weight and bias", "not supported", "unsupported", "does not support",
               "needs every dimension fixed")
FAILURE = ("invalid model", "compiling graph", "failed", "lowered to")


@dataclass
class BackendRun:
    status: str                          # "ok" | "unsupported" | "error"
    outputs: list = field(default_factory=list)     # one list of tensors per input set
    stage: str = ""                      # where an error happened: lower | load | run
    message: str = ""

    @property
    def signature(self) -> str:
        """The message with numbers and names of values blurred, to group repeats of one problem."""
        first = self.message.splitlines()[0] if self.message else ""
        first = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", first)
        first = re.sub(r"(output \d+|node \S+) \(\w+\)", r"\1 (…)", first)       # value and node names
        return re.sub(r"\d+(\.\d+)?", "N", first)[:160]


def _unsupported(e: Exception) -> bool:
    text = str(e)
    if not isinstance(e, BackendError) or any(w in text for w in FAILURE):
        return False
    return e.__cause__ is None or any(p in text for p in UNSUPPORTED)


def run_backend(graph: Graph, backend: str, input_sets: list[list[torch.Tensor]]) -> BackendRun:
    """Lower ``graph`` for ``backend``'s fuzz target into a temporary directory the way
    ``nf.compile`` lowers (:func:`nnforge.pipeline.lower_into`: graph and weights written, the
    backend's prepare passes run), load it and run it on each input set."""
    from ..pipeline import lower_into
    target = fuzz_target(backend)
    shapes = {v.name: list(x.shape) for v, x in zip(graph.inputs, input_sets[0])}
    with tempfile.TemporaryDirectory(prefix="nnforge-fuzz-") as tmp:
        d = Path(tmp)
        stage = "lower"
        try:
            be = get_backend(target.backend)
            artifact = lower_into(d, graph.copy(), target, be, recipe="fuzz", shapes=shapes,
                                  reference=[x.clone() for x in input_sets[0]])
            stage = "load"
            runner = be.load(d, artifact.entry)
            stage = "run"
            outs = []
            for inputs in input_sets:
                got = runner(*[x.clone() for x in inputs])
                outs.append(list(got) if isinstance(got, tuple) else [got])
        except Exception as e:       # noqa: BLE001 — every failure is a result here
            if stage == "lower" and _unsupported(e):
                return BackendRun("unsupported", stage=stage, message=str(e))
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            return BackendRun("error", stage=stage, message=f"{type(e).__name__} at {stage}: {str(e) or tb}")
    return BackendRun("ok", outs)


@dataclass
class Verdict:
    ok: bool
    metrics: dict
    detail: str = ""


def judge(graph: Graph, original: Graph | None, inputs: list[torch.Tensor], got: list) -> Verdict:
    """The bundle check of nnforge.pipeline.runtime_check, plus declared dtypes and shapes."""
    expected = Interpreter(graph).run(*inputs)
    if len(got) != len(expected):
        return Verdict(False, {}, f"{len(got)} outputs, the graph has {len(expected)}")
    for i, (g, e, v) in enumerate(zip(got, expected, graph.outputs)):
        g = torch.as_tensor(g)
        if tuple(g.shape) != tuple(e.shape):
            return Verdict(False, {}, f"output {i} ({v.name}) has shape {list(g.shape)}, the reference {list(e.shape)}")
        want = v.dtype.torch_dtype
        if want is not None and g.dtype != want:
            return Verdict(False, {}, f"output {i} ({v.name}) is {g.dtype}, the graph declares {v.dtype}")
    got = [torch.as_tensor(g) for g in got]
    metrics = compare(got, expected)
    if within(metrics, BACKEND_TOLERANCE):
        return Verdict(True, metrics)
    worst = _worst_output(got, expected)
    if any(n.op in ROUNDING_OPS for n in graph.nodes):
        fp32 = Interpreter(original if original is not None else without_fake_quant(graph)).run(*inputs)
        fidelity = compare(expected, fp32)
        vs_fp32 = compare(got, fp32)
        ok, allowed = within_rounding(vs_fp32, fidelity)
        return Verdict(ok, metrics, f"rounded activations: backend vs fp32 cosine {vs_fp32['cosine_min']:.6f}, "
                                    f"allowed >= {allowed:.6f}; {worst}")
    return Verdict(False, metrics, f"cosine {metrics['cosine_min']:.6f} < {BACKEND_TOLERANCE['cosine_min']}, "
                                   f"exact match {metrics['exact_match']}; {worst}")


def without_fake_quant(graph: Graph) -> Graph:
    """``graph`` with its activations left unrounded: the fp32 reference of the rounding rule,
    for a graph whose original (before quantize_activations) is not at hand."""
    from .reduce import bypass
    g = graph
    for node in [n for n in graph.nodes if n.op in ROUNDING_OPS]:
        g = bypass(g, node.name, 0) or g
    return g


def _worst_output(got, expected) -> str:
    worst, where = 2.0, ""
    for i, (g, e) in enumerate(zip(got, expected)):
        m = compare([g], [e])
        score = m["exact_match"] if m["exact_match"] is not None else m["cosine_min"]
        if score < worst:
            worst, where = score, f"worst output {i}"
    return where


def check_bundle(graph: Graph, original: Graph, pipeline: str, passes, records, backend: str, inputs) -> None:
    """The case through the pipeline's last stages (:func:`nnforge.pipeline.build`: reference runs,
    lowering, the runtime check, the manifest) and :func:`nnforge.verify`, as ``nf.compile``
    writes and checks a bundle; raises what they raise."""
    import time
    from ..bundle.store import verify
    from ..pipeline import build
    target = fuzz_target(backend)
    with tempfile.TemporaryDirectory(prefix="nnforge-fuzz-bundle-") as tmp:
        out = Path(tmp) / "bundle"
        build(out, graph=graph.copy(), original=original, source="ir", target=target,
              backend=get_backend(target.backend), recipe_name=f"fuzz pipeline {pipeline}", passes=passes,
              records=records, check=[tuple(inputs)], import_check={}, timings={}, started=time.perf_counter())
        verify(out)

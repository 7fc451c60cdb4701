"""The fuzzing loop: generate a graph, compress it with random pipelines, run every backend,
judge each run against the reference interpreter, and keep a reduced repro of every failure.

For each graph (seed ``S``, graph ``i``):

1. :class:`~.generator.GraphGenerator` builds it (IR findings — a reference kernel disagreeing
   with its op's ``infer`` — are recorded as they come);
2. each of ``pipelines`` random :class:`~.pipelines.Pipeline` runs through the PassManager
   (verifier after every pass); a PassError means "not applicable", any other exception, or a
   graph that no longer serialises and reloads to the same outputs, is a finding;
3. the compressed graph is checked for stability (:mod:`.stability`) on the sample inputs (and,
   for graphs with a symbolic batch, on inputs at a second size): unstable cases are skipped and
   counted;
4. each backend lowers, loads and runs it (:mod:`.oracle`): unsupported graphs are counted per
   backend, errors and mismatches reduced (:mod:`.reduce`) and written (:mod:`.findings`).

    >>> stats = fuzz(seconds=60, seed=0, backends=["onnx", "tvm"], out="build/fuzz-findings")
    >>> stats.open_findings
"""
from __future__ import annotations

import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..ir import Interpreter, graph_from_dict, graph_to_dict
from ..passes import PassContext, PassError, PassManager
from .findings import write_finding
from .generator import Case, GraphGenerator
from .oracle import BackendRun, check_bundle, judge, run_backend
from .pipelines import Pipeline, random_pipeline
from .reduce import reduce_graph
from .stability import check_stable

MAX_SAVED_PER_SIGNATURE = 3


@dataclass
class Stats:
    graphs: int = 0
    pipelines: int = 0              # pipelines tried
    pipelines_run: int = 0          # ... that applied to their graph
    not_applicable: int = 0
    not_applicable_why: Counter = field(default_factory=Counter)  # message signature -> count
    unstable: int = 0
    backend_runs: int = 0
    bundles: int = 0                # cases also written with pipeline.build and checked with nf.verify
    passed: int = 0
    unsupported: Counter = field(default_factory=Counter)       # backend -> count
    unsupported_why: Counter = field(default_factory=Counter)   # (backend, message signature) -> count
    findings: Counter = field(default_factory=Counter)          # signature -> count
    saved: list[str] = field(default_factory=list)
    ir_findings: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def open_findings(self) -> int:
        return sum(self.findings.values()) + sum(self.ir_findings.values())

    def summary(self) -> str:
        lines = [f"graphs tried:     {self.graphs}",
                 f"pipelines tried:  {self.pipelines} ({self.pipelines_run} applied, {self.not_applicable} not "
                 f"applicable, {self.unstable} skipped as numerically unstable)",
                 f"backend runs:     {self.backend_runs} ({self.passed} passed, "
                 f"{sum(self.unsupported.values())} unsupported: "
                 + (", ".join(f"{b} {n}" for b, n in sorted(self.unsupported.items())) or "none")
                 + f"; {self.bundles} also written as bundles and verified)",
                 f"mismatches/errors: {sum(self.findings.values())} in {len(self.findings)} distinct signature(s)",
                 f"IR findings:      {sum(self.ir_findings.values())} in {len(self.ir_findings)} distinct",
                 f"time:             {self.seconds:.0f} s"]
        for sig, n in self.findings.most_common():
            lines.append(f"  [{n}x] {sig}")
        for sig, n in self.ir_findings.most_common():
            lines.append(f"  [IR {n}x] {sig}")
        for (backend, why), n in self.unsupported_why.most_common(5):
            lines.append(f"  [unsupported {n}x] {backend}: {why}")
        if self.saved:
            lines.append("findings written to: " + ", ".join(self.saved[:10]) + (" ..." if len(self.saved) > 10 else ""))
        return "\n".join(lines)


def compress(case: Case, pipeline: Pipeline, seed: int):
    """(compressed graph, None, the PassManager's records) or (None, "not applicable: ...", []), or
    raises on a pass failure."""
    calib = [tuple(case.sample_inputs(seed * 7 + k)) for k in range(3)]
    calib = [c for c in calib if all(bool(torch.isfinite(t).all()) for t in Interpreter(case.graph).run(*c)
                                     if t.is_floating_point())] or [tuple(case.inputs)]
    try:
        passes = pipeline.passes()
    except PassError as e:
        return None, f"not applicable: {e}", []
    pm = PassManager(passes)
    try:
        return pm.run(case.graph, PassContext(calibration=calib, seed=seed)), None, pm.records
    except PassError as e:
        return None, f"not applicable: {e}", []


def _roundtrip_problem(graph, inputs) -> str | None:
    """A compressed graph must serialise and reload to the same outputs, bit for bit."""
    try:
        doc, tensors = graph_to_dict(graph)
        again = graph_from_dict(doc, tensors)
    except Exception as e:      # noqa: BLE001
        return f"save/load failed: {type(e).__name__}: {e}"
    a, b = Interpreter(graph).run(*inputs), Interpreter(again).run(*inputs)
    for i, (x, y) in enumerate(zip(a, b)):
        if not torch.equal(x, y):
            return f"output {i} differs after save_graph/load_graph"
    return None


def _second_size(case: Case, seed: int) -> list | None:
    """Inputs at another size of the batch symbol, for graphs that have one."""
    if not case.dynamic:
        return None
    env = {k: v + 2 for k, v in case.env.items()}
    return case.sample_inputs(seed + 1, env)


class Fuzzer:
    """The loop of the module docstring; ``run`` returns its :class:`Stats`. Failures are written
    under ``out``; ``bundle_p`` of the passing backend runs are also written with pipeline.build
    and checked with nf.verify."""

    def __init__(self, *, seed: int = 0, backends=("onnx", "tvm"), out: str | Path = "build/fuzz-findings",
                 pipelines: int = 2, max_nodes: int = 12, ops: list[str] | None = None, reduce_s: float = 60.0,
                 bundle_p: float = 0.1, log=print):
        self.seed = seed
        self.backends = list(backends)
        self.out = Path(out)
        self.pipelines = pipelines
        self.max_nodes = max_nodes
        self.ops = ops
        self.reduce_s = reduce_s
        self.bundle_p = bundle_p
        self.log = log
        self.stats = Stats()

    def run(self, *, graphs: int | None = None, seconds: float | None = None) -> Stats:
        start = time.monotonic()
        i = 0
        while (graphs is None or i < graphs) and (seconds is None or time.monotonic() - start < seconds):
            self.one_graph(self.seed * 1_000_003 + i)
            i += 1
            self.stats.seconds = time.monotonic() - start
            if self.log and i % 10 == 0:
                s = self.stats
                self.log(f"[{s.seconds:5.0f}s] graphs {s.graphs}, pipelines {s.pipelines}, backend runs "
                         f"{s.backend_runs}, findings {s.open_findings}")
        return self.stats

    def one_graph(self, gseed: int) -> None:
        self.stats.graphs += 1
        try:
            case = GraphGenerator(gseed, max_nodes=self.max_nodes, ops=self.ops).generate()
        except Exception as e:      # noqa: BLE001 — the generator's own bug: reported, the run goes on
            self.stats.findings[f"generator: {type(e).__name__}: {e}"[:160]] += 1
            return
        for f in case.ir_findings:
            self.stats.ir_findings[BackendRun("error", message=f).signature] += 1
        j = 0
        for _ in range(self.pipelines):
            for _ in range(3):          # a pipeline that does not apply to this graph is redrawn
                pipeline = random_pipeline(random.Random(f"{gseed}-{j}"))
                j += 1
                try:
                    if self.one_pipeline(case, pipeline, gseed, j - 1):
                        break
                except Exception as e:      # noqa: BLE001 — e.g. the interpreter failing on a compressed graph
                    self._finding({"seed": gseed, "pipeline_index": j - 1, "pipeline": pipeline.to_dict(),
                                   "env": case.env, "kind": "internal", "backend": "reference",
                                   "message": f"{type(e).__name__}: {e}"}, case, None, None, None)
                    break

    def one_pipeline(self, case: Case, pipeline: Pipeline, gseed: int, j: int) -> bool:
        """Run one pipeline and every backend on its result; False when it did not apply."""
        s = self.stats
        s.pipelines += 1
        base = {"seed": gseed, "pipeline_index": j, "pipeline": pipeline.to_dict(), "env": case.env}
        try:
            compressed, why, records = compress(case, pipeline, gseed)
        except Exception as e:      # noqa: BLE001 — a pass that crashes or breaks the graph is a finding
            self._finding({**base, "kind": "pass", "backend": "passes", "message": f"{type(e).__name__}: {e}"},
                          case, None, None, None)
            return True
        if compressed is None:
            s.not_applicable += 1
            s.not_applicable_why[BackendRun("error", message=why).signature] += 1
            return False
        s.pipelines_run += 1
        input_sets = [case.inputs]
        second = _second_size(case, gseed)
        if second is not None:
            input_sets.append(second)
        stable = [x for x in input_sets if not check_stable(compressed, x)]
        if not stable:
            s.unstable += 1
            return True
        problem = _roundtrip_problem(compressed, stable[0])
        if problem:
            self._finding({**base, "kind": "serialize", "backend": "ir", "message": problem}, case, compressed,
                          None, None)
        for backend in self.backends:
            s.backend_runs += 1
            run = run_backend(compressed, backend, stable)
            if run.status == "unsupported":
                s.unsupported[backend] += 1
                s.unsupported_why[(backend, run.signature)] += 1
                continue
            if run.status == "error":
                self._failure(base, case, compressed, stable[0], backend, "error", run.message, {}, run.stage)
                continue
            bad = None
            for inputs, got in zip(stable, run.outputs):
                verdict = judge(compressed, case.graph, inputs, got)
                if not verdict.ok:
                    bad = (inputs, verdict)
                    break
            if bad is None:
                s.passed += 1
                if random.Random(f"bundle-{gseed}-{j}-{backend}").random() < self.bundle_p:
                    self._bundle(base, case, compressed, pipeline, records, backend, stable[0])
            else:
                self._failure(base, case, compressed, bad[0], backend, "mismatch", bad[1].detail, bad[1].metrics)
        return True

    def _bundle(self, base, case, compressed, pipeline, records, backend, inputs) -> None:
        self.stats.bundles += 1
        try:
            check_bundle(compressed, case.graph, pipeline.name, pipeline.passes(), records, backend, inputs)
        except Exception as e:      # noqa: BLE001
            self._finding({**base, "kind": "bundle", "backend": backend, "message": f"{type(e).__name__}: {e}"},
                          case, compressed, None, None)

    # --- failures -------------------------------------------------------------------------------
    def _failure(self, base, case, compressed, inputs, backend, kind, message, metrics, stage="") -> None:
        record = {**base, "kind": kind, "backend": backend, "message": message, "metrics": metrics}
        signature = self._signature(record)
        repro = repro_inputs = None
        if self.stats.findings[signature] < MAX_SAVED_PER_SIGNATURE:
            named = {v.name: x for v, x in zip(compressed.inputs, inputs)}

            def still_fails(g, xs):
                if check_stable(g, xs):
                    return False
                run = run_backend(g, backend, [xs])
                if kind == "error":
                    return run.status == "error" and run.stage == stage
                return run.status == "ok" and not judge(g, None, xs, run.outputs[0]).ok
            repro = reduce_graph(compressed, named, still_fails, self.reduce_s)
            repro_inputs = [named[v.name] for v in repro.inputs]
            record["repro_ops"] = sorted({n.op for n in repro.nodes})
        self._finding(record, case, compressed, repro, repro_inputs, signature)

    def _signature(self, record) -> str:
        run = BackendRun("error", message=re.sub(r"/\S*/", "…/", record["message"]))    # temporary paths
        return f"{record['kind']} {record['backend']}: {run.signature}"

    def _finding(self, record, case, compressed, repro, repro_inputs, signature=None) -> None:
        signature = signature or self._signature(record)
        count = self.stats.findings[signature]
        self.stats.findings[signature] += 1
        if self.log:
            self.log(f"FINDING {signature} (seed {record['seed']}, pipeline {record['pipeline']['name']})")
        if count >= MAX_SAVED_PER_SIGNATURE:
            return
        record["id"] = f"{record['kind']}-{record['backend']}-{record['seed']}-p{record['pipeline_index']}"
        record["signature"] = signature
        path = write_finding(self.out, record, original=case.graph, original_inputs=case.inputs,
                             compressed=compressed, repro=repro, repro_inputs=repro_inputs)
        self.stats.saved.append(str(path))


def fuzz(*, graphs: int | None = None, seconds: float | None = None, **options) -> Stats:
    """Run the fuzzer for ``graphs`` graphs or ``seconds`` (whichever ends first); see :class:`Fuzzer`."""
    return Fuzzer(**options).run(graphs=graphs, seconds=seconds)

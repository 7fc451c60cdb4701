"""Findings on disk: each one a directory a person (or a regression test) can replay.

    <out>/<kind>-<backend>-<seed>-p<pipeline>/
        case.json                         what failed, the seed, the pipeline, the message, the metrics
        original/graph.json, weights.safetensors     the generated graph (nnforge.ir.save_graph)
        compressed/graph.json, weights.safetensors   after the pipeline: what the backend was given
        repro/graph.json, weights.safetensors, inputs.safetensors   the reduced graph and its inputs

``python -m nnforge.fuzz --replay DIR`` runs the repro on its backend again and prints whether it
still fails (see :func:`replay`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..bundle import GRAPH_FILE, WEIGHTS_FILE, load_tensors, save_tensors
from ..ir import Graph, load_graph, save_graph
from .oracle import check_bundle, judge, run_backend
from .stability import check_stable

INPUTS_FILE = "inputs.safetensors"


def save_graph_dir(graph: Graph, path: Path, inputs: list[torch.Tensor] | None = None) -> None:
    """The graph (and its inputs) under ``path``; a graph that cannot be saved (the finding may be
    about just that) leaves its printed form and the reason in ``unsaved.txt``."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        save_graph(graph, path / GRAPH_FILE, path / WEIGHTS_FILE)
    except Exception as e:      # noqa: BLE001
        (path / "unsaved.txt").write_text(f"save_graph failed: {type(e).__name__}: {e}\n\n{graph}\n")
    if inputs is not None:
        save_tensors(path / INPUTS_FILE, {v.name: x.contiguous() for v, x in zip(graph.inputs, inputs)})


def load_graph_dir(path: Path) -> tuple[Graph, list[torch.Tensor] | None]:
    graph = load_graph(path / GRAPH_FILE, path / WEIGHTS_FILE)
    inputs = None
    if (path / INPUTS_FILE).exists():
        stored = load_tensors(path / INPUTS_FILE)
        inputs = [stored[v.name] for v in graph.inputs]
    return graph, inputs


def write_finding(out: Path, record: dict, *, original: Graph, original_inputs: list[torch.Tensor],
                  compressed: Graph | None, repro: Graph | None, repro_inputs: list[torch.Tensor] | None) -> Path:
    """Write one finding directory; returns its path."""
    d = out / record["id"]
    d.mkdir(parents=True, exist_ok=True)
    save_graph_dir(original, d / "original", original_inputs)
    if compressed is not None:
        save_graph_dir(compressed, d / "compressed")
    if repro is not None:
        save_graph_dir(repro, d / "repro", repro_inputs)
    record = {**record, "replay": f"python -m nnforge.fuzz --replay {d}"}
    (d / "case.json").write_text(json.dumps(record, indent=1, default=str))
    return d


def replay(path) -> dict:
    """Run a finding again: {"status": "fixed" | "fails" | "unsupported" | "unstable", ...}. A backend finding
    runs its repro on its backend; a pass finding runs its pipeline on the original graph (the
    sample inputs as calibration)."""
    d = Path(path)
    record = json.loads((d / "case.json").read_text())
    if record["kind"] in ("pass", "serialize") or not (d / "repro" / GRAPH_FILE).exists():
        return _replay_pipeline(d, record)
    graph, inputs = load_graph_dir(d / "repro")
    unstable = check_stable(graph, inputs)
    if unstable:
        return {"status": "unstable", "message": "not a fair test on these inputs: " + "; ".join(unstable[:3])}
    run = run_backend(graph, record["backend"], [inputs])
    if run.status == "error":
        return {"status": "fails", "kind": "error", "message": run.message}
    if run.status == "unsupported":
        return {"status": "unsupported", "message": run.message}
    verdict = judge(graph, None, inputs, run.outputs[0])
    return {"status": "fixed" if verdict.ok else "fails", "kind": "mismatch", "detail": verdict.detail,
            "metrics": verdict.metrics}


def _replay_pipeline(d: Path, record: dict) -> dict:
    from ..passes import PassContext, PassManager
    from .pipelines import Pipeline
    graph, inputs = load_graph_dir(d / "original")
    try:
        pm = PassManager(Pipeline.from_dict(record["pipeline"]).passes())
        compressed = pm.run(graph, PassContext(calibration=[tuple(inputs)], seed=record["seed"]))
        if record["backend"] in ("passes", "ir"):
            save_graph_dir(compressed, d / "replayed")
            return {"status": "fixed"}
        if record["backend"] == "reference":       # an exception in the loop: run the whole case again
            for backend in ("onnx", "tvm"):
                run = run_backend(compressed, backend, [inputs])
                if run.status == "ok":
                    judge(compressed, graph, inputs, run.outputs[0])
            return {"status": "fixed"}
        if record["kind"] == "bundle":
            check_bundle(compressed, graph, record["pipeline"]["name"], pm.passes, pm.records, record["backend"],
                         inputs)
            return {"status": "fixed"}
        run = run_backend(compressed, record["backend"], [inputs])
    except Exception as e:      # noqa: BLE001
        return {"status": "fails", "kind": record["kind"], "message": f"{type(e).__name__}: {e}"}
    if run.status != "ok":
        return {"status": "fails" if run.status == "error" else run.status, "message": run.message}
    verdict = judge(compressed, graph, inputs, run.outputs[0])
    return {"status": "fixed" if verdict.ok else "fails", "detail": verdict.detail}

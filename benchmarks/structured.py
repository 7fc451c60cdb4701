"""Wall-clock speed-up of structurally pruned `onnx` bundles of the default model against the
unpruned fp32 bundle, measured in the same run, with the fidelity each pruning keeps.

Structured pruning shrinks the weights (no masks), so the plain fp32 ONNX Runtime graph does less
work. Each recipe compresses all-MiniLM-L6-v2 (calibration: 480 sentences never used for
evaluation) and is compiled for `onnx` in fp32; every bundle is loaded in ONNX Runtime with the
machine's threads. Latency: real sentences padded to the longest of the batch, median over
stretches of runs that alternate between the runners. Fidelity: mean / min cosine and nearest-neighbour agreement of the bundle's embeddings
against fp32 torch on 500 held-out sentences. Writes benchmarks/out/structured.json.

    python benchmarks/structured.py [--rounds 30] [--batches 1 32] [recipe ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import nnforge as nf
from nnforge.models import default as dm
from nnforge.timing import alternating_ms, machine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_table  # noqa: E402

warnings.filterwarnings("ignore")
OUT = Path(__file__).parent / "out"
DEFAULT = ["prune-mlp-25", "prune-mlp-50", "prune-heads-25",
           '[{"pass": "prune_structured", "speedup": 1.3}]', '[{"pass": "prune_blocks", "count": 2}]']


def linear_params(bundle) -> tuple[int, int]:
    """(MLP weight parameters, all linear weight parameters) of a bundle's compressed graph."""
    mlp = total = 0
    for n in bundle.graph().nodes:
        if n.op == "linear" and n.inputs[1] is not None and n.inputs[1].is_weight:
            size = n.inputs[1].encoding.numel
            total += size
            if ("intermediate" in n.name or n.name.endswith("output.dense")) and "attention" not in n.name:
                mlp += size
    return mlp, total


def docs_rows(report: dict) -> tuple[list[str], list[list]]:
    """The docs table of structured.json: one line per recipe, weights kept, fidelity, and the
    speed-up over the unpruned fp32 bundle at each batch size."""
    batches = sorted({r["batch"] for r in report["rows"]})
    base = next(r for r in report["rows"] if r["recipe"] == "fp32")
    columns = ["recipe", "MLP weights", "linear weights", "mean cos", "NN agree",
               *(f"batch {b} x fp32" for b in batches)]
    rows = []
    for recipe in dict.fromkeys(r["recipe"] for r in report["rows"] if r["recipe"] != "fp32"):
        by_batch = {r["batch"]: r for r in report["rows"] if r["recipe"] == recipe}
        r = next(iter(by_batch.values()))
        rows.append([f"`{recipe}`", f"{r['mlp_params'] / base['mlp_params']:.3f}",
                     f"{r['linear_params'] / base['linear_params']:.3f}", docs_table.fmt(r["cosine_mean"], ".6f"),
                     docs_table.fmt(r["nn_agreement"], ".1%"),
                     *(f"{by_batch[b]['speedup']:.2f}x" if b in by_batch else None for b in batches)])
    return columns, rows


def write_docs(report: dict) -> None:
    columns, rows = docs_rows(report)
    docs_table.write("measured/structured.md", "structured", columns, rows, timed=True,
                     source="benchmarks/out/structured.json",
                     machine=report["meta"].get("measured_on"),
                     notes=[f"`onnx` bundles in fp32, ONNX Runtime {report['meta']['onnxruntime']}, "
                            f"{report['meta']['rounds']} calls a runner in alternating stretches; the speed-up is "
                            "the unpruned bundle's time over the pruned one's in the same run."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", help="preset names or JSON lists of pass configs")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = ap.parse_args()
    model, tok = dm.load_default_model()
    calib, evals = dm.sentence_splits()
    example = dm.encode(tok, evals[:8])
    calibration = dm.calibration_batches(tok, calib, 32)
    eval_batches = dm.batches(tok, evals[:500], 32)
    with torch.no_grad():
        reference = torch.cat([model(*b) for b in eval_batches])
    runners, info = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in ["fp32"] + (args.recipes or DEFAULT):
            recipe = None if spec == "fp32" else json.loads(spec) if spec.lstrip().startswith("[") else spec
            t0 = time.perf_counter()
            b = nf.compile(model, "onnx", recipe, example_inputs=example, calibration=calibration,
                           dynamic_shapes=dm.dynamic_shapes(), input_names=["input_ids", "attention_mask"],
                           output_names=["embeddings"], out=Path(tmp) / f"b{len(runners)}")
            run = nf.load(b.path)
            emb = torch.cat([torch.as_tensor(np.asarray(run(*e))) for e in eval_batches])
            fid = dm.evaluate_embeddings(reference, emb)
            mlp, total = linear_params(b)
            runners[spec] = run
            info[spec] = {"compile_s": round(time.perf_counter() - t0, 1), "mlp_params": mlp,
                          "linear_params": total, **fid.to_dict()}
            print(f"compiled {spec[:48]:<48} cos {fid.cosine_mean:.6f}  ({info[spec]['compile_s']} s)", flush=True)
        rows = []
        for bs in args.batches:
            batch = dm.encode(tok, evals[:bs])
            ms = alternating_ms(runners, batch, args.rounds)
            for spec in runners:
                rows.append({"recipe": spec, "batch": bs, "seq": int(batch[0].shape[1]), "ms": round(ms[spec], 3),
                             "speedup": round(ms["fp32"] / ms[spec], 3), **info[spec]})
    base = info["fp32"]
    print(f"\n{'recipe':<44} {'MLP w':>6} {'lin w':>6} {'cos mean':>9} {'cos min':>8} {'NN':>6} "
          f"{'batch':>5} {'seq':>4} {'ms':>8} {'x fp32':>7}")
    for r in rows:
        print(f"{r['recipe'][:44]:<44} {r['mlp_params'] / base['mlp_params']:>6.3f} "
              f"{r['linear_params'] / base['linear_params']:>6.3f} {r['cosine_mean']:>9.6f} {r['cosine_min']:>8.4f} "
              f"{r['nn_agreement']:>6.1%} {r['batch']:>5} {r['seq']:>4} {r['ms']:>8.2f} {r['speedup']:>7.3f}")
    OUT.mkdir(exist_ok=True)
    meta = {"machine": f"{os.cpu_count()} CPU threads", "onnxruntime": __import__("onnxruntime").__version__,
            "rounds": args.rounds, "load_average": os.getloadavg(), "measured_on": machine()}
    report = {"meta": meta, "rows": rows}
    (OUT / "structured.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {OUT / 'structured.json'}")
    write_docs(report)


if __name__ == "__main__":
    main()

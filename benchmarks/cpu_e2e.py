"""End to end on this CPU: block-sparse models compiled for the `cpu` target (TVM, our BSR kernels)
against the same models dense in torch eager and in ONNX Runtime, in one run.

Models: the default model (all-MiniLM-L6-v2, real weights) and a BERT-base-size encoder (12 x 768,
FFN 3072; random weights from a `transformers` config, seeded; the default model's tokenizer and
pooling). Each is pruned to 80% sparsity in 4x1 blocks: the default model with SparseGPT on the 480
calibration sentences (`block-sparse-80`), BERT-base by magnitude (random weights have nothing for
calibration to find, and SparseGPT on BERT-base costs minutes here). Runners:

- torch eager, dense fp32 (the unpruned model; threads = CPU count)
- ONNX Runtime, dense fp32: nnforge's `onnx` bundle of the unpruned model
- nnforge `cpu` bundle, dense fp32 (TVM, our scheduled dense GEMM)
- nnforge `cpu` bundle of the 80% block-sparse model (TVM, BSR kernels)
- with ``--tune``: the same two `cpu` bundles compiled with ``tune = true`` (each kernel template's
  configs measured per shape on this host, tuning.py), to show whether tuning pays end to end

Latency: real sentences padded to the longest of the batch; median over stretches of runs that
alternate between the runners, each after a pause and a warm-up run (benchmarks/timing.py: the
other runtimes' threads spin after their runs). Fidelity: mean / min cosine of the sparse bundle's
embeddings against fp32 torch (the default model: 500 held-out sentences, plus NN agreement).
Writes benchmarks/out/cpu_e2e.json (rows of models not run this time are kept) and the table in
docs/measured/cpu_e2e.md.

    python benchmarks/cpu_e2e.py [--models minilm bert-base] [--batches 1 32] [--rounds 30] [--tune]
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
from nnforge.models.zoo import zoo_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_table  # noqa: E402

warnings.filterwarnings("ignore")
OUT = Path(__file__).parent / "out"
RECIPE = {"minilm": "block-sparse-80",
          "bert-base": [{"pass": "prune_magnitude", "pattern": "block4x1", "sparsity": 0.8}]}


def embed(run, batches) -> torch.Tensor:
    return torch.cat([torch.as_tensor(np.asarray(run(*b))) for b in batches])


def print_tuning(path: Path) -> None:
    """Per layer shape: the schedule kept, and how fast the best other candidate was (summed over
    tune_rows) relative to the default: > 1 means an alternative beat the default."""
    for r in json.loads(path.read_text())["records"]:
        ms = {json.dumps(c["config"], sort_keys=True): sum(c["ms"].values()) for c in r["candidates"] if "ms" in c}
        default = json.dumps(r["default"], sort_keys=True)
        others = [v for k, v in ms.items() if k != default]
        best = f"{ms[default] / min(others):.2f}x" if others and default in ms else "-"
        kept = "default" if r["chosen"] == r["default"] else f"chose {r['chosen']}"
        print(f"  tuning {r['kernel']:<10} {r['key']:<24} {kept:<44} best other vs default: {best}", flush=True)


def bench_model(name: str, args, tmp: Path) -> list[dict]:
    model, _, dyn, ins, outs = zoo_model(name)
    _, tok = dm.load_default_model()
    calib, evals = dm.sentence_splits()
    example = dm.encode(tok, evals[:8])
    calibration = dm.calibration_batches(tok, calib, 32) if name == "minilm" else None
    common = dict(example_inputs=example, dynamic_shapes=dyn, input_names=ins, output_names=outs)
    t0 = time.perf_counter()
    bundles = {"ORT dense fp32": nf.compile(model, "onnx", None, out=tmp / f"{name}-onnx", **common),
               "nnforge cpu dense fp32": nf.compile(model, "cpu", None, out=tmp / f"{name}-cpu", **common),
               "nnforge cpu 80% block4x1": nf.compile(model, "cpu", RECIPE[name], calibration=calibration,
                                                      out=tmp / f"{name}-cpu-sparse", **common)}
    print(f"{name}: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.tune:
        tuned = nf.target("cpu").with_options(tune=True)
        for label, recipe in (("nnforge cpu dense fp32 tuned", None), ("nnforge cpu 80% block4x1 tuned", RECIPE[name])):
            t0 = time.perf_counter()
            bundles[label] = nf.compile(model, tuned, recipe, calibration=calibration if recipe else None,
                                        out=tmp / f"{name}-{label.split()[2]}-tuned", **common)
            print(f"{name}: {label} compiled (and tuned) in {time.perf_counter() - t0:.0f} s", flush=True)
            print_tuning(bundles[label].path / "tvm_tuning.json")
    sparse = bundles["nnforge cpu 80% block4x1"]
    fallbacks = sparse.manifest["fallbacks"]
    torch.set_num_threads(os.cpu_count() or 1)
    runners = {"torch eager dense fp32": lambda ids, mask: model(ids, mask)}
    runners.update({k: nf.load(b.path) for k, b in bundles.items()})
    eval_batches = dm.batches(tok, evals[:500] if name == "minilm" else evals[:64], 32)
    with torch.no_grad():
        reference = embed(runners["torch eager dense fp32"], eval_batches)
        fid = dm.evaluate_embeddings(reference, embed(runners["nnforge cpu 80% block4x1"], eval_batches)).to_dict()
        rows = []
        for bs in args.batches:
            batch = dm.encode(tok, evals[:bs])
            ms = alternating_ms(runners, batch, args.rounds)
            base, ort = ms["torch eager dense fp32"], ms["ORT dense fp32"]
            for runner, v in ms.items():
                rows.append({"model": name, "runner": runner, "batch": bs, "seq": int(batch[0].shape[1]),
                             "ms": round(v, 3), "x_torch": round(base / v, 3), "x_ort": round(ort / v, 3)})
    for r in rows:
        r.update({"sparse_fidelity": fid, "sparse_fallbacks": len(fallbacks)})
    print(f"{name}: 80% block-sparse bundle vs fp32 torch: mean cos {fid['cosine_mean']:.6f}, min "
          f"{fid['cosine_min']:.6f}, NN agreement {fid['nn_agreement']:.1%}; fallbacks: {len(fallbacks)}", flush=True)
    return rows


SPARSE = "nnforge cpu 80% block4x1"


def docs_rows(report: dict) -> tuple[list[str], list[list]]:
    """The docs table of cpu_e2e.json: ms per runner for each model and batch, the sparse bundle's
    speed-up over torch eager and ORT, and its fidelity."""
    runners = list(dict.fromkeys(r["runner"] for r in report["rows"]))
    columns = ["model", "batch", *(f"{r} ms" for r in runners), "sparse x torch / x ORT", "sparse mean cos"]
    rows = []
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in report["rows"]):
        got = {r["runner"]: r for r in report["rows"] if r["model"] == model and r["batch"] == batch}
        sparse = got.get(SPARSE)
        rows.append([model, batch, *(docs_table.fmt(got[n]["ms"], ".2f") if n in got else None for n in runners),
                     f"{sparse['x_torch']:.2f}x / {sparse['x_ort']:.2f}x" if sparse else None,
                     docs_table.fmt(sparse["sparse_fidelity"]["cosine_mean"]) if sparse else None])
    return columns, rows


def write_docs(report: dict) -> None:
    columns, rows = docs_rows(report)
    runs = report["meta"]["runs"]
    docs_table.write("measured/cpu_e2e.md", "cpu_e2e", columns, rows, timed=True, source="benchmarks/out/cpu_e2e.json",
                     notes=["Median ms per call in stretches alternating between the runners; real sentences "
                            "padded to the longest of the batch. Runs: " + "; ".join(
                                f"{name}: {m.get('rounds')} calls, load average {m.get('load_average')}"
                                for name, m in runs.items()) + "."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "bert-base"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--tune", action="store_true", help="also time bundles compiled with tune = true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args, Path(tmp))
    print(f"\n{'model':<10} {'runner':<32} {'batch':>5} {'seq':>4} {'ms':>9} {'x torch':>8} {'x ORT':>7}")
    for r in rows:
        print(f"{r['model']:<10} {r['runner']:<32} {r['batch']:>5} {r['seq']:>4} {r['ms']:>9.2f} "
              f"{r['x_torch']:>8.2f} {r['x_ort']:>7.2f}")
    OUT.mkdir(exist_ok=True)
    meta = {"machine": f"{os.cpu_count()} CPU threads", "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__, "rounds": args.rounds,
            "load_average": os.getloadavg(), "measured_on": machine()}
    # rows of models not run this time are kept, with the meta of the run that measured them
    path = OUT / "cpu_e2e.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old_meta = old.get("meta", {}) if isinstance(old.get("meta"), dict) else {}
    kept = [r for r in old.get("rows", []) if r.get("model") not in args.models]
    runs = {**(old_meta.get("runs") or {}), **{name: meta for name in args.models}}
    report = {"meta": {"runs": runs}, "rows": kept + rows}
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {OUT / 'cpu_e2e.json'}")
    write_docs(report)


if __name__ == "__main__":
    main()

"""Speed records and per-shape dispatch on the default model, target cpu (the tvm backend).

Compiles all-MiniLM-L6-v2 with each recipe at batch sizes 1 and 32 (the default of
nf.compile), then prints what `nnforge inspect` prints for each bundle: the bundle against the
same graph dense on tvm, against its compressed kernels alone and against torch eager, measured in
alternating stretches in one process, and every layer whose kernel the dispatch changed, with the
kernel times it decided on. The manifests' speed sections go to benchmarks/out/dispatch.json, and
the table to docs/measured/dispatch.md.

    python benchmarks/dispatch.py                      # w4-rtn, block-sparse-30, block-sparse-50
    python benchmarks/dispatch.py --recipes w8 --calibration 64

Inputs are the check inputs of the bundle: the first held-out sentences padded to one length;
batch 1 is the first of them, batch 32 repeats them. These are this machine's figures (2 cores
here), taken while the bundle is built; the JSON records the CPU count and the load average.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import docs_table  # noqa: E402

import nnforge as nf  # noqa: E402
from nnforge.models import default as dm  # noqa: E402
from nnforge.speed import describe  # noqa: E402


def docs_rows(results: dict) -> tuple[list[str], list[list]]:
    """The docs table of dispatch.json: per recipe and batch, each runner's ms and the layers the
    dispatch sent to the dense kernel."""
    labels = list(dict.fromkeys(k for r in results.values() for rec in r["speed"].get("records", [])
                                for k in rec.get("ms", {})))
    columns = ["recipe", "batch", *labels, "layers dispatched"]
    rows = []
    for recipe, r in results.items():
        layers = r["dispatch"].get("layers") or []
        for i, rec in enumerate(r["speed"].get("records", [])):
            count = f"{sum(bool(d.get('dispatched')) for d in layers)} of {len(layers)}" if i == 0 and layers else None
            ms = [docs_table.fmt(rec.get("ms", {}).get(k), ".2f") for k in labels]
            rows.append([f"`{recipe}`", rec["batch"], *ms,
                         count if "ms" in rec else f"not measured: {rec.get('skipped')}"])
    return columns, rows


def write_docs(results: dict) -> None:
    columns, rows = docs_rows(results)
    first = next(iter(results.values()))["speed"]
    docs_table.write("measured/dispatch.md", "dispatch", columns, rows, timed=True,
                     source="benchmarks/out/dispatch.json",
                     machine=first.get("machine"),
                     notes=["ms per call, median, as `nnforge inspect` prints each bundle's speed record: the "
                            "bundle, its compressed kernels alone, the same graph dense on tvm and torch eager, in "
                            "alternating stretches of one process; inputs are the check inputs (held-out sentences "
                            "padded to one length), batch 32 repeats them."])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["w4-rtn", "block-sparse-30", "block-sparse-50"])
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--calibration", type=int, default=128, help="calibration sentences (SparseGPT, GPTQ)")
    ap.add_argument("--out", default=str(ROOT / "out" / "dispatch.json"))
    args = ap.parse_args(argv)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    model, tok = dm.load_default_model()
    calib, evals = dm.sentence_splits()
    results = {}
    for recipe in args.recipes:
        t0 = time.perf_counter()
        bundle = nf.compile(model, "cpu", recipe, example_inputs=dm.encode(tok, evals[:8]),
                            check_inputs=dm.encode(tok, evals[:32]),
                            calibration=dm.calibration_batches(tok, calib[:args.calibration], 32),
                            dynamic_shapes=dm.dynamic_shapes(), input_names=["input_ids", "attention_mask"],
                            output_names=["embeddings"], name="minilm", out=ROOT / "out" / f"minilm-cpu-{recipe}",
                            batch_sizes=batch_sizes)
        m = bundle.manifest
        print(f"\n== {recipe}: built in {time.perf_counter() - t0:.0f} s, cosine vs fp32 "
              f"{m['numerics']['fidelity_vs_fp32']['cosine_min']:.6f}")
        print("\n".join(describe(m)))
        d = m["backend"]["entry"].get("dispatch", {})
        results[recipe] = {"speed": m["speed"], "dispatch": {k: d.get(k) for k in
                                                            ("enabled", "margin", "dispatched",
                                                             "dense_bytes_at_run_time", "layers")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    write_docs(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

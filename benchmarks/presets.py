"""Fidelity and compression time of compression presets (or any recipe) on the default model,
through the reference interpreter (what every backend is checked against).

Same protocol as `nnforge demo`: all-MiniLM-L6-v2 + mean pooling, 500 evaluation sentences never
used for calibration, calibration on the other 480 in length-sorted batches of 32; fidelity
against fp32 torch as mean/min cosine and nearest-neighbour agreement.

    python benchmarks/presets.py w8a8 fp8-w8a8 mixed-5
    python benchmarks/presets.py '[{"pass": "quantize_gptq", "format": "uint4", "group_size": 128}]'

Writes benchmarks/out/presets.json and the table in docs/measured/presets.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from nnforge.ir import Interpreter
from nnforge.models import default as dm
from nnforge.passes import PassContext, PassManager, cleanup_passes, resolve_recipe
from nnforge.frontend import import_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_table  # noqa: E402

warnings.filterwarnings("ignore")
OUT = Path(__file__).parent / "out"


def docs_rows(report: dict) -> tuple[list[str], list[list]]:
    """The docs table of presets.json: fidelity and pass time per recipe, with the figures its
    passes chose (formats per layer, bits per weight, SmoothQuant alpha)."""
    def chosen(figures) -> str | None:
        text = json.dumps(figures, default=str) if figures else None
        return text if text is None or len(text) <= 100 else text[:100] + "... (presets.json has it all)"
    columns = ["recipe", "mean cos", "min cos", "NN agree", "NN query", "passes s", "chosen"]
    return columns, [[f"`{r['recipe']}`", f"{r['cosine_mean']:.6f}", f"{r['cosine_min']:.6f}",
                      f"{r['nn_agreement']:.1%}", f"{r['query_agreement']:.1%}", f"{r['seconds']:.1f}",
                      chosen(r["figures"])] for r in report["rows"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="+", help="preset names or JSON lists of pass configs")
    args = ap.parse_args()
    model, tok = dm.load_default_model()
    calib, evals = dm.sentence_splits()
    graph, _ = import_model(model, dm.encode(tok, evals[:8]), dynamic_shapes=dm.dynamic_shapes(),
                            input_names=["input_ids", "attention_mask"])
    eval_batches = dm.batches(tok, evals[:500], 32)
    with torch.no_grad():
        reference = torch.cat([model(*b) for b in eval_batches])
    calibration = dm.calibration_batches(tok, calib, 32)
    rows = []
    print(f"{'recipe':<40} {'cos mean':>9} {'cos min':>9} {'NN agree':>8} {'NN query':>8} {'passes s':>8}  figures")
    for spec in args.recipes:
        recipe = json.loads(spec) if spec.lstrip().startswith("[") else spec
        name, passes = resolve_recipe(recipe)
        pm = PassManager(cleanup_passes() + passes)
        t0 = time.perf_counter()
        q = pm.run(graph, PassContext(calibration=calibration))
        seconds = time.perf_counter() - t0
        interp = Interpreter(q)
        fid = dm.evaluate_embeddings(reference, torch.cat([interp.run(*b)[0] for b in eval_batches]))
        extra = {k: v for r in pm.records for k, v in r.figures.items() if k in ("formats", "bits_per_weight", "alpha")}
        print(f"{spec[:40]:<40} {fid.cosine_mean:>9.6f} {fid.cosine_min:>9.6f} {fid.nn_agreement:>8.1%} {fid.query_agreement:>8.1%} "
              f"{seconds:>8.1f}  {json.dumps(extra) if extra else ''}", flush=True)
        rows.append({"recipe": spec, **fid.to_dict(), "seconds": round(seconds, 2), "figures": extra})
    report = {"meta": {"eval_sentences": len(evals[:500]), "calibration_sentences": len(calib)}, "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "presets.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {OUT / 'presets.json'}")
    docs_table.write("measured/presets.md", "presets", *docs_rows(report), source="benchmarks/out/presets.json",
                     notes=[f"Reference interpreter; {report['meta']['eval_sentences']} held-out sentences, "
                            f"{report['meta']['calibration_sentences']} calibration sentences; passes s: the "
                            "compression passes alone."])


if __name__ == "__main__":
    main()

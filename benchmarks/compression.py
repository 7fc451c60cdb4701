"""Bytes against fidelity for every compression family on the default model: a Pareto table and plot.

Each recipe (a preset name or a JSON list of pass configs) compresses all-MiniLM-L6-v2 and is
scored like `nnforge demo`: mean / min cosine of the embeddings and nearest-neighbour agreement
against fp32 torch on 500 evaluation sentences never used for calibration (calibration: the other
480, length-sorted batches of 32), run on the reference interpreter (what every backend is checked
against). Size is the stored bytes of the weights of the layers the passes compress (linear and
conv, after any pruning or factorisation: codes, scales, metadata, factors) against those layers'
fp32 bytes, so methods that change shapes and methods that change encodings are compared on one
axis. A recipe is on the Pareto front when no other recipe is both smaller and closer to fp32.

    python benchmarks/compression.py                 # the default list below
    python benchmarks/compression.py w8 sparse24 '[{"pass": "lowrank_svd", "rank_ratio": 0.5}]'

Writes compression.json, pareto.svg and pareto.png to benchmarks/out (or --out DIR).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from nnforge.ir import Interpreter, WEIGHT_OPS
from nnforge.models import default as dm
from nnforge.passes import PassContext, PassManager, cleanup_passes, resolve_recipe
from nnforge.frontend import import_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_table  # noqa: E402

warnings.filterwarnings("ignore")
OUT = Path(__file__).parent / "out"
# EoRA on w3-gptq at two ranks: the extra bytes its correction costs, next to w3-gptq itself
_W3_EORA = ('[{"pass": "quantize_eora", "format": "uint3", "group_size": 32, "scale_dtype": "float16", '
            '"ragged_groups": true, "act_order": true, "rank": %d, "factor_format": "int8"}]')
DEFAULT = ["fp32", "w8", "fp8", "w4-rtn", "w4-gptq", "w3-gptq", _W3_EORA % 32, _W3_EORA % 64, "nvfp4", "w4-gptq+eora",
           "sparse24", "sparse24-w4", "block-sparse-50", "prune-mlp-25", "prune-heads-25",
           "lowrank-50", "palettize-4", "palettize-3", "block-sparse-80", "block-sparse-80-w8"]
# The plain methods the floors were measured with, so every comparison prints in one run
BASELINES = ['[{"pass": "prune_magnitude", "pattern": "2:4"}]',
             '[{"pass": "prune_magnitude", "pattern": "unstructured", "sparsity": 0.5}]',
             '[{"pass": "prune_sparsegpt", "pattern": "unstructured", "sparsity": 0.5}]',
             '[{"pass": "lowrank_svd", "param_budget": 0.5}]',
             '[{"pass": "palettize", "bits": 4}]', '[{"pass": "palettize", "bits": 3}]']


def layer_bytes(graph) -> tuple[int, int]:
    """(stored bytes, fp32 bytes) of the weights read by weight-carrying ops (each weight once)."""
    seen, stored, params = set(), 0, 0
    for n in graph.nodes:
        if n.op not in WEIGHT_OPS or len(n.inputs) < 2 or n.inputs[1] is None or not n.inputs[1].is_weight:
            continue
        w = n.inputs[1]
        if w.name in seen or n.op == "embedding":
            continue
        seen.add(w.name)
        stored += w.encoding.nbytes
        params += w.encoding.numel
    return stored, 4 * params


def pareto(rows: list[dict]) -> None:
    """Mark rows no other row beats on both size and mean cosine."""
    for r in rows:
        r["pareto"] = not any(o is not r and o["bytes"] <= r["bytes"] and o["cosine_mean"] >= r["cosine_mean"]
                              and (o["bytes"] < r["bytes"] or o["cosine_mean"] > r["cosine_mean"]) for o in rows)


def label(spec: str) -> str:
    """A short name for a recipe: the preset's own, or each pass of a JSON list with the settings
    that tell it apart from the others in this benchmark."""
    if not spec.lstrip().startswith("["):
        return spec
    keys = ("pattern", "sparsity", "bits", "rank", "param_budget", "rank_ratio")

    def settings(p: dict) -> list[str]:
        return [f"{k}={p[k]}" for k in keys if p.get(k, "unstructured") != "unstructured"]
    return " + ".join(" ".join([p["pass"]] + settings(p)) for p in json.loads(spec))


def plot(rows: list[dict], out: Path) -> list[Path]:
    """pareto.svg and pareto.png: size ratio against mean cosine, each recipe labelled, the front joined."""
    from nnforge import plots
    fig = plots.pareto_figure([{**r, "label": label(r["recipe"])} for r in rows],
                              title="Size against fidelity: every compression family on all-MiniLM-L6-v2",
                              ylabel="mean cosine vs fp32 (500 held-out sentences)")
    return plots.save(fig, out / "pareto.svg")


def docs_rows(report: dict) -> tuple[list[str], list[list]]:
    """The docs table of compression.json, smallest first."""
    columns = ["recipe", "bytes vs fp32", "mean cos", "min cos", "NN agree", "NN query", "Pareto"]
    rows = [[f"`{r['recipe']}`", f"{r['ratio']:.3f}x", docs_table.fmt(r["cosine_mean"], ".6f"),
             docs_table.fmt(r["cosine_min"], ".6f"), docs_table.fmt(r["nn_agreement"], ".1%"),
             docs_table.fmt(r["query_agreement"], ".1%"), "yes" if r.get("pareto") else ""]
            for r in sorted(report["rows"], key=lambda r: r["bytes"])]
    return columns, rows


def write_docs(report: dict, source: str) -> None:
    columns, rows = docs_rows(report)
    docs_table.write("measured/compression.md", "compression", columns, rows, source=source,
                     notes=[f"bytes: stored bytes of the compressed layers' weights against their fp32 bytes "
                            f"({report['fp32_layer_bytes'] / 2**20:.1f} MiB); reference interpreter; 500 held-out "
                            "sentences, 480 calibration sentences."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", help="preset names or JSON lists of pass configs (default: a list "
                                               "covering every family)")
    ap.add_argument("--out", type=Path, default=OUT, help="directory for compression.json and the Pareto plot")
    args = ap.parse_args()
    model, tok = dm.load_default_model()
    calib, evals = dm.sentence_splits()
    graph, _ = import_model(model, dm.encode(tok, evals[:8]), dynamic_shapes=dm.dynamic_shapes(),
                            input_names=["input_ids", "attention_mask"])
    graph = PassManager(cleanup_passes()).run(graph, PassContext())
    eval_batches = dm.batches(tok, evals[:500], 32)
    with torch.no_grad():
        reference = torch.cat([model(*b) for b in eval_batches])
    calibration = dm.calibration_batches(tok, calib, 32)
    _, fp32_bytes = layer_bytes(graph)
    rows = []
    head = f"{'recipe':<34} {'bytes':>7} {'cos mean':>9} {'cos min':>9} {'NN agree':>8} {'NN query':>8} {'s':>6}  pareto"
    print(head + "\n" + "-" * len(head), flush=True)
    for spec in args.recipes or DEFAULT + BASELINES:
        recipe = json.loads(spec) if spec.lstrip().startswith("[") else spec
        try:
            _, passes = resolve_recipe(recipe)
        except Exception as e:                       # a preset this build does not have yet
            print(f"{spec[:34]:<34} not run: {e}", flush=True)
            continue
        t0 = time.perf_counter()
        q = PassManager(passes).run(graph, PassContext(calibration=calibration))
        seconds = time.perf_counter() - t0
        interp = Interpreter(q)
        fid = dm.evaluate_embeddings(reference, torch.cat([interp.run(*b)[0] for b in eval_batches]))
        stored, _ = layer_bytes(q)
        rows.append({"recipe": spec, "bytes": stored, "ratio": stored / fp32_bytes, **fid.to_dict(),
                     "seconds": round(seconds, 2)})
        r = rows[-1]
        print(f"{spec[:34]:<34} {r['ratio']:>6.3f}x {r['cosine_mean']:>9.6f} {r['cosine_min']:>9.6f} "
              f"{r['nn_agreement']:>8.1%} {r['query_agreement']:>8.1%} {seconds:>6.1f}", flush=True)
    if not rows:
        return
    pareto(rows)
    print("\nPareto front (smallest first; bytes of the compressed layers vs their fp32 bytes, "
          f"{fp32_bytes / 2**20:.1f} MiB):")
    for r in sorted((r for r in rows if r["pareto"]), key=lambda r: r["bytes"]):
        print(f"  {r['recipe'][:34]:<34} {r['ratio']:.3f}x  cos {r['cosine_mean']:.6f}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"fp32_layer_bytes": fp32_bytes, "rows": rows}
    (args.out / "compression.json").write_text(json.dumps(report, indent=1))
    write_docs(report, str(args.out / "compression.json"))
    figures = plot(rows, args.out)
    print(f"wrote {args.out / 'compression.json'}, " + " and ".join(map(str, figures)))


if __name__ == "__main__":
    main()

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

Writes compression.json and pareto.svg to benchmarks/out (or --out DIR).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from nnforge.ir import Interpreter, WEIGHT_OPS
from nnforge.models import default as dm
from nnforge.passes import PassContext, PassManager, cleanup_passes, resolve_recipe
from nnforge.pipeline import import_model

warnings.filterwarnings("ignore")
OUT = Path(__file__).parent / "out"
# EoRA on w3-gptq at two ranks: the extra bytes its correction costs, next to w3-gptq itself
_W3_EORA = ('[{"pass": "quantize_eora", "format": "uint3", "group_size": 128, "ragged_groups": true, '
            '"act_order": true, "rank": %d, "factor_format": "int8"}]')
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


def svg(rows: list[dict], fp32_bytes: int) -> str:
    """A scatter plot of size ratio against mean cosine, Pareto front joined (plain SVG: no plotting
    library is needed to read it)."""
    w, h, m = 760, 480, 60
    lo = min(0.0, min(r["cosine_mean"] for r in rows)) if any(r["cosine_mean"] < 0.5 for r in rows) else 0.5
    xmax = max(1.0, max(r["bytes"] / fp32_bytes for r in rows)) * 1.05

    def xy(r):
        x = m + (w - 2 * m) * (r["bytes"] / fp32_bytes) / xmax
        y = h - m - (h - 2 * m) * (r["cosine_mean"] - lo) / (1.0 - lo)
        return x, y

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="11">', f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle">compressed layer bytes / fp32 bytes</text>',
             f'<text x="16" y="{h / 2}" transform="rotate(-90 16 {h / 2})" text-anchor="middle">'
             f'mean cosine vs fp32 (MiniLM, 500 held-out sentences)</text>']
    for i in range(6):
        v = lo + (1 - lo) * i / 5
        y = h - m - (h - 2 * m) * i / 5
        parts.append(f'<text x="{m - 6}" y="{y + 4}" text-anchor="end">{v:.2f}</text>')
        x = m + (w - 2 * m) * i / 5
        parts.append(f'<text x="{x}" y="{h - m + 16}" text-anchor="middle">{xmax * i / 5:.2f}</text>')
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["bytes"])
    if len(front) > 1:
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(xy, front))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="#c33" stroke-dasharray="4 3"/>')
    for r in rows:
        x, y = xy(r)
        colour = "#c33" if r["pareto"] else "#369"
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
        parts.append(f'<text x="{x + 6:.1f}" y="{y - 5:.1f}">{r["recipe"][:28]}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", help="preset names or JSON lists of pass configs (default: a list "
                                               "covering every family)")
    ap.add_argument("--out", type=Path, default=OUT, help="directory for compression.json and pareto.svg")
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
    (args.out / "compression.json").write_text(json.dumps({"fp32_layer_bytes": fp32_bytes, "rows": rows}, indent=1))
    (args.out / "pareto.svg").write_text(svg(rows, fp32_bytes))
    print(f"wrote {args.out / 'compression.json'} and {args.out / 'pareto.svg'}")


if __name__ == "__main__":
    main()

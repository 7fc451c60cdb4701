"""The demo: compile the embedded default model for every target that runs here, with a few
recipes, and print one table of size, fidelity against fp32 torch, and latency against torch
eager measured in the same run.

Fidelity is measured on the evaluation sentences (never used for calibration): mean and min
cosine similarity of sentence embeddings, and nearest-neighbour agreement.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .api import compile as nf_compile, load, targets
from .backends.base import available_backends
from .models import default as dm

# Recipes the demo runs per backend. A backend joins the demo when it takes the whole default model
# (the hls backend takes MiniLM only with static shapes so far).
DEMO_RECIPES = {"onnx": ["fp32", "w8", "w4-rtn", "w4-gptq", "w3-gptq", "fp8", "mxfp4", "nvfp4", "w8a8", "fp8-w8a8"],
                # the cpu target's own kernels: int8/int4 weight GEMM, fp32 and u8 x s8 BSR SpMM
                "tvm": ["fp32", "w8", "w4-rtn", "block-sparse-80", "block-sparse-80-w8a8"]}
FP32_COSINE_FLOOR = 0.99999


@dataclass
class Row:
    target: str
    recipe: str
    bundle_mb: float
    deploy_mb: float
    cos_mean: float
    cos_min: float
    nn_agree: float
    query_agree: float
    ms_b1: float
    ms_b32: float
    torch_ms_b1: float
    torch_ms_b32: float


def _time(fn, *args, repeat: int = 10) -> float:
    fn(*args)                                   # warm-up
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - t0)
    return 1000 * statistics.median(samples)


def _embed(run, batches) -> torch.Tensor:
    return torch.cat([torch.as_tensor(run(*b)) for b in batches])


def run_demo(out: str | Path = "bundles/demo", n_eval: int = 500, quick: bool = False) -> list[Row]:
    model, tok = dm.load_default_model()
    calib, evals = dm.sentence_splits()
    evals = evals[: (64 if quick else n_eval)]
    eval_batches = dm.batches(tok, evals, 32)
    with torch.no_grad():
        reference = _embed(model, eval_batches)
        b32 = dm.encode(tok, evals[:32])
        b1 = dm.encode(tok, evals[:1])
        torch_ms = (_time(model, *b1), _time(model, *b32))
    rows = []
    runnable = [t for t in targets() if t.backend in available_backends() and t.backend in DEMO_RECIPES
                and t.runs_here]
    jobs = [(t, r) for t in runnable for r in DEMO_RECIPES[t.backend]]
    for tgt, recipe in tqdm(jobs, desc="compiling default model", unit="bundle"):
        bundle = nf_compile(model, tgt.name, None if recipe == "fp32" else recipe,
                            example_inputs=dm.encode(tok, evals[:8]), check_inputs=dm.encode(tok, evals[:64]),
                            calibration=dm.calibration_batches(tok, calib, 32), dynamic_shapes=dm.dynamic_shapes(),
                            input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
                            name="minilm", out=Path(out) / f"minilm-{tgt.name}-{recipe}")
        runner = load(bundle.path)
        fid = dm.evaluate_embeddings(reference, _embed(runner, eval_batches))
        rows.append(Row(tgt.name, recipe, bundle.size_bytes / 1e6, bundle.deploy_bytes / 1e6, fid.cosine_mean,
                        fid.cosine_min, fid.nn_agreement, fid.query_agreement, _time(runner, *b1), _time(runner, *b32), *torch_ms))
    return rows


def format_table(rows: list[Row], n_eval: int) -> str:
    rw = max([8] + [len(r.recipe) for r in rows])
    head = (f"{'target':<10} {'recipe':<{rw}} {'bundle MB':>9} {'deploy MB':>9} {'cos mean':>9} {'cos min':>9} "
            f"{'NN agree':>8} {'NN query':>8} {'ms b=1':>8} {'torch b=1':>9} {'x':>5} {'ms b=32':>8} {'torch b=32':>10} {'x':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.target:<10} {r.recipe:<{rw}} {r.bundle_mb:>9.1f} {r.deploy_mb:>9.1f} {r.cos_mean:>9.6f} "
                     f"{r.cos_min:>9.6f} {r.nn_agree:>8.1%} {r.query_agree:>8.1%} {r.ms_b1:>8.2f} {r.torch_ms_b1:>9.2f} "
                     f"{r.torch_ms_b1 / r.ms_b1:>5.2f} {r.ms_b32:>8.2f} {r.torch_ms_b32:>10.2f} "
                     f"{r.torch_ms_b32 / r.ms_b32:>5.2f}")
    lines.append(f"all-MiniLM-L6-v2 + mean pooling; fidelity on {n_eval} held-out sentences against fp32 torch; "
                 "NN agree: same nearest neighbour with both sides compressed; NN query: compressed queries "
                 "against the fp32 corpus; x = speed-up over torch eager (same machine, same run)")
    return "\n".join(lines)


def check_rows(rows: list[Row]) -> list[str]:
    """The demo's own acceptance: fp32 bundles must match torch to cosine >= 0.99999."""
    return [f"{r.target} fp32: min cosine {r.cos_min:.6f} < {FP32_COSINE_FLOOR}" for r in rows
            if r.recipe == "fp32" and r.cos_min < FP32_COSINE_FLOOR]

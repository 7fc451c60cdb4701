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

# Recipes the demo runs per backend. A backend joins the demo when it takes the whole default model.
DEMO_RECIPES = {"onnx": ["fp32", "w8", "w4-rtn", "w4-gptq", "w3-gptq", "fp8", "mxfp4", "nvfp4", "w8a8", "fp8-w8a8"],
                # the cpu target's own kernels: int8/int4 weight GEMM, fp32 and u8 x s8 BSR SpMM
                "tvm": ["fp32", "w8", "w4-rtn", "block-sparse-80", "block-sparse-80-w8a8"],
                # the FPGA design: 2:4 sparse int4 weights on the DSP chains, run here by C-simulation
                "hls": ["sparse24-w4"]}
FP32_COSINE_FLOOR = 0.99999
# Backends whose runtime here is a bit-accurate simulation of fixed-size hardware: each input size is
# a design of its own (a g++ build) and runs far slower than the device would, so the demo scores
# the first SIMULATED_EVAL held-out sentences in batches of 32 padded to one length (one design;
# the mask makes padding exact for this model) and reports no measured latency (the bundle's
# fpga/simulation.txt has the accelerator model's estimate).
SIMULATED_BACKENDS = {"hls"}
SIMULATED_EVAL = 64


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
    ms_b1: float | None
    ms_b32: float | None
    torch_ms_b1: float
    torch_ms_b32: float
    n_eval: int = 0
    note: str = ""


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
    # one target per simulated backend: its C-simulation is the same arithmetic on every part
    # (versal-vhk158 differs in DSP ports and clock, which only the resource and speed estimates see)
    firsts = {}
    for t in runnable:
        firsts.setdefault(t.backend, t.name)
    runnable = [t for t in runnable if t.backend not in SIMULATED_BACKENDS or firsts[t.backend] == t.name]
    jobs = [(t, r) for t in runnable for r in DEMO_RECIPES[t.backend]]
    sim_evals = evals[:SIMULATED_EVAL]
    sim_len = max(len(tok(t, truncation=True, max_length=dm.MAX_LEN)["input_ids"]) for t in sim_evals)
    sim_batches = [_padded(tok, sim_evals[i:i + 32], sim_len) for i in range(0, len(sim_evals), 32)]
    for tgt, recipe in tqdm(jobs, desc="compiling default model", unit="bundle"):
        simulated = tgt.backend in SIMULATED_BACKENDS
        bundle = nf_compile(model, tgt.name, None if recipe == "fp32" else recipe,
                            example_inputs=dm.encode(tok, evals[:8]),
                            check_inputs=sim_batches[0] if simulated else dm.encode(tok, evals[:64]),
                            calibration=dm.calibration_batches(tok, calib, 32), dynamic_shapes=dm.dynamic_shapes(),
                            input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
                            name="minilm", out=Path(out) / f"minilm-{tgt.name}-{recipe}",
                            # the demo times every runner itself, in one table against one torch timing;
                            # `nnforge compile` writes the per-bundle speed records and dispatch
                            batch_sizes=())
        runner = load(bundle.path)
        size = (tgt.name, recipe, bundle.size_bytes / 1e6, bundle.deploy_bytes / 1e6)
        if simulated:
            fid = dm.evaluate_embeddings(reference[:len(sim_evals)], _embed(runner, sim_batches))
            rows.append(Row(*size, fid.cosine_mean, fid.cosine_min, fid.nn_agreement, fid.query_agreement, None, None,
                            *torch_ms, n_eval=len(sim_evals), note=_simulated_note(bundle, tgt.name, recipe, sim_len)))
            continue
        fid = dm.evaluate_embeddings(reference, _embed(runner, eval_batches))
        rows.append(Row(*size, fid.cosine_mean, fid.cosine_min, fid.nn_agreement, fid.query_agreement,
                        _time(runner, *b1), _time(runner, *b32), *torch_ms, n_eval=len(evals)))
    return rows


def _padded(tok, texts, length: int):
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


def _simulated_note(bundle, target: str, recipe: str, length: int) -> str:
    import json
    path = bundle.path / "fpga" / "simulation.json"
    est = ""
    if path.is_file():
        sim = json.loads(path.read_text())
        if "prefill_ms" in sim:
            est = f"; the accelerator model estimates {sim['prefill_ms']:.2f} ms per batch of 32 (fpga/simulation.txt)"
    return (f"{target} {recipe}: C-simulation of the fixed-point design (bit-exact to its emulation), first "
            f"{SIMULATED_EVAL} sentences in batches of 32 padded to {length} tokens; latency not measured here{est}")


def format_table(rows: list[Row], n_eval: int) -> str:
    rw = max([8] + [len(r.recipe) for r in rows])
    head = (f"{'target':<10} {'recipe':<{rw}} {'bundle MB':>9} {'deploy MB':>9} {'cos mean':>9} {'cos min':>9} "
            f"{'NN agree':>8} {'NN query':>8} {'ms b=1':>8} {'torch b=1':>9} {'x':>5} {'ms b=32':>8} {'torch b=32':>10} {'x':>5}")
    lines = [head, "-" * len(head)]
    notes = []
    for r in rows:
        def ms(v, w):
            return f"{v:>{w}.2f}" if v is not None else f"{'-':>{w}}"

        def ratio(torch_ms, v):
            return f"{torch_ms / v:>5.2f}" if v else f"{'-':>5}"
        mark = "*" if r.note else " "
        if r.note:
            notes.append(f"* {r.note}")
        lines.append(f"{r.target:<10} {r.recipe:<{rw}} {r.bundle_mb:>9.1f} {r.deploy_mb:>9.1f} {r.cos_mean:>9.6f} "
                     f"{r.cos_min:>8.6f}{mark} {r.nn_agree:>8.1%} {r.query_agree:>8.1%} {ms(r.ms_b1, 8)} "
                     f"{r.torch_ms_b1:>9.2f} {ratio(r.torch_ms_b1, r.ms_b1)} {ms(r.ms_b32, 8)} {r.torch_ms_b32:>10.2f} "
                     f"{ratio(r.torch_ms_b32, r.ms_b32)}")
    lines.append(f"all-MiniLM-L6-v2 + mean pooling; fidelity on {n_eval} held-out sentences against fp32 torch; "
                 "NN agree: same nearest neighbour with both sides compressed; NN query: compressed queries "
                 "against the fp32 corpus; x = speed-up over torch eager (same machine, same run)")
    return "\n".join(lines + notes)


def check_rows(rows: list[Row]) -> list[str]:
    """The demo's own acceptance: fp32 bundles must match torch to cosine >= 0.99999."""
    return [f"{r.target} fp32: min cosine {r.cos_min:.6f} < {FP32_COSINE_FLOOR}" for r in rows
            if r.recipe == "fp32" and r.cos_min < FP32_COSINE_FLOOR]

"""nnforge's hls backend next to hls4ml 1.3.0 on models both take, in the same run: C-simulation
fidelity against fp32 torch, a resource figure for each side, and the g++ build time of each C-simulation.

Models (fixed-seed torch init, torch.manual_seed(0); untrained, so fidelity is about arithmetic):

    mlp   Linear 64 -> 128, ReLU, Linear 128 -> 128, ReLU, Linear 128 -> 10
    jet   Linear 16 -> 64, ReLU, 64 -> 32, ReLU, 32 -> 32, ReLU, 32 -> 5, Softmax   (the layer sizes of
          hls4ml's jet-tagging example MLP, with random weights)

Sides (both C-simulations built with g++ on this machine and called from Python):

    nnforge   nf.compile(model, "alveo-u280", recipe, example_inputs=(x[:1],)), then nf.load(bundle).
              recipe None ("fp32": float weights become int16 codes per output channel, the backend's
              reported fallback) and "w8" (int8 per channel, round to nearest). Activations
              ap_fixed<24, 8, AP_RND, AP_SAT> (the target's options); accumulators exact.
    hls4ml    config_from_pytorch_model(model, (n_in,), backend="Vitis", default_precision=P) at its
              default granularity "model" (one precision P for inputs, weights, biases, accumulators and
              results; ReuseFactor 1, Strategy Latency), then convert_from_pytorch_model(...,
              backend="Vitis", io_type="io_parallel", part=<the U280 part>), write() and compile().
              P = ap_fixed<16,6> (hls4ml's default: AP_TRN, AP_WRAP), ap_fixed<16,6,AP_RND,AP_SAT> (the
              same width, rounding and saturating as we do), ap_fixed<24,8> (our activation width,
              hls4ml's default modes) and ap_fixed<24,8,AP_RND,AP_SAT> (our activation format exactly,
              weights included).

Two hls4ml mechanisms explain most of its columns: with AP_TRN every product and sum is truncated
(rounded toward -inf), a bias of about half an LSB per step that a fan-in of 64..128 accumulates;
and its softmax (implementation "stable") indexes its 1024-entry exp table by the top 10 bits of the
input type (nnet_activation.h, softmax_idx_from_real_val), so a wider integer part makes the table
coarser: steps of 2^-4 over [-32, 32) at <16,6>, 2^-2 over [-128, 128) at <24,8>.

Both designs take one sample per call (ours is compiled for an input of shape [1, n_in]; hls4ml's
io_parallel top takes one input vector): the same N = 256 inputs (numpy default_rng(0) standard
normal, float32) go through both, one by one for ours, through ``predict`` for hls4ml.

Fidelity vs the fp32 torch model on those inputs: per-sample cosine (min and mean over the 256
outputs), max absolute error over all outputs, and argmax agreement. For ours we also check that
the C-simulation equals the backend's bit-exact Python emulation (``plan.emulate``).

Build time: g++ only. Ours: ``csim.build`` of the project's sources into an empty cache (nf.compile
builds once more inside its runtime check; that build is not counted). hls4ml: ``ModelGraph._compile``
(its build_lib.sh, g++ -O3, and loading the library) after ``write()``, which is timed apart.

Resources. Neither side was synthesised (no Vitis HLS here), so neither figure is a synthesis report:

- ours: ``nnforge.backends.hls.resources.estimate(plan)``, the analytic per-layer count its module
  documents (DSP by multiplier port widths, BRAM36 by array shapes, LUT/FF rough);
- hls4ml gives no resource figure without running Vivado/Vitis HLS synthesis. Its documented rule
  for a Dense layer in io_parallel with the Latency strategy is ``multiplier_limit =
  ceil(n_in * n_out / ReuseFactor) - n_zeros / ReuseFactor`` multipliers (the ALLOCATION limit in
  nnet_dense_latency.h, set by its config template); we report that count at the ReuseFactor the
  config used (1, the default), and a DSP figure obtained by applying our port rule to each of those
  multipliers (weight width x input width), which is an upper bound: with Latency the weights are
  compile-time constants and Vivado implements some constant products in LUTs. Their BRAM/LUT/FF are
  not estimated. The designs differ in kind: hls4ml at ReuseFactor 1 does every MAC of a sample in
  parallel with the weights on chip; ours streams weights from HBM through ``chain`` (4) MAC lanes
  per layer, so "MAC/cyc" (MACs issued per clock) is shown next to the DSPs.

    python benchmarks/hls4ml_compare.py            # both models (~3 min on 2 cores)
    python benchmarks/hls4ml_compare.py --models mlp

Writes benchmarks/out/hls4ml_compare.json and the table in docs/measured/hls4ml_compare.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_table  # noqa: E402

OUT = Path(__file__).parent / "out"
TARGET = "alveo-u280"
N_INPUTS = 256
OUR_RECIPES = [None, "w8"]
THEIR_PRECISIONS = ["ap_fixed<16,6>", "ap_fixed<16,6,AP_RND,AP_SAT>", "ap_fixed<24,8>", "ap_fixed<24,8,AP_RND,AP_SAT>"]


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10)).eval()


def jet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5),
                               torch.nn.Softmax(dim=-1)).eval()


MODELS = {"mlp": (mlp, 64), "jet": (jet, 16)}


# --- helpers (pure) ---------------------------------------------------------------------------------
def inputs(n_in: int, n: int = N_INPUTS) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, n_in)).astype(np.float32)


def fidelity(ref: np.ndarray, got: np.ndarray) -> dict:
    """Per-sample cosine (min, mean), max abs error and argmax agreement of ``got`` against ``ref``."""
    ref, got = np.asarray(ref, np.float64).reshape(len(ref), -1), np.asarray(got, np.float64).reshape(len(ref), -1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = (ref * got).sum(1) / np.maximum(den, 1e-30)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "max_abs_error": float(np.abs(ref - got).max()),
            "argmax_agreement": float((ref.argmax(1) == got.argmax(1)).mean())}


def hls4ml_multipliers(hls_model, family: str) -> list[dict]:
    """hls4ml's documented multiplier count per Dense layer (io_parallel, Latency): ceil(n_in * n_out /
    RF) - n_zeros / RF, and the DSPs those would take by our port rule (an upper bound)."""
    from nnforge.backends.hls.resources import mult_dsps
    rows = []
    for layer in hls_model.get_layers():
        if layer.class_name != "Dense":
            continue
        n_in, n_out, rf = layer.get_attr("n_in"), layer.get_attr("n_out"), layer.get_attr("reuse_factor")
        w = layer.get_weights("weight")
        n_zeros = max(int(getattr(w, "nzeros", 0)), 0)
        mults = math.ceil(n_in * n_out / rf) - n_zeros // rf
        wb, xb = w.type.precision.width, layer.get_input_variable().type.precision.width
        rows.append({"layer": layer.name, "n_in": n_in, "n_out": n_out, "reuse_factor": rf, "n_zeros": n_zeros,
                     "strategy": layer.get_attr("strategy"), "multipliers": mults, "weight_bits": wb,
                     "input_bits": xb, "dsp_upper_bound": mults * mult_dsps(wb, xb, family),
                     "onchip_weight_bits": n_in * n_out * wb})
    return rows


# --- the two sides ------------------------------------------------------------------------------------
def run_ours(name: str, model, x: np.ndarray, recipe, tmp: Path) -> dict:
    import nnforge as nf
    from nnforge.backends.hls import csim, render
    from nnforge.backends.hls.project import PROJECT
    from nnforge.backends.hls.resources import estimate, format_estimate
    os.environ["NNFORGE_HLS_CACHE"] = str(tmp / f"cache-{name}-{recipe}")
    t0 = time.perf_counter()
    bundle = nf.compile(model, TARGET, recipe, example_inputs=(torch.from_numpy(x[:1]),),
                        out=tmp / f"ours-{name}-{recipe}", progress=False)
    compile_s = time.perf_counter() - t0
    runner = nf.load(bundle.path)
    plan = runner.plan
    os.environ["NNFORGE_HLS_CACHE"] = str(tmp / f"cache-timed-{name}-{recipe}")   # empty: the build runs
    t0 = time.perf_counter()
    csim.build(render.sources(plan), plan.name, PROJECT)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = np.concatenate([runner.run_numpy([x[i:i + 1]])[0] for i in range(len(x))])
    run_s = time.perf_counter() - t0
    emu = np.concatenate([plan.emulate([x[i:i + 1]])[0] for i in range(len(x))])
    est = estimate(plan, device=nf.target(TARGET).fpga)
    return {"side": "nnforge", "numbers": "fp32 recipe: int16 w, ap_fixed<24,8> a" if recipe is None else
            f"{recipe}: int8 w, ap_fixed<24,8> a", "recipe": recipe or "fp32", "out": got,
            "csim_equals_emulation": bool(np.array_equal(got, emu)), "build_s": build_s, "compile_s": compile_s,
            "csim_s": run_s, "fallbacks": [f"{f.where}: {f.what} -> {f.action}" for f in plan.fallbacks],
            "resources": {"dsp": est["total"]["dsp"], "bram36": est["total"]["bram36"], "lut": est["total"]["lut"],
                          "ff": est["total"]["ff"], "macs_per_cycle": est["total"]["macs_per_cycle"],
                          "onchip_weight_bits": 0, "rule": "nnforge.backends.hls.resources.estimate"},
            "estimate": est, "estimate_text": format_estimate(est)}


def run_theirs(name: str, model, x: np.ndarray, precision: str, n_in: int, tmp: Path, part: str) -> dict:
    import hls4ml
    from nnforge.backends.hls.resources import dsp_family
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):         # hls4ml prints its topology on every conversion
        cfg = hls4ml.utils.config_from_pytorch_model(model, (n_in,), backend="Vitis", default_precision=precision)
        hm = hls4ml.converters.convert_from_pytorch_model(
            model, hls_config=cfg, output_dir=str(tmp / f"theirs-{name}-{re.sub(r'[^A-Za-z0-9]+', '_', precision)}"),
            backend="Vitis", io_type="io_parallel", part=part)
        t0 = time.perf_counter()
        hm.write()
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hm._compile()                                # g++ (build_lib.sh) + dlopen; compile() = write() + this
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = np.asarray(hm.predict(np.ascontiguousarray(x)), np.float32).reshape(len(x), -1)
        run_s = time.perf_counter() - t0
    mults = hls4ml_multipliers(hm, dsp_family(part))
    return {"side": "hls4ml", "numbers": precision, "precision": precision, "out": got, "build_s": build_s,
            "write_s": write_s, "csim_s": run_s, "dense": mults,
            "config": {"Strategy": cfg["Model"]["Strategy"], "ReuseFactor": cfg["Model"]["ReuseFactor"],
                       "granularity": "model", "io_type": "io_parallel", "backend": "Vitis"},
            "resources": {"dsp_upper_bound": sum(m["dsp_upper_bound"] for m in mults),
                          "multipliers": sum(m["multipliers"] for m in mults), "bram36": None, "lut": None, "ff": None,
                          "macs_per_cycle": sum(m["multipliers"] for m in mults),
                          "onchip_weight_bits": sum(m["onchip_weight_bits"] for m in mults),
                          "rule": "hls4ml Dense io_parallel Latency: ceil(n_in*n_out/ReuseFactor) - "
                                  "n_zeros/ReuseFactor multipliers; DSPs by our port rule (upper bound); no synthesis"}}


# --- the run --------------------------------------------------------------------------------------
def docs_rows(report: dict) -> tuple[list[str], list[list]]:
    """The docs table of hls4ml_compare.json: per model and design, fidelity and DSPs (ours counted
    from the design, hls4ml's an upper bound from its documented rule)."""
    columns = ["model", "side", "numbers", "min cosine vs fp32", "argmax agree", "DSP (estimate)", "MAC/cycle"]
    rows = []
    for r in report["rows"]:
        res = r["resources"]
        dsp = f"{res['dsp']}" if r["side"] == "nnforge" else f"<= {res['dsp_upper_bound']:,}"
        rows.append([r["model"], r["side"], r["numbers"], f"{r['cosine_min']:.6f}", f"{r['argmax_agreement']:.1%}", dsp,
                     res["macs_per_cycle"]])
    return columns, rows


def write_docs(report: dict, source: str) -> None:
    m = report["meta"]
    columns, rows = docs_rows(report)
    docs_table.write("measured/hls4ml_compare.md", "hls4ml_compare", columns, rows,
                     source=source,
                     notes=[f"{m['n_inputs']} seeded inputs per model, both sides as C-simulations, target "
                            f"{m['target']} ({m['part']}); hls4ml {m['hls4ml']}; nothing was synthesised."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    import hls4ml
    import nnforge as nf
    target = nf.target(TARGET)
    part, dsp_total = target.fpga["part"], target.fpga["dsp"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            make, n_in = MODELS[name]
            model = make()
            x = inputs(n_in)
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()
            for recipe in OUR_RECIPES:
                r = run_ours(name, model, x, recipe, tmp)
                r.update(model=name, **fidelity(ref, r.pop("out")))
                rows.append(r)
                print(f"{name:<4} nnforge {r['recipe']:<5} built in {r['build_s']:.1f} s, cos min "
                      f"{r['cosine_min']:.6f}, csim == emulation: {r['csim_equals_emulation']}", flush=True)
            for prec in THEIR_PRECISIONS:
                r = run_theirs(name, model, x, prec, n_in, tmp, part)
                r.update(model=name, **fidelity(ref, r.pop("out")))
                rows.append(r)
                print(f"{name:<4} hls4ml  {prec:<30} built in {r['build_s']:.1f} s, cos min {r['cosine_min']:.6f}",
                      flush=True)

    head = (f"{'model':<5} | {'side':<7} | {'numbers':<40} | {'g++ s':>5} | {'cos min':>8} | {'cos mean':>9} | "
            f"{'max|err|':>8} | {'argmax':>6} | {'DSP':>9} | {'BRAM36':>6} | {'MAC/cyc':>7}")
    print(f"\n{N_INPUTS} seeded inputs per model, fidelity vs fp32 torch; resources are estimates (nothing was "
          f"synthesised)\n{head}\n{'-' * len(head)}")
    for r in rows:
        res = r["resources"]
        dsp = f"{res['dsp']}" if r["side"] == "nnforge" else f"<={res['dsp_upper_bound']}"
        bram = f"{res['bram36']}" if res["bram36"] is not None else "n/a"
        print(f"{r['model']:<5} | {r['side']:<7} | {r['numbers']:<40} | {r['build_s']:5.1f} | {r['cosine_min']:8.6f} | "
              f"{r['cosine_mean']:9.7f} | {r['max_abs_error']:8.2e} | {r['argmax_agreement']:6.1%} | {dsp:>9} | "
              f"{bram:>6} | {res['macs_per_cycle']:>7}")
    print(f"\nnnforge resources: nnforge.backends.hls.resources.estimate (analytic; DSP and BRAM36 by counting "
          f"rules, LUT/FF rough); weights off chip (HBM, m_axi), 0 on-chip weight bits.")
    print(f"hls4ml resources: hls4ml reports none without Vivado/Vitis HLS synthesis. Shown: its documented Dense rule "
          f"(io_parallel, Latency) multipliers = ceil(n_in*n_out/ReuseFactor) - n_zeros/ReuseFactor at ReuseFactor 1 "
          f"(config default), as DSPs by our port rule (upper bound: constant-weight products may go to LUTs); "
          f"weights on chip. The {TARGET} has {dsp_total} DSPs.")
    for r in rows:
        if r["side"] == "hls4ml" and r["resources"]["dsp_upper_bound"] > dsp_total:
            print(f"  {r['model']} {r['numbers']}: {r['resources']['multipliers']} multipliers "
                  f"(<= {r['resources']['dsp_upper_bound']} DSPs) exceed the device's {dsp_total} DSPs unless "
                  f"Vivado maps products to LUTs or the ReuseFactor is raised")
    for r in rows:
        if r["side"] == "nnforge" and r["recipe"] == "fp32":
            print(f"\n{r['model']}, nnforge fp32 recipe:\n{r['estimate_text']}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"target": TARGET, "part": part, "n_inputs": N_INPUTS, "inputs": "numpy default_rng(0) standard normal",
            "hls4ml": hls4ml.__version__, "torch": torch.__version__, "nnforge": nf.__version__,
            "synthesised": False, "models": {k: str(MODELS[k][0]()) for k in args.models}}
    for r in rows:
        r.pop("estimate_text", None)
    report = {"meta": meta, "rows": rows}
    (args.out / "hls4ml_compare.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'hls4ml_compare.json'}")
    write_docs(report, str(args.out / "hls4ml_compare.json"))


if __name__ == "__main__":
    main()

"""The `cpu` (TVM) bundle of the default model on a quiet machine and beside busy processes, with
TVM's own thread pool and with nnforge's pool sized by the load (backends/tvm/threads.py), against
the `onnx` bundle on ONNX Runtime timed in the same stretches.

Each setting runs in a fresh process (TVM reads its pool settings once, when the pool starts),
quiet and then beside ``--busy`` processes that spin (``while True: pass``); in each, the two
bundles are timed at batch 1 and 32 in stretches that alternate between them
(nnforge.timing.alternating_ms), with the machine's load sampled between stretches. Reported: median
ms per call, and how much the busy processes slow each runtime. Writes
benchmarks/out/cpu_under_load.json and the table in docs/measured/cpu_under_load.md.

    python benchmarks/cpu_under_load.py [--repeats 2] [--busy 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
OUT = Path(__file__).parent / "out"
BATCHES = (1, 32)
# TVM's own pool (spinning workers, pinned to cores) at every CPU, as nnforge ran it before
# threads.py; the alternative that was measured against the chosen policy (workers that sleep
# between kernels); and nnforge's policy (a pool sized by the load, unpinned). A thread count set
# in the environment fixes the pool's size.
CPUS = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
SETTINGS = {"TVM's pool at every CPU (before)": {"TVM_NUM_THREADS": CPUS, "TVM_BIND_THREADS": "1"},
            "every CPU, workers sleep between kernels": {"TVM_NUM_THREADS": CPUS, "TVM_THREAD_POOL_SPIN_COUNT": "0"},
            "nnforge: pool sized by the load (after)": {}}


def compile_bundles(tmp: Path) -> tuple[Path, Path]:
    import nnforge as nf
    from nnforge.models import default as dm
    model, tok = dm.load_default_model()
    _, evals = dm.sentence_splits()
    example = dm.encode(tok, evals[:8])
    out = []
    for target in ("cpu", "onnx"):
        # the default model's attention mask is filled with -inf on purpose
        b = nf.compile(model, target, None, example_inputs=example, dynamic_shapes=dm.dynamic_shapes(),
                       input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
                       out=tmp / target, batch_sizes=(), allow_nonfinite=True)
        out.append(b.path)
    return out[0], out[1]


def probe(cpu_dir: str, onnx_dir: str, rounds: int) -> dict:
    """In this process: both bundles timed at each batch size; what the parent reads back."""
    import numpy as np
    import nnforge as nf
    from nnforge.bundle import REF_INPUTS, load_inputs
    from nnforge.timing import LoadMeter, alternating_ms
    tvm, ort = nf.load(cpu_dir), nf.load(onnx_dir)
    xs = [np.asarray(t) for t in load_inputs(Path(cpu_dir) / REF_INPUTS, tvm.input_names)]
    out = {"threads": tvm.threads, "batches": {}}
    for b in BATCHES:
        got = [x[np.arange(b) % x.shape[0]] for x in xs]
        meter = LoadMeter()
        ms = alternating_ms({"tvm": lambda: tvm(*got), "ort": lambda: ort(*got)}, (),
                            rounds=rounds if b == 1 else max(3, rounds // 4), meter=meter)
        out["batches"][b] = {"ms": ms, "load": meter.summary()}
    return out


def probe_env(setting: dict) -> dict:
    """This process's environment without the pool settings it may have picked up (compiling the
    bundles imports the tvm backend, which sets them), plus ``setting``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("TVM_")}, **setting}


def run_probe(cpu_dir: Path, onnx_dir: Path, env: dict, busy: int, rounds: int) -> dict:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        done = subprocess.run([sys.executable, __file__, "--probe", os.fspath(cpu_dir), os.fspath(onnx_dir),
                               "--rounds", str(rounds)], capture_output=True, text=True, env=probe_env(env))
    finally:
        for p in hogs:
            p.kill()
            p.wait()
    if done.returncode != 0:
        raise SystemExit(f"the probe failed with {env or 'nnforge settings'}:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict]) -> list[dict]:
    """Per setting, load and batch: the median over repeats of each runtime's ms."""
    out = []
    keys = dict.fromkeys((r["setting"], r["busy"], b) for r in rows for b in r["batches"])
    for setting, busy, b in keys:
        runs = [r["batches"][b] for r in rows if r["setting"] == setting and r["busy"] == busy]
        out.append({"setting": setting, "busy": busy, "batch": int(b),
                    "tvm_ms": round(statistics.median(x["ms"]["tvm"] for x in runs), 3),
                    "ort_ms": round(statistics.median(x["ms"]["ort"] for x in runs), 3),
                    "others_running_per_cpu": [x["load"]["others_running_per_cpu"] for x in runs]})
    for r in out:
        seen = [x for x in r["others_running_per_cpu"] if x is not None]
        r["others_per_cpu_mean"] = round(statistics.fmean(seen), 2) if seen else None
    return out


def docs_rows(report: dict) -> tuple[list[str], list[list]]:
    table = report["summary"]
    busy = max(r["busy"] for r in table)
    columns = ["setting", "batch", "TVM quiet ms", f"TVM beside {busy} busy ms", "TVM slowdown",
               "ORT quiet ms", f"ORT beside {busy} busy ms", "ORT slowdown", "other threads per CPU (quiet / busy)"]
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in table):
        for b in BATCHES:
            q = next(r for r in table if r["setting"] == setting and r["batch"] == b and r["busy"] == 0)
            l = next(r for r in table if r["setting"] == setting and r["batch"] == b and r["busy"] == busy)
            rows.append([setting, b, f"{q['tvm_ms']:.2f}", f"{l['tvm_ms']:.2f}", f"{l['tvm_ms'] / q['tvm_ms']:.1f}x",
                         f"{q['ort_ms']:.2f}", f"{l['ort_ms']:.2f}", f"{l['ort_ms'] / q['ort_ms']:.1f}x",
                         f"{q['others_per_cpu_mean']} / {l['others_per_cpu_mean']}"])
    return columns, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs of every setting and load, interleaved")
    ap.add_argument("--busy", type=int, default=2, help="busy processes beside the loaded runs")
    ap.add_argument("--rounds", type=int, default=12, help="calls per runtime at batch 1 (a quarter at batch 32)")
    ap.add_argument("--bundles", nargs=2, metavar=("CPU_BUNDLE", "ONNX_BUNDLE"),
                    help="fp32 bundles of the default model to time (default: compile them)")
    ap.add_argument("--probe", nargs=2, metavar=("CPU_BUNDLE", "ONNX_BUNDLE"), help=argparse.SUPPRESS)
    ap.add_argument("--table-only", action="store_true", help="rewrite the docs table from the last JSON")
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(*args.probe, args.rounds)))
        return
    path = OUT / "cpu_under_load.json"
    if args.table_only:
        report = json.loads(path.read_text())
        report["summary"] = summarise(report["rows"])
    else:
        report = measure(args)
        OUT.mkdir(exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
    write_docs(report)


def measure(args) -> dict:
    from nnforge.timing import machine
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cpu_dir, onnx_dir = map(Path, args.bundles) if args.bundles else compile_bundles(Path(tmp))
        for rep in range(args.repeats):
            for busy in (0, args.busy):
                for setting, env in SETTINGS.items():
                    got = run_probe(cpu_dir, onnx_dir, env, busy, args.rounds)
                    rows.append({"setting": setting, "busy": busy, "repeat": rep, **got})
                    cells = "  ".join(f"b{b}: tvm {x['ms']['tvm']:8.2f} ort {x['ms']['ort']:8.2f} ms"
                                      for b, x in got["batches"].items())
                    print(f"{setting:40s} busy {busy}  {cells}", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import docs_table
    return {"meta": {"machine": machine(), "repeats": args.repeats, "busy": args.busy, "rounds": args.rounds,
                     "settings": SETTINGS, "command": docs_table.command()}, "rows": rows, "summary": summarise(rows)}


def write_docs(report: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import docs_table
    m = report["meta"]
    columns, table = docs_rows(report)
    print("\n" + docs_table.markdown(columns, table))
    docs_table.write("measured/cpu_under_load.md", "cpu_under_load", columns, table, timed=True,
                     source="benchmarks/out/cpu_under_load.json", machine=m["machine"], cmd=m.get("command"),
                     notes=[f"Median over {m['repeats']} runs of each setting; each run a fresh process, quiet or beside "
                            f"{m['busy']} processes that spin, timing the cpu (TVM) and onnx (ONNX Runtime) fp32 "
                            "bundles of the default model in alternating stretches. Slowdown: beside the busy "
                            "processes over quiet. Other threads per CPU: other processes' runnable threads, sampled "
                            "between the stretches (nnforge.timing.LoadMeter); a quiet run above 0 shared the machine "
                            "with other work."])

if __name__ == "__main__":
    main()

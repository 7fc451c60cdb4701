"""Does MetaSchedule beat the tvm backend's hand-scheduled dense GEMM? Tune, then time both.

Shapes: the linear layers of the default model (all-MiniLM-L6-v2: K x N = 384x384, 384x1536,
1536x384) at M = 1440 rows (32 sequences x 45 tokens), fixed for tuning. For each shape:

- ``metaschedule``: the plain fp32 matmul ``y[m, n] = sum_k x[m, k] * w[n, k]`` written in TE,
  tuned by ``tvm.s_tir.meta_schedule.tune_tir`` (``--trials`` measured candidates, the default
  post-order-apply space and evolutionary search, XGBoost cost model, JSON database under
  ``--work-dir``) for the same resolved target the backend uses, then built from the best record;
- ``nnforge dense``: :func:`nnforge.backends.tvm.kernels.dense.dense_matmul` (6x16 register tile
  on packed k-major panels, bias added on store: a zero bias here), panels packed in numpy as
  ``pack_panels`` does at load;
- ``torch F.linear`` on the same weight.

All runners use the same thread count (TVM_NUM_THREADS, set before TVM starts its pool, and
torch.set_num_threads). Each is timed in ``--rounds`` rounds of ``--repeat`` calls after a
warm-up, rounds taken in turn across runners; the median over all calls is reported, with the
tuned kernel's speed-up over ours (> 1: MetaSchedule wins). Tuning wall time is recorded per
shape. Outputs are checked against numpy x @ W.T. Writes benchmarks/out/metaschedule.json and the
table in docs/measured/metaschedule.md.

    python benchmarks/metaschedule.py [--trials 64] [--threads N] [--repeat 20] [--rounds 3]

Needs MetaSchedule's extras, the ``bench`` extra (``pip install -e '.[bench]'``: xgboost, psutil),
and the tvm-ffi the ``tvm`` extra pins (0.1.14.post0: with 0.1.15.post2 ``tvm.ir.save_json``, hence
the tuning database, segfaults). ``--tune-only`` / ``--reuse`` split tuning from timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
SHAPES = [(384, 384), (384, 1536), (1536, 384)]     # (K, N) of all-MiniLM-L6-v2's linear layers
ROWS = 32 * 45                                      # batch 32 x 45 tokens
TARGET = "llvm -mcpu=native"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=64, help="measured candidates per shape")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=20, help="calls per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN")
    ap.add_argument("--work-dir", default="/tmp/nnforge_metaschedule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tune-only", action="store_true",
                    help="tune, export the best kernel per shape to --work-dir, and stop")
    ap.add_argument("--reuse", action="store_true",
                    help="time the kernels a --tune-only run exported to --work-dir instead of tuning")
    ap.add_argument("--build-timeout", type=float, default=180.0,
                    help="seconds per candidate build (MetaSchedule's 30 s default killed every build on a "
                         "loaded 2-core host: each worker first spends ~15 s importing TVM)")
    return ap.parse_args()


ARGS = parse_args()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)    # read once, when TVM's thread pool starts

import numpy as np                                    # noqa: E402
import tvm                                            # noqa: E402
from tvm import te                                    # noqa: E402
from tvm.s_tir import meta_schedule as ms             # noqa: E402
# MetaSchedule registers its tensor intrinsics by parsing TVMScript, and the parser calls
# inspect.stack() per function, which walks sys.modules: with torch loaded that took minutes.
import tvm.s_tir.tensor_intrin                        # noqa: E402,F401
import torch                                          # noqa: E402
import torch.nn.functional as F                       # noqa: E402

from nnforge.backends.tvm import resolve_target                          # noqa: E402
from nnforge.backends.tvm.kernels.dense import dense_matmul, panel_width, vector_lanes   # noqa: E402


def tuning_target():
    """The backend's resolved native target, with ``num-cores`` (MetaSchedule's parallel rule
    sizes its jobs from it and refuses an LLVM target without it)."""
    return resolve_target(f"{TARGET} -num-cores={ARGS.threads}")


def te_matmul(m: int, n: int, k: int):
    """PrimFunc ``main(x [m, k], w [n, k], y [m, n])``, fp32, y = x @ w.T: no schedule."""
    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((n, k), "float32", name="w")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), name="y")
    return te.create_prim_func([x, w, y]).with_attr("global_symbol", "main")


def task_name(k: int, n: int) -> str:
    return f"matmul_{k}x{n}"


def tune_all(m: int, shapes: list[tuple[int, int]], target):
    """Tune the matmul of every (K, N) in one MetaSchedule run (one task each, one pool of
    builder/runner workers, which take a minute to start here). Returns (database, seconds)."""
    work_dir = Path(ARGS.work_dir)
    if ARGS.reuse:      # with --tune-only: re-export from the saved records; else time the exports
        database = (ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")
                    if ARGS.tune_only else None)
        return database, float((work_dir / "tuning_seconds.txt").read_text())
    shutil.rmtree(work_dir, ignore_errors=True)
    mod = tvm.IRModule({task_name(k, n): te_matmul(m, n, k).with_attr("global_symbol", task_name(k, n))
                        for k, n in shapes})
    start = time.perf_counter()
    database = ms.tune_tir(mod, target, str(work_dir), max_trials_global=ARGS.trials * len(shapes),
                           max_trials_per_task=ARGS.trials, num_trials_per_iter=min(32, ARGS.trials),
                           num_tuning_cores=ARGS.threads, seed=ARGS.seed,
                           builder=ms.builder.LocalBuilder(max_workers=ARGS.threads, timeout_sec=ARGS.build_timeout))
    seconds = time.perf_counter() - start
    (work_dir / "tuning_seconds.txt").write_text(f"{seconds:.1f}\n")
    return database, seconds


def tuned_runner(database, m: int, n: int, k: int, target):
    """(function (x, w, y), records, best measured ms) for the matmul built from the database's best record,
    exported to the work dir (so --reuse can time it in a process that never reads the database)."""
    lib_path = Path(ARGS.work_dir) / f"{task_name(k, n)}.so"
    meta_path = lib_path.with_suffix(".json")
    if database is None:
        fn = tvm.runtime.load_module(str(lib_path))["main"]
        meta = json.loads(meta_path.read_text())
        return fn, meta["records"], meta["best_ms"]
    # the workload is matched structurally, attributes included: rebuild the tuned function exactly
    func = te_matmul(m, n, k).with_attr("global_symbol", task_name(k, n))
    sch = ms.tir_integration.compile_tir(database, func, target)
    if sch is None:
        raise RuntimeError(f"{k}x{n}: MetaSchedule found no valid schedule in {ARGS.trials} trials")
    workload = database.commit_workload(tvm.IRModule({"main": func}))
    records = database.get_top_k(workload, 10 ** 6)
    best = min((float(np.mean([float(c) for c in r.run_secs])) for r in records if r.run_secs), default=float("nan"))
    lib = tvm.compile(sch.mod, target=target)
    lib.export_library(str(lib_path))
    meta_path.write_text(json.dumps({"records": len(records), "best_ms": best * 1e3}))
    return lib["main"], len(records), best * 1e3


def _bind(fn, w: np.ndarray, n: int):
    w_tvm = tvm.runtime.tensor(w)
    bound = {}

    def run(x: np.ndarray):
        if id(x) not in bound:
            bound[id(x)] = (x, tvm.runtime.tensor(x), tvm.runtime.tensor(np.empty((x.shape[0], n), np.float32)))
        _, x_tvm, y = bound[id(x)]
        fn(x_tvm, w_tvm, y)
        return y
    return run


def pack_panels_np(w: np.ndarray, lanes: int) -> np.ndarray:
    """numpy twin of ``dense.pack_panels``: ``[n, k]`` -> ``[ceil(n/NB), k, NB]``, zero-padded."""
    n, k = w.shape
    nb = panel_width(lanes)
    blocks = -(-n // nb)
    padded = np.zeros((blocks * nb, k), np.float32)
    padded[:n] = w
    return np.ascontiguousarray(padded.reshape(blocks, nb, k).transpose(0, 2, 1))


def hand_runner(n: int, k: int, w: np.ndarray, target):
    kern = dense_matmul("nf_dense", n, k, target)
    # the kernel is private (the lowering links it into model.so): export it to call it alone
    fn = tvm.compile(tvm.IRModule({kern.name: kern.func.with_attr("global_symbol", kern.name)}), target=target)[kern.name]
    panels = tvm.runtime.tensor(pack_panels_np(w, vector_lanes(target)))
    bias = tvm.runtime.tensor(np.zeros(n, np.float32))
    bound = {}

    def run(x: np.ndarray):
        if id(x) not in bound:
            bound[id(x)] = (x, tvm.runtime.tensor(x), tvm.runtime.tensor(np.empty((x.shape[0], n), np.float32)))
        _, x_tvm, y = bound[id(x)]
        fn(x_tvm, panels, bias, y)
        return y
    return run, kern.notes


def as_numpy(y) -> np.ndarray:
    return y.numpy() if hasattr(y, "numpy") else np.asarray(y)


def time_runners(runners: dict, x: np.ndarray) -> dict:
    """name -> median ms over ``rounds x repeat`` calls, rounds interleaved across runners."""
    calls = {name: [] for name in runners}
    for run in runners.values():
        run(x)
    for _ in range(ARGS.rounds):
        for name, run in runners.items():
            time.sleep(0.05)      # let the previous runtime's spinning workers go idle
            for _ in range(ARGS.repeat):
                start = time.perf_counter()
                run(x)
                calls[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in calls.items()}


def main():
    torch.set_num_threads(ARGS.threads)
    target = tuning_target()
    m = ARGS.rows
    rows = []
    shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in ARGS.shapes]
    database, tune_s = tune_all(m, shapes, target)
    print(f"tuned {len(shapes)} matmuls x {ARGS.trials} trials in {tune_s:.0f} s", flush=True)
    tuned_all = {(k, n): tuned_runner(database, m, n, k, target) for k, n in shapes}
    if ARGS.tune_only:
        return
    for k, n in shapes:
        rng = np.random.default_rng(ARGS.seed)
        w = (rng.standard_normal((n, k)) / k ** 0.5).astype(np.float32)
        x = rng.standard_normal((m, k)).astype(np.float32)
        expected = x.astype(np.float64) @ w.T.astype(np.float64)

        tuned_fn, n_records, best_ms = tuned_all[(k, n)]
        tuned = _bind(tuned_fn, w, n)
        hand, notes = hand_runner(n, k, w, target)
        w_t = torch.from_numpy(w)
        runners = {"metaschedule": tuned, "nnforge dense": hand,
                   "torch F.linear": lambda x: F.linear(torch.from_numpy(x), w_t)}
        errors = {name: float(np.abs(as_numpy(run(x)) - expected).max()) for name, run in runners.items()}
        for name, err in errors.items():
            if err > 1e-3:
                raise RuntimeError(f"{k}x{n}: {name} differs from numpy by {err:.2e}")
        ms_ = time_runners(runners, x)
        gflop = 2 * m * n * k / 1e9
        row = {"K": k, "N": n, "M": m, "trials": ARGS.trials, "records": n_records,
               "tuner_best_ms": round(best_ms, 3),
               "ms": {name: round(v, 3) for name, v in ms_.items()},
               "gflops": {name: round(gflop / (v / 1e3), 1) for name, v in ms_.items()},
               "metaschedule_speedup_over_nnforge": round(ms_["nnforge dense"] / ms_["metaschedule"], 3),
               "max_abs_err": errors, "nnforge_kernel": notes}
        rows.append(row)
        print(f"{k}x{n}: {n_records} records, "
              + ", ".join(f"{name} {v:.3f} ms" for name, v in ms_.items()), flush=True)

    print(f"\nM = {m}, threads = {ARGS.threads}, trials = {ARGS.trials} per shape, tuning {tune_s:.0f} s for all, "
          f"target {TARGET}")
    head = f"{'K x N':>10} {'MS ms':>8} {'ours ms':>8} {'torch ms':>9} {'MS/ours':>8}  GFLOP/s MS / ours / torch"
    print(head)
    for r in rows:
        t, g = r["ms"], r["gflops"]
        print(f"{r['K']:>4} x {r['N']:<4} {t['metaschedule']:>8.3f} {t['nnforge dense']:>8.3f} "
              f"{t['torch F.linear']:>9.3f} {r['metaschedule_speedup_over_nnforge']:>7.2f}x  "
              f"{g['metaschedule']} / {g['nnforge dense']} / {g['torch F.linear']}")
    OUT.mkdir(exist_ok=True)
    result = {"benchmark": "metaschedule", "target": TARGET, "resolved_mcpu": str(target.attrs.get("mcpu", "")),
              "threads": ARGS.threads, "trials_per_shape": ARGS.trials,
              "tuning_s_all_shapes": round(tune_s, 1), "repeat": ARGS.repeat, "rounds": ARGS.rounds, "seed": ARGS.seed,
              "machine": platform.processor() or platform.machine(), "tvm": tvm.__version__,
              "torch": torch.__version__, "shapes": rows,
              "note": "speedup > 1 means the MetaSchedule-tuned kernel is faster than nnforge's hand kernel"}
    (OUT / "metaschedule.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT / 'metaschedule.json'}")
    write_docs(result)


def docs_rows(result: dict) -> tuple[list[str], list[list]]:
    """The docs table of metaschedule.json: per shape, each kernel's ms and MetaSchedule's speed
    relative to nnforge's hand-scheduled dense GEMM (> 1: MetaSchedule is faster)."""
    columns = ["K x N", "M", "MetaSchedule ms", "nnforge dense ms", "torch F.linear ms", "MetaSchedule vs nnforge"]
    return columns, [[f"{r['K']} x {r['N']}", r["M"], *(f"{r['ms'][k]:.3f}" for k in
                                                       ("metaschedule", "nnforge dense", "torch F.linear")),
                      f"{r['metaschedule_speedup_over_nnforge']:.2f}x"] for r in result["shapes"]]


def write_docs(result: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import docs_table                   # beside this script
    docs_table.write("measured/metaschedule.md", "metaschedule", *docs_rows(result),
                     timed=True, source="benchmarks/out/metaschedule.json",
                     notes=[f"{result['trials_per_shape']} MetaSchedule trials per shape "
                            f"({result['tuning_s_all_shapes']} s of tuning for all), {result['threads']} threads, "
                            f"TVM {result['tvm']}, target {result['target']}."])


if __name__ == "__main__":
    main()

"""Block-sparse SpMM (nnforge's TVM BSR kernels, fp32 and int8) against dense GEMM, in one run.

BERT-base GEMM shapes (K x N: 768x768, 768x3072, 3072x768; M tokens: 1, 32, 128, 384) at 70/80/90%
block sparsity (random block masks; 4x1 blocks unless --block says 1x4 or 16x1), y = x @ W.T:

- ``torch dense``: torch.nn.functional.linear on the dense fp32 weight (oneDNN/MKL);
- ``ORT dense``: ONNX Runtime on a one-node MatMul model of the same weight (built with onnx.helper);
- ``bsr fp32`` and ``bsr int8``: nnforge.backends.tvm.kernels.bsr and .bsr_int8, compiled for ``--target``; int8 has
  per-row symmetric codes of the same weight and x quantised in the kernel (static scale and zero
  point from a calibration batch).

All use the same threads (os.cpu_count() unless --threads: TVM_NUM_THREADS, torch.set_num_threads,
ORT intra_op_num_threads). Each runner is timed on its own: warm-up calls, then the median (and, in
the JSON, the minimum) of --repeat calls, with a pause between runners so that one's spinning
worker threads do not steal the next one's cores. Prints speed-up ratios (dense time / sparse
time) against torch and ORT and writes everything to benchmarks/out/spmm.json, and the tables in
docs/measured/spmm.md. On a machine shared with other work the timings
move by tens of percent from run to run: compare ratios of one run, and rerun on a quiet machine.

    python benchmarks/spmm.py [--block 4x1] [--sparsity 0.7 0.8 0.9] [--m 1 32 128 384] [--repeat 25]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# numpy only computes the references: one BLAS thread, or its spinning workers (OpenBLAS busy-waits
# after a call) starve the next runner's thread pool for whole scheduler ticks
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_table  # noqa: E402

OUT = Path(__file__).parent / "out"
SHAPES = [(768, 768), (768, 3072), (3072, 768)]     # (K, N) of BERT-base: attention out/QKV, FFN up, FFN down


def timed(fn, repeat: int, warmup: int = 3) -> tuple[float, float]:
    """(median, min) seconds of ``repeat`` calls after ``warmup``; the min shows what a quiet machine
    gives when the median is hit by other work."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    time.sleep(0.05)            # let this runner's worker threads stop spinning before the next one
    return statistics.median(samples), min(samples)


def random_bsr(n: int, k: int, r: int, c: int, sparsity: float, rng) -> tuple:
    """A random block mask keeping round((1 - sparsity) * blocks) blocks, BERT-like values."""
    blocks_total = (n // r) * (k // c)
    keep = np.zeros(blocks_total, bool)
    keep[rng.choice(blocks_total, round((1 - sparsity) * blocks_total), replace=False)] = True
    mask = keep.reshape(n // r, k // c)
    nz = np.argwhere(mask)
    row_ptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
    blocks = (rng.standard_normal((len(nz), r, c)) * 0.02).astype(np.float32)
    return row_ptr, nz[:, 1].astype(np.int32), blocks


def ort_matmul(w: np.ndarray, threads: int):
    """An ONNX Runtime session of y = x @ w.T with x [M, K] (M symbolic)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wT"], ["y"])], "spmm_dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wT")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def tvm_runner(kern, target):
    import tvm
    lib = tvm.compile(tvm.IRModule({kern.name: kern.func}), target=target)
    func, dev = lib[kern.name], tvm.cpu()
    consts = [tvm.runtime.tensor(a, dev) for a in kern.consts]

    def prepare(x: np.ndarray):
        xd = tvm.runtime.tensor(x, dev)
        yd = tvm.runtime.tensor(np.zeros((x.shape[0], kern.n), np.float32), dev)
        return (lambda: func(xd, *consts, yd)), yd
    return prepare


def docs_rows(report: dict, ratio: str) -> tuple[list[str], list[list]]:
    """One docs table of spmm.json: per K x N shape and sparsity, the ``ratio`` column (e.g.
    ``fp32_vs_torch``) at each M, joined as 'a / b / c'."""
    ms = sorted({r["M"] for r in report["rows"]})
    sparsities = sorted({r["sparsity"] for r in report["rows"]})
    columns = ["K x N", *(f"{s:.0%} sparse" for s in sparsities)]
    rows = []
    for k, n in dict.fromkeys((r["K"], r["N"]) for r in report["rows"]):
        cells = []
        for sp in sparsities:
            got = {r["M"]: r[ratio] for r in report["rows"] if (r["K"], r["N"], r["sparsity"]) == (k, n, sp)}
            cells.append(" / ".join(f"{got[m]:.2f}" if m in got else "-" for m in ms))
        rows.append([f"{k} x {n}", *cells])
    return columns, rows


def write_docs(report: dict, source: str) -> None:
    ms = sorted({r["M"] for r in report["rows"]})
    suffix = "-gemv" if ms == [1] else ""
    where = (f"{report['block']} blocks, random block masks, {report['threads']} threads, {report['cpu']}; "
             f"M = {' / '.join(map(str, ms))} tokens per cell; medians of {report['repeat']} calls, each runner "
             "timed on its own after a pause (compare ratios of one run).")
    for name, ratio, what in (("spmm", "fp32_vs_torch", "speed-up of the fp32 BSR kernel over torch dense fp32"),
                              ("spmm-int8", "int8_vs_fp32", "speed-up of the int8 BSR kernel over the fp32 one")):
        columns, rows = docs_rows(report, ratio)
        docs_table.write("measured/spmm.md", name + suffix, columns, rows, timed=True, source=source,
                         notes=[f"{what.capitalize()}: {where}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", default="4x1", choices=["4x1", "1x4", "16x1"])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.7, 0.8, 0.9])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 32, 128, 384])
    ap.add_argument("--repeat", type=int, default=25)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--target", default="llvm -mcpu=native")
    ap.add_argument("--out", type=Path, default=OUT / "spmm.json")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)      # before TVM's runtime starts its pool
    import onnxruntime
    import torch
    import tvm

    from nnforge.backends.tvm.kernels.bsr import bsr_matmul, dense_from_bsr, llvm_target
    from nnforge.backends.tvm.kernels.bsr_int8 import bsr_matmul_int8

    torch.set_num_threads(args.threads)
    r, c = (int(v) for v in args.block.split("x"))
    cpu = llvm_target(args.target)
    rng = np.random.default_rng(0)
    rows = []
    header = (f"{'K x N':>10} {'M':>4} {'sp':>4} | {'torch':>8} {'ORT':>8} {'fp32':>8} {'int8':>8} ms | "
              f"{'fp32/torch':>10} {'fp32/ORT':>8} {'int8/torch':>10} {'int8/ORT':>8} {'int8/fp32':>9}")
    print(f"block {args.block}, {args.threads} threads, target {args.target} ({cpu.lanes} fp32 lanes); "
          f"ratios are speed-ups (dense or fp32 time / kernel time)")
    print(header)
    print("-" * len(header))
    for k, n in SHAPES:
        dense_rt = {}           # (m) -> (torch s, ORT s): the dense runners do not depend on the sparsity
        calib = rng.standard_normal((64, k)).astype(np.float32)
        x_scale = float(calib.max() - calib.min()) / 255
        zero_point = int(np.clip(round(-calib.min() / x_scale), 0, 255))
        for sparsity in args.sparsity:
            row_ptr, col_idx, blocks = random_bsr(n, k, r, c, sparsity, rng)
            w = dense_from_bsr(row_ptr, col_idx, blocks, n, k)
            row_scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
            row_scale[row_scale == 0] = 1
            block_rows = np.repeat(np.arange(n // r), np.diff(row_ptr))
            scale_of_block = row_scale.reshape(n // r, r)[block_rows][:, :, None]
            codes = np.clip(np.rint(blocks / scale_of_block), -127, 127).astype(np.int8)
            fp32 = bsr_matmul("spmm_fp32", row_ptr, col_idx, blocks, n, k, args.target)
            int8 = bsr_matmul_int8("spmm_int8", row_ptr, col_idx, codes, row_scale, x_scale, zero_point, n, k,
                                   args.target)
            fp32_prepare, int8_prepare = tvm_runner(fp32, cpu.target), tvm_runner(int8, cpu.target)
            codes_dense = dense_from_bsr(row_ptr, col_idx, codes, n, k).astype(np.int64)
            wt = torch.from_numpy(w)
            ort_run = ort_matmul(w, args.threads) if not dense_rt else None
            for m in args.m:
                x = rng.standard_normal((m, k)).astype(np.float32)
                if m not in dense_rt:
                    xt = torch.from_numpy(x)
                    with torch.inference_mode():
                        torch_times = timed(lambda: torch.nn.functional.linear(xt, wt), args.repeat)
                    dense_rt[m] = (torch_times, timed(lambda: ort_run(x), args.repeat))
                (t_torch, min_torch), (t_ort, min_ort) = dense_rt[m]
                run32, y32 = fp32_prepare(x)
                run8, y8 = int8_prepare(x)
                (t32, min32), (t8, min8) = timed(run32, args.repeat), timed(run8, args.repeat)
                want32 = x @ w.T
                q = np.clip(np.rint(x / np.float32(x_scale)) + zero_point, 0, 255).astype(np.int64)
                want8 = x_scale * row_scale * ((q - zero_point) @ codes_dense.T)
                err32 = float(np.abs(y32.numpy() - want32).max() / max(np.abs(want32).max(), 1e-30))
                err8 = float(np.abs(y8.numpy() - want8).max() / max(np.abs(want8).max(), 1e-30))
                row = {"K": k, "N": n, "M": m, "sparsity": sparsity, "block": args.block,
                       "torch_ms": 1e3 * t_torch, "ort_ms": 1e3 * t_ort, "bsr_fp32_ms": 1e3 * t32,
                       "bsr_int8_ms": 1e3 * t8, "fp32_vs_torch": t_torch / t32, "fp32_vs_ort": t_ort / t32,
                       "int8_vs_torch": t_torch / t8, "int8_vs_ort": t_ort / t8, "int8_vs_fp32": t32 / t8,
                       "fp32_rel_err": err32, "int8_rel_err_vs_integer_formula": err8,
                       "min_ms": {"torch": 1e3 * min_torch, "ort": 1e3 * min_ort, "bsr_fp32": 1e3 * min32,
                                  "bsr_int8": 1e3 * min8}}
                rows.append(row)
                print(f"{k:>4} x{n:>5} {m:>4} {sparsity:>4.2f} | {row['torch_ms']:8.3f} {row['ort_ms']:8.3f} "
                      f"{row['bsr_fp32_ms']:8.3f} {row['bsr_int8_ms']:8.3f}    | {row['fp32_vs_torch']:10.2f} "
                      f"{row['fp32_vs_ort']:8.2f} {row['int8_vs_torch']:10.2f} {row['int8_vs_ort']:8.2f} "
                      f"{row['int8_vs_fp32']:9.2f}", flush=True)
                if err32 > 1e-4 or err8 > 1e-4:
                    print(f"  WARNING: relative error fp32 {err32:.1e}, int8 {err8:.1e}")
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "spmm", "cpu": model, "threads": args.threads, "target": args.target,
              "fp32_lanes": cpu.lanes, "block": args.block, "repeat": args.repeat,
              "versions": {"tvm": tvm.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
              "fp32_schedule": fp32.notes, "int8_schedule": int8.notes,
              "note": "*_ms: median of repeats per runner (min_ms: their minimum); timings on a shared "
                      "machine vary by tens of percent",
              "rows": rows}
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")
    write_docs(report, str(args.out))


if __name__ == "__main__":
    main()

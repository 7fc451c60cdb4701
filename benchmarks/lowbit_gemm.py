"""Latency of the tvm backend's int8 / int4 weight-only matmul kernels against dense fp32 and ORT.

Shapes: the linear layers of BERT-base (K x N = 768x768, 768x3072, 3072x768) at M = 1, 32, 128
rows (M = 1 is decoding: the GEMV schedule; 32 and 128 the prefill schedule). Runners, all in
one run, all with the same thread count (TVM_NUM_THREADS, torch.set_num_threads, ORT
intra_op_num_threads; default os.cpu_count()):

- tvm int8 per-channel, tvm int4 g128: ``nnforge.backends.tvm.kernels.lowbit`` on codes from
  ``IntQuant.quantize`` (symmetric), built for ``llvm -mcpu=native``;
- torch fp32: ``F.linear`` on the dense weight;
- ORT MatMulNBits bits 4 and 8, block_size 128, default accuracy_level (the com.microsoft
  contrib op nnforge's onnx backend emits), one-node models over the same packed codes;
- ORT dense MatMul on the fp32 weight.

Each runner is timed in ``--rounds`` stretches of ``--repeat`` calls, stretches taken in turn
across runners (nnforge.timing.alternating_ms: a pause so one runtime's spinning threads are idle
before the next, and a warm-up); the median over all calls is reported, with speed-ups over torch
fp32 and over the ORT MatMulNBits of the same bit width. Outputs are checked against x @ W.T on
the way. Writes benchmarks/out/lowbit_gemm.json and the table in docs/measured/lowbit_gemm.md.

    python benchmarks/lowbit_gemm.py [--threads N] [--repeat 30] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

OUT = Path(__file__).parent / "out"
SHAPES = [(768, 768), (768, 3072), (3072, 768)]      # (K, N) of BERT-base's linear layers
ROWS = [1, 32, 128]
BLOCK = 128
TARGET = "llvm -mcpu=native"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=30, help="calls per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, nargs="+", default=ROWS)
    return ap.parse_args()


ARGS = parse_args()
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)     # read once, when TVM's thread pool starts

import numpy as np                                     # noqa: E402
import onnxruntime as ort                              # noqa: E402
import torch                                           # noqa: E402
import torch.nn.functional as F                        # noqa: E402
import tvm                                             # noqa: E402
from onnx import TensorProto, helper, numpy_helper     # noqa: E402

from nnforge.backends.tvm.kernels.lowbit import int_weight_matmul, llvm_target   # noqa: E402
from nnforge.ir import IntQuant                        # noqa: E402
from nnforge.timing import alternating_ms, machine       # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_table                                      # noqa: E402


def ort_session(nodes, initializers, k: int, n: int):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ARGS.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def ort_matmul_nbits(enc: IntQuant):
    """MatMulNBits over the encoding's packed codes (block = group = BLOCK, offset-binary codes
    so no zero-point input), as the onnx backend builds it."""
    n, k = enc.shape
    codes = enc.codes.numpy().reshape(n, k // BLOCK, BLOCK * enc.bits // 8)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=k, N=n,
                            bits=enc.bits, block_size=BLOCK)
    return ort_session([node], [numpy_helper.from_array(codes, "B"),
                                numpy_helper.from_array(enc.scale.numpy().reshape(-1), "scales")], k, n)


def ort_dense(w: np.ndarray):
    n, k = w.shape
    return ort_session([helper.make_node("MatMul", ["x", "wt"], ["y"])],
                       [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt")], k, n)


def tvm_kernel(enc: IntQuant):
    n, k = enc.shape
    kern = int_weight_matmul("w", enc.codes, enc.bits, enc.scale, None, enc.group_size, n, k, TARGET)
    fn = tvm.compile(kern.func, target=llvm_target(TARGET))[kern.name]
    consts = [tvm.runtime.tensor(c) for c in kern.consts]
    bound = {}      # id(x) -> (x, y) as TVM tensors: like torch.from_numpy, no copy of x per call

    def run(x: np.ndarray):
        if id(x) not in bound:
            bound[id(x)] = (x, tvm.runtime.tensor(x), tvm.runtime.tensor(np.empty((x.shape[0], n), np.float32)))
        _, x_tvm, y = bound[id(x)]
        fn(x_tvm, *consts, y)
        return y
    return run


def runners_for(k: int, n: int, seed: int = 0):
    """name -> (run(x), W it computes with), for one [n, k] weight."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5
    int8_channel = IntQuant.quantize(w, 8)
    int4_g128 = IntQuant.quantize(w, 4, group_size=BLOCK)
    int8_g128 = IntQuant.quantize(w, 8, group_size=BLOCK)
    return {
        "torch fp32": (lambda x: F.linear(torch.from_numpy(x), w), w),
        "ORT MatMul fp32": (ort_dense(w.numpy()), w),
        "ORT MatMulNBits 8": (ort_matmul_nbits(int8_g128), int8_g128.decode()),
        "ORT MatMulNBits 4": (ort_matmul_nbits(int4_g128), int4_g128.decode()),
        "tvm int8 per-channel": (tvm_kernel(int8_channel), int8_channel.decode()),
        "tvm int4 g128": (tvm_kernel(int4_g128), int4_g128.decode()),
    }


def as_numpy(y) -> np.ndarray:
    return y.numpy() if hasattr(y, "numpy") else np.asarray(y)


def time_runners(runners: dict, x: np.ndarray) -> dict[str, float]:
    """Median microseconds per call of each runner on x, over stretches taken in turn."""
    calls = {name: (lambda run=run: run(x)) for name, (run, _) in runners.items()}
    ms = alternating_ms(calls, (), rounds=ARGS.repeat * ARGS.rounds, passes=ARGS.rounds)
    return {name: 1000 * t for name, t in ms.items()}


def docs_rows(report: dict) -> tuple[list[str], list[list]]:
    """The docs table of lowbit_gemm.json: each kernel's speed-up over torch fp32 and over ORT's
    MatMulNBits of the same bit width, per shape and row count."""
    columns = ["K x N", "M", "int8 x torch fp32", "int8 x MatMulNBits 8", "int4 x torch fp32", "int4 x MatMulNBits 4"]
    return columns, [[f"{r['K']} x {r['N']}", r["M"], *(f"{r[f'int{b}_vs_{peer}']:.2f}x" for b in (8, 4)
                                                          for peer in ("torch_fp32", "ort_nbits"))]
                     for r in report["rows"]]


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    rows = []
    print(f"threads {ARGS.threads}; median us per call (x: speed-up of the tvm kernel)")
    for k, n in SHAPES:
        runners = runners_for(k, n)
        for m in ARGS.rows:
            x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
            worst = {}
            for name, (run, w) in runners.items():     # every runner computes x @ W.T of its own W
                want = x @ w.numpy().T
                worst[name] = float(np.abs(as_numpy(run(x)) - want).max() / np.abs(want).max())
            us = time_runners(runners, x)
            row = {"K": k, "N": n, "M": m, "us": {name: round(t, 2) for name, t in us.items()},
                   "max_rel_error": worst}
            for bits, name in ((8, "tvm int8 per-channel"), (4, "tvm int4 g128")):
                row[f"int{bits}_vs_torch_fp32"] = round(us["torch fp32"] / us[name], 3)
                row[f"int{bits}_vs_ort_fp32"] = round(us["ORT MatMul fp32"] / us[name], 3)
                row[f"int{bits}_vs_ort_nbits"] = round(us[f"ORT MatMulNBits {bits}"] / us[name], 3)
            rows.append(row)
            print(f"K={k:<5} N={n:<5} M={m:<4} " + "  ".join(f"{name} {t:9.1f}" for name, t in us.items()))
            print(" " * 23 + "  ".join(f"int{b}: x{row[f'int{b}_vs_torch_fp32']:.2f} torch fp32, "
                                       f"x{row[f'int{b}_vs_ort_fp32']:.2f} ORT fp32, "
                                       f"x{row[f'int{b}_vs_ort_nbits']:.2f} MatMulNBits {b}" for b in (8, 4)))
    OUT.mkdir(exist_ok=True)
    meta = {"threads": ARGS.threads, "cpu": platform.processor() or platform.machine(),
            "llvm_target": str(llvm_target(TARGET)), "repeat": ARGS.repeat, "rounds": ARGS.rounds,
            "torch": torch.__version__, "onnxruntime": ort.__version__, "tvm": tvm.__version__,
            "note": "ORT MatMulNBits 8 uses 128-blocks; the tvm int8 kernel is per-channel (as specified)"}
    report = {"meta": {**meta, "machine": machine()}, "rows": rows}
    (OUT / "lowbit_gemm.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {OUT / 'lowbit_gemm.json'}")
    docs_table.write("measured/lowbit_gemm.md", "lowbit_gemm", *docs_rows(report), timed=True,
                     source="benchmarks/out/lowbit_gemm.json",
                     machine=report["meta"]["machine"],
                     notes=[f"{meta['threads']} threads; median of {meta['rounds']} x {meta['repeat']} calls a runner "
                            f"in alternating stretches; {meta['note']}."])


if __name__ == "__main__":
    main()

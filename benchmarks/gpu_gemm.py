"""GPU weight GEMM: nnforge's Triton kernels against torch fp16 matmul (cuBLAS), in the same run.

For every M in {1, 2, 4, 8, 16, 32, 64, 128} and LLM weight shapes K x N (Llama-3-8B's 4096 x
4096, 4096 x 14336, 14336 x 4096; Llama-2-70B's MLP 8192 x 28672, 28672 x 8192), each weight
format's kernel computes y = x @ W.T for fp16 x, and so does ``torch.matmul`` on the fp16 weight:

- ``w4a16`` int4, groups of 128, zero points (kernels/intweight.py); ``w8a16`` int8 per channel
- ``fp8`` E4M3 weights, per-channel scales, decoded in registers (kernels/minifloat.py), and
  ``fp8-act`` (H100 only): E4M3 activations too, a native fp8 tensor-core dot
- ``nvfp4`` (E2M1, E4M3 scales per 16) and ``mxfp4`` (E2M1, E8M0 scales per 32)
- ``sparse24-w4``: 2:4 sparsity, the kept values int4 g128 (kernels/sparse24.py)
- ``lut4``: 4-bit palettes, one fp16 LUT per output channel (kernels/lut.py)

Times are medians from ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call, so
weights come from HBM as they do in decoding). Reported per row: the speed-up over cuBLAS fp16, the
*ideal* speed-up set by bytes moved (fp16 weight + activations + output over the format's stored
bytes + the same), the fraction of that ideal reached, and the achieved bandwidth as a fraction of
the target's (``bandwidth_gbps`` in nnforge/targets/<h100|a100>.toml, chosen from the device name).
Each kernel's output is checked against the fp16 product of the decoded weight before it is timed.
Goals on H100 (issue 6): w4a16 >= 3.5x and fp8 >= 1.8x over cuBLAS at M <= 16.

Writes benchmarks/out/gpu_gemm.json (device name, versions, every row) and prints a table.

    python benchmarks/gpu_gemm.py [--m 1 2 4 8 16 32 64 128] [--shapes 4096x4096 8192x28672] [--formats w4a16 fp8]

Without a CUDA GPU there is nothing to time: the script says so and exits with status 2. ``--check``
runs the same code path on the CPU under Triton's interpreter at toy shapes (set TRITON_INTERPRET=1
before starting it), to check the script itself; its timings mean nothing and it writes no file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
MS = [1, 2, 4, 8, 16, 32, 64, 128]
SHAPES = ["4096x4096", "4096x14336", "14336x4096", "8192x28672", "28672x8192"]
FORMATS = ["w4a16", "w8a16", "fp8", "fp8-act", "nvfp4", "mxfp4", "sparse24-w4", "lut4"]
GOALS = {"w4a16": 3.5, "fp8": 1.8}          # speed-up over cuBLAS fp16 at M <= 16, on H100


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=MS)
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="KxN")
    ap.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    ap.add_argument("--check", action="store_true",
                    help="CPU under TRITON_INTERPRET=1, toy shapes: checks the script, times nothing")
    return ap.parse_args()


def gpu_target(device_name: str) -> str | None:
    """The nnforge target of this GPU (its TOML holds the bandwidth), or None for other GPUs."""
    name = device_name.upper()
    return "h100" if "H100" in name else "a100" if "A100" in name else None


def encode(fmt: str, w, gen):
    """The IR encoding of ``w`` [N, K] in ``fmt`` (speed depends on the layout, not on the values,
    so round-to-nearest, magnitude 2:4 and a random palette stand in for the calibrated passes)."""
    import torch
    from nnforge.ir import Palettized, Sparse
    from nnforge.passes.prune.sparsity import nm_keep
    from nnforge.passes.quantize.formats import parse_format, quantize_rtn
    spec = {"w4a16": ("uint4", 128), "w8a16": ("int8", None), "fp8": ("e4m3", None), "fp8-act": ("e4m3", None),
            "nvfp4": ("nvfp4", None), "mxfp4": ("mxfp4", None)}
    if fmt in spec:
        name, group = spec[fmt]
        return quantize_rtn(w, parse_format(name, group_size=group))
    if fmt == "sparse24-w4":
        keep = nm_keep(w.abs().reshape(w.shape[0], -1, 4), 2, 4).reshape(w.shape)
        return Sparse.from_mask(w, keep, "2:4", lambda v: quantize_rtn(v, parse_format("uint4", group_size=128)))
    if fmt == "lut4":
        idx = torch.randint(0, 16, tuple(w.shape), generator=gen, dtype=torch.uint8)
        lut = torch.sort(torch.randn(w.shape[0], 16, generator=gen), dim=1).values.half() * 0.02
        return Palettized.from_indices(idx, lut, bits=4, shape=tuple(w.shape), group_size=1)
    raise ValueError(fmt)


def kernel_module(fmt: str):
    from nnforge.backends.triton.kernels import intweight, lut, minifloat, sparse24
    return {"w4a16": intweight, "w8a16": intweight, "fp8": minifloat, "fp8-act": minifloat, "nvfp4": minifloat,
            "mxfp4": minifloat, "sparse24-w4": sparse24, "lut4": lut}[fmt]


def runner(fmt: str, packed, x):
    """A no-argument call computing y = x @ W.T with the format's kernel."""
    mod = kernel_module(fmt)
    if fmt == "fp8-act":
        scale = float(x.abs().max()) / 448.0
        xq = mod.quantize_fp8(x, scale)
        return lambda: mod.matmul_fp8act(xq, scale, packed)
    return lambda: mod.matmul(x, packed)


def bench(fn, check: bool) -> float:
    """Median ms of ``fn``: triton's do_bench on a GPU (L2 flushed per call); a wall-clock median on the
    CPU under --check (meaningless as a figure, but the same code path)."""
    if check:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return sorted(times)[1]
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def main() -> int:
    args = parse_args()
    import torch
    check = args.check
    if check:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--check runs under Triton's interpreter: start it with TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        device, device_name, target = "cpu", "CPU (Triton interpreter: timings mean nothing)", "h100"
        ms, shapes = [1, 16], [(64, 96)]
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU visible: nothing to time (use --check under TRITON_INTERPRET=1 to test the script)",
                  file=sys.stderr)
            return 2
        device, device_name = "cuda", torch.cuda.get_device_name(0)
        target = gpu_target(device_name)
        ms, shapes = args.m, [tuple(int(d) for d in s.split("x")) for s in args.shapes]
    from nnforge.targets import get_target
    bandwidth = get_target(target).memory["bandwidth_gbps"] if target else None
    formats = [f for f in args.formats if f != "fp8-act" or target == "h100"]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k, n in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        w16 = w.half().to(device)
        for fmt in formats:
            t0 = time.perf_counter()
            enc = encode(fmt, w, gen)
            mod = kernel_module(fmt)
            why = mod.supports(enc, target or "h100")
            if why is not None:
                print(f"{k}x{n} {fmt}: kernel refuses it: {why}", flush=True)
                continue
            packed = mod.pack(enc, target or "h100").to(device)
            wdec = enc.decode().half().to(device)
            fmt_bytes = sum(t.numel() * t.element_size() for t in packed.tensors.values())
            print(f"{k}x{n} {fmt}: encoded and packed in {time.perf_counter() - t0:.1f} s "
                  f"({fmt_bytes / (2 * n * k):.3f}x the fp16 bytes)", flush=True)
            for m in ms:
                x = (torch.randn(m, k, generator=gen) * 0.5).half().to(device)
                fn = runner(fmt, packed, x)
                y = fn().float()
                ref = (x.float() @ wdec.float().T)
                rel = float((y - ref).norm() / ref.norm().clamp_min(1e-12))
                if rel > (0.05 if fmt == "fp8-act" else 0.01):
                    raise SystemExit(f"{k}x{n} {fmt} m={m}: kernel output is off (relative error {rel:.3g})")
                ms_fmt = bench(fn, check)
                ms_ref = bench(lambda: torch.matmul(x, w16.T), check)
                act = 2 * m * (k + n)
                ideal = (2 * n * k + act) / (fmt_bytes + act)
                speedup = ms_ref / ms_fmt
                row = {"K": k, "N": n, "M": m, "format": fmt, "ms": round(ms_fmt, 5), "cublas_fp16_ms": round(ms_ref, 5),
                       "speedup": round(speedup, 3), "ideal_speedup": round(ideal, 3),
                       "fraction_of_ideal": round(speedup / ideal, 3), "rel_error": rel,
                       "weight_bytes": fmt_bytes}
                if bandwidth:
                    row["bandwidth_fraction"] = round((fmt_bytes + act) / (ms_fmt * 1e-3) / (bandwidth * 1e9), 3)
                rows.append(row)
                print(f"  m={m:<4} {ms_fmt:8.4f} ms  cuBLAS fp16 {ms_ref:8.4f} ms  {speedup:5.2f}x "
                      f"(ideal {ideal:4.2f}x, {speedup / ideal:5.1%})", flush=True)
    goals = {}
    for fmt, goal in GOALS.items():
        small = [r["speedup"] for r in rows if r["format"] == fmt and r["M"] <= 16]
        if small:
            goals[fmt] = {"goal_on_h100": goal, "min_speedup_m_le_16": min(small),
                          "met": target == "h100" and min(small) >= goal}
    print(json.dumps(goals, indent=1))
    if check:
        print("--check: script ran end to end under the interpreter; nothing written")
        return 0
    import triton
    meta = {"device": device_name, "target": target, "bandwidth_gbps": bandwidth, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    OUT.mkdir(exist_ok=True)
    report = {"meta": meta, "goals": goals, "rows": rows}
    (OUT / "gpu_gemm.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {OUT / 'gpu_gemm.json'}")
    write_docs(report)
    return 0


def docs_rows(report: dict) -> tuple[list[str], list[list]]:
    """The docs table of gpu_gemm.json: each kernel against cuBLAS fp16, and the share it reaches
    of the speed-up its bytes allow."""
    columns = ["K x N", "format", "M", "ms", "cuBLAS fp16 ms", "speed-up", "ideal", "of ideal"]
    return columns, [[f"{r['K']} x {r['N']}", r["format"], r["M"], f"{r['ms']:.4f}", f"{r['cublas_fp16_ms']:.4f}",
                      f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{r['fraction_of_ideal']:.0%}"]
                     for r in report["rows"]]


def write_docs(report: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import docs_table                   # beside this script
    from nnforge.timing import machine
    m = report["meta"]
    docs_table.write("measured/gpu_gemm.md", "gpu_gemm", *docs_rows(report), source="benchmarks/out/gpu_gemm.json",
                     machine={**machine(), "device": m["device"]},
                     notes=[f"Target {m['target']}, torch {m['torch']}, CUDA {m['cuda']}, Triton {m['triton']}; "
                            "medians of triton.testing.do_bench. Goals: " + json.dumps(report["goals"])])


if __name__ == "__main__":
    sys.exit(main())

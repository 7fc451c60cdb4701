"""One decode step's attention on the cpu (tvm) backend's kernels, float cache vs the encoded ones
(docs/kv_cache.md): the float attention kernel (kernels/decoder.py) on float32 K and V and on
kv-f16's float16 ones, and the fused kernels of kernels/kvcache_attention.py on kv8, kv-fp8, kv4 and
kv-nvfp4 state, one query token at the end of a full context. Prints milliseconds per call and each encoding's speed-up over the
float cache.

    python benchmarks/kv_attention_cpu.py                       # contexts 1024 and 4096
    python benchmarks/kv_attention_cpu.py --contexts 4096 --heads 32 --kv-heads 8 --head-dim 128
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _state(kind: str, role: str, keys: torch.Tensor, group: int, residual: int) -> list[np.ndarray]:
    """The state of ``kind`` after ``keys`` [1, kvh, n, d] were written, by the reference encoding."""
    from nnforge.ir.kvcache import cache_encoding
    enc = cache_encoding(kind, role, **({"group": group, "residual": residual} if kind == "kv4" else {}))
    _, kvh, n, d = keys.shape
    state = enc.zeros(1, kvh, n, d)
    state = enc.write(state, keys, torch.arange(n)[None])
    return [t.numpy() for t in state]


def _compile(func, args: list[np.ndarray], target):
    """``func`` built alone for ``target``, and a timer of it on ``args`` (its last one the output):
    milliseconds per call, the best of a few repeats."""
    import tvm
    name = "nf_bench"
    lib = tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=target)
    dev = tvm.cpu()
    arrays = [tvm.runtime.tensor(a, dev) for a in args]
    start = time.perf_counter()
    lib[name](*arrays)
    once = max(time.perf_counter() - start, 1e-6)
    number = max(1, min(100, int(0.02 / once)))
    timer = lib.mod.time_evaluator(name, dev, number=number, repeat=3)
    return lambda: 1e3 * min(timer(*arrays).results)


def _best(timers: dict, rounds: int) -> dict:
    """The best time of each kernel over ``rounds`` rounds that take every kernel in turn, so a
    burst of other work on the machine slows all of them alike rather than one."""
    best = {k: float("inf") for k in timers}
    for _ in range(rounds):
        for k, timer in timers.items():
            best[k] = min(best[k], timer())
    return best


def run(contexts: list[int], heads: int, kv_heads: int, head_dim: int, group: int, residual: int,
        target: str, rounds: int) -> list[dict]:
    from nnforge.backends.tvm import threads
    from nnforge.backends.tvm.kernels.decoder import attention_func
    from nnforge.backends.tvm.kernels.dense import vector_lanes
    from nnforge.backends.tvm.kernels.kvcache_attention import (kv4_attention_func, nvfp4_attention_func,
                                                                per_token_attention_func)
    from nnforge.backends.tvm.llvm_targets import resolve_target
    from nnforge.ir.kvcache import cache_encoding
    tvm_target = resolve_target(target)
    lanes = vector_lanes(tvm_target)
    scale = head_dim ** -0.5
    rows = []
    for ctx in contexts:
        gen = torch.Generator().manual_seed(ctx)
        k, v = (torch.randn(1, kv_heads, ctx, head_dim, generator=gen) for _ in "kv")
        q = torch.randn(1, heads, 1, head_dim, generator=gen).numpy()
        positions = np.array([[ctx - 1]], np.int64)
        out = np.zeros_like(q)
        # the float kernel with the threads the lowering gives it (ops.py), as the encoded ones get them
        timers = {"float": _compile(attention_func(heads, kv_heads, ctx, head_dim, scale, 0, 0.0, lanes,
                                                   threads.most()),
                                    [q, k.numpy(), v.numpy(), positions, out], tvm_target)}
        func = attention_func(heads, kv_heads, ctx, head_dim, scale, 0, 0.0, lanes, threads.most(),
                              cache_dtype="float16")
        state = _state("kv-f16", "k", k, group, residual) + _state("kv-f16", "v", v, group, residual)
        timers["kv-f16"] = _compile(func, [q, *state, positions, out], tvm_target)
        for kind in ("kv8", "kv-fp8"):
            # the channels a scale covers as the preset's encoding sets them (kv8: groups, kv-fp8: the head)
            func = per_token_attention_func(kind, heads, kv_heads, ctx, head_dim, scale, 0, 0.0, lanes,
                                            threads.most(), cache_encoding(kind, "k").channels(head_dim))
            state = _state(kind, "k", k, group, residual) + _state(kind, "v", v, group, residual)
            timers[kind] = _compile(func, [q, *state, positions, out], tvm_target)
        func = kv4_attention_func(heads, kv_heads, ctx, head_dim, group, residual, scale, 0, 0.0, lanes,
                                  threads.most())
        state = _state("kv4", "k", k, group, residual) + _state("kv4", "v", v, group, residual)
        timers["kv4"] = _compile(func, [q, *state, positions, out], tvm_target)
        func = nvfp4_attention_func(heads, kv_heads, ctx, head_dim, scale, 0, 0.0, threads.most())
        state = _state("kv-nvfp4", "k", k, group, residual) + _state("kv-nvfp4", "v", v, group, residual)
        timers["kv-nvfp4"] = _compile(func, [q, *state, positions, out], tvm_target)
        times = _best(timers, rounds)
        rows.append({"context": ctx, "ms": times, "speedup": {kind: times["float"] / t for kind, t in times.items()
                                                             if kind != "float"}})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--group", type=int, default=32, help="kv4 group size (the kv4 preset's)")
    p.add_argument("--residual", type=int, default=128, help="kv4 float window (the kv4 preset's)")
    p.add_argument("--target", default="llvm -mcpu=native")
    p.add_argument("--rounds", type=int, default=10, help="rounds of timing every kernel in turn (best kept)")
    a = p.parse_args(argv)
    from nnforge.backends.tvm import threads
    threads.configure()
    print(f"heads {a.heads}, kv heads {a.kv_heads}, head dim {a.head_dim}, one query token, {a.target}")
    for row in run(a.contexts, a.heads, a.kv_heads, a.head_dim, a.group, a.residual, a.target, a.rounds):
        ms = ", ".join(f"{k} {t:.3f} ms" for k, t in row["ms"].items())
        up = ", ".join(f"{k} {x:.2f}x" for k, x in row["speedup"].items())
        print(f"context {row['context']}: {ms}; speed-up over float: {up}")


if __name__ == "__main__":
    main()

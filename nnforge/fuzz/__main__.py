"""``python -m nnforge.fuzz``: differential fuzzing from the command line (``make fuzz``).

    python -m nnforge.fuzz --minutes 10 --seed 1 --backends onnx,tvm --out build/fuzz-findings
    python -m nnforge.fuzz --graphs 30 --backends onnx
    python -m nnforge.fuzz --replay build/fuzz-findings/mismatch-onnx-123-p0

Prints graphs, pipelines and backend runs tried and every distinct finding; exits 1 when any
finding is open (a mismatch, a backend or pass error, an IR inconsistency).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnforge.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=None, help="stop after this long (default: 10 unless --graphs)")
    p.add_argument("--graphs", type=int, default=None, help="stop after this many graphs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default="onnx,tvm",
                   help="comma list of onnx, tvm, hls (C-simulation, ~15 s a graph), triton (TRITON_INTERPRET=1)")
    p.add_argument("--pipelines", type=int, default=2, help="random pipelines per graph")
    p.add_argument("--max-nodes", type=int, default=12)
    p.add_argument("--ops", default=None, help="comma list of ops to draw from (default: the whole registry), or "
                   "a backend name for the ops it lowers (--ops hls)")
    p.add_argument("--out", default="build/fuzz-findings", help="where findings are written")
    p.add_argument("--reduce-seconds", type=float, default=60.0, help="time to shrink each new finding")
    p.add_argument("--replay", default=None, help="run a finding's repro again and report")
    args = p.parse_args(argv)
    if args.replay:
        from .findings import replay
        result = replay(args.replay)
        print(json.dumps(result, indent=1, default=str))
        return 0 if result["status"] in ("fixed", "unsupported", "unstable") else 1
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from .runner import fuzz
    minutes = args.minutes if args.minutes is not None else (None if args.graphs else 10.0)
    stats = fuzz(graphs=args.graphs, seconds=None if minutes is None else 60 * minutes, seed=args.seed,
                 backends=[b for b in args.backends.split(",") if b], out=args.out, pipelines=args.pipelines,
                 max_nodes=args.max_nodes, ops=_ops(args.ops),
                 reduce_s=args.reduce_seconds)
    print(stats.summary())
    return 1 if stats.open_findings else 0


def _ops(spec: str | None) -> list[str] | None:
    """--ops: a comma list, or a backend's name for the ops its LOWERINGS table lowers."""
    tables = {"onnx": "nnforge.backends.onnx.ops", "tvm": "nnforge.backends.tvm.ops",
              "hls": "nnforge.backends.hls.project"}
    if not spec:
        return None
    if spec in tables:
        import importlib
        return sorted(importlib.import_module(tables[spec]).LOWERINGS)
    return spec.split(",")


if __name__ == "__main__":
    sys.exit(main())

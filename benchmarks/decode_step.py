"""A cpu decoder bundle's decode step on its step copy of ``main`` (batch and seq fixed at 1:
nnforge/backends/tvm/specialise.py) against ``main`` itself, on the same library and inputs,
timed in alternating stretches so that the host's neighbours slow both alike; and the VM calls
(kernels and builtins) each runs per step.

    python benchmarks/decode_step.py benchmarks/out/llm/bundles/w4-gptq-cpu [BUNDLE...] [--context 128]

Writes benchmarks/out/decode_step.json and the table in docs/measured/decode_step.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import docs_table  # noqa: E402


OUT = HERE / "out"
FUNCTIONS = {"main": False, "step copy": True}      # label -> runner.specialised(...)


def vm_calls(runner, step) -> Counter:
    """The VM's calls during one ``step()``, by kind (builtins by name, kernels together)."""
    seen = Counter()

    def hook(func, symbol, before, result, *args):
        if before:
            seen[symbol if symbol.startswith("vm.builtin.") else "kernels"] += 1
        return 0
    runner.set_instrument(hook)
    try:
        step()
    finally:
        runner.set_instrument(None)
    return seen


def measure(path: Path, context: int, steps: int, rounds: int) -> dict:
    from nnforge.bundle import Bundle
    bundle = Bundle.open(path)
    if not bundle.manifest["backend"]["entry"].get("specialised"):
        raise SystemExit(f"{path}: its library has no step copy of main (not a cpu decoder bundle, or compiled "
                         "before nnforge made one): compile it again")
    lm = bundle.load()
    runner = lm.runner
    prompt = torch.randint(4, 1000, (1, context), generator=torch.Generator().manual_seed(0))
    decoder = lm.decoder()
    token = torch.tensor([5])
    times = {label: [] for label in FUNCTIONS}
    calls = {}
    for r in range(rounds):
        for label, on in (FUNCTIONS.items() if r % 2 == 0 else reversed(FUNCTIONS.items())):
            runner.specialised(on)
            decoder.reset()
            decoder.prefill(prompt, all_logits=False)
            decoder.step(token)                         # warm: the weights this function reads
            if label not in calls:
                calls[label] = vm_calls(runner, lambda: decoder.step(token))
            for _ in range(steps):
                t0 = time.perf_counter()
                decoder.step(token)
                times[label].append(time.perf_counter() - t0)
    runner.specialised(True)
    return {"bundle": str(path), "context": context, "steps": steps, "rounds": rounds,
            "median_ms": {k: float(np.median(v) * 1e3) for k, v in times.items()},
            "vm_calls": {k: dict(v) for k, v in calls.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=24, help="timed steps per stretch")
    p.add_argument("--rounds", type=int, default=10, help="stretches per function, alternating")
    args = p.parse_args(argv)
    results = []
    for b in args.bundles:
        r = measure(Path(b), args.context, args.steps, args.rounds)
        print(json.dumps(r), flush=True)
        results.append(r)
    OUT.mkdir(exist_ok=True)
    from nnforge.timing import machine
    (OUT / "decode_step.json").write_text(json.dumps({"results": results, "args": vars(args)}, indent=1))
    columns = ["bundle", "step ms, main", "step ms, step copy", "main / step copy", "VM calls per step, main",
               "VM calls per step, step copy", "of them kernels"]
    rows = []
    for r in results:
        ms, calls = r["median_ms"], r["vm_calls"]
        rows.append([Path(r["bundle"]).name, f"{ms['main']:.2f}", f"{ms['step copy']:.2f}",
                     f"{ms['main'] / ms['step copy']:.2f}x", sum(calls["main"].values()),
                     sum(calls["step copy"].values()), calls["step copy"].get("kernels", 0)])
    notes = [f"One decode step at batch 1 after a {args.context}-token context: the median of {args.rounds} "
             f"alternating stretches of {args.steps} steps per function, each stretch after a fresh prefill and one "
             "untimed step, on the same loaded library and inputs. VM calls: the Relax VM's calls during one step "
             "(its instrument hook), kernels and builtins (shape tuples, shape checks, allocations, reshapes) "
             "together; benchmarks/out/decode_step.json has them by kind."]
    docs_table.write("measured/decode_step.md", "decode_step", columns, rows, source=str(OUT / "decode_step.json"),
                     notes=notes, timed=True, machine=machine(), cmd=docs_table.command())
    return 0


if __name__ == "__main__":
    sys.exit(main())

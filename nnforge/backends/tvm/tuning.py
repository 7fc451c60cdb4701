"""Per-shape schedule choice for the tvm backend's kernel templates, measured on this host.

Each hand-written kernel is a template with a few knobs (AutoTVM's idea, not MetaSchedule's): the
dense GEMM's register tile (rows x vectors of output columns) and rows per parallel task, the fp32
BSR SpMM's token vectors per register tile. Their defaults are fitted to the register file, which
is right for most shapes, not all: how many panels a layer has, whether its weight stays in L2 and
how the rows split over the cores change the best tile. With the target option ``tune = true``
the lowering builds every candidate of each distinct shape, times it on this CPU at ``tune_rows``
rows (default 128 and 384) with TVM's time evaluator, and keeps the fastest; the default stays
unless a candidate beats it by ``tune_margin`` (default 3%), so noise does not flip a choice.

Every choice (measured, reused or default) is a record in the bundle's ``tvm_tuning.json``, with
each candidate's time; the library is built from the chosen configs, so a load never tunes. A
later compile passes ``tuning_records = "<bundle>/tvm_tuning.json"`` to reuse them without
measuring (records of another CPU, thread count or kernel version are ignored and said so).

    >>> t = nf.target("cpu").with_options(tune=True, tune_rows=[128])
    >>> bundle = nf.compile(model, target=t, recipe="block-sparse-80", example_inputs=(ids, mask))

Why not MetaSchedule: on the default model's shapes its tuned dense GEMM stayed slower than this
template's default after minutes of tuning (``benchmarks/metaschedule.py``, docs/measured/
metaschedule.md), and it cannot tune our symbolic-row kernels, only static shapes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..base import BackendError

TUNING_FILE = "tvm_tuning.json"
VERSION = 1                     # bump when a template's knobs change meaning: old records are then ignored
DEFAULT_ROWS = (128, 384)
DEFAULT_MARGIN = 0.03
OPTIONS = ("tune", "tune_rows", "tune_margin", "tuning_records")


@dataclass
class Record:
    kernel: str                 # template: "dense", "bsr_fp32"
    key: str                    # the shape it was chosen for, e.g. "384x1536" or "768x3072 block4x1 d0.20"
    chosen: dict
    default: dict
    source: str                 # "measured" | "records" | "default"
    ms: list = field(default_factory=list)    # [{"config": ..., "ms": {rows: time}}] when measured

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "key": self.key, "chosen": self.chosen, "default": self.default,
                "source": self.source, "candidates": self.ms}


def _threads() -> int:
    return int(os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1)


class Tuner:
    """The schedule choices of one lowering: measured (``tune``), reused (``tuning_records``) or default."""

    def __init__(self, options: dict, tvm_target, can_measure: tuple[bool, str], where: str):
        unknown = sorted(k for k in options if k.startswith("tun") and k not in OPTIONS)
        if unknown:
            raise BackendError(f"{where}: unknown tuning option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
        self.enabled = bool(options.get("tune", False))
        self.rows = [int(r) for r in options.get("tune_rows", DEFAULT_ROWS)]
        self.margin = float(options.get("tune_margin", DEFAULT_MARGIN))
        if not self.rows or min(self.rows) < 1:
            raise BackendError(f"{where}: tune_rows must be a list of positive row counts, got {self.rows}")
        self.target = tvm_target
        self.mcpu = str(tvm_target.attrs.get("mcpu", ""))
        self.threads = _threads()
        if self.enabled and not can_measure[0]:
            raise BackendError(f"{where}: tune = true measures kernels on this machine, but its bundles cannot run "
                               f"here ({can_measure[1]}); tune on such a machine and pass its {TUNING_FILE} as "
                               "tuning_records")
        self.records: dict[tuple[str, str], Record] = {}
        self.reused, self.ignored = self._read(options.get("tuning_records"), where)

    def _read(self, path, where: str) -> tuple[dict, list[str]]:
        if path is None:
            return {}, []
        try:
            data = json.loads(Path(path).read_text())
            records = data["records"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BackendError(f"{where}: tuning_records {path}: not a readable {TUNING_FILE} ({e})") from None
        mine = {"version": VERSION, "mcpu": self.mcpu, "threads": self.threads}
        theirs = {k: data.get(k) for k in mine}
        if theirs != mine:
            return {}, [f"{path}: tuned for {theirs}, this lowering is {mine}: ignored"]
        return {(r["kernel"], r["key"]): r["chosen"] for r in records if r.get("source") != "default"}, []

    def choose(self, kernel: str, key: str, space: list[dict], measure: Callable[[dict, int], float]) -> dict:
        """The config for template ``kernel`` at shape ``key`` out of ``space`` (its first entry the
        default); ``measure(config, rows)`` times one candidate in ms."""
        if (kernel, key) in self.records:
            return self.records[kernel, key].chosen
        default = space[0]
        if (kernel, key) in self.reused:
            record = Record(kernel, key, self.reused[kernel, key], default, "records")
        elif not self.enabled or len(space) == 1:
            record = Record(kernel, key, default, default, "default")
        else:
            timed = []
            for config in space:
                try:
                    timed.append({"config": config, "ms": {str(r): round(measure(config, r), 4) for r in self.rows}})
                except Exception as e:      # a candidate LLVM cannot build is skipped, and said so
                    timed.append({"config": config, "error": str(e).splitlines()[0][:200] if str(e) else repr(e)})
            total = {json.dumps(t["config"], sort_keys=True): sum(t["ms"].values()) for t in timed if "ms" in t}
            if json.dumps(default, sort_keys=True) not in total:
                raise BackendError(f"tuning {kernel} {key}: the default schedule failed to build or run: {timed[0]}")
            best = min(total, key=total.get)
            base = total[json.dumps(default, sort_keys=True)]
            chosen = json.loads(best) if total[best] < base * (1 - self.margin) else default
            record = Record(kernel, key, chosen, default, "measured", timed)
        self.records[kernel, key] = record
        return record.chosen

    def to_dict(self) -> dict:
        return {"version": VERSION, "mcpu": self.mcpu, "threads": self.threads, "tune": self.enabled,
                "rows": self.rows, "margin": self.margin, "ignored": self.ignored,
                "records": [r.to_dict() for r in self.records.values()]}

    def write(self, out_dir: Path) -> str:
        (Path(out_dir) / TUNING_FILE).write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return TUNING_FILE


def time_kernel(func, arrays: list[np.ndarray], rows: int, k: int, n: int, tvm_target,
                budget_ms: float = 150.0) -> float:
    """Milliseconds per call of the PrimFunc ``func(x, *arrays, y)`` built alone for ``tvm_target``,
    with x random ``[rows, k]``: the best of several repeats (the least disturbed by other work)."""
    import tvm
    name = "nf_tune"
    lib = tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=tvm_target)
    dev = tvm.cpu()
    x = np.random.default_rng(0).standard_normal((rows, k)).astype(np.float32)
    args = [tvm.runtime.tensor(a, dev) for a in [x, *arrays]]
    y = tvm.runtime.tensor(np.zeros((rows, n), np.float32), dev)
    fn = lib[name]
    start = time.perf_counter()
    fn(*args, y)                                  # warm-up, and a first estimate for ``number``
    once = max(time.perf_counter() - start, 1e-6)
    number = max(1, min(200, int(0.02 / once)))
    repeat = max(3, min(9, int(budget_ms / 1e3 / (once * number))))
    return 1e3 * min(lib.mod.time_evaluator(name, dev, number=number, repeat=repeat)(*args, y).results)


__all__ = ["TUNING_FILE", "OPTIONS", "Record", "Tuner", "time_kernel"]

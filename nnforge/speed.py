"""Speed records: how fast a bundle runs on this machine, against the same graph dense on the same
backend and against the model in torch eager, per batch size, measured when the bundle is built.

"Why is my compressed model not faster?" has an answer only next to a dense baseline measured in
the same process on the same machine, so the pipeline (:func:`nnforge.pipeline.build`)
builds one: the imported graph after the cleanup passes alone, lowered by the same backend for the
same target. Batch sizes come from ``nf.compile(..., batch_sizes=(1, 32))`` (the default; the
environment variable ``NNFORGE_BATCH_SIZES``, e.g. ``"1,8"`` or ``"none"``, changes the default;
the test suite turns it off). A batch of size b repeats the check inputs along their batch
dimension; a graph whose batch dimension is fixed is measured at that size only.

Times are medians over calls that alternate between the runners in stretches, after a pause for
the previous runtime's spinning threads (:func:`alternating_ms`), so a change of load on the
machine hits all of them alike. They are measurements of this machine at build time, recorded
with its CPU count and load average, not promises. Each record also says how busy the machine was
while it was timed (:class:`LoadMeter`: other processes' runnable threads, sampled between the
stretches); one timed on a busy machine (:func:`busy`) is marked unreliable, and ``nnforge
inspect`` says so.

    >>> bundle.manifest["speed"]["batches"][1]["ms"]
    {'bundle': 41.2, 'bundle, compressed kernels only': 55.0, 'dense on tvm': 44.9, 'torch eager': 160.3}
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import UsageError
from .ir import Graph, symbolic as sym

DEFAULT_BATCH_SIZES = (1, 32)
ENV = "NNFORGE_BATCH_SIZES"
PAUSE_S = 0.3                   # libgomp and ONNX Runtime stop spinning well within this
BUDGET_S = 2.0                  # time each runner gets per batch size, about
MIN_ROUNDS, MAX_ROUNDS = 6, 30     # at least two calls a stretch (3 stretches)

# Other processes' runnable threads per CPU, averaged over the samples taken while timing, above
# which the times are marked unreliable: the timed threads then wait for CPUs as often as not.
BUSY_PER_CPU = 0.5
# Where threads cannot be counted (no /proc): the 1-minute load average per CPU above which times
# are unreliable; the timed runners count too (about one per CPU while they run).
UNRELIABLE_LOAD_PER_CPU = 1.5

BUNDLE = "bundle"
COMPRESSED_ONLY = "bundle, compressed kernels only"
TORCH = "torch eager"


def default_batch_sizes() -> tuple[int, ...]:
    """``NNFORGE_BATCH_SIZES`` (``"1,32"``; ``"none"`` or empty: no speed records), else (1, 32)."""
    text = os.environ.get(ENV)
    if text is None:
        return DEFAULT_BATCH_SIZES
    if text.strip().lower() in ("", "none", "0", "off"):
        return ()
    try:
        sizes = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"${ENV}: batch sizes are a comma list of positive integers, got {text!r}") from None
    return check_batch_sizes(sizes, f"${ENV}")


def check_batch_sizes(sizes, where: str = "batch_sizes") -> tuple[int, ...]:
    out = tuple(sizes or ())
    if any(not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b < 1 for b in out):
        raise UsageError(f"{where}: batch sizes must be positive integers, got {list(sizes)}")
    return tuple(sorted(set(int(b) for b in out)))


def batch_inputs(graph: Graph, inputs: tuple, batch: int) -> tuple[list[torch.Tensor] | None, str]:
    """``inputs`` resized to ``batch`` along the graph's batch dimension (the symbolic first dim
    the inputs share; rows repeat cyclically), or (None, why) when the graph cannot take it."""
    tensors = [torch.as_tensor(x) for x in inputs]
    firsts = {v.shape[0] for v in graph.inputs if len(v.shape) > 0}
    symbols = {d for d in firsts if isinstance(d, str) and sym.is_symbol(d)}
    if len(symbols) != 1:
        if firsts and all(isinstance(d, int) and d == batch for d in firsts):
            return tensors, ""
        fixed = sorted(str(d) for d in firsts if isinstance(d, int))
        return None, (f"the graph's batch dimension is fixed at {', '.join(fixed)}" if fixed and not symbols else
                      "the graph's inputs share no symbolic first dimension to take as the batch")
    (name,) = symbols
    out = []
    for v, t in zip(graph.inputs, tensors):
        if len(v.shape) > 0 and v.shape[0] == name:
            idx = torch.arange(batch) % max(t.shape[0], 1)
            t = t[idx].contiguous()
        out.append(t)
    return out, ""


def speed_shapes(graph: Graph, inputs: tuple, batches) -> list[dict]:
    """The input shapes of each batch size the graph can take (graph.meta["speed_shapes"], read by
    backends that choose kernels per shape: the tvm backend's dispatch)."""
    out = []
    for b in batches:
        got, _ = batch_inputs(graph, inputs, b)
        if got is not None:
            out.append({"label": f"batch {b}", "batch": b,
                        "inputs": {v.name: list(t.shape) for v, t in zip(graph.inputs, got)}})
    return out


def alternating_ms(runners: dict[str, Callable], args=(), rounds: int = 10, passes: int = 3,
                   meter: "LoadMeter | None" = None) -> dict[str, float]:
    """Median milliseconds per call of each runner on ``args``, over ``rounds`` calls split into
    ``passes`` stretches that alternate between the runners, each after a pause and a warm-up
    (and, with a ``meter``, a sample of the machine's load)."""
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(passes):
        for name, run in runners.items():
            time.sleep(PAUSE_S)
            if meter is not None:
                meter.sample()
            run(*args)
            for _ in range(max(1, rounds // passes)):
                t0 = time.perf_counter()
                run(*args)
                samples[name].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in samples.items()}


def _rounds(runners: dict[str, Callable], budget_s: float) -> int:
    """Calls per runner that fit ``budget_s`` for the slowest one (one timed call each to find out)."""
    slowest = 0.0
    for run in runners.values():
        t0 = time.perf_counter()
        run()
        slowest = max(slowest, time.perf_counter() - t0)
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget_s / max(slowest, 1e-6))))


def measure(runners: dict[str, Callable[[list], object]], graph: Graph, inputs: tuple, batches,
            budget_s: float = BUDGET_S) -> list[dict]:
    """One record per batch size: each runner's median ms on that batch, and the ratios that say
    whether the bundle is faster than its dense form and than torch. ``runners`` map a label to a
    function of the input list (torch tensors); the bundle's own is labelled ``"bundle"``."""
    records = []
    for b in batches:
        got, why = batch_inputs(graph, inputs, b)
        if got is None:
            records.append({"batch": b, "skipped": why})
            continue
        calls = {name: (lambda run=run: run(got)) for name, run in runners.items()}
        rounds = _rounds(calls, budget_s)
        meter = LoadMeter()
        ms = alternating_ms(calls, (), rounds, meter=meter)
        rec = {"batch": b, "inputs": {v.name: list(t.shape) for v, t in zip(graph.inputs, got)}, "rounds": rounds,
               "ms": {k: round(v, 4) for k, v in ms.items()}, "load": meter.summary()}
        mine = ms[BUNDLE]
        rec["speedup"] = {f"vs {k}": round(v / mine, 3) for k, v in ms.items() if k != BUNDLE}
        records.append(rec)
    return records


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine() -> dict:
    """What the times were measured on."""
    import platform
    return {"cpus": cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "load_average": _load_average()}


def others_running() -> int | None:
    """Threads of other processes that are runnable right now: the kernel's count of runnable
    threads (``/proc/loadavg``) less this process's own; None where ``/proc`` cannot say."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        tasks = os.listdir("/proc/self/task")
    except (OSError, ValueError, IndexError):
        return None
    own = 0
    for tid in tasks:
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:          # the thread ended meanwhile
            continue
        own += stat[stat.rindex(")") + 2:].startswith("R")
    return max(running - own, 0)


class LoadMeter:
    """How busy the machine was while something was timed: :func:`others_running`, sampled by
    whoever times (between stretches, when the timed runtime's own threads are idle)."""

    def __init__(self):
        self.samples: list[int] = []

    def sample(self) -> None:
        n = others_running()
        if n is not None:
            self.samples.append(n)

    def summary(self) -> dict:
        """The record's ``load``: the samples' mean per CPU, the load average, and whether the
        machine was too busy for the times to mean much (:func:`busy`)."""
        cpus = cpu_count()
        out = {"cpus": cpus, "samples": len(self.samples), "load_average": _load_average(),
               "others_running_per_cpu": (round(statistics.fmean(self.samples) / cpus, 3) if self.samples else None)}
        out["unreliable"] = busy(out)
        return out


def busy(load: dict | None) -> str:
    """Why times taken under ``load`` (a :meth:`LoadMeter.summary`) are unreliable, or "" when
    they are not: other processes' runnable threads per CPU above ``BUSY_PER_CPU`` while timing,
    or, without samples, a 1-minute load average per CPU above ``UNRELIABLE_LOAD_PER_CPU``."""
    if not load:
        return ""
    cpus = max(load.get("cpus") or 1, 1)
    per_cpu = load.get("others_running_per_cpu")
    if per_cpu is not None:
        return (f"the machine was busy: other processes kept {per_cpu * cpus:.1f} threads runnable on {cpus} CPUs "
                f"on average while timing ({per_cpu:.2f} per CPU, above {BUSY_PER_CPU})") if per_cpu > BUSY_PER_CPU else ""
    avg = (load.get("load_average") or [0.0])[0]
    return (f"the machine was busy: load average {avg:.2f} on {cpus} CPUs ({avg / cpus:.2f} per CPU, above "
            f"{UNRELIABLE_LOAD_PER_CPU})") if avg / cpus > UNRELIABLE_LOAD_PER_CPU else ""


def verdicts(records: list[dict], dense_label: str) -> list[str]:
    """One line per measured batch saying whether compression made the bundle faster or slower
    than the dense graph on the same backend, and whether the per-shape dispatch made it faster
    or slower than its compressed kernels alone; a record timed on a busy machine says so."""
    out = []
    for r in records:
        if "ms" not in r or f"vs {dense_label}" not in r["speedup"]:
            continue
        x = r["speedup"][f"vs {dense_label}"]
        line = (f"batch {r['batch']}: the bundle is {_word(x)} dense ({x:.2f}x: {r['ms'][BUNDLE]:.2f} ms vs "
                f"{r['ms'][dense_label]:.2f} ms)")
        if COMPRESSED_ONLY in r["ms"]:
            alone = r["ms"][dense_label] / r["ms"][COMPRESSED_ONLY]
            gain = r["ms"][COMPRESSED_ONLY] / r["ms"][BUNDLE]
            line += (f"; with compressed kernels only it would be {_word(alone)} dense ({alone:.2f}x), so the "
                     f"per-shape dispatch makes it {_word(gain)} its compressed kernels alone ({gain:.2f}x: "
                     f"{r['ms'][BUNDLE]:.2f} ms vs {r['ms'][COMPRESSED_ONLY]:.2f} ms)")
        why = busy(r.get("load"))
        if why:
            line += f" [unreliable: {why}]"
        out.append(line)
    return out


def _word(x: float) -> str:
    return "faster than" if x >= 1.02 else "slower than" if x <= 0.98 else "as fast as"


def describe(manifest: dict, layers: bool = False) -> list[str]:
    """The lines ``nnforge inspect`` prints for a bundle's speed records and dispatch decisions:
    every dispatched layer with its reason, and with ``layers`` the layers that kept their
    compressed kernel too."""
    sp = manifest.get("speed")
    if not sp:
        return ["  speed: not recorded (a bundle from before speed records)"]
    if not sp.get("measured"):
        return [f"  speed: not measured: {sp.get('why')}"]
    m = sp.get("machine", {})
    out = [f"  speed (measured when built, {m.get('cpus')} CPUs, load {m.get('load_average')}; ms per call, median):"]
    names = []
    for r in sp["records"]:
        names += [k for k in r.get("ms", {}) if k not in names]
    widths = [max(len(n), 9) for n in names]
    out.append("    " + f"{'batch':>5}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths)))
    for r in sp["records"]:
        if "ms" not in r:
            out.append(f"    {r['batch']:>5}  not measured: {r.get('skipped')}")
            continue
        out.append("    " + f"{r['batch']:>5}  " + "  ".join(
            f"{r['ms'][n]:>{w}.3f}" if n in r["ms"] else f"{'-':>{w}}" for n, w in zip(names, widths)))
    out += [f"    {v}" for v in sp.get("verdicts", [])]
    pool = sp.get("bundle_threads")
    if pool and pool.get("calls_by_threads"):
        by = ", ".join(f"{v} on {k}" for k, v in pool["calls_by_threads"].items())
        out.append(f"    the bundle's calls by threads: {by} (pool size: {pool.get('size')})")
    unreliable = [r["batch"] for r in sp["records"] if busy(r.get("load"))]
    if unreliable:
        out.append(f"    warning: batch {', '.join(map(str, unreliable))} timed on a busy machine: the times above say "
                   "more about the other work than about the bundle; compile again on a quiet machine to compare")
    out.append(f"  dispatch: {sp.get('dispatch')}")
    entry = manifest.get("backend", {}).get("entry", {})
    dispatch = entry.get("dispatch") if isinstance(entry, dict) else None
    evidence = (dispatch or {}).get("evidence") or {}
    for label, c in (evidence.get("checks") or {}).items():
        sums = ", ".join(f"{mode} {m['calls_ms']:.3f} of {m['whole_ms']:.3f} ms" for mode, m in c.get("modes", {}).items()
                         if "calls_ms" in m)
        within = f"within +-{evidence.get('margin', 0):.0%}"
        out.append(f"    per-layer times at {label}: " + (
            f"add up to the whole model's ({sums + '; ' if sums else ''}{within})" if c.get("ok") else
            f"refused, no decision rests on them: {c.get('why')}"))
    if dispatch and dispatch.get("layers"):
        for d in dispatch["layers"]:
            if d.get("dispatched") or layers:
                out.append(f"    {d['layer']} ({'dispatched' if d.get('dispatched') else 'compressed'}): {d['why']}")
        for c in dispatch.get("checks") or []:
            why = busy(c.get("load"))
            verdict = ("kept" if c["kept"] else f"{why}: the layers running dense there were moved back" if why else
                       "did not pay: the layers running dense there were moved back")
            out.append(f"    whole-model check at {c['shape']}: dispatched {c['dispatched_ms']:.3f} ms vs compressed "
                       f"kernels only {c['compressed_only_ms']:.3f} ms -> {verdict}")
        kept = sum(not d.get("dispatched") for d in dispatch["layers"])
        if kept and not layers:
            out.append(f"    {kept} layer(s) keep the compressed kernel at every measured shape (--layers lists them)")
        if dispatch.get("dense_bytes_at_run_time"):
            out.append(f"    dense copies made at load: {dispatch['dense_bytes_at_run_time'] / 1e6:.1f} MB of memory "
                       "(the bundle on disk stays compressed)")
    return out


__all__ = ["DEFAULT_BATCH_SIZES", "describe", "alternating_ms", "batch_inputs", "busy", "check_batch_sizes", "cpu_count",
           "default_batch_sizes", "measure", "machine", "others_running", "speed_shapes", "verdicts", "LoadMeter",
           "BUNDLE", "BUSY_PER_CPU", "COMPRESSED_ONLY", "TORCH", "UNRELIABLE_LOAD_PER_CPU"]

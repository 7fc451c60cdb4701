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
the previous runtime's spinning threads (:func:`nnforge.timing.alternating_ms`), so a change of load on the
machine hits all of them alike. They are measurements of this machine at build time, recorded
with its CPU count and load average, not promises. Each record also says how busy the machine was
while it was timed (:class:`nnforge.timing.LoadMeter`: other processes' runnable threads, sampled
between the stretches); one timed on a busy machine (:func:`nnforge.timing.busy`) is marked unreliable, and ``nnforge
inspect`` says so.

    >>> bundle.manifest["speed"]["batches"][1]["ms"]
    {'bundle': 41.2, 'bundle, compressed kernels only': 55.0, 'dense on tvm': 44.9, 'torch eager': 160.3}
"""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from .errors import UsageError
from .ir import Graph
from .timing import LoadMeter, alternating_ms, batch_inputs, busy

DEFAULT_BATCH_SIZES = (1, 32)
ENV = "NNFORGE_BATCH_SIZES"
BUDGET_S = 2.0                  # time each runner gets per batch size, about
MIN_ROUNDS, MAX_ROUNDS = 6, 30     # at least two calls a stretch (3 stretches)


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


__all__ = ["DEFAULT_BATCH_SIZES", "describe", "check_batch_sizes", "default_batch_sizes", "measure", "speed_shapes",
           "verdicts", "BUNDLE", "COMPRESSED_ONLY", "TORCH"]

"""Timing on a shared machine: calls that alternate between runners in stretches, how busy the
machine was while they ran, and when that makes the times unreliable. The speed records
(nnforge.speed), the tvm backend's per-shape dispatch, the demo and the benchmarks all time
through here, so one rule decides what "busy" means.

    >>> meter = LoadMeter()
    >>> ms = alternating_ms({"bundle": run, "torch eager": eager}, (x,), rounds=12, meter=meter)
    >>> busy(meter.summary())          # "" on a quiet machine, else why the times mean little
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .ir import Graph, symbolic as sym

PAUSE_S = 0.3                   # libgomp and ONNX Runtime stop spinning well within this
# Other processes' runnable threads per CPU, averaged over the samples taken while timing, above
# which the times are marked unreliable: the timed threads then wait for CPUs as often as not.
BUSY_PER_CPU = 0.5
# Where threads cannot be counted (no /proc): the 1-minute load average per CPU above which times
# are unreliable; the timed runners count too (about one per CPU while they run).
UNRELIABLE_LOAD_PER_CPU = 1.5


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


def reset_peak_rss() -> bool:
    """Start :func:`peak_rss_bytes` over from the memory held now (Linux: ``/proc/self/clear_refs``),
    so a compile reports its own peak, not an earlier one of the same process; False where the OS
    cannot (the peak then counts from the process's start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The most resident memory this process has held since it started or since the last
    :func:`reset_peak_rss` (None where the OS does not say)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:                     # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024       # bytes on macOS, KiB elsewhere


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


__all__ = ["PAUSE_S", "BUSY_PER_CPU", "UNRELIABLE_LOAD_PER_CPU", "alternating_ms", "batch_inputs", "busy", "cpu_count",
           "machine", "others_running", "LoadMeter"]

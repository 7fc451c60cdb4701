"""Each dispatch candidate's kernel timed inside the model, and the evidence check those times must
pass before a decision rests on them (dispatch.py takes the decisions).

The Relax VM calls an instrument hook before and after every call it makes (kernels and its own
``vm.builtin.*`` bookkeeping); the hook reads a nanosecond clock, so each call's time is the
median over the timed runs of the clock's difference. Three things can make such times wrong
without any error, and each is checked at every measured shape:

- the clock: a time must span ``RESOLVED_TICKS`` of the clock's smallest step, measured
  (:func:`clock_tick`); a coarse clock would give zeros and multiples of its step;
- the sum: runs with the hook alternate with runs without it, and every call's time (less the
  hook's own cost inside the interval, measured on the builtin calls, which do next to nothing)
  must add up to the whole-model time of that mode within ``EVIDENCE_MARGIN``. Times that do not
  add up were taken under conditions the model does not run in (a busy machine: a call's median
  then misses the waits a whole run pays, or catches them all);
- the load: a shape timed while other processes kept the CPUs busy (:func:`nnforge.timing.busy`)
  is refused whatever its sums say.

A layer and shape whose times fail are not used: the layer keeps its compressed kernel there,
and the manifest's dispatch section says why, with the numbers.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from ...ir import Graph

EVIDENCE_MARGIN = 0.15          # |calls - whole model| / whole model, per mode and shape
RESOLVED_TICKS = 20             # clock steps a per-layer time must span
ROUND_BUDGET_S, MIN_ROUNDS, MAX_ROUNDS = 0.5, 5, 21     # rounds (a run with the hook, one without) per mode
BUILTIN = "vm.builtin."
MODES = ("compressed", "dense")


@dataclass
class InModelTimes:
    """What :func:`measure_in_model` found: per candidate layer and shape, (compressed ms, dense
    ms), and per shape the evidence check (``checks[label]``: ``ok``, ``why``, the numbers)."""
    layers: dict[str, dict[str, tuple[float, float]]]
    checks: dict[str, dict] = field(default_factory=dict)
    clock: dict = field(default_factory=dict)        # {"clock": name, "tick_ns": smallest step seen}

    def refused(self, layer: str, label: str) -> str:
        """Why the times of ``layer`` at shape ``label`` cannot carry a decision ("" when they can)."""
        times = self.layers.get(layer, {}).get(label)
        tick = self.clock.get("tick_ns")
        if times is not None and (tick is None or min(times) * 1e6 < RESOLVED_TICKS * tick):
            return (f"its times (compressed {times[0]:.4f} ms, dense {times[1]:.4f} ms) span fewer than "
                    f"{RESOLVED_TICKS} steps of the clock ({self.clock.get('clock')}, smallest step "
                    f"{(tick if tick is not None else math.inf) / 1e6:.4f} ms)")
        check = self.checks.get(label)
        if check is None:
            return "no evidence check was made at this shape"
        if not check.get("ok"):
            return check.get("why") or "the evidence check failed"
        return ""

    def to_dict(self) -> dict:
        return {"margin": EVIDENCE_MARGIN, "clock": self.clock, "checks": self.checks}


def clock_tick(clock: Callable[[], int], steps: int = 1000, limit_s: float = 0.05) -> float:
    """The smallest step ``clock`` (integer nanoseconds) is seen to take: over ``steps`` changes,
    or ``limit_s`` of wall time (infinite when it never moves)."""
    smallest, seen, reads = float("inf"), 0, 0
    deadline = time.perf_counter() + limit_s
    prev = clock()
    while seen < steps:
        now = clock()
        if now != prev:
            smallest, seen, prev = min(smallest, now - prev), seen + 1, now
        reads += 1
        if reads % 256 == 0 and time.perf_counter() > deadline:     # (not every read: that would be the step)
            break
    return smallest


def measure_in_model(runner, symbols: dict[str, str], graph: Graph, inputs: tuple, shapes: list[tuple[str, int]],
                     rounds: int = MIN_ROUNDS, clock: Callable[[], int] = time.perf_counter_ns) -> InModelTimes:
    """Time each candidate layer's kernel call inside the model, on ``inputs`` repeated to each
    batch size (``shapes``: (label, batch)), with every layer on its compressed kernel, then on the
    dense one, and check the times add up (module docstring). ``symbols`` maps each layer, in the
    order the model runs them, to its kernel's function; layers sharing a function are told apart
    by the order of its calls within a run. ``clock`` returns integer nanoseconds."""
    from ...timing import LoadMeter, batch_inputs
    tick = clock_tick(clock)
    out = InModelTimes({layer: {} for layer in symbols},
                       clock={"clock": getattr(clock, "__name__", repr(clock)),
                              "tick_ns": tick if math.isfinite(tick) else None})     # None: it never moved
    calls: list[tuple[str, int]] = []
    started = [0]

    def instrument(func, symbol, before, ret, *args):
        now = clock()
        if before:
            started[0] = now
        else:
            calls.append((symbol, now - started[0]))
        return 0
    try:
        for label, batch in shapes:
            xs, _ = batch_inputs(graph, inputs, batch)
            if xs is None:
                continue
            meter, per_mode = LoadMeter(), {}
            for mode in MODES:
                runner.dispatch(mode)
                t0 = clock()
                runner(*xs)                 # warm-up (and the pool's first allocations)
                n = max(rounds, min(MAX_ROUNDS, int(ROUND_BUDGET_S * 1e9 / max(clock() - t0, 1))))
                whole, runs = [], []
                for _ in range(n):
                    meter.sample()
                    runner.set_instrument(None)
                    t0 = clock()
                    runner(*xs)
                    whole.append(clock() - t0)
                    runner.set_instrument(instrument)
                    calls.clear()
                    runner(*xs)
                    runs.append([(str(s), t) for s, t in calls])
                per_mode[mode] = _mode_times(runs, whole, symbols)
            check = _check(per_mode, meter.summary())
            out.checks[label] = check
            for layer in symbols:
                c, d = (per_mode[m]["layers"].get(layer) for m in MODES)
                if c is not None and d is not None:
                    out.layers[layer][label] = (c, d)
    finally:
        runner.set_instrument(None)
        runner.dispatch("auto")
    return out


def _mode_times(runs: list[list[tuple[str, int]]], whole: list[int], symbols: dict[str, str]) -> dict:
    """One mode's figures at one shape: each candidate's ms, and the sums the check compares."""
    names = [s for s, _ in runs[0]]
    if any([s for s, _ in r] != names for r in runs):
        return {"layers": {}, "whole_ms": 1e-6 * statistics.median(whole), "error":
                "the VM made different calls in different runs"}
    med = [statistics.median(r[i][1] for r in runs) for i in range(len(names))]
    builtin = [m for m, s in zip(med, names) if s.startswith(BUILTIN)]
    hook = statistics.median(builtin) if builtin else 0.0
    net = [max(m - hook, 0.0) for m in med]
    by_symbol: dict[str, list[str]] = {}
    for layer, symbol in symbols.items():
        by_symbol.setdefault(symbol, []).append(layer)
    layers, seen = {}, {}
    for s, t in zip(names, net):
        if s in by_symbol:
            k = seen[s] = seen.get(s, -1) + 1
            if k < len(by_symbol[s]):
                layers[by_symbol[s][k]] = t / 1e6
    return {"layers": layers, "whole_ms": statistics.median(whole) / 1e6, "calls_ms": sum(net) / 1e6,
            "layers_ms": sum(layers.values()), "calls": len(names), "runs": len(runs), "hook_us": hook / 1e3}


def _check(per_mode: dict[str, dict], load: dict) -> dict:
    """The evidence check of one shape: both modes' calls add up to their whole-model time, on a
    machine that was not busy. The numbers go to the manifest with the verdict."""
    from ...timing import busy
    modes, problems = {}, []
    for mode, m in per_mode.items():
        whole = m["whole_ms"]
        if "error" in m:
            problems.append(f"{mode}: {m['error']}")
            modes[mode] = {"whole_ms": round(whole, 4)}
            continue
        off = (m["calls_ms"] - whole) / max(whole, 1e-9)
        modes[mode] = {"whole_ms": round(whole, 4), "calls_ms": round(m["calls_ms"], 4),
                       "layers_ms": round(m["layers_ms"], 4), "other_calls_ms": round(m["calls_ms"] - m["layers_ms"], 4),
                       "off": round(off, 4), "calls": m["calls"], "runs": m["runs"], "hook_us": round(m["hook_us"], 3)}
        if abs(off) > EVIDENCE_MARGIN:
            problems.append(f"with {mode} kernels the calls add up to {m['calls_ms']:.3f} ms (candidate layers "
                            f"{m['layers_ms']:.3f} ms, other calls {m['calls_ms'] - m['layers_ms']:.3f} ms) against "
                            f"{whole:.3f} ms for the whole model ({off:+.0%}, outside +-{EVIDENCE_MARGIN:.0%})")
    why = busy(load)
    if why:
        problems.insert(0, why)
    return {"ok": not problems, "why": "; ".join(problems), "modes": modes, "load": load}


__all__ = ["EVIDENCE_MARGIN", "InModelTimes", "RESOLVED_TICKS", "clock_tick", "measure_in_model"]

"""Per-shape dispatch for compressed linear layers: the faster of the compressed kernel and the
dense GEMM, measured in the model on this host at the batch sizes the bundle will run.

A compressed kernel saves memory and bandwidth, not always time: an int4 weight-only kernel can beat
the dense GEMM at batch 1 and lose at batch 32 (the dense kernel's register tiles then run
compute-bound, the int4 one pays its dequantisation per tile), and a block-sparse SpMM at moderate
density can lose at every size. When the pipeline names the shapes of its speed records
(``LowerContext.speed_shapes``, from ``nf.compile(..., batch_sizes=...)``) and the target runs
here, the tvm backend builds in two passes:

1. every eligible compressed linear (fp32, on a kernel of kernels/) is lowered as a
   :func:`~.kernels.dispatch.rows_dispatch` kernel joining it with the dense GEMM of its shape, its
   dense weight decoded from the bundle's own encoding at load; the library runs the bundle's
   reference inputs repeated to each batch size, once with every layer on its compressed kernel and
   once on the dense one, and the VM's instrument hook times each layer's kernel call inside the
   model (cache state, threads and neighbours as in a real run: timed alone, kernels mislead: a
   dense weight that fits the L3 looks cheap);
2. a layer keeps the joined kernel only where dense won by more than ``dispatch_margin`` (default
   5%, so noise does not buy a dense copy) at some measured size, with its row threshold at the
   geometric mean of the row counts on either side of the change (:func:`choose`); the others get
   their compressed kernel alone, and the final library is built.

Target options: ``dispatch`` (default true; false keeps every compressed kernel) and
``dispatch_margin``. Every decision, with the times behind it, is in the manifest's
``backend.entry.dispatch`` and printed by ``nnforge inspect``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ...ir import Graph, symbolic as sym
from ..base import BackendError
from .layer_timing import InModelTimes

OPTIONS = ("dispatch", "dispatch_margin")
DEFAULT_MARGIN = 0.05
NEVER = 2 ** 62                 # a row threshold no input reaches
ROUND_BUDGET_S, MAX_ROUNDS = 0.5, 15     # the whole-model check: calls per mode and size


@dataclass
class Decision:
    """The kernel choice of one compressed linear layer."""
    layer: str
    weight: str
    kernel: str                 # the compressed kernel's function
    times: list[dict]           # per measured shape: label, rows, compressed_ms, dense_ms, faster (, refused)
    low: str                    # "compressed" | "dense": runs when rows < threshold
    threshold: int              # 0: always the other kernel; NEVER: always ``low``
    why: str
    dense_bytes: int = 0        # the dense copy a dispatched layer holds in memory at run time
    checked: list = None        # the sizes whose whole-model check ruled the dense kernel out
    joined: bool = False        # built as a joined kernel (its dense copy is in memory at run time)

    @property
    def dispatched(self) -> bool:
        return (self.low, self.threshold) != ("compressed", NEVER)

    def runs_at(self, rows: int) -> str:
        """The kernel this layer runs for ``rows`` rows."""
        high = "dense" if self.low == "compressed" else "compressed"
        return self.low if rows < self.threshold else high

    def to_dict(self) -> dict:
        return asdict(self)


def choose(times: list[tuple[int, float, float]], margin: float) -> tuple[str, int]:
    """(the kernel for rows below the threshold, the threshold) from ``(rows, compressed ms, dense
    ms)`` measurements: the single split of the sorted row counts, in either orientation, that
    costs least in time relative to the faster kernel at each size; compressed times count
    ``1 - margin`` of their value, so dense must win by more than the margin to be picked."""
    pts = sorted(times)
    best = None
    for low in ("compressed", "dense"):
        for split in range(len(pts) + 1):
            cost = dense_rows = 0.0
            for i, (rows, c, d) in enumerate(pts):
                kernel = low if i < split else ("dense" if low == "compressed" else "compressed")
                cost += (c * (1 - margin) if kernel == "compressed" else d) / max(min(c, d), 1e-9)
                dense_rows += kernel == "dense"
            if split == 0:
                threshold = 0
            elif split == len(pts):
                threshold = NEVER
            else:
                threshold = math.ceil(math.sqrt(pts[split - 1][0] * pts[split][0]))
                if threshold <= pts[split - 1][0]:
                    threshold = pts[split - 1][0] + 1
            key = (round(cost, 9), dense_rows)          # ties: the plan with less dense work
            if best is None or key < best[0]:
                best = (key, low, threshold)
    low, threshold = best[1], best[2]
    # one kernel at every size has two spellings; keep one of each
    if (low, threshold) in (("dense", 0), ("compressed", NEVER)):
        return "compressed", NEVER
    if (low, threshold) in (("dense", NEVER), ("compressed", 0)):
        return "compressed", 0
    return low, threshold


class Dispatcher:
    """The dispatch decisions of one lowering: with ``times`` None, the first pass (every eligible
    layer is a candidate, on its compressed kernel); with the in-model ``times`` of the first pass
    (:class:`~.layer_timing.InModelTimes`), the decisions of the final one."""

    def __init__(self, options: dict, can_measure: tuple[bool, str], graph: Graph, where: str,
                 times: InModelTimes | None = None, shapes: list[dict] | None = None):
        unknown = sorted(k for k in options if k.startswith("dispatch") and k not in OPTIONS)
        if unknown:
            raise BackendError(f"{where}: unknown dispatch option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
        self.margin = float(options.get("dispatch_margin", DEFAULT_MARGIN))
        if not 0 <= self.margin < 1:
            raise BackendError(f"{where}: dispatch_margin must be in [0, 1), got {self.margin}")
        self.points = self._points(graph, shapes or [])
        self.times = times
        self.why_not = ""
        if not bool(options.get("dispatch", True)):
            self.why_not = "turned off (target option dispatch = false)"
        elif not can_measure[0]:
            self.why_not = f"not measured: this target's bundles cannot run here ({can_measure[1]})"
        elif not self.points:
            self.why_not = "not measured: no shapes named (nf.compile(..., batch_sizes=...) names them)"
        self.decisions: dict[str, Decision] = {}
        self.candidates: dict[str, str] = {}     # first pass: layer -> weight
        self.symbols: dict[str, str] = {}        # layer -> the function its joined kernel is, in call order
        self.skipped: dict[str, str] = {}
        self.checks: list[dict] = []             # whole-model checks of the final library

    @property
    def enabled(self) -> bool:
        return not self.why_not

    @property
    def measuring(self) -> bool:
        """The first pass: build every candidate joined, to be timed in the model."""
        return self.enabled and self.times is None

    @staticmethod
    def _points(graph: Graph, shapes: list[dict]) -> list[tuple[str, dict[str, int]]]:
        """(label, dimension symbol bindings) of each shape the pipeline asked to measure
        (``LowerContext.speed_shapes``)."""
        out = []
        for shape in shapes:
            env: dict[str, int] = {}
            for v in graph.inputs:
                given = shape.get("inputs", {}).get(v.name)
                if given is None or len(given) != len(v.shape):
                    continue
                for d, size in zip(v.shape, given):
                    if isinstance(d, str) and sym.is_symbol(d):
                        env[d] = int(size)
            out.append((str(shape.get("label", "")), env))
        return out

    def rows(self, rows_dim) -> list[tuple[str, int]]:
        """(label, row count) of ``rows_dim`` at each measured shape it can be evaluated at."""
        out = []
        for label, env in self.points:
            try:
                out.append((label, int(sym.evaluate(rows_dim, env))))
            except Exception:        # a symbol the inputs of that shape do not bind
                continue
        return out

    def plan(self, layer: str, weight: str, kernel: str, rows_dim, dense_bytes: int) -> Decision | None:
        """Whether ``layer`` is built joined with the dense kernel (a candidate in the first pass,
        or a dispatched layer in the final one), and its threshold; None when it keeps its
        compressed kernel alone without a decision (nothing measured for it)."""
        if not self.enabled:
            return None
        points = self.rows(rows_dim)
        if not points:
            self.skipped[layer] = f"its row count {rows_dim} is not bound by the measured shapes"
            return None
        if self.times is None:
            self.candidates[layer] = weight
            self.decisions[layer] = Decision(layer, weight, kernel, [], "compressed", NEVER, "candidate", dense_bytes)
            return self.decisions[layer]
        measured = self.times.layers.get(layer)
        if not measured:
            self.skipped[layer] = "not timed in the model (its kernel never ran in the first pass)"
            return None
        times, by_rows = [], {}
        for label, r in points:
            if label not in measured:
                continue
            c, d = measured[label]
            entry = {"shape": label, "rows": r, "compressed_ms": round(c, 4), "dense_ms": round(d, 4),
                     "faster": "dense" if d < c else "compressed"}
            refused = self.times.refused(layer, label)
            if refused:         # evidence that failed its check decides nothing: the compressed kernel runs there
                entry["refused"] = refused
                d = math.inf
            by_rows.setdefault(r, (c, d))
            times.append(entry)
        if not by_rows:
            self.skipped[layer] = "not timed at any of its shapes"
            return None
        low, threshold = choose([(r, c, d) for r, (c, d) in by_rows.items()], self.margin)
        decision = Decision(layer, weight, kernel, times, low, threshold, "", dense_bytes)
        decision.why = _why(decision, self.margin)
        self.decisions[layer] = decision
        return decision

    def to_dict(self) -> dict:
        dispatched = [d for d in self.decisions.values() if d.dispatched]
        return {"enabled": self.enabled, "why_not": self.why_not or None, "margin": self.margin,
                "measured": "in the model: each layer's kernel call timed by the VM's instrument hook",
                "evidence": self.times.to_dict() if self.times is not None else None,
                "shapes": [{"shape": label, "bindings": env} for label, env in self.points],
                "dispatched": len(dispatched),
                "dense_bytes_at_run_time": sum(d.dense_bytes for d in self.decisions.values() if d.joined),
                "layers": [d.to_dict() | {"dispatched": d.dispatched} for d in self.decisions.values()],
                "checks": self.checks, "skipped": self.skipped}


def check_in_model(runner, dispatcher: "Dispatcher", graph: Graph, inputs: tuple,
                   shapes: list[tuple[str, int]]) -> list[Decision]:
    """The final library, timed whole at each measured size with the dispatch on and with
    compressed kernels only (alternating stretches): where the dispatch does not make the model
    faster by half the margin, or the machine was too busy for the times to tell, the layers that
    run dense at that size are moved back to their compressed kernel there (their threshold is a
    parameter: nothing is rebuilt). Per-layer times add noise that a whole-model time averages
    out. Returns the decisions it changed."""
    from ...timing import LoadMeter, alternating_ms, batch_inputs, busy
    import time
    changed: list[Decision] = []
    dispatched = [d for d in dispatcher.decisions.values() if d.dispatched]
    for label, batch in shapes:
        rows = {d.layer: next((t["rows"] for t in d.times if t["shape"] == label), None) for d in dispatched}
        dense = [d for d in dispatched if rows[d.layer] is not None and d.runs_at(rows[d.layer]) == "dense"]
        xs, _ = batch_inputs(graph, inputs, batch)
        if not dense or xs is None:
            continue
        t0 = time.perf_counter()
        runner.dispatch("auto")(*xs)
        rounds = max(6, min(MAX_ROUNDS, int(2 * ROUND_BUDGET_S / max(time.perf_counter() - t0, 1e-6))))
        meter = LoadMeter()
        ms = alternating_ms({"auto": lambda: runner.dispatch("auto")(*xs),
                             "compressed": lambda: runner.dispatch("compressed")(*xs)}, (), rounds, meter=meter)
        load = meter.summary()
        kept = ms["auto"] <= ms["compressed"] * (1 - dispatcher.margin / 2) and not busy(load)
        dispatcher.checks.append({"shape": label, "dispatched_ms": round(ms["auto"], 4),
                                  "compressed_only_ms": round(ms["compressed"], 4), "kept": kept, "load": load})
        if kept:
            continue
        for d in dense:
            # decide again with the dense kernel ruled out at this size (and at any size overruled before)
            d.checked = (d.checked or []) + [label]
            d.low, d.threshold = choose([(t["rows"], t["compressed_ms"],
                                          math.inf if t["shape"] in d.checked or t.get("refused") else t["dense_ms"])
                                         for t in d.times], dispatcher.margin)
            d.why = (_why(d, dispatcher.margin) + f"; whole model at {label}: dispatched {ms['auto']:.2f} ms vs "
                     f"compressed kernels only {ms['compressed']:.2f} ms" +
                     (f", timed while {busy(load)}" if busy(load) else "") + ", so the compressed kernel runs there")
            if d not in changed:
                changed.append(d)
    runner.dispatch("auto")
    return changed


def _why(d: Decision, margin: float) -> str:
    parts = []
    for t in d.times:
        c, dn = t["compressed_ms"], t["dense_ms"]
        ratio = c / max(dn, 1e-9)
        parts.append(f"{t['shape']} ({t['rows']} rows): compressed {c:.3f} ms, dense {dn:.3f} ms "
                     f"(compressed {ratio:.2f}x the dense time) -> {d.runs_at(t['rows'])}"
                     + (f" (these times decide nothing: {t['refused']})" if t.get("refused") else ""))
    refused = [t["shape"] for t in d.times if t.get("refused")]
    if not d.dispatched and len(refused) == len(d.times):
        head = "compressed kernel kept: no measured shape's times passed the evidence check"
    elif not d.dispatched and d.checked:
        head = "compressed kernel kept: the whole-model check ruled the dense kernel out" + \
            (" (its joined kernel and dense copy stay in the library)" if d.joined else "")
    elif not d.dispatched:
        head = (f"compressed kernel kept: dense is not faster by more than {margin:.0%} at any measured shape"
                + (" whose times passed the evidence check" if refused else ""))
    elif d.threshold == 0 or d.threshold == NEVER:
        head = "dense kernel at every measured shape (the compressed kernel stays in the library, forced by " \
               "runner.dispatch('compressed'))"
    else:
        high = "dense" if d.low == "compressed" else "compressed"
        head = f"{d.low} below {d.threshold} rows, {high} from {d.threshold} rows"
    return head + "; " + "; ".join(parts)


__all__ = ["Decision", "Dispatcher", "check_in_model", "choose", "OPTIONS", "NEVER", "DEFAULT_MARGIN"]

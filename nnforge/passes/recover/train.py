"""What the recovery passes share: their options and checks, the split of the calibration batches,
and the tuning loop (Adam, one batch per step, the held-out error choosing the step kept)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ...ir import Dense
from ...ir.ops import RunContext, get_op
from ..base import PassContext, PassError


@dataclass
class RecoveryOptions:
    """``steps``: optimiser steps (one calibration batch each); ``lr``: Adam's learning rate on the
    relative deltas (see :mod:`.free`); ``budget_s``: wall-clock seconds; ``held_out``: the fraction
    of calibration batches kept out to choose the parameters kept; ``eval_every``: steps between
    held-out evaluations; ``rounding``: integer codes learn their rounding too (each may move one
    step from its one-shot value; see :mod:`.free`)."""
    steps: int = 200
    lr: float = 1e-3
    budget_s: float | None = None
    held_out: float = 0.2
    eval_every: int = 20
    rounding: bool = False

    def __post_init__(self):
        name = getattr(self, "name", "recovery")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise PassError(f"{name}: steps must be a non-negative integer, got {self.steps!r}")
        if self.steps == 0:
            raise PassError(f"{name}: steps=0 is a budget of zero: nothing would be tuned; give steps >= 1 "
                            "(or leave the pass out)")
        if self.budget_s is not None and (isinstance(self.budget_s, bool) or not isinstance(self.budget_s, (int, float))
                                          or not self.budget_s > 0):
            raise PassError(f"{name}: budget_s must be a positive number of seconds, got {self.budget_s!r} "
                            "(a budget of zero tunes nothing; leave the pass out instead)")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise PassError(f"{name}: lr must be positive, got {self.lr!r}")
        if not isinstance(self.held_out, (int, float)) or not 0 <= self.held_out < 1:
            raise PassError(f"{name}: held_out must be a fraction in [0, 1), got {self.held_out!r}")
        if not isinstance(self.rounding, bool):
            raise PassError(f"{name}: rounding must be true or false, got {self.rounding!r}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise PassError(f"{name}: eval_every must be a positive integer, got {self.eval_every!r}")

    def split(self, n: int, ctx: PassContext, who: str) -> tuple[list[int], list[int]]:
        """(training batches, held-out batches) of ``n`` calibration batches, the held-out ones spread
        evenly over the list (calibration sets are often sorted by length: the last ones alone would
        choose on the longest inputs); with one batch, both are it (and the pass warns)."""
        n_held = min(n - 1, max(1, round(self.held_out * n))) if self.held_out else 0
        if n_held <= 0:
            if self.held_out:
                ctx.warn(f"{who}: one calibration batch: the parameters kept are chosen on the batch they were "
                         "tuned on; give more batches")
            return list(range(n)), list(range(n))
        held = sorted({min(n - 1, int((j + 0.5) * n / n_held)) for j in range(n_held)})
        return [i for i in range(n) if i not in held], held


def teacher_of(ctx: PassContext, graph, who: str):
    """The model before compression (``PassContext.reference``), or an error saying where the pass goes."""
    teacher = ctx.reference
    if teacher is None or teacher is graph:
        raise PassError(f"{who}: no model before compression to recover towards; run it in a recipe after a "
                        "compression pass (e.g. 'w3-gptq+rec')")
    return teacher


def check_free(graph, tunables: dict, who: str) -> None:
    """Refuse a graph whose tuned weights (``tunables``: weight name -> Tunable) hold no compressed
    weight, or whose compressed weights leave nothing free, naming their encodings."""
    compressed = [name for name in tunables if not isinstance(graph.weights[name].encoding, Dense)]
    if not compressed:
        raise PassError(f"{who}: no weight of graph {graph.name}'s blocks is compressed, so there is nothing to "
                        "recover; run it after a compression pass (e.g. 'w3-gptq+rec')")
    if not any(tunables[name].size for name in compressed):
        kinds = sorted({graph.weights[name].encoding.describe() for name in compressed})
        raise PassError(f"{who}: the compressed weights' encodings ({', '.join(kinds)}) leave no parameter free "
                        "(codes and minifloat-coded scales are fixed): nothing to tune")


def tune(deltas: list[torch.Tensor], loss: Callable[[int], torch.Tensor], train: list[int], held: list[int], *,
         steps: int, lr: float, eval_every: int, order: torch.Generator, seconds: float | None, who: str,
         every: Callable[[int], None] | None = None, keep_from: int = 0) -> tuple[list[dict], dict]:
    """Adam on ``deltas`` for ``steps`` steps (or ``seconds``; the rate falls linearly to zero from
    ``keep_from`` to ``steps``), ``loss(batch)`` on one training batch per step in a seeded random
    order; every ``eval_every`` steps the mean held-out loss, and the deltas of the best held-out
    step (step 0, the start, included) are left in place. ``every`` is called before each step with
    its number (a schedule's hook); the steps before ``keep_from`` (a schedule not yet in its final
    form) are never kept. Returns the curve and a summary."""
    opt = torch.optim.Adam(deltas, lr=lr)
    # the rate falls linearly to zero over the steps that can be kept (auto-round's schedule; a
    # gradual schedule's stages run at the full rate): late steps settle rather than hop between
    # rounding decisions, so the held-out best is rarely mid-run noise
    decay = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < keep_from else max(0.0, 1 - (s - keep_from) / max(1, steps - keep_from)))
    t0 = time.perf_counter()

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(loss(b)) for b in held) / len(held)
    first = held_out()
    best = first if keep_from == 0 else math.inf
    best_step, kept = 0, [d.detach().clone() for d in deltas]
    curve = [{"step": 0, "held_out": round(first, 6)}]
    seq: list[int] = []
    running, counted, step = 0.0, 0, 0
    for step in range(1, steps + 1):
        if every is not None:
            every(step)
        if not seq:
            seq = [train[i] for i in torch.randperm(len(train), generator=order).tolist()]
        opt.zero_grad(set_to_none=True)
        value_t = loss(seq.pop())
        value = float(value_t.detach())
        if not math.isfinite(value):
            raise PassError(f"{who}: the loss is {value} at step {step}: lower lr (now {lr})")
        value_t.backward()
        opt.step()
        decay.step()
        running, counted = running + value, counted + 1
        out_of_time = seconds is not None and time.perf_counter() - t0 >= seconds
        if step % eval_every == 0 or step == steps or out_of_time:
            now = held_out()
            curve.append({"step": step, "train": round(running / counted, 6), "held_out": round(now, 6)})
            running, counted = 0.0, 0
            if now < best and step >= keep_from:
                best, best_step, kept = now, step, [d.detach().clone() for d in deltas]
        if out_of_time:
            break
    with torch.no_grad():
        for d, k in zip(deltas, kept):
            d.copy_(k)
    return curve, {"before": round(first, 6), "after": round(best, 6), "step_kept": best_step, "steps": step,
                   "seconds": round(time.perf_counter() - t0, 2)}


# activation rounding: its gradient is zero almost everywhere, so tuning passes it straight through
STRAIGHT_THROUGH = ("fake_quant", "dynamic_quant")


def run_live(nodes, env: dict, ctx: RunContext, weight: Callable) -> dict:
    """Run ``nodes`` in order on ``env`` (value -> tensor; updated and returned) with gradients:
    ``weight(value)`` gives each weight's tensor (live ones for those being tuned), and activation
    rounding passes gradients straight through."""
    for node in nodes:
        args = [None if v is None else weight(v) if v.is_weight else env[v] for v in node.inputs]
        outs = get_op(node.op).run(ctx, args, node.attrs)
        if node.op in STRAIGHT_THROUGH and outs[0].is_floating_point():
            outs = [args[0] + (outs[0] - args[0]).detach(), *outs[1:]]
        env.update(zip(node.outputs, outs))
    return env


class Decoded:
    """Weights decoded once (float ones as float32), again only when their encoding is replaced;
    ``drop(name)`` frees one."""

    def __init__(self):
        self._cache: dict[str, tuple[object, torch.Tensor]] = {}

    def __call__(self, v) -> torch.Tensor:
        enc = v.encoding
        hit = self._cache.get(v.name)
        if hit is None or hit[0] is not enc:
            data = enc.decode(torch.float32 if enc.dtype.is_float else None)
            hit = self._cache[v.name] = (enc, data.float() if data.is_floating_point() else data)
        return hit[1]

    def drop(self, name: str) -> None:
        self._cache.pop(name, None)


def dense_weight(teacher, name: str) -> torch.Tensor | None:
    """The teacher's float weight of ``name`` (where learned rounding starts), if it has one."""
    v = teacher.weights.get(name)
    return v.encoding.data if v is not None and isinstance(v.encoding, Dense) and v.encoding.data.is_floating_point() \
        else None


def relative_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Each position's squared error over the target's square at that position (the last axis is
    the feature axis), averaged: every output and every token weighs the same whatever its scale.
    Transformers read each token through a norm, and a decoder's first token (the attention sink)
    carries activations far larger than the rest: over the whole tensor, its error would dominate
    what is fitted. Positions where the target is zero (unwritten cache slots) add no error but
    count in the mean. Scalars and vectors are compared whole."""
    if want.dim() < 2 or want.shape[-1] < 2:
        return (got - want).pow(2).mean() / want.pow(2).mean().clamp(min=1e-30)
    scale = want.pow(2).sum(-1)
    floor = scale.mean().clamp(min=1e-30) * 1e-8       # positions of (near) zeros, e.g. padding, add nothing
    return ((got - want).pow(2).sum(-1) / (scale + floor)).mean()


__all__ = ["STRAIGHT_THROUGH", "Decoded", "RecoveryOptions", "check_free", "dense_weight", "relative_error", "run_live",
           "teacher_of", "tune"]

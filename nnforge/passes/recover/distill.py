"""Knowledge distillation: the compressed model's free parameters (see :mod:`.free`) tuned end to
end so that the whole model matches the one before compression, on the calibration inputs.

Every step runs the teacher (``PassContext.reference``, as in :mod:`.reconstruct`) and the student
on one calibration batch. The loss is the outputs' (a decoder's ``logits``: KL divergence of the
softened distributions, times the temperature squared; any other float output: squared error over
its mean square) plus ``hidden`` times the mean over blocks of each block's output error, as
Minitron distils hidden states beside logits; a decoder's cache outputs count as hidden states.
Where reconstruction fits one block at a time to its own targets, distillation lets every
parameter serve the final output.

``gradual`` (oBERT, Zhu and Gupta's schedule): the weights the recipe made sparse in blocks or
unstructured (kept values stored as floats) start again from the teacher's dense weights and are
tuned whole, their sparsity raised to the recipe's in ``gradual`` stages over the first
``gradual_steps`` steps (cubic: most of it early, while the model can still follow), each stage's
mask the largest magnitudes of the weights as tuned so far in the recipe's pattern. The last mask
is the one stored, in the recipe's encoding; the held-out choice only counts steps past the
schedule.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...ir import Dense, Graph
from ...ir.encodings import rows_cols
from ...ir.ops import RunContext
from ...ir.sparse import Sparse
from ..base import Pass, PassContext, PassError, register_pass
from ..prune.sparsity import magnitude_keep
from ..quantize.calibrate import check_calibration
from .blocks import cut
from .free import Tunable
from .train import Decoded, RecoveryOptions, check_free, dense_weight, relative_error, run_live, teacher_of
from .train import tune as tune_deltas


def _forward(graph: Graph, tensors, env: dict, weight, want: set) -> dict:
    """The values named in ``want`` from one run of ``graph`` on a bound calibration batch, as far
    as the last node making one (see :func:`.train.run_live`)."""
    stop = max((i for i, n in enumerate(graph.nodes) if any(o.name in want for o in n.outputs)), default=-1)
    vals = dict(zip(graph.inputs, [t.float() if t.is_floating_point() else t for t in tensors]))
    vals = run_live(graph.nodes[:stop + 1], vals, RunContext(env=dict(env)), weight)
    return {v.name: t for v, t in vals.items() if v.name in want}


class _Gradual:
    """A sparse weight tuned dense from the teacher's values, its mask tightened by the schedule."""

    def __init__(self, enc: Sparse, dense: torch.Tensor):
        self.enc, self.shape = enc, enc.shape
        self.delta = torch.zeros(dense.shape, dtype=torch.float32, requires_grad=True)
        self.init = dense.detach().to(torch.float32)
        self.spread = self.init.pow(2).mean().sqrt().clamp(min=1e-12)
        self.final = 1 - enc.density
        self.mask = torch.ones(dense.shape, dtype=torch.bool)

    @property
    def deltas(self):
        return [self.delta]

    @property
    def size(self) -> int:
        return self.delta.numel()

    def dense(self) -> torch.Tensor:
        return self.init + self.spread * self.delta

    def tighten(self, sparsity: float) -> None:
        rows, cols = rows_cols(self.shape)
        w = self.dense().detach().reshape(rows, cols)
        self.mask = magnitude_keep(w, self.enc.pattern, sparsity).reshape(self.shape)

    def weight(self) -> torch.Tensor:
        return self.dense() * self.mask

    def encoding(self) -> Sparse:
        """The recipe's encoding (pattern, float kept values in their dtype) with the last mask."""
        dtype = self.enc.values.dtype.torch_dtype
        return Sparse.from_mask(self.dense().detach(), self.mask, self.enc.pattern, lambda v: Dense(v.to(dtype)))


@register_pass
@dataclass
class Distill(RecoveryOptions, Pass):
    """Distil the model before compression into the compressed one's free parameters, end to end
    (see the module docstring). Options: :class:`.train.RecoveryOptions`' (``steps`` in all),
    ``hidden`` (the weight of the blocks' hidden-state error beside the outputs'; 0 for outputs
    only), ``temperature`` (of the logits' KL divergence), ``gradual`` (stages of gradual pruning;
    0 for none) and ``gradual_steps`` (the steps the schedule takes; default half of ``steps``)."""
    name = "distill"
    needs_calibration = True
    lr: float = 5e-3
    hidden: float = 1.0
    temperature: float = 1.0
    gradual: int = 0
    gradual_steps: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.hidden, (int, float)) or self.hidden < 0:
            raise PassError(f"{self.name}: hidden must be a non-negative weight, got {self.hidden!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise PassError(f"{self.name}: temperature must be positive, got {self.temperature!r}")
        if isinstance(self.gradual, bool) or not isinstance(self.gradual, int) or self.gradual < 0:
            raise PassError(f"{self.name}: gradual must be a non-negative number of stages, got {self.gradual!r}")
        span = self.gradual_steps if self.gradual_steps is not None else self.steps // 2
        if self.gradual and (isinstance(span, bool) or not isinstance(span, int) or not self.gradual <= span < self.steps):
            raise PassError(f"{self.name}: gradual_steps must leave steps after the schedule and give each of the "
                            f"{self.gradual} stages a step: between {self.gradual} and steps - 1 = {self.steps - 1}, "
                            f"got {span!r}")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        teacher = teacher_of(ctx, graph, self.name)
        c = cut(graph)
        names = {w.name for b in c.blocks for w in b.weights}
        tunables: dict = {n: Tunable(graph.weights[n].encoding, rounding=self.rounding,
                                     start=dense_weight(teacher, n) if self.rounding else None) for n in names}
        check_free(graph, tunables, self.name)
        gradual = {}
        if self.gradual:
            for n in names:
                enc, ref = graph.weights[n].encoding, teacher.weights.get(n)
                if isinstance(enc, Sparse) and enc.pattern.kind != "nm" and isinstance(enc.values, Dense) \
                        and ref is not None and isinstance(ref.encoding, Dense) and ref.shape == enc.shape:
                    gradual[n] = _Gradual(enc, ref.encoding.data)
            if not gradual:
                ctx.warn(f"{self.name}: gradual={self.gradual} left out: no weight of graph {graph.name} was made "
                         "sparse in blocks or unstructured with float kept values (block-sparse-<pct>), which "
                         "gradual pruning starts again from dense")
            tunables.update(gradual)
        tunables = {n: t for n, t in tunables.items() if t.size}
        hidden = {o.name for b in c.blocks for o in b.outputs if o.dtype.is_float}
        states = {out for _, out in graph.state_pairs()}
        outputs = {v.name for v in graph.outputs if v.dtype.is_float and v.name not in states}
        known = {o.name for nd in teacher.nodes for o in nd.outputs} | {v.name for v in teacher.inputs}
        missing = sorted((hidden | outputs) - known)
        if missing:
            raise PassError(f"{self.name}: {missing[0]} is not in the model before compression (a pass between them "
                            "changed the graph's structure, not only its weights); run distill right after the "
                            "passes that compress weights")
        batches = check_calibration(graph, ctx.calibration, self.name)
        train, held = self.split(len(batches), ctx, self.name)
        fixed, teacher_weight = Decoded(), Decoded()
        want = hidden | outputs

        def loss(b: int) -> torch.Tensor:
            tensors, env = batches[b]
            with torch.no_grad():
                target = _forward(teacher, tensors, env, teacher_weight, want)
            live = {n: t.weight() for n, t in tunables.items()}
            got = _forward(graph, tensors, env, lambda v: live[v.name] if v.name in live else fixed(v), want)
            total = sum(self._output_loss(name, got[name], target[name]) for name in outputs)
            if self.hidden and hidden:
                total = total + self.hidden * sum(relative_error(got[n], target[n]) for n in hidden) / len(hidden)
            return total

        # stage s of the schedule starts at step 1 + span (s - 1) / gradual; the first is in place
        # before any step, so the figures' "before" is the model at the first stage's sparsity
        span = (self.gradual_steps if self.gradual_steps is not None else self.steps // 2) if gradual else 0
        starts = {1 + round(span * (s - 1) / self.gradual): s for s in range(2, self.gradual + 1)} if gradual else {}

        def tighten(stage: int) -> None:
            for g in gradual.values():
                g.tighten(g.final * (1 - (1 - stage / self.gradual) ** 3))

        def schedule(step: int) -> None:
            if step in starts:
                tighten(starts[step])
        if gradual:
            tighten(1)
        started = time.perf_counter()
        deltas = [d for t in tunables.values() for d in t.deltas]
        curve, summary = tune_deltas(deltas, loss, train, held, steps=self.steps, lr=self.lr,
                                     eval_every=self.eval_every, order=torch.Generator().manual_seed(ctx.seed),
                                     seconds=self.budget_s, who=self.name, every=schedule if gradual else None,
                                     keep_from=max(starts, default=1) if gradual else 0)
        for n, t in tunables.items():
            graph.set_encoding(n, t.encoding())
        ctx.record("tuned_parameters", sum(t.size for t in tunables.values()))
        ctx.record("held_out_error", summary)
        if self.rounding:
            ctx.record("codes_moved", sum(t.rounding.moved() for t in tunables.values() if t.rounding is not None))
        ctx.record("loss_curve", curve)
        if gradual:
            ctx.record("gradual", {"stages": self.gradual, "steps": span, "weights": len(gradual)})
        ctx.record("seconds", round(time.perf_counter() - started, 1))
        return graph

    def _output_loss(self, name: str, got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
        if name == "logits":
            t = self.temperature
            return F.kl_div(F.log_softmax(got / t, -1), F.log_softmax(want / t, -1), log_target=True,
                            reduction="none").sum(-1).mean() * t * t
        return relative_error(got, want)


__all__ = ["Distill"]

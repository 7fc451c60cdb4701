"""Block reconstruction: after compression, tune each block's free parameters (see :mod:`.free`)
so that its outputs match the uncompressed model's, one block at a time (BRECQ, OmniQuant, and
GPTQ's sequential mode for where the inputs come from).

The teacher is the graph as it was before the first pass of the recipe that changed the model's
function (``PassContext.reference``, kept by the PassManager), so a recipe such as
``rot+w3-gptq+rec`` reconstructs towards the rotated fp32 model, which computes what the original
does. Both graphs run over the calibration set block by block: a block's inputs come from the
compressed model's own upstream blocks, already reconstructed; its targets are the teacher's values
of the same names, computed from the teacher's own inputs, so a block may also take back error that
came from upstream. The loss is each output's squared error over the teacher output's mean square,
summed over the block's outputs. Adam tunes the deltas, one calibration batch per step; a part of
the calibration batches (``held_out``) is never trained on and chooses the step whose parameters
are kept, so a block whose held-out error does not fall keeps its encoding as it was. Activation
rounding (``fake_quant``, ``dynamic_quant``) passes gradients straight through while tuning.

Memory stays one block deep: the block's inputs and targets for every calibration batch, and one
batch's activations for the backward pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...ir import Graph
from ...ir.ops import RunContext, get_op
from ..base import Pass, PassContext, PassError, register_pass
from ..quantize.calibrate import check_calibration, last_uses
from .blocks import Block, cut
from .free import Tunable
from .train import Decoded, RecoveryOptions, check_free, dense_weight, relative_error, run_live, teacher_of
from .train import tune as tune_deltas

FEW_VALUES_PER_PARAMETER = 10     # calibration output values per tuned number under which the pass warns


class _Run:
    """One graph run over every calibration batch, node by node, as far as asked."""

    def __init__(self, graph: Graph, batches, who: str):
        bound = check_calibration(graph, batches, who)
        self.graph, self.who = graph, who
        self.ctxs = [RunContext(env=env) for _, env in bound]
        self.vals: list[dict] = [dict(zip(graph.inputs, [t.float() if t.is_floating_point() else t for t in tensors]))
                                 for tensors, _ in bound]
        self.last = last_uses(graph, outputs=False)
        self.index = {n: i for i, n in enumerate(graph.nodes)}
        self.made = {o.name: (o, i) for i, n in enumerate(graph.nodes) for o in n.outputs}
        self.pos = 0
        self.weight = Decoded()

    def upto(self, stop: int, keep: set | None = None) -> None:
        """Run nodes ``pos..stop-1`` over every batch (no gradients); values are freed after their
        last reader, except those in ``keep``."""
        keep = keep or set()
        with torch.no_grad():
            for i in range(self.pos, stop):
                node = self.graph.nodes[i]
                op = get_op(node.op)
                for b, vals in enumerate(self.vals):
                    args = [None if v is None else self.weight(v) if v.is_weight else vals[v] for v in node.inputs]
                    try:
                        outs = op.run(self.ctxs[b], args, node.attrs)
                    except Exception as e:
                        raise PassError(f"{self.who}: node {node.name} ({node.op}) failed on calibration batch {b}: "
                                        f"{e}") from e
                    vals.update(zip(node.outputs, outs))
                    for v in node.inputs:
                        if v is not None and not v.is_weight and self.last.get(v, -1) <= i and v not in keep:
                            vals.pop(v, None)
                for v in node.inputs:
                    if v is not None and v.is_weight and self.last.get(v, -1) <= i:
                        self.weight.drop(v.name)
        self.pos = max(self.pos, stop)


@register_pass
@dataclass
class Reconstruct(RecoveryOptions, Pass):
    """Tune each block's free parameters to match the model before compression (see the module
    docstring); the options are :class:`.train.RecoveryOptions`'s: ``steps`` per block,
    ``budget_s`` shared out over the blocks still to do (a block stops at its steps or its share of
    the seconds left, whichever comes first)."""
    name = "reconstruct"
    needs_calibration = True
    lr: float = 1e-2

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        teacher = teacher_of(ctx, graph, self.name)
        c = cut(graph)
        tunables = {b.name: {w.name: Tunable(w.encoding, rounding=self.rounding,
                                             start=dense_weight(teacher, w.name) if self.rounding else None)
                             for w in b.weights} for b in c.blocks}
        check_free(graph, {name: t for b in tunables.values() for name, t in b.items()}, self.name)
        batches = list(ctx.calibration)
        student, ref = _Run(graph, batches, self.name), _Run(teacher, batches, f"{self.name} (teacher)")
        order = torch.Generator().manual_seed(ctx.seed)
        train, held = self.split(len(batches), ctx, self.name)
        curves, summary, few = {}, {}, {}
        started = time.perf_counter()
        from tqdm import tqdm
        student.upto(student.index[c.blocks[0].nodes[0]])
        for k, block in enumerate(tqdm(c.blocks, desc=self.name, unit="block", leave=False,
                                       disable=None if ctx.progress else True)):
            targets = self._targets(block, student, ref)
            tune = {name: t for name, t in tunables[block.name].items() if t.size}
            share = None
            if self.budget_s is not None:
                share = max(0.0, self.budget_s - (time.perf_counter() - started)) / (len(c.blocks) - k)
            if tune:
                n_params = sum(t.size for t in tune.values())
                n_values = sum(targets[b][o].numel() for b in train for o in targets[b])
                if n_values < FEW_VALUES_PER_PARAMETER * n_params:
                    few[block.name] = round(n_values / n_params, 2)
                deltas = [d for t in tune.values() for d in t.deltas]

                def loss(b, block=block, tune=tune, targets=targets):
                    weights = {name: t.weight() for name, t in tune.items()}
                    return self._loss(self._forward(block, student, b, weights), targets[b])
                curve, chosen = tune_deltas(deltas, loss, train, held, steps=self.steps, lr=self.lr,
                                            eval_every=self.eval_every, order=order, seconds=share,
                                            who=f"{self.name}: block {block.name}")
                curves[block.name] = curve
                summary[block.name] = chosen
                for name, t in tune.items():
                    graph.set_encoding(name, t.encoding())
            end = student.index[block.nodes[-1]] + 1
            student.upto(end)
            del targets
        ctx.record("blocks", len(c.blocks))
        ctx.record("tuned_parameters", sum(t.size for b in tunables.values() for t in b.values()))
        ctx.record("held_out_error", summary)
        if self.rounding:
            ctx.record("codes_moved", sum(t.rounding.moved() for b in tunables.values() for t in b.values()
                                          if t.rounding is not None))
        ctx.record("loss_curve", curves)
        ctx.record("seconds", round(time.perf_counter() - started, 1))
        if few:
            worst = sorted(few.items(), key=lambda kv: kv[1])[:5]
            ctx.warn(f"{self.name}: calibration too small for the parameters tuned: "
                     + ", ".join(f"{b} has {r} calibration output values per tuned parameter" for b, r in worst)
                     + f" (under {FEW_VALUES_PER_PARAMETER}); the tuned parameters may fit the calibration set "
                       "rather than the model: give more calibration data")
            ctx.record("values_per_parameter", few)
        return graph

    # --- one block -------------------------------------------------------------------------------
    def _targets(self, block: Block, student: _Run, ref: _Run) -> list[dict]:
        """The teacher's values of the block's float outputs, per batch, by output name."""
        names = [o.name for o in block.outputs if o.dtype.is_float]
        missing = [n for n in names if n not in ref.made]
        if missing:
            raise PassError(f"{self.name}: block {block.name}'s output {missing[0]} is not in the model before "
                            "compression (a pass between them changed the graph's structure, not only its weights); "
                            "run reconstruct right after the passes that compress weights")
        want = {ref.made[n][0] for n in names}
        ref.upto(max(ref.made[n][1] for n in names) + 1 if names else ref.pos, keep=want)
        out = []
        for vals in ref.vals:
            out.append({n: vals[ref.made[n][0]] for n in names})
        for vals in ref.vals:             # held by the targets now; the teacher reads them no more
            for v in want:
                if ref.last.get(v, -1) < ref.pos:
                    vals.pop(v, None)
        return out

    def _forward(self, block: Block, student: _Run, b: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env = run_live(block.nodes, {v: student.vals[b][v] for v in block.inputs}, student.ctxs[b],
                       lambda v: weights[v.name] if v.name in weights else student.weight(v))
        return {o.name: env[o] for o in block.outputs if o.dtype.is_float}

    def _loss(self, outs: dict, targets: dict) -> torch.Tensor:
        return sum(relative_error(outs[name], want) for name, want in targets.items())


__all__ = ["Reconstruct"]

"""Running a graph over all calibration batches at once, node by node, so that a pass can look at
each layer's inputs and change its weight before the layer runs.

This is how GPTQ and activation calibration go "block by block" without re-running the model per
layer: every node runs once per batch, in graph order; the hook sees a node's inputs for every
batch (a transformer block's inputs are computed once, from the already-quantised blocks before
it) and may replace the node's weight encoding, which the node then runs with. Values are freed
after their last use, as in the reference interpreter.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Callable

import torch

from ...ir import Graph, Node
from ...ir.interpreter import InterpreterError, bind_inputs
from ...ir.ops import RunContext, get_op
from ..base import PassError

Hook = Callable[[Node, list[list]], None]


def last_uses(graph: Graph, outputs: bool = True) -> dict:
    """Value -> index of the last node reading it (graph outputs: past the end, when ``outputs``)."""
    last: dict = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            if v is not None:
                last[v] = i
    if outputs:
        for v in graph.outputs:
            last[v] = len(graph.nodes)
    return last


def check_calibration(graph: Graph, batches, who: str) -> list:
    """The batches as lists of tensors, each checked against the graph inputs (a clear error
    naming the pass, the batch and the input otherwise)."""
    if not batches:
        raise PassError(f"{who}: the calibration set is empty; pass calibration=[input tuples shaped like "
                        "example_inputs]")
    out = []
    for i, b in enumerate(batches):
        b = list(b) if isinstance(b, (list, tuple)) else [b]
        try:
            tensors, env = bind_inputs(graph, b)
        except (ValueError, TypeError) as e:
            raise PassError(f"{who}: calibration batch {i} does not fit the model's inputs: {e}") from None
        out.append((tensors, env))
    return out


def run_calibration(graph: Graph, batches, before: Hook | None = None, *, who: str = "calibration",
                    progress: bool = False, until: Collection[str] | None = None) -> list[list[torch.Tensor]] | None:
    """Run ``graph`` over every batch; ``before(node, args)`` is called with each node and its
    inputs for every batch (``args[b][i]``: input i of batch b, weights decoded) before it runs.
    Returns the outputs of every batch; with ``until`` (the names of the nodes the hook works on),
    the run stops once the last of them has been seen, and returns None: what comes after (an LM
    head over the whole vocabulary, for every batch) is neither run nor held."""
    bound = check_calibration(graph, batches, who)
    ctxs = [RunContext(env=env) for _, env in bound]
    vals: list[dict] = [dict(zip(graph.inputs, [t.float() if t.is_floating_point() else t for t in tensors]))
                        for tensors, _ in bound]
    last = last_uses(graph, outputs=until is None)     # outputs no one reads back are freed too (a decoder's caches)
    decoded: dict[str, tuple[object, torch.Tensor]] = {}

    def weight(name: str) -> torch.Tensor:
        enc = graph.weights[name].encoding
        hit = decoded.get(name)
        if hit is None or hit[0] is not enc:          # the hook may have re-encoded it
            data = enc.decode(torch.float32 if enc.dtype.is_float else None)
            hit = decoded[name] = (enc, data.float() if data.is_floating_point() else data)
        return hit[1]

    from tqdm import tqdm
    # on a terminal only; closed (cleared) on errors too
    nodes = graph.nodes
    if until is not None:
        wanted = set(until)
        stop = max((i for i, n in enumerate(nodes) if n.name in wanted), default=-1)
        nodes = nodes[:stop + 1]
        if not nodes:
            return None
    def done_with(node: Node, i: int) -> None:
        # a decoded weight (a float copy of a quantised one: as large as the fp32 model in all) is
        # dropped after the last node reading it, as values are
        for v in node.inputs:
            if v is not None and v.is_weight and last.get(v, -1) <= i:
                decoded.pop(v.name, None)

    with tqdm(nodes, desc=who, unit="node", leave=False, disable=None if progress else True) as shown:
        _run_nodes(shown, bound, vals, ctxs, last, weight, before, who, hook_only=nodes[-1] if until else None,
                   done_with=done_with)
    if until is not None:
        return None
    return [[weight(v.name) if v.is_weight else vals[b][v] for v in graph.outputs] for b in range(len(bound))]


def _run_nodes(nodes, bound, vals, ctxs, last, weight, before, who, hook_only=None, done_with=None) -> None:
    for i, node in enumerate(nodes):
        def args_for(b):
            return [None if v is None else weight(v.name) if v.is_weight else vals[b][v] for v in node.inputs]
        if before is not None:
            before(node, [args_for(b) for b in range(len(bound))])
        if node is hook_only:                   # the last node a hook works on: nothing after it is needed
            return
        op = get_op(node.op)
        for b in range(len(bound)):
            try:
                outs = op.run(ctxs[b], args_for(b), node.attrs)
            except Exception as e:
                raise InterpreterError(f"{who}: node {node.name} ({node.op}) failed on calibration batch {b}: "
                                       f"{e}") from e
            vals[b].update(zip(node.outputs, outs))
            for v in node.inputs:
                if v is not None and not v.is_weight and last.get(v, -1) <= i:
                    vals[b].pop(v, None)
        if done_with is not None:
            done_with(node, i)

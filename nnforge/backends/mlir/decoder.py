"""A decoder in the mlir backend: one module with two functions over one set of weights, ``prefill``
(a chunk of a fixed number of tokens) and ``decode`` (one token), both at a fixed batch, taking the
KV cache as tensor arguments and returning it updated. The runner feeds any batch and any number
of tokens through them (:class:`DecoderCalls`).

A chunk shorter than ``prefill`` takes is padded with token 0 at position -1. The module's cache
update is the decompose pass's one-hot product (a kv8 cache's: ``linalg_kernels.write_slots``),
which writes nothing for a position outside the cache, and its rope and attention take any
position (a padded query's logits are dropped, and its all-hidden row softmaxes over equal finite
scores), so padding changes no cache slot and no real token's logits; -1 also stays below every
real position, which longrope's switch reads.

    >>> shapes, chunk = function_shapes(graph, ctx)      # {"prefill": {input: shape}, "decode": ...}
    >>> calls = DecoderCalls(entry, runner.input_names, runner.output_names, batch=1)
    >>> calls.run(runner.invoke, inputs)                  # the graph's outputs, as one call would give
"""
from __future__ import annotations

import numpy as np

from ...frontend.decoders.builder import INPUT_IDS
from ...ir import Graph
from ..base import BackendError, LowerContext

PREFILL, DECODE = "prefill", "decode"
PAD_TOKEN, PAD_POSITION = 0, -1


def function_shapes(graph: Graph, ctx: LowerContext) -> tuple[dict[str, dict[str, list[int]]], int] | None:
    """Each function's input shapes and the prefill chunk (the token count of the check inputs) for
    a decoder graph (one whose one-token step ``ctx.steps`` names); None for any other graph. Both
    functions take the step's batch; every other symbol has its size in the check inputs."""
    ids = next((v for v in graph.inputs if v.name == INPUT_IDS), None)
    if not ctx.steps or ids is None or not isinstance(ids.shape[1], str):
        return None
    missing = [v.name for v in graph.inputs if v.name not in ctx.shapes]
    if missing:
        raise BackendError(f"mlir backend: no check input shape for the decoder's inputs {', '.join(missing)}: the "
                           "check inputs set the sizes of the prefill and decode functions")
    token = ids.shape[1]
    sizes = {d: ctx.shapes[v.name][axis] for d, (v, axis) in graph.symbols().items()}
    chunk = sizes[token]
    state = {o for _, o in graph.state_pairs()}
    for v in graph.outputs:
        if v.name not in state and (len(v.shape) < 2 or v.shape[1] != token):
            raise BackendError(f"mlir backend: decoder output {v.name} {list(v.shape)} is neither a state output nor "
                               f"per token (axis 1 = {token}): the runner cannot join its chunks")

    def bind(binding: dict) -> dict[str, list[int]]:
        return {v.name: [binding[d] if isinstance(d, str) else d for d in v.shape] for v in graph.inputs}

    step = ctx.steps[0]
    return {PREFILL: bind({**sizes, **step, token: chunk}), DECODE: bind({**sizes, **step})}, chunk


def entry_fields(graph: Graph, chunk: int) -> dict:
    """What the runner needs to feed the two functions, kept in the bundle entry."""
    token = next(v for v in graph.inputs if v.name == INPUT_IDS).shape[1]
    return {"prefill_chunk": chunk, "state": [list(p) for p in graph.state_pairs()],
            "token_inputs": [v.name for v in graph.inputs if len(v.shape) > 1 and v.shape[1] == token],
            "input_dims": {v.name: [d if isinstance(d, (int, str)) else str(d) for d in v.shape] for v in graph.inputs}}


class DecoderCalls:
    """One call of the decoder graph (any batch, any number of tokens, any cache) as calls of
    ``prefill`` and ``decode``: the batch in groups of the functions' batch (the last group padded
    with empty rows), the tokens in chunks of ``prefill_chunk`` (a last single token through
    ``decode``), the cache carried from each call to the next."""

    def __init__(self, entry: dict, input_names: list[str], output_names: list[str], batch: int):
        self.chunk, self.batch = int(entry["prefill_chunk"]), batch
        self.pairs = [tuple(p) for p in entry["state"]]
        self.tokens = list(entry["token_inputs"])
        self.input_names, self.output_names = input_names, output_names
        state_outputs = {o for _, o in self.pairs}
        self.per_token = [o for o in output_names if o not in state_outputs]

    def run(self, invoke, inputs: list[np.ndarray]) -> list[np.ndarray]:
        named = dict(zip(self.input_names, inputs))
        batch, n = named[INPUT_IDS].shape
        if n == 0:
            raise BackendError(f"input {INPUT_IDS} has no tokens: give at least one")
        groups = [self._group(invoke, {k: a[g:g + self.batch] for k, a in named.items()}, n)
                  for g in range(0, batch, self.batch)]
        return [np.concatenate([g[o] for g in groups], axis=0) for o in self.output_names]

    def _group(self, invoke, named: dict, n: int) -> dict[str, np.ndarray]:
        real = named[INPUT_IDS].shape[0]
        named = {k: _pad(a, 0, self.batch, PAD_TOKEN if k == INPUT_IDS or k not in self.tokens else PAD_POSITION)
                 for k, a in named.items()}
        state = {i: named[i] for i, _ in self.pairs}
        pieces: dict[str, list] = {o: [] for o in self.per_token}
        start = 0
        while start < n:
            m = 1 if n - start == 1 else min(self.chunk, n - start)
            width = 1 if m == 1 else self.chunk
            args = [_pad(named[k][:, start:start + m], 1, width, PAD_TOKEN if k == INPUT_IDS else PAD_POSITION)
                    if k in self.tokens else state[k] for k in self.input_names]
            outs = dict(zip(self.output_names, invoke(DECODE if m == 1 else PREFILL, args)))
            state = {i: outs[o] for i, o in self.pairs}
            for o in self.per_token:
                pieces[o].append(outs[o][:, :m])
            start += m
        got = {o: np.concatenate(p, axis=1)[:real] for o, p in pieces.items()}
        got.update({o: state[i][:real] for i, o in self.pairs})
        return got


def _pad(a: np.ndarray, axis: int, size: int, value) -> np.ndarray:
    """``a`` padded with ``value`` along ``axis`` to ``size``."""
    if a.shape[axis] == size:
        return np.ascontiguousarray(a)
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return np.pad(a, widths, constant_values=value)


__all__ = ["DecoderCalls", "function_shapes", "entry_fields", "PREFILL", "DECODE"]

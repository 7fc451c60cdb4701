"""The triton backend's decoder steps: the KV cache written in place in its stored encoding, and
attention run by :mod:`.kernels.attention` on the cache as stored.

- ``cache_update`` (a float cache) and ``kv_cache_write`` of an encoding that writes each token on
  its own (:meth:`~nnforge.ir.kvcache.CacheEncoding.token_rows`: kv8, kv-fp8, kv-f16, kv-nvfp4)
  scatter the step's rows into the state tensors they were given, when those are graph inputs
  nothing else reads: the launcher hands such inputs over as its own (a copy of the caller's, or
  the resident state), so a decode step moves only the new rows. The rows are the encoding's own
  (``token_rows``), so the codes and scales are the reference's bit for bit.
- ``attention`` runs the kernel on its k and v, or, where they are ``kv_cache_read`` outputs of an
  encoding in :data:`FUSED` (``attention_cache_reads``), on the state tensors the read would
  decode; that read then does not run.

Positions are checked against the cache on the host before a call (:func:`check_positions`), so
no step reads a device value on the host and a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Callable

import torch

from ...ir.ops.decoder import check_positions_in_cache
from ...ir.ops.kvcache import attention_cache_reads, encoding_of

# cache encoding kind -> how the attention kernel reads its state (kernels.attention.CODES)
FUSED = {"kv8": "int8", "kv-fp8": "e4m3", "kv-f16": "float"}
# encodings the backend runs: written in place (token_rows) and read by the kernel or, for
# kv-nvfp4, by the op's reference read on the state it keeps
IN_PLACE = ("kv8", "kv-fp8", "kv-f16", "kv-nvfp4")


def fused_reads(graph, node) -> tuple | None:
    """(K read, V read) whose state the attention ``node``'s kernel reads, or None."""
    return attention_cache_reads(graph, node, FUSED)


def attention_reads(graph, node) -> list:
    """The values the attention step reads: q, the K state (or k), the V state (or v), positions."""
    reads = fused_reads(graph, node)
    if reads is None:
        return list(node.inputs)
    kr, vr = reads
    return [node.inputs[0], *kr.inputs[1:], *vr.inputs[1:], node.inputs[3]]


def attention_step(graph, node) -> Callable:
    from .kernels.attention import CacheView, attention
    a = node.attrs
    reads = fused_reads(graph, node)
    if reads is None:
        views = (lambda k: CacheView(k), lambda v: CacheView(v))
        n_k = 1
    else:
        def view(read):
            enc = encoding_of(read.attrs)
            group = enc.channels(read.attrs["head_dim"]) if hasattr(enc, "channels") else None
            return lambda rows, scale=None: CacheView(rows, scale, FUSED[enc.kind], group)
        views = tuple(view(r) for r in reads)
        n_k = len(reads[0].inputs) - 1

    def run(ctx, q, *rest):
        k, v, positions = rest[:n_k], rest[n_k:-1], rest[-1]
        return [attention(q, views[0](*k), views[1](*v), positions, scale=a["scale"], window=a["window"],
                          softcap=a["softcap"])]
    return run


def state_of(node) -> list:
    """The state values a cache_update / kv_cache_write node writes."""
    return [node.inputs[0]] if node.op == "cache_update" else list(node.inputs[2:])


def positions_of(node):
    return node.inputs[2] if node.op == "cache_update" else node.inputs[1]


def writes_in_place(graph, node, readers: dict) -> bool:
    """Whether ``node`` (cache_update / kv_cache_write) may write its state inputs in place: each
    is a graph input read by this node only, the encoding writes token by token, and the
    positions are a graph input (checked on the host before the call)."""
    if node.op == "kv_cache_write" and encoding_of(node.attrs).kind not in IN_PLACE:
        return False
    inputs = set(graph.inputs)
    return positions_of(node) in inputs and all(
        v in inputs and v not in graph.outputs and readers.get(v) == [node] for v in state_of(node))


def write_step(node) -> Callable:
    """The in-place write of ``node``: returns the state tensors it was given, with the rows written."""
    if node.op == "cache_update":
        def update(ctx, cache, new, positions):
            index = positions.long()[:, None, :, None].expand(new.shape)
            return [cache.scatter_(2, index, new.to(cache.dtype))]
        return update
    enc = encoding_of(node.attrs)

    def write(ctx, new, positions, *state):
        for part, rows in zip(state, enc.token_rows(new)):
            part.scatter_(2, positions.long()[:, None, :, None].expand(rows.shape), rows.to(part.dtype))
        return list(state)
    return write


def cache_length(node) -> int:
    """Slots of the cache ``node`` writes."""
    return node.attrs["max_len"] if node.op == "kv_cache_write" else node.inputs[0].shape[2]


def check_positions(checks: list, inputs: list[torch.Tensor]) -> None:
    """Refuse positions outside a cache, before anything is written: ``checks`` holds
    (input index of the positions, the cache's slots, the node) for each in-place write."""
    for index, max_len, node in checks:
        try:
            check_positions_in_cache(inputs[index], max_len, f"{node.name} ({node.op})")
        except ValueError as e:
            from ..base import BackendError
            raise BackendError(str(e)) from None


__all__ = ["FUSED", "IN_PLACE", "attention_reads", "state_of", "positions_of", "attention_step", "check_positions", "fused_reads",
           "writes_in_place", "write_step", "cache_length"]

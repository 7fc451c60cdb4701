"""The decoder's cache write and attention on ONNX Runtime (float32; other dtypes are written out in
primitive ops by the backend's prepare pass).

An ``attention`` whose k and v are each written by a ``cache_update`` just before it runs as one
GroupQueryAttention (com.microsoft): it writes the new rows into the caches and reads only the
slots up to each row's last position, where the primitive form scores and rewrites every slot.
Every other ``attention`` and ``cache_update`` runs in primitive ONNX ops.

    >>> fused = fused_attention(graph)["layers.0.attention"]     # its two cache writes
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto

from ...ir import Graph, Node
from ...ir.dtypes import float32
from ..base import BackendError
from .builder import OnnxBuilder
from .ops import operand, rule

# GroupQueryAttention's CPU kernel takes heads whose size is a multiple of this.
GQA_HEAD_MULTIPLE = 8


@dataclass(frozen=True)
class Fused:
    """An attention node and the cache_update nodes writing its k and v caches."""
    attention: Node
    k: Node
    v: Node


def fused_attention(graph: Graph) -> dict[str, Fused]:
    """The attention nodes of ``graph`` that run as one GroupQueryAttention, by name, with the
    cache writes it absorbs.

    Such an attention is float32, reads k and v each just written by its own cache_update with
    the attention's positions (a graph input), each cache_update's past cache is a graph input
    read by nothing else and its updated cache is read by nothing but the attention (and graph
    outputs), and heads are whole multiples (GQA_HEAD_MULTIPLE; the cache length fixed).

    GroupQueryAttention assumes what every runner feeds: each row's positions are contiguous
    (token j of a row of s sits at positions[:, -1] - (s - 1 - j)); it is told only the last
    one (seqlens_k) and the longest row (total_sequence_length). The runner checks that (and
    that positions lie in the cache) before ONNX Runtime writes into the cache."""
    uses = graph.uses()
    inputs = {v.name for v in graph.inputs}
    return {n.name: f for n in graph.nodes if n.op == "attention" and (f := _fits(n, uses, inputs))}


def _fits(node: Node, uses, inputs: set[str]) -> Fused | None:
    q, k, v, positions = node.inputs
    writes = k.producer, v.producer
    if node.output.dtype != float32 or positions.name not in inputs or writes[0] is writes[1]:
        return None
    for w in writes:
        if w is None or w.op != "cache_update" or w.inputs[2] is not positions:
            return None
        past = w.inputs[0]
        if past.name not in inputs or [n for n, _ in uses.get(past, [])] != [w] or \
                any(n is not node for n, _ in uses.get(w.output, [])):
            return None
    heads, kv_heads, max_len, d = q.shape[1], k.shape[1], k.shape[2], q.shape[3]
    if not all(isinstance(x, int) for x in (heads, kv_heads, max_len, d)) or d % GQA_HEAD_MULTIPLE:
        return None
    return Fused(node, *writes)


def _plan(b: OnnxBuilder) -> dict[str, Fused]:
    if "fused_attention" not in b.memo:
        b.memo["fused_attention"] = fused_attention(b.graph)
        b.memo["absorbed"] = {w.name for f in b.memo["fused_attention"].values() for w in (f.k, f.v)}
    return b.memo["fused_attention"]


def _float32_only(node: Node) -> None:
    if node.output.dtype != float32:
        raise BackendError(f"node {node.name}: the onnx backend lowers {node.op} of float32, not "
                           f"{node.output.dtype.name}; the backend's prepare passes write other dtypes out "
                           "(decompose keep_dtypes): lower through nf.compile or run them first")


@rule("cache_update")
def _cache_update(b: OnnxBuilder, node: Node, fb) -> None:
    _plan(b)
    if node.name in b.memo["absorbed"]:
        return                                  # written by its attention's GroupQueryAttention
    _float32_only(node)
    cache, new, positions = (operand(b, v, fb) for v in node.inputs)
    index = b.node("Unsqueeze", [b.node("Cast", [positions], to=TensorProto.INT64), b.ints([1, 3])])   # [b, 1, s, 1]
    index = b.node("Expand", [index, b.node("Shape", [new])])
    b.node("ScatterElements", [cache, index, new], node.output.name, axis=2)


@rule("attention")
def _attention(b: OnnxBuilder, node: Node, fb) -> None:
    _float32_only(node)
    fused = _plan(b).get(node.name)
    if fused is not None:
        _group_query_attention(b, fused, fb)
    else:
        _primitive(b, node, fb)


def _bshd(b: OnnxBuilder, x: str) -> str:
    """[b, heads, s, d] -> [b, s, heads * d]."""
    return b.node("Reshape", [b.node("Transpose", [x], perm=[0, 2, 1, 3]), b.ints([0, 0, -1])])


def _lengths(b: OnnxBuilder, positions: str) -> tuple[str, str]:
    """GroupQueryAttention's seqlens_k (each row's last position, int32 [b]) and
    total_sequence_length (the longest row, int32 scalar), made once per positions input."""
    key = ("gqa_lengths", positions)
    if key not in b.memo:
        last = b.node("Slice", [positions, b.ints([-1]), b.ints([2 ** 63 - 1]), b.ints([1])])          # [b, 1]
        last = b.node("Cast", [last], to=TensorProto.INT32)
        longest = b.node("Add", [b.node("ReduceMax", [last], keepdims=0), b.const(np.asarray(1, np.int32))])
        b.memo[key] = b.node("Squeeze", [last, b.ints([1])]), longest
    return b.memo[key]


def _group_query_attention(b: OnnxBuilder, f: Fused, fb) -> None:
    node = f.attention
    q, k, _, positions = node.inputs
    heads, d = q.shape[1], q.shape[3]
    seqlens, total = _lengths(b, operand(b, positions, fb))
    window, softcap = node.attrs["window"], node.attrs["softcap"]
    # ORT's local_window_size is our window: a query at p sees slot t iff p - t < window.
    out, present_k, present_v = b.fresh(f"{node.output.name}.bshd"), f.k.output.name, f.v.output.name
    b.node("GroupQueryAttention",
           [_bshd(b, operand(b, q, fb)), _bshd(b, operand(b, f.k.inputs[1], fb)), _bshd(b, operand(b, f.v.inputs[1], fb)),
            operand(b, f.k.inputs[0], fb), operand(b, f.v.inputs[0], fb), seqlens, total],
           [out, present_k, present_v], domain="com.microsoft", num_heads=heads, kv_num_heads=k.shape[1],
           scale=node.attrs["scale"], softcap=softcap, local_window_size=window or -1)
    b.node("Transpose", [b.node("Reshape", [out, b.ints([0, 0, heads, d])])], node.output.name, perm=[0, 2, 1, 3])
    outputs = {v.name for v in b.graph.outputs}
    for write in (f.k, f.v):
        if write.output.name in outputs:
            b.kv_cache.setdefault("shared_buffers", {})[write.output.name] = write.inputs[0].name
            b.kv_cache["positions"] = positions.name


def _primitive(b: OnnxBuilder, node: Node, fb) -> None:
    """The primitive form of passes/decompose.py in ONNX ops, in its float32 order: scores k @ q^T
    per kv head over every slot, hidden slots at the lowest float, softmax on the last axis."""
    q, k, v, positions = (operand(b, x, fb) for x in node.inputs)
    heads, d = node.inputs[0].shape[1], node.inputs[0].shape[3]
    kv_heads, max_len = node.inputs[1].shape[1], node.inputs[1].shape[2]
    if not all(isinstance(x, int) for x in (heads, kv_heads, d, max_len)):
        raise BackendError(f"node {node.name}: attention needs static heads, head size and cache length, "
                           f"got q {node.inputs[0].type} and k {node.inputs[1].type}")
    pos_type = node.inputs[3].dtype
    qt = b.node("Transpose", [b.node("Reshape", [q, b.ints([0, kv_heads, -1, d])])], perm=[0, 1, 3, 2])
    scores = b.node("Transpose", [b.node("MatMul", [k, qt])], perm=[0, 1, 3, 2])       # [b, kvh, g*s, L]
    scores = b.node("Mul", [scores, b.scalar(node.attrs["scale"], float32)])
    if node.attrs["softcap"]:
        cap = b.scalar(node.attrs["softcap"], float32)
        scores = b.node("Mul", [b.node("Tanh", [b.node("Div", [scores, cap])]), cap])
    pos = b.node("Reshape", [positions, b.ints([0, 1, 1, -1, 1])])                      # [b, 1, 1, s, 1]
    slots = b.const(np.arange(max_len, dtype=np.int64 if pos_type.name == "int64" else np.int32), "slots")
    visible = b.node("LessOrEqual", [slots, pos])
    if node.attrs["window"]:
        near = b.node("Less", [b.node("Sub", [pos, slots]), b.scalar(node.attrs["window"], pos_type)])
        visible = b.node("And", [visible, near])
    scores = b.node("Reshape", [scores, b.ints([0, kv_heads, heads // kv_heads, -1, max_len])])
    scores = b.node("Where", [visible, scores, b.scalar(float(torch.finfo(torch.float32).min), float32)])
    probs = b.node("Reshape", [b.node("Softmax", [scores], axis=-1), b.ints([0, kv_heads, -1, max_len])])
    b.node("Reshape", [b.node("MatMul", [probs, v]), b.ints([0, heads, -1, d])], node.output.name)


__all__ = ["Fused", "GQA_HEAD_MULTIPLE", "fused_attention"]

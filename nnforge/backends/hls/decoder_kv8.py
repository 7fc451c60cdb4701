"""The kv8 KV-cache encoding on the hls backend (docs/kv_cache.md; templates in
``nnforge/hls/nf_kv8.h``): the cache stays in off-chip memory as stored, int8 codes and float16
scales in the graph's own byte layout (:data:`.project.KV_FORMS`), so the runner loads and returns
the ``cache.*.codes`` / ``cache.*.scale`` state as it is.

``kv_cache_write`` becomes ``nf::kv8_write`` (each new row quantised in the design); a
``kv_cache_read`` emits nothing: the attention that reads it (``attention_cache_reads``) becomes
``nf::kv8_attention`` on the codes and scales. A read anything else takes is refused.

    >>> LOWERINGS["kv_cache_write"](plan, node, "n_k_cache_write")     # [Kv8Write(...)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...ir.ops.kvcache import attention_cache_reads, encoding_of
from ..base import BackendError
from . import emulate as E
from .decoder import ENCODED_ATTENTION, SCALE_SHIFT, Attention, _positions, _shape4
from .layers import Layer, struct
from .project import KV_PORT, LOWERINGS, kv_words

KINDS = ("kv8",)


def _unpack(env, regions) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, float16 bit patterns as uint16) of a kv8 cache, in their shapes."""
    (c_off, c_shape), (s_off, s_shape) = regions
    kv = env[KV_PORT]
    codes = E.unpack_words(kv[c_off:c_off + kv_words("int8", math.prod(c_shape))], np.int8, math.prod(c_shape))
    bits = E.unpack_words(kv[s_off:s_off + kv_words("f16", math.prod(s_shape))], np.uint16, math.prod(s_shape))
    return codes.reshape(c_shape), bits.reshape(s_shape)


@dataclass
class Kv8Write(Layer):
    """A kv8 kv_cache_write: the new rows quantised into the cache's codes and scales in the kv memory."""
    shape: tuple = ()               # the new rows [b, kvh, s, d]
    max_len: int = 0
    group: int = 0                  # channels per scale
    regions: tuple = ()             # ((codes offset, shape), (scale offset, shape))

    def config(self):
        b, kvh, s, d = self.shape
        (c_off, _), (s_off, _) = self.regions
        return struct(self.cfg, f"{self.node}: {s} row(s) into a kv8 cache of {self.max_len} slots, a scale per "
                      f"{self.group} channels", [
            ("unsigned", "n_batch", b), ("unsigned", "kv_heads", kvh), ("unsigned", "n_rows", s),
            ("unsigned", "head_dim", d), ("unsigned", "max_len", self.max_len), ("unsigned", "group", self.group),
            ("unsigned long", "codes_off", c_off), ("unsigned long", "scale_off", s_off)])

    def call(self, ids):
        x, pos = (ids[v] for v in self.inputs)
        return f"nf::kv8_write<act_t, {self.cfg}>({x}, {pos}, {KV_PORT});"

    def emulate(self, env, fmt):
        b, kvh, s, d = self.shape
        codes, bits = _unpack(env, self.regions)
        new_codes, new_bits = E.kv8_quantize(env[self.inputs[0]].reshape(self.shape), self.group, fmt.frac)
        pos = env[self.inputs[1]].reshape(b, s)
        for i in range(b):
            for j in range(s):
                if 0 <= pos[i, j] < self.max_len:
                    codes[i, :, pos[i, j]], bits[i, :, pos[i, j]] = new_codes[i, :, j], new_bits[i, :, j]
        kv = env[KV_PORT]
        for (off, _), data in zip(self.regions, (codes, bits)):
            words = E.pack_words(data)
            kv[off:off + len(words)] = words
        return codes.astype(np.int64)


@dataclass
class Kv8Attention(Attention):
    """Grouped-query attention of q [b, h, s, d] over kv8 k and v caches in the kv memory: codes
    and scales read and multiplied out on the fly (k_off / v_off: the codes' regions)."""
    k_scale: int = 0
    v_scale: int = 0
    group: int = 0
    scale_shapes: tuple = ()        # the k and v scales' shapes

    def config(self):
        b, h, s, d = self.shape
        t, lo, sh = self._params()
        return struct(self.cfg, f"{self.node}: attention of {h} heads over {self.kv_heads} kv8 kv heads, "
                      f"{self.max_len} slots", [
            ("unsigned", "n_batch", b), ("unsigned", "n_heads", h), ("unsigned", "kv_heads", self.kv_heads),
            ("unsigned", "n_rows", s), ("unsigned", "head_dim", d), ("unsigned", "max_len", self.max_len),
            ("unsigned", "group", self.group), ("unsigned", "window", self.window),
            ("unsigned long", "k_codes", self.k_off), ("unsigned long", "k_scale", self.k_scale),
            ("unsigned long", "v_codes", self.v_off), ("unsigned long", "v_scale", self.v_scale),
            ("long", "scale_m", self.scale_m), ("unsigned", "scale_shift", SCALE_SHIFT), ("long", "lut_lo", lo),
            ("unsigned", "step_shift", sh), ("unsigned", "lut_n", len(t) - 1), ("unsigned", "e_frac", self.e_frac)])

    def call(self, ids):
        q, pos = (ids[v] for v in self.inputs)
        return (f"nf::kv8_attention<act_t, act_t, {self.cfg}>({q}, {KV_PORT}, {pos}, {ids[self.output]}, "
                f"tbl_{self.name});")

    def emulate(self, env, fmt):
        b, h, s, d = self.shape
        cache = (b, self.kv_heads, self.max_len, d)
        k = E.kv8_values(*_unpack(env, ((self.k_off, cache), (self.k_scale, self.scale_shapes[0]))), fmt)
        v = E.kv8_values(*_unpack(env, ((self.v_off, cache), (self.v_scale, self.scale_shapes[1]))), fmt)
        t, lo, sh = self._params()
        return E.attention(env[self.inputs[0]].reshape(self.shape), env[self.inputs[1]].reshape(b, s), k, v,
                           self.window, t, lo, sh, self.scale_m, SCALE_SHIFT, fmt, fmt)


def _kind(node) -> str:
    kind = encoding_of(node.attrs).kind
    if kind not in KINDS:
        raise BackendError(f"node {node.name} ({node.op}): the {kind} KV-cache encoding is not supported by the hls "
                           f"backend, which keeps kv8 caches (int8 codes, float16 scales) or float ones in off-chip "
                           f"memory; encode the cache with kv8, or leave it float")
    return kind


def _group(node) -> int:
    return encoding_of(node.attrs).channels(node.attrs["head_dim"])


@LOWERINGS.register("kv_cache_write")
def _kv_cache_write(plan, node, name):
    new, positions, codes, scale = node.inputs
    _kind(node)
    _positions(node, positions)
    shape = _shape4(node, new, "new")
    if shape[3] % 4:
        raise BackendError(f"node {node.name} (kv_cache_write): the hls design packs a kv8 row's codes four to a "
                           f"32-bit word of the kv memory, and head_dim {shape[3]} is not a multiple of 4")
    return [Kv8Write(name, node.name, [new.name, positions.name], node.outputs[0].name, shape=shape,
                     max_len=node.attrs["max_len"], group=_group(node), regions=(plan.kv[codes.name], plan.kv[scale.name]))]


def _attention_reads(plan, node):
    return attention_cache_reads(plan.graph, node, KINDS)


@LOWERINGS.register("kv_cache_read")
def _kv_cache_read(plan, node, name):
    _kind(node)
    users = [u for u, _ in plan.graph.uses().get(node.output, [])]
    bad = [u for u in users if u.op != "attention" or _attention_reads(plan, u) is None]
    if bad or node.output in plan.graph.outputs:
        why = f"node {bad[0].name} ({bad[0].op})" if bad else "a graph output"
        raise BackendError(f"node {node.name} (kv_cache_read): the hls design reads a kv8 cache only inside "
                           f"attention (k and v of one encoding at the attention's positions), and {why} takes this "
                           f"read; no float copy of the cache is made")
    return []


def kv8_attention(plan, node, name, shape, scale_m: int):
    """The Kv8Attention layer for an attention ``node`` over kv8 kv_cache_read outputs (None: it is not)."""
    reads = _attention_reads(plan, node)
    if reads is None:
        return None
    kr, vr = reads
    (k_off, k_shape), (k_scale, ks_shape) = plan.kv[kr.inputs[1].name], plan.kv[kr.inputs[2].name]
    (v_off, _), (v_scale, vs_shape) = plan.kv[vr.inputs[1].name], plan.kv[vr.inputs[2].name]
    q, positions = node.inputs[0], node.inputs[3]
    return Kv8Attention(name, node.name, [q.name, positions.name], node.output.name, shape=shape,
                        kv_heads=k_shape[1], max_len=k_shape[2], window=node.attrs["window"], k_off=k_off,
                        v_off=v_off, scale_m=scale_m, k_scale=k_scale, v_scale=v_scale, group=_group(kr),
                        scale_shapes=(ks_shape, vs_shape), rows=0, n=0, step_log2=plan.opts.lut_step_log2,
                        e_frac=plan.opts.exp_frac, act=plan.opts.act)


ENCODED_ATTENTION.append(kv8_attention)

"""Decoders (causal LMs) on the hls backend: rotary embedding, the KV-cache write and attention over
the cache, with their lowering rules (templates in ``nnforge/hls/nf_attention.h``).

The KV cache lives in off-chip memory (the top function's ``kv_mem`` port, :data:`.project.KV_PORT`)
as raw activations in int32 words, one region per cache (:func:`.project._kv_state`); it is state
the runner keeps between calls, so a decode step writes one row per layer and reads only the rows
it attends to. The design for a prompt of n tokens is the prefill mode, the design for one token
the decode mode (FlightLLM's two modes): two sizes of one graph, built from the same weights.

Rotary tables are constants: cos and sin for every slot of the cache, computed at compile time as
the reference interpreter computes them (float32) and rounded to the activation format, so the
design synthesises no trigonometry. Layers reading one frequency table share its tables.

    >>> LOWERINGS["attention"](plan, node, "n_attention")     # [Attention(...)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..base import BackendError
from . import emulate as E
from .layers import Layer, Softmax, struct
from .project import KV_PORT, LOWERINGS, _dense, value_kind

SCALE_SHIFT = 16       # attention's scale is a mantissa times 2^-SCALE_SHIFT (as nf::softmax's inputs)
# Lowerings of an attention over an encoded cache's kv_cache_read outputs, registered by the modules
# of those encodings (decoder_kv8): each (plan, node, name, q shape, scale_m) -> a layer, or None
# where the reads are not its encoding's.
ENCODED_ATTENTION: list = []


def _shape4(node, v, what: str) -> tuple[int, int, int, int]:
    if len(v.shape) != 4:
        raise BackendError(f"node {node.name} ({node.op}): {what} {v.name} must be [batch, heads, seq, head_dim], "
                           f"got {list(v.shape)}")
    return tuple(v.shape)


def _positions(node, v) -> None:
    if value_kind(v) != "int":
        raise BackendError(f"node {node.name} ({node.op}): positions {v.name} must be integers, got {v.dtype.name}")


@dataclass
class Rope(Layer):
    """Rotary embedding of x [b, h, s, d] at positions [b, s] from precomputed tables."""
    shape: tuple = ()
    interleaved: bool = False
    cos: np.ndarray = None          # raw [slots, rotated]
    sin: np.ndarray = None          # raw [slots, rotated], the rotation's sign folded in
    offsets: tuple = (0, 0)

    def place(self, mem, act: E.Fixed) -> None:
        self.offsets = tuple(mem.add_once(E.saturate(t, act).astype("<i4").tobytes()) for t in (self.cos, self.sin))

    def config(self):
        b, h, s, d = self.shape
        return struct(self.cfg, f"{self.node}: rope over {self.cos.shape[1]} of {d} dims, tables for "
                      f"{self.cos.shape[0]} positions", [
            ("unsigned", "n_batch", b), ("unsigned", "n_heads", h), ("unsigned", "n_rows", s),
            ("unsigned", "head_dim", d), ("unsigned", "rotated", self.cos.shape[1]),
            ("bool", "interleaved", self.interleaved), ("unsigned", "n_slots", self.cos.shape[0]),
            ("unsigned long", "cos_off", self.offsets[0]), ("unsigned long", "sin_off", self.offsets[1])])

    def call(self, ids):
        x, pos = (ids[v] for v in self.inputs)
        return f"nf::rope<act_t, act_t, {self.cfg}>({x}, {pos}, {ids[self.output]}, wmem);"

    def emulate(self, env, fmt):
        b, h, s, d = self.shape
        x = env[self.inputs[0]].reshape(self.shape)
        pos = env[self.inputs[1]].reshape(b, s)
        return E.rope(x, pos, E.saturate(self.cos, fmt), E.saturate(self.sin, fmt), self.interleaved, fmt, fmt)


@dataclass
class KvWrite(Layer):
    """A cache_update: the new rows into the cache's region of the kv memory."""
    shape: tuple = ()               # the new rows [b, kvh, s, d]
    max_len: int = 0
    off: int = 0                    # the region's first word

    def config(self):
        b, kvh, s, d = self.shape
        return struct(self.cfg, f"{self.node}: {s} row(s) into a cache of {self.max_len} slots", [
            ("unsigned", "n_batch", b), ("unsigned", "kv_heads", kvh), ("unsigned", "n_rows", s),
            ("unsigned", "head_dim", d), ("unsigned", "max_len", self.max_len), ("unsigned long", "off", self.off)])

    def call(self, ids):
        x, pos = (ids[v] for v in self.inputs)
        return f"nf::kv_write<act_t, {self.cfg}>({x}, {pos}, {KV_PORT});"

    def emulate(self, env, fmt):
        b, kvh, s, d = self.shape
        cache = env[KV_PORT][self.off:self.off + b * kvh * self.max_len * d].reshape(b, kvh, self.max_len, d)
        E.kv_write(env[self.inputs[0]].reshape(self.shape), env[self.inputs[1]].reshape(b, s), cache)
        return cache.copy()


@dataclass
class Attention(Softmax):
    """Grouped-query attention of q [b, h, s, d] over the k and v caches in the kv memory."""
    shape: tuple = ()               # q
    kv_heads: int = 1
    max_len: int = 0
    window: int = 0
    k_off: int = 0
    v_off: int = 0
    scale_m: int = 0

    def config(self):
        b, h, s, d = self.shape
        t, lo, sh = self._params()
        return struct(self.cfg, f"{self.node}: attention of {h} heads over {self.kv_heads} kv heads, "
                      f"{self.max_len} slots", [
            ("unsigned", "n_batch", b), ("unsigned", "n_heads", h), ("unsigned", "kv_heads", self.kv_heads),
            ("unsigned", "n_rows", s), ("unsigned", "head_dim", d), ("unsigned", "max_len", self.max_len),
            ("unsigned", "window", self.window), ("unsigned long", "k_off", self.k_off),
            ("unsigned long", "v_off", self.v_off), ("long", "scale_m", self.scale_m),
            ("unsigned", "scale_shift", SCALE_SHIFT), ("long", "lut_lo", lo), ("unsigned", "step_shift", sh),
            ("unsigned", "lut_n", len(t) - 1), ("unsigned", "e_frac", self.e_frac)])

    def call(self, ids):
        q, pos = (ids[v] for v in self.inputs)
        return f"nf::attention<act_t, act_t, {self.cfg}>({q}, {KV_PORT}, {pos}, {ids[self.output]}, tbl_{self.name});"

    def emulate(self, env, fmt):
        b, h, s, d = self.shape
        kv, n = env[KV_PORT], b * self.kv_heads * self.max_len * d
        k = kv[self.k_off:self.k_off + n].reshape(b, self.kv_heads, self.max_len, d)
        v = kv[self.v_off:self.v_off + n].reshape(b, self.kv_heads, self.max_len, d)
        t, lo, sh = self._params()
        return E.attention(env[self.inputs[0]].reshape(self.shape), env[self.inputs[1]].reshape(b, s), k, v,
                           self.window, t, lo, sh, self.scale_m, SCALE_SHIFT, fmt, fmt)


def rope_tables(inv_freq: torch.Tensor, slots: int, scale: float, interleaved: bool, frac: int):
    """(cos, sin) raw [slots, rotated] at ``frac`` fractional bits: the reference's angles
    (positions x inv_freq and cos/sin in float32, times ``scale``), sin signed as the rotation
    pairs each dim (x_d cos + x_partner sin gives the rotated dim)."""
    pos = torch.arange(slots, dtype=torch.float32)[:, None]
    freqs = pos * inv_freq.to(torch.float32)[None]                               # [slots, r/2]
    emb = torch.repeat_interleave(freqs, 2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    cos, sin = (emb.cos() * scale).double().numpy(), (emb.sin() * scale).double().numpy()
    r = emb.shape[1]
    d = np.arange(r)
    first = (d % 2 == 0) if interleaved else (d < r // 2)                         # pairs (a, b) -> (-b, a)
    sin = np.where(first, -sin, sin)
    return tuple(np.floor(t * 2.0 ** frac + 0.5).astype(np.int64) for t in (cos, sin))


def _slots(plan, node) -> int:
    if not plan.kv:
        raise BackendError(f"node {node.name} (rope): the hls design tabulates rotary angles for the slots of the "
                           f"KV cache, and this graph has no cache (no state input written by a cache_update)")
    return max(shape[2] for _, shape in plan.kv.values())


@LOWERINGS.register("rope")
def _rope(plan, node, name):
    x, positions, inv_freq = node.inputs[:3]
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        raise BackendError(f"node {node.name} (rope): two frequency tables switched by length (longrope) are not "
                           f"supported by the hls backend")
    _positions(node, positions)
    shape = _shape4(node, x, "x")
    freq = _dense(inv_freq, f"node {node.name} inv_freq")
    cos, sin = rope_tables(freq, _slots(plan, node), node.attrs["scale"], node.attrs["style"] == "interleaved",
                           plan.opts.act.frac)
    return [Rope(name, node.name, [x.name, positions.name], node.output.name, shape=shape,
                 interleaved=node.attrs["style"] == "interleaved", cos=cos, sin=sin)]


@LOWERINGS.register("cache_update")
def _cache_update(plan, node, name):
    cache, new, positions = node.inputs
    _positions(node, positions)
    off, shape = plan.kv[cache.name]
    return [KvWrite(name, node.name, [new.name, positions.name], node.output.name,
                    shape=_shape4(node, new, "new"), max_len=shape[2], off=off)]


@LOWERINGS.register("attention")
def _attention(plan, node, name):
    q, k, v, positions = node.inputs
    _positions(node, positions)
    if node.attrs["softcap"]:
        raise BackendError(f"node {node.name} (attention): a score softcap (tanh) is not supported by the hls "
                           f"backend")
    shape = _shape4(node, q, "q")
    scale_m = int(math.floor(node.attrs["scale"] * 2 ** SCALE_SHIFT + 0.5))
    if any(c.producer is not None and c.producer.op == "kv_cache_read" for c in (k, v)):
        layer = next((lay for lower in ENCODED_ATTENTION if (lay := lower(plan, node, name, shape, scale_m))), None)
        if layer is None:
            raise BackendError(f"node {node.name} (attention): its k and v must both be kv8 kv_cache_read outputs at "
                               f"the attention's positions for the hls design to read the encoded cache in place")
        _check_act_width(plan, node, shape[3])
        return [layer]
    for c in (k, v):
        if c.name not in plan.kv:
            raise BackendError(f"node {node.name} (attention): {c.name} is not a KV cache the design keeps in "
                               f"off-chip memory (the hls attention reads the cache a cache_update wrote)")
    _check_act_width(plan, node, shape[3])
    (k_off, k_shape), (v_off, _) = plan.kv[k.name], plan.kv[v.name]
    return [Attention(name, node.name, [q.name, positions.name], node.output.name, shape=shape, kv_heads=k_shape[1],
                      max_len=k_shape[2], window=node.attrs["window"], k_off=k_off, v_off=v_off, scale_m=scale_m,
                      rows=0, n=0, step_log2=plan.opts.lut_step_log2, e_frac=plan.opts.exp_frac, act=plan.opts.act)]


def _check_act_width(plan, node, d: int) -> None:
    W = plan.opts.act_width
    if 2 * W + math.ceil(math.log2(max(d, 2))) > 62:
        raise BackendError(f"node {node.name}: act_width {W} is too wide for a 64-bit sum over {d} products; "
                           f"lower act_width")

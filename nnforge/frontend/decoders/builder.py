"""The decoder form of a causal LM, emitted from its :class:`DecoderSpec` and weights, as ONNX Runtime
GenAI's model builder and ExecuTorch's export_llm emit theirs: one graph that is both prefill and
decode (run at any number of new tokens), with the KV cache as explicit state.

Signature (the names are fixed; :func:`state_pairs` lists the cache's):

- inputs: ``input_ids`` int64 [batch, seq]; ``positions`` int64 [batch, seq], each token's 0-based
  position (the cache slot it writes, the last slot it reads); per layer i ``cache.{i}.k`` and
  ``cache.{i}.v`` float32 [batch, kv_heads, max_len, head_dim].
- outputs: ``logits`` float32 [batch, seq, vocab]; per layer ``cache.{i}.k.next`` and
  ``cache.{i}.v.next``: the caches with this step's keys and values written at ``positions``.

Layers are ordinary ``linear`` nodes named after transformers' modules
(``model.layers.3.self_attn.q_proj``), so every weight pass applies to them and a recipe selects
them by those names. A fused weight (Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn) stays one
linear whose output is sliced: one product, as the checkpoint stores it. Weights are read once
each, as float32 (memory-mapped where the checkpoint is float32 safetensors). A tied LM head reads
the embedding's weight value.

    >>> loaded = load_causal_lm("path/to/model")
    >>> graph = build(spec_from_config(loaded.config, max_len=512), loaded.weights, max_len=512)
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ...ir import Dense, Graph, Value, tensor
from ..errors import FrontendError
from .spec import DecoderSpec, LayerSpec

INPUT_IDS, POSITIONS, LOGITS = "input_ids", "positions", "logits"
SLOTS = "slots"         # the cache slot each token writes, where token reduction adds it (passes/kvreduce.py)
HEAD_LAYER = "lm_head"                  # the LM head's node, whatever the checkpoint calls it


def cache_name(layer: int, kind: str, nxt: bool = False) -> str:
    """``cache.{layer}.{k|v}`` (an input), or with ``.next`` the output that replaces it."""
    return f"cache.{layer}.{kind}" + (".next" if nxt else "")


def state_pairs(spec: DecoderSpec) -> list[tuple[str, str]]:
    """(input, output) names of the cache, layer by layer, K before V: each step's output is the
    next step's input."""
    return [(cache_name(i, kind), cache_name(i, kind, True)) for i in range(spec.num_layers) for kind in ("k", "v")]


def cache_shape(spec: DecoderSpec, max_len: int, batch: int | str = "batch") -> list:
    return [batch, spec.kv_heads, max_len, spec.head_dim]


class _Emitter:
    """Graph building with weights read from the checkpoint once each, and node names from its modules."""

    def __init__(self, spec: DecoderSpec, weights: Mapping[str, torch.Tensor], graph: Graph):
        self.spec, self.weights, self.g = spec, weights, graph
        self.taken: dict[str, Value] = {}

    def weight(self, key: str, transpose: bool = False) -> Value:
        if key in self.taken:
            return self.taken[key]
        try:
            t = self.weights[key]
        except KeyError:
            raise FrontendError(f"{self.spec.architecture}: the checkpoint has no tensor {key!r}, which the "
                                f"{self.spec.family} layout reads") from None
        t = t.detach().to(torch.float32)
        if transpose:                           # GPT-2's Conv1D keeps [in, out]
            t = t.t()
        # not cloned: a float32 checkpoint's tensors stay pages of its (privately) mapped file, so
        # a model larger than memory is not held twice; loader.load_causal_lm copies a caller's own
        self.taken[key] = self.g.add_weight(key, Dense(t.contiguous()))
        return self.taken[key]

    def op(self, op: str, *inputs, name: str | None = None, **attrs) -> Value:
        node_name = self.g.fresh_name(name or op, node=True)
        return self.g.add_node(op, inputs, attrs, name=node_name).output

    def scalar(self, value: float, name: str) -> Value:
        return self.op("full", shape=[], value=float(value), dtype="float32", name=name)

    # --- layers ---------------------------------------------------------------------------------
    def linear(self, x: Value, role: str, layer: int | None = None) -> Value:
        s, names = self.spec, self.spec.names
        module = names.module(role, layer)
        bias = self.weight(names.bias(role, layer)) if layer is not None and s._has_bias(role) else None
        return self.op("linear", x, self.weight(names.weight(role, layer), transpose=names.conv1d), bias, name=module)

    def norm(self, x: Value, role: str, layer: int | None = None) -> Value:
        s, names = self.spec, self.spec.names
        module = names.module(role, layer)
        w = self.weight(names.weight(role, layer))
        if s.norm == "rms":
            return self.op("rms_norm", x, w, eps=s.norm_eps, offset=s.norm_offset, name=module)
        b = self.weight(names.bias(role, layer)) if s.norm_bias else None
        return self.op("layer_norm", x, w, b, eps=s.norm_eps, name=module)

    def activation(self, x: Value, where: str) -> Value:
        kind = self.spec.activation
        if kind in ("gelu", "gelu_tanh"):
            return self.op("gelu", x, approximate="tanh" if kind == "gelu_tanh" else "none", name=where)
        return self.op(kind, x, name=where)

    def split(self, fused: Value, role: str, layer: int) -> dict[str, Value]:
        """The parts of a fused linear's output, by role (the checkpoint's row order)."""
        parts, start = {}, 0
        for part, rows in self.spec.names.fused[role]:
            module = self.spec.names.module(role, layer)
            parts[part] = self.op("slice", fused, axis=-1, start=start, end=start + rows, name=f"{module}.{part}")
            start += rows
        return parts


def _heads(e: _Emitter, x: Value, heads: int, where: str) -> Value:
    """[b, s, heads * d] -> [b, heads, s, d]."""
    d = e.spec.head_dim
    x = e.op("reshape", x, shape=["batch", "seq", heads, d], name=f"{where}.view")
    return e.op("permute", x, perm=[0, 2, 1, 3], name=f"{where}.transpose")


def _attention(e: _Emitter, x: Value, layer: LayerSpec, positions: Value, inv_freq: Value | tuple | None,
               outputs: list[Value]) -> Value:
    s, names, i = e.spec, e.spec.names, layer.index
    prefix = names.module("o", i).rsplit(".", 1)[0]           # model.layers.{i}.self_attn
    if "qkv" in names.layer:
        parts = e.split(e.linear(x, "qkv", i), "qkv", i)          # one product, sliced three ways
        q, k, v = parts["q"], parts["k"], parts["v"]
    else:
        q, k, v = (e.linear(x, role, i) for role in ("q", "k", "v"))
    q, k, v = _heads(e, q, s.heads, f"{prefix}.q"), _heads(e, k, s.kv_heads, f"{prefix}.k"), \
        _heads(e, v, s.kv_heads, f"{prefix}.v")
    if s.qk_norm:
        q, k = e.norm(q, "q_norm", i), e.norm(k, "k_norm", i)
    if layer.rope is not None:
        rotary = layer.rope.rotary_dim if layer.rope.rotary_dim < s.head_dim else 0
        attrs = dict(scale=layer.rope.scale, style=layer.rope.style, rotary_dim=rotary)
        tables = (inv_freq,) if isinstance(inv_freq, Value) else inv_freq        # (short, long): longrope
        if len(tables) > 1:
            attrs["switch_at"] = layer.rope.switch_at
        q = e.op("rope", q, positions, *tables, name=f"{prefix}.q_rope", **attrs)
        k = e.op("rope", k, positions, *tables, name=f"{prefix}.k_rope", **attrs)
    caches = []
    for kind, new in (("k", k), ("v", v)):
        past = e.g.add_input(cache_name(i, kind), tensor("f32", *cache_shape(s, e.max_len)))
        caches.append(e.op("cache_update", past, new, positions, name=f"{prefix}.{kind}_cache"))
    outputs += caches
    out = e.op("attention", q, caches[0], caches[1], positions, scale=layer.scale, window=layer.window,
               softcap=s.attn_softcap, name=f"{prefix}.attention")
    out = e.op("permute", out, perm=[0, 2, 1, 3], name=f"{prefix}.merge")
    out = e.op("reshape", out, shape=["batch", "seq", s.heads * s.head_dim], name=f"{prefix}.merge_heads")
    return e.linear(out, "o", i)


def _mlp(e: _Emitter, x: Value, i: int) -> Value:
    s, names = e.spec, e.spec.names
    where = names.module("down", i).rsplit(".", 1)[0]
    if s.mlp == "plain":
        return e.linear(e.activation(e.linear(x, "up", i), f"{where}.act"), "down", i)
    if "gate_up" in names.layer:
        parts = e.split(e.linear(x, "gate_up", i), "gate_up", i)
        gate, up = parts["gate"], parts["up"]
    else:
        gate, up = e.linear(x, "gate", i), e.linear(x, "up", i)
    h = e.op("mul", e.activation(gate, f"{where}.act"), up, name=f"{where}.gated")
    return e.linear(h, "down", i)


def build(spec: DecoderSpec, weights: Mapping[str, torch.Tensor], max_len: int | None = None,
          name: str | None = None) -> Graph:
    """The decoder-form graph of ``spec`` with its ``weights`` (state-dict names), for a static
    cache of ``max_len`` slots (the spec's own when it was made for one)."""
    max_len = max_len or spec.max_len
    if not isinstance(max_len, int) or max_len < 1:
        raise FrontendError(f"{spec.architecture}: a decoder needs a static cache length: give max_len (got {max_len!r})")
    if spec.max_len is not None and spec.max_len != max_len:
        raise FrontendError(f"{spec.architecture}: the spec's rotary tables were computed for max_len {spec.max_len}, "
                            f"not {max_len}; make the spec with spec_from_config(config, max_len={max_len})")
    if spec.positions == "learned" and max_len > spec.max_positions:
        raise FrontendError(f"{spec.architecture} has learned positions for {spec.max_positions} tokens; "
                            f"max_len {max_len} is longer")
    g = Graph(name or spec.family)
    e = _Emitter(spec, weights, g)
    e.max_len = max_len
    ids = g.add_input(INPUT_IDS, tensor("i64", "batch", "seq"))
    positions = g.add_input(POSITIONS, tensor("i64", "batch", "seq"))
    names = spec.names
    x = e.op("embedding", ids, e.weight(names.weight("embed")), name=names.embed)
    if spec.embed_scale != 1.0:
        x = e.op("mul", x, e.scalar(spec.embed_scale, "embed_scale"), name=f"{names.embed}.scaled")
    if spec.positions == "learned":
        pos = e.op("embedding", positions, e.weight(names.weight("pos_embed")), name=names.pos_embed)
        x = e.op("add", x, pos, name=f"{names.pos_embed}.add")
    inv_freqs: dict[str, Value | tuple[Value, Value]] = {}
    caches: list[Value] = []
    for layer in spec.layers:
        i = layer.index
        inv_freq = None
        if layer.rope is not None:
            key = f"rope.{layer.attention}.inv_freq"
            if key not in inv_freqs:
                inv_freqs[key] = g.add_weight(key, Dense(layer.rope.inv_freq.to(torch.float32).clone()))
                if layer.rope.long_inv_freq is not None:
                    inv_freqs[key] = (inv_freqs[key], g.add_weight(
                        f"{key}_long", Dense(layer.rope.long_inv_freq.to(torch.float32).clone())))
            inv_freq = inv_freqs[key]
        h = _attention(e, e.norm(x, "attn_norm", i), layer, positions, inv_freq, caches)
        if spec.post_norms:
            h = e.norm(h, "post_attn_norm", i)
        x = e.op("add", x, h, name=f"{names.module('o', i).rsplit('.', 2)[0]}.attn_residual")
        h = _mlp(e, e.norm(x, "mlp_norm", i), i)
        if spec.post_norms:
            h = e.norm(h, "post_mlp_norm", i)
        x = e.op("add", x, h, name=f"{names.module('down', i).rsplit('.', 2)[0]}.mlp_residual")
    x = e.norm(x, "final_norm")
    head = e.weight(names.weight("lm_head"))       # a tied head names the embedding: the same value
    logits = e.op("linear", x, head, None, name=HEAD_LAYER)
    if spec.logit_softcap:
        cap = e.scalar(spec.logit_softcap, "logit_softcap")
        logits = e.op("mul", e.op("tanh", e.op("div", logits, cap, name="logits.scaled")), cap, name="logits.capped")
    g.set_outputs([logits, *caches])
    g.name_outputs([LOGITS] + [out for _, out in state_pairs(spec)])
    return g


__all__ = ["build", "state_pairs", "cache_name", "cache_shape", "INPUT_IDS", "POSITIONS", "LOGITS", "HEAD_LAYER"]

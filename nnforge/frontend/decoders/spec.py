"""What the decoder builder needs to know about a causal LM, read from its transformers config:
:class:`DecoderSpec`, filled in by one small function per family (the ``FAMILIES`` table).

Every number is the one transformers' own modeling code uses (transformers 5, whose configs carry
``rope_parameters``): head_dim defaults, attention scales, sliding-window layer patterns, Gemma's
``1 + w`` norms, and the rotary ``inv_freq`` and ``attention_scaling`` from transformers' own rope
init functions, per layer type (Gemma 3's sliding layers have their own base frequency).

    >>> spec = spec_from_config(model.config, max_len=1024)
    >>> spec.layers[5].window, spec.layers[5].rope.inv_freq.shape
    >>> weights[spec.names.weight("q", 3)]           # model.layers.3.self_attn.q_proj.weight
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import FrontendError

KNOWN_FAMILIES = "Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, GPT-2"

# transformers' activation names (ACT2FN keys) -> the IR's; the three gelu-tanh spellings are one formula
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}

# Roles of a layer's weights in WeightNames.layer. A family has the ones it uses; a fused role
# ("qkv", "gate_up") stands for the roles it splits into (WeightNames.fused).
LAYER_ROLES = ("attn_norm", "q", "k", "v", "qkv", "q_norm", "k_norm", "o", "post_attn_norm",
               "mlp_norm", "gate", "up", "gate_up", "down", "post_mlp_norm")
_NORMS = {"attn_norm", "q_norm", "k_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm"}
_ATTENTION = {"q", "k", "v", "qkv"}
_MLP = {"gate", "up", "gate_up", "down"}


@dataclass(frozen=True, eq=False)
class RopeSpec:
    """Rotary embedding of one layer type: cos/sin = cos/sin(position * inv_freq) * scale."""
    inv_freq: torch.Tensor      # float32 [rotary_dim // 2], exactly as transformers computes it
    scale: float                # transformers' attention_scaling (yarn, longrope); 1.0 otherwise
    rotary_dim: int             # leading head dims rotated; the rest pass through (Phi-3 partial rotary)
    rope_type: str              # transformers' rope_type: default, linear, dynamic, yarn, longrope, llama3...
    theta: float                # base frequency
    style: str = "half"         # transformers' rotate_half pairing (GGUF weights are de-permuted to it)
    # longrope: the long-factor table, used by a call whose largest position + 1 exceeds switch_at
    # (the original context length), as transformers switches per forward call; None: one table
    long_inv_freq: torch.Tensor | None = None
    switch_at: int = 0


@dataclass(frozen=True)
class LayerSpec:
    """What differs between layers: the attention kind, its window and scale, and its rope."""
    index: int
    attention: str              # "full_attention" | "sliding_attention" (transformers' layer_types)
    window: int                 # 0: full causal; w: query at p sees keys at t with p - t < w
    scale: float                # multiplies q.k before softmax (and before the softcap)
    rope: RopeSpec | None       # None: learned absolute positions (GPT-2)


@dataclass(frozen=True)
class WeightNames:
    """Where each part's weights are in the model's state dict (transformers' module names), by
    role: module paths, to which ``.weight`` / ``.bias`` are appended. Layer paths hold ``{i}``.
    A tied LM head names the embedding's path."""
    embed: str
    final_norm: str
    lm_head: str
    layer: dict[str, str]
    pos_embed: str | None = None
    # fused role -> ((role, rows), ...): the fused weight's output rows, in order (Phi-3, GPT-2)
    fused: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    # GPT-2's Conv1D stores weights [in, out], the transpose of a linear's
    conv1d: bool = False

    def module(self, role: str, layer: int | None = None) -> str:
        """The module path of ``role`` (a layer role with ``layer``, else embed/pos_embed/final_norm/lm_head)."""
        if layer is None:
            path = getattr(self, role)
            if path is None:
                raise KeyError(f"this model has no {role!r}")
            return path
        return self.layer[role].format(i=layer)

    def weight(self, role: str, layer: int | None = None) -> str:
        return self.module(role, layer) + ".weight"

    def bias(self, role: str, layer: int | None = None) -> str:
        return self.module(role, layer) + ".bias"


@dataclass(frozen=True)
class DecoderSpec:
    """A decoder-only causal LM as the builder emits it. Built by :func:`spec_from_config`."""
    family: str                 # key of FAMILIES: "llama", "gemma3", ...
    architecture: str           # the transformers class whose weights these are
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int               # grouped-query attention: heads is a multiple of it
    head_dim: int
    intermediate: int
    vocab: int
    max_len: int | None         # the static cache length the rope was computed for (None: transformers' init)
    max_positions: int          # config.max_position_embeddings
    norm: str                   # "rms" | "layer"
    norm_eps: float
    norm_offset: float          # rms_norm multiplies by (offset + weight): 1.0 for Gemma, else 0.0
    norm_bias: bool             # layer norms with a bias (GPT-2)
    qk_norm: bool               # rms norm of q and k over head_dim before the rope (Qwen3, Gemma 3)
    post_norms: bool            # norms after attention and after the MLP too (Gemma 2/3)
    mlp: str                    # "gated": down(act(gate(x)) * up(x)); "plain": down(act(up(x)))
    activation: str             # "silu" | "gelu_tanh" | "gelu" | "relu"
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    positions: str              # "rope" | "learned" (GPT-2: a position embedding added to the tokens')
    layers: tuple[LayerSpec, ...]
    tied_embeddings: bool       # the LM head is the token embedding
    embed_scale: float          # token embeddings are multiplied by it (Gemma: sqrt(hidden))
    attn_softcap: float         # 0: none; c: tanh(scores / c) * c before the softmax (Gemma 2)
    logit_softcap: float        # 0: none; c: tanh(logits / c) * c (Gemma 2, Gemma 3 when set)
    names: WeightNames

    def weight_keys(self) -> list[str]:
        """Every state-dict key the builder reads, once each (a tied head adds none)."""
        n = self.names
        keys = [n.weight("embed")]
        if n.pos_embed:
            keys.append(n.weight("pos_embed"))
        for i in range(self.num_layers):
            for role in n.layer:
                keys.append(n.weight(role, i))
                if self._has_bias(role):
                    keys.append(n.bias(role, i))
        keys.append(n.weight("final_norm"))
        if self.norm_bias:
            keys.append(n.bias("final_norm"))
        if not self.tied_embeddings:
            keys.append(n.weight("lm_head"))
        return keys

    def _has_bias(self, role: str) -> bool:
        if role in _NORMS:
            return self.norm_bias and role not in ("q_norm", "k_norm")
        if role in _ATTENTION:
            return self.qkv_bias
        if role in _MLP:
            return self.mlp_bias
        return self.o_bias


def family_of(config, where: str = "") -> str:
    """The FAMILIES key of a transformers config, or an error naming its architecture and the known ones."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return model_type
    archs = getattr(config, "architectures", None) or []
    name = ", ".join(archs) or type(config).__name__
    raise FrontendError(f"{where + ': ' if where else ''}architecture {name} (model_type {model_type!r}) is not a "
                        f"decoder family nnforge knows; it knows {KNOWN_FAMILIES}")


def spec_from_config(config, max_len: int | None = None) -> DecoderSpec:
    """The :class:`DecoderSpec` of a transformers causal-LM config (a Gemma3ForConditionalGeneration
    config gives its text model). ``max_len`` is the static cache length: rope types that depend on
    the sequence length (dynamic, longrope) are computed for it, as transformers does once a
    sequence reaches that length; None gives the rope transformers builds at init.

        >>> spec_from_config(AutoConfig.from_pretrained(path), max_len=2048).layers[0].rope.theta
    """
    if max_len is not None and max_len < 1:
        raise FrontendError(f"max_len must be a positive number of tokens, not {max_len}")
    return FAMILIES[family_of(config)](config, max_len)


# ---- shared pieces -----------------------------------------------------------------------------

def _head_dim(config) -> int:
    # the rope init functions and most attentions read it so; Gemma's configs always set it
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _activation(config, attr: str) -> str:
    name = getattr(config, attr)
    if name not in ACTIVATIONS:
        raise FrontendError(f"{type(config).__name__}.{attr} = {name!r}: an activation nnforge's decoders do not "
                            f"build; they build {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def _rope(config, default_init, layer_type: str | None, max_len: int | None) -> RopeSpec:
    """inv_freq and attention_scaling from transformers' own functions: the family's
    ``compute_default_rope_parameters`` for the default type, ``ROPE_INIT_FUNCTIONS`` otherwise."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = getattr(config, "rope_parameters", None)
    if not params:
        raise FrontendError(f"{type(config).__name__} has no rope_parameters: nnforge reads rotary settings as "
                            "transformers 5 presents them; upgrade transformers")
    if layer_type is not None:
        params = params.get(layer_type)
        if params is None:
            raise FrontendError(f"{type(config).__name__}: rope_parameters has no entry for {layer_type} layers")
    rope_type = params.get("rope_type", "default")
    by_layer = {} if layer_type is None else {"layer_type": layer_type}
    if rope_type == "default":
        inv_freq, scale = default_init(config, **by_layer)
    elif rope_type == "longrope":
        # short factors until a call reaches past the original context, long ones after (if the cache can)
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=None, **by_layer)
        original = int(params.get("original_max_position_embeddings")
                       or getattr(config, "original_max_position_embeddings", 0) or 0)
        if original and (max_len is None or max_len > original):
            long, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=original + 1, **by_layer)
            return RopeSpec(inv_freq=inv_freq.detach().to(torch.float32).cpu(), scale=float(scale),
                            rotary_dim=2 * inv_freq.numel(), rope_type=rope_type, theta=float(params["rope_theta"]),
                            long_inv_freq=long.detach().to(torch.float32).cpu(), switch_at=original)
    elif rope_type in ROPE_INIT_FUNCTIONS:
        seq_len = max_len
        if rope_type == "dynamic":
            # transformers recomputes these only once a sequence outgrows max_position_embeddings, and
            # then from a tensor length (float32 arithmetic, not Python's)
            grown = max_len is not None and max_len > config.max_position_embeddings
            seq_len = torch.tensor(max_len) if grown else None
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len, **by_layer)
    else:
        raise FrontendError(f"{type(config).__name__}: rope_type {rope_type!r} is not one transformers computes here "
                            f"(it knows default, {', '.join(ROPE_INIT_FUNCTIONS)})")
    inv_freq = inv_freq.detach().to(torch.float32).cpu()
    return RopeSpec(inv_freq=inv_freq, scale=float(scale), rotary_dim=2 * inv_freq.numel(), rope_type=rope_type,
                    theta=float(params["rope_theta"]))


def _layers(config, layer_types: list[str], windows: dict[str, int], scale, ropes: dict) -> tuple[LayerSpec, ...]:
    return tuple(LayerSpec(index=i, attention=t, window=windows.get(t, 0),
                           scale=scale(i) if callable(scale) else scale, rope=ropes.get(t))
                 for i, t in enumerate(layer_types))


def _check_heads(config, heads: int, kv_heads: int) -> None:
    if kv_heads < 1 or heads % kv_heads:
        raise FrontendError(f"{type(config).__name__}: {heads} attention heads are not a multiple of "
                            f"{kv_heads} key/value heads")


def _window_of(config) -> int:
    window = getattr(config, "sliding_window", None)
    if window is None:
        raise FrontendError(f"{type(config).__name__}: layer_types has sliding_attention layers but sliding_window "
                            "is None")
    return int(window)


def _llama_names(prefix: str, lm_head: str, tied: bool, qk_norm: bool, post_norms: bool) -> WeightNames:
    layer = f"{prefix}layers.{{i}}."
    roles = {"attn_norm": layer + "input_layernorm",
             "q": layer + "self_attn.q_proj", "k": layer + "self_attn.k_proj", "v": layer + "self_attn.v_proj"}
    if qk_norm:
        roles |= {"q_norm": layer + "self_attn.q_norm", "k_norm": layer + "self_attn.k_norm"}
    roles["o"] = layer + "self_attn.o_proj"
    if post_norms:   # Gemma: post_attention_layernorm is on the attention's output, the MLP's own comes after
        roles |= {"post_attn_norm": layer + "post_attention_layernorm", "mlp_norm": layer + "pre_feedforward_layernorm"}
    else:            # Llama: post_attention_layernorm is the MLP's input norm
        roles["mlp_norm"] = layer + "post_attention_layernorm"
    roles |= {"gate": layer + "mlp.gate_proj", "up": layer + "mlp.up_proj", "down": layer + "mlp.down_proj"}
    if post_norms:
        roles["post_mlp_norm"] = layer + "post_feedforward_layernorm"
    embed = prefix + "embed_tokens"
    return WeightNames(embed=embed, final_norm=prefix + "norm", lm_head=embed if tied else lm_head, layer=roles)


def _llama_like(config, max_len, *, family: str, architecture: str, rotary, layer_types=None, windows=None,
                qkv_bias: bool, o_bias: bool, mlp_bias: bool = False, qk_norm: bool = False,
                prefix: str = "model.", tied: bool | None = None, rope_per_type: bool = False, **overrides) -> DecoderSpec:
    """The Llama layout (pre-norm, rms norms, gated MLP, rope) that the other families vary."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    _check_heads(config, heads, kv_heads)
    head_dim = _head_dim(config)
    layer_types = list(layer_types or ["full_attention"] * config.num_hidden_layers)
    if len(layer_types) != config.num_hidden_layers:
        raise FrontendError(f"{type(config).__name__}: layer_types lists {len(layer_types)} layers, "
                            f"num_hidden_layers is {config.num_hidden_layers}")
    # a family's rotary class reads one rope for all layers, or (Gemma 3) one per layer type
    ropes = {t: _rope(config, rotary.compute_default_rope_parameters, t if rope_per_type else None, max_len)
             for t in sorted(set(layer_types))}
    if tied is None:
        tied = bool(getattr(config, "tie_word_embeddings", False))
    post_norms = overrides.pop("post_norms", False)
    activation = overrides.pop("activation", None) or _activation(config, "hidden_act")
    fields = dict(
        family=family, architecture=architecture, num_layers=config.num_hidden_layers, hidden=config.hidden_size,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, intermediate=config.intermediate_size,
        vocab=config.vocab_size, max_len=max_len, max_positions=config.max_position_embeddings, norm="rms",
        norm_eps=float(config.rms_norm_eps), norm_offset=0.0, norm_bias=False, qk_norm=qk_norm,
        post_norms=post_norms, mlp="gated", activation=activation, qkv_bias=qkv_bias,
        o_bias=o_bias, mlp_bias=mlp_bias, positions="rope",
        layers=_layers(config, layer_types, windows or {}, head_dim ** -0.5, ropes),
        tied_embeddings=tied, embed_scale=1.0, attn_softcap=0.0, logit_softcap=0.0,
        names=_llama_names(prefix, "lm_head", tied, qk_norm, post_norms))
    fields.update(overrides)
    return DecoderSpec(**fields)


# ---- one function per family -------------------------------------------------------------------

def _llama(config, max_len):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    bias = bool(config.attention_bias)
    return _llama_like(config, max_len, family="llama", architecture="LlamaForCausalLM", rotary=LlamaRotaryEmbedding,
                       qkv_bias=bias, o_bias=bias, mlp_bias=bool(config.mlp_bias))


def _mistral(config, max_len):
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding
    window = config.sliding_window        # every layer, when set
    types = ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers
    return _llama_like(config, max_len, family="mistral", architecture="MistralForCausalLM",
                       rotary=MistralRotaryEmbedding, layer_types=types,
                       windows={"sliding_attention": int(window or 0)}, qkv_bias=False, o_bias=False)


def _qwen_windows(config) -> dict[str, int]:
    # Qwen2/3 configs set sliding_window to None unless use_sliding_window; layer_types then says which layers
    return {"sliding_attention": _window_of(config)} if "sliding_attention" in config.layer_types else {}


def _qwen2(config, max_len):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
    return _llama_like(config, max_len, family="qwen2", architecture="Qwen2ForCausalLM", rotary=Qwen2RotaryEmbedding,
                       layer_types=config.layer_types, windows=_qwen_windows(config), qkv_bias=True, o_bias=False)


def _qwen3(config, max_len):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
    bias = bool(config.attention_bias)
    return _llama_like(config, max_len, family="qwen3", architecture="Qwen3ForCausalLM", rotary=Qwen3RotaryEmbedding,
                       layer_types=config.layer_types, windows=_qwen_windows(config), qkv_bias=bias, o_bias=bias,
                       qk_norm=True)


def _gemma_common(config) -> dict:
    if getattr(config, "use_bidirectional_attention", False):
        raise FrontendError(f"{type(config).__name__}: use_bidirectional_attention is set, so this is not a causal "
                            "LM; nnforge builds causal decoders")
    return dict(norm_offset=1.0, post_norms=True, activation=_activation(config, "hidden_activation"),
                embed_scale=float(config.hidden_size ** 0.5),
                logit_softcap=float(config.final_logit_softcapping or 0.0))


def _gemma2(config, max_len):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding
    bias = bool(config.attention_bias)
    spec = _llama_like(config, max_len, family="gemma2", architecture="Gemma2ForCausalLM",
                       rotary=Gemma2RotaryEmbedding, layer_types=config.layer_types,
                       windows={"sliding_attention": _window_of(config)}, qkv_bias=bias, o_bias=bias,
                       attn_softcap=float(config.attn_logit_softcapping or 0.0), **_gemma_common(config))
    return _with_scale(spec, config.query_pre_attn_scalar ** -0.5)


def _gemma3(config, max_len):
    """Gemma 3's text model; its attention ignores attn_logit_softcapping (transformers passes no softcap)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    outer = config
    multimodal = config.model_type == "gemma3"
    if multimodal:
        config = config.text_config
    bias = bool(config.attention_bias)
    spec = _llama_like(config, max_len, family="gemma3",
                       architecture="Gemma3ForConditionalGeneration" if multimodal else "Gemma3ForCausalLM",
                       rotary=Gemma3RotaryEmbedding, layer_types=config.layer_types,
                       windows={"sliding_attention": _window_of(config)}, qkv_bias=bias, o_bias=bias, qk_norm=True,
                       prefix="model.language_model." if multimodal else "model.",
                       tied=bool(getattr(outer, "tie_word_embeddings", False)), rope_per_type=True,
                       **_gemma_common(config))
    return _with_scale(spec, config.query_pre_attn_scalar ** -0.5)


def _with_scale(spec: DecoderSpec, scale: float) -> DecoderSpec:
    return replace(spec, layers=tuple(replace(layer, scale=scale) for layer in spec.layers))


def _phi3(config, max_len):
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
    window = config.sliding_window        # every layer, when set
    types = ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers
    spec = _llama_like(config, max_len, family="phi3", architecture="Phi3ForCausalLM", rotary=Phi3RotaryEmbedding,
                       layer_types=types, windows={"sliding_attention": int(window or 0)}, qkv_bias=False,
                       o_bias=False)
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    layer = "model.layers.{i}."
    names = WeightNames(
        embed=spec.names.embed, final_norm=spec.names.final_norm, lm_head=spec.names.lm_head,
        layer={"attn_norm": layer + "input_layernorm", "qkv": layer + "self_attn.qkv_proj",
               "o": layer + "self_attn.o_proj", "mlp_norm": layer + "post_attention_layernorm",
               "gate_up": layer + "mlp.gate_up_proj", "down": layer + "mlp.down_proj"},
        fused={"qkv": (("q", q), ("k", kv), ("v", kv)),
               "gate_up": (("gate", spec.intermediate), ("up", spec.intermediate))})
    return replace(spec, names=names)


def _gpt2(config, max_len):
    if getattr(config, "add_cross_attention", False):
        raise FrontendError("GPT2Config: add_cross_attention is set (an encoder-decoder); nnforge builds decoder-only "
                            "models")
    if max_len is not None and max_len > config.n_positions:
        raise FrontendError(f"GPT-2 has learned positions for {config.n_positions} tokens (n_positions); "
                            f"max_len {max_len} is longer: use max_len <= {config.n_positions}")
    hidden, heads = config.n_embd, config.n_head
    head_dim = hidden // heads
    inner = config.n_inner if config.n_inner is not None else 4 * hidden

    def scale(i: int) -> float:
        s = head_dim ** -0.5 if config.scale_attn_weights else 1.0
        return s / float(i + 1) if config.scale_attn_by_inverse_layer_idx else s

    tied = bool(config.tie_word_embeddings)
    layer = "transformer.h.{i}."
    names = WeightNames(
        embed="transformer.wte", pos_embed="transformer.wpe", final_norm="transformer.ln_f",
        lm_head="transformer.wte" if tied else "lm_head",
        layer={"attn_norm": layer + "ln_1", "qkv": layer + "attn.c_attn", "o": layer + "attn.c_proj",
               "mlp_norm": layer + "ln_2", "up": layer + "mlp.c_fc", "down": layer + "mlp.c_proj"},
        fused={"qkv": (("q", hidden), ("k", hidden), ("v", hidden))}, conv1d=True)
    return DecoderSpec(
        family="gpt2", architecture="GPT2LMHeadModel", num_layers=config.n_layer, hidden=hidden, heads=heads,
        kv_heads=heads, head_dim=head_dim, intermediate=inner, vocab=config.vocab_size, max_len=max_len,
        max_positions=config.n_positions, norm="layer", norm_eps=float(config.layer_norm_epsilon), norm_offset=0.0,
        norm_bias=True, qk_norm=False, post_norms=False, mlp="plain",
        activation=_activation(config, "activation_function"), qkv_bias=True, o_bias=True, mlp_bias=True,
        positions="learned", layers=_layers(config, ["full_attention"] * config.n_layer, {}, scale, {}),
        tied_embeddings=tied, embed_scale=1.0, attn_softcap=0.0, logit_softcap=0.0, names=names)


# transformers model_type -> the family's function; "gemma3" is the multimodal config, read for its text model
FAMILIES = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2,
            "gemma3_text": _gemma3, "gemma3": _gemma3, "phi3": _phi3, "gpt2": _gpt2}

__all__ = ["DecoderSpec", "LayerSpec", "RopeSpec", "WeightNames", "spec_from_config", "family_of", "FAMILIES",
           "KNOWN_FAMILIES", "ACTIVATIONS", "LAYER_ROLES"]

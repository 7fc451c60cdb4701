"""DecoderSpec of every family against the transformers module built from the same config: its
rotary inv_freq / attention_scaling (and the cos/sin it makes), layer types and windows, head_dim,
attention scales, norms, embedding scale, MLP (names, fused splits, activation, biases), tied head;
and each refusal."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnforge.frontend import FrontendError
from nnforge.frontend.decoders.spec import KNOWN_FAMILIES, family_of, spec_from_config

from .families import CASES, FAMILY_OF_CASE, tiny_config, tiny_model

ALL_CASES = [*CASES, "gemma3-multimodal"]
ACT = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


@pytest.fixture(scope="module", params=ALL_CASES)
def case(request):
    model = tiny_model(request.param)
    return request.param, model, spec_from_config(model.config, max_len=64)


def text_model(model):
    """The decoder stack inside a causal LM (GPT-2's transformer, Gemma 3 multimodal's language_model)."""
    if hasattr(model, "transformer"):
        return model.transformer
    return getattr(model.model, "language_model", model.model)


def blocks(model):
    base = text_model(model)
    return base.h if hasattr(base, "h") else base.layers


def attention(block):
    return block.self_attn if hasattr(block, "self_attn") else block.attn


def linear(sd, spec, role, i, x):
    """What the builder's linear node for ``role`` of layer ``i`` computes, fused roles split."""
    n = spec.names
    for fused, parts in n.fused.items():
        if role in dict(parts):
            out = linear(sd, spec, fused, i, x)
            sizes = [rows for _, rows in parts]
            return dict(zip([r for r, _ in parts], out.split(sizes, dim=-1)))[role]
    w = sd[n.weight(role, i)]
    b = sd[n.bias(role, i)] if spec._has_bias(role) else None
    return F.linear(x, w.t() if n.conv1d else w, b)


def norm(spec, x, weight, bias=None):
    if spec.norm == "layer":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, spec.norm_eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.norm_eps) * (spec.norm_offset + weight)


def test_family_and_architecture(case):
    name, model, spec = case
    assert spec.family == FAMILY_OF_CASE[name]
    assert spec.architecture == type(model).__name__


def test_weight_keys_are_the_text_models_state_dict(case):
    name, model, spec = case
    sd = model.state_dict()
    text = {k for k in sd if not k.startswith(("model.vision_tower", "model.multi_modal_projector"))}
    tied = model.lm_head.weight.data_ptr() == text_model(model).get_input_embeddings().weight.data_ptr()
    assert spec.tied_embeddings == tied
    assert set(spec.weight_keys()) == text - ({"lm_head.weight"} if tied else set())
    assert len(spec.weight_keys()) == len(set(spec.weight_keys()))
    assert torch.equal(sd[spec.names.weight("lm_head")], model.lm_head.weight)


def test_sizes_match_the_module(case):
    name, model, spec = case
    config = model.config.get_text_config()
    assert spec.num_layers == len(blocks(model)) == len(spec.layers)
    assert spec.hidden == config.hidden_size and spec.vocab == config.vocab_size
    assert spec.heads == config.num_attention_heads
    for block in blocks(model):
        attn = attention(block)
        assert attn.head_dim == spec.head_dim
        assert getattr(attn, "num_key_value_groups", 1) == spec.heads // spec.kv_heads
    sd = model.state_dict()
    for role, parts in spec.names.fused.items():
        w = sd[spec.names.weight(role, 0)]
        assert sum(rows for _, rows in parts) == (w.shape[1] if spec.names.conv1d else w.shape[0])
    if "qkv" in spec.names.fused:
        assert dict(spec.names.fused["qkv"])["q"] == spec.heads * spec.head_dim


def test_layer_types_windows_and_scales(case):
    name, model, spec = case
    config = model.config.get_text_config()
    for i, (block, layer) in enumerate(zip(blocks(model), spec.layers)):
        attn = attention(block)
        assert layer.index == i
        assert layer.scale == attn.scaling
        # Qwen/Gemma keep the layer's window; Mistral and Phi-3 pass config.sliding_window to every layer
        want = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
        assert layer.window == (want or 0)
        if hasattr(config, "layer_types") and spec.family not in ("mistral", "phi3"):
            assert layer.attention == config.layer_types[i]
        assert (layer.attention == "sliding_attention") == bool(layer.window)


@pytest.mark.parametrize("max_len", [16, 64])
def test_rope_is_what_the_module_computes_at_that_length(max_len):
    """inv_freq, attention_scaling and the cos/sin they make, once transformers has seen a sequence
    of max_len tokens (dynamic grows past max_position_embeddings, longrope switches to long factors)."""
    for name in ALL_CASES:
        model = tiny_model(name)
        spec = spec_from_config(model.config, max_len=max_len)
        rotary = getattr(text_model(model), "rotary_emb", None)
        if rotary is None:
            assert spec.positions == "learned" and all(layer.rope is None for layer in spec.layers)
            assert spec.names.pos_embed and spec.max_positions == model.config.n_positions
            continue
        positions = torch.arange(max_len)[None]
        x = torch.zeros(1, max_len, spec.hidden)
        for layer in spec.layers:
            per_type = isinstance(rotary.rope_type, dict)
            kwargs = {"layer_type": layer.attention} if per_type else {}
            cos, sin = rotary(x, positions, **kwargs)
            prefix = f"{layer.attention}_" if per_type else ""
            inv_freq, scale = getattr(rotary, prefix + "inv_freq"), getattr(rotary, prefix + "attention_scaling")
            # longrope keeps both tables; the long one is what a call past switch_at uses
            rope = layer.rope
            table = rope.long_inv_freq if rope.long_inv_freq is not None and max_len > rope.switch_at else rope.inv_freq
            assert torch.equal(table, inv_freq), (name, layer.index)
            assert layer.rope.scale == scale and layer.rope.rotary_dim == cos.shape[-1]
            assert layer.rope.style == "half"
            freqs = positions[..., None].float() * table
            emb = torch.cat((freqs, freqs), dim=-1)
            assert torch.equal(emb.cos() * layer.rope.scale, cos) and torch.equal(emb.sin() * layer.rope.scale, sin)


def test_rope_types_and_thetas():
    spec = spec_from_config(tiny_config("gemma3"), max_len=64)
    local, full = spec.layers[0].rope, spec.layers[1].rope
    assert (local.rope_type, local.theta, full.rope_type, full.theta) == ("default", 10000.0, "linear", 1000000.0)
    assert all(layer.rope is (local if layer.attention == "sliding_attention" else full) for layer in spec.layers)
    phi3 = spec_from_config(tiny_config("phi3"), max_len=64).layers[0].rope
    assert phi3.rope_type == "longrope" and phi3.rotary_dim == 8 and phi3.scale > 1.0
    assert spec_from_config(tiny_config("llama"), max_len=64).layers[0].rope.rope_type == "llama3"


def test_norms_and_embedding_scale(case):
    name, model, spec = case
    base, sd = text_model(model), model.state_dict()
    x = torch.randn(2, 5, spec.hidden)
    n = spec.names
    bias = sd[n.bias("final_norm")] if spec.norm_bias else None
    torch.testing.assert_close(norm(spec, x, sd[n.weight("final_norm")], bias), (base.ln_f if spec.norm == "layer"
                                                                                  else base.norm)(x))
    for i, block in enumerate(blocks(model)):
        bias = sd[n.bias("attn_norm", i)] if spec.norm_bias else None
        first = block.ln_1 if spec.norm == "layer" else block.input_layernorm
        torch.testing.assert_close(norm(spec, x, sd[n.weight("attn_norm", i)], bias), first(x))
        attn = attention(block)
        assert spec.qk_norm == hasattr(attn, "q_norm")
        if spec.qk_norm:
            heads = torch.randn(2, spec.heads, 5, spec.head_dim)
            torch.testing.assert_close(norm(spec, heads, sd[n.weight("q_norm", i)]), attn.q_norm(heads))
        assert spec.post_norms == hasattr(block, "post_feedforward_layernorm")
        if spec.post_norms:
            torch.testing.assert_close(norm(spec, x, sd[n.weight("post_mlp_norm", i)]), block.post_feedforward_layernorm(x))
    ids = torch.tensor([[0, 5, 17, spec.vocab - 1]])
    embed = base.get_input_embeddings()
    want = sd[n.weight("embed")][ids] * torch.tensor(spec.embed_scale, dtype=torch.float32)
    assert torch.equal(embed(ids), want)


def test_mlp_from_names_matches_the_module(case):
    name, model, spec = case
    sd = model.state_dict()
    x = torch.randn(2, 5, spec.hidden)
    act = ACT[spec.activation]
    for i, block in enumerate(blocks(model)):
        if spec.mlp == "gated":
            hidden = act(linear(sd, spec, "gate", i, x)) * linear(sd, spec, "up", i, x)
        else:
            hidden = act(linear(sd, spec, "up", i, x))
        out = linear(sd, spec, "down", i, hidden)
        torch.testing.assert_close(out, block.mlp(x), rtol=1e-5, atol=1e-6)
        assert hidden.shape[-1] == spec.intermediate


def test_biases_follow_the_module(case):
    name, model, spec = case
    block = blocks(model)[0]
    attn = attention(block)
    qkv = attn.q_proj if hasattr(attn, "q_proj") else attn.qkv_proj if hasattr(attn, "qkv_proj") else attn.c_attn
    out = attn.o_proj if hasattr(attn, "o_proj") else attn.c_proj
    assert spec.qkv_bias == (qkv.bias is not None) and spec.o_bias == (out.bias is not None)
    down = block.mlp.down_proj if hasattr(block.mlp, "down_proj") else block.mlp.c_proj
    assert spec.mlp_bias == (down.bias is not None)


def test_softcaps():
    gemma2 = spec_from_config(tiny_config("gemma2"))
    assert (gemma2.attn_softcap, gemma2.logit_softcap) == (50.0, 30.0)
    assert spec_from_config(tiny_config("llama")).attn_softcap == 0.0


def test_gemma3_attention_takes_no_softcap():
    """transformers' Gemma 3 attention passes no softcap, whatever the config says: the spec's 0 is right."""
    ids = torch.tensor([[1, 7, 9, 30, 4, 100]])
    capped, plain = tiny_model("gemma3", attn_logit_softcapping=0.5), tiny_model("gemma3", attn_logit_softcapping=None)
    plain.load_state_dict(capped.state_dict())
    with torch.no_grad():
        assert torch.equal(capped(ids).logits, plain(ids).logits)
    assert spec_from_config(capped.config).attn_softcap == 0.0


def test_gemma3_multimodal_config_gives_its_text_model():
    from .families import gemma3_multimodal_config
    both, text = spec_from_config(gemma3_multimodal_config(), 64), spec_from_config(tiny_config("gemma3"), 64)
    assert both.names.weight("q", 2) == "model.language_model.layers.2.self_attn.q_proj.weight"
    assert both.names.weight("lm_head") == "model.language_model.embed_tokens.weight"
    assert (both.family, both.architecture) == ("gemma3", "Gemma3ForConditionalGeneration")
    skip = {"architecture", "names", "layers", "tied_embeddings"}
    assert {k: v for k, v in vars(both).items() if k not in skip} == {k: v for k, v in vars(text).items() if k not in skip}


def test_llama_and_gemma_name_the_mlp_norm_differently():
    llama, gemma = spec_from_config(tiny_config("llama")).names, spec_from_config(tiny_config("gemma2")).names
    assert llama.module("mlp_norm", 1) == "model.layers.1.post_attention_layernorm"
    assert gemma.module("mlp_norm", 1) == "model.layers.1.pre_feedforward_layernorm"
    assert gemma.module("post_attn_norm", 1) == "model.layers.1.post_attention_layernorm"
    assert "post_attn_norm" not in llama.layer


# ---- refusals ----------------------------------------------------------------------------------

def test_unknown_family_is_named_with_the_known_ones():
    from transformers import BertConfig
    with pytest.raises(FrontendError, match=r"config.json: architecture BertForMaskedLM \(model_type 'bert'\) is not") as e:
        family_of(BertConfig(architectures=["BertForMaskedLM"]), where="config.json")
    assert KNOWN_FAMILIES in str(e.value)
    with pytest.raises(FrontendError, match="BertConfig"):
        spec_from_config(BertConfig())


def test_unknown_activation_is_refused():
    with pytest.raises(FrontendError, match=r"LlamaConfig.hidden_act = 'quick_gelu'.*silu"):
        spec_from_config(tiny_config("llama", hidden_act="quick_gelu"))


def test_gpt2_max_len_is_bounded_by_its_learned_positions():
    assert spec_from_config(tiny_config("gpt2"), max_len=64).max_len == 64
    with pytest.raises(FrontendError, match="learned positions for 64 tokens.*max_len 65"):
        spec_from_config(tiny_config("gpt2"), max_len=65)


def test_bidirectional_gemma_is_refused():
    with pytest.raises(FrontendError, match="use_bidirectional_attention"):
        spec_from_config(tiny_config("gemma3", use_bidirectional_attention=True))


def test_bad_max_len_heads_and_rope_are_refused():
    with pytest.raises(FrontendError, match="max_len must be a positive"):
        spec_from_config(tiny_config("llama"), max_len=0)
    config = tiny_config("qwen3")
    config.num_key_value_heads = 3
    with pytest.raises(FrontendError, match="4 attention heads are not a multiple of 3"):
        spec_from_config(config)
    config = tiny_config("llama-linear")
    config.rope_parameters["rope_type"] = "spiral"
    with pytest.raises(FrontendError, match="rope_type 'spiral'"):
        spec_from_config(config)
    config = tiny_config("mistral")
    config.rope_parameters = None
    with pytest.raises(FrontendError, match="no rope_parameters"):
        spec_from_config(config)

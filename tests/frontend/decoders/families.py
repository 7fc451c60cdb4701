"""Small random-init causal LMs of every family nnforge's decoders know (hidden 64, 2-4 layers,
vocab 128), each with the settings that make its family differ: rope scalings, sliding windows,
partial rotary, softcaps, biases, tied heads. Built with transformers in well under a second.

    >>> model = tiny_model("gemma3")          # a Gemma3ForCausalLM, eval mode, weights perturbed
"""
from __future__ import annotations

import torch

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama3_rope() -> dict:
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def _longrope(rotary_dim: int) -> dict:
    half = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 32,
            "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [2.0 + 0.5 * i for i in range(half)]}


# name -> (transformers config class name, its arguments)
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_COMMON, num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=512,
                                  rope_parameters=_llama3_rope(), attention_bias=True, mlp_bias=True,
                                  tie_word_embeddings=True)),
    "llama-linear": ("LlamaConfig", dict(_COMMON, num_hidden_layers=2, max_position_embeddings=128,
                                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-dynamic": ("LlamaConfig", dict(_COMMON, num_hidden_layers=2, max_position_embeddings=32,
                                          rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-yarn": ("LlamaConfig", dict(_COMMON, num_hidden_layers=2, max_position_embeddings=128, num_key_value_heads=1,
                                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                        "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", dict(_COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=32,
                                      sliding_window=16, max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", dict(_COMMON, num_hidden_layers=3, num_key_value_heads=2, use_sliding_window=True,
                                  sliding_window=16, max_window_layers=1, max_position_embeddings=256)),
    "qwen3": ("Qwen3Config", dict(_COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=32, attention_bias=True,
                                  tie_word_embeddings=True, max_position_embeddings=256)),
    "gemma2": ("Gemma2Config", dict(_COMMON, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                                    query_pre_attn_scalar=24, sliding_window=16, attn_logit_softcapping=50.0,
                                    final_logit_softcapping=30.0, max_position_embeddings=256)),
    "gemma3": ("Gemma3TextConfig", dict(
        _COMMON, num_hidden_layers=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        max_position_embeddings=256)),
    "phi3": ("Phi3Config", dict(_COMMON, num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=128,
                                original_max_position_embeddings=32, rope_parameters=_longrope(8), sliding_window=24)),
    "phi3-plain": ("Phi3Config", dict(_COMMON, num_hidden_layers=2, max_position_embeddings=128)),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                scale_attn_by_inverse_layer_idx=True, bos_token_id=1, eos_token_id=2)),
    "gpt2-untied": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       activation_function="gelu", tie_word_embeddings=False,
                                       bos_token_id=1, eos_token_id=2)),
}
FAMILY_OF_CASE = {name: name.split("-")[0] for name in [*CASES, "gemma3-multimodal"]}


def tiny_config(name: str, **changes):
    import transformers
    cls, kwargs = CASES[name]
    kwargs = dict(kwargs, **changes)
    if "rope_parameters" in kwargs:       # configs keep (and standardise) the dict they are given
        import copy
        kwargs["rope_parameters"] = copy.deepcopy(kwargs["rope_parameters"])
    return getattr(transformers, cls)(**kwargs)


def gemma3_multimodal_config():
    """A Gemma3Config (text + a one-layer SigLIP): its text model is the "gemma3" case's."""
    import transformers
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    return transformers.Gemma3Config(text_config=tiny_config("gemma3").to_dict(), vision_config=vision,
                                     mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                                     image_token_index=VOCAB - 1)


def tiny_model(name: str, seed: int = 0, **changes):
    """The case's causal LM, random-init, with every parameter perturbed so that zero-initialised
    norm weights (Gemma's) and biases count."""
    from transformers import AutoModelForCausalLM
    config = gemma3_multimodal_config() if name == "gemma3-multimodal" else tiny_config(name, **changes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_tokenizer():
    """A word-level fast tokenizer over VOCAB tokens, made here (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def llama_directory(root, words: int = 1200, seed: int = 0, **changes):
    """``root`` holding the tiny Llama (its config with ``changes``) and its tokenizer as a
    transformers model directory (``model/``) and ``calib.txt``: ``words`` seeded random words of
    its vocabulary."""
    import random
    from pathlib import Path
    root = Path(root)
    tiny_model("llama", **changes).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    r = random.Random(seed)
    (root / "calib.txt").write_text(" ".join(f"w{r.randrange(4, 128)}" for _ in range(words)))
    return root

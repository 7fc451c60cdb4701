"""A Llama-shaped model directory as a user brings one, written without transformers holding it:
config.json, random float32 weights in sharded safetensors (one layer in memory at a time) with
their index, and a byte-level BPE tokenizer trained here on the reference text.

    >>> write_llama(tmp_path / "llama-1b", **LLAMA_1B)        # about 1.1B parameters, 4.4 GB
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# TinyLlama's shape: hidden 2048, 22 layers, grouped-query attention (32 heads, 4 KV heads)
LLAMA_1B = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)


def llama_parameters(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> int:
    d = hidden // heads
    per_layer = hidden * d * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


def write_llama(path: Path, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                shard_bytes: int = 1 << 30, seed: int = 0) -> Path:
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
                  intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(seed)
    d = hidden // heads

    def tensors():
        yield "model.embed_tokens.weight", torch.randn(vocab, hidden, generator=gen) * 0.02
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", torch.ones(hidden)
            yield p + "post_attention_layernorm.weight", torch.ones(hidden)
            shapes = (("self_attn.q_proj", heads * d, hidden), ("self_attn.k_proj", kv_heads * d, hidden),
                      ("self_attn.v_proj", kv_heads * d, hidden), ("self_attn.o_proj", hidden, heads * d),
                      ("mlp.gate_proj", intermediate, hidden), ("mlp.up_proj", intermediate, hidden),
                      ("mlp.down_proj", hidden, intermediate))
            for name, rows, cols in shapes:
                # scaled like a trained layer's: activations keep their size through the blocks
                yield p + name + ".weight", torch.randn(rows, cols, generator=gen) / cols ** 0.5
        yield "model.norm.weight", torch.ones(hidden)
        yield "lm_head.weight", torch.randn(vocab, hidden, generator=gen) * 0.02

    weight_map, shard, size = {}, {}, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for key, t in tensors():
        shard[key], size = t, size + t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    write_tokenizer(path)
    return path


def write_tokenizer(path: Path, vocab: int = 4000) -> None:
    """tokenizer.json (byte-level BPE of ``vocab`` tokens, trained on the reference text's calibration
    part) and a tokenizer_config.json naming it, as transformers reads them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    from nnforge.models.llm import text_split
    calib, _ = text_split()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([calib[:200_000]], trainers.BpeTrainer(vocab_size=vocab,
                                                                   special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))

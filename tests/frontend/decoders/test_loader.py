"""load_causal_lm: a transformers module object, a directory written by save_pretrained (one
safetensors file or shards), older checkpoint names, a state dict passed in, and every refusal
(no weights, pickles, unknown architecture, unreadable config, missing shard or weight, bad
tokenizer, bad GGUF), each naming the file."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from nnforge.frontend import FrontendError
from nnforge.frontend.decoders import load_causal_lm, spec_from_config
from nnforge.frontend.decoders.loader import SafetensorsWeights, _canonical_names

from .families import gemma3_multimodal_config, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")          # tied head, biases, llama3 rope


@pytest.fixture
def llama_dir(tmp_path, llama):
    path = tmp_path / "llama"
    llama.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def assert_same_weights(weights, model):
    spec = spec_from_config(model.config)
    sd = model.state_dict()
    for key in spec.weight_keys():
        assert torch.equal(weights[key], sd[key]), key


def test_module_object(llama):
    config, weights, tokenizer, source = load_causal_lm(llama)
    assert config is llama.config and tokenizer is None
    assert source == "transformers LlamaForCausalLM object"
    key = "model.layers.1.self_attn.q_proj.weight"
    # copied when read: the graph must not change when the caller goes on training its module
    assert weights[key].data_ptr() != llama.model.layers[1].self_attn.q_proj.weight.data_ptr()
    assert_same_weights(weights, llama)


def test_module_object_finds_the_tokenizer_of_its_directory(llama_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(llama_dir, local_files_only=True)
    loaded = load_causal_lm(model)
    assert loaded.tokenizer("w5 w9").input_ids == [5, 9]
    assert loaded.source.endswith(f"tokenizer from {llama_dir}")


def test_directory(llama_dir, llama):
    config, weights, tokenizer, source = load_causal_lm(llama_dir)
    assert config.model_type == "llama" and config.rope_parameters == llama.config.rope_parameters
    assert isinstance(weights, SafetensorsWeights) and [f.name for f in weights.files] == ["model.safetensors"]
    assert "lm_head.weight" not in weights          # tied: the spec reads the embedding instead
    assert_same_weights(weights, llama)
    assert tokenizer("w5 w9 w127").input_ids == [5, 9, 127]
    assert source.startswith(f"{llama_dir} (1 safetensors file(s); tokenizer: tokenizer.json")


def test_sharded_directory(tmp_path):
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, weights, tokenizer, source = load_causal_lm(tmp_path)
    assert len(weights.files) > 2 and tokenizer is None and "tokenizer: none" in source
    assert_same_weights(weights, model)
    assert weights.file_of("model.norm.weight").name.startswith("model-")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_a_bfloat16_checkpoint_is_widened_into_mapped_files_not_memory(tmp_path, monkeypatch):
    """Half-precision tensors come out as float32 views of temporary files (unlinked once mapped),
    each made once, so a bfloat16 checkpoint is not held in memory at twice its size."""
    from nnforge.frontend.decoders import loader
    monkeypatch.setattr(loader, "WIDEN_IN_MEMORY_BELOW", 0)
    monkeypatch.setattr(loader, "WIDENED_DIR", str(tmp_path))
    model = tiny_model("qwen3").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    weights = load_causal_lm(tmp_path / "m").weights
    key = "model.layers.1.mlp.down_proj.weight"
    t = weights[key]
    assert t.dtype == torch.float32 and torch.equal(t, model.state_dict()[key].float())
    assert weights[key] is t                                     # widened once
    maps = [line.split() for line in open("/proc/self/maps") if "nnforge-widened-" in line]
    assert any(int(m[0].split("-")[0], 16) <= t.data_ptr() < int(m[0].split("-")[1], 16) and m[-1] == "(deleted)"
               for m in maps)
    assert not list(tmp_path.glob("nnforge-widened-*"))         # unlinked: the mapping holds the pages

    # a directory that cannot take the file: an ordinary copy, the same values
    monkeypatch.setattr(loader, "WIDENED_DIR", str(tmp_path / "no-such-dir"))
    t = loader.widened(model.state_dict()[key])
    assert t.dtype == torch.float32 and torch.equal(t, model.state_dict()[key].float())
    assert not any(a <= t.data_ptr() < b for a, b in [tuple(int(x, 16) for x in m[0].split("-")) for m in maps])


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma2", "gemma3", "gemma3-multimodal", "phi3", "gpt2-untied"])
def test_every_family_round_trips_through_a_directory(tmp_path, name):
    """(Gemma3ForConditionalGeneration writes its text weights as language_model.model.*)"""
    model = tiny_model(name)
    model.save_pretrained(tmp_path)
    config, weights, _, _ = load_causal_lm(tmp_path)
    assert type(config) is type(model.config)
    assert_same_weights(weights, model)


def test_gpt2_checkpoint_without_its_base_prefix(tmp_path):
    """GPT-2's own checkpoints name h.0.attn... where the module has transformer.h.0.attn..."""
    model = tiny_model("gpt2")
    model.config.save_pretrained(tmp_path)
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 4, 4)        # an old causal-mask buffer keeps its own name
    save_file(sd, tmp_path / "model.safetensors")
    _, weights, _, _ = load_causal_lm(tmp_path)
    assert_same_weights(weights, model)
    assert "h.0.attn.bias" in weights and "transformer.h.0.attn.bias" not in weights


def test_gemma3_multimodal_checkpoint_names():
    expected = set(spec_from_config(gemma3_multimodal_config()).weight_keys())
    old = ["language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.embed_tokens.weight",
           "language_model.lm_head.weight", "vision_tower.vision_model.post_layernorm.weight"]
    names = _canonical_names(old, expected)
    assert names["model.language_model.layers.0.self_attn.q_proj.weight"] == old[0]
    assert names["model.language_model.embed_tokens.weight"] == old[1]
    assert names["vision_tower.vision_model.post_layernorm.weight"] == old[3]


def test_gemma3_multimodal_module(tmp_path):
    model = tiny_model("gemma3-multimodal")
    config, weights, _, _ = load_causal_lm(model)
    assert config.model_type == "gemma3"
    assert_same_weights(weights, model)


# ---- pickles and state dicts -----------------------------------------------------------------------

def test_pickled_weights_are_refused_and_a_state_dict_is_taken(tmp_path, llama):
    llama.config.save_pretrained(tmp_path)
    torch.save(llama.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FrontendError, match=rf"{tmp_path}: its weights are in pytorch_model.bin, a pickle.*"
                                            "safetensors only.*state_dict="):
        load_causal_lm(tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    _, weights, _, source = load_causal_lm(tmp_path, state_dict=state)
    assert_same_weights(weights, llama)
    assert "tensors passed as state_dict" in source


# ---- refusals ----------------------------------------------------------------------------------------

def test_no_such_path(tmp_path):
    with pytest.raises(FrontendError, match=rf"{tmp_path}/nope: no such file or directory.*downloads nothing"):
        load_causal_lm(tmp_path / "nope")


def test_not_a_model_object_or_file(tmp_path):
    with pytest.raises(FrontendError, match="Linear is not a transformers model"):
        load_causal_lm(torch.nn.Linear(2, 2))
    with pytest.raises(FrontendError, match="cannot read a causal LM from a int"):
        load_causal_lm(3)
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(FrontendError, match=r"model.onnx: not a model nnforge reads as a causal LM"):
        load_causal_lm(tmp_path / "model.onnx")


def test_directory_without_config(tmp_path):
    with pytest.raises(FrontendError, match=rf"{tmp_path}: no config.json, so not a transformers model directory$"):
        load_causal_lm(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(FrontendError, match=r"holds 2 .gguf files \(a.gguf, b.gguf\): pass one"):
        load_causal_lm(tmp_path)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FrontendError, match=rf"{tmp_path}/config.json: not a readable config \(JSONDecodeError"):
        load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": "four"}))
    with pytest.raises(FrontendError, match=rf"{tmp_path}/config.json: transformers cannot read this config"):
        load_causal_lm(tmp_path)


@pytest.mark.parametrize("raw", [{"model_type": "bert", "architectures": ["BertForMaskedLM"]},
                                 {"model_type": "no-such-model", "architectures": ["NoSuchForCausalLM"]}])
def test_unknown_architecture_is_named_with_the_known_families(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    arch = raw["architectures"][0]
    with pytest.raises(FrontendError, match=rf"config.json: architecture {arch} \(model_type '{raw['model_type']}'\) "
                                            r"is not a decoder family nnforge knows; it knows Llama, Mistral"):
        load_causal_lm(tmp_path)


def test_no_weights(tmp_path, llama):
    llama.config.save_pretrained(tmp_path)
    with pytest.raises(FrontendError, match=rf"{tmp_path}: no weights \(no model.safetensors and no "
                                            r"model.safetensors.index.json\)"):
        load_causal_lm(tmp_path)


def test_missing_weight_is_named(tmp_path, llama):
    llama.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in llama.state_dict().items()
          if k not in ("model.layers.1.mlp.down_proj.weight", "lm_head.weight")}
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(FrontendError, match=r"\(1 safetensors file\(s\)\): 1 weight\(s\) the llama decoder needs are "
                                            r"missing \(model.layers.1.mlp.down_proj.weight\); nnforge reads the "
                                            "weights of a LlamaForCausalLM"):
        load_causal_lm(tmp_path)


def test_base_model_object_lacks_the_head():
    from transformers import AutoModel
    base = AutoModel.from_config(tiny_model("qwen2").config)
    with pytest.raises(FrontendError, match=r"Qwen2Model: \d+ weight\(s\) .* missing .*reads the weights of a "
                                            "Qwen2ForCausalLM"):
        load_causal_lm(base)


def test_missing_shard_and_bad_index(tmp_path):
    tiny_model("qwen3").save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FrontendError, match=rf"model.safetensors.index.json lists shard\(s\) that are not there: "
                                            rf"{shard.name}"):
        load_causal_lm(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(FrontendError, match="model.safetensors.index.json: not a readable safetensors index"):
        load_causal_lm(tmp_path)


def test_corrupt_safetensors(tmp_path, llama):
    llama.config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(FrontendError, match=rf"{tmp_path}/model.safetensors: not a readable safetensors file"):
        load_causal_lm(tmp_path)


def test_missing_tokenizer_is_allowed_and_a_broken_one_named(llama_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (llama_dir / name).unlink()
    assert load_causal_lm(llama_dir).tokenizer is None
    (llama_dir / "tokenizer.json").write_text("{broken")
    with pytest.raises(FrontendError, match=rf"{llama_dir}: transformers cannot read the tokenizer \(tokenizer.json\)"):
        load_causal_lm(llama_dir)


def test_gguf_needs_its_packages(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(FrontendError, match=r"m.gguf: reading a GGUF file needs the gguf package\(s\): pip install "
                                            r"'nnforge\[models\]'"):
        load_causal_lm(tmp_path / "m.gguf")


def test_bad_gguf_file(tmp_path):
    pytest.importorskip("gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(FrontendError, match=rf"{tmp_path}/m.gguf: not a readable GGUF file"):
        load_causal_lm(tmp_path)                 # a directory holding one .gguf reads it


# ---- GGUF files (small ones written here; the real model is in test_gemma3_270m.py) ---------------

def write_tiny_llama_gguf(path, *, tokenizer: bool = True, arch: str = "llama"):
    """A 2-layer llama GGUF in float32 with an SPM vocabulary, as llama.cpp lays it out."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    hidden, layers, inner, heads, kv, vocab = 64, 2, 128, 4, 2, 128
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_block_count(layers)
    w.add_feed_forward_length(inner)
    w.add_embedding_length(hidden)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    if tokenizer:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>"] + [f"\u2581w{i}" for i in range(3, vocab)])
        w.add_token_scores([0.0] * vocab)
        w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv * 16, hidden),
                   f"blk.{i}.attn_v.weight": (kv * 16, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                   f"blk.{i}.ffn_gate.weight": (inner, hidden), f"blk.{i}.ffn_up.weight": (inner, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, inner)}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_file(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    config, weights, tokenizer, source = load_causal_lm(path)
    assert config.model_type == "llama" and (config.num_hidden_layers, config.num_key_value_heads) == (2, 2)
    assert source == f"{path} (GGUF dequantised to float32 by transformers {__import__('transformers').__version__}; " \
                     "tokenizer: from the GGUF)"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", local_files_only=True)
    assert_same_weights(weights, model)
    assert weights["model.embed_tokens.weight"].dtype == torch.float32
    assert load_causal_lm(tmp_path).config.to_dict() == config.to_dict()        # the one .gguf of a directory


def test_gguf_without_tokenizer(tmp_path):
    _, _, tokenizer, source = load_causal_lm(write_tiny_llama_gguf(tmp_path / "tiny.gguf", tokenizer=False))
    assert tokenizer is None and source.endswith("tokenizer: none)")


def test_gguf_keys_are_gguf_readers():
    """the metadata keys read by stepping over values are the ones gguf's reader parses"""
    pytest.importorskip("gguf")
    from gguf import GGUFReader
    from nnforge.frontend.decoders.loader import _gguf_keys
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        path = write_tiny_llama_gguf(Path(d) / "tiny.gguf")
        fields = [k for k in GGUFReader(str(path)).fields if not k.startswith("GGUF.")]
        assert _gguf_keys(path) == fields
        assert _gguf_keys(path, until="tokenizer.ggml.model")[-1] == "tokenizer.ggml.model"


def test_gguf_architecture_transformers_does_not_read(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "odd.gguf", arch="nosuch")
    with pytest.raises(FrontendError, match=rf"{path}: transformers cannot load this GGUF file \(ValueError: GGUF model "
                                            "with architecture nosuch is not supported"):
        load_causal_lm(path)

"""benchmarks/llm_peers.py: the sliding-window perplexity and the greedy timing every peer shares,
checked on hand-made logits; the peers' own wiring on tiny stand-ins (no real model is built)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "llm_peers.py"
_spec = importlib.util.spec_from_file_location("llm_peers", _PATH)
lp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lp)

VOCAB = 7


def test_uniform_logits_give_the_vocabulary_size_and_score_each_token_once():
    # a window's first token is never scored (no logits before it), so windows that do not overlap
    # (stride == window) leave one token per window out, as Hugging Face's recipe does
    for n, window, stride, scored_want in [(10, 4, 2, 9), (10, 4, 4, 7), (9, 10, 5, 8), (2, 2, 1, 1), (11, 3, 1, 10)]:
        ppl, scored = lp.sliding_window_perplexity([k % VOCAB for k in range(n)], window, stride,
                                                   lambda chunk: np.zeros((len(chunk), VOCAB), np.float32))
        assert scored == scored_want
        assert ppl == pytest.approx(VOCAB, rel=1e-12)


def _context_logits(chunk):
    """Row i puts log-weight (tokens of context seen) on the token that follows, so the score of a
    token tells how much context its window gave it."""
    rows = np.zeros((len(chunk), VOCAB), np.float32)
    for i in range(len(chunk) - 1):
        rows[i, chunk[i + 1]] = i + 1
    return rows


def _expected(ids, contexts):
    """Perplexity when token k was scored with contexts[k] tokens before it in its window."""
    nll = 0.0
    for k, c in contexts.items():
        logits = np.zeros(VOCAB)
        logits[ids[k]] = c
        nll -= logits[ids[k]] - math.log(np.exp(logits).sum())
    return math.exp(nll / len(contexts))


def test_each_window_scores_only_the_tokens_the_previous_one_did_not_with_its_own_context():
    ids = [3, 1, 4, 1, 5, 2, 6, 5, 3, 5]
    # window 4, stride 2: windows [0:4], [2:6], [4:8], [6:10]; the first scores 1..3 with 1..3 tokens
    # of context, each later one its last two tokens with 2 and 3 tokens before them in the window
    contexts = {1: 1, 2: 2, 3: 3, 4: 2, 5: 3, 6: 2, 7: 3, 8: 2, 9: 3}
    ppl, scored = lp.sliding_window_perplexity(ids, 4, 2, _context_logits)
    assert scored == 9
    assert ppl == pytest.approx(_expected(ids, contexts), rel=1e-12)
    # window 5, stride 3: [0:5], [3:8], then a shorter last window [6:10] that scores only 8 and 9
    contexts = {1: 1, 2: 2, 3: 3, 4: 4, 5: 2, 6: 3, 7: 4, 8: 2, 9: 3}
    ppl, scored = lp.sliding_window_perplexity(ids, 5, 3, _context_logits)
    assert scored == 9
    assert ppl == pytest.approx(_expected(ids, contexts), rel=1e-12)


def test_the_log_softmax_is_taken_in_float64_across_row_slices():
    rng = np.random.default_rng(0)
    ids = list(rng.integers(0, 50, 100))
    table = (rng.standard_normal((100, 50)) * 30).astype(np.float32)    # large logits: float32 would drift
    ppl, scored = lp.sliding_window_perplexity(ids, 100, 100, lambda chunk: table[:len(chunk)])
    x = table[:-1].astype(np.float64)
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    assert scored == 99
    assert ppl == pytest.approx(math.exp(-(x[np.arange(99), ids[1:]] - lse).mean()), rel=1e-12)


@pytest.mark.parametrize("window, stride, n, what", [(1, 1, 5, "window 1"), (4, 5, 5, "stride 5"),
                                                     (4, 0, 5, "stride 0"), (4, 2, 1, "1 token")])
def test_bad_windows_are_refused_naming_the_value(window, stride, n, what):
    with pytest.raises(ValueError, match=what):
        lp.sliding_window_perplexity(list(range(n)), window, stride, _context_logits)


def test_logits_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="one row of logits per token"):
        lp.sliding_window_perplexity([1, 2, 3], 3, 3, lambda chunk: np.zeros((1, VOCAB)))
    with pytest.raises(ValueError, match="token id 9 .* 7 logits"):
        lp.sliding_window_perplexity([1, 9, 3], 3, 3, lambda chunk: np.zeros((3, VOCAB)))


def test_greedy_speed_feeds_back_the_argmax_and_times_only_decode_calls():
    calls = []

    def prefill(ids):
        calls.append(("prefill", list(ids)))
        return np.eye(VOCAB)[len(ids) % VOCAB]

    def step(token):
        calls.append(("step", token))
        return np.eye(VOCAB)[(token + 1) % VOCAB]

    out = lp.greedy_speed(prefill, step, [0, 1, 2], 4, warmup=False)
    assert out["tokens"] == [3, 4, 5, 6]
    assert calls == [("prefill", [0, 1, 2]), ("step", 3), ("step", 4), ("step", 5), ("step", 6)]
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    with pytest.raises(ValueError, match="at least one of each"):
        lp.greedy_speed(prefill, step, [], 4)


def test_torch_eager_matches_its_module_on_a_tiny_random_llama():
    transformers = pytest.importorskip("transformers")
    import torch
    config = transformers.LlamaConfig(vocab_size=VOCAB * 5, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    module = transformers.AutoModelForCausalLM.from_config(config).eval()

    class Loaded:
        pass
    loaded = Loaded()
    loaded.config, loaded.weights = config, module.state_dict()
    peer = lp.TorchEager(loaded, threads=1)
    ids = list(range(3, 23))
    ppl, scored = peer.perplexity(ids, 20, 20)
    with torch.no_grad():
        loss = module(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert scored == 19 and ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)
    with torch.no_grad():
        want = module.generate(torch.tensor([ids[:6]]), max_new_tokens=5, do_sample=False)[0, 6:].tolist()
    assert peer.speed(ids[:6], 5)["tokens"] == want


def test_f32_gguf_copy_keeps_metadata_and_dequantises(tmp_path):
    gguf = pytest.importorskip("gguf")
    src = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(src, "llama")
    writer.add_block_count(1)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    weight = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
    writer.add_tensor("blk.0.ffn_up.weight", gguf.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = lp.write_f32_gguf(src, tmp_path / "tiny-f32.gguf")
    reader = gguf.GGUFReader(out)
    assert reader.fields["llama.block_count"].contents() == 1
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    got = np.asarray(tensors["blk.0.ffn_up.weight"].data).reshape(2, 64)
    np.testing.assert_allclose(got, weight, atol=1 / 127)
    assert not list(tmp_path.glob("*.partial"))


def test_peers_whose_package_is_missing_are_named_with_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(lp.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llama_cpp", "onnxruntime_genai") else real(name, *a))
    monkeypatch.setattr(lp, "TorchEager", lambda loaded, threads: "torch")
    peers, skipped = lp.make_peers(None, tmp_path / "model.gguf", tmp_path / "work")
    assert peers == ["torch"]
    assert len(skipped) == 2 and all("nnforge[bench]" in s for s in skipped)


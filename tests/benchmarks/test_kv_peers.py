"""benchmarks/kv_peers.py and its worker: the masks the worker feeds tokens with after a compressed
prefill, checked against one token at a time and against the uncompressed model on a tiny random
Gemma 3; the rows' arithmetic; the venv's stamp and errors. kvpress itself is not installed here
(python benchmarks/kv_peers.py --smoke runs it end to end)."""
from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.benchmarks.bench_modules import load




worker = load("kv_peers_worker")
peers = load("kv_peers")


@pytest.fixture(scope="module")
def runner():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                           "full_attention"], max_position_embeddings=64)
    model = Gemma3ForCausalLM(config).eval()
    return worker.Runner(model, None)


def _evict(cache, runner, keep: list[int]) -> None:
    """What a press leaves: the full-attention layers keep the slots ``keep``."""
    for layer, kind in zip(cache.layers, runner.model.config.layer_types):
        if kind == "full_attention":
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]


def test_one_forward_over_new_tokens_matches_the_uncompressed_model(runner):
    ids = [int(t) for t in torch.randint(0, 64, (14,))]
    with torch.inference_mode():
        whole = runner.model(input_ids=torch.tensor([ids])).logits[0]
        cache, last = runner.prefill(None, ids[:8])
        fed = runner.feed(cache, ids[8:], 8)
    torch.testing.assert_close(last, whole[7], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fed, whole[8:], rtol=1e-4, atol=1e-5)


def test_one_forward_after_eviction_matches_one_token_at_a_time(runner):
    # the sliding layers (window 4) keep their last 3 tokens whole; the full layers keep 5 of 9, so
    # layer 0's cache is longer than theirs, which is what transformers' own masks get wrong
    ids = [int(t) for t in torch.randint(0, 64, (15,))]
    keep = [0, 2, 3, 6, 8]
    with torch.inference_mode():
        cache, _ = runner.prefill(None, ids[:9])
        _evict(cache, runner, keep)
        fed = runner.feed(cache, ids[9:], 9)
        cache, _ = runner.prefill(None, ids[:9])
        _evict(cache, runner, keep)
        steps = torch.stack([runner.feed(cache, [t], 9 + i)[0] for i, t in enumerate(ids[9:])])
    torch.testing.assert_close(fed, steps, rtol=1e-4, atol=1e-5)


def test_layers_of_one_type_that_keep_different_lengths_are_refused(runner):
    with torch.inference_mode():
        cache, _ = runner.prefill(None, [1, 2, 3, 4, 5])
    layer = cache.layers[1]
    layer.keys, layer.values = layer.keys[:, :, :2], layer.values[:, :, :2]
    with pytest.raises(ValueError, match=r"the full_attention layers keep different numbers of tokens \(\[2, 5\]\)"):
        runner.masks(cache, 5, 1)


def test_a_passkey_case_must_end_with_the_question(runner):
    runner_q = worker.Runner(runner.model, None)
    runner_q.question = [7, 8]
    with pytest.raises(ValueError, match=r"passkey case \(context 5, depth 0.5\): its ids do not end with "
                                         r"kv_tasks.QUESTION's tokens"):
        runner_q.passkey(None, {"ids": [1, 2, 3, 4, 5], "answer": "1", "context": 5, "depth": 0.5}, 4)


def test_a_row_pools_the_continuation_tokens_and_counts_bytes_per_context_token():
    runs = [{"right": True, "text": " 12345", "kept": [4, 2], "bytes": 600, "tokens": 10, "seconds": 1.0},
            {"right": False, "text": " 9", "kept": [4, 4], "bytes": 800, "tokens": 10, "seconds": 2.0},
            {"nll": 3.0, "scored": 2, "kept": [4, 2], "bytes": 1200, "tokens": 20, "seconds": 0.5},
            {"nll": 5.0, "scored": 6, "kept": [4, 2], "bytes": 1200, "tokens": 20, "seconds": 0.5}]
    row = worker._row("SnapKVPress", 0.5, 10, runs, ["passkey: E: x", "passkey: E: x"], torch.float32)
    assert (row["passkey_right"], row["passkey_cases"], row["passkey_accuracy"]) == (1, 2, 0.5)
    assert row["perplexity"] == pytest.approx(math.exp(8.0 / 8))
    assert row["scored_tokens"] == 8 and row["seconds"] == pytest.approx(4.0)
    assert row["bytes_per_token"] == pytest.approx((60 + 80 + 60 + 60) / 4)
    assert row["bytes_per_token_fp16"] == pytest.approx(row["bytes_per_token"] / 2)
    assert row["kept_tokens_per_layer"] == [4, 2.5]
    assert row["error"] == "passkey: E: x" and row["dtype"] == "float32"
    none = worker._row("none", 0.5, 10, [], ["ValueError: no"], torch.float32)
    assert none["ratio"] == 0.0 and none["perplexity"] is None and "bytes_per_token" not in none
    assert "ValueError: no" in peers.table([none])


def test_cases_become_the_requests_json():
    tasks = load("kv_tasks")
    case = tasks.PasskeyCase(ids=[2, 5, 6], answer="12345", depth=0.25, context=3)
    passkey, continuation = peers._request_cases({"passkey": [case], "continuation": [([2, 5], (6, 7))]})
    assert json.loads(json.dumps(passkey)) == [{"ids": [2, 5, 6], "answer": "12345", "depth": 0.25, "context": 3}]
    assert continuation == [{"context_ids": [2, 5], "continuation_ids": [6, 7]}]
    with pytest.raises(ValueError, match="a continuation case needs at least one continuation token"):
        peers._request_cases({"continuation": [([2, 5], [])]})


def test_a_venv_with_its_stamp_is_reused_and_a_failed_step_is_named(tmp_path):
    venv = tmp_path / "kvpress-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / peers.peer_venv.STAMP).write_text(json.dumps(peers.PINS))
    assert peers.ensure_venv(tmp_path, python="/nonexistent/python") == venv / "bin" / "python"
    with pytest.raises(peers.KvPeerError, match=r"peer environment .*other-venv-root/kvpress-venv: creating the "
                                                r"virtual environment failed \(exit 1\)"):
        peers.ensure_venv(tmp_path / "other-venv-root", python="false")


def test_kvpress_results_refuses_a_bad_ratio_and_a_folder_without_a_model(tmp_path):
    with pytest.raises(ValueError, match=r"compression ratio 1.0: give the share of the cache a press removes"):
        peers.kvpress_results(tmp_path, {}, ["KnormPress"], 1.0, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"has no config.json: give a transformers model directory"):
        peers.kvpress_results(tmp_path, {}, ["KnormPress"], 0.5, tmp_path)

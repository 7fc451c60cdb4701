"""benchmarks/outliers_peers.py and its worker: the worker's perplexity against the shared sliding-window
recipe on a tiny random Gemma 3, its int8 head, the calibration windows, the run specs, the table,
and the venv's stamp. llm-compressor and auto-round are not installed here (python
benchmarks/outliers_peers.py --smoke runs them end to end)."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.benchmarks.bench_modules import load




worker = load("outliers_peers_worker")
peers = load("outliers_peers")


@pytest.fixture(scope="module")
def model():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=64,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
                              tie_word_embeddings=True)
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("n,window,stride", [(50, 16, 8), (34, 16, 16), (17, 32, 8)])
def test_the_workers_perplexity_is_the_shared_sliding_window_recipe(model, n, window, stride):
    llm_peers = load("llm_peers")
    ids = [int(t) for t in torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n))]

    def logits_of(chunk):
        with torch.inference_mode():
            return model(input_ids=torch.tensor([chunk])).logits[0].numpy()
    want, scored = llm_peers.sliding_window_perplexity(ids, window, stride, logits_of)
    got = worker.perplexity(model, ids, window, stride)
    assert got["tokens_scored"] == scored
    # overlapping windows score every token after the first; back-to-back ones skip each window's first
    assert scored == (n - 1 if stride < window else n - (n + window - 1) // window)
    assert got["perplexity"] == pytest.approx(want, rel=1e-9)


def test_the_int8_head_is_on_its_grid_and_leaves_the_embedding_as_it_was():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(1)
    config = Gemma3TextConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=1, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    m = Gemma3ForCausalLM(config).eval()
    embedding = m.get_input_embeddings().weight.detach().clone()
    worker.int8_head(m)
    head = m.get_output_embeddings().weight.detach()
    scale = (embedding.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    codes = head / scale
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127 + 1e-3
    assert torch.equal(m.get_input_embeddings().weight.detach(), embedding)
    assert not torch.equal(head, embedding) and not m.config.tie_word_embeddings


class _Tokenizer:
    def __init__(self, n: int):
        self.n = n

    def __call__(self, text):
        return {"input_ids": list(range(self.n))}


@pytest.mark.parametrize("n,limit,lengths", [(300, 128, [128, 128, 44]), (257, 128, [128, 128]),
                                             (1000, 3, [128, 128, 128]), (1, 128, [])])
def test_calibration_windows_are_text_batches_windows(n, limit, lengths):
    windows = peers.calibration_windows(_Tokenizer(n), "text", limit=limit)
    assert [len(w) for w in windows] == lengths
    assert all(w[0] == 128 * i for i, w in enumerate(windows))


def test_run_specs_parse_and_refuse_a_bad_one():
    assert peers.parse_runs("llm-compressor:W4A4:quip,auto-round:MXFP4") == [
        {"peer": "llm-compressor", "scheme": "W4A4", "rotation": "quip"},
        {"peer": "auto-round", "scheme": "MXFP4", "rotation": None}]
    with pytest.raises(ValueError, match=r"run 'auto-round': write peer:scheme"):
        peers.parse_runs("auto-round")


def test_the_table_shows_the_reason_of_a_run_without_a_figure():
    rows = [{"peer": "transformers 5.17.0", "scheme": "fp32", "rotation": None, "perplexity": 20.0, "quantize_s": 0.0},
            {"peer": "llm-compressor 0.14.0.1", "scheme": "W4A8", "rotation": "quip", "perplexity": 22.0,
             "quantize_s": 150.0},
            {"peer": "auto-round 0.15.1", "scheme": "W4A4", "rotation": "hadamard", "perplexity": None,
             "quantize_s": None, "error": "no layout | for Gemma3ForCausalLM"}]
    text = peers.table(rows)
    assert "| llm-compressor 0.14.0.1 | W4A8 | quip | 22.000 | +10.0% | 150 |" in text
    assert "| no layout / for Gemma3ForCausalLM" in text


def test_bad_requests_are_refused_before_any_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        peers.peer_results(tmp_path, [[1, 2]], [1, 2, 3], [], tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="calibration windows of at least 2"):
        peers.peer_results(tmp_path, [[1]], [1, 2, 3], [], tmp_path)
    with pytest.raises(ValueError, match="give peer 'llm-compressor' or 'auto-round'"):
        peers.peer_results(tmp_path, [[1, 2]], [1, 2, 3], [{"peer": "x", "scheme": "W4A8"}], tmp_path)
    assert not (tmp_path / peers._VENV).exists()


def test_a_stamped_venv_with_the_same_pins_is_reused(tmp_path):
    py = tmp_path / peers._VENV / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("")
    (tmp_path / peers._VENV / peers.peer_venv.STAMP).write_text(json.dumps(peers.PINS))
    assert peers.ensure_venv(tmp_path, python="/nonexistent/python") == py
    assert peers.PINS[0] == "torch==2.13.0"       # first, so pip never resolves a CUDA torch


def test_outliers_writes_the_peer_tables_per_model(tmp_path, monkeypatch):
    outliers = load("outliers")
    monkeypatch.setattr(outliers.docs_table, "DOCS", tmp_path)
    versions = {"llmcompressor": "0.14.0.1", "compressed-tensors": "0.19.0", "auto-round": "0.15.1",
                "transformers": "5.17.0", "torch": "2.13.0+cpu"}
    llm = [{"model": "Gemma 3 270M", "peer": "transformers 5.17.0", "scheme": "fp32", "rotation": None,
            "perplexity": 20.0, "calibration_windows": 128, "tokens_scored": 4095, "versions": versions},
           {"model": "Gemma 3 270M", "peer": "llm-compressor 0.14.0.1", "scheme": "W4A4", "rotation": "quip",
            "perplexity": 25.0, "versions": versions},
           {"model": "Gemma 3 270M", "peer": "auto-round 0.15.1", "scheme": "W4A4", "rotation": "hadamard",
            "perplexity": None, "error": "no layout", "versions": versions}]
    default = [{"model": "all-MiniLM-L6-v2", "peer": "llm-compressor 0.14.0.1", "scheme": "W4A8", "rotation": None,
                "cosine_mean": 0.98, "nn_agreement": 0.9, "calibration_sentences": 480, "versions": versions}]
    outliers.write_tables({"rows": [], "peers": llm + default,
                           "args": {"presets": ["w4a8"], "window": 512, "stride": 256, "autoround_iters": 200}})
    text = (tmp_path / "measured" / "outliers.md").read_text()
    assert "| llm-compressor 0.14.0.1 | W4A4 | QuIP (v, u; Hadamard blocks of 128) | 25.00 | +25.0% | - |" in text
    assert "| auto-round 0.15.1 | W4A4 | Hadamard | - | - | no layout |" in text
    assert "| llm-compressor 0.14.0.1 | W4A8 | - | 0.9800 | 90.0% | - |" in text
    assert text.count("<!-- table:outliers-peers") == 2 and "table:outliers-llm" not in text


def test_a_stopped_run_keeps_its_finished_rows_and_a_rerun_runs_only_the_rest(tmp_path, monkeypatch):
    ran = []

    def one(request, peer, scheme, rotation):
        ran.append((peer, scheme, rotation))
        if scheme == "W4A4":
            raise KeyboardInterrupt                  # the run is stopped here
        return {"peer": peer, "scheme": scheme, "rotation": rotation, "error": None, "perplexity": 1.0}
    monkeypatch.setattr(worker, "run_one", one)
    done = tmp_path / "done.jsonl"
    request = {"done_file": str(done), "runs": [{"peer": "llm-compressor", "scheme": "W4A8", "rotation": None},
                                                {"peer": "llm-compressor", "scheme": "W4A4", "rotation": None}]}
    with pytest.raises(KeyboardInterrupt):
        worker.run(request)
    assert len(done.read_text().splitlines()) == 2 and len(ran) == 3  # fp32 and W4A8 kept
    monkeypatch.setattr(worker, "run_one", lambda r, p, s, rot: one(r, p, "W4A4b" if s == "W4A4" else s, rot))
    ran.clear()
    out = worker.run(request)
    assert ran == [("llm-compressor", "W4A4b", None)]
    assert [r["scheme"] for r in out["rows"]] == ["fp32", "W4A8", "W4A4b"]

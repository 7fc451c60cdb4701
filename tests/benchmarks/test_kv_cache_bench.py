"""benchmarks/kv_cache.py and kv_tasks.py: the passkey prompts and the chunked scoring, checked on a
character tokenizer and a stand-in decoder whose logits depend on every token it holds (no real
model is built)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.benchmarks.bench_modules import load




kv_tasks = load("kv_tasks")
kv_cache = load("kv_cache")


class CharTokenizer:
    """One id per character (BOS 1 first when asked), as a Hugging Face tokenizer is called."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_has_the_asked_length_and_the_needle_at_its_depth(depth):
    tok = CharTokenizer()
    case = kv_tasks.passkey_case(tok, context=900, depth=depth, seed=3)
    assert case.context == len(case.ids) == 900 and case.ids[0] == 1
    text = "".join(chr(i) for i in case.ids[1:])
    assert text.startswith(kv_tasks.INTRO) and text.endswith(kv_tasks.QUESTION)
    needle = kv_tasks.NEEDLE.format(key=case.answer)
    at = text.index(needle)
    filler = len(text) - len(kv_tasks.INTRO) - len(needle) - len(kv_tasks.QUESTION)
    assert at - len(kv_tasks.INTRO) == round(depth * filler)
    # the same seed, context and depth give the same key; another seed another one
    assert kv_tasks.passkey_case(tok, 900, depth, 3).answer == case.answer
    assert len({kv_tasks.passkey_case(tok, 900, depth, s).answer for s in range(5)}) > 1


def test_passkey_prompt_too_short_is_refused():
    with pytest.raises(ValueError, match="more than 50 tokens"):
        kv_tasks.passkey_case(CharTokenizer(), context=50, depth=0.5, seed=0)


def test_passkey_answer_is_right_only_when_the_key_comes_first():
    assert kv_tasks.passkey_right("48291", " 48291. Remember")
    assert kv_tasks.passkey_right("48291", ": 48 291")
    assert not kv_tasks.passkey_right("48291", " 48290")
    assert not kv_tasks.passkey_right("48291", " the key 48291")
    assert not kv_tasks.passkey_right("48291", "")


class HistoryDecoder:
    """Logits at each position are a fixed function of every token fed so far, as a real decoder's
    are of its cache; prefill/extend return [1, n, vocab] as nnforge's Decoder does."""
    VOCAB = 11

    def prefill(self, ids, all_logits=True):
        self.seen = []
        return self.extend(ids, all_logits)

    def extend(self, ids, all_logits=True):
        rows = []
        for t in ids[0].tolist():
            self.seen.append(t)
            g = torch.Generator().manual_seed(sum((i + 1) * v for i, v in enumerate(self.seen)))
            rows.append(torch.randn(self.VOCAB, generator=g))
        out = torch.stack(rows)[None]
        return out if all_logits else out[:, -1:]

    def step(self, token):
        return self.extend(token.reshape(1, 1))[:, -1]


def _direct_nll(ids, start=1, context=None):
    d = HistoryDecoder()
    logits = d.prefill(torch.tensor([ids]))[0]
    logp = torch.log_softmax(logits.double(), -1)
    return -sum(float(logp[i - 1, ids[i]]) for i in range(start, len(ids))), len(ids) - start


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_window_score_does_not_depend_on_the_chunk(chunk):
    ids = [(7 * i + 3) % HistoryDecoder.VOCAB for i in range(23)]
    total, count = kv_cache.window_nll(HistoryDecoder(), ids, chunk)
    want, n = _direct_nll(ids)
    assert count == n == 22 and total == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("chunk,score_chunk", [(2, 1), (5, 3), (100, 8)])
def test_continuation_scores_each_continuation_token_once(chunk, score_chunk):
    ids = [(5 * i + 1) % HistoryDecoder.VOCAB for i in range(20)]
    ctx, cont = kv_tasks.continuation_split(ids, 12, 8)
    total, count = kv_cache.continuation_nll(HistoryDecoder(), ctx, cont, chunk, score_chunk)
    want, n = _direct_nll(ids, start=12)
    assert count == n == 8 and total == pytest.approx(want, rel=1e-12)
    assert math.isfinite(total)


def test_greedy_follows_the_argmax():
    ids = [3, 1, 4, 1, 5]
    got = kv_cache.greedy(HistoryDecoder(), ids, 4, chunk=2)
    d = HistoryDecoder()
    last = d.prefill(torch.tensor([ids]))[0, -1]
    want = []
    for _ in range(4):
        want.append(int(last.argmax()))
        last = d.step(torch.tensor([want[-1]]))[0]
    assert got == want


def test_continuation_split_refuses_short_text():
    with pytest.raises(ValueError, match="needs 30"):
        kv_tasks.continuation_split(list(range(20)), 20, 10)


def test_goals_are_worked_out_from_the_rows():
    pk = {"2048@0": [1, 1, []], "2048@0.5": [1, 1, []]}
    rows = [{"kind": "quality", "name": "fp32", "ppl@2048": 10.0, "fp16_bytes_per_token": 1000.0,
             "bytes_per_context_token": 2000.0, "passkey": pk},
            {"kind": "quality", "name": "kv8", "ppl@2048": 10.04, "bytes_per_context_token": 500.0, "passkey": pk},
            {"kind": "quality", "name": "kv4", "ppl@2048": 10.2, "bytes_per_context_token": 300.0,
             "growing_bytes_per_token": 260.0, "fixed_bytes": 40960, "max_len": 4096,
             "passkey": {"2048@0": [1, 1, []], "2048@0.5": [0, 1, []]}},
            {"kind": "quality", "name": "kv-gear4", "ppl@2048": 10.1, "bytes_per_context_token": 340.0, "passkey": pk},
            {"kind": "quality", "name": "kv-evict-1024", "bytes_per_context_token": 1000.0, "passkey": pk},
            {"kind": "peer", "label": "kvpress SnapKVPress at ratio 0.5", "passkey": {"2048@0": [1, 1, []]}},
            {"kind": "speed", "name": "w8", "decode_tokens_per_s@4096": 10.0, "decode_tokens_per_s@4096x8": 20.0},
            {"kind": "speed", "name": "w8+kv4", "decode_tokens_per_s@4096": 14.0, "decode_tokens_per_s@4096x8": 40.0}]
    got = {g[0]: (g[1], g[2]) for g in kv_cache.goals(rows, [2048])}
    assert got["`kv8` perplexity within 0.5% of the float cache"] == ("perplexity +0.40% (worst window) at 0.500x per token",
                                                                      "yes")
    # kv4's bytes are what each further token costs, its fixed window said beside them
    assert got["`kv4` perplexity within 3.0% of the float cache at 0.27x the bytes per token of a float16 cache"] == (
        "perplexity +2.00% (worst window) at 0.260x per token + a fixed window of 40 KiB (0.300x all told at max_len "
        "4096)", "yes")
    assert got["`kv-gear4` closer to the float cache than `kv4`, under 0.35x the bytes per token"][1] == "yes"
    assert got["`kv4` passkey accuracy equal to the float cache's at every depth"][1] == "no"
    assert got["`kv-evict-1024` (half the cache) passkey at least the best kvpress press's"] == (
        "2/2 vs kvpress SnapKVPress at ratio 0.5 1/1", "yes")
    assert got["`kv4` bundle decoding at 4096 context at least 1.5x the float32-cache bundle on cpu (batch 1)"] == (
        "1.40x", "no")
    assert got["`kv4` bundle decoding at 4096 context at least 1.5x the float32-cache bundle on cpu (batch 8)"] == (
        "2.00x", "yes")
    # a float16-cache bundle, where one was timed, is the baseline the goal names
    rows.append({"kind": "speed", "name": "w8+kv-f16", "decode_tokens_per_s@4096": 12.0})
    got = {g[0]: (g[1], g[2]) for g in kv_cache.goals(rows, [2048])}
    assert got["`kv4` bundle decoding at 4096 context at least 1.5x the float16-cache bundle on cpu (batch 1)"] == (
        "1.17x", "no")
    assert not any("float32-cache" in g or "batch 8" in g for g in got)


def test_earlier_rows_keep_peers_when_only_the_scoring_changed(tmp_path):
    sizes = {"windows": [2048], "score_chunk": 1, "quality_target": "cpu"}
    rows = [{"kind": "quality", "label": "nnforge kv4 on onnx"}, {"kind": "peer", "label": "kvpress none"},
            {"kind": "peer", "label": "kvpress SnapKVPress", "skipped": "no GPU"}]
    path = tmp_path / "kv_cache.json"
    path.write_text(json.dumps({"sizes": {"windows": [2048], "score_chunk": 512, "quality_target": "onnx"},
                                "results": rows}))
    assert list(kv_cache.earlier_rows(path, sizes)) == ["kvpress none"]
    path.write_text(json.dumps({"sizes": sizes, "results": rows}))
    assert list(kv_cache.earlier_rows(path, sizes)) == ["nnforge kv4 on onnx", "kvpress none"]
    assert kv_cache.earlier_rows(path, {**sizes, "windows": [4096]}) == {}


def test_join_rows_takes_another_runs_rows_by_label_and_refuses_other_sizes():
    sizes = {"windows": [2048]}
    saved = {"sizes": sizes, "args": {"speed_batches": [1], "speed_contexts": [4096], "windows": [2048]},
             "results": [{"kind": "quality", "label": "a", "v": 1}, {"kind": "speed", "label": "s", "v": 1},
                         {"kind": "speed", "label": "old", "v": 0}]}
    other = {"sizes": sizes, "args": {"speed_batches": [1, 8], "speed_contexts": [4096, 16384], "windows": [1]},
             "results": [{"kind": "speed", "label": "s", "v": 2}, {"kind": "quality", "label": "b", "v": 3}]}
    got = kv_cache.join_rows(saved, other, "b.json")
    # the other run's speed rows replace every speed row, with the settings they were timed with
    assert [(r["label"], r["v"]) for r in got["results"]] == [("a", 1), ("s", 2), ("b", 3)]
    assert got["args"] == {"speed_batches": [1, 8], "speed_contexts": [4096, 16384], "windows": [2048]}
    # a run that timed nothing leaves the speed rows alone
    quiet = {"sizes": sizes, "args": {"speed_batches": [2]}, "results": [{"kind": "quality", "label": "a", "v": 5}]}
    got = kv_cache.join_rows(saved, quiet, "c.json")
    assert [(r["label"], r["v"]) for r in got["results"]] == [("a", 5), ("s", 1), ("old", 0)]
    assert got["args"]["speed_batches"] == [1]
    with pytest.raises(SystemExit, match="b.json holds rows of other task sizes"):
        kv_cache.join_rows(saved, {**other, "sizes": {"windows": [4096]}}, "b.json")


class TurnTakingBundle:
    """A bundle whose decoder logs each step in a shared log, and whose runner (when ``kernels`` is
    given) reports calls to the instrument hook as the TVM VM does, ``kernels`` as (symbol, ns),
    each call advancing ``clock`` (a one-item list of nanoseconds) by its ns."""

    def __init__(self, name, log, kernels=None, clock=None):
        self.clock = clock
        self.manifest = {"recipe": {"name": name}, "target": {"name": "cpu"},
                         "decoder": {"kv_cache": {"bytes_per_token": 10.0, "float32_bytes_per_token": 40.0}}}
        self.name, self.log, self.kernels = name, log, kernels
        self.runner = self
        self.hook = None
        if kernels is not None:
            self.set_instrument = lambda hook: setattr(self, "hook", hook)

    def load(self):
        return self

    def decoder(self):
        bundle = self

        class Stepper(HistoryDecoder):
            def prefill(self, ids, all_logits=True):
                bundle.log.append((bundle.name, "prefill", ids.shape[1]))
                return super().prefill(ids, all_logits)

            def snapshot(self):
                return ("prefilled", len(self.seen))

            def restore(self, state, copies=1):
                bundle.log.append((bundle.name, "restore", (state, copies)))

            def step(self, token):
                bundle.log.append((bundle.name, "step", tuple(token.tolist())))
                for symbol, ns in (bundle.kernels or []) if bundle.hook else []:
                    bundle.hook(None, symbol, True, None)
                    bundle.clock[0] += ns
                    bundle.hook(None, symbol, False, None)
                return torch.randn(len(token), self.VOCAB, generator=torch.Generator().manual_seed(len(bundle.log)))
        return Stepper()


def test_speed_rows_prefill_once_restore_each_batch_and_time_the_bundles_in_turns(monkeypatch):
    log, clock = [], [0]
    monkeypatch.setattr(kv_cache.time, "perf_counter_ns", lambda: clock[0])
    bundles = [TurnTakingBundle("w8+kv-f16", log, kernels=[("nf_kv_f16_attention_x", 3_000_000),
                                                            ("int8_matmul_head", 1_000_000)], clock=clock),
               TurnTakingBundle("w8+kv4", log)]
    rows = kv_cache.speed_rows(bundles, contexts=[5], ids=[3, 1, 4, 1, 5, 9, 2], new_tokens=3, chunk=2,
                               batches=[1, 4])
    assert [r["name"] for r in rows] == ["w8+kv-f16", "w8+kv4"]
    # one prefill per bundle and context (chunked from position 0), restored as each batch
    assert [(n, what) for n, what, _ in log if what == "prefill"] == [("w8+kv-f16", "prefill"), ("w8+kv4", "prefill")]
    restored = [(n, x) for n, what, x in log if what == "restore"]
    assert restored == [("w8+kv-f16", (("prefilled", 5), 1)), ("w8+kv4", (("prefilled", 5), 1)),
                        ("w8+kv-f16", (("prefilled", 5), 4)), ("w8+kv4", (("prefilled", 5), 4))]
    steps = [(name, tokens) for name, what, tokens in log if what == "step"]
    batch4 = steps[-(2 + 2 * 3 + kv_cache.ATTENTION_STEPS):]
    # after each bundle's warm-up step, the timed steps alternate between the bundles
    timed = [name for name, _ in batch4[2:8]]
    assert timed == ["w8+kv-f16", "w8+kv4"] * 3 and all(len(t) == 4 for _, t in batch4)
    assert rows[0]["decode_tokens_per_s@5x4"] > 0 and rows[1]["decode_tokens_per_s@5"] > 0
    # the attention kernels' share of the instrumented steps; none where the runner cannot time calls
    assert rows[0]["attention_share@5x4"] == 0.75 and rows[0]["attention_share@5"] == 0.75
    assert "attention_share@5x4" not in rows[1]


def test_the_speed_goal_is_read_at_4k_with_the_attention_bound():
    rows = [{"kind": "speed", "name": "w8+kv-f16", "decode_tokens_per_s@4096x8": 10.0,
             "attention_share@4096x8": 0.25, "decode_tokens_per_s@16384x8": 5.0},
            {"kind": "speed", "name": "w8+kv4", "decode_tokens_per_s@4096x8": 12.0, "decode_tokens_per_s@16384x8": 9.0}]
    got = kv_cache.goals(rows, [2048])
    assert got == [["`kv4` bundle decoding at 4096 context at least 1.5x the float16-cache bundle on cpu (batch 8)",
                    "1.20x (attention 25% of the float16-cache step: a cache read in no time at all would make it "
                    "1.33x)", "no"]]

"""benchmarks/recovery.py's tables: each preset one-shot beside recovered, from the same run."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
from tests.benchmarks.bench_modules import load  # noqa: E402


@pytest.fixture(scope="module")
def recovery():
    return load("recovery")


def _row(model, preset, kind, **kw):
    return {"model": model, "preset": preset, "kind": kind, **kw}


def test_each_preset_is_one_shot_beside_recovered_with_its_options(recovery):
    rows = [_row("all-MiniLM-L6-v2", "sparse24", "one-shot", cosine_mean=0.9, nn_agreement=0.62),
            _row("all-MiniLM-L6-v2", "sparse24", "recovered", cosine_mean=0.95, nn_agreement=0.7, recovery_s=61.2,
                 recovery_cpu_s=118.7,
                 recovery="reconstruct", options={"steps": 200, "lr": 0.01, "budget_s": None}),
            _row("Gemma 3 270M", "fp32", "-", perplexity=20.0, tokens_scored=4095),
            _row("Gemma 3 270M", "w3-gptq", "one-shot", perplexity=30.0),
            _row("Gemma 3 270M", "w3-gptq", "recovered", perplexity=25.0, recovery_s=300, recovery="distill",
                 options={"steps": 100, "lr": 0.001, "budget_s": 600, "gradual": 4})]
    out = recovery.tables({"rows": rows, "args": {"window": 512, "stride": 256}})
    assert out["recovery-default"][1] == [["sparse24", "0.9000", "0.9500", "62.0%", "70.0%", "61", "119",
                                           "reconstruct: 200 steps, lr 0.01"]]
    assert out["recovery-llm"][1] == [["w3-gptq", "30.00", "1.50x", "25.00", "1.25x", "300", None,
                                       "distill: 100 steps, lr 0.001, 4 gradual stages, budget 600 s"]]
    assert "fp32 20.00" in out["recovery-llm"][2][0]


def test_a_run_keeps_the_presets_it_did_not_rerun(recovery):
    before = {"rows": [_row("A", "p", "one-shot"), _row("A", "q", "one-shot", old=True)], "command": "old"}
    now = {"rows": [_row("A", "q", "one-shot")], "command": "new", "args": {}}
    out = recovery.merged(before, now)
    assert out["rows"] == [_row("A", "p", "one-shot"), _row("A", "q", "one-shot")]
    assert out["earlier"]["command"] == "old"


def test_recipes_split_into_preset_and_recovery(recovery):
    assert recovery.split("block-sparse-80+distill") == ("block-sparse-80", "distill")
    assert recovery.split("rot+w4-gptq+rec") == ("rot+w4-gptq", "rec")
    with pytest.raises(SystemExit, match="give <preset>\\+rec or <preset>\\+distill"):
        recovery.split("w3-gptq")

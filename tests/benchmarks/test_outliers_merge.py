"""benchmarks/outliers.py keeps the rows of the model a run did not measure (each model's run is long,
so the LLM and the default model are measured in separate runs that write one JSON)."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
from tests.benchmarks.bench_modules import load  # noqa: E402


@pytest.fixture(scope="module")
def outliers():
    return load("outliers")


def test_a_run_of_one_model_keeps_the_others_rows(outliers):
    before = {"rows": [{"model": "A", "recipe": "w4a8"}, {"model": "B", "recipe": "w4a8", "old": True}],
              "peers": [{"model": "A", "peer": "llmc"}], "command": "old", "args": {"presets": ["w4a8"]}}
    now = {"rows": [{"model": "B", "recipe": "w4a8"}], "peers": [], "command": "new", "args": {}}
    out = outliers.merged(before, now)
    assert out["rows"] == [{"model": "A", "recipe": "w4a8"}, {"model": "B", "recipe": "w4a8"}]
    assert out["args"]["presets"] == ["w4a8"]
    assert out["peers"] == [{"model": "A", "peer": "llmc"}]          # this run ran no peers for A
    assert out["command"] == "new" and out["earlier"]["command"] == "old"
    assert out["earlier"]["models"] == ["A"]


def test_a_run_with_peers_replaces_that_models_peers(outliers):
    before = {"rows": [], "peers": [{"model": "B", "peer": "old"}]}
    now = {"rows": [{"model": "B", "recipe": "fp32"}], "peers": [{"model": "B", "peer": "new"}]}
    out = outliers.merged(before, now)
    assert out["peers"] == [{"model": "B", "peer": "new"}] and "earlier" not in out


def test_a_run_of_some_presets_keeps_the_models_other_rows(outliers):
    before = {"rows": [{"model": "B", "recipe": "w4a8"}, {"model": "B", "recipe": "fp32", "old": True}],
              "peers": [], "args": {"presets": ["w4a8"], "weights": []}}
    now = {"rows": [{"model": "B", "recipe": "fp32"}, {"model": "B", "recipe": "w4-awq"}], "peers": [],
           "args": {"presets": [], "weights": ["w4-awq"]}}
    out = outliers.merged(before, now)
    assert out["rows"] == [{"model": "B", "recipe": "w4a8"}, {"model": "B", "recipe": "fp32"},
                           {"model": "B", "recipe": "w4-awq"}]
    assert out["args"]["presets"] == ["w4a8"] and out["args"]["weights"] == ["w4-awq"]


def test_variants_give_each_preset_and_its_rotated_form(outliers):
    assert outliers.variants(["w4a8", "w4-gptq"]) == ["w4a8", "w4a8-rot", "w4-gptq", "rot+w4-gptq"]
    assert outliers.variants(["w4a8", "w4-gptq"], "rotated") == ["w4a8-rot", "rot+w4-gptq"]
    assert outliers.variants(["w4a4"], "plain") == ["w4a4"]

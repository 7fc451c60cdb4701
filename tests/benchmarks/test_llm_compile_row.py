"""benchmarks/llm.py: compile_row reuses a bundle while the passes it recorded are the ones the
preset and head format resolve to now, and compiles it again when the preset changed (a stale
bundle would be measured as the new preset); speeds times the rows in interleaved rounds."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.frontend.decoders.families import tiny_model, tiny_tokenizer

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "llm.py"
_spec = importlib.util.spec_from_file_location("bench_llm", _PATH)
llm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llm)


def test_a_bundle_is_reused_until_its_preset_changes(tmp_path, monkeypatch):
    from nnforge.passes import recipes
    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    text = " ".join(f"w{4 + (7 * i) % 124}" for i in range(400))

    def compiled(preset):
        bundle = llm.compile_row(tmp_path / "m", "onnx", preset, text, 32, tmp_path / "work")
        return (bundle.path / "manifest.json").stat().st_mtime_ns, bundle.manifest["recipe"]["passes"]

    first, passes = compiled("w4-rtn")
    assert compiled("w4-rtn")[0] == first                              # reused
    desc, configs = recipes.PRESETS["w4-rtn"]
    monkeypatch.setitem(recipes.PRESETS, "w4-rtn", (desc, [{**configs[0], "group_size": 32}]))
    again, changed = compiled("w4-rtn")
    assert again != first and changed[0]["group_size"] == 32 and passes[0]["group_size"] == 128


def test_speeds_interleave_the_rows_and_take_each_ones_median():
    calls = []

    class Row:
        def __init__(self, name, rates):
            self.name, self.rates = name, iter(rates)

        def speed(self, prompt, new_tokens):
            calls.append((self.name, len(prompt), new_tokens))
            rate = next(self.rates)
            return {"prefill_tokens_per_s": rate, "decode_tokens_per_s": rate}

    a, b = Row("a", [1, 2, 3, 10, 20, 30, 5, 6, 7]), Row("b", [4, 4, 4, 4, 4, 4, 4, 4, 4])
    b.release = lambda: calls.append(("b released",))
    got = llm.speeds([a, b], [0] * 8, list(range(64)), [16, 32], 4, rounds=3)
    assert calls.count(("b released",)) == 3
    calls[:] = [c for c in calls if c != ("b released",)]
    assert [c[0] for c in calls] == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert calls[:3] == [("a", 8, 1), ("a", 16, 4), ("a", 32, 4)]
    assert got[0]["prefill_tokens_per_s"] == 5 and got[0]["decode_tokens_per_s@16"] == 6
    assert got[0]["decode_tokens_per_s@32"] == 7 and got[0]["rounds"]["decode_tokens_per_s@32"] == [3, 30, 7]
    assert got[1]["decode_tokens_per_s@16"] == 4

"""benchmarks/llm.py's compile_row: a bundle is reused while the passes it recorded are the ones
the preset and head format resolve to now, and compiled again when the preset changed (a stale
bundle would be measured as the new preset)."""
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

"""benchmarks/compression.py: short labels for JSON recipes, and the Pareto plot written as SVG and PNG."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..test_plots import PNG_MAGIC, svg_text

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "compression.py"
_spec = importlib.util.spec_from_file_location("compression", _PATH)
compression = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compression)


def test_labels_of_json_recipes():
    assert compression.label("w4-gptq") == "w4-gptq"
    assert compression.label(compression._W3_EORA % 32) == "quantize_eora rank=32"
    assert [compression.label(b) for b in compression.BASELINES[:2]] == ["prune_magnitude pattern=2:4",
                                                                         "prune_magnitude sparsity=0.5"]


def test_pareto_plot(tmp_path):
    rows = [{"recipe": "fp32", "bytes": 400, "ratio": 1.0, "cosine_mean": 1.0},
            {"recipe": "w8", "bytes": 100, "ratio": 0.25, "cosine_mean": 0.9999},
            {"recipe": compression.BASELINES[0], "bytes": 220, "ratio": 0.55, "cosine_mean": 0.97}]
    compression.pareto(rows)
    assert compression.plot(rows, tmp_path) == [tmp_path / "pareto.svg", tmp_path / "pareto.png"]
    text = svg_text(tmp_path / "pareto.svg")
    assert "Size against fidelity" in text and "prune_magnitude pattern=2:4" in text and "w8" in text
    assert (tmp_path / "pareto.png").read_bytes().startswith(PNG_MAGIC)

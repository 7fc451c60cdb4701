"""benchmarks/slicing.py's table: each row's perplexity and speed against the fp32 row of its own
target, measured in the same run."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
from tests.benchmarks.bench_modules import load  # noqa: E402


@pytest.fixture(scope="module")
def slicing():
    return load("slicing")


def test_each_row_is_compared_with_the_fp32_row_of_its_target(slicing):
    rows = [{"target": "cpu", "preset": "fp32", "kept_width": 640, "parameters": 268e6, "perplexity": 20.0,
             "prefill_tokens_per_s": 100.0, "decode_tokens_per_s@128": 40.0},
            {"target": "onnx", "preset": "fp32", "kept_width": 640, "parameters": 268e6, "perplexity": 20.0,
             "prefill_tokens_per_s": 50.0, "decode_tokens_per_s@128": 10.0},
            {"target": "cpu", "preset": "slice-25", "kept_width": 480, "parameters": 210e6, "perplexity": 25.0,
             "prefill_tokens_per_s": 125.0, "decode_tokens_per_s@128": 50.0}]
    columns, table = slicing.table(rows)
    assert columns[5] == "vs fp32" and columns[7] == columns[9] == "x fp32"
    assert table[2] == ["cpu", "slice-25", 480, "210.0", "25.00", "+25.0%", "125.0", "1.25x", "50.0", "1.25x"]
    assert table[1][5] == "+0.0%" and table[1][7] == "1.00x"

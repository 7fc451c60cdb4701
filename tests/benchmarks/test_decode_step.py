"""benchmarks/decode_step.py on a tiny cpu decoder: both functions timed, and the step copy of main
makes fewer VM calls per step than main (no shape tuples to build or symbolic dims to check)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import nnforge as nf
from tests.frontend.decoders.families import tiny_model

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_step.py"
_spec = importlib.util.spec_from_file_location("bench_decode_step", _PATH)
decode_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode_step)


@pytest.mark.slow  # compiles a decoder twice
def test_the_step_copy_runs_fewer_vm_calls_than_main(tmp_path):
    nf.compile(tiny_model("llama"), "cpu", "w4-rtn", out=tmp_path / "b", max_len=32)
    r = decode_step.measure(tmp_path / "b", context=8, steps=2, rounds=2)
    assert set(r["median_ms"]) == {"main", "step copy"} and all(v > 0 for v in r["median_ms"].values())
    main, step = (sum(r["vm_calls"][k].values()) for k in ("main", "step copy"))
    assert 0 < step < main and "vm.builtin.make_shape" not in r["vm_calls"]["step copy"]


def test_a_bundle_without_a_step_copy_is_refused(tmp_path):
    nf.compile(tiny_model("llama"), "onnx", out=tmp_path / "b", max_len=32)
    with pytest.raises(SystemExit, match="has no step copy of main"):
        decode_step.measure(tmp_path / "b", context=8, steps=1, rounds=1)

"""The demo: one row per target family (every recipe with --full), rows for families whose backend
is not installed, speed columns timed against torch in alternating stretches and marked
unreliable under load, and its table."""
from __future__ import annotations

import pytest
import torch

from nnforge import demo
from nnforge.demo import FAMILIES, Row, check_rows, format_table, jobs, missing_requirements
from nnforge.speed import TORCH


BUSY = "the machine was busy: other processes kept 3.0 threads runnable on 2 CPUs on average while timing"


def _timed(target="onnx", recipe="w4-gptq", unreliable=""):
    return Row("onnx", target, recipe, 54.1, 54.0, 128, 0.9914, 0.9596, 0.896, 0.918,
               ms={1: {"bundle": 2.0, TORCH: 5.0}, 32: {"bundle": 80.0, TORCH: 160.0}}, unreliable=unreliable)


def test_the_tour_has_one_row_per_family_and_full_has_every_recipe():
    quick = jobs()
    assert [f.name for f, _ in quick] == [f.name for f in FAMILIES]
    assert {f.target for f in FAMILIES} >= {"onnx", "cpu", "h100", "apple-a17", "alveo-u280", "mlir"}
    assert all(r == f.recipe for f, r in quick)
    full = jobs(full=True)
    assert len(full) == sum(len(f.recipes) for f in FAMILIES) and set(quick) <= set(full)
    assert [r for _, r in jobs(families=["cpu"])] == [next(f.recipe for f in FAMILIES if f.target == "cpu")]


def test_table_shows_speed_where_timed_and_why_not_elsewhere():
    fpga = Row("FPGA (HLS)", "alveo-u280", "sparse24-w4", 60.0, 30.0, 8, 0.88, 0.7, 0.6, 0.6,
               notes=["fixed sizes: 8 sentences in batches of 8 padded to 31 tokens",
                      "not timed: a C-simulation's run time says nothing about the FPGA"])
    missing = Row("CPU (TVM)", "cpu", "block-sparse-80",
                  missing="not installed: `make install`, or pip install 'nnforge[tvm]'")
    text = format_table([_timed(), fpga, missing])
    lines = text.splitlines()
    onnx = next(l for l in lines if l.startswith("onnx"))
    assert onnx.split()[-6:] == ["2.00", "5.00", "2.50", "80.00", "160.00", "2.00"]   # ms, torch ms, x; b=1 then b=32
    row = next(l for l in lines if l.startswith("FPGA"))
    assert row.split()[-7:] == ["-", "-", "-", "-", "-", "-", "1,2"] and len(row) == len(onnx) + len("1,2")
    assert "pip install 'nnforge[tvm]'" in next(l for l in lines if l.startswith("CPU"))
    assert lines[-2] == "[1] alveo-u280 sparse24-w4: fixed sizes: 8 sentences in batches of 8 padded to 31 tokens"
    assert lines[-1].startswith("[2] alveo-u280 sparse24-w4: not timed: a C-simulation")
    assert "nnforge demo --full" in text and "nnforge demo --full" not in format_table([_timed()], full=True)


def test_rows_timed_under_load_share_one_unreliable_footnote():
    text = format_table([_timed(unreliable=BUSY), _timed("cpu", "fp32", unreliable=BUSY), _timed("onnx", "fp32")])
    lines = text.splitlines()
    assert [l.split()[-1] for l in lines if l.startswith("onnx ") and "  " in l][:2] == ["1", "1"]
    assert lines[-1].startswith(f"[1] {BUSY}: the speed ratios of this row are unreliable")
    assert sum(l.startswith("[") for l in lines) == 1


def test_speed_alternates_with_torch_and_marks_high_load(monkeypatch):
    calls = []
    others = iter([0, 0, 6, 6])         # runnable threads of other processes, sampled by the demo's meter

    def timed(runners, args, rounds, meter):
        calls.append((sorted(runners), args[0].shape[0], rounds))
        meter.samples.append(next(others))
        return {"bundle": 1.0, TORCH: 2.0}
    monkeypatch.setattr(demo, "alternating_ms", timed)
    monkeypatch.setattr("nnforge.timing.cpu_count", lambda: 2)

    class Tok:
        pass
    monkeypatch.setattr(demo.dm, "encode", lambda tok, texts: (torch.zeros(len(texts), 4, dtype=torch.int64),) * 2)
    quiet, busy = Row("onnx", "onnx", "fp32"), Row("onnx", "onnx", "fp32")
    demo._time_row(quiet, lambda *x: None, lambda *x: None, Tok(), ["s"] * 40)
    demo._time_row(busy, lambda *x: None, lambda *x: None, Tok(), ["s"] * 40)
    assert calls[:2] == [(["bundle", TORCH], 1, 12), (["bundle", TORCH], 32, 6)]
    assert quiet.unreliable == "" and quiet.load["others_running_per_cpu"] == 0.0
    assert busy.unreliable.startswith("the machine was busy: other processes kept 6.0 threads runnable on 2 CPUs")
    assert busy.speedup(32) == 2.0


def test_a_family_whose_package_is_missing_says_how_to_get_it(monkeypatch):
    from nnforge.targets import REQUIREMENTS, get_target
    monkeypatch.setitem(REQUIREMENTS, "tvm", lambda: (False, "python package apache-tvm"))
    monkeypatch.setitem(REQUIREMENTS, "g++", lambda: (False, "g++ on PATH"))
    assert missing_requirements(get_target("cpu")) == ("not installed: `make install`, or pip install "
                                                               "'nnforge[tvm]'")
    assert missing_requirements(get_target("alveo-u280")).endswith("needs g++ on PATH")
    assert missing_requirements(get_target("onnx")) == ""
    # hardware a target runs on is not a missing package: Core ML builds without macOS
    monkeypatch.setitem(REQUIREMENTS, "macos", lambda: (False, "macOS"))
    assert missing_requirements(get_target("apple-a17")) in ("", "not installed: `make install`, or pip "
                                                                     "install 'nnforge[coreml]'")


def test_fp32_rows_are_held_to_torch_and_missing_rows_are_not():
    bad = Row("onnx", "onnx", "fp32", 90.7, 90.3, 8, 0.9999, 0.9998, 1.0, 1.0)
    assert check_rows([bad, Row("MLIR", "mlir", "fp32", missing="not installed")]) == [
        "onnx fp32: min cosine 0.999800 < 0.99999"]


@pytest.mark.slow  # make demo runs every row; the rows are unit-tested above
def test_the_onnx_row_end_to_end(tmp_path, monkeypatch):
    """The tour's path for one family, cut to fp32 on a few sentences: compiled from the exported
    program, scored on held-out sentences, timed against torch."""
    family = next(f for f in FAMILIES if f.target == "onnx")
    monkeypatch.setattr(demo, "FAMILIES", (demo.Family(family.name, "onnx", None, "fp32", ("fp32",), (16, 16)),))
    (row,) = demo.run_demo(tmp_path, families=["onnx"], calibration=32, progress=False)
    assert row.sentences == 16 and row.cos_min > 0.99999 and row.bundle_mb > 50
    assert set(row.ms) == {1, 32} and row.speedup(1) > 0 and row.load["samples"] > 0
    assert check_rows([row]) == []

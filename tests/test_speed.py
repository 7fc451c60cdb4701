"""Speed records (nnforge/speed.py and pipeline.speed_records): what nf.compile measures, how batches
are made, where nothing is measured and why, and what `nnforge inspect` prints. The figures
themselves are this machine's and are not asserted on (performance claims live in benchmarks/)."""
from __future__ import annotations

import pytest
import torch

import nnforge as nf
from nnforge import speed, timing
from nnforge.backends.base import get_backend
from nnforge.cli import main
from nnforge.ir import Graph, tensor
from nnforge.targets import get_target


@pytest.fixture(autouse=True)
def quick_timing(monkeypatch):
    monkeypatch.setattr(speed, "BUDGET_S", 0.02)
    monkeypatch.setattr(timing, "PAUSE_S", 0.0)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 16)).eval()


def _compile(tmp_path, target, recipe=None, batch_sizes=(1, 4), model=None, **kw):
    x = torch.randn(3, 5, 64)
    return nf.compile(model or _mlp(), target, recipe, example_inputs=(x,), calibration=[(x,)],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), out=tmp_path / f"{target}-{recipe}",
                      batch_sizes=batch_sizes, **kw)


# --- batches -----------------------------------------------------------------------------------------
def _graph(first) -> Graph:
    g = Graph("g")
    a = g.add_input("a", tensor("f32", first, 4))
    b = g.add_input("b", tensor("f32", first, 2))
    g.set_outputs([g.op("relu", a), g.op("relu", b)])
    return g


def test_a_batch_repeats_the_inputs_along_the_batch_symbol():
    a, b = torch.arange(12.).reshape(3, 4), torch.arange(6.).reshape(3, 2)
    got, why = timing.batch_inputs(_graph("batch"), (a, b), 7)
    assert why == "" and [t.shape[0] for t in got] == [7, 7]
    assert torch.equal(got[0][3:6], a) and torch.equal(got[1][6], b[0])
    assert speed.speed_shapes(_graph("batch"), (a, b), (1, 7)) == [
        {"label": "batch 1", "batch": 1, "inputs": {"a": [1, 4], "b": [1, 2]}},
        {"label": "batch 7", "batch": 7, "inputs": {"a": [7, 4], "b": [7, 2]}}]


def test_a_fixed_batch_is_measured_at_its_size_only():
    a, b = torch.zeros(3, 4), torch.zeros(3, 2)
    assert timing.batch_inputs(_graph(3), (a, b), 3)[0] is not None
    got, why = timing.batch_inputs(_graph(3), (a, b), 32)
    assert got is None and why == "the graph's batch dimension is fixed at 3"


@pytest.mark.parametrize("text,want", [("1,32", (1, 32)), ("8, 2,8", (2, 8)), ("none", ()), ("", ())])
def test_batch_sizes_from_the_environment(monkeypatch, text, want):
    monkeypatch.setenv(speed.ENV, text)
    assert speed.default_batch_sizes() == want


@pytest.mark.parametrize("bad", [(0,), (-1, 2), (True,), (1.5,)])
def test_bad_batch_sizes_are_errors(tmp_path, bad):
    with pytest.raises(ValueError, match="batch sizes must be positive integers"):
        _compile(tmp_path, "onnx", batch_sizes=bad)


# --- what a compile records ---------------------------------------------------------------------------
def test_onnx_bundle_records_speed_against_dense_and_torch(tmp_path):
    m = _compile(tmp_path, "onnx", "w8").manifest
    sp = m["speed"]
    assert sp["measured"] and sp["batch_sizes"] == [1, 4] and sp["machine"]["cpus"] >= 1
    assert [r["batch"] for r in sp["records"]] == [1, 4]
    for r in sp["records"]:
        assert set(r["ms"]) == {"bundle", "dense on onnx", "torch eager"} and all(v > 0 for v in r["ms"].values())
        assert r["inputs"] == {"input": [r["batch"], 5, 64]}
        assert r["speedup"]["vs dense on onnx"] == pytest.approx(r["ms"]["dense on onnx"] / r["ms"]["bundle"], rel=1e-2)
    assert len(sp["verdicts"]) == 2 and sp["verdicts"][0].startswith("batch 1: the bundle is ")
    assert "no per-shape dispatch" in sp["dispatch"]
    assert "speed_s" in m["timings"]


def _dense_wins_at_batch_4(monkeypatch):
    """In-model times where the dense kernel wins at batch 4 and loses at batch 1, whatever this CPU says."""
    from nnforge.backends.tvm.layer_timing import InModelTimes

    def fake(runner, layers, graph, inputs, shapes, rounds=3):
        return InModelTimes({layer: {label: ((0.005, 0.008) if b == 1 else (0.02, 0.01)) for label, b in shapes}
                             for layer in layers}, checks={label: {"ok": True, "why": ""} for label, _ in shapes},
                            clock={"clock": "perf_counter_ns", "tick_ns": 1})
    monkeypatch.setattr("nnforge.backends.tvm.measure_in_model", fake)
    monkeypatch.setattr("nnforge.backends.tvm.check_in_model", lambda *a: [])


def test_cpu_bundle_records_dispatch_decisions_and_both_kernel_modes(tmp_path, monkeypatch):
    _dense_wins_at_batch_4(monkeypatch)
    m = _compile(tmp_path, "cpu", "w4-rtn").manifest
    d = m["backend"]["entry"]["dispatch"]
    assert d["dispatched"] == 2 and {x["threshold"] for x in d["layers"]} == {10}
    records = m["speed"]["records"]
    assert all(set(r["ms"]) == {"bundle", "bundle, compressed kernels only", "dense on tvm", "torch eager"}
               for r in records)
    assert "with compressed kernels only it would be" in m["speed"]["verdicts"][0]
    assert m["speed"]["dispatch"].startswith("2 of 2 compressed layers dispatch to the dense kernel")
    assert sum(m["speed"]["bundle_threads"]["calls_by_threads"].values()) > 0      # the pool the bundle ran on
    runner = nf.load(tmp_path / "cpu-w4-rtn")
    assert runner.dispatch_mode == "auto"
    assert nf.verify(tmp_path / "cpu-w4-rtn")["passed"]      # the dense copies decode from the bundle's graph


def test_no_speed_records_where_times_mean_nothing_or_none_were_asked(tmp_path):
    m = _compile(tmp_path, "onnx", batch_sizes=()).manifest
    assert m["speed"] == {"measured": False, "why": "no batch sizes named"}
    ok, why = get_backend("hls").times_here(get_target("alveo-u280"))
    assert not ok and "fpga/simulation.txt" in why
    ok, why = get_backend("mlir").times_here(get_target("mlir"))
    assert not ok and "reference JIT" in why
    if not torch.cuda.is_available():
        ok, why = get_backend("triton").times_here(get_target("h100"))
        assert not ok and "interpreter" in why


def test_onnx_file_is_timed_against_onnxruntime_on_the_file(tmp_path):
    model, x = _mlp(), torch.randn(2, 5, 64)
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (x,), path, input_names=["input"], dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    m = nf.compile(str(path), "onnx", example_inputs=(x,), out=tmp_path / "b", batch_sizes=(2,)).manifest
    assert set(m["speed"]["records"][0]["ms"]) == {"bundle", "dense on onnx", "onnxruntime (source model)"}


# --- verdicts and load ---------------------------------------------------------------------------------
def _record(bundle, alone, dense, load=None):
    r = {"batch": 1, "ms": {speed.BUNDLE: bundle, speed.COMPRESSED_ONLY: alone, "dense on tvm": dense},
         "speedup": {"vs dense on tvm": dense / bundle}}
    if load is not None:
        r["load"] = load
    return r


def test_a_dispatch_that_slows_the_bundle_is_called_slower():
    (line,) = speed.verdicts([_record(bundle=23.0, alone=19.8, dense=25.0)], "dense on tvm")
    assert "the per-shape dispatch makes it slower than its compressed kernels alone (0.86x: 23.00 ms vs 19.80 ms)" \
        in line
    assert "faster than that" not in line
    (line,) = speed.verdicts([_record(bundle=10.0, alone=15.0, dense=25.0)], "dense on tvm")
    assert "makes it faster than its compressed kernels alone (1.50x: 10.00 ms vs 15.00 ms)" in line


QUIET = {"cpus": 2, "samples": 12, "load_average": [3.0, 3.0, 3.0], "others_running_per_cpu": 0.1}
BUSY = {"cpus": 2, "samples": 12, "load_average": [0.5, 0.5, 0.5], "others_running_per_cpu": 1.0}


def test_busy_rule_reads_the_sampled_threads_and_falls_back_to_the_load_average():
    assert timing.busy(QUIET) == "" and timing.busy(None) == ""        # the samples outrank a lagging load average
    assert timing.busy(BUSY) == ("the machine was busy: other processes kept 2.0 threads runnable on 2 CPUs on "
                                "average while timing (1.00 per CPU, above 0.5)")
    unsampled = {"cpus": 2, "samples": 0, "others_running_per_cpu": None}
    assert timing.busy(unsampled | {"load_average": [2.0, 1.0, 1.0]}) == ""
    assert timing.busy(unsampled | {"load_average": [4.0, 1.0, 1.0]}).startswith(
        "the machine was busy: load average 4.00 on 2 CPUs (2.00 per CPU, above 1.5)")


def test_a_record_timed_on_a_busy_machine_says_it_is_unreliable():
    (line,) = speed.verdicts([_record(10.0, 15.0, 25.0, load=BUSY)], "dense on tvm")
    assert line.endswith("[unreliable: the machine was busy: other processes kept 2.0 threads runnable on 2 CPUs "
                         "on average while timing (1.00 per CPU, above 0.5)]")
    (line,) = speed.verdicts([_record(10.0, 15.0, 25.0, load=QUIET)], "dense on tvm")
    assert "unreliable" not in line


def test_the_load_meter_counts_other_busy_processes(busy_processes):
    import time
    if timing.others_running() is None:
        pytest.skip("no /proc to count runnable threads in")
    busy_processes(2)
    time.sleep(0.3)
    meter = timing.LoadMeter()
    for _ in range(5):
        meter.sample()
    load = meter.summary()
    # both busy processes are runnable at every sample (others may be too); this process's own threads are not counted
    assert min(meter.samples) >= 2 and load["samples"] == 5
    assert load["others_running_per_cpu"] >= 2 / load["cpus"]


def test_speed_records_carry_the_load_they_were_timed_under(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "others_running", lambda: 3)
    monkeypatch.setattr(timing, "cpu_count", lambda: 2)
    m = _compile(tmp_path, "onnx", batch_sizes=(1,)).manifest
    (rec,) = m["speed"]["records"]
    assert rec["load"]["samples"] >= 3 and rec["load"]["others_running_per_cpu"] == 1.5
    assert rec["load"]["unreliable"].startswith("the machine was busy")
    assert m["speed"]["verdicts"][0].endswith("(1.50 per CPU, above 0.5)]")


# --- inspect ---------------------------------------------------------------------------------------------
def _inspect(bundle, capsys) -> str:
    """What `nnforge inspect` prints for ``bundle``."""
    capsys.readouterr()
    assert main(["inspect", str(bundle.path)]) == 0
    return capsys.readouterr().out


def test_inspect_prints_the_speed_table_and_each_dispatched_layer(tmp_path, monkeypatch, capsys):
    _dense_wins_at_batch_4(monkeypatch)
    out = _inspect(_compile(tmp_path, "cpu", "w4-rtn"), capsys)
    assert "speed (measured when built" in out and "dense on tvm" in out and "torch eager" in out
    assert "batch 4: the bundle is" in out
    assert "v_0 (dispatched): compressed below 10 rows, dense from 10 rows; batch 1 (5 rows)" in out
    assert "the bundle's calls by threads: " in out and "(pool size: " in out
    assert "dense copies made at load: 0.0" in out


def test_inspect_warns_of_records_timed_on_a_busy_machine(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(timing, "others_running", lambda: 4)
    out = _inspect(_compile(tmp_path, "onnx", batch_sizes=(1, 4)), capsys)
    assert "warning: batch 1, 4 timed on a busy machine: the times above say more about the other work" in out


def test_inspect_prints_the_evidence_behind_the_dispatch(tmp_path, monkeypatch, capsys):
    _dense_wins_at_batch_4(monkeypatch)
    out = _inspect(_compile(tmp_path, "cpu", "w4-rtn"), capsys)
    assert "per-layer times at batch 1: add up to the whole model's (within +-15%)" in out


def test_inspect_says_why_nothing_was_measured(tmp_path, capsys):
    bundle = _compile(tmp_path, "onnx", batch_sizes=())
    capsys.readouterr()
    main(["inspect", str(bundle.path)])
    assert "speed: not measured: no batch sizes named" in capsys.readouterr().out

"""Per-shape dispatch between a compressed linear kernel and the dense GEMM (backends/tvm/dispatch.py,
kernels/dispatch.py): the decision rule, the joined kernel on both sides of its threshold, and
whole bundles whose dispatched layers give the reference's outputs in every mode. Decisions are
driven by injected in-model times here (a timed decision would be flaky); one test runs the real
in-model measurement and checks what it returns, and benchmarks/dispatch.py reports real decisions."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import lower_into

pytest.importorskip("tvm")

from nnforge.backends.base import BackendError  # noqa: E402
from nnforge.backends.tvm import TvmBackend  # noqa: E402
from nnforge.backends.tvm.dispatch import NEVER, Dispatcher, choose  # noqa: E402
from nnforge.backends.tvm.layer_timing import InModelTimes  # noqa: E402
from nnforge.ir import Dense, Graph, IntQuant, Sparse, run_graph, save_graph, tensor  # noqa: E402
from nnforge.passes.quantize.formats import parse_format, quantize_rtn  # noqa: E402
from nnforge.targets import get_target  # noqa: E402

SHAPES = [{"label": "batch 1", "batch": 1, "inputs": {"x": [1, 5, 64]}},
          {"label": "batch 32", "batch": 32, "inputs": {"x": [32, 5, 64]}}]
SHAPE_BATCHES = [("batch 1", 1), ("batch 32", 32)]


@pytest.fixture
def quiet_machine(monkeypatch):
    """No other process competes for the CPUs, as far as the load meter can tell."""
    monkeypatch.setattr("nnforge.timing.others_running", lambda: 0)


# --- the decision rule ---------------------------------------------------------------------------
@pytest.mark.parametrize("times,want", [
    ([(5, 1.0, 1.3), (160, 10.0, 6.0)], ("compressed", 29)),        # compressed small, dense large
    ([(5, 1.4, 1.0), (160, 6.0, 10.0)], ("dense", 29)),             # the other way round
    ([(5, 1.0, 1.3), (160, 6.0, 10.0)], ("compressed", NEVER)),     # compressed wins everywhere
    ([(5, 2.0, 1.0), (160, 20.0, 10.0)], ("compressed", 0)),        # dense wins everywhere
    ([(5, 1.0, 1.0), (160, 10.0, 9.7)], ("compressed", NEVER)),     # dense 3% faster: within the margin
])
def test_choose_splits_the_measured_sizes_once(times, want):
    assert choose(times, margin=0.05) == want


def test_choose_puts_the_threshold_between_the_sizes_it_separates():
    low, t = choose([(1, 1.0, 2.0), (2, 1.0, 2.0), (1000, 9.0, 3.0)], 0.05)
    assert low == "compressed" and 2 < t <= 1000


# --- the joined kernel -----------------------------------------------------------------------------
@pytest.mark.parametrize("compressed_below", [True, False])
def test_rows_dispatch_runs_each_kernel_on_its_side_of_the_threshold(compressed_below):
    import tvm
    from nnforge.backends.tvm import resolve_target
    from nnforge.backends.tvm.kernels.dense import dense_matmul, vector_lanes
    from nnforge.backends.tvm.kernels.dispatch import rows_dispatch
    from nnforge.backends.tvm.kernels.lowbit import int_weight_matmul
    n, k, target = 44, 64, "llvm -mcpu=native"       # n not a multiple of the vector: the epilogue's tail
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    scale = (rng.random((n, 1)) * 0.01).astype(np.float32)
    low = int_weight_matmul("w", codes, 4, scale, None, 64, n=n, k=k, target=target)
    dense = dense_matmul("d", n, k, target)
    f = rows_dispatch("nf_dispatch_w", low.func, dense.func, compressed_below,
                      lanes=vector_lanes(target)).with_attr("global_symbol", "f")
    lib = tvm.compile(tvm.IRModule({"f": f}), target=resolve_target(target))
    q = np.stack([codes & 15, codes >> 4], -1).reshape(n, k).astype(np.float32) - 8
    wt = (q * scale).astype(np.float32)
    # the dense panels hold a different weight, so the result tells which kernel ran
    other = rng.standard_normal((n, k)).astype(np.float32)
    nb = int(dense.notes["tile"].split("x")[1])
    blocks = -(-n // nb)
    padded = np.zeros((blocks * nb, k), np.float32)
    padded[:n] = other
    panels = np.ascontiguousarray(padded.reshape(blocks, nb, k).transpose(0, 2, 1))
    bias = rng.standard_normal(n).astype(np.float32)
    dev = tvm.cpu()
    for rows in (3, 9, 10, 40):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros((rows, n), np.float32), dev)
        args = [x, np.array([10], np.int64), *low.consts, panels, bias]
        lib["f"](*[tvm.runtime.tensor(a, dev) for a in args], y)
        compressed = (rows < 10) == compressed_below
        want = x @ (wt if compressed else other).T + bias
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-4, atol=1e-4)


def test_rows_dispatch_refuses_kernels_of_different_shapes():
    from nnforge.backends.tvm.kernels import KernelError
    from nnforge.backends.tvm.kernels.dense import dense_matmul
    from nnforge.backends.tvm.kernels.dispatch import rows_dispatch
    a, b = dense_matmul("a", 48, 64, "llvm -mcpu=native"), dense_matmul("b", 32, 64, "llvm -mcpu=native")
    with pytest.raises(KernelError, match="nf_dispatch_x: cannot dispatch between kernels whose y differ"):
        rows_dispatch("nf_dispatch_x", a.func, b.func, True)


# --- whole bundles ---------------------------------------------------------------------------------
def _linear_graph(enc) -> Graph:
    g = Graph("lin")
    x = g.add_input("x", tensor("f32", "batch", "seq", enc.shape[1]))
    bias = g.add_weight("fc.bias", Dense(torch.randn(enc.shape[0])))
    h = g.op("linear", x, g.add_weight("fc.weight", enc), bias, name="fc")
    g.set_outputs([g.op("relu", h, name="act")])
    return g


def checked(layers: dict, shapes, ok=True, why="") -> InModelTimes:
    """In-model times whose evidence check at every shape gave ``ok`` (with ``why``)."""
    return InModelTimes(layers, checks={label: {"ok": ok, "why": why} for label, _ in shapes},
                        clock={"clock": "perf_counter_ns", "tick_ns": 1})


def _fake_times(monkeypatch, compressed, dense):
    """In the model, every candidate layer's compressed kernel takes ``compressed(rows)`` ms and its
    dense one ``dense(rows)`` (rows = batch x 5 here), and the times passed their evidence check."""
    def fake(runner, layers, graph, inputs, shapes, rounds=3):
        assert runner.dispatch_mode == "auto" and set(runner.dispatch("dense").dispatch("auto").input_names) == {"x"}
        return checked({layer: {label: (compressed(5 * b), dense(5 * b)) for label, b in shapes} for layer in layers},
                       shapes)
    monkeypatch.setattr("nnforge.backends.tvm.measure_in_model", fake)
    monkeypatch.setattr("nnforge.backends.tvm.check_in_model", lambda *a: [])


def _lower(graph, tmp_path, speed=SHAPES, **options):
    backend = TvmBackend()
    lowered = lower_into(backend, graph, get_target("cpu").with_options(**options), tmp_path, speed=speed,
                         reference=[torch.randn(2, 5, graph.inputs[0].shape[-1])])
    return backend, lowered


def _encodings():
    torch.manual_seed(0)
    wt = torch.randn(32, 64)
    keep = (torch.rand(8, 1, 64, 1) < 0.4).expand(8, 4, 64, 1).reshape(32, 64)
    base = IntQuant.quantize(torch.randn(32, 64), 4, group_size=32)
    act_order = IntQuant(base.shape, 4, True, base.codes, base.scale, 32, None, torch.randperm(64))
    nvfp4 = quantize_rtn(wt * 0.1, parse_format("nvfp4"))
    return {"int4": IntQuant.quantize(wt, 4, group_size=32, symmetric=False), "int4 act-order": act_order,
            "block-sparse": Sparse.from_mask(wt, keep, "block4x1"),
            "nvfp4 act-order": dataclasses.replace(nvfp4, perm=torch.randperm(64)),
            "fp8": quantize_rtn(wt * 0.1, parse_format("e4m3"))}


@pytest.mark.parametrize("kind", ["int4", "int4 act-order", "block-sparse", "nvfp4 act-order", "fp8"])
def test_dispatched_layer_gives_the_reference_outputs_in_every_mode(tmp_path, monkeypatch, kind):
    _fake_times(monkeypatch, compressed=lambda rows: 0.001 * rows, dense=lambda rows: 0.05 + 0.0005 * rows)
    g = _linear_graph(_encodings()[kind])
    backend, lowered = _lower(g, tmp_path)
    d = lowered.entry["dispatch"]
    assert d["enabled"] and d["dispatched"] == 1
    (layer,) = d["layers"]
    assert layer["layer"] == "fc" and layer["low"] == "compressed" and 5 < layer["threshold"] <= 160
    assert [t["faster"] for t in layer["times"]] == ["compressed", "dense"]
    assert "compressed below" in layer["why"] and "batch 32 (160 rows)" in layer["why"]
    assert layer["dense_bytes"] == 32 * 64 * 4
    # the bundle stays compressed on disk: the dense copy is decoded from the graph's encoding at load
    decode = [p for p in lowered.entry["params"] if p.get("decode")]
    assert [p["key"] for p in decode] == ["fc.weight"] and "graph.json" in lowered.files
    assert not any(p["key"].endswith("::decoded") for p in lowered.entry["params"])
    runner = backend.load(tmp_path, lowered.entry)
    for batch, seq in ((1, 5), (32, 5), (2, 3)):
        x = torch.randn(batch, seq, 64)
        (want,) = run_graph(g, [x])
        for mode in ("auto", "compressed", "dense"):
            got = runner.dispatch(mode)(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{kind} {mode} batch {batch}")


def test_layer_where_the_compressed_kernel_wins_keeps_it(tmp_path, monkeypatch):
    _fake_times(monkeypatch, compressed=lambda rows: 0.001 * rows, dense=lambda rows: 0.01 * rows)
    backend, lowered = _lower(_linear_graph(_encodings()["int4"]), tmp_path)
    d = lowered.entry["dispatch"]
    assert d["dispatched"] == 0 and d["layers"][0]["dispatched"] is False
    assert "compressed kernel kept" in d["layers"][0]["why"]
    assert not any(p.get("decode") for p in lowered.entry["params"]) and "graph.json" not in lowered.files
    assert "nf_int_fc_weight" in lowered.entry["kernels"]["fc.weight"]["function"]


def test_dispatch_is_off_when_asked_or_without_shapes(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("measured although dispatch is off")
    monkeypatch.setattr("nnforge.backends.tvm.measure_in_model", boom)
    _, lowered = _lower(_linear_graph(_encodings()["int4"]), tmp_path / "off", dispatch=False)
    assert lowered.entry["dispatch"]["why_not"] == "turned off (target option dispatch = false)"
    _, lowered = _lower(_linear_graph(_encodings()["int4"]), tmp_path / "none", speed=[])
    assert "no shapes named" in lowered.entry["dispatch"]["why_not"]


@pytest.mark.parametrize("options,match", [({"dispatch_rows": [4]}, "unknown dispatch option.*dispatch_rows"),
                                           ({"dispatch_margin": 1.5}, r"dispatch_margin must be in \[0, 1\)")])
def test_bad_dispatch_options_are_errors_naming_them(tmp_path, options, match):
    with pytest.raises(BackendError, match=match):
        _lower(_linear_graph(_encodings()["int4"]), tmp_path, **options)


def test_runner_refuses_an_unknown_dispatch_mode(tmp_path, monkeypatch):
    _fake_times(monkeypatch, compressed=lambda rows: 0.001 * rows, dense=lambda rows: 0.05 + 0.0005 * rows)
    backend, lowered = _lower(_linear_graph(_encodings()["int4"]), tmp_path)
    with pytest.raises(BackendError, match="dispatch mode must be 'auto', 'compressed' or 'dense', got 'fast'"):
        backend.load(tmp_path, lowered.entry).dispatch("fast")


def test_missing_weight_for_a_dense_copy_is_an_error_naming_it(tmp_path, monkeypatch):
    _fake_times(monkeypatch, compressed=lambda rows: 0.001 * rows, dense=lambda rows: 0.05 + 0.0005 * rows)
    backend, lowered = _lower(_linear_graph(_encodings()["int4"]), tmp_path)
    entry = dict(lowered.entry)
    entry["params"] = [dict(p, key="nope") if p.get("decode") else p for p in entry["params"]]
    with pytest.raises(BackendError, match="a dispatched layer needs weight 'nope', which the graph lacks"):
        backend.load(tmp_path, entry)


def test_in_model_measurement_times_every_candidate_at_every_size(tmp_path):
    from nnforge.backends.tvm.layer_timing import measure_in_model
    # two layers of one shape and encoding: one shared function, told apart by call order
    g = Graph("two")
    x = g.add_input("x", tensor("f32", "batch", "seq", 64))
    for name in ("fc1", "fc2"):
        enc = IntQuant.quantize(torch.randn(64, 64), 4, group_size=32)
        x = g.op("relu", g.op("linear", x, g.add_weight(f"{name}.weight", enc), name=name))
    g.set_outputs([x])
    seen = {}

    def spy(runner, layers, graph, inputs, shapes, rounds=3):
        assert len(set(layers.values())) == 1, layers          # the two layers share a function
        seen["times"] = measure_in_model(runner, layers, graph, inputs, shapes, rounds)
        seen["mode"] = runner.dispatch_mode
        return seen["times"]
    import nnforge.backends.tvm as tvm_backend
    original = tvm_backend.measure_in_model
    tvm_backend.measure_in_model = spy
    try:
        _lower(g, tmp_path)
    finally:
        tvm_backend.measure_in_model = original
    times = seen["times"].layers
    assert set(times) == {"fc1", "fc2"} and all(set(t) == {"batch 1", "batch 32"} for t in times.values())
    assert all(c > 0 and d > 0 for t in times.values() for c, d in t.values()) and seen["mode"] == "auto"
    # every shape was checked, and the check's numbers are there whatever its verdict on this machine
    checks = seen["times"].checks
    assert set(checks) == {"batch 1", "batch 32"}
    for c in checks.values():
        assert set(c["modes"]) == {"compressed", "dense"} and c["load"]["samples"] > 0
        assert all(m["whole_ms"] > 0 and m["calls_ms"] > 0 and m["runs"] >= 3 for m in c["modes"].values())
        assert c["ok"] or c["why"]


class _SleepyRunner:
    """A runner whose whole-model time depends on the dispatch mode only."""
    def __init__(self, auto_s: float, compressed_s: float):
        self.times, self.mode = {"auto": auto_s, "compressed": compressed_s}, "auto"

    def dispatch(self, mode):
        self.mode = mode
        return self

    def __call__(self, *xs):
        import time
        time.sleep(self.times[self.mode])


@pytest.mark.parametrize("auto_s,kept", [(0.012, False), (0.002, True)])
def test_whole_model_check_moves_back_layers_that_did_not_pay(monkeypatch, quiet_machine, auto_s, kept):
    from nnforge.backends.tvm.dispatch import Dispatcher, check_in_model
    monkeypatch.setattr("nnforge.timing.PAUSE_S", 0.0)
    g = _linear_graph(_encodings()["int4"])
    times = {"fc": {"batch 1": (0.01, 0.02), "batch 32": (0.5, 0.2)}}     # dense wins at 160 rows
    d = Dispatcher({}, (True, ""), g, "test", shapes=SHAPES, times=checked(times, SHAPE_BATCHES))
    decision = d.plan("fc", "fc.weight", "k", "batch*seq", 4)
    assert decision.runs_at(160) == "dense" and decision.threshold == 29
    changed = check_in_model(_SleepyRunner(auto_s, 0.006), d, g, (torch.randn(1, 5, 64),),
                             [("batch 1", 1), ("batch 32", 32)])
    assert [c["shape"] for c in d.checks] == ["batch 32"] and d.checks[0]["kept"] is kept
    if kept:
        assert changed == [] and decision.runs_at(160) == "dense"
    else:
        # decided again without the dense kernel at 160 rows: compressed at every measured size
        assert changed == [decision] and decision.runs_at(160) == "compressed" and not decision.dispatched
        assert decision.why.startswith("compressed kernel kept: the whole-model check ruled the dense kernel out")
        assert "whole model at batch 32" in decision.why and decision.checked == ["batch 32"]


class _BatchRunner(_SleepyRunner):
    """Dispatch loses at batch 1 and pays at larger batches."""
    def __call__(self, *xs):
        import time
        if self.mode == "auto":
            time.sleep(0.012 if xs[0].shape[0] == 1 else 0.002)
        else:
            time.sleep(0.006)


def test_whole_model_check_rules_out_one_size_and_keeps_the_other(monkeypatch, quiet_machine):
    from nnforge.backends.tvm.dispatch import Dispatcher, check_in_model
    monkeypatch.setattr("nnforge.timing.PAUSE_S", 0.0)
    g = _linear_graph(_encodings()["int4"])
    d = Dispatcher({}, (True, ""), g, "test", shapes=SHAPES, times=checked({"fc": {"batch 1": (0.02, 0.01), "batch 32": (0.5, 0.2)}},
                                                            SHAPE_BATCHES))
    decision = d.plan("fc", "fc.weight", "k", "batch*seq", 4)
    assert decision.runs_at(5) == decision.runs_at(160) == "dense"
    check_in_model(_BatchRunner(0, 0), d, g, (torch.randn(1, 5, 64),), [("batch 1", 1), ("batch 32", 32)])
    assert [c["kept"] for c in d.checks] == [False, True]
    assert decision.runs_at(5) == "compressed" and decision.runs_at(160) == "dense" and decision.threshold == 29


# --- the evidence behind a decision --------------------------------------------------------------------
class _Clock:
    """A nanosecond clock that moves only when read (``step`` per read) or when the fake VM runs;
    ``quantum`` > 1 makes it coarse (it reads as multiples of the quantum)."""
    def __init__(self, step: int = 1, quantum: int = 1):
        self.t, self.step, self.quantum = 0, step, quantum

    def __call__(self) -> int:
        self.t += self.step
        return self.t // self.quantum * self.quantum


class _FakeVM:
    """A runner that "runs" one candidate layer ``fc`` among other calls by moving ``clock``, and
    calls the instrument hook around each call as the Relax VM does. A run without the hook also
    spends ``unaccounted`` times the calls' total outside any call (time the calls do not show)."""
    def __init__(self, clock: _Clock, layer_us: dict, unaccounted: float = 0.0):
        self.clock, self.layer_us, self.unaccounted = clock, layer_us, unaccounted
        self.hook, self.dispatch_mode = None, "auto"

    def set_instrument(self, fn):
        self.hook = fn

    def dispatch(self, mode):
        self.dispatch_mode = mode
        return self

    def __call__(self, *xs):
        mode = "compressed" if self.dispatch_mode in ("auto", "compressed") else "dense"
        rows = xs[0].shape[0] * xs[0].shape[1]
        program = [("vm.builtin.alloc_tensor", 0), ("nf_dispatch_fc_weight", 1000 * self.layer_us[mode](rows)),
                   ("vm.builtin.reshape", 0), ("relu", 2000)]
        for symbol, ns in program:
            if self.hook:
                self.hook(None, symbol, True, None)
            self.clock.t += int(ns)
            if self.hook:
                self.hook(None, symbol, False, None)
        if not self.hook:
            self.clock.t += int(self.unaccounted * sum(ns for _, ns in program))


def _measure_fake(vm, clock):
    from nnforge.backends.tvm.layer_timing import measure_in_model
    g = _linear_graph(_encodings()["int4"])
    return g, measure_in_model(vm, {"fc": "nf_dispatch_fc_weight"}, g, (torch.randn(1, 5, 64),), SHAPE_BATCHES,
                               clock=clock)


# dense wins at 160 rows by far: a decision to dispatch there, if the times may carry one
LAYER_US = {"compressed": lambda rows: 10.0 * rows, "dense": lambda rows: 400.0 + 2.0 * rows}


def test_times_that_add_up_carry_a_decision(quiet_machine):
    clock = _Clock()
    g, times = _measure_fake(_FakeVM(clock, LAYER_US, unaccounted=0.02), clock)
    assert all(c["ok"] for c in times.checks.values()), times.checks
    check = times.checks["batch 32"]["modes"]["dense"]
    assert check["layers_ms"] == pytest.approx(0.72, rel=1e-3) and check["other_calls_ms"] == pytest.approx(0.002, rel=1e-2)
    assert times.layers["fc"]["batch 32"] == pytest.approx((1.6, 0.72), rel=1e-3)
    d = Dispatcher({}, (True, ""), g, "test", shapes=SHAPES, times=times)
    decision = d.plan("fc", "fc.weight", "k", "batch*seq", 4)
    assert decision.dispatched and decision.runs_at(5) == "compressed" and decision.runs_at(160) == "dense"
    assert d.to_dict()["evidence"]["checks"]["batch 32"]["ok"]


def test_times_that_do_not_add_up_decide_nothing(quiet_machine):
    clock = _Clock()
    # whole runs take three times what their calls add up to: the calls' times are not the model's
    g, times = _measure_fake(_FakeVM(clock, LAYER_US, unaccounted=2.0), clock)
    check = times.checks["batch 32"]
    assert not check["ok"] and check["modes"]["dense"]["off"] == pytest.approx(-2 / 3, abs=0.01)
    assert "with compressed kernels the calls add up to 1.602 ms" in check["why"]
    assert "against 4.806 ms for the whole model (-67%, outside +-15%)" in check["why"]
    d = Dispatcher({}, (True, ""), g, "test", shapes=SHAPES, times=times)
    decision = d.plan("fc", "fc.weight", "k", "batch*seq", 4)
    assert not decision.dispatched and decision.runs_at(160) == "compressed"
    assert decision.why.startswith("compressed kernel kept: no measured shape's times passed the evidence check")
    assert "these times decide nothing: with compressed kernels the calls add up to" in decision.why
    assert all(t["refused"] == times.checks[t["shape"]]["why"] for t in decision.times)


def test_times_the_clock_does_not_resolve_decide_nothing(quiet_machine):
    # a clock that steps 4 ms at a time (a scheduler tick) against layer times well under that
    clock = _Clock(step=1000, quantum=4_000_000)
    g, times = _measure_fake(_FakeVM(clock, LAYER_US, unaccounted=0.02), clock)
    assert times.clock["tick_ns"] == 4_000_000
    d = Dispatcher({}, (True, ""), g, "test", shapes=SHAPES, times=times)
    decision = d.plan("fc", "fc.weight", "k", "batch*seq", 4)
    assert not decision.dispatched and decision.runs_at(160) == "compressed"
    assert "span fewer than 20 steps of the clock" in decision.why and "smallest step 4.0000 ms" in decision.why


def test_times_taken_on_a_busy_machine_decide_nothing(monkeypatch):
    monkeypatch.setattr("nnforge.timing.others_running", lambda: 3)
    monkeypatch.setattr("nnforge.timing.cpu_count", lambda: 2)
    clock = _Clock()
    g, times = _measure_fake(_FakeVM(clock, LAYER_US, unaccounted=0.02), clock)
    assert all(not c["ok"] for c in times.checks.values())
    assert times.checks["batch 1"]["why"] == ("the machine was busy: other processes kept 3.0 threads runnable on 2 "
                                             "CPUs on average while timing (1.50 per CPU, above 0.5)")
    decision = Dispatcher({}, (True, ""), g, "test", shapes=SHAPES, times=times).plan("fc", "fc.weight", "k", "batch*seq", 4)
    assert not decision.dispatched and "the machine was busy" in decision.why


def test_whole_model_check_on_a_busy_machine_moves_layers_back(monkeypatch):
    from nnforge.backends.tvm.dispatch import check_in_model
    monkeypatch.setattr("nnforge.timing.PAUSE_S", 0.0)
    g = _linear_graph(_encodings()["int4"])
    d = Dispatcher({}, (True, ""), g, "test", shapes=SHAPES, times=checked({"fc": {"batch 1": (0.01, 0.02), "batch 32": (0.5, 0.2)}},
                                                            SHAPE_BATCHES))
    decision = d.plan("fc", "fc.weight", "k", "batch*seq", 4)
    monkeypatch.setattr("nnforge.timing.others_running", lambda: 4)
    check_in_model(_SleepyRunner(0.002, 0.006), d, g, (torch.randn(1, 5, 64),), SHAPE_BATCHES)
    assert d.checks[0]["kept"] is False and d.checks[0]["load"]["unreliable"].startswith("the machine was busy")
    assert decision.runs_at(160) == "compressed" and "timed while the machine was busy" in decision.why


def test_real_measurement_beside_busy_processes_decides_only_on_evidence(tmp_path, busy_processes):
    """Two busy processes beside the real in-model timing: each shape's times either pass the
    evidence check, or every layer keeps its compressed kernel there and says why."""
    busy_processes(2)
    _, lowered = _lower(_linear_graph(_encodings()["int4"]), tmp_path)
    d = lowered.entry["dispatch"]
    checks = d["evidence"]["checks"]
    assert set(checks) == {"batch 1", "batch 32"}
    for label, c in checks.items():
        assert c["load"]["samples"] > 0 and c["load"]["others_running_per_cpu"] >= 1.5 / c["load"]["cpus"]
        assert c["ok"] or c["why"]
    for layer in d["layers"]:
        for t in layer["times"]:
            if not checks[t["shape"]]["ok"]:
                high = "dense" if layer["low"] == "compressed" else "compressed"
                assert (layer["low"] if t["rows"] < layer["threshold"] else high) == "compressed"
                assert t["refused"] and t["refused"] in layer["why"]

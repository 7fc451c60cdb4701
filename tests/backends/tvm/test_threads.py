"""TVM's thread pool (backends/tvm/threads.py): the settings nnforge asks for, a user's own setting
kept, a pool sized by the load (every CPU when quiet, CPUs less other processes' runnable threads
when not: a busy machine otherwise makes every kernel's barrier wait for a scheduler tick, see
benchmarks/cpu_under_load.py), and runners and manifests saying which pool they ran on."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests import conftest

pytest.importorskip("tvm")

from nnforge.backends.tvm import TvmBackend, threads  # noqa: E402
from nnforge.ir import Dense, Graph, save_graph, tensor  # noqa: E402
from nnforge.timing import cpu_count  # noqa: E402
from nnforge.targets import get_target  # noqa: E402

KEYS = (threads.NUM_THREADS, threads.SPIN_COUNT, threads.BIND)


@pytest.fixture
def fresh_env(monkeypatch):
    """An environment without the pool settings, and a configure() that has not run yet."""
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(threads, "_USER_SET", None)


needs_proc = pytest.mark.skipif(not threads.can_count_others(), reason="needs /proc to count runnable threads")


@needs_proc
def test_configure_asks_for_every_cpu_unpinned_and_a_pool_sized_by_the_load(fresh_env):
    got = threads.configure()
    assert got["env"] == {threads.NUM_THREADS: str(cpu_count()), threads.BIND: "0"}
    assert got["user_set"] == [] and all(os.environ[k] == v for k, v in got["env"].items())
    assert threads.SPIN_COUNT not in os.environ and threads.adaptive()
    assert got["size"].startswith("CPUs less other processes' runnable threads (at least 1")


def test_a_thread_count_the_user_set_is_kept_and_fixes_the_pool(fresh_env, monkeypatch):
    monkeypatch.setenv(threads.NUM_THREADS, "1")
    got = threads.configure()
    assert got["env"][threads.NUM_THREADS] == "1" and got["user_set"] == [threads.NUM_THREADS]
    assert got["size"] == "fixed by the user: TVM_NUM_THREADS=1" and not threads.adaptive()
    assert threads.configure()["user_set"] == [threads.NUM_THREADS]     # the same answer on every later call
    assert threads.fit() == 1


@pytest.mark.parametrize("cpus,others,most,want", [(2, 0, 2, 2), (2, 1, 2, 1), (2, 5, 2, 1), (16, 2, 16, 14),
                                                   (16, 0, 8, 8)])
def test_pool_size_is_the_cpus_other_processes_leave(cpus, others, most, want):
    assert threads.pool_size(cpus, others, most) == want


def _bundle(tmp_path: Path):
    torch.manual_seed(0)
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", 256))
    for i in range(2):
        x = g.op("relu", g.op("linear", x, g.add_weight(f"fc{i}.weight", Dense(torch.randn(256, 256))), name=f"fc{i}"))
    g.set_outputs([x])
    return conftest.lower_into(TvmBackend(), g, "cpu", tmp_path)


def _pool_threads() -> int:
    import tvm_ffi
    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def test_runner_and_manifest_entry_say_which_pool_they_ran_on(tmp_path):
    lowered = _bundle(tmp_path)
    assert lowered.entry["threads"]["env"][threads.NUM_THREADS] == os.environ[threads.NUM_THREADS]
    assert lowered.entry["threads"]["size"] == threads.policy()
    runner = TvmBackend().load(tmp_path, lowered.entry)
    runner(torch.randn(4, 256))
    got = runner.threads
    assert got["size"] == threads.policy() and sum(got["calls_by_threads"].values()) == 1


@pytest.fixture
def adaptive_runner(tmp_path, monkeypatch):
    """A runner whose pool follows the load at every call (no user setting, no recheck delay)."""
    if not threads.can_count_others() or cpu_count() < 2:
        pytest.skip("needs /proc and two CPUs (one CPU: a pool of one thread whatever the load)")
    monkeypatch.setattr(threads, "_USER_SET", [])
    monkeypatch.setattr(threads, "RECHECK_S", 0.0)
    return TvmBackend().load(tmp_path, _bundle(tmp_path).entry)


def test_the_pool_shrinks_while_other_processes_want_the_cpus(adaptive_runner, monkeypatch):
    x = torch.randn(64, 256)
    monkeypatch.setattr("nnforge.timing.others_running", lambda: cpu_count())
    adaptive_runner(x)
    assert _pool_threads() == 1
    monkeypatch.setattr("nnforge.timing.others_running", lambda: 0)
    want = adaptive_runner(x)
    assert _pool_threads() == cpu_count()
    assert adaptive_runner.threads["calls_by_threads"] == {"1": 1, str(cpu_count()): 1}
    monkeypatch.undo()
    torch.testing.assert_close(adaptive_runner(x), want)


def test_beside_two_busy_processes_the_pool_leaves_them_their_cpus(adaptive_runner, busy_processes):
    import time
    busy_processes(2)
    time.sleep(0.3)
    adaptive_runner(torch.randn(64, 256))
    size = _pool_threads()
    assert size == max(1, cpu_count() - 2) or size < cpu_count() - 2     # others may be busy too

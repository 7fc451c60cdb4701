"""TVM's thread pool settings (backends/tvm/threads.py): what nnforge asks for, that a user's own
setting wins, that runners and manifests say which settings they ran with, and that the pool's
workers sleep between kernels instead of spinning (a spinning worker is what a busy machine turns
into a scheduler tick per kernel: benchmarks/cpu_under_load.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

from nnforge.backends.tvm import TvmBackend, threads  # noqa: E402
from nnforge.ir import Dense, Graph, save_graph, tensor  # noqa: E402
from nnforge.targets import get_target  # noqa: E402

KEYS = (threads.NUM_THREADS, threads.SPIN_COUNT, threads.BIND)


@pytest.fixture
def fresh_env(monkeypatch):
    """An environment without the pool settings, and a configure() that has not run yet."""
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(threads, "_USER_SET", None)


def test_configure_asks_for_every_cpu_and_sleeping_unpinned_workers(fresh_env):
    got = threads.configure()
    assert got["env"] == {threads.NUM_THREADS: str(threads.cpu_count()), threads.SPIN_COUNT: "0", threads.BIND: "0"}
    assert got["user_set"] == [] and all(os.environ[k] == got["env"][k] for k in KEYS)


def test_a_setting_the_user_made_wins_and_is_reported(fresh_env, monkeypatch):
    monkeypatch.setenv(threads.NUM_THREADS, "1")
    got = threads.configure()
    assert got["env"][threads.NUM_THREADS] == "1" and got["user_set"] == [threads.NUM_THREADS]
    assert got["env"][threads.SPIN_COUNT] == "0"
    assert threads.configure()["user_set"] == [threads.NUM_THREADS]     # the same answer on every later call


def _bundle(tmp_path: Path):
    torch.manual_seed(0)
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", 256))
    for i in range(2):
        x = g.op("relu", g.op("linear", x, g.add_weight(f"fc{i}.weight", Dense(torch.randn(256, 256))), name=f"fc{i}"))
    g.set_outputs([x])
    save_graph(g, tmp_path / "graph.json", tmp_path / "weights.safetensors")     # the runner reads weights there
    lowered = TvmBackend().lower(g, get_target("cpu"), tmp_path)
    (tmp_path / "entry.json").write_text(json.dumps(lowered.entry))
    return lowered


def test_runner_and_manifest_entry_say_which_pool_settings_they_ran_with(tmp_path):
    lowered = _bundle(tmp_path)
    assert lowered.entry["threads"]["env"][threads.SPIN_COUNT] == os.environ[threads.SPIN_COUNT]
    runner = TvmBackend().load(tmp_path, lowered.entry)
    assert runner.threads == threads.configure()


# Runs the bundle in a fresh process, then reports the state of the threads the run started (TVM's
# workers) a little after it returned: "R" for a thread that is spinning (runnable), "S" asleep.
PROBE = """
import json, os, sys, time
import numpy as np
from nnforge.backends.tvm import TvmBackend
def tasks():
    return set(os.listdir("/proc/self/task"))
before = tasks()
path = sys.argv[1]
runner = TvmBackend().load(path, json.load(open(os.path.join(path, "entry.json"))))
x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
for _ in range(20):
    runner(x)
time.sleep(0.02)
states = []
for tid in sorted(tasks() - before):
    stat = open(f"/proc/self/task/{tid}/stat").read()
    states.append(stat[stat.rindex(")") + 2])
print(json.dumps(states))
"""


def _worker_states(path: Path, env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, os.fspath(path)], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k not in KEYS} | env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(threads.cpu_count() < 2 or not Path("/proc/self/task").is_dir(),
                    reason="needs two CPUs (a pool with workers) and /proc")
def test_pool_workers_sleep_after_a_run_instead_of_spinning(tmp_path):
    _bundle(tmp_path)
    spinning = _worker_states(tmp_path, {threads.SPIN_COUNT: "300000"})      # TVM's own default, as a control
    assert "R" in spinning, f"the control saw no spinning worker ({spinning}): the probe cannot tell"
    states = _worker_states(tmp_path, {})
    assert states and "R" not in states, states

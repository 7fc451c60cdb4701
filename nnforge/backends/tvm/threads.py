"""How TVM's CPU thread pool runs the bundle's kernels: every CPU, workers that sleep between
kernels, and no thread pinned to a core.

TVM's pool (``src/runtime/thread_pool.cc``) starts ``TVM_NUM_THREADS`` threads, pins each worker to
one core (``TVM_BIND_THREADS``), and after each kernel keeps them spinning on ``sched_yield`` for
``TVM_THREAD_POOL_SPIN_COUNT`` rounds (300000 by default) before they sleep. Every parallel kernel
ends at a barrier that waits for all of them. On a quiet machine that saves a wake-up per kernel;
on a busy one it is a disaster: a worker that has been yielding sits behind the other processes'
threads on its pinned core until the next scheduler tick, so every kernel of the model waits for a
tick, and the model slows by far more than its share of the CPUs. A worker that sleeps is woken
when the next kernel comes, and one that is not pinned runs on whichever core frees up first.
``benchmarks/cpu_under_load.py`` measures both settings, quiet and beside busy processes.

TVM reads these variables once, when its pool starts (at the first parallel kernel of the
process), so they are set when this backend is imported, before any kernel runs; a value the user
set is kept.
"""
from __future__ import annotations

import os

NUM_THREADS, SPIN_COUNT, BIND = "TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT", "TVM_BIND_THREADS"


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # not on Linux
        return os.cpu_count() or 1


def defaults() -> dict[str, str]:
    """The pool settings nnforge asks for. TVM's own default thread count halves the CPU count (it
    assumes two hyper-threads per core); every CPU is used instead."""
    return {NUM_THREADS: str(cpu_count()), SPIN_COUNT: "0", BIND: "0"}


_USER_SET: list[str] | None = None        # the settings the environment held at the first call


def configure() -> dict:
    """Set each of :func:`defaults` the environment does not already set; the settings in effect,
    and which of them the user set (what the runner and the manifest report)."""
    global _USER_SET
    wanted = defaults()
    if _USER_SET is None:
        _USER_SET = sorted(k for k in wanted if k in os.environ)
    return {"env": {key: os.environ.setdefault(key, value) for key, value in wanted.items()},
            "user_set": list(_USER_SET), "note": "read by TVM when its thread pool starts (once per process)"}


__all__ = ["configure", "cpu_count", "defaults", "NUM_THREADS", "SPIN_COUNT", "BIND"]

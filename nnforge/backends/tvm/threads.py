"""How many threads TVM's CPU thread pool runs a bundle's kernels on: every CPU on a quiet
machine, fewer when other processes want the CPUs, decided again before a call when the last
decision is older than ``RECHECK_S``.

TVM's pool (``src/runtime/thread_pool.cc``) ends every parallel kernel at a barrier that waits for
all its workers, and keeps idle workers spinning on ``sched_yield`` between kernels (for
``TVM_THREAD_POOL_SPIN_COUNT`` rounds). On a quiet machine the spinning saves a wake-up per kernel.
When other processes keep the CPUs busy, a worker that has been yielding sits behind them until
the next scheduler tick, so every kernel of the model waits for a tick and the model slows by far
more than its share of the CPUs. A pool of ``CPUs - other runnable threads`` (at least one) leaves
the kernels no worker to wait for on a busy machine, and runs at full width on a quiet one.
``benchmarks/cpu_under_load.py`` measures it, quiet and beside busy processes.

The pool is TVM's own, one per calling thread; its size changes through TVM's
``runtime.config_threadpool``. ``TVM_NUM_THREADS`` (the most threads; read once, when the pool
starts) and ``TVM_BIND_THREADS=0`` (no worker pinned to a core, so none waits on a busy one) are
set when this backend is imported, before any kernel runs. A ``TVM_NUM_THREADS`` the user set is
kept and fixes the size. Where other processes' threads cannot be counted (no ``/proc``), workers
sleep between kernels instead (``TVM_THREAD_POOL_SPIN_COUNT=0``), which costs a wake-up per kernel
on a quiet machine and keeps a busy one from stalling every kernel.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from collections import Counter

from ... import timing

NUM_THREADS, SPIN_COUNT, BIND = "TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT", "TVM_BIND_THREADS"
RECHECK_S = 0.2                 # how long a decision on the pool's size stands
KBIG = 1                        # TVM's affinity mode "big cores" (every core here; TVM_BIND_THREADS=0 pins none)


@functools.lru_cache(maxsize=None)
def can_count_others() -> bool:
    return timing.others_running() is not None


def defaults() -> dict[str, str]:
    """The pool settings nnforge asks for. TVM's own default thread count halves the CPU count (it
    assumes two hyper-threads per core); every CPU is used instead."""
    out = {NUM_THREADS: str(timing.cpu_count()), BIND: "0"}
    if not can_count_others():
        out[SPIN_COUNT] = "0"
    return out


_USER_SET: list[str] | None = None        # the settings the environment held at the first call


def configure() -> dict:
    """Set each of :func:`defaults` the environment does not already set; the settings in effect,
    which of them the user set, and how the pool's size is chosen (what runners and manifests
    report)."""
    global _USER_SET
    wanted = defaults()
    if _USER_SET is None:
        _USER_SET = sorted(k for k in (NUM_THREADS, SPIN_COUNT, BIND) if k in os.environ)
    env = {key: os.environ.setdefault(key, value) for key, value in wanted.items()}
    if SPIN_COUNT in os.environ:
        env[SPIN_COUNT] = os.environ[SPIN_COUNT]
    return {"env": env, "user_set": list(_USER_SET), "size": policy()}


def adaptive() -> bool:
    """Whether the pool's size follows the load (not where the user fixed it or nothing can be counted)."""
    return NUM_THREADS not in (_USER_SET or []) and can_count_others()


def policy() -> str:
    if NUM_THREADS in (_USER_SET or []):
        return f"fixed by the user: {NUM_THREADS}={os.environ.get(NUM_THREADS)}"
    if not can_count_others():
        return "every CPU (other processes' threads cannot be counted here; workers sleep between kernels)"
    return (f"CPUs less other processes' runnable threads (at least 1, at most {NUM_THREADS}), decided again "
            f"before a call when the last decision is over {RECHECK_S} s old")


def pool_size(cpus: int, others: int, most: int) -> int:
    """Threads for a pool on ``cpus`` CPUs while ``others`` threads of other processes are runnable."""
    return max(1, min(most, cpus - others))


_LOCAL = threading.local()      # TVM keeps one pool per calling thread


def most() -> int:
    """The most threads a pool of this process runs kernels on (its size on a quiet machine)."""
    return int(os.environ.get(NUM_THREADS) or timing.cpu_count())


def fit() -> int:
    """Size the calling thread's TVM pool for the machine as it is now (no more often than every
    ``RECHECK_S``); the threads its next kernels run on."""
    most_threads = most()
    if not adaptive():
        return most_threads
    now = time.monotonic()
    if now - getattr(_LOCAL, "checked", -RECHECK_S) < RECHECK_S:
        return _LOCAL.size
    _LOCAL.checked = now
    others = timing.others_running()
    size = most_threads if others is None else pool_size(timing.cpu_count(), others, most_threads)
    if size != getattr(_LOCAL, "size", None):
        import tvm_ffi
        tvm_ffi.get_global_func("runtime.config_threadpool")(KBIG, size)
        _LOCAL.size = size
    return size


class Usage:
    """How many calls of one runner ran on each pool size."""

    def __init__(self):
        self.calls: Counter = Counter()

    def fit(self) -> None:
        self.calls[fit()] += 1

    def to_dict(self) -> dict:
        return {**configure(), "calls_by_threads": {str(k): v for k, v in sorted(self.calls.items())}}


__all__ = ["Usage", "adaptive", "configure", "defaults", "fit", "pool_size", "policy", "RECHECK_S",
           "NUM_THREADS", "SPIN_COUNT", "BIND"]

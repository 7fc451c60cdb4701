"""Timing shared by the benchmark scripts: several runtimes measured in one process, fairly.

Each runtime keeps worker threads that spin for a while after a call (OpenMP in torch, ONNX
Runtime's pool, TVM's pool); on a 2-core machine a runner timed right after another one competes
with those spinning threads. So runners are timed in stretches that alternate between them (a
change of machine load hits all alike), each stretch after a pause long enough for the previous
runner's threads to go to sleep, and a warm-up call.
"""
from __future__ import annotations

import statistics
import time

PAUSE_S = 0.3     # libgomp and ONNX Runtime stop spinning well within this


def alternating_ms(runners: dict, args, rounds: int, passes: int = 3) -> dict[str, float]:
    """Median milliseconds per call of each runner on ``args``, over ``rounds`` calls split into
    ``passes`` stretches that alternate between the runners."""
    samples = {k: [] for k in runners}
    for _ in range(passes):
        for name, run in runners.items():
            time.sleep(PAUSE_S)
            run(*args)
            for _ in range(max(1, rounds // passes)):
                t0 = time.perf_counter()
                run(*args)
                samples[name].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in samples.items()}

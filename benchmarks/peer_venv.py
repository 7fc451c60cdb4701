"""A peer's own virtual environment: peers whose pins would pull nnforge's environment back (kvpress,
llm-compressor, auto-round) are installed once under the benchmark's work folder and run as
subprocesses. A stamp holding the pins marks an install done; a venv whose install broke off or whose
pins changed is installed again. torch goes first in the same pip command, pinned to the CPU build,
so that pip never resolves a peer's torch requirement to a CUDA build.

    >>> py = ensure_venv(work / "kvpress-venv", PINS, "import kvpress", KvPeerError, "kv_peers")
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

STAMP = ".peer-pins"


def run_step(what: str, cmd: list[str], venv: Path, error: type[Exception]) -> None:
    """``cmd``, or ``error`` naming the environment, the step and the end of its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stdout[-2000:] + "\n" + done.stderr[-3000:]).strip()
        raise error(f"peer environment {venv}: {what} failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}")


def ensure_venv(venv: Path, pins: list[str], imports: str, error: type[Exception], who: str,
                python: str = sys.executable) -> Path:
    """The python of the virtual environment ``venv`` with ``pins`` installed and ``imports`` (a
    Python statement) checked, installed when its stamp does not hold these pins."""
    venv = Path(venv)
    py = venv / "bin" / "python"
    stamp = venv / STAMP
    if py.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == pins:
        return py
    started = time.perf_counter()
    print(f"{who}: installing into {venv} ({' '.join(pins)})", file=sys.stderr, flush=True)
    if not py.is_file():
        run_step("creating the virtual environment", [python, "-m", "venv", str(venv)], venv, error)
    run_step("pip install", [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", *pins], venv, error)
    run_step(f"checking `{imports}`", [str(py), "-c", imports], venv, error)
    stamp.write_text(json.dumps(pins))
    print(f"{who}: environment ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return py

"""Shared fixtures. Tests mirror the source tree; hardware-free tests only (CI has no GPU)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# nf.compile times every bundle whose target runs here at batch sizes 1 and 32 (nnforge.speed);
# the suite compiles hundreds of bundles, so that is off here and on in tests/test_speed.py.
os.environ.setdefault("NNFORGE_BATCH_SIZES", "none")
warnings.filterwarnings("ignore", category=FutureWarning)
# `make test` runs the suite in one pytest-xdist worker per core (PYTEST_XDIST_WORKER_COUNT): each
# worker then takes its share of the cores, so two workers on two cores do not fight over four threads
# (TVM's pool follows the load by itself: nnforge.backends.tvm.threads)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, os.cpu_count() or 1) // _workers)
torch.set_num_threads(_threads)


@pytest.fixture(scope="session")
def default_model():
    """(DefaultModel, tokenizer): all-MiniLM-L6-v2 + mean pooling, loaded offline."""
    from nnforge.models import load_default_model
    return load_default_model()


@pytest.fixture(scope="session")
def default_inputs(default_model):
    """(input_ids, attention_mask) for 6 held-out sentences of different lengths."""
    from nnforge.models import encode, sentence_splits
    _, tok = default_model
    _, evals = sentence_splits()
    return encode(tok, evals[:6])


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def tiny_mlp():
    """A small torch MLP with a symbolic-batch-friendly structure."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()


@pytest.fixture
def busy_processes():
    """``start(n)`` starts n processes that spin (a busy machine beside the test); all are killed
    when the test ends."""
    procs = []

    def start(n: int = 2) -> None:
        procs.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n))
    yield start
    for p in procs:
        p.kill()
        p.wait()


def lower_into(backend, graph, target, out_dir, *, shapes=None, speed=None, reference=None, steps=None):
    """``backend`` lowering ``graph`` for ``target`` into ``out_dir`` the way ``nf.compile`` does
    (nnforge.pipeline.lower_into: graph and weights written, prepare passes run, a LowerContext)."""
    from nnforge.pipeline import lower_into as pipeline_lower_into
    from nnforge.targets import get_target
    out_dir.mkdir(parents=True, exist_ok=True)
    target = get_target(target) if isinstance(target, str) else target
    return pipeline_lower_into(out_dir, graph, target, backend, recipe="test", shapes=shapes or {}, speed=speed,
                               reference=reference, steps=steps)

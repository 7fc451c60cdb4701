"""A mixture-of-experts model (the tiny random-init Mixtral of tests/architectures.py, wrapped to
return logits) compiles on every backend that runs here, verifies, and matches torch on fresh
inputs; Core ML builds and verifies its package (it runs on macOS only). The FPGA target's test is
in tests/backends/hls/test_architectures.py with the other architectures on alveo-u280."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is imported, anywhere

import pytest
import torch

import nnforge as nf
from tests.architectures import ARCHITECTURES

MIXTRAL = ARCHITECTURES["mixtral"]
# (target, largest error allowed against torch, relative to the logits' scale): float32 backends
# are float32 apart; Triton computes in float16
RUNS_HERE = {"onnx": 1e-5, "cpu": 1e-5, "mlir": 1e-5, "h100": 5e-3}


@pytest.fixture(scope="module")
def model():
    return MIXTRAL.build()


def _compile(model, target, out):
    return nf.compile(model, target, example_inputs=MIXTRAL.inputs(batch=1, size=8, seed=0), out=out,
                      batch_sizes=())


@pytest.mark.parametrize("target", [t if t == "onnx" else pytest.param(t, marks=pytest.mark.slow)
                                    for t in sorted(RUNS_HERE)])
def test_mixtral_compiles_verifies_and_matches_torch(model, tmp_path, target):
    if target in ("cpu", "mlir"):
        pytest.importorskip({"cpu": "tvm", "mlir": "torch_mlir"}[target])
    bundle = _compile(model, target, tmp_path / "b")
    assert nf.verify(bundle.path)["passed"]
    runner = nf.load(bundle.path)
    for seed in (1, 2):
        ids = MIXTRAL.inputs(batch=1, size=8, seed=seed)[0]
        with torch.no_grad():
            want = model(ids)
        got = torch.as_tensor(runner(ids)).float()
        err = float((got - want).abs().max())
        assert err <= RUNS_HERE[target] * max(1.0, float(want.abs().max())), f"{target} seed {seed}: {err}"


@pytest.mark.slow
def test_mixtral_builds_a_core_ml_package_that_verifies(model, tmp_path):
    pytest.importorskip("coremltools")
    from nnforge.backends.coreml.verify import load_program
    bundle = _compile(model, "apple-a17", tmp_path / "b")
    program = load_program(bundle.path / bundle.manifest["backend"]["entry"]["model"])
    assert {"topk", "argsort", "scatter_nd"} <= {op.op_type for op in program.functions["main"].operations}
    assert nf.verify(bundle.path)["passed"]

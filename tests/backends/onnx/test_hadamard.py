"""The onnx backend's ``hadamard`` (Reshape and MatMuls with the block's Kronecker factors) against
the interpreter, on tests/backends/hadamard_cases.py's graph."""
from __future__ import annotations

import os

import onnx
from onnx import numpy_helper

from tests import conftest
from tests.backends.hadamard_cases import CASES, check, hadamard_graph

from nnforge.backends.onnx import MODEL_FILE, OnnxBackend
from nnforge.ir.hadamard import ONE_PRODUCT


def test_hadamard_matches_the_interpreter(tmp_path):
    g = hadamard_graph()
    backend = OnnxBackend()
    lowered = conftest.lower_into(backend, g, "onnx", tmp_path)
    onnx.checker.check_model(os.fspath(tmp_path / MODEL_FILE), full_check=True)
    assert not lowered.fallbacks
    check(g, backend.load(tmp_path, lowered.entry))
    # each block's factors, never its whole matrix, each factor once
    model = onnx.load(os.fspath(tmp_path / MODEL_FILE))
    made = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("hadamard")]
    assert max(max(m.shape) for m in made) == 64
    assert len({(m.dtype.str, m.shape, m.tobytes()) for m in made}) == len(made)
    assert [n.op_type for n in model.graph.node].count("MatMul") == sum(1 if b <= ONE_PRODUCT else 2 for *_, b in CASES)

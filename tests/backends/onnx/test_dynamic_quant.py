"""The onnx backend's ``dynamic_quant`` against the interpreter, bit for bit, on
tests/backends/dynamic_quant_cases.py's graph: int8/int4/E4M3/MXFP8 as blocked
QuantizeLinear/DequantizeLinear pairs with run-time scales, MXFP4 and NVFP4 in elementwise ops."""
from __future__ import annotations

import os

import onnx

from tests import conftest
from tests.backends.dynamic_quant_cases import check, dynamic_quant_graph

from nnforge.backends.onnx import MODEL_FILE, OnnxBackend


def test_dynamic_quant_matches_the_interpreter(tmp_path):
    g = dynamic_quant_graph()
    backend = OnnxBackend()
    lowered = conftest.lower_into(backend, g, "onnx", tmp_path)
    onnx.checker.check_model(os.fspath(tmp_path / MODEL_FILE), full_check=True)
    assert not lowered.fallbacks
    check(g, backend.load(tmp_path, lowered.entry))
    # the 8-bit, int4 and FP8 grids as QDQ pairs, one per such quantiser
    model = onnx.load(os.fspath(tmp_path / MODEL_FILE), load_external_data=False)
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q) == 7 and all(a.i for n in q for a in n.attribute if a.name == "block_size")


def test_a_w4a8_decoder_compiles_runs_and_verifies(tmp_path):
    import nnforge as nf
    from tests.frontend.decoders.families import llama_directory
    root = llama_directory(tmp_path / "llm", words=300)
    bundle = nf.compile(root / "model", "onnx", "w4a8", calibration=root / "calib.txt", out=tmp_path / "b", max_len=32)
    assert sum(n.op == "dynamic_quant" for n in bundle.graph().nodes) > 0
    numerics = bundle.manifest["numerics"]
    assert numerics["runtime_checked"] and numerics["backend_vs_reference"]["cosine_min"] >= 0.9999
    assert nf.verify(bundle.path)["passed"]

"""The tvm backend's ``dynamic_quant`` against the interpreter, bit for bit, on
tests/backends/dynamic_quant_cases.py's graph (one build); and a w4a8 decoder for ``cpu`` end to end,
its linears on kernels.intact (test_intact.py tests that path piece by piece)."""
from __future__ import annotations

import pytest

from tests import conftest
from tests.backends.dynamic_quant_cases import SIZES, check, dynamic_quant_graph

pytest.importorskip("tvm")

from nnforge.backends.tvm import TvmBackend      # noqa: E402


def test_dynamic_quant_matches_the_interpreter(tmp_path):
    """Also in a copy of ``main`` specialised to one token, as a decoder's step runs (specialise.py)."""
    g = dynamic_quant_graph()
    backend = TvmBackend()
    step = {"batch": 1, "seq": 1}
    lowered = conftest.lower_into(backend, g, "cpu", tmp_path, steps=[step])
    assert not lowered.fallbacks and lowered.entry["specialised"][0]["symbols"] == step
    check(g, backend.load(tmp_path, lowered.entry), SIZES + [step])


# a whole decoder's TVM build: under -m slow for the default suite's budget; test_intact.py's
# lowered graph covers the path in the default run
@pytest.mark.slow
def test_a_w4a8_decoder_compiles_runs_and_verifies(tmp_path):
    """Every linear behind a dynamic_quant (2 layers x 7 projections) runs on kernels.intact, the
    q/k/v projections of a layer as one stacked call, and nnforge inspect says so."""
    import nnforge as nf
    from nnforge.cli import describe_bundle
    from tests.frontend.decoders.families import llama_directory
    root = llama_directory(tmp_path / "llm", words=300)
    bundle = nf.compile(root / "model", "cpu", "w4a8", calibration=root / "calib.txt", out=tmp_path / "b", max_len=32)
    entry, graph = bundle.manifest["backend"]["entry"], bundle.graph()
    behind = {n.name for q in graph.nodes if q.op == "dynamic_quant" for n, _ in graph.uses()[q.outputs[0]]}
    assert len(behind) == 14 and set(entry["act_linears"]) == behind
    kernels = [entry["kernels"][entry["act_linears"][n]["weight"]] for n in behind]
    assert all(k["kernel"] == "int_act_matmul" for k in kernels)
    assert sum(len(k.get("stacked_with", [])) == 2 for k in kernels) == 2 * 3      # q, k, v of each layer
    assert any(line.startswith("  integer linears: 14 run on the int8 codes") for line in describe_bundle(bundle))
    numerics = bundle.manifest["numerics"]
    assert numerics["runtime_checked"] and numerics["backend_vs_reference"]["cosine_min"] >= 0.9999
    assert nf.verify(bundle.path)["passed"]

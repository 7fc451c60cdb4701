"""The onnx backend's capability table is what its lowering does: for each layer op and a
representative set of weight encodings, a row takes the weight exactly when lowering reports no
fallback for it (and MatMulNBits exactly when the MatMulNBits row does); ``nnforge targets
--explain onnx`` lists every row."""
from __future__ import annotations

import os

import onnx
import pytest
import torch

from tests import conftest
from tests.backends.capability_cases import cases, explained, layer_graph, rtn

from nnforge.backends.onnx import MODEL_FILE, OnnxBackend
from nnforge.backends.onnx.capabilities import CAPABILITIES, KV_CACHE, MATMULNBITS
from nnforge.cli import explain_target
from nnforge.targets import get_target

# beyond the shared cases: 4-bit codes in rows of an odd length, which have no uint4 form
CASES = cases() + [("linear", "uint4-odd-columns", layer_graph("linear", rtn(torch.randn(16, 33), "uint4")))]


@pytest.mark.parametrize("op, label, graph", CASES, ids=[f"{op}-{label}" for op, label, _ in CASES])
def test_table_agrees_with_lowering(tmp_path, op, label, graph):
    weight = graph.weights["layer.weight"]
    cap, why = CAPABILITIES.find(op, weight.encoding, get_target("onnx"))
    lowered = conftest.lower_into(OnnxBackend(), graph, "onnx", tmp_path)
    mine = [f for f in lowered.fallbacks if f.where == weight.name]
    assert (cap is not None) == (not mine), (cap, why, mine)
    assert all(why in f.action for f in mine), (why, mine)
    ops = {n.op_type for n in onnx.load(os.fspath(tmp_path / MODEL_FILE), load_external_data=False).graph.node}
    assert (cap is MATMULNBITS) == ("MatMulNBits" in ops)


def test_every_kind_and_op_is_covered():
    """The cases reach every weight row, and kinds no row takes (the KV-cache rows are
    onnx/test_kv_cache_encodings.py's)."""
    rows = set()
    for op, _, graph in CASES:
        cap, _ = CAPABILITIES.find(op, graph.weights["layer.weight"].encoding, get_target("onnx"))
        rows.add(id(cap))
    assert {id(r) for r in CAPABILITIES if r not in KV_CACHE} <= rows and id(None) in rows


def test_backend_declares_the_table_and_explain_lists_every_row():
    assert OnnxBackend.capabilities is CAPABILITIES and not hasattr(OnnxBackend, "native")
    lines = explain_target("onnx")
    assert [r for r in CAPABILITIES if not explained(lines, r)] == []

"""The hls backend's capability table is what its lowering does: for each layer op it lowers and
the shared representative encodings (tests/backends/capability_cases.py), ``CAPABILITIES.find``
takes the weight exactly when the matrix unit (or the convolution unit on its rows) keeps its codes or structure (no "decoded"
fallback); the encodings it refuses are errors naming the node and the table's reason;
``nnforge targets --explain`` lists every row."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.backends.capability_cases import cases, explained, layer_graph, rtn

from nnforge.backends.base import BackendError, get_backend
from nnforge.backends.hls import HlsBackend, static_graph
from nnforge.backends.hls import layers as L
from nnforge.backends.hls.capabilities import CAPABILITIES, refused
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.cli import explain_target
from nnforge.ir import Dense, Sparse
from nnforge.targets import get_target

CASES = cases()


def _plan(graph):
    return build_plan(static_graph(graph, {"batch": 2})[0], HlsOptions())


def _float_values(enc) -> bool:
    """Whether the matrix unit quantises the values it keeps (a reported record, not a fallback)."""
    return isinstance(enc.values if isinstance(enc, Sparse) else enc, Dense)


@pytest.mark.parametrize("op, label, graph", CASES, ids=[f"{op}-{label}" for op, label, _ in CASES])
def test_table_agrees_with_lowering(op, label, graph):
    enc = graph.weights["layer.weight"].encoding
    cap, why = CAPABILITIES.find(op, enc)
    try:
        plan = _plan(graph)
    except BackendError as e:                 # refused: act-order int codes, an encoded matmul or table
        assert cap is None and why in str(e) and "node layer" in str(e), (why, e)
        assert op not in ("linear", "conv") or refused(enc)
        return
    assert op in ("linear", "conv", "embedding") or cap is not None  # a linear or conv weight, a table may be decoded
    mine = [f for f in plan.fallbacks if f.where == "node layer (layer.weight)"]
    decoded = [f for f in mine if f.action.startswith("decoded")]
    assert (cap is not None) == (not decoded), (why, mine)
    assert all(why in f.action for f in decoded), (why, decoded)
    if cap is not None:
        quantised = op != "embedding" and _float_values(enc)
        assert [f.action.startswith("quantised to int16") for f in mine] == ([True] if quantised else [])
        unit = [layer.w for layer in plan.layers if isinstance(layer, L.MatMat)]
        if isinstance(enc, Sparse):
            assert (unit[0].sp_n, unit[0].sp_m) == (enc.pattern.n, enc.pattern.m)
        if enc.kind == "minifloat":
            assert unit[0].lut is not None      # minifloat codes decoded by the unit's table


def test_every_row_is_covered():
    """The cases reach every weight row, and kinds no row takes (the KV-cache rows, kv8's write and
    read, are the lowering of test_kv8.py's bundle)."""
    reached = {id(CAPABILITIES.find(op, g.weights["layer.weight"].encoding)[0]) for op, _, g in CASES}
    weight_rows = [r for r in CAPABILITIES if r.op not in ("kv_cache_write", "kv_cache_read")]
    assert {id(r) for r in weight_rows} | {id(None)} <= reached


@pytest.mark.parametrize("values", [None, lambda v: dataclasses.replace(rtn(v, "int4", 16), perm=torch.randperm(32))],
                         ids=["int4", "sparse-2:4-int4"])
def test_act_order_int_is_refused_naming_the_node(values):
    w = torch.randn(16, 64)
    if values is None:
        enc = dataclasses.replace(rtn(w, "int4", 16), perm=torch.randperm(64))
    else:
        keep = torch.zeros(16, 16, 4, dtype=torch.bool)
        keep[..., :2] = True
        enc = Sparse.from_mask(w, keep.reshape(16, 64), "2:4", values)
    cap, why = CAPABILITIES.find("linear", enc)
    assert cap is None and "act-order" in why and refused(enc)
    with pytest.raises(BackendError, match=r"node layer \(layer\.weight\): act-order .* quantise without act_order"):
        _plan(layer_graph("linear", enc))


def test_an_encoded_embedding_table_is_decoded_and_reported():
    """An LM head quantised by the recipe is also the token embedding when the two are tied: the
    table is decoded into the activation format, as a reported fallback."""
    enc = rtn(torch.randn(50, 64), "int8")
    plan = _plan(layer_graph("embedding", enc))
    [f] = plan.fallbacks
    assert f.where == "node layer (layer.weight)" and f.action.startswith("decoded into the activation format")
    table = next(layer for layer in plan.layers if isinstance(layer, L.Embedding)).table
    want = torch.floor(enc.decode(torch.float64) * 2.0 ** 16 + 0.5).numpy()
    assert (table == want).all()


@pytest.mark.parametrize("op", ["matmul"])
def test_an_encoded_matmul_constant_is_an_error_saying_what_to_do(op):
    enc = rtn(torch.randn(64, 16), "int8")
    why = CAPABILITIES.find(op, enc)[1]
    assert why == f"no native {op} for int weights"
    with pytest.raises(BackendError, match=rf"node layer \({op}\): weight layer\.weight is i8 .*{why} in the hls "
                                           r"backend; keep it dense"):
        _plan(layer_graph(op, enc))


def test_no_row_reads_the_target():
    """Every FPGA target runs the same templates: lowering asks without a target and gets the
    answers it would get with one."""
    for target in ("alveo-u280", "versal-vhk158"):
        for op, _, g in CASES:
            enc = g.weights["layer.weight"].encoding
            assert CAPABILITIES.find(op, enc, get_target(target))[0] is CAPABILITIES.find(op, enc)[0]


@pytest.mark.parametrize("target", ["alveo-u280", "versal-vhk158"])
def test_backend_declares_the_table_and_explain_lists_every_row(target):
    assert HlsBackend.capabilities is CAPABILITIES and not hasattr(HlsBackend, "native")
    assert get_backend("hls").capabilities is CAPABILITIES
    lines = explain_target(target)
    assert [r for r in CAPABILITIES if not explained(lines, r)] == []

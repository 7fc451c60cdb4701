"""The hls backend's capability table is what its lowering does: for encodings of every row and
some no row takes, ``CAPABILITIES.find`` says native exactly when the matrix unit keeps the
weight's own codes or structure (no "decoded" fallback), refused encodings are errors naming the
node, and ``nnforge targets --explain`` prints every row."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from nnforge.backends.base import BackendError, get_backend
from nnforge.backends.hls import layers as L
from nnforge.backends.hls.capabilities import CAPABILITIES
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.cli import explain_target
from nnforge.ir import Dense, Graph, IntQuant, LowRank, Palettized, Sparse, tensor
from nnforge.passes.quantize.formats import parse_format, quantize_rtn

ROWS, N, K = 2, 16, 64


def _w(seed: int, n: int = N, k: int = K) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


def _two_four(w: torch.Tensor) -> torch.Tensor:
    r, c = w.shape
    keep = torch.zeros(r, c // 4, 4, dtype=torch.bool)
    keep.scatter_(2, w.abs().reshape(r, -1, 4).topk(2, dim=2).indices, True)
    return keep.reshape(r, c)


def _pal(bits: int) -> Palettized:
    g = torch.Generator().manual_seed(bits)
    return Palettized.from_indices(torch.randint(0, 1 << bits, (N, K), generator=g),
                                   torch.randn(1, 1 << bits, generator=g), bits=bits, shape=(N, K))


def _act_order(w: torch.Tensor) -> IntQuant:
    return dataclasses.replace(IntQuant.quantize(w, 4, group_size=32), perm=torch.randperm(w.shape[1]))


def linear_encodings() -> dict[str, object]:
    """name -> (encoding, what lowering does: "codes" kept, "quantised" float values, "decoded")."""
    w = _w(0)
    e4m3 = quantize_rtn(w, parse_format("e4m3"))
    return {
        "int8": (IntQuant.quantize(w, 8), "codes"),
        "int4_g32": (IntQuant.quantize(w, 4, group_size=32), "codes"),
        "uint3_asym": (IntQuant.quantize(w, 3, group_size=32, symmetric=False), "codes"),
        "int2": (IntQuant.quantize(w, 2), "codes"),
        "e4m3": (e4m3, "codes"),
        "mxfp4": (quantize_rtn(w, parse_format("mxfp4")), "codes"),
        "e5m2": (quantize_rtn(w, parse_format("e5m2")), "decoded"),
        "e4m3_act_order": (dataclasses.replace(e4m3, perm=torch.randperm(K)), "decoded"),
        "sp24_int4": (Sparse.from_mask(w, _two_four(w), "2:4", lambda v: IntQuant.quantize(v, 4)), "codes"),
        "sp24_e4m3": (Sparse.from_mask(w, _two_four(w), "2:4", lambda v: quantize_rtn(v, parse_format("e4m3"))),
                      "codes"),
        "sp24_float": (Sparse.from_mask(w, _two_four(w), "2:4"), "quantised"),
        "unstructured": (Sparse.from_mask(w, w.abs() > 0.1, "unstructured"), "decoded"),
        "block1x4": (Sparse.from_mask(w, (torch.arange(K) // 4 % 2 == 0).expand(N, K), "block1x4"), "decoded"),
        "pal4": (_pal(4), "decoded"),
        "lowrank": (LowRank(shape=(N, K), a=Dense(torch.randn(4, K)), b=Dense(torch.randn(N, 4))), "decoded"),
        "dense": (Dense(w), "quantised"),
    }


def _linear_graph(encodings: dict) -> Graph:
    g = Graph("capabilities")
    x = g.add_input("x", tensor("f32", ROWS, K))
    g.set_outputs([g.op("linear", x, g.add_weight(f"{name}.weight", enc), None, name=name)
                   for name, (enc, _) in encodings.items()])
    return g


def test_find_agrees_with_lowering():
    cases = linear_encodings()
    plan = build_plan(_linear_graph(cases), HlsOptions())
    layers = {layer.node: layer for layer in plan.layers if isinstance(layer, L.MatMat)}
    for name, (enc, done) in cases.items():
        cap, why = CAPABILITIES.find("linear", enc)
        records = [f for f in plan.fallbacks if f.where == f"node {name} ({name}.weight)"]
        decoded = [f for f in records if f.action.startswith("decoded")]
        assert (cap is not None) == (not decoded) == (done != "decoded"), (name, why, records)
        if done == "codes":
            assert records == [], (name, records)
        elif done == "quantised":
            assert [f.action.startswith("quantised to int16") for f in records] == [True], (name, records)
        else:
            assert len(records) == 1 and why in decoded[0].action, (name, why, records)
        if isinstance(enc, Sparse) and cap is not None:
            assert (layers[name].w.sp_n, layers[name].w.sp_m) == (2, 4)
        if name in ("e4m3", "mxfp4", "sp24_e4m3"):
            assert layers[name].w.lut is not None          # minifloat codes decoded by the unit's table
    assert "N:M patterns" in CAPABILITIES.find("linear", cases["unstructured"][0])[1]


@pytest.mark.parametrize("enc", [_act_order(_w(1)), Sparse.from_mask(_w(1), _two_four(_w(1)), "2:4", _act_order)],
                         ids=["int4", "sp24_int4"])
def test_act_order_int_is_refused_naming_the_node(enc):
    cap, why = CAPABILITIES.find("linear", enc)
    assert cap is None and "act-order" in why
    with pytest.raises(BackendError, match=r"node fc \(fc\.weight\): act-order .* quantise without act_order"):
        build_plan(_linear_graph({"fc": (enc, None)}), HlsOptions())


def test_matmul_constant_and_embedding_table_must_be_dense():
    def plan(matmul_w, table):
        g = Graph("operands")
        x = g.add_input("x", tensor("f32", ROWS, K))
        ids = g.add_input("ids", tensor("i64", ROWS))
        g.set_outputs([g.op("matmul", x, g.add_weight("mm.weight", matmul_w), name="mm"),
                       g.op("embedding", ids, g.add_weight("emb.weight", table), name="emb")])
        return build_plan(g, HlsOptions())

    dense_mm, dense_table = Dense(_w(2, K, N)), Dense(_w(3, 10, N))
    int_mm, int_table = IntQuant.quantize(_w(2, K, N), 8), IntQuant.quantize(_w(3, 10, N), 8)
    assert CAPABILITIES.find("matmul", dense_mm)[0] and CAPABILITIES.find("embedding", dense_table)[0]
    p = plan(dense_mm, dense_table)
    assert [f.where for f in p.fallbacks] == ["node mm (mm.weight)"]        # the constant's quantisation
    for op, mm, table in (("matmul", int_mm, dense_table), ("embedding", dense_mm, int_table)):
        cap, why = CAPABILITIES.find(op, IntQuant.quantize(_w(4), 8))
        assert cap is None and why == f"no native {op} for int weights"
        node = "mm" if op == "matmul" else "emb"
        msg = rf"node {node} \({op}\): weight {node}\.weight is i8 .*{why} in the hls backend; keep it dense"
        with pytest.raises(BackendError, match=msg):
            plan(mm, table)


def test_no_row_reads_the_target():
    """Every FPGA target runs the same templates: lowering asks without a target and gets the
    answers it would get with one."""
    from nnforge.targets import get_target
    for target in ("alveo-u280", "versal-vhk158"):
        for enc, _ in linear_encodings().values():
            assert CAPABILITIES.find("linear", enc, get_target(target))[0] == CAPABILITIES.find("linear", enc)[0]


@pytest.mark.parametrize("target", ["alveo-u280", "versal-vhk158"])
def test_explain_lists_every_row(target):
    text = "\n".join(explain_target(target))
    assert get_backend("hls").capabilities is CAPABILITIES
    for line in CAPABILITIES.describe():
        assert line in text

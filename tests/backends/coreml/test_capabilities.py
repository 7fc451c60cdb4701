"""The coreml backend's capability table is what its lowering does: for every layer op and a
representative set of weight encodings (and fp16-scaled ones, as the apple targets quantise), a
row takes the weight exactly when the MIL program reports no fallback for it, the fallback gives
the table's reason, and the rows hold each encoding as stored (the constexpr op the row names);
act-order weights keep their stored column order only under a linear; ``nnforge targets
--explain`` lists every row. Building the MIL program needs coremltools, not macOS."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests import conftest
from tests.backends.capability_cases import SHAPES, cases, encodings, explained, layer_graph

ct = pytest.importorskip("coremltools")

from nnforge.backends.base import get_backend                   # noqa: E402
from nnforge.backends.coreml import MODEL_DIR, CoremlBackend     # noqa: E402
from nnforge.backends.coreml.capabilities import CAPABILITIES, LAYER_MIL    # noqa: E402
from nnforge.backends.coreml.lower import build_program          # noqa: E402
from nnforge.backends.coreml.verify import load_program          # noqa: E402
from nnforge.cli import explain_target                           # noqa: E402
from nnforge.ir import Dense, Graph, IntQuant, tensor            # noqa: E402
from nnforge.targets import get_target                           # noqa: E402

A17 = get_target("apple-a17")
# the first MIL op of the chain each row's weight becomes
ROW_OP = {"dense": "const", "int": "constexpr_blockwise_shift_scale", "palettized": "constexpr_lut_to_dense",
          "sparse": "constexpr_sparse_to_dense"}


def fp16_scaled(shape, seed: int = 1) -> dict[str, object]:
    """Encodings with fp16 scales (the apple targets' pass defaults) and fp16-range checks."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1
    cols = w.reshape(shape[0], -1).shape[1]
    int4 = IntQuant.quantize(w, 4, group_size=16, scale_dtype=torch.float16)
    return {"int8-fp16-scales": IntQuant.quantize(w, 8, scale_dtype=torch.float16),
            "uint4-g16-fp16-scales": IntQuant.quantize(w, 4, group_size=16, symmetric=False,
                                                        scale_dtype=torch.float16),
            "int4-g16-fp16-act-order": dataclasses.replace(int4, perm=torch.randperm(cols)),
            "int3-fp16-scales": IntQuant.quantize(w, 3, scale_dtype=torch.float16),
            "int4-g1-fp16-scales": IntQuant.quantize(w, 4, group_size=1, scale_dtype=torch.float16),
            "dense-beyond-fp16": Dense(w * 1e6)}


def _cases():
    out = cases()
    for op, shape in SHAPES.items():
        out += [(op, label, layer_graph(op, enc)) for label, enc in fp16_scaled(shape).items()]
    return out


CASES = _cases()


def _program(graph: Graph):
    return build_program(graph, ct.target.iOS18, A17)


def _chain(prog, name: str) -> list[str]:
    op = next(o for o in prog.functions["main"].operations if o.outputs[0].name == name)
    chain, todo = [], [op]
    while todo:
        o = todo.pop()
        chain.append(o.op_type)
        todo += [v.op for v in o.inputs.values() if v.op is not None and v.op.op_type != "const"]
    return chain


@pytest.mark.parametrize("op, label, graph", CASES, ids=[f"{op}-{label}" for op, label, _ in CASES])
def test_table_agrees_with_lowering(op, label, graph):
    weight = graph.weights["layer.weight"]
    cap, why = CAPABILITIES.find(op, weight.encoding, A17)
    prog, lw = _program(graph)
    mine = [f for f in lw.fallbacks if f.where == weight.name]
    assert (cap is not None) == (not mine), (cap, why, mine)
    if cap is None:
        assert why and all(why in f.action for f in mine), (why, mine)
    else:
        assert _chain(prog, lw.weight_names[weight.name])[0] == ROW_OP[cap.encoding]


def test_every_row_is_reached_and_some_weights_are_refused():
    found = [CAPABILITIES.find(op, g.weights["layer.weight"].encoding, A17)[0] for op, _, g in CASES]
    assert {id(r) for r in CAPABILITIES if r.op != "dynamic_quant"} <= {id(r) for r in found} and None in found
    # dynamic_quant's rows name activation formats (tests/backends/coreml/test_dynamic_quant.py runs them)
    assert {(r.op, r.encoding) for r in CAPABILITIES if r.op not in LAYER_MIL} == {
        ("dynamic_quant", "int8"), ("dynamic_quant", "int4")}


def test_the_reasons_say_what_the_constexpr_op_lacks():
    lin = {**encodings(SHAPES["linear"]), **fp16_scaled(SHAPES["linear"])}
    why = {label: CAPABILITIES.find("linear", lin[label], A17)[1] for label in lin}
    assert why["int8"] == "scales are not fp16 values"
    assert why["int3-fp16-scales"] == "3-bit codes (constexpr_blockwise_shift_scale holds 4 or 8-bit data)"
    assert why["int4-g1-fp16-scales"] == "its constexpr form (2560 bytes) is not smaller than fp16 (2048 bytes)"
    assert why["palette-3"] == "" and why["uint4-g16-fp16-scales"] == ""       # taken
    assert why["sparse-2:4-int4"] == "kept values i4 g16 sym are not fp16 values"
    assert why["e4m3"] == "no native linear for minifloat weights"
    assert why["dense-beyond-fp16"].endswith("beyond the fp16 range (+-65504)")
    emb = fp16_scaled(SHAPES["embedding"])["int4-g16-fp16-act-order"]
    assert CAPABILITIES.find("embedding", emb, A17)[1] == "act-order columns, which only a linear layer absorbs"
    assert CAPABILITIES.find("linear", fp16_scaled(SHAPES["linear"])["int4-g16-fp16-act-order"], A17)[0]


def test_an_act_order_weight_outside_a_linear_is_stored_in_column_order(tmp_path):
    """A matmul or embedding cannot gather its input's columns: its act-order weight is stored
    decoded in column order (the package's weights equal the graph's decode, verified), reported."""
    for op in ("matmul", "embedding"):
        graph = layer_graph(op, fp16_scaled(SHAPES[op])["int4-g16-fp16-act-order"])
        lowered = conftest.lower_into(CoremlBackend(), graph, "apple-a17", tmp_path / op)
        (fb,) = [f for f in lowered.fallbacks if f.where == "layer.weight"]
        assert fb.action.endswith("act-order stored as dense fp16 in column order (act-order columns, which only a "
                                  "linear layer absorbs)")
        (check,) = [w for w in lowered.entry["verify"]["weights"] if w["name"] == "layer.weight"]
        assert check["op_types"] == ["const"]
        prog = load_program(str(tmp_path / op / MODEL_DIR))
        assert [o.op_type for o in prog.functions["main"].operations].count("gather") == (op == "embedding")


def test_a_weight_two_layer_ops_read_runs_natively_only_if_both_rows_take_it():
    g = Graph("tied")
    ids = g.add_input("ids", tensor("i64", "batch", 3))
    table = g.add_weight("tied.weight", fp16_scaled((50, 64))["int4-g16-fp16-act-order"])
    h = g.op("embedding", ids, table, name="embed")
    g.set_outputs([g.op("linear", h, table, None, name="head")])
    _, lw = _program(g)
    (fb,) = [f for f in lw.fallbacks if f.where == "tied.weight"]
    assert "only a linear layer absorbs" in fb.action and "tied.weight" not in lw.perms


def test_backend_declares_the_table_and_explain_lists_every_row():
    assert get_backend("coreml").capabilities is CAPABILITIES is CoremlBackend.capabilities
    assert not hasattr(CoremlBackend, "native")
    lines = explain_target("apple-a17")
    assert [r for r in CAPABILITIES if not explained(lines, r)] == []

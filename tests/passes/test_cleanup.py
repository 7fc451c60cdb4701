"""Cleanup passes, each checked against the reference interpreter before and after on real
weights: dead code elimination, constant folding (and what it must not fold), every Simplify rule
(and near misses it must leave alone), matmul(+add) -> linear fusion, and the standard cleanup
pipeline on an ONNX-style graph."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import Dense, Graph, IntQuant, check, run_graph, tensor
from nnforge.passes import (DeadCodeElimination, FoldConstants, FuseLinear, PassContext, PassManager, Simplify,
                            cleanup_passes)
from tests.conftest import tiny_mlp
from tests.passes.graphs import inputs, mlp_graph


def run_pass(p, g: Graph, *xs, exact=True):
    """Run pass ``p`` on ``g`` (in place), checking the graph verifies, keeps its signature and
    computes the same outputs as before on ``xs``; returns the pass's recorded figures."""
    before = run_graph(g, list(xs))
    sig = g.signature()
    ctx = PassContext()
    ctx.current = p.name
    out = p(g, ctx)
    assert out is g
    assert check(g) == [], check(g)
    assert g.signature() == sig
    after = run_graph(g, list(xs))
    for a, b in zip(before, after):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    return ctx.figures.get(p.name, {})


def ops(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


# --- dead code -------------------------------------------------------------------------------------
def test_dce_removes_dead_nodes_and_weights():
    g = mlp_graph()
    dead_w = g.add_weight("unused.weight", Dense(torch.randn(4, 32)))
    d1 = g.op("linear", g.value("act"), dead_w, None, name="dead_head")
    g.op("relu", d1, name="dead_relu")
    g.add_weight("orphan", Dense(torch.ones(3)))
    figures = run_pass(DeadCodeElimination(), g, inputs())
    assert figures == {"nodes_removed": 2}
    assert [n.name for n in g.nodes] == ["fc1", "act", "fc2"]
    assert set(g.weights) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert g.fresh_name("dead_relu", node=True) == "dead_relu"       # names released


def test_dce_keeps_everything_live():
    g = mlp_graph()
    assert run_pass(DeadCodeElimination(), g, inputs()) == {"nodes_removed": 0}
    assert len(g.nodes) == 3 and len(g.weights) == 4


def test_dce_keeps_weight_outputs():
    g = mlp_graph()
    g.set_outputs(g.outputs + [g.weights["fc2.bias"]])
    run_pass(DeadCodeElimination(), g, inputs())
    assert "fc2.bias" in g.weights


# --- constant folding --------------------------------------------------------------------------------
def onnx_style_graph(model=None) -> Graph:
    """What an ONNX import looks like: weights stored [out, in] and transposed in the graph,
    MatMul + Add instead of linear, a constant scalar multiplication."""
    model = model or tiny_mlp()
    fc1, fc2 = model[0], model[2]
    g = Graph("onnx_style")
    x = g.add_input("x", tensor("f32", "batch", 16))
    w1 = g.op("permute", g.add_weight("W1", Dense(fc1.weight.detach().clone())), perm=[1, 0], name="W1_t")
    h = g.op("add", g.op("matmul", x, w1, name="mm1", meta={"module": "fc1"}),
             g.add_weight("B1", Dense(fc1.bias.detach().clone())), name="add1")
    a = g.op("gelu", h, name="act")
    w2 = g.op("permute", g.add_weight("W2", Dense(fc2.weight.detach().clone())), perm=[1, 0], name="W2_t")
    y = g.op("add", g.add_weight("B2", Dense(fc2.bias.detach().clone())), g.op("matmul", a, w2, name="mm2"),
             name="add2")
    two = g.op("mul", g.add_weight("half", Dense(torch.tensor(0.5))), g.add_weight("four", Dense(torch.tensor(4.0))),
               name="two")
    g.set_outputs([g.op("mul", y, two, name="out")])
    return g


def test_fold_constants_folds_weight_only_nodes():
    g = onnx_style_graph()
    figures = run_pass(FoldConstants(), g, inputs())
    assert figures == {"nodes_folded": 3}                     # two transposes, one scalar product
    assert ops(g) == ["matmul", "add", "gelu", "matmul", "add", "mul"]
    assert "W1" not in g.weights and "half" not in g.weights   # replaced inputs are dropped
    w1_t = g.node("mm1").inputs[1]
    assert w1_t.is_weight and isinstance(w1_t.encoding, Dense) and tuple(w1_t.shape) == (16, 32)
    assert g.node("out").inputs[1].encoding.data.item() == 2.0


def test_fold_constants_leaves_encoded_weights_alone():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 8))
    enc = IntQuant.quantize(torch.randn(4, 8), 4)
    wt = g.op("permute", g.add_weight("w", enc), perm=[1, 0], name="wt")
    g.set_outputs([g.op("matmul", x, wt, name="mm")])
    assert run_pass(FoldConstants(), g, inputs(2, features=8)) == {"nodes_folded": 0}
    assert g.weights["w"].encoding is enc and ops(g) == ["permute", "matmul"]


def test_fold_constants_respects_growth_limit():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 300, 300))
    big = g.op("expand", g.add_weight("one", Dense(torch.ones(1, 1))), shape=[300, 300], name="big")
    small = g.op("expand", g.add_weight("two", Dense(torch.full((1, 1), 2.0))), shape=[10, 300], name="small")
    g.set_outputs([g.op("add", x, big, name="y"), small])
    fig = run_pass(FoldConstants(), g, torch.randn(300, 300))
    assert fig == {"nodes_folded": 0}                 # 'small' is a graph output, 'big' is too large
    assert ops(g) == ["expand", "expand", "add"]
    g2 = Graph("g2")
    x2 = g2.add_input("x", tensor("f32", 10, 300))
    s2 = g2.op("expand", g2.add_weight("two", Dense(torch.full((1, 1), 2.0))), shape=[10, 300], name="small")
    g2.set_outputs([g2.op("mul", x2, s2, name="y")])
    assert run_pass(FoldConstants(), g2, torch.randn(10, 300)) == {"nodes_folded": 1}   # 3000 <= min_elements
    # transposes keep their size: folded under max_growth 1, not under 0.5 (the scalar product is)
    assert run_pass(FoldConstants(max_growth=1.0, min_elements=1), onnx_style_graph(), inputs()) == \
        {"nodes_folded": 3}
    assert run_pass(FoldConstants(max_growth=0.5, min_elements=1), onnx_style_graph(), inputs()) == \
        {"nodes_folded": 1}


def test_fold_constants_integer_arithmetic_keeps_dtype():
    g = Graph("g")
    ids = g.add_input("ids", tensor("i64", 4))
    off = g.op("add", g.add_weight("a", Dense(torch.tensor([1, 2, 3, 4]))), g.add_weight("b", Dense(torch.tensor(10))),
               name="off")
    g.set_outputs([g.op("add", ids, off, name="y")])
    run_pass(FoldConstants(), g, torch.tensor([0, 1, 2, 3]))
    folded = g.node("y").inputs[1]
    assert folded.encoding.data.dtype == torch.int64 and folded.encoding.data.tolist() == [11, 12, 13, 14]


def test_fold_constants_skips_symbolic_creations():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", "n"))
    pos = g.op("cast", g.op("arange", end="n", dtype="int64", name="pos"), dtype="f32", name="posf")
    fixed = g.op("full", shape=[3], value=1.0, dtype="f32", name="three")
    g.set_outputs([g.op("add", x, pos, name="y"), g.op("mul", fixed, fixed, name="z")])
    assert run_pass(FoldConstants(), g, torch.randn(5)) == {"nodes_folded": 1}     # static 'full' only
    assert ops(g) == ["arange", "cast", "add", "mul"]


# --- Simplify ----------------------------------------------------------------------------------------------
def const(g, name, value, dt=torch.float32):
    return g.add_weight(name, Dense(torch.tensor(value, dtype=dt)))


SIMPLIFY_CASES = {
    # name: (graph builder returning the output value built on input x [2, 3, 4])
    "add_zero": lambda g, x: g.op("add", x, const(g, "zero", 0.0)),
    "zero_add": lambda g, x: g.op("add", const(g, "zero", [0.0]), x),
    "sub_zero": lambda g, x: g.op("sub", x, const(g, "zero", 0.0)),
    "mul_one": lambda g, x: g.op("mul", x, const(g, "one", [[1.0]])),
    "one_mul": lambda g, x: g.op("mul", const(g, "one", 1.0), x),
    "div_one": lambda g, x: g.op("div", x, const(g, "one", 1.0)),
    "reshape_same": lambda g, x: g.op("reshape", x, shape=[2, -1, 4]),
    "expand_same": lambda g, x: g.op("expand", x, shape=[2, 3, 4]),
    "cast_same": lambda g, x: g.op("cast", x, dtype="f32"),
    "permute_identity": lambda g, x: g.op("permute", x, perm=[0, 1, 2]),
    "slice_full": lambda g, x: g.op("slice", x, axis=1, start=0, end=3),
}


@pytest.mark.parametrize("case", sorted(SIMPLIFY_CASES))
def test_simplify_rule_removes_identity(case):
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 3, 4))
    mid = SIMPLIFY_CASES[case](g, x)
    g.set_outputs([g.op("relu", mid, name="out")])
    figures = run_pass(Simplify(), g, torch.randn(2, 3, 4))
    assert ops(g) == ["relu"], ops(g)
    assert g.node("out").inputs[0] is x
    assert figures["rewrites"] == 1
    assert g.weights == {}                                          # constants died with the node


def test_simplify_reshape_of_reshape():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", "b", 3, 4))
    r1 = g.op("reshape", x, shape=["b", 12], name="r1")
    r2 = g.op("reshape", r1, shape=[-1, 2, 6], name="r2")
    g.set_outputs([g.op("relu", r2, name="out")])
    run_pass(Simplify(), g, torch.randn(5, 3, 4))
    assert ops(g) == ["reshape", "relu"]
    assert g.node("out").inputs[0].producer.inputs[0] is x
    run_pass(Simplify(), g, torch.randn(2, 3, 4))                    # stable: nothing more to do


@pytest.mark.parametrize("case, build", [
    ("zero_minus_x", lambda g, x: g.op("sub", const(g, "zero", 0.0), x)),
    ("one_div_x", lambda g, x: g.op("div", const(g, "one", 1.0), x)),
    ("add_nonzero", lambda g, x: g.op("add", x, const(g, "c", 0.5))),
    ("mul_vector_of_ones", lambda g, x: g.op("mul", x, const(g, "ones", [1.0, 1.0, 1.0, 1.0]))),
    ("mul_one_broadcasts_up", lambda g, x: g.op("mul", x, const(g, "one", [[[[1.0]]]]))),
    ("real_permute", lambda g, x: g.op("permute", x, perm=[0, 2, 1])),
    ("partial_slice", lambda g, x: g.op("slice", x, axis=1, start=0, end=2)),
    ("strided_slice", lambda g, x: g.op("slice", x, axis=1, start=0, end=3, step=2)),
    ("real_cast", lambda g, x: g.op("cast", x, dtype="f16")),
])
def test_simplify_leaves_non_identities(case, build):
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 3, 4))
    g.set_outputs([g.op("relu", build(g, x), name="out")])
    n = len(g.nodes)
    figures = run_pass(Simplify(), g, torch.rand(2, 3, 4) + 0.5)
    assert len(g.nodes) == n and figures["rewrites"] == 0


def test_simplify_keeps_output_name_when_removing_output_node():
    g = mlp_graph()
    out = g.op("mul", g.outputs[0], const(g, "one", 1.0), name="scaled")
    g.set_outputs([out])
    run_pass(Simplify(), g, inputs())
    assert ops(g) == ["linear", "gelu", "linear"]
    assert g.outputs[0].name == "scaled" and g.outputs[0].producer is g.node("fc2")


def test_simplify_counts_only_real_rewrites():
    """BUG: cleanup.rewrite counts a rule's match as a rewrite even when _redirect declines it (an
    output that would have to be replaced by a graph input or weight), so nothing changes, the loop
    runs all max_rounds=10 rounds, and Simplify records rewrites=10 for a graph it did not touch."""
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 3))
    g.set_outputs([g.op("add", x, const(g, "zero", 0.0), name="y")])
    figures = run_pass(Simplify(), g, torch.randn(2, 3))
    assert ops(g) == ["add"]                  # the node must stay: an input cannot be renamed into the output
    assert figures["rewrites"] == 0


# --- FuseLinear --------------------------------------------------------------------------------------------
def test_fuse_linear_matmul_add():
    g = onnx_style_graph()
    FoldConstants()(g)
    x = inputs()
    figures = run_pass(FuseLinear(), g, x, exact=False)
    assert figures == {"fused": 2}
    assert ops(g) == ["linear", "gelu", "linear", "mul"]
    fc1 = g.nodes[0]
    assert fc1.name == "fc1" and fc1.input("weight").name == "fc1.weight"      # named after meta["module"]
    assert fc1.meta == {"module": "fc1"}
    model = tiny_mlp()
    assert torch.equal(fc1.input("weight").encoding.data, model[0].weight.detach())       # [out, in] again
    assert torch.equal(fc1.input("bias").encoding.data, model[0].bias.detach())
    assert g.nodes[2].input("bias").name == "B2"                                  # bias on the left also fuses
    with torch.no_grad():
        torch.testing.assert_close(run_graph(g, [x])[0], 2 * model(x))


def test_fuse_linear_matmul_without_bias_and_3d_input():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", "b", "s", 8))
    w = torch.randn(8, 5)
    g.set_outputs([g.op("matmul", x, g.add_weight("W", Dense(w)), name="proj")])
    xs = torch.randn(2, 3, 8)
    assert run_pass(FuseLinear(), g, xs, exact=False) == {"fused": 1}
    assert ops(g) == ["linear"]
    assert str(g.outputs[0].type) == "f32[b, s, 5]" and g.outputs[0].name == "proj"
    assert torch.equal(g.nodes[0].input("weight").encoding.data, w.t())


def test_fuse_linear_does_not_fuse_shared_matmul_into_add():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 8))
    mm = g.op("matmul", x, g.add_weight("W", Dense(torch.randn(8, 4))), name="mm")
    y = g.op("add", mm, g.add_weight("b", Dense(torch.randn(4))), name="biased")
    g.set_outputs([y, g.op("relu", mm, name="other")])
    run_pass(FuseLinear(), g, torch.randn(2, 8), exact=False)
    assert ops(g) == ["linear", "add", "relu"]              # the matmul is fused, the add kept
    assert g.node("biased").inputs[0].producer.op == "linear"


@pytest.mark.parametrize("case", ["activation_rhs", "weight_lhs", "bias_2d", "int_matmul"])
def test_fuse_linear_leaves_other_matmuls(case):
    g = Graph("g")
    if case == "int_matmul":
        x = g.add_input("x", tensor("i64", 2, 8))
        out = g.op("matmul", x, g.add_weight("W", Dense(torch.randint(0, 3, (8, 4)))))
        xs = torch.randint(0, 3, (2, 8))
    else:
        x = g.add_input("x", tensor("f32", 2, 8))
        xs = torch.randn(2, 8)
        if case == "activation_rhs":
            out = g.op("matmul", x, g.op("permute", x, perm=[1, 0]))
        elif case == "weight_lhs":
            out = g.op("matmul", g.add_weight("W", Dense(torch.randn(3, 2))), x)
        else:
            mm = g.op("matmul", x, g.op("permute", x, perm=[1, 0]))
            out = g.op("add", mm, g.add_weight("b", Dense(torch.randn(2, 2))))
    g.set_outputs([out])
    n = ops(g)
    assert run_pass(FuseLinear(), g, xs) == {"fused": 0}
    assert ops(g) == n


# --- the cleanup pipeline ---------------------------------------------------------------------------------
def test_cleanup_passes_on_onnx_style_graph():
    g = onnx_style_graph()
    x = inputs(9, seed=3)
    want = run_graph(g, [x])[0]
    pm = PassManager(cleanup_passes())
    out = pm.run(g)
    assert [r.name for r in pm.records] == ["fold_constants", "simplify", "fuse_linear", "dce"]
    assert ops(out) == ["linear", "gelu", "linear", "mul"]
    assert set(out.weights) == {"fc1.weight", "B1", "mm2.weight", "B2", "two_folded"}
    torch.testing.assert_close(run_graph(out, [x])[0], want, rtol=1e-5, atol=1e-5)
    assert out.signature() == g.signature()

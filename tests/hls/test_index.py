"""Integer and boolean values in the HLS backend (ids, masks) and the ops on them, each against its
bit-accurate emulation: the C-simulation must equal nnforge.backends.hls.emulate bit for bit, and the
fp32 reference interpreter within the fixed-point tolerance.

One graph holds every op as a separate output, so g++ runs once for the module."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnforge.backends.base import BackendError
from nnforge.backends.hls import make_sim, render
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.ir import Dense, Graph, tensor
from nnforge.ir.interpreter import Interpreter

B, T, V, D = 2, 6, 16, 8
LSB = 2.0 ** -16          # ap_fixed<24, 8>


def index_graph() -> Graph:
    torch.manual_seed(0)
    g = Graph("index_ops")
    ids = g.add_input("ids", tensor("i64", B, T))
    mask = g.add_input("mask", tensor("i64", B, T))
    x = g.add_input("x", tensor("f32", B, T))
    y = g.add_input("y", tensor("f32", B, T))
    table = g.add_weight("table", Dense(torch.randn(V, D)))
    fmin = g.add_weight("fmin", Dense(torch.tensor(torch.finfo(torch.float32).min)))
    zero = g.add_weight("zero", Dense(torch.tensor(0.0)))
    three = g.add_weight("three", Dense(torch.tensor(3, dtype=torch.int64)))
    rows = g.add_weight("rows", Dense(torch.tensor([[1], [0]])))
    cols = g.add_weight("cols", Dense(torch.tensor([[0, -1, 2]])))
    perm = g.add_weight("perm", Dense(torch.tensor([[5, 4, 3, 2, 1, 0], [0, 0, 1, 1, 2, 2]])))
    mb = g.op("cast", mask, dtype="bool", name="cast_int_bool")
    big = g.op("ge", ids, three, name="ge_int_const")
    filled = g.op("where", mb, x, fmin, name="where_fill_min")
    outs = [g.op("embedding", ids, table, name="embedding"), mb, big, filled,
            g.op("cast", mask, dtype="f32", name="cast_int_float"),
            g.op("cast", big, dtype="f32", name="cast_bool_float"),
            g.op("and", mb, big, name="and"), g.op("or", mb, big, name="or"), g.op("not", mb, name="not"),
            g.op("eq", filled, fmin, name="eq_fill_min"), g.op("lt", x, y, name="lt_act_act"),
            g.op("where", mb, zero, fmin, name="where_const_const"),
            g.op("reduce_any", g.op("not", mb), axes=[-1], keepdim=True, name="reduce_any"),
            g.op("reduce_sum", x, axes=[1], keepdim=False, name="reduce_sum_act"),
            g.op("reduce_sum", mask, axes=[0, 1], keepdim=False, name="reduce_sum_int"),
            g.op("index", mb, rows, cols, name="index_bool"), g.op("index", x, rows, cols, name="index_act"),
            g.op("gather_elements", x, perm, axis=1, name="gather_elements"),
            g.op("sqrt", g.op("mul", x, x), name="sqrt"), g.op("div", x, y, name="div_act_act"), g.op("sqrt", x, name="sqrt_negative_is_zero")]
    g.set_outputs(outs)
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NNFORGE_HLS_CACHE", str(tmp_path_factory.mktemp("hls-cache")))
    g = index_graph()
    plan = build_plan(g, HlsOptions())
    files = render.sources(plan)
    sim = make_sim(plan, files)
    yield g, plan, sim
    mp.undo()


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (B, T))
    ids[0, 0], ids[1, -1] = V - 1, 0
    mask = (np.arange(T)[None, :] < np.array([[T], [T - 2]])).astype(np.int64)
    x, y = rng.standard_normal((B, T)) * 4, rng.standard_normal((B, T)) * 4
    y[0, :2] = x[0, :2]
    return [ids, mask, x.astype(np.float32), y.astype(np.float32)]


def _reference(g, xs):
    outs = Interpreter(g).run(*[torch.as_tensor(x) for x in xs])
    return [np.asarray(o, np.float64) for o in (outs if isinstance(outs, (list, tuple)) else [outs])]


def test_csim_equals_emulation_bit_for_bit(built):
    g, plan, sim = built
    xs = _inputs()
    got, want = sim.run(xs), plan.emulate(xs)
    bad = [v for v, a, b in zip(plan.outputs, got, want) if not np.array_equal(a.reshape(-1), b.reshape(-1))]
    assert not bad, bad


def test_embedding_is_the_table_row_in_the_activation_format(built):
    g, plan, sim = built
    xs = _inputs()
    got = dict(zip(plan.outputs, sim.run(xs)))["embedding"]
    ref = dict(zip(plan.outputs, _reference(g, xs)))["embedding"]
    assert np.abs(got.reshape(ref.shape) - ref).max() <= LSB / 2


@pytest.mark.parametrize("op", ["cast_int_bool", "ge_int_const", "cast_int_float", "cast_bool_float", "and", "or",
                                "not", "eq_fill_min", "lt_act_act", "where_fill_min", "where_const_const",
                                "reduce_any", "reduce_sum_act", "reduce_sum_int", "sqrt", "div_act_act",
                                "index_bool", "index_act", "gather_elements"])
def test_logic_matches_fp32_reference(built, op):
    g, plan, sim = built
    xs = _inputs()
    got = dict(zip(plan.outputs, sim.run(xs)))[op]
    ref = dict(zip(plan.outputs, _reference(g, xs)))[op]
    lo = -2.0 ** 7                                     # finfo.min saturates to the activation minimum
    ref = np.where(ref < lo, lo, ref)
    # sums of T rounded inputs carry T half-LSB errors; sqrt of a rounded square: ~1 LSB
    tol = {"reduce_sum_act": T * LSB / 2, "sqrt": 2 * LSB}.get(op, LSB / 2)
    if op == "div_act_act":      # a / b from rounded a, b: relative error ~ LSB / |b|
        ref = np.clip(ref, -2.0 ** 7, 2.0 ** 7 - LSB)
        tol = np.abs(ref) * LSB / np.abs(xs[3]).reshape(ref.shape) + LSB / np.abs(xs[3]).reshape(ref.shape) + LSB
    assert np.all(np.abs(got.reshape(ref.shape) - ref) <= tol), (got, ref)


def test_division_by_zero_saturates(built):
    g, plan, sim = built
    xs = _inputs()
    xs[3] = np.zeros_like(xs[3])
    got = dict(zip(plan.outputs, sim.run(xs)))["div_act_act"]
    assert np.array_equal(got.reshape(-1), dict(zip(plan.outputs, plan.emulate(xs)))["div_act_act"].reshape(-1))
    assert set(np.unique(got)) <= {2.0 ** 7 - LSB, -2.0 ** 7, 0.0}


def test_sqrt_of_negatives_is_zero(built):
    g, plan, sim = built
    xs = _inputs()
    got = dict(zip(plan.outputs, sim.run(xs)))["sqrt_negative_is_zero"]
    want = np.sqrt(np.maximum(xs[2], 0))
    assert np.abs(got.reshape(want.shape) - want).max() <= 2 * LSB


def test_ids_out_of_range_read_the_nearest_row(built):
    g, plan, sim = built
    xs = _inputs()
    ids = np.full((B, T), V + 5)
    ids[0] = -3
    got = sim.run([ids] + xs[1:])[0].reshape(B, T, D)
    assert np.array_equal(got, plan.emulate([ids] + xs[1:])[0].reshape(B, T, D))
    zero = plan.emulate([np.zeros((B, T))] + xs[1:])[0]
    assert np.array_equal(got[1, 0], got[1, -1]) and np.array_equal(got[0, 0], zero[0, 0])


def test_int_values_only_enter_mask_ops():
    g = Graph("g")
    ids = g.add_input("ids", tensor("i64", 2, 4))
    g.set_outputs([g.op("relu", ids, name="r")])
    with pytest.raises(BackendError, match="int/bool operand"):
        build_plan(g, HlsOptions())
    g = Graph("g")
    ids = g.add_input("ids", tensor("i64", 2, 4))
    g.set_outputs([g.op("embedding", ids, g.add_weight("t", Dense(torch.randn(8, 4))), name="e")])
    with pytest.raises(BackendError, match="dataflow form takes activations only"):
        build_plan(g, HlsOptions(dataflow=True))


def test_full_is_a_constant_buffer(tmp_path, monkeypatch):
    """IR ``full`` (masks and constants a graph builds from its sizes) of each value kind: C-sim
    equals the emulation and the reference."""
    monkeypatch.setenv("NNFORGE_HLS_CACHE", str(tmp_path))
    from nnforge.backends.hls import make_sim, render
    from nnforge.backends.hls.project import HlsOptions, build_plan
    from nnforge.ir import Graph, Interpreter, tensor
    g = Graph("fill")
    x = g.add_input("x", tensor("f32", 2, 3))
    f = g.op("full", name="f", shape=[2, 3], value=-1.25, dtype="float32")
    i = g.op("full", name="i", shape=[2, 3], value=7, dtype="int64")
    b = g.op("full", name="b", shape=[2, 3], value=True, dtype="bool")
    g.set_outputs([g.op("add", x, f, name="xf"), g.op("add", g.op("cast", i, name="ic", dtype="float32"), x, name="xi"),
                   g.op("where", b, x, f, name="xb")])
    plan = build_plan(g, HlsOptions())
    files = render.sources(plan)
    sim = make_sim(plan, files)
    xs = [np.arange(6, dtype=np.float32).reshape(2, 3) / 4]
    got = sim.run(xs)
    ref = [t.numpy() for t in Interpreter(g).run(torch.as_tensor(xs[0]))]
    for a, e, r in zip(got, plan.emulate(xs), ref):
        assert np.array_equal(a.reshape(-1), e.reshape(-1)) and np.allclose(a.reshape(r.shape), r)


def test_constant_operands_are_loaded_from_weight_memory(tmp_path, monkeypatch):
    """A dense weight used as a value (folded position ids into an embedding) is loaded from the
    weight memory into a buffer; a weight a rule takes as a parameter (the add's constant, where's
    constant mask) is not."""
    monkeypatch.setenv("NNFORGE_HLS_CACHE", str(tmp_path))
    g = Graph("consts")
    x = g.add_input("x", tensor("f32", 2, 3))
    pos = g.add_weight("pos_ids", Dense(torch.tensor([[0, 2, 1], [1, 1, 0]], dtype=torch.int64)))
    keep = g.add_weight("keep", Dense(torch.tensor([[True, False, True], [False, True, True]])))
    table = g.add_weight("table", Dense(torch.randn(3, 4)))
    emb = g.op("embedding", pos, table, name="emb")
    g.set_outputs([g.op("where", keep, g.op("add", x, g.add_weight("c", Dense(torch.full((2, 3), 0.5))), name="xc"), x,
                        name="sel"), emb])
    plan = build_plan(g, HlsOptions())
    assert [l.output for l in plan.layers if type(l).__name__ == "Const"] == ["pos_ids"]
    files = render.sources(plan)
    sim = make_sim(plan, files)
    xs = [np.arange(6, dtype=np.float32).reshape(2, 3) / 4]
    ref = [t.numpy() for t in Interpreter(g).run(torch.as_tensor(xs[0]))]
    for a, e, r in zip(sim.run(xs), plan.emulate(xs), ref):
        assert np.array_equal(a.reshape(-1), e.reshape(-1)) and np.allclose(a.reshape(r.shape), r, atol=1e-5)

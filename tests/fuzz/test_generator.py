"""The graph generator: deterministic per seed, only valid graphs, NaN-free stable sample inputs,
and a reach over the op registry."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from nnforge.fuzz import GraphGenerator
from nnforge.fuzz.stability import check_stable
from nnforge.ir import OPS, Interpreter, verify

SEEDS = range(40)


@pytest.fixture(scope="module")
def cases():
    return [GraphGenerator(s).generate() for s in SEEDS]


def test_same_seed_same_graph():
    a, b = GraphGenerator(11).generate(), GraphGenerator(11).generate()
    assert str(a.graph) == str(b.graph)
    assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs))


def test_graphs_are_valid_and_inputs_finite_and_stable(cases):
    for case in cases:
        verify(case.graph)
        assert case.graph.nodes and case.graph.outputs
        outs = Interpreter(case.graph).run(*case.inputs)
        assert all(bool(torch.isfinite(t).all()) for t in outs if t.is_floating_point()), case.graph
        assert check_stable(case.graph, case.inputs) == [], case.graph


def test_inputs_at_another_batch_size(cases):
    dynamic = [c for c in cases if c.dynamic]
    assert dynamic, "some graphs take a symbolic batch"
    for case in dynamic:
        env = {k: v + 2 for k, v in case.env.items()}
        xs = case.sample_inputs(1, env)
        Interpreter(case.graph).run(*xs)          # binds the symbol to the new size


def test_generator_reaches_most_of_the_registry():
    ops = Counter()
    for s in range(200):
        ops.update(n.op for n in GraphGenerator(1000 + s).generate().graph.nodes)
    missing = sorted(set(OPS) - set(ops))
    assert len(missing) <= 3, missing
    assert ops["linear"] >= 100          # weight layers come often, for the compression passes


def test_no_ir_inconsistency_on_a_slice(cases):
    """infer and the reference kernels agree on every candidate the generator tried (the bool
    inputs of abs/neg/relu/clamp/argmax/cumsum and clamp's dtype were found this way)."""
    assert [f for c in cases for f in c.ir_findings] == []


def test_restricted_op_list():
    case = GraphGenerator(3, ops=["add", "mul", "relu"]).generate()
    assert {n.op for n in case.graph.nodes} <= {"add", "mul", "relu", "linear", "abs", "clamp"}
    with pytest.raises(ValueError, match="unknown op"):
        GraphGenerator(0, ops=["no_such_op"])


def test_decoder_ops_read_positions_inside_their_cache():
    """rope, cache_update and attention get positions the generator builds (a ramp plus a per-row
    start input): fresh samples, at another batch size too, stay distinct slots inside the cache,
    so the reference kernels never refuse them."""
    decoder = ["rms_norm", "rope", "cache_update", "attention"]
    seen = Counter()
    for s in range(30):
        case = GraphGenerator(s, ops=decoder, dynamic=0.5).generate()
        verify(case.graph)
        seen.update(n.op for n in case.graph.nodes)
        for seed in (1, 2):
            env = {k: v + 2 for k, v in case.env.items()}
            Interpreter(case.graph).run(*case.sample_inputs(seed, env))
    assert all(seen[op] >= 3 for op in decoder), seen

"""The onnx runner's caches written in place (state.py): positions it refuses before ONNX Runtime
writes into a cache, the record it reads from the model when no entry gives one, and attention
blocks that stay in primitive ONNX ops (no GroupQueryAttention, nothing written in place)."""
from __future__ import annotations

import onnx
import pytest
import torch

from nnforge.backends.base import BackendError, get_backend
from nnforge.backends.onnx import MODEL_FILE, OnnxRunner, build_model
from nnforge.ir import Dense, Graph, run_graph, tensor
from tests import conftest
from tests.backends.test_decoder_ops import kv_block, kv_inputs


def _lower(graph, path, positions=((0, 1),)):
    shapes = {v.name: list(t.shape) for v, t in zip(graph.inputs, kv_inputs([list(p) for p in positions]))}
    backend = get_backend("onnx")
    lowered = conftest.lower_into(backend, graph, "onnx", path, shapes=shapes)
    ops = [n.op_type for n in onnx.load(str(path / MODEL_FILE), load_external_data=False).graph.node]
    return backend.load(path, lowered.entry), lowered, ops


@pytest.mark.parametrize("positions, match", [
    ([[15, 16]], r"positions 15..16 reach outside the cache's 16 slots 0..15"),
    ([[-1]], r"positions -1..-1 reach outside"),
    ([[3, 5]], r"each row's positions must be consecutive"),
])
def test_positions_groupqueryattention_cannot_take_are_refused(tmp_path, positions, match):
    runner, _, _ = _lower(kv_block(), tmp_path)
    with pytest.raises(BackendError, match=match):
        runner(*kv_inputs(positions))


def test_the_model_carries_its_kv_cache_record(tmp_path):
    graph = kv_block(window=3)
    _, lowered, _ = _lower(graph, tmp_path)
    runner = OnnxRunner(tmp_path / MODEL_FILE, threads=1)           # no entry: the model's metadata
    assert runner.kv.shared == lowered.entry["kv_cache"]["shared_buffers"]
    inputs = kv_inputs([[4], [11]])
    for got, want in zip(runner(*inputs), run_graph(graph, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(BackendError, match="kv_cache names \\['nope'\\]"):
        OnnxRunner(tmp_path / MODEL_FILE, kv_cache={"positions": "nope", "shared_buffers": {}})


def test_a_resident_decoder_needs_caches_written_in_place(tmp_path):
    runner, _, _ = _lower(kv_block(), tmp_path)
    pairs = [("cache.k", "write_k"), ("cache.v", "write_v")]
    with pytest.raises(BackendError, match=r"inputs \['k', 'v'\] a decoder step does not feed"):
        runner.resident(pairs, ("q", "positions"), "attn")


def _block_reading_its_cache_twice():
    """The updated k cache is also a second output's input: no GroupQueryAttention takes it."""
    graph = kv_block()
    written = graph.node("write_k").output
    graph.set_outputs(list(graph.outputs) + [graph.op("mul", written, written)])
    return graph


@pytest.mark.parametrize("make", [lambda: _odd_heads(), lambda: _block_reading_its_cache_twice()],
                         ids=["head-size-not-a-multiple-of-8", "cache-read-elsewhere"])
def test_attention_groupqueryattention_cannot_take_runs_in_onnx_ops(tmp_path, make):
    graph = make()
    runner, lowered, ops = _lower(graph, tmp_path)
    assert "GroupQueryAttention" not in ops and ops.count("ScatterElements") == 2
    assert "kv_cache" not in lowered.entry and runner.kv is None
    assert runner.resident([], ("q", "positions"), "attn") is None
    for i, positions in enumerate(([[0, 1, 2]] * 2, [[9], [4]])):
        inputs = _inputs(graph, torch.tensor(positions), seed=i)
        for got, want in zip(runner(*inputs), run_graph(graph, inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _inputs(graph, positions, seed=0):
    """Random inputs of ``graph`` for ``positions`` [batch, seq] (dims named batch and seq)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = dict(zip(("batch", "seq"), positions.shape))
    return [positions if v.name == "positions" else torch.randn([sizes.get(d, d) for d in v.shape], generator=gen)
            for v in graph.inputs]


def _odd_heads():
    """Heads of 4: GroupQueryAttention's CPU kernel takes multiples of 8."""
    g = Graph("odd")
    q = g.add_input("q", tensor("f32", "batch", 4, "seq", 4))
    pos = g.add_input("positions", tensor("i64", "batch", "seq"))
    k, v = (g.add_input(x, tensor("f32", "batch", 2, "seq", 4)) for x in "kv")
    caches = [g.add_input(f"cache.{x}", tensor("f32", "batch", 2, 16, 4)) for x in "kv"]
    written = [g.op("cache_update", c, new, pos, name=f"write_{x}") for c, new, x in zip(caches, (k, v), "kv")]
    g.set_outputs([g.op("attention", q, *written, pos, scale=0.5, window=5, name="attn"), *written])
    return g


def test_attention_of_another_dtype_is_left_to_the_prepare_pass(tmp_path):
    g = Graph("half")
    q = g.add_input("q", tensor("f16", 1, 8, 1, 8))
    pos = g.add_input("positions", tensor("i64", 1, 1))
    cache = g.add_input("cache", tensor("f16", 1, 8, 4, 8))
    g.set_outputs([g.op("attention", q, cache, cache, pos, scale=0.5, name="attn")])
    g.add_weight("unused", Dense(torch.zeros(1)))
    from nnforge.ir import save_graph
    save_graph(g, tmp_path / "graph.json", tmp_path / "weights.safetensors")
    with pytest.raises(BackendError, match=r"node attn: the onnx backend lowers attention of float32, not float16"):
        build_model(g, tmp_path / "weights.safetensors")

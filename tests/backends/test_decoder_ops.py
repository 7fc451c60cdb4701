"""Every backend takes the decoder ops (rms_norm, rope, cache_update, attention): through its own
rules, or written out in primitive ops by its prepare passes (Backend.lowers / decompositions).
An attention block over a cache, lowered and run, against the interpreter on prefill and decode."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is imported, anywhere

import pytest
import torch

from nnforge.backends.base import BUILTIN, get_backend
from nnforge.ir import run_graph
from nnforge.passes.decompose import decomposable
from tests import conftest
from tests.passes.graphs import decoder_block, decoder_inputs

RUNS_HERE = {"onnx": "onnx", "tvm": "cpu", "mlir": "mlir", "triton": "h100"}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_the_decoder_ops_a_backend_lacks_are_decomposed(name):
    backend = get_backend(name)
    decomposed = {op for c in backend.decompositions() for op in c["ops"]}
    if backend.lowers is None:                       # takes every op as it comes (run below)
        assert decomposed == set()
    else:
        assert decomposed == decomposable() - set(backend.lowers)


@pytest.mark.parametrize("name", sorted(RUNS_HERE))
def test_decoder_block_runs_like_the_interpreter(tmp_path, name):
    if name == "mlir":
        pytest.importorskip("torch_mlir")
    graph = decoder_block(window=6, softcap=20.0)
    prefill, decode = decoder_inputs(5, 0), decoder_inputs(1, 9, seed=1)
    backend = get_backend(name)
    shapes = {v.name: list(t.shape) for v, t in zip(graph.inputs, prefill)}
    lowered = conftest.lower_into(backend, graph, RUNS_HERE[name], tmp_path, shapes=shapes)
    assert not lowered.fallbacks
    runner = backend.load(tmp_path, lowered.entry)
    for inputs in ([prefill] if name == "mlir" else [prefill, decode]):   # (mlir's module has fixed sizes)
        for got, want in zip(runner(*inputs), run_graph(graph, inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_coreml_converts_the_decoder_block(tmp_path):
    pytest.importorskip("coremltools")
    graph = decoder_block()
    shapes = {v.name: list(t.shape) for v, t in zip(graph.inputs, decoder_inputs(5, 0))}
    lowered = conftest.lower_into(get_backend("coreml"), graph, "apple-a17", tmp_path, shapes=shapes)
    assert {"matmul", "softmax"} <= {op for ops in lowered.entry["verify"]["op_map"].values() for op in ops}


# --- onnx: GroupQueryAttention over caches written in place -------------------------------------
def kv_block(*, window=0, softcap=0.0, group=2, max_len=16):
    """An attention block with its own k and v caches (the decoder builder's form), which the onnx
    backend runs as one GroupQueryAttention writing both caches in place."""
    from nnforge.ir import Dense, Graph, tensor
    from tests.passes.graphs import D, KVH
    g = Graph("kv_block")
    q = g.add_input("q", tensor("f32", "batch", KVH * group, "seq", D))
    k = g.add_input("k", tensor("f32", "batch", KVH, "seq", D))
    v = g.add_input("v", tensor("f32", "batch", KVH, "seq", D))
    pos = g.add_input("positions", tensor("i64", "batch", "seq"))
    caches = [g.add_input(f"cache.{x}", tensor("f32", "batch", KVH, max_len, D)) for x in "kv"]
    inv = g.add_weight("inv_freq", Dense(1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)))
    q, k = (g.op("rope", x, pos, inv) for x in (q, k))
    written = [g.op("cache_update", c, new, pos, name=f"write_{x}") for c, new, x in zip(caches, (k, v), "kv")]
    out = g.op("attention", q, *written, pos, scale=D ** -0.5, window=window, softcap=softcap, name="attn")
    g.set_outputs([out, *written])
    return g


def kv_inputs(positions, group=2, max_len=16, seed=0):
    """Inputs for kv_block at ``positions`` [batch, seq], every cache slot holding values."""
    from tests.passes.graphs import D, KVH
    positions = torch.as_tensor(positions)
    b, s = positions.shape
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, KVH * group, s, D, generator=gen), torch.randn(b, KVH, s, D, generator=gen),
            torch.randn(b, KVH, s, D, generator=gen), positions,
            torch.randn(b, KVH, max_len, D, generator=gen), torch.randn(b, KVH, max_len, D, generator=gen)]


GQA_CASES = {
    "prefill-from-0-batch-2": [list(range(7))] * 2,
    "decode-rows-at-different-positions": [[9], [4]],
    "chunk-after-a-prefix": [[5, 6, 7, 8]],
    "chunk-batch-2-rows-apart": [[3, 4, 5], [8, 9, 10]],       # run row by row (GQA takes these per row)
    "late-position-near-max-len": [[15], [14]],
    "last-chunk-up-to-max-len": [[13, 14, 15]],
}


@pytest.mark.parametrize("window, softcap, group", [(0, 0.0, 2), (6, 0.0, 2), (0, 20.0, 1), (4, 30.0, 4), (1, 0.0, 2)],
                         ids=["plain", "window", "softcap-mha", "window-softcap-group4", "window-1"])
def test_onnx_runs_attention_over_its_caches_as_group_query_attention(tmp_path, window, softcap, group):
    import onnx
    from nnforge.backends.onnx import MODEL_FILE
    graph = kv_block(window=window, softcap=softcap, group=group)
    backend = get_backend("onnx")
    lowered = conftest.lower_into(backend, graph, "onnx", tmp_path,
                                  shapes={v.name: list(t.shape) for v, t in zip(graph.inputs, kv_inputs([[0, 1]]))})
    ops = [n.op_type for n in onnx.load(str(tmp_path / MODEL_FILE), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == 1 and "ScatterElements" not in ops and "Softmax" not in ops
    assert lowered.entry["kv_cache"] == {"positions": "positions",
                                         "shared_buffers": {"write_k": "cache.k", "write_v": "cache.v"}}
    runner = backend.load(tmp_path, lowered.entry)
    for i, (case, positions) in enumerate(GQA_CASES.items()):
        inputs = kv_inputs(positions, group, seed=i)
        given = [t.clone() for t in inputs]
        got = runner(*inputs)
        for name, g, want in zip(("out", "cache.k", "cache.v"), got, run_graph(graph, inputs)):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case} {name}: {m}")
        for t, before in zip(inputs, given):            # the caller's caches are not written
            assert torch.equal(t, before), case

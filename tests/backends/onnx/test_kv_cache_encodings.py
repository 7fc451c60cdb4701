"""The onnx backend runs the encoded KV caches (kv8, kv-fp8, kv4, kv-nvfp4, kv-gear4, kv-f16) natively: a
kv_cache_write and kv_cache_read pair lowered to ONNX and run step by step, the state fed back from ONNX Runtime's
own outputs, equal bit for bit to the reference interpreter's state and reads."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from nnforge.backends.base import get_backend
from nnforge.backends.onnx import MODEL_FILE
from nnforge.backends.onnx.capabilities import CAPABILITIES, KV_CACHE
from nnforge.ir import Graph, Interpreter, tensor
from nnforge.ir.kvcache import CACHE_ENCODINGS, cache_encoding
from nnforge.targets import get_target
from tests import conftest

MAX_LEN, HEAD_DIM, KV_HEADS = 24, 16, 2
ENCODINGS = [("kv8", {}), ("kv8", {"group": 4}), ("kv-fp8", {}), ("kv4", {"group": 4, "residual": 3}),
             ("kv4", {"group": 5, "residual": 0}), ("kv-nvfp4", {}), ("kv-gear4", {"group": 4, "residual": 3}),
             ("kv-gear4", {"group": 5, "residual": 0, "rank": 3, "outliers": 1}), ("kv-f16", {})]


def cache_graph(kind: str, role: str, **options) -> Graph:
    """new keys or values written into an encoded cache and read back: (read, *state) out."""
    g = Graph("kv")
    new = g.add_input("new", tensor("f32", "batch", KV_HEADS, "seq", HEAD_DIM))
    pos = g.add_input("positions", tensor("i64", "batch", "seq"))
    enc = cache_encoding(kind, role, **options)
    attrs = {"encoding": kind, "role": role, "max_len": MAX_LEN, "head_dim": HEAD_DIM, **enc.attrs()}
    state = [g.add_input(f"cache.{p.name}", tensor(p.dtype, "batch", KV_HEADS, p.rows, p.cols))
             for p in enc.parts(MAX_LEN, HEAD_DIM)]
    write = g.add_node("kv_cache_write", [new, pos, *state], attrs, name="layer.k_cache.write",
                       output_names=[f"{v.name}.next" for v in state])
    g.set_outputs([g.op("kv_cache_read", pos, *write.outputs, **attrs, name="layer.k_cache.read"), *write.outputs])
    return g


def hard_values(batch: int, seq: int, seed: int) -> torch.Tensor:
    """Keys or values with the cases rounding must get right: a token of zeros, a -0.0, huge tokens
    (float16 scales saturate), tiny ones (E4M3 subnormals), ties of x / scale and of float16 itself."""
    x = torch.randn(batch, KV_HEADS, seq, HEAD_DIM, generator=torch.Generator().manual_seed(seed))
    x[:, :, 0] *= torch.logspace(-6, 6, HEAD_DIM)
    if seq > 2:
        x[:, 0, 1] = 0.0
        x[:, 1, 1, 0] = -0.0
        x[:, 1, 2] = torch.tensor([127.0, 0.5, -1.5, 2.5, 63.5, -0.0, 1e9, -3e8]).repeat(HEAD_DIM // 8)
    if seq > 3:
        x[:, 0, 3, :4] = torch.tensor([1 + 2.0 ** -11, -1 - 3 * 2.0 ** -11, 2.0 ** -25, 3 * 2.0 ** -25])
    return x


@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("kind, options", ENCODINGS, ids=lambda x: x if isinstance(x, str) else str(x))
def test_the_state_and_reads_equal_the_interpreters_bit_for_bit(tmp_path, kind, options, role):
    graph = cache_graph(kind, role, **options)
    enc = cache_encoding(kind, role, **options)
    backend = get_backend("onnx")
    lowered = conftest.lower_into(backend, graph, "onnx", tmp_path, shapes={"new": [2, KV_HEADS, 7, HEAD_DIM],
                                                                             "positions": [2, 7]})
    assert not lowered.fallbacks
    model = onnx.load(str(tmp_path / MODEL_FILE), load_external_data=False)
    declared = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert [declared[f"cache.{p.name}"] for p in enc.parts(MAX_LEN, HEAD_DIM)] == \
        [onnx.helper.np_dtype_to_tensor_dtype(np.dtype(str(p.dtype.torch_dtype).removeprefix("torch.")))
         for p in enc.parts(MAX_LEN, HEAD_DIM)]
    runner = backend.load(tmp_path, lowered.entry)
    interpreter = Interpreter(graph)
    state = [t.numpy() for t in enc.zeros(2, KV_HEADS, MAX_LEN, HEAD_DIM)]
    start = 0
    for step, seq in enumerate([7, 1, 1, 4, 1, 6, 1]):          # past several groups and the window
        x = hard_values(2, seq, seed=step)
        positions = torch.arange(start, start + seq).repeat(2, 1)
        got = runner(x.numpy(), positions.numpy(), *state)
        want = interpreter.run(x, positions, *[torch.from_numpy(s) for s in state])
        for name, a, w in zip(["read", *(p.name for p in enc.parts(MAX_LEN, HEAD_DIM))], got, want):
            w = w.to(torch.from_numpy(a).dtype)
            assert torch.equal(torch.from_numpy(a), w), f"step {step} ({seq} tokens at {start}): {name} differs"
        state = list(got[1:])
        start += seq


def test_every_encoding_has_its_rows_and_the_test_runs_each():
    assert {(r.op, r.encoding) for r in KV_CACHE} == {(op, kind) for op in ("kv_cache_write", "kv_cache_read")
                                                      for kind in CACHE_ENCODINGS}
    assert {kind for kind, _ in ENCODINGS} == set(CACHE_ENCODINGS)
    for kind, options in ENCODINGS:
        for op in ("kv_cache_write", "kv_cache_read"):
            assert CAPABILITIES.find(op, cache_encoding(kind, "v", **options), get_target("onnx"))[0] in KV_CACHE

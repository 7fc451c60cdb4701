"""The kv_cache_write / kv_cache_read ops: their types, refusals, and the interpreter running
them as the encodings do; Graph.state_pairs and Graph.remove_input, which the KV-cache pass uses."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import Graph, GraphError, Interpreter, tensor
from nnforge.ir.kvcache import cache_encoding

ATTRS = dict(encoding="kv4", role="k", max_len=16, head_dim=8, group=4, residual=4)


def kv4_graph() -> Graph:
    g = Graph("kv")
    new = g.add_input("new", tensor("f32", "batch", 2, "seq", 8))
    pos = g.add_input("positions", tensor("i64", "batch", "seq"))
    enc = cache_encoding("kv4", "k", group=4, residual=4)
    state = [g.add_input(f"c.{p.name}", tensor(p.dtype, "batch", 2, p.rows, p.cols)) for p in enc.parts(16, 8)]
    write = g.add_node("kv_cache_write", [new, pos, *state], ATTRS, output_names=[f"{v.name}.next" for v in state])
    read = g.op("kv_cache_read", pos, *write.outputs, **ATTRS)
    g.set_outputs([read, *write.outputs])
    return g


def test_types_and_state_pairs():
    g = kv4_graph()
    assert str(g.outputs[0].type) == "f32[batch, 2, 16, 8]"
    assert [str(v.type) for v in g.outputs[1:]] == ["u8[batch, 2, 16, 4]", "f16[batch, 2, 4, 8]",
                                                    "f16[batch, 2, 4, 8]", "f32[batch, 2, 7, 8]"]
    assert g.state_pairs() == [(f"c.{p}", f"c.{p}.next") for p in ("codes", "scale", "min", "window")]


def test_interpreter_runs_the_encoding():
    g = kv4_graph()
    enc = cache_encoding("kv4", "k", group=4, residual=4)
    x, pos = torch.randn(1, 2, 11, 8), torch.arange(11)[None]
    state = enc.zeros(1, 2, 16, 8)
    got = Interpreter(g).run(x, pos, *state)
    want_state = enc.write(state, x, pos)
    # float parts come out in the interpreter's compute type, holding the stored values exactly
    assert [t.dtype for t in got[1:]] == [torch.uint8, torch.float32, torch.float32, torch.float32]
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(got[1:], want_state))
    assert torch.equal(got[0], enc.read(want_state, pos, 8))
    # the state goes back in as the next step's input, in its declared dtypes
    declared = [v.dtype.torch_dtype for v in g.inputs[2:]]
    step = Interpreter(g).run(torch.randn(1, 2, 1, 8), torch.tensor([[11]]), *[t.to(d) for t, d in zip(got[1:], declared)])
    assert step[0][0, :, 12:].abs().max() == 0


def test_state_that_disagrees_with_the_encoding_is_refused():
    g = Graph("bad")
    new = g.add_input("new", tensor("f32", 1, 2, 1, 8))
    pos = g.add_input("positions", tensor("i64", 1, 1))
    codes = g.add_input("codes", tensor("i8", 1, 2, 16, 8))
    with pytest.raises(GraphError, match="a kv8 k cache has 2 state tensors \\(codes, scale\\), got 1"):
        g.add_node("kv_cache_write", [new, pos, codes], dict(ATTRS, encoding="kv8", group=None, residual=None))
    scale = g.add_input("scale", tensor("f32", 1, 2, 16, 1))
    with pytest.raises(GraphError, match="state part scale must be f16\\[1, 2, 16, 1\\]"):
        g.add_node("kv_cache_write", [new, pos, codes, scale], dict(ATTRS, encoding="kv8", group=None, residual=None))
    # kv8 in groups of 4 channels: two scales a token of the 8-channel head; groups of 3 do not fit it
    with pytest.raises(GraphError, match="state part scale must be f16\\[1, 2, 16, 2\\]"):
        g.add_node("kv_cache_write", [new, pos, codes, scale], dict(ATTRS, encoding="kv8", group=4, residual=None))
    with pytest.raises(GraphError, match="kv8 scales groups of 3 channels, and the head dim 8 is not a multiple of 3"):
        g.add_node("kv_cache_write", [new, pos, codes, scale], dict(ATTRS, encoding="kv8", group=3, residual=None))


def test_positions_outside_the_cache_are_refused():
    g = kv4_graph()
    enc = cache_encoding("kv4", "k", group=4, residual=4)
    with pytest.raises(Exception, match="position 16 .* outside the cache's 16 slots"):
        Interpreter(g).run(torch.randn(1, 2, 1, 8), torch.tensor([[16]]), *enc.zeros(1, 2, 16, 8))


def test_remove_input_refuses_an_input_still_read():
    g = kv4_graph()
    with pytest.raises(GraphError, match="cannot remove input new: it is read by"):
        g.remove_input(g.inputs[0])

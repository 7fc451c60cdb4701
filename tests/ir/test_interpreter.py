"""The reference interpreter: fp32 and fp64 modes against direct torch computations, the
capture hook, input binding (positional, by name, numpy; dtype/rank/symbol checks), encoded weights
decoded once, and errors naming the failing node or weight."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnforge.ir import (Dense, Graph, GraphError, IntQuant, Interpreter, InterpreterError, run_graph, tensor)


def mlp(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1, b1, w2 = torch.randn(8, 4, generator=gen), torch.randn(8, generator=gen), torch.randn(3, 8, generator=gen)
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", 4))
    h = g.op("linear", x, g.add_weight("fc1.weight", Dense(w1)), g.add_weight("fc1.bias", Dense(b1)), name="fc1")
    a = g.op("gelu", h, name="act")
    y = g.op("linear", a, g.add_weight("fc2.weight", Dense(w2)), None, name="fc2")
    g.set_outputs([y])
    return g, (w1, b1, w2)


def reference(x, w1, b1, w2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2)


def test_fp32_matches_torch():
    g, ws = mlp()
    x = torch.randn(5, 4)
    (y,) = Interpreter(g).run(x)
    assert y.dtype == torch.float32 and y.shape == (5, 3)
    torch.testing.assert_close(y, reference(x, *ws))


def test_fp64_mode_computes_in_double():
    g, ws = mlp()
    x = torch.randn(5, 4)
    (y,) = Interpreter(g, dtype=torch.float64).run(x)
    assert y.dtype == torch.float64
    want = reference(x.double(), *[w.double() for w in ws])
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)      # fp32 would miss this tolerance
    (y32,) = Interpreter(g).run(x)
    assert float((y32.double() - want).abs().max()) > 0


def test_only_fp32_and_fp64():
    g, _ = mlp()
    with pytest.raises(ValueError, match="float32 or float64"):
        Interpreter(g, dtype=torch.float16)


def test_capture_sees_every_node_in_order():
    g, ws = mlp()
    seen = []
    x = torch.randn(2, 4)
    Interpreter(g).run(x, capture=lambda node, outs: seen.append((node.name, [t.clone() for t in outs])))
    assert [name for name, _ in seen] == ["fc1", "act", "fc2"]
    torch.testing.assert_close(seen[0][1][0], F.linear(x, ws[0], ws[1]))
    torch.testing.assert_close(seen[1][1][0], F.gelu(F.linear(x, ws[0], ws[1])))


def test_inputs_by_name_numpy_and_run_graph():
    g, ws = mlp()
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    want = reference(torch.from_numpy(x), *ws)
    torch.testing.assert_close(Interpreter(g).run({"x": x})[0], want)
    torch.testing.assert_close(run_graph(g, [torch.from_numpy(x)])[0], want)
    torch.testing.assert_close(run_graph(g, {"x": torch.from_numpy(x)})[0], want)


def test_symbols_bind_per_run():
    g, _ = mlp()
    interp = Interpreter(g)
    assert interp.run(torch.randn(1, 4))[0].shape == (1, 3)
    assert interp.run(torch.randn(7, 4))[0].shape == (7, 3)


@pytest.mark.parametrize("inputs, message", [
    ([torch.randn(2, 4, dtype=torch.float64)], "input x: expected dtype float32, got torch.float64"),
    ([torch.randn(2, 4, 1)], "input x: expected rank 2 f32\\[batch, 4\\], got shape \\(2, 4, 1\\)"),
    ([torch.randn(2, 5)], "input x axis 1: expected size 4 = 4, got 5"),
    ([], "graph mlp takes 1 inputs \\(x\\), got 0"),
    ([{"y": torch.randn(2, 4)}], "graph mlp inputs: missing \\['x'\\], unexpected \\['y'\\]"),
])
def test_input_binding_errors(inputs, message):
    g, _ = mlp()
    with pytest.raises(GraphError, match=message):
        Interpreter(g).run(*inputs)


def test_inconsistent_symbol_between_inputs():
    g = Graph("two")
    a = g.add_input("a", tensor("f32", "n", 2))
    b = g.add_input("b", tensor("f32", "n", 2))
    g.set_outputs([g.op("add", a, b)])
    with pytest.raises(GraphError, match="input b axis 0: symbol n is 3 elsewhere, got 4"):
        run_graph(g, [torch.zeros(3, 2), torch.zeros(4, 2)])


def test_bad_input_type():
    g, _ = mlp()
    with pytest.raises(TypeError, match="input x: expected a torch tensor or numpy array, got list"):
        Interpreter(g).run([[1.0] * 4])


def test_failing_node_is_named():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 4, 3))
    idx = g.add_input("idx", tensor("i64", 2))
    g.set_outputs([g.op("relu", g.op("gather", x, idx, axis=0, name="lookup"), name="r")])
    with pytest.raises(InterpreterError, match="node lookup \\(gather\\) failed: ") as info:
        run_graph(g, [torch.randn(4, 3), torch.tensor([0, 9])])
    assert info.value.__cause__ is not None


def test_encoded_weights_are_decoded_once_and_used(monkeypatch):
    g, (w1, b1, w2) = mlp()
    enc = IntQuant.quantize(w1, 4, group_size=2)
    g.set_encoding("fc1.weight", enc)
    calls = []
    real = IntQuant.decode
    monkeypatch.setattr(IntQuant, "decode", lambda self, dtype=None: calls.append(dtype) or real(self, dtype))
    interp = Interpreter(g)
    x = torch.randn(3, 4)
    y1 = interp.run(x)[0]
    y2 = interp.run(x)[0]
    (y64,) = Interpreter(g, torch.float64).run(x)
    monkeypatch.undo()
    assert calls == [torch.float32, torch.float64]                   # cached per interpreter
    torch.testing.assert_close(y1, reference(x, enc.decode(), b1, w2))
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y64, reference(x.double(), enc.decode(torch.float64), b1.double(), w2.double()))


def test_decoded_copies_past_the_budget_are_not_kept(monkeypatch):
    """Past DECODED_CACHE_BYTES a decoded copy is made where it is read and dropped after (a
    quantised model of a billion parameters would otherwise hold its float32 twin); a float32
    Dense decodes to itself, copies nothing and is always kept."""
    from nnforge.ir import interpreter
    g, (w1, b1, w2) = mlp()
    g.set_encoding("fc1.weight", IntQuant.quantize(w1, 4, group_size=2))
    x = torch.randn(3, 4)
    want = Interpreter(g).run(x)[0]
    monkeypatch.setattr(interpreter, "DECODED_CACHE_BYTES", 0)
    calls = []
    real = IntQuant.decode
    monkeypatch.setattr(IntQuant, "decode", lambda self, dtype=None: calls.append(dtype) or real(self, dtype))
    interp = Interpreter(g)
    assert torch.equal(interp.run(x)[0], want) and torch.equal(interp.run(x)[0], want)
    assert len(calls) == 2 and "fc1.weight" not in interp._weights
    assert interp._weights["fc2.weight"] is g.weights["fc2.weight"].encoding.data


def test_weight_decode_failure_names_weight():
    g, _ = mlp()

    class Broken(Dense):
        def decode(self, dtype=None):
            raise RuntimeError("corrupt")

    g.weights["fc2.weight"].encoding = Broken(torch.zeros(3, 8))
    with pytest.raises(InterpreterError, match="weight fc2.weight \\(dense f32\\) failed to decode: corrupt"):
        run_graph(g, [torch.randn(1, 4)])


def test_outputs_may_be_inputs_weights_or_repeated():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2))
    w = g.add_weight("w", Dense(torch.tensor([1.0, 2.0])))
    y = g.op("add", x, w, name="y")
    g.set_outputs([x, w, y, y])
    out = run_graph(g, [torch.tensor([3.0, 4.0])])
    assert [t.tolist() for t in out] == [[3.0, 4.0], [1.0, 2.0], [4.0, 6.0], [4.0, 6.0]]


def test_integer_paths_stay_integer():
    g = Graph("g")
    ids = g.add_input("ids", tensor("i64", "n"))
    emb = g.add_weight("emb", Dense(torch.arange(12, dtype=torch.float32).reshape(6, 2)))
    g.set_outputs([g.op("embedding", ids, emb, name="e"), g.op("add", ids, ids, name="twice")])
    e, twice = Interpreter(g, torch.float64).run(torch.tensor([5, 0]))
    assert e.dtype == torch.float64 and e.tolist() == [[10.0, 11.0], [0.0, 1.0]]
    assert twice.dtype == torch.int64 and twice.tolist() == [10, 0]

"""Bad or unsupported torch input: every unsupported op reported at once with node names and
source lines, custom converters, input/output names, non-tensor inputs."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torch.export import Dim

from nnforge.backends.onnx import OnnxRunner, build_model
from nnforge.frontend import FrontendError, UnsupportedError, UnsupportedOpsError, from_torch
from nnforge.frontend.torch_ops import CONVERTERS
from nnforge.ir import run_graph, save_graph

aten = torch.ops.aten
THIS_FILE = Path(__file__).name


def line_of(marker: str) -> int:
    """1-based line number of the (unique) source line of this file that ends with ``marker``."""
    lines = [i + 1 for i, text in enumerate(Path(__file__).read_text().splitlines()) if text.rstrip().endswith(marker)]
    assert len(lines) == 1, f"marker {marker!r} found on lines {lines}"
    return lines[0]


def _absent(packet) -> bool:
    return all(getattr(packet, o) not in CONVERTERS for o in packet.overloads())


class CummaxKthvalue(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        h = self.proj(x)
        s = torch.cummax(h, dim=-1).values  # <cummax>
        t = torch.kthvalue(h, 2, dim=-1).values  # <kthvalue>
        return s[..., :2] + t.unsqueeze(-1)


class FlipCumprod(nn.Module):
    def forward(self, x):
        a = torch.flip(x, [1])  # <flip>
        b = torch.cumprod(x, 1)  # <cumprod>
        return a * 2 + b


def test_ops_under_test_really_have_no_converter():
    for packet in (aten.cummax, aten.kthvalue, aten.flip, aten.cumprod):
        assert _absent(packet), f"{packet} now has a converter: pick other unsupported ops for these tests"


def test_unsupported_ops_are_all_listed_with_nodes_and_source_lines():
    x = torch.randn(3, 6)
    with pytest.raises(UnsupportedOpsError) as info:
        from_torch(CummaxKthvalue(), (x,), dynamic_shapes=({0: Dim("batch")},))
    err = info.value
    msg = str(err)
    assert isinstance(err, FrontendError)
    # both ops, each once, with its fx node name and its line in this file
    assert "aten.cummax.default" in msg and "aten.kthvalue.default" in msg
    assert "2 unsupported op(s)" in msg and msg.startswith("CummaxKthvalue:")
    by_op = {i.op: i for i in err.items}
    assert set(by_op) == {"aten.cummax.default", "aten.kthvalue.default"}, err.items
    assert by_op["aten.cummax.default"].node == "cummax" and by_op["aten.kthvalue.default"].node == "kthvalue"
    assert by_op["aten.cummax.default"].source == f"{THIS_FILE}:{line_of('# <cummax>')}"
    assert by_op["aten.kthvalue.default"].source == f"{THIS_FILE}:{line_of('# <kthvalue>')}"
    assert f"aten.cummax.default at node cummax ({THIS_FILE}:{line_of('# <cummax>')})" in msg
    assert f"aten.kthvalue.default at node kthvalue ({THIS_FILE}:{line_of('# <kthvalue>')})" in msg
    # users of the unsupported results are not reported as further problems
    assert len(err.items) == 2
    assert "converters=" in msg


def test_custom_converters_make_unsupported_ops_work(tmp_path):
    model = FlipCumprod().eval()
    ex = torch.rand(3, 5) + 0.5
    with pytest.raises(UnsupportedOpsError) as info:
        from_torch(model, (ex,), dynamic_shapes=({0: Dim("batch")},))
    assert {i.op for i in info.value.items} == {"aten.flip.default", "aten.cumprod.default"}
    assert {i.source for i in info.value.items} == {f"{THIS_FILE}:{line_of('# <flip>')}",
                                                    f"{THIS_FILE}:{line_of('# <cumprod>')}"}

    calls = []

    def flip(cx, n):
        x, dims = cx.value(n.args[0]), n.args[1]
        calls.append("flip")
        for d in dims:
            d %= x.type.rank
            size = x.shape[d]
            assert isinstance(size, int), "this test converter handles static flipped dims only"
            idx = cx.const(torch.arange(size - 1, -1, -1), torch.int64)
            x = cx.emit("gather", x, idx, axis=d)
        return x

    def cumprod(cx, n):            # exp(cumsum(log x)): exact enough for positive inputs
        calls.append("cumprod")
        x, dim = cx.value(n.args[0]), n.args[1]
        return cx.emit("exp", cx.emit("cumsum", cx.emit("log", x, name=f"{n.name}_log"), axis=dim,
                                      name=f"{n.name}_cumsum"))

    g = from_torch(model, (ex,), dynamic_shapes=({0: Dim("batch")},),
                   converters={aten.flip.default: flip, aten.cumprod.default: cumprod})
    assert sorted(calls) == ["cumprod", "flip"]
    assert g.inputs[0].shape == ("batch", 5)
    x = torch.rand(7, 5) + 0.5
    want = model(x)
    got = run_graph(g, [x])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the converted graph lowers and runs like any other
    save_graph(g, tmp_path / "graph.json", tmp_path / "weights.safetensors")
    m, _ = build_model(g, tmp_path / "weights.safetensors")
    onnx.save_model(m, str(tmp_path / "model.onnx"))
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    out = OnnxRunner(tmp_path / "model.onnx", threads=1).run_numpy([x.numpy()])[0]
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-5, atol=1e-5)


def test_custom_converter_overrides_a_builtin_one():
    model = nn.Sequential(nn.ReLU()).eval()

    def relu_as_abs(cx, n):
        return cx.emit("abs", cx.value(n.args[0]))

    g = from_torch(model, (torch.randn(3, 4),), converters={aten.relu.default: relu_as_abs})
    assert [n.op for n in g.nodes] == ["abs"]
    x = torch.randn(3, 4)
    assert torch.equal(run_graph(g, [x])[0], x.abs())
    # the built-in table itself is untouched
    g = from_torch(model, (torch.randn(3, 4),))
    assert [n.op for n in g.nodes] == ["relu"]


def test_converter_raising_unsupported_error_is_reported_with_its_reason():
    def refuse(cx, n):
        raise UnsupportedError("not today")

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU()).eval()
    with pytest.raises(UnsupportedOpsError) as info:
        from_torch(model, (torch.randn(3, 4),), converters={aten.relu.default: refuse})
    # the first relu is reported; everything downstream of it (2nd linear, 2nd relu) is skipped
    assert [(i.op, i.reason) for i in info.value.items] == [("aten.relu.default", "not today")]
    assert "aten.relu.default at node relu" in str(info.value) and "not today" in str(info.value)


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids, mask):
        h = self.emb(ids) * mask.unsqueeze(-1).float()
        return self.head(h), h.sum(1)


def _two_in_inputs(b, s):
    g = torch.Generator().manual_seed(b * 100 + s)
    return torch.randint(0, 11, (b, s), generator=g), torch.randint(0, 2, (b, s), generator=g)


def test_input_and_output_names_are_honored(tmp_path):
    model = TwoInTwoOut().eval()
    batch, seq = Dim("batch"), Dim("seq")
    g = from_torch(model, _two_in_inputs(2, 5), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                   input_names=["tokens", "attention"], output_names=["logits", "pooled"], name="tiny")
    assert g.name == "tiny"
    assert [v.name for v in g.inputs] == ["tokens", "attention"]
    assert [v.name for v in g.outputs] == ["logits", "pooled"]
    assert g.inputs[0].shape == ("batch", "seq") and g.inputs[1].shape == ("batch", "seq")
    assert g.outputs[0].shape == ("batch", "seq", 3) and g.outputs[1].shape == ("batch", 4)
    ids, mask = _two_in_inputs(4, 7)
    by_name = run_graph(g, {"attention": mask, "tokens": ids})
    want = model(ids, mask)
    for got, w in zip(by_name, want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    # the names carry through to the ONNX model
    save_graph(g, tmp_path / "graph.json", tmp_path / "weights.safetensors")
    m, _ = build_model(g, tmp_path / "weights.safetensors")
    onnx.save_model(m, str(tmp_path / "model.onnx"))
    runner = OnnxRunner(tmp_path / "model.onnx", threads=1)
    assert runner.input_names == ["tokens", "attention"] and runner.output_names == ["logits", "pooled"]


def test_default_names_come_from_forward_arguments():
    model = TwoInTwoOut().eval()
    g = from_torch(model, _two_in_inputs(2, 5))
    assert [v.name for v in g.inputs] == ["ids", "mask"]
    assert [v.name for v in g.outputs] == ["output_0", "output_1"]
    g = from_torch(nn.Linear(4, 2).eval(), (torch.randn(3, 4),))
    assert [v.name for v in g.outputs] == ["output"]


def test_unnamed_dynamic_dims_get_role_or_input_axis_names():
    model = TwoInTwoOut().eval()
    auto = torch.export.Dim.AUTO
    g = from_torch(model, _two_in_inputs(2, 5), dynamic_shapes=({0: auto, 1: auto}, {0: auto, 1: auto}),
                   input_names=["tokens", "attention"])
    # one symbol per distinct torch symbol, named by its role (batch, seq of integer ids) where
    # the first input/axis that carries it has one
    assert g.inputs[0].shape == ("batch", "seq")
    assert g.inputs[1].shape == ("batch", "seq")
    g = from_torch(model, _two_in_inputs(2, 5), dynamic_shapes=({0: auto}, {0: auto, 1: auto}),
                   input_names=["tokens", "attention"])
    assert g.inputs[0].shape[0] == "batch" and g.inputs[1].shape == ("batch", 5)


def test_dict_dynamic_shapes_keep_dim_names_when_input_names_are_given():
    """dynamic_shapes keyed by forward-argument names (torch's own convention) must still give the
    IR symbols the Dim names when the IR inputs are renamed with input_names."""
    model = TwoInTwoOut().eval()
    batch, seq = Dim("batch"), Dim("seq")
    dyn = {"ids": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}}
    g = from_torch(model, _two_in_inputs(2, 5), dynamic_shapes=dyn)
    assert g.inputs[0].shape == ("batch", "seq")
    g = from_torch(model, _two_in_inputs(2, 5), dynamic_shapes=dyn, input_names=["tokens", "attention"])
    assert g.inputs[0].shape == ("batch", "seq"), g.inputs[0].shape


def test_wrong_number_of_names_is_an_error():
    model = TwoInTwoOut().eval()
    with pytest.raises(FrontendError, match=r"2 model inputs but 1 input names"):
        from_torch(model, _two_in_inputs(2, 5), input_names=["tokens"])
    with pytest.raises(FrontendError, match=r"2 outputs but 3 output names"):
        from_torch(model, _two_in_inputs(2, 5), output_names=["a", "b", "c"])


class ScaleBy(nn.Module):
    def forward(self, x, factor):
        return x * factor


@pytest.mark.parametrize("value", [3, 2.5, True])
def test_non_tensor_input_errors_clearly(value):
    with pytest.raises(FrontendError) as info:
        from_torch(ScaleBy(), (torch.randn(2, 3), value))
    msg = str(info.value)
    assert "ScaleBy" in msg and "input factor" in msg and type(value).__name__ in msg
    assert "only tensor inputs are supported" in msg


def test_torch_export_failure_is_a_frontend_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(FrontendError, match=r"torch.export failed for DataDependent"):
        from_torch(DataDependent(), (torch.randn(3, 2),))


def test_op_variant_refused_with_reason():
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 2)).eval()
    with pytest.raises(UnsupportedOpsError) as info:
        from_torch(model, (torch.randn(1, 2, 4, 4),))
    assert [(i.op, i.reason) for i in info.value.items] == [("aten.convolution.default", "transposed convolution")]


def test_unsupported_second_output_is_reported():
    class MinWithIndices(nn.Module):
        def forward(self, x):
            values, indices = x.min(-1)  # <min>
            return values, indices

    with pytest.raises(UnsupportedOpsError) as info:
        from_torch(MinWithIndices(), (torch.randn(3, 4),))
    (item,) = info.value.items
    assert item.op == "aten.min.dim[1]" and "not supported" in item.reason
    assert item.source == f"{THIS_FILE}:{line_of('# <min>')}"


def test_symbolic_size_used_as_a_value_is_reported():
    class DivBySeq(nn.Module):
        def forward(self, x):
            return x / x.shape[1]  # <div-by-seq>

    with pytest.raises(UnsupportedOpsError) as info:
        from_torch(DivBySeq(), (torch.randn(3, 6),), dynamic_shapes=({0: Dim("b"), 1: Dim("s")},))
    (item,) = info.value.items
    assert item.op == "aten.div.Tensor" and "symbolic size" in item.reason
    assert item.source == f"{THIS_FILE}:{line_of('# <div-by-seq>')}"
    # with a static second dim the same model converts (the size is a plain number)
    g = from_torch(DivBySeq(), (torch.randn(3, 6),), dynamic_shapes=({0: Dim("b")},))
    x = torch.randn(5, 6)
    torch.testing.assert_close(run_graph(g, [x])[0], x / 6)


def test_derived_dims_work_or_error_clearly():
    """dynamic_shapes may use derived dims (2*Dim, Dim+1). The frontend must either convert them
    (graph runs correctly on a new size) or refuse with a FrontendError that names the input;
    an internal verifier error mentioning torch's private symbol names is neither."""
    class Pairs(nn.Module):
        def forward(self, x):
            return x.view(x.shape[0], x.shape[1] // 2, 4)

    half = Dim("half", min=2)
    try:
        g = from_torch(Pairs(), (torch.randn(3, 6, 2),), dynamic_shapes=({0: Dim("batch"), 1: 2 * half},))
    except FrontendError as e:
        assert "x" in str(e)
        return
    x = torch.randn(5, 10, 2)
    torch.testing.assert_close(run_graph(g, [x])[0], x.view(5, 5, 4))


def test_output_name_that_an_intermediate_value_already_uses_is_honored():
    """output_names wins over internal value names: an intermediate value that happens to be called
    like a requested output name must give way, not the graph output."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return torch.relu(self.head(x))

    g = from_torch(Head().eval(), (torch.randn(2, 4),), output_names=["head"])
    assert [n.op for n in g.nodes] == ["linear", "relu"]
    assert [v.name for v in g.outputs] == ["head"], [v.name for v in g.outputs]


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, ids, scale):
        return self.fc(ids) * scale


def test_int64_input_into_a_linear_names_the_input_not_the_op():
    with pytest.raises(FrontendError) as info:
        from_torch(Classifier(), (torch.randint(0, 5, (2, 8)), torch.ones(2, 4)))
    msg = str(info.value)
    assert not isinstance(info.value, UnsupportedOpsError) and "unsupported" not in msg
    assert msg == ("Classifier: input 'ids' is int64, but layer fc (aten.linear.default) takes float32 there: give "
                   "example inputs of dtype float32, or convert the input inside the model (integer ids usually go "
                   "through an embedding first)")


def test_int64_input_into_a_conv_names_the_input_where_torch_export_fails():
    with pytest.raises(FrontendError) as info:
        from_torch(nn.Sequential(nn.Conv2d(3, 4, 3)), (torch.randint(0, 5, (1, 3, 8, 8)),), input_names=["image"])
    msg = str(info.value)
    assert msg.startswith("Sequential: input 'image' is int64, but the model's weights are float32 and torch.export "
                          "failed on the mix (")
    assert msg.endswith("): give example inputs of dtype float32, or convert the input inside the model")


def test_int64_ids_into_an_embedding_still_import():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)).eval()
    ids = torch.randint(0, 10, (2, 3))
    torch.testing.assert_close(run_graph(from_torch(model, (ids,)), [ids])[0], model(ids))

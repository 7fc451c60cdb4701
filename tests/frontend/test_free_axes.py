"""Free input axes by default (issue 21 item 6): a torch module's batch and sequence / image axes
stay symbolic where the model allows it, also from a batch-1 example; a static shape is asked for
explicitly; a wrong size says how to get a dynamic bundle."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

import nnforge as nf
from nnforge.backends.base import BackendError
from nnforge.frontend import FrontendError, from_torch
from nnforge.ir import run_graph


class TinyText(nn.Module):
    """Token ids -> per-token features, with a position table: seq is free up to its length."""

    def __init__(self, vocab: int = 40, width: int = 16, positions: int = 32):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(positions, width)
        self.proj = nn.Linear(width, width)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])
        return self.proj(torch.relu(self.tok(ids) + self.pos(pos)))


class TinyConv(nn.Module):
    """Two stride-2 convs and a global pool: any image size."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(h.mean(dim=(2, 3)))


class FixedWidth(nn.Module):
    """Flattens a fixed image size into a linear: only the batch is free."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


class OneRow(nn.Module):
    """Written for a batch of one (a view to [1, -1]): torch.export cannot free the batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.view(1, -1))


def _ids(batch, seq, seed=0):
    return torch.randint(0, 40, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _shapes(g):
    return [list(v.shape) for v in g.inputs]


def test_batch_and_seq_are_free_by_default_from_a_batch_of_one():
    torch.manual_seed(0)
    m = TinyText().eval()
    g = from_torch(m, (_ids(1, 8),))
    assert _shapes(g) == [["batch", "seq"]]
    assert g.meta["shapes"] == "free axes as torch.export found them"
    for batch, seq in [(3, 5), (2, 20)]:
        x = _ids(batch, seq, seed=1)
        torch.testing.assert_close(run_graph(g, [x])[0], m(x), rtol=1e-5, atol=1e-5)


def test_image_height_and_width_are_free_through_strided_convs():
    torch.manual_seed(0)
    m = TinyConv().eval()
    g = from_torch(m, (torch.randn(1, 3, 32, 32),))
    assert _shapes(g) == [["batch", 3, "height", "width"]]
    x = torch.randn(2, 3, 45, 37)
    torch.testing.assert_close(run_graph(g, [x])[0], m(x), rtol=1e-5, atol=1e-5)


def test_axes_the_model_needs_stay_fixed():
    g = from_torch(FixedWidth().eval(), (torch.randn(1, 3, 8, 8),))
    assert _shapes(g) == [["batch", 3, 8, 8]]


def test_a_model_written_for_one_row_keeps_batch_one():
    g = from_torch(OneRow().eval(), (torch.randn(1, 12),))
    assert _shapes(g) == [[1, 12]]


def test_static_shapes_are_asked_for_explicitly():
    g = from_torch(TinyText().eval(), (_ids(1, 8),), dynamic_shapes="static")
    assert _shapes(g) == [[1, 8]]
    assert g.meta["shapes"] == "static, as asked"
    assert _shapes(from_torch(TinyText().eval(), (_ids(1, 8),), dynamic_shapes=False)) == [[1, 8]]


def test_an_unknown_dynamic_shapes_word_is_refused():
    with pytest.raises(FrontendError, match="dynamic_shapes='dynamic' is not a choice.*'static'"):
        from_torch(TinyText().eval(), (_ids(1, 8),), dynamic_shapes="dynamic")


def test_a_named_batch_dim_works_with_a_batch_one_example():
    # torch.export alone fails here ("Constraints violated (batch)"): it specialises size 1.
    m = TinyText().eval()
    g = from_torch(m, (_ids(1, 8),), dynamic_shapes=({0: Dim("rows")},))
    assert _shapes(g) == [["rows", 8]]
    x = _ids(4, 8, seed=2)
    torch.testing.assert_close(run_graph(g, [x])[0], m(x), rtol=1e-5, atol=1e-5)


def test_a_named_dim_the_model_cannot_free_is_explained():
    with pytest.raises(FrontendError, match=r"FixedWidth: torch.export found that an axis your dynamic_shapes marks "
                                            r"free cannot take any size: .*leave dynamic_shapes unset"):
        from_torch(FixedWidth().eval(), (torch.randn(2, 3, 8, 8),), dynamic_shapes=({2: Dim("h")},))


class ShapeBranch(nn.Module):
    """Control flow on a size: the trace takes one branch, under the condition batch*seq > 5."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] * x.shape[1] > 5:
            return self.fc(x).sum(1)
        return self.fc(x).mean(1)


def test_conditions_the_trace_took_become_guards_the_bundle_checks(tmp_path):
    torch.manual_seed(0)
    m = ShapeBranch().eval()
    g = from_torch(m, (torch.randn(2, 3, 4),))
    assert _shapes(g) == [["batch", "seq", 4]]
    assert g.meta["shape_guards"] == ["batch*seq > 5"]
    b = nf.compile(m, "onnx", "fp32", example_inputs=(torch.randn(2, 3, 4),), out=tmp_path / "b")
    assert b.manifest["signature"]["guards"] == ["batch*seq > 5"]
    run = b.load()
    x = torch.randn(4, 2, 4)
    torch.testing.assert_close(run(x), m(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(BackendError, match=r"input sizes batch = 1, seq = 3 break 'batch\*seq > 5', a condition "
                                           r"the model was traced under"):
        run(torch.randn(1, 3, 4))
    nf.verify(b.path)
    # the guards are a claim of the manifest that graph.json confirms
    import json
    path = b.path / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["signature"]["guards"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(Exception, match=r"signature: the manifest says .*'guards': \['batch\*seq > 5'\]"):
        nf.verify(b.path)


def test_a_position_table_bound_is_a_guard():
    class Added(nn.Module):         # the table sliced to seq and added: seq <= 32
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(32, 8))

        def forward(self, x):
            return x + self.pos[: x.shape[1]]

    g = from_torch(Added().eval(), (torch.randn(2, 8, 8),))
    assert _shapes(g) == [["batch", "seq", 8]]
    assert g.meta["shape_guards"] == ["seq <= 32"]


def test_a_model_nnforge_cannot_import_with_free_axes_falls_back_to_static_with_a_warning():
    from nnforge.frontend.torch_ops import CONVERTERS
    relu = CONVERTERS[torch.ops.aten.relu.default]

    def static_relu(cx, n):             # a converter that takes fixed sizes only
        from nnforge.frontend import UnsupportedError
        if any(not isinstance(d, int) for d in cx.type_of(n).shape):
            raise UnsupportedError("relu: fixed sizes only")
        return relu(cx, n)

    with pytest.warns(UserWarning, match=r"static: torch.export could not trace TinyConv with free axes nnforge keeps "
                                         r"\(.*relu: fixed sizes only"):
        g = from_torch(TinyConv().eval(), (torch.randn(1, 3, 16, 16),),
                       converters={torch.ops.aten.relu.default: static_relu})
    assert _shapes(g) == [[1, 3, 16, 16]]
    assert g.meta["shapes"].startswith("static: torch.export could not trace TinyConv")


def test_buffers_the_model_writes_are_not_outputs():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x):
            self.seen.add_(1)
            return self.fc(x)

    g = from_torch(Counter().eval(), (torch.randn(2, 4),))
    assert len(g.outputs) == 1


def test_bundle_takes_other_sizes_and_a_static_one_says_how_to_free_them(tmp_path):
    torch.manual_seed(0)
    m = TinyText().eval()
    b = nf.compile(m, "onnx", "fp32", example_inputs=(_ids(1, 8),), out=tmp_path / "free")
    assert b.manifest["signature"]["inputs"][0]["shape"] == ["batch", "seq"]
    assert b.manifest["model"]["shapes"] == "free axes as torch.export found them"
    x = _ids(3, 13, seed=4)
    torch.testing.assert_close(b.load()(x), m(x), rtol=1e-5, atol=1e-5)

    fixed = nf.compile(m, "onnx", "fp32", example_inputs=(_ids(1, 8),), dynamic_shapes="static",
                       out=tmp_path / "fixed")
    assert fixed.manifest["model"]["shapes"] == "static, as asked"
    with pytest.raises(BackendError, match=r"input ids: dim 1 must be 8, got shape \[1, 24\]; .*compile without "
                                           r"dynamic_shapes='static'"):
        fixed.load()(_ids(1, 24))


def test_a_guard_whose_other_side_computes_the_same_is_dropped():
    # adaptive pooling to 1x1 takes an identity path where the map is already 1x1: a guard that
    # changes nothing computed
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    g = from_torch(m, (torch.randn(1, 3, 16, 16),))
    assert _shapes(g) == [["batch", 3, "height", "width"]]
    assert g.meta["shape_guards"] == []
    assert g.meta["guards_dropped"] and all("checked_at" in d for d in g.meta["guards_dropped"])
    x = torch.randn(2, 3, 2, 2)              # a 1x1 map
    torch.testing.assert_close(run_graph(g, [x])[0], m(x), rtol=1e-5, atol=1e-5)


def test_a_row_of_one_beside_a_bigger_batch_stays_a_broadcast_operand():
    class Scaled(nn.Module):
        def forward(self, a, b):
            return a * 2 + b

    m = Scaled()
    g = from_torch(m, (torch.randn(2, 3, 4), torch.randn(1, 3, 4)))
    assert g.inputs[0].shape[0] == "batch" and g.inputs[1].shape[0] == 1
    a, b = torch.randn(5, 3, 4), torch.randn(1, 3, 4)
    torch.testing.assert_close(run_graph(g, [a, b])[0], m(a, b))

"""The SliceGPT pass: with nothing deleted it is the original function (a change of basis); with a
fraction deleted it is exactly the original model with each residual-stream value projected onto
its kept principal components (what slicing means), every hidden dimension shrinks, the principal
basis keeps more than a random one, and the bundle runs on a target as the sliced graph does."""
from __future__ import annotations

import pytest
import torch

from nnforge.frontend.decoders.importer import import_decoder
from nnforge.ir import Dense, Interpreter
from nnforge.passes import PassContext, PassError, resolve_recipe
from nnforge.passes.prune import slicegpt
from nnforge.passes.prune.slicegpt import SliceGPT
from nnforge.passes.quantize import QuantizeRTN
from nnforge.passes.rotate import _find_stream, _insert
from tests.frontend.decoders.families import tiny_model
from tests.passes.test_rotate import MAX_LEN, _steps, ids  # noqa: F401  (ids: the fixture)

WIDTH, KEPT = 64, 48          # the tiny families' hidden width; what 25% slicing keeps


def _imported(family):
    return import_decoder(tiny_model(family), max_len=MAX_LEN)


def _windows(imported, seeds):
    return [imported.inputs(torch.randint(3, 128, (1, MAX_LEN), generator=torch.Generator().manual_seed(s)))
            for s in seeds]


def _slice(graph, calibration, **options):
    ctx = PassContext(calibration=calibration)
    ctx.current = "slicegpt"
    return SliceGPT(**options)(graph.copy(), ctx), ctx.figures["slicegpt"]["slice"]


def _logits(graph, batches):
    return torch.cat([Interpreter(graph).run(*b)[0] for b in batches])


def _error(graph, want, batches):
    got = _logits(graph, batches)
    return float((got - want).norm() / want.norm())


# family -> (linears added on the stream's write side, tied head)
FAMILIES = {"llama": (0, True), "llama-linear": (0, False), "gemma3": (8, True), "phi3": (0, False),
            "qwen3": (0, True)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_nothing_deleted_is_the_original_function(family, ids):  # noqa: F811
    imported = _imported(family)
    want = _steps(imported.graph, ids)
    for basis in ("layer", "shared"):
        out, figures = _slice(imported.graph, _windows(imported, range(4)), fraction=0.0, basis=basis)
        got = _steps(out, ids)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), basis
        layers = sum(n.op == "attention" for n in out.nodes)
        writers, tied = FAMILIES[family]
        assert figures["kept_width"] == WIDTH and figures["writer_linears"] == writers
        assert figures["tied_head"] == ("tied" if tied else False) and figures["readers_projected_back"] == 0
        assert figures["shortcut_linears"] == (2 * layers if basis == "layer" else 0)


def _projected(graph, calibration, kept: int, tied: bool):
    """The original graph with each stream value replaced by its projection onto its ``kept``
    principal components (and the tied head's input onto the embedding's)."""
    g = graph.copy()
    stream = _find_stream(g)
    cov, _ = slicegpt._covariances(g, stream, calibration, "test", project=kept)   # sequential, as the pass
    vecs, _ = slicegpt._bases(cov, shared=False)
    uses = g.uses()

    def project(v, q, name):
        w = g.add_weight(g.fresh_name(f"{name}.p"), Dense((q @ q.T).float()))
        return _insert(g, v, "linear", v, w, name=name)

    for i, v in enumerate(stream.values):
        readers = list(uses.get(v, []))
        p = project(v, vecs[i][:, :kept], f"project{i}")
        for node, slot in readers:
            node.inputs[slot] = p
    if tied:
        head = next(n for n in g.nodes if n.name == "lm_head")
        head.inputs[0] = project(head.inputs[0], vecs[0][:, :kept], "project_head")
    return g


@pytest.mark.parametrize("family, head", [("llama", "tied"), ("llama", "untie"), ("llama-linear", "tied"),
                                          ("gemma3", "tied")])
def test_slicing_is_projecting_each_stream_value_onto_its_principal_components(family, head):
    """With the head untied, the head reads the last value's components exactly; tied, it reads
    them projected onto the embedding's."""
    imported = _imported(family)
    calibration, held = _windows(imported, range(16)), _windows(imported, range(100, 104))
    out, figures = _slice(imported.graph, calibration, fraction=0.25, head=head)
    assert figures["kept_width"] == KEPT and 0.9 < figures["variance_kept_min"] <= figures["variance_kept_mean"] < 1
    tied = FAMILIES[family][1] and head == "tied"
    want = _logits(_projected(imported.graph, calibration, KEPT, tied), held)
    assert _error(out, want, held) < 1e-5


def test_every_hidden_dimension_shrinks():
    imported = _imported("llama-linear")
    graph = imported.graph
    out, figures = _slice(graph, _windows(imported, range(8)), fraction=0.25)
    before = {n.name: tuple(n.inputs[1].shape) for n in graph.nodes if n.op in ("linear", "embedding")}
    for node in out.nodes:
        if node.op not in ("linear", "embedding") or node.name not in before:
            continue
        shape, old = tuple(node.inputs[1].shape), before[node.name]
        if node.op == "embedding":
            assert shape == (old[0], KEPT)
        elif node.name.endswith(("o_proj", "down_proj")):
            assert shape == (KEPT, old[1]), node.name               # writers: rows
        else:
            assert shape == (old[0], KEPT), node.name               # readers: columns
    assert all(n.output.shape[-1] == KEPT for n in out.nodes if n.op == "rms_norm" and n.inputs[0].shape[-1] != 16)
    params = sum(v.encoding.numel for v in out.weights.values())
    assert params < sum(v.encoding.numel for v in graph.weights.values())


def test_the_principal_basis_keeps_more_than_a_random_one(monkeypatch):
    imported = _imported("llama")
    calibration, held = _windows(imported, range(16)), _windows(imported, range(100, 104))
    want = _logits(imported.graph, held)
    principal = _error(_slice(imported.graph, calibration, fraction=0.25)[0], want, held)

    def random_bases(cov, shared):
        g = torch.Generator().manual_seed(0)
        return [torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64))[0] for _ in cov], \
            [torch.ones(WIDTH, dtype=torch.float64) for _ in cov]
    monkeypatch.setattr(slicegpt, "_bases", random_bases)
    assert principal < 0.7 * _error(_slice(imported.graph, calibration, fraction=0.25)[0], want, held)


def test_refusals():
    gpt2 = import_decoder(tiny_model("gpt2"), max_len=MAX_LEN)
    with pytest.raises(PassError, match=r"read by layer_norm .*ln_1.*RMS-norm"):
        _slice(gpt2.graph, _windows(gpt2, range(2)))
    imported = _imported("llama")
    quantised = QuantizeRTN(format="int8")(imported.graph.copy(), PassContext())
    with pytest.raises(PassError, match="already encoded .* slice before compressing"):
        _slice(quantised, _windows(imported, range(2)))
    with pytest.raises(PassError, match="needs calibration data"):
        SliceGPT()(imported.graph.copy(), PassContext())
    for bad in (1.0, -0.1, True, "a"):
        with pytest.raises(PassError, match=r"fraction must be in \[0, 1\)"):
            SliceGPT(fraction=bad)
    with pytest.raises(PassError, match="basis must be one of layer, shared"):
        SliceGPT(basis="block")
    with pytest.raises(PassError, match="weighting must be one of energy, token"):
        SliceGPT(weighting="norm")
    with pytest.raises(PassError, match="head must be one of tied, untie"):
        SliceGPT(head="share")
    with pytest.raises(PassError, match="sequential must be true or false"):
        SliceGPT(sequential="yes")
    with pytest.raises(PassError, match="leaves nothing"):
        _slice(imported.graph, _windows(imported, range(2)), fraction=0.9, multiple=64)


def test_the_preset():
    name, passes = resolve_recipe("slice-30")
    assert name == "slice-30" and passes == [SliceGPT(fraction=0.3)]
    assert resolve_recipe("slice-untie-25")[1] == [SliceGPT(fraction=0.25, head="untie")]


def test_a_sliced_bundle_runs_as_the_sliced_graph(tmp_path):
    """slice-25 through nf.compile on onnx: the bundle verifies against the sliced graph on the
    reference interpreter, and its graph is the smaller one."""
    import nnforge as nf
    from tests.frontend.decoders.families import llama_directory
    root = llama_directory(tmp_path / "llm", words=600)
    bundle = nf.compile(root / "model", "onnx", "slice-25", calibration=root / "calib.txt", out=tmp_path / "b",
                        max_len=32, head="fp32")
    assert nf.verify(bundle.path)["passed"]
    numerics = bundle.manifest["numerics"]
    assert numerics["runtime_checked"] and numerics["backend_vs_reference"]["cosine_min"] >= 0.9999
    emb = next(n for n in bundle.graph().nodes if n.op == "embedding")
    assert emb.inputs[1].shape[-1] == KEPT

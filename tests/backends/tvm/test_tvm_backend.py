"""The tvm backend against the reference interpreter.

Every op of the registry is lowered (grouped into a few multi-output graphs, since each build
links a library), compiled for this host, run at two sets of symbolic sizes and compared with
``nnforge.ir.run_graph``. Also: ``nf.compile`` of a small torch encoder for ``cpu`` end to end,
then ``nf.load`` at other sizes; the parameter layout (graph weights read from
weights.safetensors, backend arrays in tvm_params.safetensors); AVX-512 code in the
cross-compiled ``xeon-spr`` and ``epyc`` libraries; the checks before a library is loaded; and the
errors. Which encoded weight reaches which kernel: test_weight_kernels.py.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import conftest

pytest.importorskip("tvm")

import nnforge as nf                                             # noqa: E402
from nnforge.backends.base import BackendError, get_backend      # noqa: E402
from nnforge.backends.tvm import LIBRARY_FILE, LINUX_FLAGS, TvmBackend, parse_llvm_target  # noqa: E402
from nnforge.backends.tvm.tuning import TUNING_FILE                # noqa: E402
from nnforge.backends.tvm.ops import LOWERINGS                    # noqa: E402
from nnforge.ir.ops.kvcache import CACHE_OPS  # noqa: E402
from nnforge.ir import OPS, Dense, Graph, dtype, run_graph, tensor  # noqa: E402
from nnforge.passes.decompose import decomposable                # noqa: E402
from nnforge.targets import get_target, host_cpu_flags           # noqa: E402
from tests.backends.tiny_encoder import TinyEncoder, encoder_inputs as _ids  # noqa: E402

COS_MIN = 0.99999
SIZES = [{"batch": 1, "seq": 3}, {"batch": 4, "seq": 11}]


# --- lowering, running, comparing -------------------------------------------------------------
def lower(graph: Graph, out_dir: Path, target: str = "cpu"):
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = TvmBackend()
    return backend, conftest.lower_into(backend, graph, target, out_dir)


def make_inputs(graph: Graph, env: dict, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in graph.inputs:
        shape = [d if isinstance(d, int) else env[d] for d in v.shape]
        if v.dtype.is_float:
            out.append((torch.randn(shape, generator=gen) * graph.meta.get("scale", 1.0)).to(v.dtype.torch_dtype))
        elif v.dtype.name == "bool":
            out.append(torch.rand(shape, generator=gen) > 0.5)
        else:
            out.append(torch.randint(0, graph.meta.get("vocab", 2), shape, generator=gen))
    return out


def assert_close(got, ref: torch.Tensor, what: str, rtol: float = 1e-4):
    got = torch.as_tensor(np.asarray(got))
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if got.is_floating_point() and ref.is_floating_point():
        got = got.to(ref.dtype)        # the interpreter computes fp16 graphs in fp32
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
    if not ref.is_floating_point():
        assert torch.equal(got, ref), f"{what}: {int((got != ref).sum())} of {ref.numel()} values differ"
        return
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{what}: NaNs differ"
    g, r = got.double().nan_to_num(), ref.double().nan_to_num()
    if r.abs().max() > 0:
        cos = torch.nn.functional.cosine_similarity(g.reshape(-1), r.reshape(-1), dim=0)
        assert cos >= COS_MIN, f"{what}: cosine {float(cos):.8f}"
    tol = rtol * max(1.0, float(r.abs().max()))
    err = float((g - r).abs().max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def lower_run_compare(graph: Graph, out_dir: Path, sizes=SIZES, rtol: float = 1e-4):
    """Lower, then run the VM vs the interpreter at every size; returns the Lowered."""
    backend, lowered = lower(graph, out_dir)
    run_compare(graph, backend.load(out_dir, lowered.entry), sizes, rtol)
    return lowered


def run_compare(graph: Graph, runner, sizes=SIZES, rtol: float = 1e-4):
    """Run a loaded library vs the interpreter at every size."""
    for i, env in enumerate(sizes):
        inputs = make_inputs(graph, env, seed=i)
        ref = run_graph(graph, inputs)
        got = runner(*[x.numpy() for x in inputs])
        got = list(got) if isinstance(got, tuple) else [got]
        assert len(got) == len(ref)
        for v, g, r in zip(graph.outputs, got, ref):
            assert isinstance(g, np.ndarray) and g.dtype == np.dtype(v.dtype.name), (v, g.dtype)
            assert_close(g, r, f"{v.name} ({v.producer.op if v.producer else 'passthrough'}) at {env}", rtol)


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
             g.op("clamp", x, min=0.1), g.op("clamp", x, max=-0.1),
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
    g.meta["vocab"] = 5
    fa, fb = g.op("floor", a), g.op("floor", b)        # equal values happen: comparisons see ties
    pa, pb = g.op("gt", a, w(g, "zero", torch.tensor(0.0))), g.op("gt", b, w(g, "zero2", torch.tensor(0.0)))
    outs = [g.op(op, a, b) for op in ("add", "sub", "mul", "div", "maximum", "minimum")]
    outs += [g.op(op, fa, fb) for op in ("eq", "ne", "lt", "le", "gt", "ge")]
    outs += [g.op(op, pa, pb) for op in ("and", "or", "xor", "add", "mul")]
    outs += [g.op("pow", g.op("add", g.op("abs", a), w(g, "one", torch.tensor(1.0))), b),
             g.op("where", pa, a, b), g.op("div", i, g.op("add", j, w(g, "ione", torch.tensor(1)))),
             g.op("add", i, j), g.op("mul", i, j), g.op("sub", i, j), g.op("maximum", i, j)]
    g.set_outputs(outs)
    return g


def shape_graph() -> Graph:
    g = Graph("shapes")
    x = g.add_input("x", tensor("f32", "batch", "seq", 12))
    ix = g.add_input("ix", tensor("i64", "batch", "seq", 12))
    g.meta["vocab"] = 3                                    # gather_elements indices along axis 1 (seq >= 3)
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
    i1 = w(g, "cols", torch.tensor([[0, 2, 1]]))
    idx = g.op("index", x, i0, i1)
    pad = g.op("pad", x, pads=[0, 1, 2, 0, 0, 1], value=-2.5)
    g.set_outputs([p, flat, e, s1, s2, c, gathered, ge, idx, pad])
    return g


def reduce_graph() -> Graph:
    g = Graph("reduce")
    x = g.add_input("x", tensor("f32", "batch", "seq", 6))
    m = g.add_input("m", tensor("bool", "batch", "seq", 6))
    i = g.add_input("i", tensor("i64", "batch", "seq", 6))
    g.meta["vocab"] = 4
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
    g.meta["vocab"] = 20
    ln_w, ln_b = w(g, "ln.weight", torch.randn(16)), w(g, "ln.bias", torch.randn(16))
    bn = [w(g, f"bn.{k}", t) for k, t in (("mean", torch.randn(4)), ("var", torch.rand(4) + 0.5),
                                          ("weight", torch.randn(4)), ("bias", torch.randn(4)))]
    xc = g.op("reshape", x, shape=["batch", 4, "seq", 4])
    outs = [g.op("softmax", x, axis=-1), g.op("softmax", x, axis=1), g.op("log_softmax", x, axis=-1),
            g.op("softmax", g.op("permute", x, perm=[0, 2, 1]), axis=-1),          # rows of seq: ragged tails
            g.op("layer_norm", x, ln_w, ln_b, eps=1e-12), g.op("layer_norm", x, axis=-1, eps=1e-5),
            g.op("layer_norm", xc, axis=-2, eps=1e-5),
            g.op("batch_norm", xc, *bn, eps=1e-3), g.op("batch_norm", xc, *bn[:2], eps=1e-5),
            g.op("embedding", ids, w(g, "emb.weight", torch.randn(20, 8)))]
    g.set_outputs(outs)
    return g


def conv_graph() -> Graph:
    g = Graph("conv")
    x = g.add_input("x", tensor("f32", "batch", 4, 9, 9))
    s = g.add_input("s", tensor("f32", "batch", 4, "seq"))
    cw, cb = w(g, "c.weight", torch.randn(6, 2, 3, 3) * 0.3), w(g, "c.bias", torch.randn(6))
    c1 = w(g, "c1.weight", torch.randn(5, 4, 3) * 0.3)
    outs = [g.op("conv", x, cw, cb, stride=[2, 1], padding=[1, 0, 1, 2], dilation=[1, 2], groups=2),
            g.op("conv", s, c1, None, stride=[1], padding=[1, 1], dilation=[1]),
            g.op("max_pool", x, kernel=[3, 3], stride=[2, 2], padding=[1, 1, 1, 1], dilation=[1, 1]),
            g.op("max_pool", x, kernel=[2, 2], stride=[2, 2], padding=[0, 0, 0, 0], dilation=[1, 1], ceil_mode=True),
            g.op("avg_pool", x, kernel=[3, 3], stride=[2, 2], padding=[1, 1, 1, 1]),
            g.op("avg_pool", x, kernel=[3, 3], stride=[2, 2], padding=[1, 1, 1, 1], count_include_pad=False),
            g.op("max_pool", s, kernel=[2], stride=[1], padding=[0, 0], dilation=[1]),
            g.op("adaptive_avg_pool", x, output_size=[1, 1]), g.op("adaptive_avg_pool", x, output_size=[3, 3])]
    g.set_outputs(outs)
    return g


def linalg_graph() -> Graph:
    g = Graph("linalg")
    x2 = g.add_input("x2", tensor("f32", "batch", 24))
    x3 = g.add_input("x3", tensor("f32", "batch", "seq", 24))
    q = g.add_input("q", tensor("f32", "batch", 3, "seq", 8))
    k = g.add_input("k", tensor("f32", "batch", 3, 8, "seq"))
    wa, ba = w(g, "a.weight", torch.randn(19, 24) * 0.2), w(g, "a.bias", torch.randn(19))   # 19: ragged block
    wb = w(g, "b.weight", torch.randn(40, 24) * 0.2)
    wm = w(g, "m.weight", torch.randn(8, 5))
    scores = g.op("matmul", q, k)                            # [batch, 3, seq, seq]: symbolic n and k below
    outs = [g.op("linear", x2, wa, ba), g.op("linear", x3, wb, None), g.op("linear", x3, wa, ba),
            scores, g.op("matmul", scores, q), g.op("matmul", q, wm),
            g.op("matmul", q, g.op("reshape", wm, shape=[1, 1, 8, 5])),     # broadcast batch: Relax matmul
            g.op("linear", g.op("hadamard", x3, block=24), wb, None)]        # as the rotate pass leaves it
    g.set_outputs(outs)
    return g


def creation_quant_graph() -> Graph:
    g = Graph("create")
    x = g.add_input("x", tensor("f32", "batch", "seq", 16))
    g.meta["scale"] = 4.0
    outs = [g.op("arange", start=1, end="seq", step=2), g.op("full", shape=["batch", 2, "seq"], value=2.5, dtype="float32"),
            g.op("full", shape=[3, "seq"], value=7, dtype="int64"),
            g.op("fake_quant", x, format=dtype("int8"), scale=0.05, zero_point=0),
            g.op("fake_quant", x, format=dtype("uint8"), scale=0.03, zero_point=128),
            g.op("fake_quant", x, format=dtype("float8_e4m3fn"), scale=0.02),      # saturates past 8.96
            g.op("fake_quant", x, format=dtype("float8_e5m2"), scale=0.001),
            # every format bit for bit, ties and saturation: test_dynamic_quant.py
            g.op("dynamic_quant", x, format="int8"), g.op("dynamic_quant", x, format="nvfp4")]
    g.set_outputs(outs)
    return g


def routing_graph() -> Graph:
    """A mixture-of-experts layer's routing ops: top-k, an argsort of a symbolic axis, scatter-add."""
    g = Graph("routing")
    x = g.add_input("x", tensor("f32", "batch", "seq", 6))
    i = g.add_input("i", tensor("i64", "batch", "seq"))
    g.meta["vocab"] = 4                                    # expert ids, repeated: index_put adds them up
    best = g.op("topk_indices", x, k=2)
    order = g.op("topk_indices", x, k="seq", axis=1, largest=False)
    rows = g.op("reshape", x, shape=[-1, 6])
    added = g.op("index_put", w(g, "table", torch.randn(4, 6)), rows, g.op("reshape", i, shape=[-1]), accumulate=True)
    first = g.op("neg", g.op("slice", x, axis=0, start=0, end=1))
    written = g.op("index_put", x, first, w(g, "row0", torch.tensor([0])))
    # rows picked by computed indices (index fused after an elementwise op failed TVM's FuseTIR)
    picked = g.op("index", w(g, "experts", torch.randn(8, 3)), g.op("add", i, w(g, "offset", torch.tensor(4))))
    g.set_outputs([best, order, added, written, picked])
    return g


GRAPHS = {"unary": unary_graph, "binary": binary_graph, "shapes": shape_graph, "reduce": reduce_graph,
          "nn": nn_graph, "conv": conv_graph, "linalg": linalg_graph, "creation_quant": creation_quant_graph,
          "routing": routing_graph}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_ops_match_interpreter(tmp_path, name):
    lowered = lower_run_compare(GRAPHS[name](), tmp_path)
    assert not lowered.fallbacks


def test_every_registry_op_has_a_rule_and_a_graph():
    # the decoder ops have kernels of their own (test_decoder_kernels.py), as have the encoded
    # KV-cache ops (test_kv_cache_kernels.py)
    assert sorted(set(OPS) - set(LOWERINGS)) == []
    covered = {n.op for make in GRAPHS.values() for n in make().nodes}
    assert sorted(set(OPS) - covered - set(CACHE_OPS)) == sorted(decomposable())


def test_fake_quant_rounds_ties_to_even_and_saturates(tmp_path):
    g = Graph("ties")
    x = g.add_input("x", tensor("f32", "n"))
    g.set_outputs([g.op("fake_quant", x, format=dtype("int8"), scale=0.5, zero_point=0),
                   g.op("fake_quant", x, format=dtype("float8_e4m3fn"), scale=1.0),
                   g.op("fake_quant", x, format=dtype("int4"), scale=0.5, zero_point=0)])
    backend, lowered = lower(g, tmp_path)
    runner = backend.load(tmp_path, lowered.entry)
    # halves of the int grid, fp8 midpoints (1.0625 lies between 1.0 and 1.125), overflow, NaN
    xs = torch.tensor([0.25, 0.75, -1.25, 1.0625, 1.1875, 470.0, -1e6, 100.0, float("nan"), 0.0])
    got = runner(xs)
    for o, r in zip(got, run_graph(g, [xs])):
        assert torch.equal(torch.as_tensor(o).nan_to_num(123.0), r.nan_to_num(123.0)), (o, r)
    assert float(got[1][5]) == 448.0 and float(got[0][6]) == -64.0 and float(got[2][6]) == -4.0


def test_fp16_graph_runs_on_relax_ops(tmp_path):
    g = Graph("half")
    x = g.add_input("x", tensor("f16", "batch", 64))
    h = g.op("linear", x, w(g, "fc.weight", (torch.randn(32, 64) * 0.1).half()), None, name="fc")
    g.set_outputs([g.op("gelu", h), g.op("softmax", h, axis=-1)])
    lowered = lower_run_compare(g, tmp_path, sizes=[{"batch": 5}], rtol=5e-3)
    assert not lowered.fallbacks


# --- parameters and files ---------------------------------------------------------------------
def test_weights_are_parameters_read_from_the_bundle(tmp_path):
    g = linalg_graph()
    backend, lowered = lower(g, tmp_path)
    params = lowered.entry["params"]
    by_key = {p["key"]: p for p in params}
    # dense weights come from weights.safetensors as stored, each once (the dense kernel's panels
    # are made at load by the library's prepare function): the bundle adds no arrays of its own
    assert {k: p["file"] for k, p in by_key.items()} == {f"{n}::data": "weights.safetensors" for n in g.weights}
    assert by_key["m.weight::data"]["shape"] == [8, 5] and lowered.files == [LIBRARY_FILE, TUNING_FILE]
    assert len({p["name"] for p in params}) == len(params) and lowered.entry["prepare"] == "prepare"
    assert lowered.entry["inputs"][2] == {"name": "q", "dtype": "float32", "dims": ["batch", 3, "seq", 8]}
    assert lowered.toolchain["tvm"].startswith("0.27") and lowered.toolchain["llvm_target"] == "llvm -mcpu=native"
    assert lowered.toolchain["llvm"].isdigit() and lowered.entry["tvm_target"]["kind"] == "llvm"
    assert lowered.entry["kernels"]["a.weight"]["function"] == "nf_dense_19x24"


def test_runner_checks_inputs_and_devices(tmp_path):
    g = Graph("one")
    x = g.add_input("x", tensor("f32", "batch", "seq", 8))
    g.set_outputs([g.op("linear", x, w(g, "fc.weight", torch.randn(4, 8)), None, name="fc")])
    backend, lowered = lower(g, tmp_path)
    runner = backend.load(tmp_path, lowered.entry)
    x64 = np.random.default_rng(0).standard_normal((2, 5, 8))             # float64 is cast
    out = runner(x64)
    assert out.dtype == np.float32 and out.shape == (2, 5, 4)
    assert isinstance(runner(torch.randn(1, 1, 8)), torch.Tensor)
    with pytest.raises(BackendError, match="input x: expected rank 3"):
        runner(np.zeros((2, 8), np.float32))
    with pytest.raises(BackendError, match="dim 2 must be 8"):
        runner(np.zeros((2, 3, 7), np.float32))
    with pytest.raises(BackendError, match="CPU"):
        backend.load(tmp_path, lowered.entry, device="cuda")


def _relu_bundle(tmp_path):
    g = Graph("small")
    x = g.add_input("x", tensor("f32", "batch", 4))
    g.set_outputs([g.op("add", g.op("relu", x), w(g, "b", torch.randn(4)))])
    return lower(g, tmp_path)


@pytest.mark.parametrize("change,match", [
    (lambda e: {k: v for k, v in e.items() if k != "sha256"}, "tvm backend entry is missing or malformed"),
    (lambda e: {**e, "params": [{**e["params"][0], "key": "nope"}]}, "needs tensor 'nope', which is missing"),
    (lambda e: {**e, "params": [{**e["params"][0], "dtype": "float16"}]}, "is float32 \\[4\\], parameter .* needs float16"),
    (lambda e: {**e, "params": [{**e["params"][0], "file": "../w.safetensors"}]}, "refusing file path"),
])
def test_entry_problems_are_errors_naming_what_is_wrong(tmp_path, change, match):
    backend, lowered = _relu_bundle(tmp_path)
    with pytest.raises((BackendError, nf.bundle.BundleError), match=match):
        backend.load(tmp_path, change(lowered.entry))


def test_unloadable_library_is_an_error(tmp_path):
    import hashlib
    backend, lowered = _relu_bundle(tmp_path)
    junk = b"not a shared library"
    (tmp_path / LIBRARY_FILE).write_bytes(junk)
    with pytest.raises(BackendError, match="TVM cannot load the library"):
        backend.load(tmp_path, {**lowered.entry, "sha256": hashlib.sha256(junk).hexdigest()})


def test_rule_giving_the_wrong_dtype_is_an_error(tmp_path, monkeypatch):
    from tvm.relax import op
    monkeypatch.setitem(LOWERINGS, "relu", lambda lw, node: op.astype(lw.arg(node.inputs[0]), "float16"))
    with pytest.raises(BackendError, match="node relu \\(relu\\) lowered to float16, the graph says float32"):
        _relu_bundle(tmp_path)


def test_graph_input_with_an_expression_dim_is_an_error(tmp_path):
    g = Graph("expr")
    x = g.add_input("x", tensor("f32", "2*n", 4))
    g.set_outputs([g.op("relu", x)])
    with pytest.raises(BackendError, match="input x: dim '2\\*n' is an expression"):
        lower(g, tmp_path)


@pytest.mark.parametrize("what", ["weight", "input"])
def test_graph_output_that_is_a_weight_or_an_input(tmp_path, what):
    g = Graph("passthrough")
    x = g.add_input("x", tensor("f32", "batch", 4))
    wt = w(g, "w", torch.randn(4, 4))
    g.set_outputs([g.op("relu", x), wt if what == "weight" else x])
    lower_run_compare(g, tmp_path)


def test_changed_library_is_refused_before_it_is_loaded(tmp_path):
    g = Graph("tamper")
    x = g.add_input("x", tensor("f32", "batch", 4))
    g.set_outputs([g.op("relu", x)])
    backend, lowered = lower(g, tmp_path)
    lib = tmp_path / LIBRARY_FILE
    lib.write_bytes(lib.read_bytes() + b"\0")
    with pytest.raises(BackendError, match="sha256 .* differs .* refusing to load"):
        backend.load(tmp_path, lowered.entry)
    with pytest.raises(nf.bundle.BundleError, match="refusing file path"):
        backend.load(tmp_path, {**lowered.entry, "library": "../model.so"})


def test_running_a_bundle_does_not_import_the_tvm_compiler(tmp_path):
    import subprocess
    import sys
    g = Graph("rt")
    x = g.add_input("x", tensor("f32", "batch", 8))
    g.set_outputs([g.op("softmax", g.op("linear", x, w(g, "fc.weight", torch.randn(4, 8)), None), axis=-1)])
    backend, lowered = lower(g, tmp_path)
    (tmp_path / "entry.json").write_text(json.dumps(lowered.entry))
    code = ("import json, sys, numpy as np\n"
            "from nnforge.backends.tvm import TvmBackend\n"
            f"r = TvmBackend().load({str(tmp_path)!r}, json.load(open({str(tmp_path / 'entry.json')!r})))\n"
            "y = r(np.ones((3, 8), np.float32))\n"
            "print(y.shape, sorted(m for m in sys.modules if m == 'tvm' or m.startswith('tvm.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(3, 4) []"


def test_library_for_a_cpu_this_host_lacks_is_refused(tmp_path, monkeypatch):
    g = Graph("isa")
    x = g.add_input("x", tensor("f32", "batch", 4))
    g.set_outputs([g.op("relu", x)])
    backend, lowered = lower(g, tmp_path)
    entry = {**lowered.entry, "cpu_features": lowered.entry["cpu_features"] + ["avx512f"]}
    monkeypatch.setattr("nnforge.backends.tvm.host_cpu_flags", lambda: {"avx", "avx2", "fma"})
    with pytest.raises(BackendError, match="avx512f"):
        backend.load(tmp_path, entry)


# --- end to end -----------------------------------------------------------------------------------
def test_compile_for_cpu_end_to_end_then_load_at_other_sizes(tmp_path):
    from torch.export import Dim
    model = TinyEncoder().eval()
    batch, seq = Dim("batch", max=64), Dim("seq", max=128)
    bundle = nf.compile(model, "cpu", example_inputs=_ids(3, 7, 0), dynamic_shapes=({0: batch, 1: seq},) * 2,
                        input_names=["ids", "mask"], out=tmp_path / "b")
    m = bundle.manifest
    assert m["backend"]["name"] == "tvm" and m["numerics"]["runtime_checked"]
    assert m["numerics"]["backend_vs_reference"]["cosine_min"] >= 0.9999
    assert {LIBRARY_FILE} <= set(m["files"]) and m["toolchain"]["tvm"].startswith("0.27")
    runner = nf.load(bundle.path)
    for b, s in ((1, 1), (5, 19), (2, 64)):
        ids, mask = _ids(b, s, b + s)
        with torch.no_grad():
            want = model(ids, mask)
        got = runner(ids, mask)
        assert isinstance(got, torch.Tensor) and got.shape == (b, 16)
        assert_close(got, want, f"batch {b} seq {s}")
    assert nf.verify(bundle.path)["passed"]


@pytest.mark.parametrize("target,register", [("xeon-spr", "zmm"), ("epyc", "zmm")])
def test_cross_compiled_library_uses_avx512(tmp_path, target, register):
    """AVX-512 code in the library; the backend refuses it exactly where this CPU lacks an instruction set
    it uses, naming them, and runs it right where none is missing (an AVX-512 host of either vendor).
    Whether the host counts as the target (``can_run``: an AMD CPU for ``epyc``) is for ``nf.load`` to
    check, before any backend (tests/test_bundle.py)."""
    g = linalg_graph()
    backend, lowered = lower(g, tmp_path, target)
    assert lowered.entry["tvm_target"] and "avx512f" in lowered.entry["cpu_features"]
    if shutil.which("objdump"):
        asm = subprocess.run(["objdump", "-d", str(tmp_path / LIBRARY_FILE)], capture_output=True, text=True,
                             check=True).stdout
    else:       # the module's own LLVM assembly
        import tvm
        asm = tvm.runtime.load_module(str(tmp_path / LIBRARY_FILE)).imports[0].inspect_source("asm")
    assert f"%{register}" in asm and "vfmadd" in asm
    flags = host_cpu_flags()
    lacking = [f for f in lowered.entry["cpu_features"] if flags is not None and LINUX_FLAGS[f] not in flags]
    if lacking:
        assert "avx512f" in lacking and not get_target(target).can_run()[0]
        with pytest.raises(BackendError, match=re.escape(f"uses {', '.join(lacking)}, which this CPU lacks")):
            backend.load(tmp_path, lowered.entry)
    else:
        run_compare(g, backend.load(tmp_path, lowered.entry))


# --- errors ---------------------------------------------------------------------------------------
def test_op_without_lowering_raises_backend_error_naming_the_node(tmp_path, monkeypatch):
    monkeypatch.delitem(LOWERINGS, "gelu")
    g = Graph("nolower")
    x = g.add_input("x", tensor("f32", "batch", 4))
    g.set_outputs([g.op("gelu", g.op("relu", x), name="act")])
    with pytest.raises(BackendError) as ei:
        lower(g, tmp_path)
    assert "gelu" in str(ei.value) and "act" in str(ei.value)
    assert not (tmp_path / LIBRARY_FILE).exists()


def test_failure_inside_a_rule_names_the_node(tmp_path, monkeypatch):
    def broken(lw, node):
        raise KeyError("boom")
    monkeypatch.setitem(LOWERINGS, "relu", broken)
    g = Graph("broken")
    x = g.add_input("x", tensor("f32", "batch", 4))
    g.set_outputs([g.op("relu", x, name="the_relu")])
    with pytest.raises(BackendError, match="the_relu.*relu"):
        lower(g, tmp_path)


@pytest.mark.parametrize("text,match", [
    ("llvm -mcpu=znver4 -mattr=+avx2,+fma -num-cores=4", None),
    ("cuda -arch=sm_90", "must start with 'llvm'"),
    ("llvm -frobnicate=1", "unknown option '-frobnicate=1'"),
    ("llvm -num-cores=many", "-num-cores needs an integer"),
])
def test_llvm_target_strings(text, match):
    if match is None:
        assert parse_llvm_target(text) == {"kind": "llvm", "mcpu": "znver4", "mattr": ["+avx2", "+fma"],
                                           "num-cores": 4}
    else:
        with pytest.raises(BackendError, match=match):
            parse_llvm_target(text)


def test_unknown_llvm_cpu_is_an_error():
    from nnforge.backends.tvm import resolve_target
    with pytest.raises(BackendError, match="LLVM knows no CPU 'bogus'"):
        resolve_target("llvm -mcpu=bogus")
    assert resolve_target("llvm -mcpu=znver4").attrs["mcpu"] == "znver4"


def test_target_without_llvm_string_is_an_error(tmp_path):
    import dataclasses
    tgt = dataclasses.replace(get_target("cpu"), options={})
    g = Graph("t")
    x = g.add_input("x", tensor("f32", "batch", 4))
    g.set_outputs([g.op("relu", x)])
    with pytest.raises(BackendError, match="no options.llvm_target"):
        conftest.lower_into(TvmBackend(), g, tgt, tmp_path)


def test_registry_returns_the_tvm_backend():
    b = get_backend("tvm")
    assert isinstance(b, TvmBackend) and b is get_backend("tvm") and "tvm" in b.toolchain()


def test_targets_that_run_here():
    assert get_target("cpu").can_run()[0]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512f" not in flags:
        assert not get_target("xeon-spr").can_run()[0] and not get_target("epyc").can_run()[0]


# --- the default model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_compiles_for_cpu(tmp_path, default_model, default_inputs):
    import time
    from nnforge.models import default as dm
    model, tok = default_model
    t0 = time.perf_counter()
    bundle = nf.compile(model, "cpu", example_inputs=default_inputs, dynamic_shapes=dm.dynamic_shapes(),
                        input_names=["input_ids", "attention_mask"], output_names=["embeddings"], out=tmp_path / "m")
    seconds = time.perf_counter() - t0
    numerics = bundle.manifest["numerics"]
    print(f"default model for cpu: {seconds:.1f} s (timings {json.dumps(bundle.manifest['timings'])}), "
          f"backend vs reference {json.dumps(numerics['backend_vs_reference'])}")
    assert numerics["runtime_checked"] and numerics["backend_vs_reference"]["cosine_min"] >= 0.9999
    assert not bundle.manifest["fallbacks"]
    runner = bundle.load()
    _, evals = dm.sentence_splits()
    ids, mask = dm.encode(tok, evals[10:42])
    with torch.no_grad():
        want = model(ids, mask)
    assert_close(runner(ids, mask), want, "32 sentences", rtol=1e-3)

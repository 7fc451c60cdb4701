"""A decoder on the mlir backend: one module with ``prefill`` and ``decode`` functions that share
their weights and take the KV cache as arguments, parsed back and run under torch-mlir's reference
JIT, generating the reference interpreter's greedy tokens (a one-layer w4-gptq+kv8 module in the
default run; two layers with fp32, w4-gptq and w4-gptq+kv8 under -m slow: each compiles and
JIT-compiles a module). In the default run also the runner's chunking and
padding (nnforge.backends.mlir.decoder) and the kv8 cache's write and read kernels are checked on
the torch module the backend exports, against the interpreter, and the errors of the decoder's
function shapes; a one-layer module runs under the JIT through both functions, against the
interpreter."""
from __future__ import annotations


import pytest
import torch

import nnforge as nf
from nnforge.backends.base import BackendError, LowerContext
from nnforge.backends.mlir.decoder import DECODE, PREFILL, DecoderCalls, entry_fields, function_shapes
from nnforge.backends.mlir.module import GraphModule
from nnforge.frontend.decoders.importer import import_decoder
from nnforge.generation import DecoderRunner, generate, perplexity
from nnforge.ir import Interpreter
from nnforge.passes import resolve_recipe
from nnforge.passes.decompose import DecomposeOps
from tests.frontend.decoders.families import llama_directory, tiny_model

MAX_LEN = 24


def decoder_graph():
    return import_decoder(tiny_model("llama"), max_len=MAX_LEN).graph


def context(graph, batch: int, tokens: int, step_batch: int = 1) -> LowerContext:
    shapes = {v.name: [batch if d == "batch" else tokens if d == "seq" else d for d in v.shape] for v in graph.inputs}
    return LowerContext(recipe="", files=None, shapes=shapes, steps=[{"batch": step_batch, "seq": 1}])


@pytest.mark.parametrize("recipe", [None, "kv8"], ids=["fp32-cache", "kv8"])
def test_prefill_and_decode_calls_give_the_interpreters_outputs(recipe):
    """Three sequences through functions of batch 2 (the second group padded with an empty row),
    7 prompt tokens through a 4-token prefill (the second chunk padded at position -1), then one
    token through decode: the logits and caches (kv8: int8 codes and float16 scales, in those
    dtypes) of the whole graph on the interpreter, and the cache slots past the tokens fed stay
    zero (padding writes nothing)."""
    graph = decoder_graph()
    if recipe:
        graph = resolve_recipe(recipe)[1][0](graph)
    prepared = DecomposeOps(ops=["attention", "cache_update"])(graph)
    shapes, chunk = function_shapes(prepared, context(prepared, batch=3, tokens=4, step_batch=2))
    assert chunk == 4 and shapes[PREFILL]["input_ids"] == [2, 4] and shapes[DECODE]["positions"] == [2, 1]
    assert shapes[DECODE][graph.inputs[2].name][:3] == [2, 2, MAX_LEN]
    module, _ = GraphModule.build(prepared)
    names, outputs = [v.name for v in graph.inputs], [v.name for v in graph.outputs]
    calls_made = []

    def invoke(function, args):
        assert [list(a.shape) for a in args] == [shapes[function][n] for n in names]
        calls_made.append(function)
        with torch.no_grad():
            return [t.numpy() for t in module(*[torch.from_numpy(a) for a in args])]

    calls = DecoderCalls(entry_fields(prepared, chunk), names, outputs, batch=2)
    interpreter = Interpreter(graph)
    ids = torch.randint(4, 128, (3, 8), generator=torch.Generator().manual_seed(2))
    caches = [torch.zeros([3, *v.shape[1:]], dtype=v.dtype.torch_dtype) for v in graph.inputs[2:]]
    fed = 0
    for n in (7, 1):
        positions = torch.arange(fed, fed + n).repeat(3, 1)
        inputs = [ids[:, fed:fed + n], positions, *caches]
        got = calls.run(invoke, [x.numpy() for x in inputs])
        want = interpreter.run(*inputs)
        for name, g, w, v in zip(outputs, got, want, graph.outputs):
            assert torch.from_numpy(g).dtype == v.dtype.torch_dtype, name
            torch.testing.assert_close(torch.from_numpy(g).to(w.dtype), w, rtol=1e-5, atol=1e-5, msg=name)
        caches = [torch.from_numpy(g) for g in got[1:]]
        fed += n
        assert all(not c[:, :, fed:].any() for c in caches)
    assert calls_made == [PREFILL, PREFILL, PREFILL, PREFILL, DECODE, DECODE]


def test_the_decoders_function_shapes_name_what_they_cannot_take():
    graph = decoder_graph()
    ctx = context(graph, batch=1, tokens=4)
    ctx.shapes.pop("cache.1.v")
    with pytest.raises(BackendError, match="no check input shape for the decoder's inputs cache.1.v: the check inputs "
                                           "set the sizes of the prefill and decode functions"):
        function_shapes(graph, ctx)
    last = graph.op("reduce_max", graph.outputs[0], axes=[1], keepdim=False)
    graph.set_outputs([*graph.outputs, last])
    with pytest.raises(BackendError, match=rf"decoder output {last.name} \['batch', 128\] is neither a state output "
                                           r"nor per token \(axis 1 = seq\)"):
        function_shapes(graph, context(graph, batch=1, tokens=4))
    assert function_shapes(graph, LowerContext(recipe="", files=None, shapes=ctx.shapes)) is None   # not a decoder step


@pytest.mark.parametrize("dialect", ["linalg-on-tensors", pytest.param("tosa", marks=pytest.mark.slow)])
def test_the_jit_run_module_gives_the_interpreters_outputs(tmp_path, dialect):
    """The module itself, one layer: a 6-token prompt (a 4-token prefill and a padded one), then a
    decode step, under torch-mlir's JIT; the logits and caches of the interpreter (the TOSA module,
    lowered to linalg by the runner, under -m slow). A cache of another length, and a call without
    tokens, are refused by name."""
    pytest.importorskip("torch_mlir")
    from nnforge.backends.base import get_backend
    from tests.conftest import lower_into
    graph = import_decoder(tiny_model("llama", num_hidden_layers=1), max_len=8).graph
    ctx = context(graph, batch=1, tokens=4)
    backend = get_backend("mlir")
    target = nf.target("mlir").with_options(dialect=dialect)
    lowered = lower_into(backend, graph, target, tmp_path, shapes=ctx.shapes, steps=ctx.steps)
    runner = backend.load(tmp_path, lowered.entry)
    interpreter = Interpreter(graph)
    ids = torch.randint(4, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    caches = [torch.zeros(1, 2, 8, 16) for _ in range(2)]
    for start, n in ((0, 6), (6, 1)):
        inputs = [ids[:, start:start + n], torch.arange(start, start + n)[None], *caches]
        got, want = runner(*inputs), interpreter.run(*inputs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        caches = list(got[1:])
    with pytest.raises(BackendError, match=r"input cache.0.k: dim 2 must be 8, got shape \[1, 2, 9, 16\]; the mlir "
                                           "backend compiles a decoder's KV cache at the bundle's max_len"):
        runner(ids, torch.arange(7)[None], *[torch.zeros(1, 2, 9, 16)] * 2)
    with pytest.raises(BackendError, match="input input_ids has no tokens: give at least one"):
        runner(ids[:, :0], ids[:, :0], *caches)


def test_a_decoder_is_refused_in_stablehlo_before_a_bundle_is_written(tmp_path):
    pytest.importorskip("torch_mlir")
    target = nf.target("mlir").with_options(dialect="stablehlo")
    with pytest.raises(BackendError, match="is a decoder, and torch-mlir's StableHLO lowering of it computes other "
                                           "logits and caches than the reference once its KV cache holds tokens; "
                                           "compile it with dialect 'linalg-on-tensors'"):
        nf.compile(tiny_model("llama", num_hidden_layers=1), target, out=tmp_path / "b", max_len=8)
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return llama_directory(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def one_layer_dir(tmp_path_factory):
    return llama_directory(tmp_path_factory.mktemp("llm1"), num_hidden_layers=1)


def test_a_one_layer_w4_gptq_kv8_module_generates_the_interpreters_tokens(one_layer_dir, tmp_path):
    """The default run's share of the test below: the tiny Llama cut to one layer, w4-gptq with a
    kv8 cache (each function JIT-compiled once; the two-layer cases, fp32 and w4-gptq alone, under
    -m slow)."""
    test_a_decoder_module_generates_the_interpreters_tokens(one_layer_dir, tmp_path, "w4-gptq+kv8")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [None, "w4-gptq", "w4-gptq+kv8"], ids=["fp32", "w4-gptq", "w4-gptq+kv8"])
def test_a_decoder_module_generates_the_interpreters_tokens(model_dir, tmp_path, recipe):
    """16 greedy tokens from the module's two functions under torch-mlir's JIT, equal to the
    interpreter's on the bundle's graph, and the perplexity of two windows of 20 tokens (each
    one prefill, padded to the 24-token chunk); the weights are stored once (each constant the two
    functions read names one resource blob), as integer codes for w4-gptq; a kv8 cache stays int8
    codes and float16 scales in the functions' arguments and results."""
    pytest.importorskip("torch_mlir")
    calibration = model_dir / "calib.txt" if recipe else None
    bundle = nf.compile(model_dir / "model", "mlir", recipe, calibration=calibration, out=tmp_path / "b",
                        max_len=MAX_LEN)
    m = bundle.manifest
    entry = m["backend"]["entry"]
    assert entry["functions"] == [PREFILL, DECODE] and entry["prefill_chunk"] == MAX_LEN
    assert m["numerics"]["runtime_checked"]
    text = (bundle.path / entry["model"]).read_text()
    blobs = [line.split(":")[0].strip() for line in text.split("dialect_resources")[1].splitlines() if '"0x' in line]
    assert blobs and all(text.count(f"dense_resource<{b}>") == 2 for b in blobs)
    if recipe:
        assert entry["integer_constants"] > 0
    if recipe == "w4-gptq+kv8":
        assert "tensor<1x2x24x16xi8>, %arg3: tensor<1x2x24x1xf16>" in text.split("func.func @decode(")[1].split("{")[0]
    sig = m["signature"]
    graph = bundle.graph()
    reference = DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), m["decoder"], [i["name"] for i in sig["inputs"]],
                              [o["name"] for o in sig["outputs"]])
    prompt = torch.tensor([1, 17, 42, 99, 5, 23])
    want = generate(reference.decoder(resident=False), prompt, 16, stop_tokens=[]).tokens
    lm = bundle.load()
    assert lm.generate(prompt, 16, stop_tokens=[]).tokens == want
    ids = torch.randint(4, 128, (30,), generator=torch.Generator().manual_seed(1))
    got = lm.perplexity(ids, window=20, stride=10)
    assert got.windows == 2 and got.nll == pytest.approx(
        perplexity(reference.decoder(resident=False), ids, window=20, stride=10).nll, rel=1e-5)


TWO_FUNCTIONS = """
module {
  func.func @prefill(%arg0: tensor<1x4xi64>) -> tensor<1x4xi64> {
    return %arg0 : tensor<1x4xi64>
  }
  func.func @decode(%arg0: tensor<1x1xi64>) -> tensor<1x1xi64> {
    return %arg0 : tensor<1x1xi64>
  }
}
"""


def test_the_loader_refuses_functions_the_entry_does_not_name(tmp_path):
    pytest.importorskip("torch_mlir")
    from nnforge.backends.base import get_backend
    (tmp_path / "model.mlir").write_text(TWO_FUNCTIONS)
    load = get_backend("mlir").load
    with pytest.raises(BackendError, match="model.mlir: expected the functions main; found prefill, decode"):
        load(tmp_path, {"model": "model.mlir"})
    with pytest.raises(BackendError, match="model.mlir: prefill takes 1 arguments and returns 1 results; the bundle "
                                           "entry names 2 inputs and 1 outputs"):
        load(tmp_path, {"model": "model.mlir", "functions": [PREFILL, DECODE], "inputs": ["input_ids", "positions"],
                        "outputs": ["logits"]})

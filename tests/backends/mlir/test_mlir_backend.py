"""The mlir backend: IR -> torch module -> torch.export -> torch-mlir -> model.mlir.

The torch module the backend exports (encoded weights as integer buffers decoded in ``forward``)
equals the reference interpreter on the compressed graph, for every encoding the recipes make;
``nf.compile`` of a small MLP, with and without ``w8``, writes a module in each dialect
(linalg-on-tensors, TOSA, StableHLO) that parses back with torch-mlir's MLIR bindings, holds the
quantised weights as i8 constants and no float copy of them, and runs under torch-mlir's
reference JIT with the reference's numbers (the bundle's runtime check). Packed 4-bit, FP8/FP4,
palettes, 2:4 sparsity, low-rank and the widened/decoded fallbacks compile and run too; a module
that declares an external function, or has dynamic sizes, is refused before anything is compiled.
Small random-init BERT (with a mask) and ViT configurations compile and run with the reference's numbers.
The default model (all-MiniLM-L6-v2, with and without w8) is marked slow.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch_mlir")

import nnforge as nf                                                   # noqa: E402
from nnforge.backends.base import BackendError, get_backend            # noqa: E402
from nnforge.backends.mlir import MODEL_FILE, MlirBackend              # noqa: E402
from nnforge.backends.mlir.export import DIALECTS, constant_stats, export_program, parse  # noqa: E402
from nnforge.backends.mlir.module import GraphModule                   # noqa: E402
from nnforge.backends.mlir.runtime import check_ops, signature         # noqa: E402
from nnforge.ir import run_graph                                       # noqa: E402
from nnforge.passes import PassContext, PassManager, cleanup_passes, resolve_recipe  # noqa: E402
from nnforge.frontend import import_model                              # noqa: E402
from tests.backends.tiny_encoder import TinyEncoder, encoder_inputs   # noqa: E402

# the JIT's loops sum in another order than torch's kernels: a few ulps of the outputs
MAX_ABS = 1e-5


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 48)).eval()


def mlp_input(seed: int = 1):
    return torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))


def compressed(model, recipe, x):
    """The imported and compressed graph (the calibrated recipes calibrate on ``x`` itself)."""
    graph, _ = import_model(model, (x,), dynamic_shapes="static")
    _, passes = resolve_recipe(recipe, None)
    return PassManager(cleanup_passes() + passes).run(graph, PassContext(calibration=[(x,)]))


# --- the torch module the backend exports ----------------------------------------------------------
RECIPES = ["fp32", "w8", "w4-rtn", "w4-gptq", "w3-gptq", "fp8", "mxfp4", "nvfp4", "palettize-4", "palettize-3",
           "sparse24", "sparse24-w4", "lowrank-50", "block-sparse-50-w8", "w4-gptq+eora"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_module_equals_interpreter(recipe):
    """Same float operations as Encoding.decode: the module's outputs equal the interpreter's, and so
    do those of the program torch.export traces from it."""
    x = mlp_input()
    graph = compressed(mlp(), recipe, x)
    graph.meta["example_shapes"] = {graph.inputs[0].name: list(x.shape)}
    module, _ = GraphModule.build(graph)
    want = run_graph(graph, [x])[0]
    assert torch.equal(module(x), want)
    program = export_program(module, graph).module()
    assert torch.allclose(program(x), want, rtol=0, atol=1e-6)


def test_module_keeps_codes_as_integers():
    """Buffers: int8 codes for w8, packed bytes (half a byte per weight) for 4-bit; no float tensor of
    a quantised weight's size."""
    x = mlp_input()
    for recipe, code_bytes in (("w8", 64 * 128 + 128 * 48), ("w4-rtn", (64 * 128 + 128 * 48) // 2)):
        graph = compressed(mlp(), recipe, x)
        module, fallbacks = GraphModule.build(graph)
        assert fallbacks == []
        buffers = dict(module.named_buffers())
        ints = sum(b.numel() for b in buffers.values() if b.dtype == torch.int8 and b.dim() == 2)
        assert ints == code_bytes, (recipe, {k: (b.dtype, tuple(b.shape)) for k, b in buffers.items()})
        assert max(b.numel() for b in buffers.values() if b.is_floating_point()) < 64 * 128 // 4


def test_fallbacks_are_reported():
    x = mlp_input()
    _, fb = GraphModule.build(compressed(mlp(), "w3-gptq", x))
    assert fb and all("3-bit codes widened to one byte" in f.action for f in fb)
    _, fb = GraphModule.build(compressed(mlp(), "block-sparse-50-w8", x))
    assert fb and all("block4x1 sparsity decoded to a dense" in f.action for f in fb)


# --- nf.compile for the mlir target ----------------------------------------------------------------------
def constant_shapes(module) -> dict[str, set[tuple]]:
    """Element type -> shapes of the tensor constants of a parsed module (walked with the bindings)."""
    from torch_mlir import ir
    from nnforge.backends.mlir.export import CONSTANT_OPS
    out: dict[str, set[tuple]] = {}

    def visit(op):
        t = op.results[0].type if op.name in CONSTANT_OPS else None
        if isinstance(t, ir.RankedTensorType):
            out.setdefault(str(t.element_type), set()).add(tuple(t.shape))
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    return out


def weight_shapes(model) -> list[tuple[int, int]]:
    return [tuple(m.weight.shape) for m in model if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("recipe", [None, "w8"])
def test_compile_parses_keeps_int8_and_runs(tmp_path, dialect, recipe):
    model, x = mlp(), mlp_input()
    target = nf.target("mlir").with_options(dialect=dialect)
    b = nf.compile(model, target, recipe, example_inputs=(x,), out=tmp_path / "b")
    entry = b.manifest["backend"]["entry"]
    assert entry["dialect"] == dialect and entry["model"] == MODEL_FILE
    assert b.manifest["fallbacks"] == []
    module = parse((b.path / MODEL_FILE).read_text())    # torch-mlir's bindings: parses and verifies
    stats = constant_stats(module)
    assert stats == {k: entry[k] for k in stats}
    consts = constant_shapes(module)
    for rows, cols in weight_shapes(model):
        shapes = {(rows, cols), (cols, rows), (1, cols, rows), (1, rows, cols)}     # (TOSA folds transposes)
        if recipe == "w8":
            assert (rows, cols) in consts["i8"], f"no i8 constant of {rows}x{cols}"
            assert not consts["f32"] & shapes, f"a float copy of the {rows}x{cols} weight is in the module"
        else:
            assert consts["f32"] & shapes
    assert entry["constants"].get("i8", 0) == (2 if recipe == "w8" else 0)
    num = b.manifest["numerics"]
    assert num["runtime_checked"]
    assert num["backend_vs_reference"]["max_abs_error"] <= MAX_ABS
    got = nf.load(b.path)(x)
    assert torch.allclose(got, run_graph(compressed(model, recipe or "fp32", x), [x])[0], rtol=0, atol=MAX_ABS)


@pytest.mark.parametrize("recipe", ["w4-rtn", "w3-gptq", "fp8", "mxfp4", "palettize-4", "sparse24-w4", "lowrank-50",
                                    "block-sparse-50-w8"])
def test_other_encodings_compile_and_run(tmp_path, recipe):
    """Packed codes, minifloat and palette gathers, the 2:4 select and low-rank products run in the
    module (linalg-on-tensors, through the JIT) with the reference's numbers; fallbacks are recorded."""
    model, x = mlp(), mlp_input()
    b = nf.compile(model, "mlir", recipe, example_inputs=(x,), calibration=[(mlp_input(s),) for s in range(2, 6)],
                   out=tmp_path / "b")
    num = b.manifest["numerics"]
    assert num["runtime_checked"] and num["backend_vs_reference"]["max_abs_error"] <= MAX_ABS
    widened = recipe in ("w3-gptq", "block-sparse-50-w8")
    assert bool(b.manifest["fallbacks"]) == widened
    if recipe not in ("lowrank-50", "block-sparse-50-w8"):
        assert b.manifest["backend"]["entry"]["integer_constants"] >= 2


def test_encoder_with_mask(tmp_path):
    """Embedding, masked attention, layer norm and masked mean pooling, int8 weights: the module runs
    with the reference's numbers (a sequence with padding included)."""
    ids, mask = encoder_inputs(2, 12, seed=0)
    b = nf.compile(TinyEncoder(), "mlir", "w8", example_inputs=(ids, mask), input_names=["ids", "mask"],
                   out=tmp_path / "b")
    num = b.manifest["numerics"]
    assert num["runtime_checked"] and num["backend_vs_reference"]["max_abs_error"] <= MAX_ABS
    runner = nf.load(b.path)
    assert runner.input_names == ["ids", "mask"]
    ids2, mask2 = encoder_inputs(2, 12, seed=5)
    graph = compressed_encoder(ids, mask)
    assert torch.allclose(runner(ids2, mask2), run_graph(graph, [ids2, mask2])[0], rtol=0, atol=MAX_ABS)
    with pytest.raises(BackendError, match="dim 1 must be 12, .*the mlir backend compiles the sizes of the bundle.s check inputs"):
        runner(*encoder_inputs(2, 7, seed=1))          # the module's sizes are the check inputs'


def compressed_encoder(ids, mask):
    graph, _ = import_model(TinyEncoder(), (ids, mask), input_names=["ids", "mask"])
    _, passes = resolve_recipe("w8", None)
    return PassManager(cleanup_passes() + passes).run(graph, PassContext())


# --- transformers models ---------------------------------------------------------------------------------
class LastHidden(torch.nn.Module):
    """A Hugging Face encoder's last hidden state (its output object is not a tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(*inputs).last_hidden_state


def bert_and_inputs(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64)
    model = LastHidden(transformers.BertModel(cfg, add_pooling_layer=False)).eval()
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 5:] = 0
    return model, (torch.randint(0, 100, (2, 8), generator=gen), mask)


def vit_and_inputs(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64)
    model = LastHidden(transformers.ViTModel(cfg, add_pooling_layer=False)).eval()
    return model, (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)),)


@pytest.mark.slow  # the architecture matrix runs bert on mlir in the default run
@pytest.mark.parametrize("make", [bert_and_inputs, vit_and_inputs], ids=["bert", "vit"])
def test_transformers_encoders(tmp_path, make):
    """BERT with an attention mask (its mask positions index a constant) and ViT (its class token is
    a constant concatenated to the patches): the module runs with the reference's numbers, on the
    check inputs and on fresh ones."""
    model, x = make(seed=1)
    b = nf.compile(model, "mlir", "fp32", example_inputs=x, out=tmp_path / "b")
    num = b.manifest["numerics"]
    assert num["runtime_checked"] and num["backend_vs_reference"]["max_abs_error"] <= MAX_ABS
    _, fresh = make(seed=2)
    graph, _ = import_model(model, x)
    want = run_graph(PassManager(cleanup_passes()).run(graph, PassContext()), list(fresh))[0]
    assert torch.allclose(nf.load(b.path)(*fresh), want, rtol=0, atol=MAX_ABS)


# --- errors ----------------------------------------------------------------------------------------------
def test_bad_dialect_is_an_error(tmp_path):
    with pytest.raises(BackendError, match="dialect = 'mhlo' is not one of linalg-on-tensors, tosa, stablehlo"):
        nf.compile(mlp(), nf.target("mlir").with_options(dialect="mhlo"), example_inputs=(mlp_input(),),
                   out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


EXTERNAL = """
module {
  func.func private @system(i64) -> i64
  func.func @main(%arg0: tensor<2xf32>) -> tensor<2xf32> {
    return %arg0 : tensor<2xf32>
  }
}
"""
DYNAMIC = """
module {
  func.func @main(%arg0: tensor<?x2xf32>) -> tensor<?x2xf32> {
    return %arg0 : tensor<?x2xf32>
  }
}
"""


def test_loader_refuses_external_symbols_and_dynamic_sizes(tmp_path):
    with pytest.raises(BackendError, match="declaration of external function system"):
        check_ops(parse(EXTERNAL), "m.mlir")
    with pytest.raises(BackendError, match="dynamic size"):
        signature(parse(DYNAMIC), "m.mlir")
    (tmp_path / MODEL_FILE).write_text(EXTERNAL)
    with pytest.raises(BackendError, match="external function"):
        get_backend("mlir").load(tmp_path, {"model": MODEL_FILE, "dialect": "linalg-on-tensors"})
    with pytest.raises(BackendError, match="does not parse"):
        parse("module { func.func @main( }")
    with pytest.raises(BackendError, match="device 'cuda' is not supported"):
        MlirBackend().load(tmp_path, {"model": MODEL_FILE}, device="cuda")


# --- the default model -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("recipe", [None, "w8"])
def test_default_model(tmp_path, recipe):
    """all-MiniLM-L6-v2: the module parses, w8 keeps its 36 linear weights as i8 constants (no float
    constant of a linear weight's size), and the JIT runs it with the reference's numbers."""
    from nnforge.models import default as dm
    model, tok = dm.load_default_model()           # in the default install: a missing package is a failure
    _, evals = dm.sentence_splits()
    ids, mask = dm.encode(tok, evals[:2], max_len=16)
    b = nf.compile(model, "mlir", recipe, example_inputs=(ids, mask), input_names=["input_ids", "attention_mask"],
                   output_names=["embeddings"], name="minilm", dynamic_shapes=dm.dynamic_shapes(),
                   out=tmp_path / "minilm")
    entry = b.manifest["backend"]["entry"]
    consts = constant_shapes(parse((b.path / MODEL_FILE).read_text()))
    assert entry["input_shapes"] == {"input_ids": list(ids.shape), "attention_mask": list(mask.shape)}
    assert entry["constants"].get("i8", 0) == (36 if recipe == "w8" else 0)
    linear_shapes = {(384, 384), (1536, 384), (384, 1536)}
    assert bool(consts["f32"] & linear_shapes) == (recipe is None)
    assert (recipe is None) or linear_shapes <= consts["i8"]
    num = b.manifest["numerics"]
    assert num["runtime_checked"] and num["backend_vs_reference"]["cosine_min"] >= num["tolerance"]["cosine_min"]

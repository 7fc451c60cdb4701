"""The breadth matrix of issue 21: random-init configs of twelve Hugging Face architectures
(tests/architectures.py) on every target that runs here, each with the recipes its users reach for.

Each cell compiles from a batch-1 example with nnforge's defaults (free axes), verifies the bundle
(nf.verify recomputes its claims from its files), and runs it where its runtime runs here against
the reference interpreter on the compressed graph, on fresh inputs at two sizes other than the
example's (batch 3 and 2, and the other sequence lengths / image sizes the architecture takes).
MLIR modules have the sizes of the check inputs (torch-mlir miscompiles dynamic ones): they are
checked on two fresh inputs at those sizes. Core ML needs macOS: its cells build and verify. Causal LMs enter as stateless logits graphs on every
target (their KV-cache decoder bundles are tested in tests/test_decoder_compile.py).

The default run takes one cell per architecture, so that every target and recipe appears once;
``-m slow`` runs the whole product.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is imported: the h100 cells run on the CPU

import pytest
import torch

import nnforge as nf
from nnforge.backends.base import get_backend
from nnforge.ir import Interpreter
from nnforge.pipeline import runtime_check
from nnforge.targets import get_target
from tests.architectures import ARCHITECTURES, Logits

# (target, recipe): the recipes issue 21 names per target
CELLS = [("onnx", "fp32"), ("onnx", "w8"), ("onnx", "w4-gptq"), ("cpu", "fp32"), ("cpu", "w8"), ("cpu", "w4-gptq"),
         ("h100", "fp32"), ("h100", "w8"), ("h100", "w4-gptq"), ("apple-a17", "palettize-4"), ("alveo-u280", "w8"),
         ("mlir", "fp32")]
NAMES = list(ARCHITECTURES)
# one cell per architecture in the default run, each with its own (target, recipe), the pairing
# chosen so that the default run stays short (a TVM compile of a CNN costs the most)
DIAGONAL = {("gpt2", "onnx", "fp32"), ("llama", "h100", "w4-gptq"), ("qwen3", "onnx", "w8"),
            ("gemma3", "h100", "fp32"), ("phi3", "onnx", "w4-gptq"), ("mixtral", "h100", "w8"),
            ("bert", "mlir", "fp32"), ("vit", "cpu", "w4-gptq"), ("resnet", "alveo-u280", "w8"),
            ("mobilenet_v2", "cpu", "fp32"), ("convnext", "apple-a17", "palettize-4"), ("whisper_encoder", "cpu", "w8")}


def _params():
    out = []
    for name in NAMES:
        for target, recipe in CELLS:
            marks = () if (name, target, recipe) in DIAGONAL else (pytest.mark.slow,)
            out.append(pytest.param(name, target, recipe, id=f"{name}-{target}-{recipe}", marks=marks))
    return out


def _model(name: str):
    arch = ARCHITECTURES[name]
    model = arch.build()
    return Logits(model).eval() if arch.kind == "decoder" else model


def _fresh(arch, seed: int) -> list[tuple]:
    """Inputs at two sizes other than the example's (batch 1 at sizes[0])."""
    others = list(arch.sizes[1:]) + [arch.sizes[0]] * 2
    return [arch.inputs(batch=3, size=others[0], seed=seed), arch.inputs(batch=2, size=others[1], seed=seed + 1)]


def test_the_default_run_covers_every_architecture_target_and_recipe():
    assert {n for n, _, _ in DIAGONAL} == set(NAMES)
    assert {(t, r) for _, t, r in DIAGONAL} == set(CELLS)


@pytest.mark.parametrize("name, target, recipe", _params())
def test_cell_builds_verifies_and_matches_the_interpreter(name, target, recipe, tmp_path):
    arch = ARCHITECTURES[name]
    model = _model(name)
    example = arch.inputs(batch=1, size=arch.sizes[0], seed=0)
    calibration = [arch.inputs(batch=2, size=arch.sizes[0], seed=100 + i) for i in range(6)] \
        if recipe == "w4-gptq" or target == "apple-a17" else None
    check = [arch.inputs(batch=2, size=arch.sizes[0], seed=200)]
    bundle = nf.compile(model, target, recipe, example_inputs=example, calibration=calibration, check_inputs=check,
                        out=tmp_path / "bundle")
    nf.verify(bundle.path)                  # raises naming what disagrees

    tgt = get_target(target)
    if not tgt.runs_here and target != "h100":
        assert target == "apple-a17" and bundle.manifest["numerics"]["runtime_checked"] is False
        return
    assert bundle.manifest["numerics"]["runtime_checked"] is True
    graph = bundle.graph()
    runner, reference = bundle.load(), Interpreter(graph)
    fixed = runner.fixed_sizes is not None       # the mlir backend's modules (see its docstring)
    fresh = [arch.inputs(batch=2, size=arch.sizes[0], seed=300 + i) for i in range(2)] if fixed else _fresh(arch, 300)
    for inputs in fresh:
        with torch.no_grad():
            fp32 = torch.utils._pytree.tree_leaves(model(*inputs))
        # the pipeline's own check: the interpreter's tolerance, or rounding's where activations are rounded
        runtime_check(runner, graph, get_backend(tgt.backend), tgt, inputs, reference.run(*inputs), fp32)

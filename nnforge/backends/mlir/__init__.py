"""The mlir backend: IR -> a torch module -> torch.export -> torch-mlir -> ``model.mlir``, an MLIR
module for IREE and other MLIR compilers, in linalg-on-tensors (default), TOSA or StableHLO.

The module keeps the compression: every encoded weight is stored as integer constants (int8 codes,
packed 4/2/1-bit codes, palette indices, N:M metadata) with the float ops that decode it
(:mod:`.weights`), never as a pre-decoded float tensor, except where a :class:`Fallback` says so.
Its sizes are those of the bundle's check inputs (see ``export.export_program`` for why it is not
dynamic). A decoder's module holds two functions instead of ``main``, ``prefill`` and ``decode``, at
fixed sizes too, over the same weight constants, the KV cache passed in and returned
(:mod:`.decoder`).

After writing, the module is parsed back and verified with the MLIR Python bindings torch-mlir
ships and its constants are counted by element type into the bundle entry. ``load`` compiles it
for this CPU with torch-mlir's reference JIT (:mod:`.runtime`), so the bundle's numerics check
runs the module itself; ``load(..., device="iree")`` compiles it with IREE instead (:mod:`.iree`).

Target option (nnforge/targets/mlir.toml): ``dialect`` = "linalg-on-tensors" | "tosa" | "stablehlo".

    >>> nf.compile(model, "mlir", "w8", example_inputs=(x,))
    >>> nf.compile(model, nf.target("mlir").with_options(dialect="stablehlo"), "w8", example_inputs=(x,))
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

from ...ir import Graph
from ...ir.ops import OPS
from ...targets import Target
from ..base import Artifact, Backend, BackendError, LowerContext, Runner
from .capabilities import CAPABILITIES
from .decoder import entry_fields, function_shapes
from .export import DIALECTS, constant_stats, export_program, parse, to_mlir
from .module import GraphModule
from .runtime import MlirRunner, check_ops, signature

MODEL_FILE = "model.mlir"


def _dialect(target: Target) -> str:
    dialect = target.options.get("dialect", "linalg-on-tensors")
    if dialect not in DIALECTS:
        raise BackendError(f"target {target.name}: option dialect = {dialect!r} is not one of {', '.join(DIALECTS)}")
    return dialect


def _require_torch_mlir() -> None:
    try:
        import torch_mlir  # noqa: F401
    except ImportError:
        raise BackendError("the mlir backend needs torch-mlir: pip install 'nnforge[mlir]' "
                           "(torch-mlir==20261001)") from None


class MlirBackend(Backend):
    name = "mlir"
    capabilities = CAPABILITIES
    # The module runs each op's reference kernel under torch.export. Those of attention and
    # cache_update branch on position values (which slots to read, which positions to refuse),
    # which export cannot trace: they are written out in primitive ops before lowering.
    lowers = frozenset(OPS) - {"attention", "cache_update"}

    def times_here(self, target: Target) -> tuple[bool, str]:
        return False, ("the module runs here on torch-mlir's reference JIT, a correctness check; its speed is "
                       "that of the MLIR compiler a user feeds it to (IREE, ...)")

    def lower(self, graph: Graph, target: Target, ctx: LowerContext) -> Artifact:
        _require_torch_mlir()
        dialect = _dialect(target)
        module, fallbacks = GraphModule.build(graph, target)
        decoder = function_shapes(graph, ctx)
        if decoder and dialect == "stablehlo":
            # checked against the interpreter: from an empty cache it agrees, so the bundle's own check
            # (which prefills from one) would pass a module that goes wrong from the second call on
            raise BackendError(f"mlir backend: graph {graph.name} is a decoder, and torch-mlir's StableHLO lowering of "
                               "it computes other logits and caches than the reference once its KV cache holds "
                               "tokens; compile it with dialect 'linalg-on-tensors' (the default) or 'tosa'")
        functions = decoder[0] if decoder else {"main": ctx.shapes}
        mlir_module = to_mlir({name: export_program(module, graph, shapes) for name, shapes in functions.items()},
                              dialect)
        path = ctx.files.path(MODEL_FILE)
        with open(path, "w") as f:
            mlir_module.operation.print(file=f)
        del mlir_module
        written = parse(path.read_text())
        check_ops(written, str(path), tuple(functions))            # what load will compile
        shapes = {name: {v.name: list(shape) for v, (_, shape) in zip(graph.inputs, signature(written, str(path),
                                                                                             name)[0])}
                  for name in functions}
        entry = {"model": MODEL_FILE, "dialect": dialect,
                 **({"functions": list(functions), "input_shapes": shapes, **entry_fields(graph, decoder[1])} if decoder
                    else {"function": "main", "input_shapes": shapes["main"]}),
                 "inputs": [v.name for v in graph.inputs], "outputs": [v.name for v in graph.outputs],
                 "bytes": path.stat().st_size,
                 "encoded_weights": sum(1 for v in graph.weights.values() if v.encoding.kind != "dense"),
                 **constant_stats(written)}
        return Artifact(files=[MODEL_FILE], entry=entry, fallbacks=fallbacks, toolchain=self.toolchain())

    def load(self, bundle_dir: Path, entry: dict, device: str | None = None) -> Runner:
        from ...bundle import safe_join
        path = safe_join(Path(bundle_dir), entry.get("model"))
        if device is not None and device.startswith("iree"):
            from .iree import IreeRunner
            return IreeRunner(path, entry, device)
        if device not in (None, "cpu"):
            raise BackendError(f"the mlir backend runs its module on this CPU under torch-mlir's reference JIT "
                               f"(device 'cpu') or compiled by IREE (device 'iree'); device {device!r} is not "
                               "supported (compile model.mlir with an MLIR compiler such as IREE for other devices)")
        return MlirRunner(path, entry)

    def toolchain(self) -> dict[str, str]:
        try:
            return {"torch-mlir": importlib.metadata.version("torch-mlir")}
        except importlib.metadata.PackageNotFoundError:
            return {}


__all__ = ["MlirBackend", "MODEL_FILE"]

"""torch.export of the graph's module, torch-mlir's import and lowering, and the facts read back from
the module (its constants, the dialects it uses).

    >>> ep = export_program(module, graph)
    >>> mod = to_mlir(ep, "linalg-on-tensors")            # a torch_mlir.ir.Module
    >>> stats = constant_stats(parse(str(mod), "linalg-on-tensors"))
"""
from __future__ import annotations

import re
import traceback
from collections import Counter

import torch
from torch.fx.traceback import preserve_node_meta

from ...ir import Graph
from ..base import BackendError
from .module import NODE_KEY, OP_KEY

# The dialects torch-mlir 20261001 lowers to (OutputType names), all checked by the tests.
DIALECTS = ("linalg-on-tensors", "tosa", "stablehlo")
CONSTANT_OPS = {"arith.constant": "value", "tosa.const": "values", "stablehlo.constant": "value"}


def example_inputs(graph: Graph, shapes: dict | None = None) -> tuple[torch.Tensor, ...]:
    """Tensors of ``shapes`` (each input's shape in the check inputs: ``LowerContext.shapes``), else
    the graph's static shapes, all ones: only their shapes and dtypes matter to tracing."""
    shapes = shapes or {}
    out = []
    for v in graph.inputs:
        shape = shapes.get(v.name)
        if shape is None:
            if not all(isinstance(d, int) for d in v.shape):
                raise BackendError(f"mlir backend: input {v.name} has symbolic shape {list(v.shape)} and no example "
                                   "shape was given for it (the check inputs fix it)")
            shape = v.shape
        out.append(torch.ones(tuple(shape), dtype=v.dtype.torch_dtype))
    return tuple(out)


def export_program(module: torch.nn.Module, graph: Graph, shapes: dict | None = None):
    """torch.export of ``module`` at the sizes of the graph's example (check) inputs.

    The program is static on purpose: with dynamic dims, torch-mlir 20261001 miscompiles masked
    attention (the token embedding of a BERT encoder is lowered for a sequence of length 1, so the
    module reads and writes out of bounds: seen under its reference JIT with runtime verification),
    and its TOSA and StableHLO lowerings refuse torch.export's runtime shape assertions."""
    inputs = example_inputs(graph, shapes)
    try:
        with preserve_node_meta():          # keeps the IR node each op came from (module.NODE_KEY)
            return torch.export.export(module, inputs, strict=False)
    except Exception as e:
        raise BackendError(f"mlir backend: torch.export of graph {graph.name} failed: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:400]}") from e


def to_mlir(programs, dialect: str):
    """torch-mlir's FX import of ``programs`` (one ExportedProgram, imported as ``main``, or
    ``{function name: program}``, one function each in one module; weights frozen into constants),
    lowered to ``dialect``.

    The programs of one module share their weights: the importer keeps one constant per tensor it
    has seen (a ``dense_resource`` blob the functions' constants name), so a tensor the programs
    all read is stored once. A failure names the IR node (and op) whose traced ops torch-mlir could
    not import or lower."""
    from torch_mlir import fx, ir
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table
    from torch_mlir.extras.fx_importer import FxImporter
    if dialect not in DIALECTS:
        raise BackendError(f"mlir backend: dialect {dialect!r} is not one torch-mlir lowers to here; "
                           f"choose one of {', '.join(DIALECTS)}")
    programs = programs if isinstance(programs, dict) else {"main": programs}
    for ep in programs.values():
        _locate_by_node(ep)
    context = ir.Context()
    torch_d.register_dialect(context)
    importer = FxImporter(context=context)
    *first, (last_name, last) = programs.items()
    try:
        # import_program, not the default frozen import: that one swaps each buffer's placeholder for
        # the tensor itself, which it cannot import inside a list operand (a cat of ViT's class token,
        # an index by BERT's mask positions: "Heterogeneous lists are not supported"); import_program
        # binds every buffer to a constant first, so each use, in a list or not, reads that value.
        for name, ep in first:
            importer.import_program(ep.run_decompositions(get_decomposition_table()), func_name=name)
        # the last one through export_and_import, which lowers the whole module
        return fx.export_and_import(last, output_type=dialect, fx_importer=importer, func_name=last_name,
                                    experimental_support_mutation=True)
    except Exception as e:
        error = f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"
        node = _failed_node(e)
        if node is None:
            raise BackendError(f"mlir backend: torch-mlir could not lower the program to {dialect} (no single IR "
                               f"node could be named): {error}") from e
        name, op = node
        others = ", ".join(d for d in DIALECTS if d != dialect)
        raise BackendError(f"mlir backend: torch-mlir could not lower node {name} (op {op}) to {dialect}: {error}. "
                           f"Try another dialect (nf.target('mlir').with_options(dialect=...): {others}), or compile "
                           f"this graph for another target") from e


# MLIR locations are made from each FX node's stack trace; one naming the IR node makes a lowering
# diagnostic name it too (torch-mlir reads "File ..., line N," out of the trace).
_LOCATION = 'File "nnforge node {name} (op {op})", line 1, in forward'
_LOCATION_RE = re.compile(r"nnforge node (\S+) \(op (\w+)\)")


def _locate_by_node(ep) -> None:
    for n in ep.graph.nodes:
        custom = n.meta.get("custom") or {}
        if NODE_KEY in custom:
            n.meta["stack_trace"] = _LOCATION.format(name=custom[NODE_KEY], op=custom.get(OP_KEY, "?"))


def _failed_node(e: BaseException) -> tuple[str, str] | None:
    """(name, op) of the IR node a torch-mlir failure came from: the FX node its importer was at when
    it raised (innermost first), else the first node a lowering diagnostic's location names."""
    for frame, _ in reversed(list(traceback.walk_tb(e.__traceback__))):
        n = frame.f_locals.get("node")
        custom = n.meta.get("custom") if isinstance(n, torch.fx.Node) else None
        if custom and NODE_KEY in custom:
            return custom[NODE_KEY], custom.get(OP_KEY, "?")
    m = _LOCATION_RE.search(str(e))
    return (m.group(1), m.group(2)) if m else None


def context():
    """An MLIR context of torch-mlir's bindings with every dialect a module here may use."""
    from torch_mlir import ir
    from torch_mlir._mlir_libs import _stablehlo
    from torch_mlir.dialects import torch as torch_d
    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    _stablehlo.register_dialect(ctx)
    return ctx


def parse(text: str, ctx=None):
    """The module parsed back (and verified) with torch-mlir's MLIR bindings."""
    from torch_mlir import ir
    ctx = ctx or context()
    with ctx:
        try:
            module = ir.Module.parse(text)
        except ir.MLIRError as e:
            raise BackendError(f"mlir backend: the written module does not parse: {' '.join(str(e).split())[:600]}") \
                from None
        if not module.operation.verify():
            raise BackendError("mlir backend: the written module parses but does not verify")
    return module


def constant_stats(module) -> dict:
    """Counts and bytes of the module's tensor constants by element type ("i8", "f32", ...), each
    value once however many constants (of a decoder's two functions) read it, the largest float
    constant's shape, and how often each dialect's ops occur."""
    from torch_mlir import ir
    consts: Counter = Counter()
    nbytes: Counter = Counter()
    dialects: Counter = Counter()
    largest_float: tuple[int, list] = (0, [])
    seen: set = set()

    def visit(op):
        nonlocal largest_float
        name = op.name
        dialects[name.split(".")[0]] += 1
        t = op.results[0].type if name in CONSTANT_OPS and len(op.results) == 1 else None
        if isinstance(t, ir.RankedTensorType):        # (the bindings hand out the concrete type)
            n = 1
            for d in t.shape:
                n *= d
            attr = op.attributes[CONSTANT_OPS[name]]
            if n > 1 and not _splat(attr) and attr not in seen:
                seen.add(attr)
                et = str(t.element_type)
                consts[et] += 1
                nbytes[et] += n * max(_bits(et), 8) // 8
                if et.startswith(("f", "bf")) and n > largest_float[0]:
                    largest_float = (n, list(t.shape))
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    ints = [et for et in consts if et.startswith(("i", "ui", "si"))]
    return {"constants": dict(consts), "constant_bytes": dict(nbytes),
            "integer_constants": sum(consts[et] for et in ints),
            "integer_constant_bytes": sum(nbytes[et] for et in ints),
            "float_constants": sum(n for et, n in consts.items() if et not in ints),
            "float_constant_bytes": sum(b for et, b in nbytes.items() if et not in ints),
            "largest_float_constant": largest_float[1],
            "ops_by_dialect": dict(sorted(dialects.items()))}


def _splat(attr) -> bool:
    from torch_mlir import ir
    return isinstance(attr, ir.DenseElementsAttr) and attr.is_splat


def _bits(element_type: str) -> int:
    """Bits of an MLIR element type: i8 -> 8, bf16 -> 16, f8E4M3FN -> 8, index -> 64."""
    m = re.match(r"[a-z]+(\d+)", element_type)
    return int(m.group(1)) if m else 64


__all__ = ["DIALECTS", "example_inputs", "export_program", "to_mlir", "context", "parse",
           "constant_stats"]

"""ONNX (opset 13+) -> IR.

Converters live in :mod:`.onnx_ops`, one small function per ONNX op type, sharing an
:class:`~.onnx_context.OnnxContext`; tensors are read by :mod:`.onnx_tensors`. Shape computations
(Shape, Gather, Concat, Slice, arithmetic on their results) are evaluated while importing, over
symbolic dims, so that Reshape/Expand/Slice/Range/ConstantOfShape end up with static (possibly
symbolic) IR attributes rather than run-time shape tensors. Nodes whose inputs are all constants
are folded on the spot.

External data is read by nnforge itself (never by onnx.load): a location must be a plain relative
path inside the model's directory (no ``..``, no absolute path, no symlink, no hard-linked file),
offset/length must fit the file's real size, and every tensor's byte count is checked against
its dims x dtype before anything is read or allocated. Unknown external-data keys are ignored
with a warning.

    >>> g = from_onnx("model.onnx")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..ir import Dense, Graph, Value, dtype as to_dtype, sanitize_name
from ..ir.graph import GraphError
from ..ir.types import TensorType
from ..ir.verifier import verify
from .errors import FailedNode, FrontendError, ShapeRuleError, Unsupported, UnsupportedError, UnsupportedOpsError
from .onnx_context import DimVec, OnnxContext
from .onnx_declared_shapes import check_declared_outputs
from .onnx_context import FOLD_LIMIT  # noqa: F401  (re-exported: it was defined here)
from .onnx_ops import CONVERTERS
from .onnx_tensors import FOUR_BIT, ONNX_DTYPES, tensor_from_proto
from .onnx_tensors import EXTERNAL_KEYS, MAX_TENSOR_BYTES  # noqa: F401  (re-exported: they were defined here)

MIN_OPSET = 13


def _input_type(vi, names: dict[str, str]) -> TensorType:
    tt = vi.type.tensor_type
    if tt.elem_type not in ONNX_DTYPES:
        raise FrontendError(f"input {vi.name}: ONNX element type {tt.elem_type} is not supported")
    shape = []
    for axis, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        else:
            raw = d.dim_param or f"{vi.name}_{axis}"
            if raw not in names:
                cand = sanitize_name(raw).replace(".", "_")
                while cand in names.values():
                    cand += "_"
                names[raw] = cand
            shape.append(names[raw])
    return TensorType(to_dtype(ONNX_DTYPES[tt.elem_type]), tuple(shape))


def _input_text(cx: OnnxContext) -> str:
    """The types of the current node's inputs, for an error message."""
    parts = []
    for name in cx.node.input:
        v = cx.env.get(name) if name else None
        parts.append(str(v.type) if isinstance(v, Value) else f"shape value {v.dims}" if isinstance(v, DimVec)
                     else "none" if not name else "?")
    return ", ".join(parts)


def load_onnx(path: str | Path):
    import onnx
    path = Path(path)
    if not path.is_file():
        raise FrontendError(f"{path}: no such ONNX file")
    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:
        raise FrontendError(f"{path}: not a readable ONNX model: {type(e).__name__}: {e}") from None


def from_onnx(path: str | Path, *, name: str | None = None, output_names: list[str] | None = None,
              converters: dict[str, Callable] | None = None) -> Graph:
    """Read an ONNX model file into an IR graph."""
    path = Path(path)
    model = load_onnx(path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise FrontendError(f"{path}: opset {opset}; nnforge reads ONNX opset {MIN_OPSET} or newer "
                            "(upgrade it with onnx.version_converter)")
    table = {**CONVERTERS, **(converters or {})}
    og = model.graph
    generic = {"", "main_graph", "torch_jit", "torch-jit-export", "graph"}
    g = Graph(name or (path.stem if og.name in generic else og.name))
    cx = OnnxContext(g, opset)
    init_names = {t.name for t in og.initializer}
    sym_names: dict[str, str] = {}
    for vi in og.input:
        if vi.name in init_names:
            continue
        cx.env[vi.name] = g.add_input(g.fresh_name(vi.name), _input_type(vi, sym_names))
    for t in og.initializer:
        cx.env[t.name] = g.add_weight(g.fresh_name(t.name), Dense(tensor_from_proto(t, path.parent)))
        if t.data_type in FOUR_BIT:
            cx.code_bits[t.name] = 4

    problems: list[Unsupported] = []
    failed: list[FailedNode] = []
    poisoned: set[str] = set()
    for i, node in enumerate(og.node):
        label = node.name or f"{node.op_type}_{i}"
        if any(x in poisoned for x in node.input):
            poisoned.update(node.output)
            continue
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        conv = table.get(key)
        if conv is None:
            problems.append(Unsupported(key, label, str(path.name)))
            poisoned.update(node.output)
            continue
        cx.node = node
        try:
            outs = conv(cx)
        except UnsupportedError as e:
            problems.append(Unsupported(key, label, str(path.name), str(e)))
            poisoned.update(node.output)
            continue
        except (GraphError, ValueError) as e:      # a shape rule (or a shape comparison) refused the inputs
            failed.append(FailedNode(key, label, str(path.name), _input_text(cx), str(e)))
            poisoned.update(node.output)
            continue
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        for o_name, o in zip(node.output, outs):
            if o_name:
                cx.env[o_name] = o
    if problems:
        raise UnsupportedOpsError(str(path), problems, failed, "onnx")
    if failed:
        raise ShapeRuleError(str(path), failed)

    outputs = []
    for vi in og.output:
        v = cx.env.get(vi.name)
        if isinstance(v, DimVec) and v.static:
            v = cx.materialize(v, vi.name)
        if not isinstance(v, Value):
            raise FrontendError(f"{path}: graph output {vi.name} is not a tensor computed by the graph")
        outputs.append(v)
    check_declared_outputs(path, list(og.output), outputs, sym_names)
    g.set_outputs(outputs)
    g.name_outputs(output_names or [sanitize_name(vi.name) for vi in og.output])
    g.remove_unused_weights()
    g.meta.update({"frontend": "onnx", "opset": opset, "producer": model.producer_name})
    return verify(g)


def input_specs(path: str | Path) -> tuple[list[tuple[str, TensorType]], dict[str, str]]:
    """([(input name, type)], {dim name as written in the file: its symbol}) of an ONNX model's
    inputs (initializers listed as inputs excluded)."""
    model = load_onnx(path)
    init_names = {t.name for t in model.graph.initializer}
    names: dict[str, str] = {}
    specs = [(vi.name, _input_type(vi, names)) for vi in model.graph.input if vi.name not in init_names]
    return specs, names


def example_inputs_for(path: str | Path, dims: dict[str, int] | None = None, seed: int = 0) -> tuple:
    """Random inputs matching an ONNX model's inputs; a symbolic dim takes ``dims[name]`` (its
    dim_param as written in the file) or 1. Integer inputs get 0/1 values (valid ids and masks).
    A name in ``dims`` that is no symbolic dim of the model is an error listing those that are."""
    specs, names = input_specs(path)
    dims = dims or {}
    unknown = sorted(set(dims) - set(names) - set(names.values()))
    if unknown:
        have = ", ".join(sorted(names)) or "none (every input dim is fixed)"
        raise FrontendError(f"{path}: no symbolic input dim named {', '.join(unknown)}; its symbolic dims: {have}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _, t in specs:
        sizes = {sym_name: dims.get(raw, dims.get(sym_name, 1)) for raw, sym_name in names.items()}
        shape = [d if isinstance(d, int) else sizes[d] for d in t.shape]
        if t.dtype.is_float:
            out.append(torch.randn(shape, generator=gen).to(t.dtype.torch_dtype))
        elif t.dtype.name == "bool":
            out.append(torch.ones(shape, dtype=torch.bool))
        else:
            out.append(torch.randint(0, 2, shape, generator=gen).to(t.dtype.torch_dtype))
    return tuple(out)

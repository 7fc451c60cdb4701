"""Check a saved Core ML package against the nnforge graph it was lowered from.

Two checks, both on the package as written to disk (Linux has no Core ML runtime, so the saved
MIL program is read back, never run):

1. Weights: every weight of the graph is found by its MIL name, decoded from its stored tensors
   with :func:`weights.decode_op`, and compared with ``enc.decode(torch.float16)`` bit for bit
   (the columns taken in stored order for an act-order weight; +0 and -0 count as equal, since
   Core ML fills dropped sparse entries with +0). A mismatch raises, naming the weight. A weight
   stored as a plain fp16 ``const`` (Dense, or a compressed encoding with no smaller Core ML form)
   is ordinary data to coremltools, whose passes may fold it into another constant (conv +
   batch_norm fusion, deduplication): such a weight, when absent, is listed as missing. A weight
   kept in a ``constexpr_*`` chain must be there.
2. Ops: ``op_map`` gives, per IR op, the MIL op types it lowers to, in order. The rule checked:
   the concatenation, over the IR nodes in graph order, of ``op_map[node.op]`` is a subsequence
   of the program's op types in program order (``const`` and ``constexpr_*`` left out). Gaps are
   allowed (casts, gathers for act-order, ops coremltools inserts); order and presence are not.

    >>> report = verify_package("m.mlpackage", graph, {"linear": ("linear",), "relu": ("relu",)})
    >>> report.total_bytes, [w.op_types for w in report.weights]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import NnforgeError
from .weights import decode_op, mil_name


class CoreMLVerifyError(NnforgeError, AssertionError):
    """The package disagrees with the graph; the message names the weight or node at fault."""


@dataclass
class WeightCheck:
    name: str                   # IR weight name
    mil_name: str
    op_types: list[str]         # the chain, outermost first
    nbytes: int                 # bytes of the stored tensors of the chain
    dense_fp16_bytes: int
    blocked: bool = False       # scales or LUTs in blocks along the input columns (capabilities.weight_form)


@dataclass
class VerifyReport:
    path: str
    weights: list[WeightCheck] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)    # plain-const weights coremltools folded away
    ops_checked: int = 0
    shared_blobs: int | None = None                     # a multifunction package: blobs every function reads

    @property
    def total_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)


def load_program(path: str):
    """The pymil Program of a saved .mlpackage (read from its spec and weight file)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise CoreMLVerifyError(f"{path}: not an ML program package (model type {spec.WhichOneof('Type')})")
    return load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)


def _ops(prog, function: str | None = None):
    """Every op of every function (or of ``function``), nested blocks included, in program order
    (iterative walk)."""
    out = []
    for name, fn in prog.functions.items():
        if function is not None and name != function:
            continue
        stack = [iter(fn.operations)]
        while stack:
            op = next(stack[-1], None)
            if op is None:
                stack.pop()
                continue
            out.append(op)
            for block in reversed(getattr(op, "blocks", []) or []):
                stack.append(iter(block.operations))
    return out


def _dtype_bits(var) -> int:
    from coremltools.converters.mil.mil import types
    name = types.builtin_to_string(var.dtype)
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 8


def _chain(op):
    """(op types, stored bytes, whether its scales or LUTs come in blocks along the input
    columns) of the constexpr chain ending at ``op``."""
    types_, nbytes, todo, seen, blocked = [], 0, [op], set(), False
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        types_.append(o.op_type)
        blocked = blocked or _blocked(o)
        if o.op_type == "const":
            v = o.outputs[0]
            nbytes += -(-int(np.asarray(v.val).size) * _dtype_bits(v) // 8)
            continue
        for var in o.inputs.values():
            if var.op is not None:
                todo.append(var.op)
    return types_, nbytes, blocked


def _blocked(op) -> bool:
    """A shift-scale whose scale, or a LUT op whose table, has more than one block along axis 1
    (a 2-D weight's input columns)."""
    key = {"constexpr_blockwise_shift_scale": "scale", "constexpr_lut_to_dense": "lut"}.get(op.op_type)
    var = op.inputs.get(key) if key else None
    shape = getattr(var, "shape", None) or ()
    return len(shape) >= 2 and isinstance(shape[1], int) and shape[1] > 1


def _same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a16, b16 = (np.asarray(x, np.float16) + np.float16(0) for x in (a, b))   # -0 -> +0
    return a16.view(np.uint16) == b16.view(np.uint16)


def check_weights(prog, graph, names: dict | None = None, permuted: set | None = None,
                  plain: set | None = None) -> tuple[list[WeightCheck], list[str]]:
    """Rule 1 of the module docstring. ``names``: IR weight name -> MIL name; by default
    mil_name() over ``graph.weights`` in order with a fresh ``used`` set. ``permuted``: the
    act-order weights kept in stored column order (their linear gathers x); by default every 2-D
    act-order weight. ``plain``: the compressed weights emitted as a plain ``const`` (Dense ones
    always count as plain)."""
    if names is None:
        used: set = set()
        names = {n: mil_name(n, used) for n in graph.weights}
    producers = {}
    for op in _ops(prog):
        for v in op.outputs:
            producers[v.name] = op
    checks, missing = [], []
    for wname, value in graph.weights.items():
        enc = value.encoding
        op = producers.get(names.get(wname, ""))
        if op is None:
            if enc.kind == "dense" or wname in (plain or ()):
                missing.append(wname)       # const folding/dedup may rename plain consts
                continue
            raise CoreMLVerifyError(
                f"weight {wname!r} of {_readers(graph, value)} ({enc.describe()}) is not in the saved package "
                f"under its name {names.get(wname)!r}: coremltools' conversion replaced its compressed form, so "
                "the package would not hold the weight the graph has. This is an nnforge bug: please report it "
                "with the model; compiling without this recipe for apple targets avoids it meanwhile")
        got = decode_op(op)
        want = enc.decode(torch.float16)
        perm = getattr(enc, "perm", None)
        if perm is not None and len(enc.shape) == 2 and (permuted is None or wname in permuted):
            want = want[:, perm]            # emit_weight keeps act-order columns in stored order
        want = want.numpy()
        if enc.kind == "dense" and not want.dtype.kind == "f":
            ok = np.array_equal(got, want.astype(got.dtype))
            bad = 0 if ok else int((got != want.astype(got.dtype)).sum())
        else:
            want = np.clip(want, -65504, 65504) if enc.kind == "dense" else want
            if tuple(got.shape) != tuple(want.shape):
                raise CoreMLVerifyError(f"weight {wname!r}: package holds shape {tuple(got.shape)}, the graph "
                                        f"{tuple(want.shape)}")
            eq = _same_bits(got, want)
            bad = int((~eq).sum())
        if bad:
            idx = np.argwhere(~eq)[0] if enc.kind != "dense" or want.dtype.kind == "f" else None
            where = "" if idx is None else f"; first at {tuple(int(i) for i in idx)}: package " \
                f"{float(got[tuple(idx)])!r} vs graph {float(want[tuple(idx)])!r}"
            raise CoreMLVerifyError(f"weight {wname!r} ({enc.describe()}, MIL {op.op_type} {op.name!r}): {bad} of "
                                    f"{want.size} values differ from the graph's fp16 decode{where}")
        types_, nbytes, blocked = _chain(op)
        checks.append(WeightCheck(wname, op.outputs[0].name, types_, nbytes, enc.numel * 2, blocked))
    return checks, missing


def _readers(graph, value) -> str:
    """'layer fc1 (linear)' / 'layers a (conv), b (matmul)': the nodes reading weight ``value``."""
    nodes = [n for n in graph.nodes if any(i is value for i in n.inputs)]
    if not nodes:
        return "no layer"
    return f"layer{'s' if len(nodes) > 1 else ''} " + ", ".join(f"{n.name} ({n.op})" for n in nodes)


def check_ops(prog, graph, op_map: dict, function: str | None = None) -> int:
    """Rule 2 of the module docstring (in ``function`` alone, when given); returns how many MIL
    ops were matched."""
    unknown = sorted({n.op for n in graph.nodes if n.op not in op_map})
    if unknown:
        raise CoreMLVerifyError(f"op_map has no entry for IR op(s) {', '.join(unknown)}")
    seq = [op.op_type for op in _ops(prog, function) if op.op_type != "const" and not op.op_type.startswith("constexpr_")]
    pos, matched = 0, 0
    for node in graph.nodes:
        expected = op_map[node.op]
        for t in ((expected,) if isinstance(expected, str) else expected):
            try:
                pos = seq.index(t, pos) + 1
            except ValueError:
                raise CoreMLVerifyError(
                    f"{f'function {function}: ' if function else ''}node {node.name} ({node.op}): expected MIL op {t!r} after program position {pos}, none "
                    f"found; program ops from there: {seq[pos:pos + 8]}") from None
            matched += 1
    return matched


def verify_package(path, graph, op_map: dict, *, names: dict | None = None,
                   permuted: set | None = None, plain: set | None = None,
                   functions: dict | None = None) -> VerifyReport:
    """Check the package at ``path`` against ``graph``: weights bit for bit (``permuted``,
    ``plain``: as check_weights), op order by ``op_map`` (IR op -> MIL op type or tuple of
    types). ``functions`` (function name -> its op map) checks each function of a multifunction
    package on its own, and that every function reads each compressed weight from the same
    stored blobs (:func:`check_shared`). Raises CoreMLVerifyError naming the weight or node."""
    prog = load_program(path)
    report = VerifyReport(str(path))
    report.weights, report.missing = check_weights(prog, graph, names, permuted, plain)
    if functions:
        missing = sorted(set(functions) - set(prog.functions))
        if missing:
            raise CoreMLVerifyError(f"{path}: the package has no function(s) {', '.join(missing)} (it has "
                                    f"{', '.join(sorted(prog.functions))})")
        report.ops_checked = sum(check_ops(prog, graph, m, fn) for fn, m in functions.items())
        report.shared_blobs = check_shared(path, [w.mil_name for w in report.weights], list(functions))
    else:
        report.ops_checked = check_ops(prog, graph, op_map)
    return report


def check_shared(path, weights: list[str], functions: list[str]) -> int:
    """That every function of the saved package reads the stored tensors of each constexpr chain
    of ``weights`` (MIL names) from the same offsets of the weight file: one copy of the weights,
    whichever function runs. Returns how many blobs the functions share."""
    import coremltools as ct
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    offsets: dict[str, dict[str, int]] = {}
    for fn in functions:
        ops = {}
        for block in spec.mlProgram.functions[fn].block_specializations.values():
            for op in block.operations:
                for out in op.outputs:
                    ops[out.name] = op
        blobs = {}
        todo = [w for w in weights if w in ops]
        while todo:
            op = ops.get(todo.pop())
            if op is None:
                continue
            for attr in op.attributes.values():
                if attr.HasField("blobFileValue"):
                    blobs[op.outputs[0].name] = attr.blobFileValue.offset
            for key, arg in op.inputs.items():
                for a in arg.arguments:     # a named value, or a constant inlined as the op's argument
                    if a.HasField("name"):
                        todo.append(a.name)
                    elif a.value.HasField("blobFileValue"):
                        blobs[f"{op.outputs[0].name}.{key}"] = a.value.blobFileValue.offset
        offsets[fn] = blobs
    first, *others = functions
    for fn in others:
        differ = sorted(n for n in offsets[first] if offsets[fn].get(n) != offsets[first][n])
        if differ:
            raise CoreMLVerifyError(f"{path}: functions {first} and {fn} read {len(differ)} stored tensor(s) from "
                                    f"different blobs (first: {differ[0]}); the package holds the weights twice")
    return len(offsets[first])


__all__ = ["CoreMLVerifyError", "VerifyReport", "WeightCheck", "load_program", "check_weights", "check_ops",
           "verify_package"]

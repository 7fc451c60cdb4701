"""IR -> MIL program (Core ML's intermediate language), node by node, each node by its rule in
:mod:`.ops`.

Core ML computes in fp16 here: float graph inputs arrive as fp32 (fp16 for fp16 graphs) and are
cast to fp16 once, every float weight is an fp16 MIL value (``weights.emit_weight``, which keeps
compressed encodings as constexpr ops), and float outputs are cast back to fp32. Core ML has no
int64 and no bool I/O: every integer tensor is int32 inside the program (a stated cast; ids and
positions fit), bool inputs arrive as int32 and bool outputs leave as int32; the runner converts
both ways.

Dimension symbols of the graph inputs become MIL symbols of the input placeholders (one per IR
symbol, shared between inputs, so Core ML knows they agree); a symbolic dim a node needs at run
time (reshape targets, ``full``, ``arange``) is read from the input that defines it with
``shape`` + ``gather`` and rebuilt from those with integer MIL ops (:meth:`Lowering.dim`).
"""
from __future__ import annotations

import numpy as np

from ...ir import WEIGHT_OPS, Dense, Graph, Value, symbolic as sym
from ...ir.dtypes import DType
from ...ir.ops import WEIGHT_SLOT
from ...targets import Target
from ..base import BackendError, Fallback
from . import weights as W
from .capabilities import CAPABILITIES
from .mil_types import NP_OF, mil_dtype
from .ops import LOWERINGS, no_equivalent


class Lowering:
    """The state of one lowering: the MIL value of every IR value, the symbols' run-time values,
    the MIL names given out, the notes of emitted weights, and the MIL ops each node became."""

    def __init__(self, graph: Graph, target: Target | None = None, bind: dict[str, int] | None = None):
        from coremltools.converters.mil import Builder as mb
        self.mb = mb
        self.graph = graph
        self.target = target                        # what the capability table reads
        self.layers = layer_ops(graph)              # weight -> the layer ops reading it as their weight
        self.values: dict[Value, object] = {}
        self.symbols: dict[str, object] = {}        # IR symbol -> int32 scalar var, made on first use
        self.used: set[str] = set()                 # MIL identifiers given out
        self.renamed: dict[str, dict[str, str]] = {"inputs": {}, "outputs": {}, "weights": {}}
        self.weight_names: dict[str, str] = {}      # IR weight -> MIL name of its value
        self.fallbacks: list[Fallback] = []
        self.perms: dict[str, np.ndarray] = {}      # act-order weight -> column order of its stored form
        self.plain: set[str] = set()                # weights emitted as a plain const (coremltools may fold them)
        self.op_map: dict[str, list[str]] = {}      # IR node -> MIL op types it became
        self.input_names: list[str] = []            # MIL names of the graph inputs, in order
        self.output_names: list[str] = []           # ... and of the graph outputs
        self._sym_source = graph.symbols()           # symbol -> (input, axis) it is read from
        self.bind = dict(bind or {})                 # symbols fixed for this function (a decoder's step)

    def name_of_input(self, v: Value) -> str:
        return self.input_names[self.graph.inputs.index(v)]

    def name_of_output(self, i: int) -> str:
        return self.output_names[i]

    # --- names --------------------------------------------------------------------------------
    def name(self, raw: str, kind: str | None = None) -> str:
        """A valid, unique MIL identifier for ``raw``; a changed input/output/weight name is recorded."""
        out = W.mil_name(raw, self.used)
        self.used.add(out)
        if kind is not None and out != raw:
            self.renamed[kind][raw] = out
            if kind != "weights":       # weights: one summary note (see rename_note), not one per weight
                self.fallbacks.append(Fallback(where=raw, what=f"{kind[:-1]} name is not a valid Core ML identifier",
                                               action=f"renamed to {out} in model.mlpackage"))
        return out

    def rename_note(self) -> None:
        """One Fallback for every weight renamed (entry["renamed"]["weights"] has the full map)."""
        names = self.renamed["weights"]
        if names:
            shown = ", ".join(f"{k} -> {v}" for k, v in list(names.items())[:3])
            self.fallbacks.append(Fallback(where=f"{len(names)} weight(s)",
                                           what="weight names are not valid Core ML identifiers",
                                           action=f"renamed ({shown}{', ...' if len(names) > 3 else ''}); "
                                                  "the full map is in the entry's renamed.weights"))

    # --- dims ---------------------------------------------------------------------------------
    def dim(self, d):
        """An IR dim as a python int, or an int32 scalar MIL value computed at run time."""
        return sym.fold(d, const=lambda v: v, symbol=self._symbol, binop=self._int_op,
                        call=lambda f, args: self._int_op(f, *args), neg=lambda a: self._int_op("mul", a, -1))

    def _int_op(self, op: str, a, b):
        """Integer arithmetic on dims, folded in python when both operands are static."""
        if isinstance(a, int) and isinstance(b, int):
            return _PY_INT[op](a, b)
        return getattr(self.mb, _MIL_INT[op])(x=a, y=b)

    def _symbol(self, name: str):
        if name in self.bind:
            return self.bind[name]
        if name not in self.symbols:
            if name not in self._sym_source:
                raise BackendError(f"dimension symbol {name!r} is not defined by any graph input")
            value, axis = self._sym_source[name]
            shape = self.mb.shape(x=self.values[value])
            self.symbols[name] = self.mb.gather(x=shape, indices=np.int32(axis), axis=0)
        return self.symbols[name]

    def shape(self, dims):
        """A 1-D int32 shape: a numpy constant when every dim is static, else a run-time concat."""
        parts = [self.dim(d) for d in dims]
        if all(isinstance(p, int) for p in parts):
            return np.asarray(parts, dtype=np.int32)
        mb = self.mb
        return mb.concat(values=[np.asarray([p], np.int32) if isinstance(p, int) else mb.expand_dims(x=p, axes=[0])
                                 for p in parts], axis=0)

    # --- values -------------------------------------------------------------------------------
    def const(self, value, dt: DType | str):
        """A numpy scalar/array of the MIL type computing ``dt`` (operands of elementwise ops)."""
        kind = dt if isinstance(dt, str) else mil_dtype(dt)
        with np.errstate(over="ignore"):          # past float16's range is its inf, as an fp16 op computes
            return np.asarray(value).astype(NP_OF[kind])

    def arg(self, v: Value | None):
        if v is None:
            return None
        if v in self.values:
            return self.values[v]
        if not v.is_weight:
            raise BackendError(f"value {v.name} is used before it is defined")
        self.values[v] = self.weight(v)
        return self.values[v]

    def weight(self, v: Value):
        """The MIL value of a weight: float weights through ``weights.emit_weight`` (fp16, kept
        compressed where Core ML can; a layer's weight that the capability table does not take,
        reported with the table's reason), integer and bool tables as int32/bool constants."""
        mil = self.name(v.name, "weights")
        self.weight_names[v.name] = mil
        enc = v.encoding
        if not v.dtype.is_float:
            if not isinstance(enc, Dense):
                raise BackendError(f"weight {v.name}: a {enc.describe()} {v.dtype.name} tensor has no Core ML form")
            data = enc.decode().numpy()
            if data.dtype == np.int64 and data.size and (data.max() > 2**31 - 1 or data.min() < -2**31):
                raise BackendError(f"weight {v.name}: int64 values beyond int32, which Core ML computes in")
            self.plain.add(v.name)
            return self.mb.const(val=data.astype(NP_OF[mil_dtype(v.dtype)]), name=mil)
        ops = self.layers.get(v.name, [])
        whys = [why for op in ops for cap, why in (CAPABILITIES.find(op, enc, self.target),) if cap is None]
        var, note, perm = W.emit_weight(enc, mil, gather=all(op == "linear" for op in ops))
        if var.op.op_type == "const":
            self.plain.add(v.name)
        if perm is not None:        # kept in act-order: linear permutes x's columns
            self.perms[v.name] = np.asarray(perm)
        if whys:
            note = f"{note or 'stored as it is'} ({'; '.join(dict.fromkeys(whys))})"
        if note:
            self.fallbacks.append(Fallback(where=v.name, what=enc.describe(), action=note))
        return var


_PY_INT = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
           "floordiv": lambda a, b: a // b, "mod": lambda a, b: a % b, "max": max, "min": min}
_MIL_INT = {"add": "add", "sub": "sub", "mul": "mul", "floordiv": "floor_div", "mod": "mod",
            "max": "maximum", "min": "minimum"}


def layer_ops(graph: Graph) -> dict[str, list[str]]:
    """Weight name -> the ops of the layers (linear, matmul, conv, embedding) reading it as their
    weight, each once; weights only other ops read (biases, norm parameters) are not in it."""
    out: dict[str, list[str]] = {}
    for n in graph.nodes:
        w = n.inputs[WEIGHT_SLOT] if n.op in WEIGHT_OPS and len(n.inputs) > WEIGHT_SLOT else None
        if w is not None and w.is_weight and n.op not in out.setdefault(w.name, []):
            out[w.name].append(n.op)
    return out


def input_type(v: Value) -> str:
    """The MIL type of a graph input as Core ML receives it (no int64, no bool I/O)."""
    if v.dtype.is_float:
        return "fp16" if v.dtype.name == "float16" else "fp32"
    return "int32"


def build_program(graph: Graph, opset, target: Target | None = None, *, bind: dict[str, int] | None = None,
                  state: list[tuple[str, str]] | None = None):
    """(MIL Program, Lowering) for ``graph`` on ``target`` (what the capability table reads); errors
    name the node and op at fault. ``bind`` fixes dimension symbols to sizes (every dim of a state
    must end up fixed); ``state`` lists (input, output) pairs held as Core ML state: the input is an
    fp16 state read with ``read_state`` and the output is written back into it with
    ``coreml_update_state`` instead of being returned."""
    from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types
    from coremltools.converters.mil import Builder as mb

    missing = [n for n in graph.nodes if n.op not in LOWERINGS]
    if missing:
        raise no_equivalent(missing[0], f"; nodes without a rule: "
                            f"{', '.join(f'{n.name} ({n.op})' for n in missing)[:300]}")
    lw = Lowering(graph, target, bind)
    held = dict(state or [])                    # state input -> its output
    symbols: dict[str, object] = {}
    placeholders = {}
    for v in graph.inputs:
        dims = []
        for axis, d in enumerate(v.shape):
            if isinstance(d, str) and d in lw.bind:
                dims.append(lw.bind[d])
            elif isinstance(d, int):
                dims.append(d)
            elif sym.is_symbol(d):
                dims.append(symbols.setdefault(d, get_new_symbol()))
            else:
                raise BackendError(f"input {v.name}: dim {d!r} is an expression; Core ML inputs take a fixed size "
                                   "or a range per dim (give the input its own symbol)")
        mil = lw.name(v.name, "inputs")
        lw.input_names.append(mil)
        if v.name in held:
            if not all(isinstance(d, int) for d in dims):
                raise BackendError(f"state {v.name}: Core ML state has a fixed shape, got {list(v.shape)} with "
                                   f"{', '.join(str(d) for d in dims if not isinstance(d, int))} unbound")
            placeholders[mil] = mb.state_tensor_placeholder(shape=dims, dtype=types.fp16)
            continue
        mtype = {"fp16": types.fp16, "fp32": types.fp32, "int32": types.int32}[input_type(v)]
        placeholders[mil] = mb.placeholder(shape=dims, dtype=mtype)
    written = {out: inp for inp, out in held.items()}
    for v in graph.outputs:           # named before any weight, so outputs keep their names first
        lw.output_names.append(lw.input_names[[i.name for i in graph.inputs].index(written[v.name])]
                               if v.name in written else lw.name(v.name, "outputs"))
    with Function(placeholders, opset) as func:
        for v, mil in zip(graph.inputs, lw.input_names):
            var = func.inputs[mil]
            want = mil_dtype(v.dtype)
            if v.name in held:
                lw.values[v] = mb.read_state(input=var)
                continue
            lw.values[v] = var if input_type(v) == want else mb.cast(x=var, dtype=want)
        for node in graph.nodes:
            before = len(func.operations)
            try:
                out = LOWERINGS[node.op](lw, node)
            except BackendError:
                raise
            except Exception as e:
                raise BackendError(f"core ml backend: lowering node {node.name} ({node.op}) failed: "
                                   f"{type(e).__name__}: {e}") from e
            want = mil_dtype(node.outputs[0].dtype)
            got = types.builtin_to_string(out.dtype) if hasattr(out, "dtype") else None
            if got != want:
                raise BackendError(f"node {node.name} ({node.op}) lowered to {got}, the graph's "
                                   f"{node.outputs[0].dtype.name} computes in {want}")
            lw.values[node.outputs[0]] = out
            lw.op_map[node.name] = [op.op_type for op in list(func.operations)[before:]]
        outs = []
        for v, mil in zip(graph.outputs, lw.output_names):
            var = lw.arg(v)
            if v.name in written:
                mb.coreml_update_state(state=func.inputs[mil], value=var)
                continue
            kind = output_type(v)
            outs.append(mb.cast(x=var, dtype=kind, name=mil) if kind != mil_dtype(v.dtype)
                        else mb.identity(x=var, name=mil))
        func.set_outputs(outs)
    lw.rename_note()
    prog = Program()
    prog.add_function("main", func)
    return prog, lw


# MIL op types a rule always emits for its IR op and coremltools' passes keep (no fusion turns them
# into something else); the op map verify.py checks the saved program against is built from these.
ANCHORS = {"linear": {"linear"}, "conv": {"conv"}, "embedding": {"gather"}, "softmax": {"softmax"},
           "layer_norm": {"layer_norm"}, "batch_norm": {"batch_norm"}, "max_pool": {"max_pool"},
           "avg_pool": {"avg_pool"}, "gelu": {"gelu"}, "gather_elements": {"gather_along_axis"},
           "index": {"gather_nd"}, "cumsum": {"cumsum"}, "argmax": {"reduce_argmax"},
           "log_softmax": {"reduce_log_sum_exp"}}


def op_signature(graph: Graph, lw: Lowering) -> dict[str, tuple]:
    """IR op -> the MIL op types every node of that op leaves in the saved program, in order
    (verify.py's op map). Empty for an op whose nodes differ, or for a node on constants only
    (coremltools folds those away); matmul is anchored only between two activations (with a
    constant operand coremltools may fuse it into linear), batch_norm only where it does not
    follow a conv whose weight is a plain const (coremltools fuses that pair into one conv)."""
    live: set = set(graph.inputs)
    for node in graph.nodes:
        if any(v in live for v in node.inputs if v is not None):
            live.update(node.outputs)
    per_op: dict[str, set] = {}
    for node in graph.nodes:
        anchors = set(ANCHORS.get(node.op, ()))
        if node.op == "matmul" and not any(v.is_weight for v in node.inputs):
            anchors = {"matmul"}
        if node.op == "batch_norm" and _after_plain_conv(node, lw):
            anchors = set()
        ok = node.outputs[0] in live and all(v is None or v in live or v.is_weight for v in node.inputs)
        sig = tuple(t for t in lw.op_map[node.name] if t in anchors) if ok else ()
        per_op.setdefault(node.op, set()).add(sig)
    return {op: (next(iter(sigs)) if len(sigs) == 1 else ()) for op, sigs in per_op.items()}


def _after_plain_conv(node, lw: Lowering) -> bool:
    src = node.inputs[0].producer
    return src is not None and src.op == "conv" and src.inputs[WEIGHT_SLOT].name in lw.plain


def output_type(v: Value) -> str:
    """The MIL type of a graph output as Core ML hands it back."""
    if v.dtype.is_float:
        return "fp16" if v.dtype.name == "float16" else "fp32"
    return "int32"

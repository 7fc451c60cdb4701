"""IR -> Relax, node by node with ``relax.BlockBuilder``, each node by its rule in :mod:`.ops`.

Dimension symbols of the graph inputs become ``tirx.Var``s of the Relax signature, and every
symbolic dim expression is rebuilt from them (:meth:`Lowering.dim`), so one module runs any batch
and length. Weights become parameters after the graph inputs, in first-use order, never constants
(:class:`ParamSpec` says where each one's array lives). Whether a layer's weight runs natively is
the capability table's answer (:mod:`.capabilities`, asked by :meth:`Lowering.native`): dense
weights as stored, encoded linear weights on the kernel of their row; any other weight is decoded
here and reported as a Fallback with the table's reason. Linears behind a per-token int8 / int4
``dynamic_quant`` run an integer kernel on its codes (weights_intact.py, ``Lowered.act_linears``).

The module has two functions: ``main(inputs..., params...)`` and ``prepare(stored...)``, which
makes ``main``'s parameters from the arrays as stored, once, when a bundle loads (the dense
kernel's weight panels, zero biases; everything else passes through unchanged).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ...ir import Dense, Graph, Node, Value, symbolic as sym
from ...ir.dtypes import DType
from ...targets import Target
from ..base import BackendError, Capability, Fallback
from .capabilities import CAPABILITIES
from .kernels import KernelError
from .ops import LOWERINGS
from .dispatch import Dispatcher
from .tuning import Tuner, time_kernel
from .weight_arrays import c_name, numpy_of

WEIGHTS_FILE = "weights.safetensors"     # written by the pipeline (save_graph); read in place
PARAMS_FILE = "tvm_params.safetensors"   # arrays this backend makes
SEP = "::"                               # safetensors key separator of nnforge.ir.serialize
OPAQUE = 8                               # relax OpPatternKind kOpaque
ENTRY_FUNCTION = "main"                  # inputs..., params... -> outputs
PREPARE_FUNCTION = "prepare"             # params as stored -> main's params (packed), run at load


@dataclass
class ParamSpec:
    """One parameter of ``prepare`` (an array as stored): tensor ``key`` of bundle file ``file``."""
    name: str
    file: str
    key: str
    dtype: str
    shape: list
    decode: bool = False        # ``key`` names a graph weight, decoded from its encoding at load

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Lowered:
    """What :func:`lower_graph` produces: the module, its parameters, the arrays to write to
    ``tvm_params.safetensors``, fallbacks, and per-layer kernel notes."""
    mod: object
    params: list[ParamSpec]
    arrays: dict[str, np.ndarray]
    fallbacks: list[Fallback]
    kernels: dict[str, dict] = field(default_factory=dict)
    dispatch: dict = field(default_factory=dict)
    act_linears: dict[str, dict] = field(default_factory=dict)   # weights_intact.act_linears


class Lowering:
    """The state of one lowering: the BlockBuilder, the Relax value of every IR value, the
    parameters of ``main`` and ``prepare``, the kernels added, and the fallbacks taken."""

    def __init__(self, graph: Graph, spec: Target, target, tuner: Tuner | None = None,
                 dispatcher: Dispatcher | None = None):
        from tvm import relax
        self.relax = relax
        self.graph = graph
        self.spec = spec                      # the nnforge target: what the capability table reads
        self.llvm_target = spec.options["llvm_target"]     # the string kernel builders take
        self.target = target                  # the resolved tvm Target
        self.tuner = tuner or Tuner({}, target, (False, "not asked to tune"), graph.name)
        self.dispatcher = dispatcher or Dispatcher({"dispatch": False}, (False, ""), graph, graph.name)
        self.dispatch_params: dict[str, int] = {}   # weight -> index in main's params of its rows threshold
        self.bb = relax.BlockBuilder()
        self.symbols: dict[str, object] = {}
        self.values: dict[Value, object] = {}
        self.params: list = []
        self.specs: list[ParamSpec] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.fallbacks: list[Fallback] = []
        self.kernel_notes: dict[str, dict] = {}
        self._dense: dict[str, object] = {}         # weight name -> param var of its dense form
        self._funcs: dict[str, object] = {}         # kernel function name -> GlobalVar
        self._linear: dict[str, tuple] = {}         # weight name -> weights.linear_kernel's answer
        self.fused: dict[str, object] = {}          # layer -> its output, made with its siblings' (ops._linear)
        self.kernel_consts: dict[str, list] = {}    # weight name -> its kernel's array parameters
        self._names: set[str] = set()
        self.raw_params: list = []                  # prepare's parameters: the arrays in the files
        self._prepare: list[Callable[[], object]] = []   # main's parameter i, computed in prepare
        self._raw_for: dict[int, object] = {}       # main parameter -> its prepare parameter
        self._panels: dict[tuple, object] = {}
        self._zeros: dict[int, object] = {}
        self._stored: dict[tuple, object] = {}      # (weight, field) -> prepare param of that stored tensor
        self._uses: dict | None = None
        self.act_linears: dict | None = None        # integer linears (weights_intact.act_linears), once asked
        self.act_codes: dict[Value, tuple] = {}     # their quantisers' (codes, row scales, rows)

    # --- dims and types -----------------------------------------------------------------------
    def dim(self, d):
        """The PrimExpr (int64) of an IR dim."""
        from tvm import tirx

        def symbol(name):
            if name not in self.symbols:
                raise BackendError(f"dimension symbol {name!r} is not defined by any graph input")
            return self.symbols[name]
        binops = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
                  "floordiv": tirx.floordiv, "mod": tirx.floormod}
        return sym.fold(d, const=lambda v: tirx.IntImm("int64", v), symbol=symbol,
                        binop=lambda op, a, b: binops[op](a, b),
                        call=lambda f, args: (tirx.max if f == "max" else tirx.min)(*args),
                        neg=lambda a: -a)

    def shape(self, dims) -> list:
        return [self.dim(d) for d in dims]

    def ttype(self, v: Value):
        return self.relax.TensorType(self.shape(v.shape), v.dtype.name)

    def const(self, value, dtype: DType | str):
        name = dtype if isinstance(dtype, str) else dtype.name
        return self.relax.const(value, name)

    # --- values -------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, i = c_name(base), 1
        while name in self._names:
            name, i = f"{c_name(base)}_{i}", i + 1
        self._names.add(name)
        return name

    def param(self, name: str, shape, dtype: str, file: str, key: str, array: np.ndarray | None = None):
        """A new array read from a bundle file: a parameter of ``prepare``, and (unchanged) of
        ``main``; returns ``main``'s. ``array`` (if given) goes to tvm_params.safetensors."""
        ttype = self.relax.TensorType([int(s) for s in shape], dtype)
        raw = self.relax.Var(self.fresh(name), ttype)
        self.raw_params.append(raw)
        self.specs.append(ParamSpec(raw.name, file, key, dtype, [int(s) for s in shape]))
        if array is not None:
            self.arrays[key] = np.asarray(array, order="C")     # 0-d stays 0-d
        return self.made(raw.name, ttype, lambda: raw, raw)

    def made(self, name: str, ttype, build: Callable[[], object], raw=None):
        """A parameter of ``main`` that ``prepare`` computes (once, at load) with ``build()``."""
        var = self.relax.Var(name if raw is not None else self.fresh(name), ttype)
        self.params.append(var)
        self._prepare.append(build)
        if raw is not None:
            self._raw_for[id(var)] = raw
        return var

    def raw(self, main_var):
        """The ``prepare`` parameter behind a ``main`` parameter made by :meth:`param`."""
        return self._raw_for[id(main_var)]

    def extra(self, weight: str, label: str, array: np.ndarray):
        """A parameter holding an array the backend made for ``weight``."""
        array = np.asarray(array, order="C")
        return self.param(f"{weight}.{label}", array.shape, array.dtype.name, PARAMS_FILE, f"{weight}{SEP}{label}",
                          array)

    def native(self, op: str, v: Value) -> tuple[Capability | None, str]:
        """(the capability row that runs weight ``v`` of an ``op`` layer natively, "") or (None, why
        not): what every rule of a layer op asks before it reads its weight."""
        return CAPABILITIES.find(op, v.encoding, self.spec)

    def layer_weight(self, op: str, v: Value):
        """The weight of an ``op`` layer that Relax runs on a dense tensor (conv, embedding,
        matmul): as stored where the table has a row for it, else decoded with the table's reason."""
        _, why = self.native(op, v)
        return self.weight(v, why)

    def weight(self, v: Value, why: str = ""):
        """The parameter holding weight ``v`` densely (decoded, with a Fallback saying ``why``,
        when encoded)."""
        if v.name in self._dense:
            return self._dense[v.name]
        enc = v.encoding
        if isinstance(enc, Dense):
            dtype = numpy_of(enc.data).dtype.name
            var = self.param(v.name, enc.shape, dtype, WEIGHTS_FILE, f"{v.name}{SEP}data")
        else:
            var = self.extra(v.name, "decoded", self.decoded(v, why))
        self._dense[v.name] = var
        return var

    def panels(self, v: Value, transposed: bool = False):
        """Weight ``v`` packed (at load) into the panels of the dense kernel; ``transposed``: ``v``
        is ``[K, N]`` (a matmul operand) rather than a linear's ``[N, K]``."""
        from .kernels.dense import pack_panels, panel_width, vector_lanes
        key = (v.name, transposed)
        if key not in self._panels:
            n, k = (v.shape[1], v.shape[0]) if transposed else v.shape
            raw = self.raw(self.weight(v))
            nb = panel_width(vector_lanes(self.target), self.dense_config(n, k))
            ttype = self.relax.TensorType([-(-n // nb), k, nb], "float32")
            self._panels[key] = self.made(f"{v.name}.panels", ttype, lambda: pack_panels(raw, n, k, nb, transposed))
        return self._panels[key]

    def matrix_panels(self, name: str, matrix: np.ndarray):
        """A constant float32 ``[k, n]`` ``matrix`` (the product ``x @ matrix``, not a graph weight:
        a hadamard factor) as the dense kernel's panels, packed when the bundle loads; one per
        ``name``."""
        from .kernels.dense import pack_panels, panel_width, vector_lanes
        key = (name, "matrix")
        if key not in self._panels:
            k, n = matrix.shape
            const = self.relax.const(np.ascontiguousarray(matrix, np.float32))
            nb = panel_width(vector_lanes(self.target), self.dense_config(n, k))
            ttype = self.relax.TensorType([-(-n // nb), k, nb], "float32")
            self._panels[key] = self.made(f"{name}.panels", ttype,
                                          lambda: pack_panels(const, n, k, nb, transposed=True))
        return self._panels[key]

    def stored(self, v: Value, field: str, array: np.ndarray):
        """A ``prepare`` parameter (``main`` never sees it): tensor ``field`` of weight ``v``'s
        encoding as the bundle stores it (``array``: that tensor, for its shape and dtype), for
        arrays a kernel needs made from it when the bundle loads."""
        key = (v.name, field)
        if key not in self._stored:
            shape = [int(d) for d in array.shape]
            raw = self.relax.Var(self.fresh(f"{v.name}.{field}"), self.relax.TensorType(shape, array.dtype.name))
            self.raw_params.append(raw)
            self.specs.append(ParamSpec(raw.name, WEIGHTS_FILE, f"{v.name}{SEP}{field}", array.dtype.name, shape))
            self._stored[key] = raw
        return self._stored[key]

    def dense_panels_at_load(self, v: Value, perm=None):
        """Encoded weight ``v`` as the dense kernel's panels, made when the bundle loads: the runner
        decodes the weight from the bundle's own encoding (the bundle stays compressed on disk);
        ``perm`` (a ``main`` parameter): its columns in that act-order, as the compressed kernel reads x."""
        from tvm.relax import op
        from .kernels.dense import pack_panels, panel_width, vector_lanes
        n, k = v.shape
        ttype = self.relax.TensorType([n, k], "float32")
        raw = self.relax.Var(self.fresh(f"{v.name}.dense"), ttype)
        self.raw_params.append(raw)
        self.specs.append(ParamSpec(raw.name, WEIGHTS_FILE, v.name, "float32", [n, k], decode=True))
        nb = panel_width(vector_lanes(self.target), self.dense_config(n, k))
        src = raw if perm is None else op.take(raw, self.raw(perm), axis=1)
        return self.made(f"{v.name}.dense_panels", self.relax.TensorType([-(-n // nb), k, nb], "float32"),
                         lambda: pack_panels(src, n, k, nb))

    def dense_config(self, n: int, k: int) -> dict:
        """The dense GEMM's schedule for an ``[n, k]`` weight: measured, reused or default (tuning.py)."""
        from .kernels.bsr import llvm_target
        from .kernels.dense import config_space, dense_matmul, panel_width, vector_lanes
        lanes = vector_lanes(self.target)
        space = config_space(lanes, llvm_target(self.llvm_target).registers)

        def measure(config, rows):
            nb = panel_width(lanes, config)
            panels = np.random.default_rng(0).standard_normal((-(-n // nb), k, nb)).astype(np.float32)
            kern = dense_matmul("nf_tune", n, k, self.target, config)
            return time_kernel(kern.func, [panels, np.zeros(n, np.float32)], rows, k, n, self.target)
        return self.tuner.choose("dense", f"{n}x{k}", space, measure)

    def dense_kernel(self, n: int, k: int):
        """The dense GEMM kernel of an ``[n, k]`` weight, with the schedule :meth:`dense_config` chose."""
        from .kernels.dense import dense_matmul
        return dense_matmul(c_name(f"nf_dense_{n}x{k}"), n, k, self.target, self.dense_config(n, k))

    def kernel_config(self, module, builder: str, args: dict) -> dict | None:
        """The schedule of weight kernel ``module.builder`` for ``args`` when the module declares a
        ``config_space`` (tuning.py); None for modules with one schedule per shape."""
        space_of = getattr(module, "config_space", None)
        if space_of is None:
            return None
        key, space = space_of(**args, target=self.llvm_target)
        build = getattr(module, builder)

        def measure(config, rows):
            kern = build("nf_tune", **args, target=self.llvm_target, config=config)
            return time_kernel(kern.func, kern.consts, rows, kern.k, kern.n, self.target)
        return self.tuner.choose(builder, key, space, measure)

    def zeros(self, n: int):
        """A float32 zero vector [n] (made at load: the bias of layers without one)."""
        if n not in self._zeros:
            from tvm.relax import op
            self._zeros[n] = self.made(f"zeros{n}", self.relax.TensorType([n], "float32"),
                                       lambda: op.zeros([n], "float32"))
        return self._zeros[n]

    def decoded(self, v: Value, why: str = "") -> np.ndarray:
        """``v`` decoded to its dense dtype, reported as a Fallback."""
        enc = v.encoding
        self.fallbacks.append(Fallback(v.name, enc.describe(), f"no TVM kernel for {enc.describe()}: decoded to "
                                       f"{v.dtype.name}" + (f" ({why})" if why else "")))
        return numpy_of(enc.decode(v.dtype.torch_dtype))

    def arg(self, v: Value | None):
        if v is None:
            return None
        if v.is_weight:
            return self.weight(v)
        return self.values[v]

    def emit(self, expr, name: str = ""):
        return self.bb.emit(expr, name_hint=c_name(name))

    def func(self, name: str, prim_func):
        """GlobalVar of a kernel PrimFunc, added to the module once per name."""
        if name not in self._funcs:
            # Opaque to FuseOps: a scheduled kernel must not be merged with Relax's own loops.
            self._funcs[name] = self.bb.add_func(prim_func.with_attr("op_pattern", OPAQUE), name)
        return self._funcs[name]

    def readers(self, v: Value) -> list:
        """The nodes that read ``v``, in graph order (once per input slot)."""
        if self._uses is None:
            self._uses = self.graph.uses()
        return [n for n, _ in self._uses.get(v, [])]

    def only_reader(self, v: Value, node) -> bool:
        """Whether ``node`` is the one reader of ``v`` and ``v`` is no graph output: a kernel of
        ``node`` may then write its result into ``v``'s buffer (``call_tir_inplace``)."""
        return self.readers(v) == [node] and v not in self.graph.outputs

    def call_kernel(self, name: str, kernel_func, args: list, out_shape: list, dtype: str = "float32"):
        gv = self.func(name, kernel_func)
        return self.emit(self.relax.call_tir(gv, args, self.relax.TensorType(out_shape, dtype)), name)

    # --- the walk -----------------------------------------------------------------------------
    def run(self) -> Lowered:
        relax = self.relax
        from tvm import tirx
        g = self.graph
        missing = LOWERINGS.missing(n.op for n in g.nodes)
        if missing:
            raise BackendError(f"the tvm backend has no lowering for op(s) {', '.join(missing)} (used by nodes "
                               f"{', '.join(n.name for n in g.nodes if n.op in missing)[:300]})")
        inputs = []
        for v in g.inputs:
            for d in v.shape:
                if isinstance(d, str) and not sym.is_symbol(d):
                    raise BackendError(f"input {v.name}: dim {d!r} is an expression; graph inputs take plain "
                                       "symbols or integers")
                if isinstance(d, str) and d not in self.symbols:
                    self.symbols[d] = tirx.Var(d, "int64")
            var = relax.Var(self.fresh(v.name), self.ttype(v))
            inputs.append(var)
            self.values[v] = var
        with self.bb.function(ENTRY_FUNCTION):
            with self.bb.dataflow():
                for node in g.nodes:
                    self.lower_node(node)
                outs = [self.arg(v) for v in g.outputs]
                result = outs[0] if len(outs) == 1 else relax.Tuple(outs)
                gv = self.bb.emit_output(result)
            self.bb.emit_func_output(gv, params=inputs + self.params)
        with self.bb.function(PREPARE_FUNCTION, params=self.raw_params):
            with self.bb.dataflow():
                made = [build() for build in self._prepare]
                made = [m if isinstance(m, relax.Var) else self.bb.emit(m) for m in made]
                out = self.bb.emit_output(relax.Tuple(made))
            self.bb.emit_func_output(out)
        mod = self.bb.get()
        dispatch = self.dispatcher.to_dict()
        for layer in dispatch["layers"]:
            if layer["weight"] in self.dispatch_params:
                layer["threshold_param"] = self.dispatch_params[layer["weight"]]
        from .weights_intact import act_linears
        return Lowered(mod, self.specs, self.arrays, self.fallbacks, self.kernel_notes, dispatch, act_linears(self))

    def lower_node(self, node: Node) -> None:
        """Emit ``node`` by its rule. A rule returns the expression of the node's output (a tuple
        for a node of several outputs), or None for a node whose every reader reads its inputs
        instead (a kv_cache_read fused into attention): its output then has no value."""
        try:
            expr = LOWERINGS[node.op](self, node)
            if expr is None:
                return
            var = expr if isinstance(expr, self.relax.Var) else self.emit(expr, node.outputs[0].name)
            if len(node.outputs) > 1:
                items = [self.emit(self.relax.TupleGetItem(var, i), out.name) for i, out in enumerate(node.outputs)]
        except (BackendError, KernelError) as e:
            raise BackendError(f"tvm backend: node {node.name} ({node.op}): {e}") from e
        except Exception as e:      # TVM raises its own error types from C++
            raise BackendError(f"tvm backend: lowering node {node.name} ({node.op}) failed: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        for out, var in zip(node.outputs, items if len(node.outputs) > 1 else [var]):
            got = var.ty
            dtype = str(getattr(got, "dtype", out.dtype.name))
            if dtype != out.dtype.name:
                which = f" {out.name}" if len(node.outputs) > 1 else ""
                raise BackendError(f"tvm backend: node {node.name} ({node.op}) lowered{which} to {dtype}, the graph "
                                   f"says {out.dtype.name}")
            if getattr(got, "shape", None) is None:      # Relax could not infer it: state it
                var = self.bb.match_cast(var, self.ttype(out))
            self.values[out] = var


def lower_graph(graph: Graph, spec: Target, target, tuner: Tuner | None = None,
                dispatcher: Dispatcher | None = None) -> Lowered:
    """The Relax module of ``graph`` (``main(inputs..., params...)``) for the nnforge target
    ``spec`` (resolved to the tvm Target ``target``) and what goes with it."""
    return Lowering(graph, spec, target, tuner, dispatcher).run()


__all__ = ["Lowering", "Lowered", "ParamSpec", "lower_graph", "LOWERINGS", "PARAMS_FILE", "WEIGHTS_FILE", "ENTRY_FUNCTION", "PREPARE_FUNCTION"]

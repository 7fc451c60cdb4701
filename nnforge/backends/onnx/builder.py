"""Building an ONNX graph: node and constant helpers, run-time shape arithmetic for symbolic
dims, and initializers that point into the bundle's ``weights.safetensors`` (ONNX external data
with offsets), so the model file holds no second copy of the weights."""
from __future__ import annotations


import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...ir import Graph, symbolic as sym
from ...ir.dtypes import DType
from ..base import BackendError

ONNX_TYPES = {
    "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
    "float64": TensorProto.DOUBLE, "int64": TensorProto.INT64, "int32": TensorProto.INT32,
    "int16": TensorProto.INT16, "int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL,
}
NP_TYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
            "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}
INLINE_LIMIT = 256      # tensors up to this many bytes are stored inside model.onnx


def onnx_type(dt: DType) -> int:
    try:
        return ONNX_TYPES[dt.name]
    except KeyError:
        raise BackendError(f"dtype {dt} has no ONNX tensor type") from None


class OnnxBuilder:
    def __init__(self, graph: Graph, weights, weights_file: str, target=None):
        self.graph = graph
        self.target = target           # what the capability table's checks read; None outside a compile
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.index = weights           # where each weight lies in the bundle's weights file
        self.weights_file = weights_file
        self._names = {v.name for v in graph.values()}
        self._consts: dict[tuple, str] = {}
        self._dims: dict[tuple, str] = {}
        self._symbols = graph.symbols()
        self.domains: set[str] = set()
        self.weight_cache: dict[str, str] = {}    # weight name -> ONNX name of its dense form
        self.memo: dict = {}                      # what rules work out once per graph (attention.py)
        self.kv_cache: dict = {}                  # what the runner needs to know of caches written in place

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def node(self, op_type: str, inputs: list[str | None], out: str | list[str] | None = None, *,
             domain: str = "", n_out: int = 1, **attrs) -> str | list[str]:
        """Append a node; returns its output name(s). ``out`` fixes output names, else fresh ones."""
        if out is None:
            outs = [self.fresh(f"{op_type}_out") for _ in range(n_out)]
        else:
            outs = [out] if isinstance(out, str) else list(out)
        if domain:
            self.domains.add(domain)
        inputs = list(inputs)
        while inputs and inputs[-1] is None:
            # Trailing absent optionals are left out: ORT crashes on some given as "" (LayerNormalization).
            inputs.pop()
        self.nodes.append(helper.make_node(op_type, ["" if i is None else i for i in inputs], outs,
                                           name=self.fresh(f"{op_type}_{outs[0]}"), domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    # --- constants --------------------------------------------------------------------------------
    def const(self, array: np.ndarray, base: str = "const") -> str:
        """An initializer holding ``array``; small equal constants are shared."""
        array = np.asarray(array, order="C")      # keeps 0-d arrays 0-d (ascontiguousarray does not)
        key = None
        if array.nbytes <= INLINE_LIMIT:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key in self._consts:
                return self._consts[key]
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(array, name))
        if key is not None:
            self._consts[key] = name
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), "ints")

    def scalar(self, value, dt: DType) -> str:
        return self.const(np.asarray(value, dtype=NP_TYPES[dt.name]), "scalar")

    def raw(self, name: str, data_type: int, dims, payload: bytes) -> str:
        """An initializer from raw bytes (for packed types numpy cannot hold, e.g. uint4)."""
        t = TensorProto()
        t.name, t.data_type = name, data_type
        t.dims.extend(int(d) for d in dims)
        t.raw_data = payload
        self.initializers.append(t)
        return name

    def external(self, name: str, key: str, data_type: int, dims) -> str | None:
        """An initializer reading safetensors tensor ``key`` in place; None if the key is absent."""
        span = self.index.span(key)
        if span is None:
            return None
        offset, length = span
        t = TensorProto()
        t.name, t.data_type = name, data_type
        t.dims.extend(int(d) for d in dims)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.weights_file), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        self.initializers.append(t)
        return name

    # --- run-time shapes --------------------------------------------------------------------------
    def _symbol(self, name: str) -> str:
        if name not in self._symbols:
            raise BackendError(f"dimension symbol {name!r} is not defined by any graph input")
        key = ("sym", name)
        if key not in self._dims:
            v, axis = self._symbols[name]
            self._dims[key] = self.node("Shape", [v.name], start=axis, end=axis + 1)
        return self._dims[key]

    def dim_1d(self, d: sym.Dim) -> str:
        """A [1]-shaped int64 tensor holding dim ``d`` at run time."""
        binops = {"add": "Add", "sub": "Sub", "mul": "Mul", "floordiv": "Div", "mod": "Mod"}
        # Dims are non-negative, so ONNX's truncating Div equals floor division here.
        return sym.fold(
            d, const=lambda v: self.ints([v]), symbol=self._symbol,
            binop=lambda op, a, b: self.node(binops[op], [a, b]),
            call=lambda f, args: self.node("Max" if f == "max" else "Min", args),
            neg=lambda a: self.node("Neg", [a]))

    def dims_1d(self, dims) -> str:
        """A 1-D int64 tensor of ``dims`` (static parts as constants, symbolic parts computed)."""
        dims = tuple(dims)
        if all(isinstance(d, int) for d in dims):
            return self.ints(dims)
        if dims not in self._dims:
            parts, run = [], []
            for d in dims:
                if isinstance(d, int):
                    run.append(d)
                    continue
                if run:
                    parts.append(self.ints(run))
                    run = []
                parts.append(self.dim_1d(d))
            if run:
                parts.append(self.ints(run))
            self._dims[dims] = parts[0] if len(parts) == 1 else self.node("Concat", parts, axis=0)
        return self._dims[dims]

    def dim_scalar(self, d: sym.Dim) -> str:
        if isinstance(d, int):
            return self.const(np.asarray(d, dtype=np.int64), "dim")
        return self.node("Squeeze", [self.dim_1d(d), self.ints([0])])

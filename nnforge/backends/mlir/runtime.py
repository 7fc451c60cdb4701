"""Running a bundle's MLIR module on this CPU with torch-mlir's own tools, to check it.

TOSA and StableHLO modules are first lowered to linalg-on-tensors (MLIR's tosa-to-linalg passes,
StableHLO's stablehlo-legalize-to-linalg); then torch-mlir's reference-backend passes (``refback-*``)
and MLIR's bufferization and LLVM conversions turn it into LLVM IR, which MLIR's ExecutionEngine
compiles in this process. The result is a plain loop nest: correct, not fast (all-MiniLM-L6-v2
at [2, 16] runs in about 10 s). It is there so that every bundle's numerics check runs the module
that was written, not the torch program it came from.

Before anything is compiled, the module must consist only of tensor-level ops from the dialects
the exporter emits (``ALLOWED``), with the public functions the bundle entry names (``main``, or a
decoder's ``prefill`` and ``decode``: :mod:`.decoder`) and no declarations or calls: the JIT links
against this process, so a module that named an external symbol could run it.

    >>> runner = MlirRunner(Path("bundle/model.mlir"), entry)
    >>> runner(ids, mask)
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ..base import BackendError, InputSpec, Runner
from .export import context, parse

# Dialects (and single ops) a module may use: tensor computations and the asserts torch-mlir emits.
ALLOWED = {"builtin.module", "func.func", "func.return", "arith", "math", "linalg", "tensor", "cf.assert", "scf",
           "tm_tensor", "tosa", "stablehlo", "chlo", "shape"}
TO_LINALG = {
    "linalg-on-tensors": None,
    "tosa": "builtin.module(func.func(tosa-to-linalg-named),func.func(tosa-to-linalg),func.func(tosa-to-tensor),"
            "func.func(tosa-to-arith),canonicalize)",
    "stablehlo": "builtin.module(stablehlo-legalize-to-linalg,canonicalize)",
}
# linalg-on-tensors -> LLVM, as torch-mlir's reference backend does it (with today's MLIR pass names).
TO_LLVM = ",".join([
    "func.func(linalg-generalize-named-ops)", "func.func(linalg-fuse-elementwise-ops)", "convert-shape-to-std",
    "func.func(refback-generalize-tensor-pad)", "func.func(refback-generalize-tensor-concat)",
    "func.func(tm-tensor-bufferize)",
    "one-shot-bufferize{copy-before-write bufferize-function-boundaries "
    "function-boundary-type-conversion=identity-layout-map}",
    "refback-mlprogram-bufferize", "buffer-deallocation-pipeline", "inline", "refback-munge-calling-conventions",
    "func.func(tm-tensor-to-loops)", "func.func(refback-munge-memref-copy)", "func.func(convert-linalg-to-loops)",
    "func.func(lower-affine)", "convert-scf-to-cf", "func.func(refback-expand-ops-for-llvm)",
    "func.func(arith-expand)", "func.func(convert-math-to-llvm)", "convert-math-to-libm", "expand-strided-metadata",
    "finalize-memref-to-llvm", "lower-affine", "convert-bufferization-to-memref", "finalize-memref-to-llvm",
    "func.func(convert-arith-to-llvm)", "convert-vector-to-llvm", "convert-func-to-llvm", "convert-cf-to-llvm",
    "convert-complex-to-llvm", "reconcile-unrealized-casts"])
RETURN_PREFIX = "refbackend_consume_func_return_"     # the callback refback-munge-calling-conventions calls
_ELEMENT_NP = {"f32": np.float32, "f64": np.float64, "f16": np.float16, "i64": np.int64, "i32": np.int32,
               "i8": np.int8, "i1": np.bool_}


def check_ops(module, where: str, functions: tuple[str, ...] = ("main",)) -> None:
    """Refuse anything but tensor ops of ``ALLOWED`` dialects in the public ``functions``, each with
    a body."""
    from torch_mlir import ir
    bad: list[str] = []
    funcs: list[str] = []

    def visit(op):
        name = op.name
        if name not in ALLOWED and name.split(".")[0] not in ALLOWED:
            bad.append(name)
        elif name == "func.func":
            sym = ir.StringAttr(op.attributes["sym_name"]).value
            funcs.append(sym)
            if len(op.regions[0].blocks) == 0:
                bad.append(f"declaration of external function {sym}")
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    if bad:
        raise BackendError(f"{where}: the module uses {', '.join(sorted(set(bad))[:8])}, which nnforge does not "
                           f"compile (only tensor ops of the dialects it exports, in the functions "
                           f"{', '.join(functions)})")
    if funcs != list(functions):
        raise BackendError(f"{where}: expected the functions {', '.join(functions)}; "
                           f"found {', '.join(funcs) or 'none'}")


def signature(module, where: str, function: str = "main") -> tuple[list[tuple[type, tuple]], list[type]]:
    """(numpy dtype, shape) of each argument and the numpy dtype of each result of ``function``."""
    from torch_mlir import ir
    fn = next((op for op in module.body if ir.StringAttr(op.attributes["sym_name"]).value == function), None)
    if fn is None:
        raise BackendError(f"{where}: the module has no function {function}")
    ftype = ir.TypeAttr(fn.attributes["function_type"]).value

    def np_type(t, what):
        if not isinstance(t, ir.RankedTensorType) or str(t.element_type) not in _ELEMENT_NP:
            raise BackendError(f"{where}: {what} of {function} has type {t}, which the runner does not pass")
        if any(d < 0 for d in t.shape):
            raise BackendError(f"{where}: {what} of {function} has a dynamic size ({t}); the runner runs static "
                               "modules")
        return _ELEMENT_NP[str(t.element_type)], tuple(t.shape)

    args = [np_type(t, f"argument {i}") for i, t in enumerate(ftype.inputs)]
    results = [np_type(t, f"result {i}")[0] for i, t in enumerate(ftype.results)]
    return args, results


class MlirRunner(Runner):
    """A module compiled for this CPU by torch-mlir's reference JIT. The module is parsed, checked
    and its functions' signatures read here; :meth:`_compile` and :meth:`invoke` are the compiler's
    (the IREE runner, :mod:`.iree`, shares the rest)."""
    fixed_sizes = ("the mlir backend compiles the sizes of the bundle's check inputs (torch-mlir miscompiles dynamic "
                   "ones, see nnforge.backends.mlir.export): compile with check_inputs of the size you will run")

    def __init__(self, path: Path, entry: dict):
        try:
            import torch_mlir.dialects.torch  # noqa: F401  (registers torch-mlir's passes, refback-* among them)
        except ImportError:
            raise BackendError("running an mlir bundle needs torch-mlir: pip install 'nnforge[mlir]'") from None
        dialect = entry.get("dialect", "linalg-on-tensors")
        if dialect not in TO_LINALG:
            raise BackendError(f"{path}: dialect {dialect!r} in the bundle entry is not one of {', '.join(TO_LINALG)}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise BackendError(f"{path}: cannot read the module: {e}") from None
        self.context = context()
        module = parse(text, self.context)
        functions = tuple(entry.get("functions") or ["main"])
        check_ops(module, str(path), functions)
        self._signatures = {f: signature(module, str(path), f) for f in functions}
        args, results = self._signatures[functions[0]]
        names = list(entry.get("inputs") or [f"input{i}" for i in range(len(args))])
        self.output_names = list(entry.get("outputs") or [f"output{i}" for i in range(len(results))])
        for f, (a, r) in self._signatures.items():
            if (len(a), len(r)) != (len(names), len(self.output_names)):
                raise BackendError(f"{path}: {f} takes {len(a)} arguments and returns {len(r)} results; the bundle "
                                   f"entry names {len(names)} inputs and {len(self.output_names)} outputs")
        self.inputs = [InputSpec(n, dt, shape) for n, (dt, shape) in zip(names, args)]
        self._calls = None
        if "prefill_chunk" in entry:           # a decoder: any batch and token count, through its two functions
            from .decoder import DecoderCalls
            dims = entry["input_dims"]
            self.inputs = [InputSpec(n, dt, tuple(dims[n])) for n, (dt, _) in zip(names, args)]
            self._calls = DecoderCalls(entry, names, self.output_names, batch=args[0][1][0])
            self.fixed_sizes = ("the mlir backend compiles a decoder's KV cache at the bundle's max_len: compile "
                                "with max_len of the cache you will run")
        self._compile(module, text, path, dialect)

    def _compile(self, module, text: str, path: Path, dialect: str) -> None:
        from torch_mlir import ir, passmanager
        from torch_mlir.execution_engine import ExecutionEngine
        with self.context:
            try:
                if TO_LINALG[dialect]:
                    passmanager.PassManager.parse(TO_LINALG[dialect]).run(module.operation)
                passmanager.PassManager.parse(f"builtin.module({TO_LLVM})").run(module.operation)
                self.engine = ExecutionEngine(module, opt_level=2)
            except Exception as e:
                raise BackendError(f"{path}: torch-mlir's JIT cannot compile this {dialect} module: "
                                   f"{' '.join(str(e).split())[:400]}") from None
        self._outputs: list | None = None
        self._callbacks = []
        from torch_mlir.runtime import UnrankedMemRefDescriptor
        for fn in module.body:
            name = ir.StringAttr(fn.attributes["sym_name"]).value
            if name.startswith(RETURN_PREFIX):
                kinds = name[len(RETURN_PREFIX):].split("_")
                proto = ctypes.CFUNCTYPE(None, *[ctypes.POINTER(UnrankedMemRefDescriptor)] * len(kinds))
                callback = proto(self._consume)
                self._callbacks.append(callback)           # must outlive the engine
                self.engine.register_runtime(name, callback)

    def _consume(self, *memrefs):
        from torch_mlir.runtime import unranked_memref_to_numpy
        # copied now: the module frees its result buffers once the callback returns
        self._outputs = [np.array(unranked_memref_to_numpy(m, dt), copy=True)
                         for m, dt in zip(memrefs, self._result_types)]

    def run_numpy(self, inputs: list) -> list:
        if self._calls is not None:
            return self._calls.run(self.invoke, inputs)
        return self.invoke("main", inputs)

    def invoke(self, function: str, inputs: list) -> list:
        """Call ``function`` of the module on arrays of its argument types and shapes."""
        from torch_mlir.runtime import get_unranked_memref_descriptor
        arrays = [np.asarray(x, order="C") for x in inputs]      # (ascontiguousarray makes 0-d arrays 1-d)
        descriptors = [get_unranked_memref_descriptor(a) for a in arrays]
        args = [ctypes.pointer(ctypes.pointer(d)) for d in descriptors]
        self._outputs, self._result_types = None, self._signatures[function][1]
        self.engine.invoke(function, *args)
        outs, self._outputs = self._outputs, None
        if outs is None:
            raise BackendError("the module returned without producing its outputs")
        return outs


__all__ = ["MlirRunner", "ALLOWED", "check_ops", "signature"]

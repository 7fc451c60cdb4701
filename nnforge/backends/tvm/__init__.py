"""The tvm backend: IR -> Relax (node by node, :mod:`.lower`), compiled by TVM with LLVM into one
native library per bundle, run by the Relax virtual machine on the CPU.

Files it adds to a bundle:

- ``model.so``: the Relax VM executable and every kernel, linked by g++ (``export_library``).
  Its ``main`` takes the graph inputs, then every weight array (never embedded constants).
- ``tvm_params.safetensors``: arrays the backend made (kernel layouts of encoded weights, weights
  decoded for lack of a kernel, act-order permutations); graph weights that are used as stored
  are read from the bundle's ``weights.safetensors`` instead. The manifest entry lists every
  parameter in order with its file and key.

Loading uses only TVM's runtime library (through ``tvm_ffi``), not its compiler: the library's
sha256, recorded at lower time, is checked on a private copy of its bytes, and that copy is what
gets dlopen-ed. Targets come from ``targets/*.toml`` as LLVM strings (``"llvm -mcpu=native"``);
TVM 0.27 takes JSON-like dicts, see :func:`resolve_target` (``native`` means this host's CPU name
*and* its feature list, so a VM that hides AVX-512 from a Zen 4 gets AVX2 code).

    >>> backend = TvmBackend()
    >>> artifact = backend.lower(graph, get_target("cpu"), ctx)     # writes model.so, ...
    >>> runner = backend.load(bundle_dir, artifact.entry)
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ...ir import Graph
from ...targets import Target, host_cpu_flags
from ..base import Artifact, Backend, BackendError, InputSpec, LowerContext, ResidentState, Runner, RuntimeSpec
from . import threads
from .capabilities import CAPABILITIES
from .dispatch import NEVER, Dispatcher, check_in_model
from .layer_timing import measure_in_model
from .llvm_targets import parse_llvm_target, resolve_target
from .lower import ENTRY_FUNCTION
from .specialise import Specialised, add_specialised
from .llvm_targets import host_cpu  # noqa: F401  (re-exported: it was defined here)
from .tuning import TUNING_FILE, Tuner

# before any kernel of this backend (tuning, dispatch timing, a runner) starts TVM's thread pool
threads.configure()

LIBRARY_FILE = "model.so"
GRAPH_FILE = "graph.json"               # written by the pipeline
PARAMS_FILE = "tvm_params.safetensors"


# --- the CPU a library needs --------------------------------------------------------------------
# LLVM feature names of the instruction sets generated code may use -> their /proc/cpuinfo flags.
# A library is refused on a CPU missing any of them (it would die of SIGILL mid-run instead).
LINUX_FLAGS = {
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "bmi": "bmi1", "bmi2": "bmi2", "popcnt": "popcnt", "lzcnt": "abm", "movbe": "movbe",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avxvnni": "avx_vnni", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
    "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
}


def target_cpu_features(target) -> list[str]:
    """The instruction sets (LLVM names, those in LINUX_FLAGS) code for ``target`` may use."""
    from tvm.target import codegen
    return sorted(f for f in codegen.llvm_get_cpu_features(target) if f in LINUX_FLAGS)


def check_cpu(path: Path, entry: dict) -> None:
    flags = host_cpu_flags()
    if flags is None:
        return
    missing = [f for f in entry.get("cpu_features", []) if LINUX_FLAGS.get(f, f) not in flags]
    if missing:
        raise BackendError(f"{path} was compiled for {entry.get('llvm_target')!r} and uses {', '.join(missing)}, "
                           "which this CPU lacks; compile the model for target 'cpu' on this machine")


# --- the runtime, without TVM's compiler ----------------------------------------------------------
def _load_tvm_runtime():
    """tvm_ffi with libtvm_runtime loaded (RTLD_GLOBAL, as ``import tvm`` does), so a bundle runs
    without importing TVM's much larger compiler library."""
    import tvm_ffi
    spec = importlib.util.find_spec("tvm")
    if spec is None or spec.origin is None:
        raise BackendError("the tvm backend needs the apache-tvm package: pip install 'nnforge[tvm]'")
    lib = Path(spec.origin).parent / "lib" / "libtvm_runtime.so"
    if not lib.is_file():
        raise BackendError(f"apache-tvm is installed without its runtime library ({lib} is missing)")
    ctypes.CDLL(os.fspath(lib), mode=ctypes.RTLD_GLOBAL)
    return tvm_ffi


def _aligned(a: np.ndarray, align: int = 64) -> np.ndarray:
    """A C-contiguous copy of ``a`` whose data starts on an ``align``-byte boundary."""
    raw = np.empty(a.nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


_KDL_CPU, _POOLED_ALLOCATOR = 1, 2


class TvmRunner(Runner):
    """Runs ``main`` of a bundle's ``model.so`` on the Relax VM; weights are read from the bundle's
    safetensors once, at load, and passed on every call."""

    def __init__(self, bundle_dir: Path, entry: dict):
        from ...bundle import safe_join
        try:
            self.inputs = [InputSpec(i["name"], np.dtype(i["dtype"]), tuple(i["dims"])) for i in entry["inputs"]]
            self.output_names = list(entry["outputs"])
            library, digest, params = entry["library"], entry["sha256"], entry["params"]
        except (KeyError, TypeError) as e:
            raise BackendError(f"{bundle_dir}: tvm backend entry is missing or malformed ({e})") from None
        path = safe_join(Path(bundle_dir), library)
        check_cpu(path, entry)
        self._threads = threads.Usage()         # the pool it runs on, sized per call (threads.py)
        tvm_ffi = _load_tvm_runtime()
        self._module = _load_verified(tvm_ffi, path, digest)
        self._vm = self._module["vm_load_executable"]()
        self._vm["vm_initialization"](_KDL_CPU, 0, _POOLED_ALLOCATOR)
        self._function_name = entry.get("function", ENTRY_FUNCTION)
        self._functions = {self._function_name: self._vm[self._function_name]}
        # copies of main with the symbols of a decode step fixed (specialise.py), chosen per call
        self._specialised = Specialised(entry.get("specialised", []), [list(i.dims) for i in self.inputs])
        self.last_function = None       # the function the last call ran
        self._from_dlpack = tvm_ffi.from_dlpack
        stored = [self._from_dlpack(a) for a in _read_params(Path(bundle_dir), params)]
        # prepare() makes main's parameters from the stored arrays once (packed weight panels)
        try:
            made = self._vm[entry.get("prepare", "prepare")](*stored)
        except Exception as e:
            raise BackendError(f"{path}: preparing the parameters failed: {str(e).splitlines()[0]}") from None
        self._params = list(made)
        self._dispatch = [layer for layer in (entry.get("dispatch") or {}).get("layers", [])
                          if "threshold_param" in layer]
        self.dispatch_mode = "auto"

    @property
    def threads(self) -> dict:
        """The thread pool settings it runs with, and how many calls ran on each pool size."""
        return self._threads.to_dict()

    def set_instrument(self, fn) -> None:
        """Call ``fn(func, symbol, before, result, *args)`` around every VM call (None: stop);
        how dispatch.measure_in_model times each layer inside the model."""
        import tvm_ffi
        self._vm["set_instrument"](None if fn is None else tvm_ffi.convert(fn))

    def dispatch(self, mode: str = "auto") -> "TvmRunner":
        """Which kernel the dispatched layers run (see dispatch.py): ``"auto"``, the measured
        choice per row count; ``"compressed"`` or ``"dense"``, that kernel at every size (to time
        or check either one on the same library)."""
        if mode not in ("auto", "compressed", "dense"):
            raise BackendError(f"dispatch mode must be 'auto', 'compressed' or 'dense', got {mode!r}")
        if mode == self.dispatch_mode:
            return self
        for layer in self._dispatch:
            if mode == "auto":
                t = layer["threshold"]
            else:       # rows < threshold run ``low``
                t = NEVER if (mode == layer["low"]) else 0
            self._params[layer["threshold_param"]] = self._from_dlpack(_aligned(np.array([t], np.int64)))
        self.dispatch_mode = mode
        return self

    def specialised(self, enabled: bool = True) -> "TvmRunner":
        """Whether calls at the shapes of a specialised copy of ``main`` run that copy (the
        default) or ``main`` itself (to time or check the general function on the same library)."""
        self._specialised.enabled = bool(enabled) and bool(self._specialised.checks)
        return self

    def run_numpy(self, inputs: list) -> list:
        outs = self._call([self._from_dlpack(_aligned(x)) for x in inputs], [list(x.shape) for x in inputs])
        return [np.array(np.from_dlpack(o)) for o in outs]

    def _call(self, args: list, shapes: list) -> list:
        """``main`` on TVM tensors; its outputs as TVM tensors."""
        self._threads.fit()
        name = self._specialised.function_for(shapes) if self._specialised.enabled else self._function_name
        self.last_function = name
        if name not in self._functions:
            self._functions[name] = self._vm[name]
        try:
            out = self._functions[name](*args, *self._params)
        except Exception as e:        # the VM raises tvm_ffi errors
            raise BackendError(f"TVM VM failed on inputs "
                               f"{', '.join(f'{n} {s}' for n, s in zip(self.input_names, shapes))}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return list(out) if len(self.output_names) > 1 else [out]

    def resident(self, state_pairs, tokens, logits):
        return _Resident(self, state_pairs, tokens, logits)


class _Resident(ResidentState):
    """A decoder's cache held as TVM tensors between steps. The library updates caches in place
    (kernels/decoder.py; an encoded cache's state tensors in their stored dtypes,
    kernels/kvcache.py), so a step passes each layer's cache buffer in and gets the same buffer
    back; nothing of the cache is copied."""

    def __init__(self, runner: TvmRunner, state_pairs, tokens, logits):
        names = runner.input_names
        missing = [n for n in [*tokens, *(i for i, _ in state_pairs)] if n not in names] + \
            [n for n in [logits, *(o for _, o in state_pairs)] if n not in runner.output_names]
        if missing:
            raise BackendError(f"the library has no input or output {missing} of the decoder's state")
        self.runner, self.pairs, self.tokens = runner, list(state_pairs), tokens
        self.logits = runner.output_names.index(logits)
        self.outputs = {i: runner.output_names.index(o) for i, o in self.pairs}
        self.state: dict[str, object] = {}
        self._arrays: dict[str, np.ndarray] = {}     # the memory behind the first tensors

    def reset(self, shapes):
        dtypes = {spec.name: spec.dtype for spec in self.runner.inputs}     # an encoded cache's own dtypes
        self._arrays = {i: _aligned(np.zeros(shapes[i], dtypes[i])) for i, _ in self.pairs}
        self.state = {i: self.runner._from_dlpack(a) for i, a in self._arrays.items()}

    def run(self, token_ids, positions):
        given = {self.tokens[0]: np.asarray(token_ids, np.int64), self.tokens[1]: np.asarray(positions, np.int64)}
        args, shapes = [], []
        for name in self.runner.input_names:
            if name in given:
                args.append(self.runner._from_dlpack(_aligned(given[name])))
                shapes.append(list(given[name].shape))
            else:
                args.append(self.state[name])
                shapes.append(list(self.state[name].shape))
        outs = self.runner._call(args, shapes)
        self.state = {i: outs[k] for i, k in self.outputs.items()}
        return np.array(np.from_dlpack(outs[self.logits]))

    def read(self, name):
        return np.array(np.from_dlpack(self.state[name]))

    def write(self, values):
        dtypes = {spec.name: spec.dtype for spec in self.runner.inputs}
        self._arrays = {i: _aligned(np.ascontiguousarray(values[i], dtypes[i])) for i, _ in self.pairs}
        self.state = {i: self.runner._from_dlpack(a) for i, a in self._arrays.items()}


def _load_verified(tvm_ffi, path: Path, digest: str):
    """dlopen a private copy of ``path`` whose bytes hash to ``digest`` (so the file that is
    checked is the file that runs, even if the bundle changes in between)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BackendError(f"{path}: cannot read the TVM library: {e}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise BackendError(f"{path}: sha256 {got} differs from the {digest} recorded when it was built; "
                           "refusing to load a changed native library")
    with tempfile.TemporaryDirectory(prefix="nnforge-tvm-") as tmp:
        copy = Path(tmp) / "model.so"
        copy.write_bytes(data)
        try:
            return tvm_ffi.load_module(os.fspath(copy))
        except Exception as e:
            raise BackendError(f"{path}: TVM cannot load the library: {str(e).splitlines()[0]}") from None


def _read_params(bundle_dir: Path, specs: list) -> list[np.ndarray]:
    """The stored arrays in ``prepare``'s order (only the tensors named, each checked against its
    recorded dtype and shape), copied to 64-byte aligned memory."""
    from safetensors import SafetensorError, safe_open
    from ...bundle import safe_join
    files: dict[str, object] = {}
    out = []
    decoded = _decoded_weights(bundle_dir, [s["key"] for s in specs if s.get("decode")])
    try:
        for spec in specs:
            if spec.get("decode"):
                a = decoded[spec["key"]]
                if a.dtype != np.dtype(spec["dtype"]) or list(a.shape) != list(spec["shape"]):
                    raise BackendError(f"{bundle_dir}: weight {spec['key']!r} decodes to {a.dtype} {list(a.shape)}, "
                                       f"parameter {spec['name']} needs {spec['dtype']} {spec['shape']}")
                out.append(_aligned(a))
                continue
            rel = spec["file"]
            if rel not in files:
                files[rel] = safe_open(os.fspath(safe_join(bundle_dir, rel)), framework="numpy")
            f = files[rel]
            if spec["key"] not in f.keys():
                raise BackendError(f"{bundle_dir / rel}: parameter {spec['name']} needs tensor {spec['key']!r}, "
                                   "which is missing")
            a = f.get_tensor(spec["key"])
            if a.dtype != np.dtype(spec["dtype"]) or list(a.shape) != list(spec["shape"]):
                raise BackendError(f"{bundle_dir / rel}: tensor {spec['key']!r} is {a.dtype} {list(a.shape)}, "
                                   f"parameter {spec['name']} needs {spec['dtype']} {spec['shape']}")
            out.append(_aligned(a))
    except (OSError, SafetensorError, ValueError) as e:
        raise BackendError(f"{bundle_dir}: cannot read the parameters: {e}") from None
    return out


def _decoded_weights(bundle_dir: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The dense float32 form of the graph weights ``names``, decoded from the bundle's own
    encodings (graph.json + weights.safetensors): the dense copies dispatched layers run on."""
    if not names:
        return {}
    import torch
    from ...bundle import GRAPH_FILE, WEIGHTS_FILE, safe_join
    from ...ir import GraphError, load_graph
    try:
        graph = load_graph(safe_join(bundle_dir, GRAPH_FILE), safe_join(bundle_dir, WEIGHTS_FILE))
    except GraphError as e:
        raise BackendError(f"{bundle_dir}: cannot read the graph whose weights dispatched layers decode: {e}") from None
    out = {}
    for name in names:
        if name not in graph.weights:
            raise BackendError(f"{bundle_dir}: a dispatched layer needs weight {name!r}, which the graph lacks")
        out[name] = graph.weights[name].encoding.decode(torch.float32).contiguous().numpy()
    return out


# --- building ---------------------------------------------------------------------------------------
def cpu_pipeline(target):
    """Relax's default CPU pipeline (dispatch, legalise, fuse, lower, finalise) with a default
    schedule for the loops legalisation makes: dlight's CPU GEMV and Reduction rules (softmax,
    layer norm), then :class:`~.schedule.Parallel` for the rest, and float32 ``exp`` as a
    vectorisable polynomial (:func:`~.schedule.fast_exp`). Kernels of :mod:`.kernels` come
    scheduled (``tirx.is_scheduled``) and are left alone."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight
    from .kernels.dense import vector_lanes
    from .schedule import Guarded, Parallel, fast_exp
    lanes = vector_lanes(target)

    @tvm.transform.module_pass(opt_level=0, name="NnforgeCpuPipeline")
    def pipeline(mod, _ctx):
        rules = [Guarded(dlight.cpu.GEMV()), Guarded(dlight.cpu.Reduction()), Guarded(Parallel(lanes))]
        with target:
            return tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
                + [dlight.ApplyDefaultSchedule(*rules), fast_exp()]
                + cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)
                + [_all_noalias()])(mod)
    return pipeline


def _all_noalias():
    """Mark every PrimFunc that does not say otherwise ``tirx.noalias`` (in practice the VM's
    ``shape_func``, whose one pointer is the shape heap). TVM 0.27's LLVM codegen applies the
    noalias setting of the module's last function by name to all of them: with ``shape_func``
    last (a graph with biases has no ``zeros`` function to sort after it) every kernel lost its
    noalias arguments and the dense GEMM ran several times slower."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="NnforgeAllNoAlias")
    def mark(mod, _ctx):
        for gv, f in list(mod.functions_items()):
            if isinstance(f, tirx.PrimFunc) and "tirx.noalias" not in (f.attrs or {}):
                mod[gv] = f.with_attr("tirx.noalias", True)
        return mod
    return mark


def build(graph: Graph, target: Target, ctx: LowerContext, toolchain: dict) -> Artifact:
    """Lower ``graph``, compile it for ``target.options["llvm_target"]``, write the library and
    the backend's parameter arrays into the bundle (``ctx.files``). With per-shape dispatch
    (dispatch.py), a first library with every candidate layer joined to the dense kernel is built
    and timed in the model on ``ctx.reference`` at ``ctx.speed_shapes``, and the final one is
    built from its decisions."""
    out_dir = ctx.files.root        # the library is built, loaded and timed there before it is final
    from .lower import lower_graph
    llvm_target = target.options.get("llvm_target")
    if not isinstance(llvm_target, str):
        raise BackendError(f"target {target.name} ({target.path}) has no options.llvm_target string for the "
                           "tvm backend")
    tvm_target = resolve_target(llvm_target)
    where = f"target {target.name}"
    tuner = Tuner(target.options, tvm_target, target.can_run(), where)
    dispatcher = Dispatcher(target.options, target.can_run(), graph, where, shapes=ctx.speed_shapes)
    inputs = tuple(ctx.reference) if dispatcher.enabled and ctx.reference is not None else None
    if dispatcher.enabled and inputs is None:
        dispatcher.why_not = "not measured: no reference inputs to time the model on"
    speed = _speed_shapes(ctx.speed_shapes)
    low = lower_graph(graph, target, tvm_target, tuner, dispatcher)
    if dispatcher.measuring and dispatcher.candidates:
        first = _write(graph, target, low, tvm_target, tuner, out_dir)
        runner = TvmRunner(out_dir, first)
        times = measure_in_model(runner, dispatcher.symbols, graph, inputs, speed)
        del runner
        dispatcher = Dispatcher(target.options, target.can_run(), graph, where, times=times, shapes=ctx.speed_shapes)
        low = lower_graph(graph, target, tvm_target, tuner, dispatcher)
        (out_dir / PARAMS_FILE).unlink(missing_ok=True)
    entry = _write(graph, target, low, tvm_target, tuner, out_dir, steps=ctx.steps)
    if dispatcher.times is not None and any(d.dispatched for d in dispatcher.decisions.values()):
        _check_dispatch(graph, low, entry, dispatcher, inputs, out_dir, speed)
    files = [LIBRARY_FILE, tuner.write(out_dir)]
    if any(spec.decode for spec in low.params):
        files.append(GRAPH_FILE)        # dispatched layers decode their dense copy from it at load
    if low.arrays:
        files.append(PARAMS_FILE)
    import tvm_ffi
    return Artifact(files=files, entry=entry, fallbacks=low.fallbacks,
                   toolchain={**toolchain, "llvm": str(tvm_ffi.get_global_func("target.llvm_version_major")()),
                              "llvm_target": llvm_target, "llvm_cpu": str(tvm_target.attrs.get("mcpu", ""))})


def _speed_shapes(shapes: list[dict]) -> list[tuple[str, int]]:
    return [(s.get("label", ""), int(s["batch"])) for s in shapes if "batch" in s]


def _check_dispatch(graph: Graph, low, entry: dict, dispatcher: Dispatcher, inputs, out_dir: Path,
                    speed: list[tuple[str, int]]) -> None:
    """Time the final library whole (dispatch.check_in_model) and write back the thresholds it moved."""
    from safetensors.numpy import save_file
    from .lower import SEP
    runner = TvmRunner(out_dir, entry)
    changed = check_in_model(runner, dispatcher, graph, inputs, speed)
    del runner
    params = {layer["weight"]: layer["threshold_param"] for layer in entry["dispatch"]["layers"]
              if "threshold_param" in layer}
    for d in changed:
        low.arrays[f"{d.weight}{SEP}rows_threshold"] = np.array([d.threshold], np.int64)
    if changed:
        save_file(low.arrays, os.fspath(out_dir / PARAMS_FILE), metadata={"producer": "nnforge tvm backend"})
    entry["dispatch"] = dispatcher.to_dict()
    for layer in entry["dispatch"]["layers"]:
        if layer["weight"] in params:
            layer["threshold_param"] = params[layer["weight"]]


def _write(graph: Graph, target: Target, low, tvm_target, tuner: Tuner, out_dir: Path,
           steps: list | None = None) -> dict:
    """Compile ``low`` into ``out_dir`` (library and backend arrays), with a copy of ``main`` for
    each binding of ``steps`` (specialise.py); the manifest entry."""
    import tvm
    from safetensors.numpy import save_file
    from .lower import PREPARE_FUNCTION
    llvm_target = target.options["llvm_target"]
    specialised = add_specialised(low.mod, steps or [])
    try:
        executable = tvm.compile(low.mod, target=tvm_target, relax_pipeline=cpu_pipeline(tvm_target))
        executable.export_library(os.fspath(out_dir / LIBRARY_FILE))
    except Exception as e:       # TVM raises its own error types from C++
        raise BackendError(f"tvm backend: compiling graph {graph.name} for {target.name} ({llvm_target}) failed: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if low.arrays:
        save_file(low.arrays, os.fspath(out_dir / PARAMS_FILE), metadata={"producer": "nnforge tvm backend"})
    return {
        "library": LIBRARY_FILE, "sha256": hashlib.sha256((out_dir / LIBRARY_FILE).read_bytes()).hexdigest(),
        "function": ENTRY_FUNCTION, "prepare": PREPARE_FUNCTION, "specialised": specialised,
        "llvm_target": llvm_target,
        "tvm_target": json.loads(str(tvm_target)),
        "inputs": [{"name": v.name, "dtype": v.dtype.name, "dims": list(v.shape)} for v in graph.inputs],
        "outputs": [v.name for v in graph.outputs],
        "cpu_features": target_cpu_features(tvm_target),
        "params": [p.to_dict() for p in low.params],
        "kernels": low.kernels,
        "dispatch": low.dispatch,
        "act_linears": low.act_linears,
        "threads": threads.configure(),     # the thread pool the timings of this build ran on
        "tuning": {"file": TUNING_FILE, "tune": tuner.enabled,
                   "choices": {src: sum(r.source == src for r in tuner.records.values())
                               for src in ("measured", "records", "default")}},
    }


class TvmBackend(Backend):
    name = "tvm"
    runtime = RuntimeSpec("tvm", "apache-tvm", 2)      # a native library built against its runtime's ABI
    capabilities = CAPABILITIES

    @property
    def lowers(self):
        from .ops import LOWERINGS             # (imported when asked: the rules import tvm lazily)
        return LOWERINGS

    def prepare(self, target: Target, shapes: dict) -> list:
        """The decompositions, and the decoder ops of dtypes other than float32 written out too:
        their kernels (kernels/decoder.py) take float32."""
        return self.decompositions() + [{"pass": "decompose", "ops": ["attention", "cache_update", "rms_norm", "rope"],
                                         "keep_dtypes": ["float32"]}]

    def lower(self, graph: Graph, target: Target, ctx: LowerContext) -> Artifact:
        return build(graph, target, ctx, self.toolchain())

    def load(self, bundle_dir: Path, entry: dict, device: str | None = None) -> Runner:
        if device not in (None, "cpu"):
            raise BackendError(f"the tvm backend runs on the CPU; device {device!r} is not supported")
        return TvmRunner(Path(bundle_dir), entry)

    def times_here(self, target: Target) -> tuple[bool, str]:
        runs, why = target.can_run()
        return runs, ("its library runs natively on this CPU" if runs else why)

    def toolchain(self) -> dict[str, str]:
        spec = importlib.util.find_spec("tvm")
        if spec is None:
            return {}
        from importlib.metadata import PackageNotFoundError, version
        try:
            return {"tvm": version("apache-tvm")}
        except PackageNotFoundError:
            return {}


__all__ = ["TvmBackend", "TvmRunner", "parse_llvm_target", "resolve_target", "LIBRARY_FILE", "PARAMS_FILE"]

"""The backend contract: what every backend provides, and the one place backends register.

A backend is a folder under ``backends/`` and one line in :data:`BUILTIN` (or a
:func:`register_backend` call for one that lives elsewhere). It provides:

- ``capabilities``: the (op, encoding) pairs it runs natively, as data (:class:`Capabilities`);
  its lowering and ``nnforge targets --explain TARGET`` read the same table. Anything else is an
  explicit, reported :class:`Fallback` in the manifest, or an error naming the node; never silent.
- ``lowers``: the IR ops its lowering table writes (None: it takes every op as it comes). The
  decoder ops it lacks (``nnforge.passes.decompose``) are written out in primitive ops by its
  prepare passes, so a backend may start without attention kernels and gain them one by one.
- ``prepare(target, shapes)``: passes it needs run on the graph before lowering (those
  decompositions, a fixed-size design's shape specialisation), as pass configs like a recipe's.
- ``lower(graph, target, ctx) -> Artifact``: writes its files through ``ctx.files`` and returns
  how to run them. :class:`LowerContext` carries everything else it may use: the recipe's name,
  the input shapes to build for, the sizes it will be timed at, the first held-out batch and
  the sizes the prepare passes fixed. Nothing travels in ``graph.meta``.
- ``load(path, entry, device) -> Runner``: opens what ``lower`` wrote. A runner that can show its
  intermediate values offers :meth:`Runner.values` (the divergence locator reads it).
- ``runtime``: the package whose version a bundle's artifacts depend on, and how many leading
  version numbers a machine must share with the build (checked when a bundle is loaded).
- ``times_here(target)``: whether its run time on this machine means anything (speed records).

Everything about a chip (tile sizes, native formats, bandwidth) comes from the target's TOML.

    >>> backend = get_backend("onnx")
    >>> artifact = backend.lower(graph, get_target("onnx"), ctx)
    >>> runner = backend.load(bundle_dir, artifact.entry)
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Collection
from typing import Any, Callable

from ..errors import NnforgeError
from ..registry import Registry
from ..ir import Graph
from ..targets import Target


class BackendError(NnforgeError, RuntimeError):
    """Lowering or loading failed; the message names the node, weight or file."""


@dataclass
class Fallback:
    """A weight or node the backend could not keep in its compressed form."""
    where: str          # node or weight name
    what: str           # e.g. "int3 per-group weight"
    action: str         # e.g. "codes widened to uint8 for DequantizeLinear"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Artifact:
    """What ``Backend.lower`` returns: the files it wrote (bundle-relative paths), how to run them
    (``entry``, kept in the manifest and handed back to ``load``), every fallback taken, and the
    versions of the tools that built them."""
    files: list[str]
    entry: dict[str, Any]
    fallbacks: list[Fallback] = field(default_factory=list)
    toolchain: dict[str, str] = field(default_factory=dict)


@dataclass
class LowerContext:
    """Everything a backend's ``lower`` may use besides the graph and the target.

    recipe: the recipe's name (a label for artifacts that carry one, such as Core ML metadata).
    files: where the backend writes (:class:`nnforge.bundle.format.ArtifactWriter`): paths inside
        the bundle being built, and where each weight lies in its ``weights.safetensors``.
    shapes: each input's shape in the first held-out batch: the size a fixed-size design builds
        for when nothing else fixes it.
    speed_shapes: the sizes the bundle will be timed at where it runs here (``nnforge.speed``):
        ``[{"label", "batch", "inputs": {name: shape}}]``; empty when no timing is asked for.
    reference: the first held-out batch (a list of tensors in input order), for a backend that
        measures its kernels in the model; None when there is none.
    expected: the bundle graph's outputs on ``reference`` as the reference interpreter computes
        them (before the prepare passes), for a backend that checks what it wrote against them
        where its runtime cannot run (coreml's decoder program check); None with no reference.
    symbols: the dimension sizes the ``prepare`` passes fixed (a pass records them as its
        ``symbols`` figure); empty when none ran.
    steps: bindings of dimension symbols the bundle will run at far more often than any other
        (a decoder's one-token step at batch 1: ``{"batch": 1, "seq": 1}``), for a backend that can
        add a function specialised to them beside the general one; empty for other graphs.
    """
    recipe: str
    files: Any
    shapes: dict[str, list[int]] = field(default_factory=dict)
    speed_shapes: list[dict] = field(default_factory=list)
    reference: list | None = None
    expected: list | None = None
    symbols: dict[str, int] = field(default_factory=dict)
    steps: list[dict[str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Capability:
    """One (op, encoding) pair a backend runs natively. ``encoding`` is an encoding kind
    (``Encoding.kind``: dense, int, minifloat, sparse, palette, lowrank); ``how`` says how it runs;
    ``accepts``, when given, takes the weight's encoding and the target and returns why this backend
    cannot run that particular one there (a format, a group size, a pattern, a chip without the
    format), or None when it can. A weight that no row takes is decoded (or widened) by the
    backend's lowering and reported as a fallback, or is an error naming the node."""
    op: str
    encoding: str
    how: str
    accepts: Callable[[Any, Any], str | None] | None = None


class Capabilities:
    """A backend's capability table: what lowering consults for each weight-carrying node and what
    ``nnforge targets --explain`` prints.

        >>> cap, why = backend.capabilities.find("linear", weight.encoding, target)
    """

    def __init__(self, rows: list[Capability]):
        self.rows = list(rows)

    def find(self, op: str, encoding, target=None) -> tuple[Capability | None, str]:
        """(the row that runs ``op`` with ``encoding`` natively on ``target``, "") or (None, why
        not). ``encoding`` is an Encoding or just its kind (then every row of that kind matches)."""
        kind = getattr(encoding, "kind", encoding)
        rows = [r for r in self.rows if r.op == op and r.encoding == kind]
        if not rows:
            return None, f"no native {op} for {kind} weights"
        whys = []
        for r in rows:
            why = r.accepts(encoding, target) if r.accepts is not None and not isinstance(encoding, str) else None
            if why is None:
                return r, ""
            whys.append(why)
        return None, "; ".join(whys)

    def __iter__(self):
        return iter(self.rows)

    def describe(self) -> list[str]:
        """One line per row: ``op  encoding  how``."""
        width = max([4] + [len(r.op) for r in self.rows])
        return [f"{r.op:<{width}}  {r.encoding:<10}  {r.how}" for r in self.rows]


# Why an axis is fixed, and how to free it: said wherever a bundle refuses an input's size.
STATIC_AXIS_HINT = ("this bundle fixed that axis (compiled with dynamic_shapes='static', or torch.export found the "
                    "model needs that size: the manifest's model.shapes says which); compile without "
                    "dynamic_shapes='static', or name the axis with torch.export.Dim in dynamic_shapes, for a "
                    "bundle that takes other sizes")


@dataclass(frozen=True)
class InputSpec:
    """What a runner accepts for one input: a numpy dtype and dims (int, or a symbol name shared
    by inputs that must agree, or None for any size)."""
    name: str
    dtype: Any
    dims: tuple


class Runner(ABC):
    """A loaded bundle: call it with numpy arrays or torch tensors (positionally or as a dict)."""
    inputs: list[InputSpec]
    output_names: list[str]
    # Conditions on the input sizes the model was traced under ("seq <= 64"), checked on every
    # call: the manifest's signature.guards, set by Bundle.load.
    guards: tuple[str, ...] = ()
    # Set by a backend whose artifacts always have fixed sizes: why, said when a size is refused.
    fixed_sizes: str | None = None

    def values(self, inputs: list) -> tuple[dict, dict] | None:
        """The runtime's intermediate values on ``inputs`` ({IR value name: array}) and how they
        were taken ({"tolerance": ..., other notes}), for the divergence locator; None for a
        runtime that shows only its outputs."""
        return None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def resident(self, state_pairs: list[tuple[str, str]], tokens: tuple[str, str],
                 logits: str) -> "ResidentState | None":
        """Decode steps with the state (``state_pairs``: (input, output) names, the KV cache) kept
        in the runtime's own memory between calls, so a step does not copy every layer's cache in
        and out through numpy; ``tokens`` names the token-id and position inputs, ``logits`` the
        output returned. None (the default): the state goes through numpy on every call."""
        return None

    @abstractmethod
    def run_numpy(self, inputs: list) -> list:
        """Run on numpy arrays already checked against ``self.inputs``; return numpy arrays."""

    def check_inputs(self, arrays: list) -> list:
        """Arrays cast to the declared dtypes where that loses no meaning (float64 -> float32,
        int32 -> int64); anything else, a wrong count, rank, or size is a BackendError naming the input."""
        import numpy as np
        if len(arrays) != len(self.inputs):
            raise BackendError(f"model takes {len(self.inputs)} inputs ({', '.join(self.input_names)}), "
                               f"got {len(arrays)}")
        bound: dict[str, tuple[int, str]] = {}
        out = []
        for spec, a in zip(self.inputs, arrays):
            want = np.dtype(spec.dtype)
            if a.dtype != want:
                same_kind = (a.dtype.kind == want.kind == "f") or (a.dtype.kind in "iu" and want.kind in "iu")
                if not same_kind:
                    raise BackendError(f"input {spec.name}: expected {want.name}, got {a.dtype.name}")
                a = a.astype(want)
            if a.ndim != len(spec.dims):
                raise BackendError(f"input {spec.name}: expected rank {len(spec.dims)} {list(spec.dims)}, "
                                   f"got shape {list(a.shape)}")
            for axis, (d, n) in enumerate(zip(spec.dims, a.shape)):
                if isinstance(d, int) and d != n:
                    raise BackendError(f"input {spec.name}: dim {axis} must be {d}, got shape {list(a.shape)}; "
                                       f"{self.fixed_sizes or STATIC_AXIS_HINT}")
                if isinstance(d, str):
                    if d in bound and bound[d][0] != n:
                        raise BackendError(f"input {spec.name}: dim {axis} ({d}) is {n} but {bound[d][1]} "
                                           f"has {d} = {bound[d][0]}")
                    bound.setdefault(d, (n, spec.name))
            out.append(np.asarray(a, order="C"))     # (np.ascontiguousarray makes 0-d arrays 1-d)
        self._check_guards({d: n for d, (n, _) in bound.items()})
        return out

    def _check_guards(self, sizes: dict[str, int]) -> None:
        from ..ir import symbolic as sym
        for guard in self.guards:
            reads = sym.condition_symbols(guard)
            if reads <= set(sizes) and not sym.holds(guard, sizes):
                given = ", ".join(f"{k} = {v}" for k, v in sizes.items() if k in reads)
                raise BackendError(f"input sizes {given} break '{guard}', a condition the model was traced under "
                                   "(torch.export took the branch that holds there; the bundle would compute the "
                                   "wrong one): give inputs within it, or compile the model again with an example "
                                   "on the other side of it")

    def __call__(self, *inputs):
        import numpy as np
        import torch
        if len(inputs) == 1 and isinstance(inputs[0], dict):
            missing = [n for n in self.input_names if n not in inputs[0]]
            if missing:
                raise BackendError(f"missing input(s) {', '.join(missing)}")
            inputs = tuple(inputs[0][n] for n in self.input_names)
        as_torch = any(isinstance(x, torch.Tensor) for x in inputs)
        arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in inputs]
        outs = self.run_numpy(self.check_inputs(arrays))
        if as_torch:
            outs = [torch.from_numpy(np.asarray(o, order="C")) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)


class ResidentState(ABC):
    """State a runner keeps between decode steps (:meth:`Runner.resident`)."""

    @abstractmethod
    def reset(self, shapes: dict[str, list[int]]) -> None:
        """Fresh all-zero state, one array per state input of these shapes."""

    @abstractmethod
    def run(self, token_ids, positions):
        """One call on int64 ``token_ids`` and ``positions`` [batch, n] (numpy), the state carried
        over; the logits as a numpy array."""

    @abstractmethod
    def read(self, name: str):
        """The current value of state input ``name``, as a numpy array."""

    @abstractmethod
    def write(self, values: dict) -> None:
        """The state set to ``values`` (numpy arrays, one per state input, of any batch size), in
        place of what it held."""


@dataclass(frozen=True)
class RuntimeSpec:
    """The runtime a backend's artifacts depend on: the version key it records in its toolchain,
    the installed distribution to compare with, and how many leading version numbers must agree."""
    key: str
    distribution: str
    digits: int


def decoder_ops() -> frozenset[str]:
    """The IR's decoder ops (family "decoder"): each has a primitive form in the decompose pass."""
    from ..ir.ops import OPS
    return frozenset(name for name, op in OPS.items() if op.family == "decoder")


class Backend(ABC):
    name: str
    capabilities: Capabilities = Capabilities([])
    runtime: RuntimeSpec | None = None
    lowers: Collection[str] | None = None

    def prepare(self, target: Target, shapes: dict[str, list[int]]) -> list[dict]:
        """Passes to run on the graph before it is lowered for ``target`` (``shapes``: each
        input's shape in the first held-out batch), as pass configs (``{"pass": name, options}``,
        as a recipe lists them; the pipeline builds and runs them): by default the
        :meth:`decompositions`."""
        return self.decompositions()

    def check_cache_encodings(self, graph: Graph, target: Target) -> None:
        """Refuse a graph whose encoded KV caches (docs/kv_cache.md) this backend cannot run on
        ``target``: a BackendError naming every such cache, its layer and its encoding, from the
        capability rows for ``kv_cache_write`` and ``kv_cache_read``."""
        from ..ir.graph import STATE_NEXT
        from ..ir.ops.kvcache import CACHE_OPS, encoding_of
        refused: dict[str, str] = {}
        for node in graph.nodes:
            if node.op not in CACHE_OPS:
                continue
            enc = encoding_of(node.attrs)
            cap, why = self.capabilities.find(node.op, enc, target)
            if cap is None:
                if not any(r.op == node.op and r.encoding == enc.kind for r in self.capabilities):
                    why = f"the {self.name} capability table has no {node.op} row for {enc.kind}"
                part = node.inputs[2 if node.op == "kv_cache_write" else 1].name.removesuffix(STATE_NEXT)
                cache = part.rsplit(".", 1)[0]                       # cache.3.k
                layer = node.name.rsplit(".", 2)[0]                  # model.layers.3.self_attn
                refused.setdefault(cache, f"{cache} of layer {layer} ({enc.kind}: {why})")
        if refused:
            raise BackendError(f"the {self.name} backend cannot run the encoded KV cache of {len(refused)} cache(s) on "
                               f"{target.name}: {'; '.join(refused.values())}. Compile with a recipe without the "
                               "KV-cache encoding (e.g. 'w4-gptq' instead of 'w4-gptq+kv4'), or for a target whose "
                               "backend runs it (nnforge targets --explain TARGET lists what each backend runs)")

    def decompositions(self) -> list[dict]:
        """The decompose pass for the ops with a primitive form that :attr:`lowers` lacks."""
        if self.lowers is None:
            return []
        missing = sorted(decoder_ops() - set(self.lowers))
        return [{"pass": "decompose", "ops": missing}] if missing else []

    @abstractmethod
    def lower(self, graph: Graph, target: Target, ctx: LowerContext) -> Artifact:
        """Write the artifacts for ``graph`` through ``ctx.files``; what to keep in the manifest."""

    @abstractmethod
    def load(self, bundle_dir: Path, entry: dict, device: str | None = None) -> Runner:
        """Open artifacts written by ``lower``. Must not execute code from the bundle, except a native
        library the backend built itself (tvm): that is loaded only from a private copy whose
        sha256 matches the digest ``lower`` recorded in ``entry``, for a CPU that has its ISA."""

    def toolchain(self) -> dict[str, str]:
        return {}

    def times_here(self, target: Target) -> tuple[bool, str]:
        """Whether this backend's run time on this machine says anything about the target's
        speed (it runs natively here), and why not: the pipeline's speed records (nnforge.speed)
        are taken only where it does."""
        return False, f"the {self.name} backend does not run natively on this machine"


# The built-in backends: name -> "module:Class", imported on first use. Adding a backend is its
# folder under backends/ and one line here (or register_backend from anywhere).
BUILTIN = {"onnx": "nnforge.backends.onnx:OnnxBackend", "tvm": "nnforge.backends.tvm:TvmBackend",
           "triton": "nnforge.backends.triton:TritonBackend", "coreml": "nnforge.backends.coreml:CoremlBackend",
           "hls": "nnforge.backends.hls:HlsBackend", "mlir": "nnforge.backends.mlir:MlirBackend"}
BACKENDS: Registry = Registry("backend")
for _name, _path in BUILTIN.items():
    BACKENDS.register(_name)(_path)
_LOADED: dict[str, Backend] = {}


def register_backend(name: str, factory: str | Callable[[], Backend], *, replace: bool = False) -> None:
    """Register a backend by import path ('module:Class') or factory; imported lazily.

        >>> register_backend("mybackend", "mypkg.backend:MyBackend")
    """
    BACKENDS.register(name, replace=replace)(factory)
    _LOADED.pop(name, None)


def get_backend(name: str) -> Backend:
    if name in _LOADED:
        return _LOADED[name]
    factory = BACKENDS.lookup(name, BackendError)
    if isinstance(factory, str):
        module, cls = factory.split(":")
        factory = getattr(importlib.import_module(module), cls)
    _LOADED[name] = factory()
    return _LOADED[name]


def available_backends() -> list[str]:
    return sorted(BACKENDS)

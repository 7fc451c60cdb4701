"""What every backend provides, and the registry that finds one by name.

A backend lowers a verified IR graph for a target into files in a directory, and loads such files
back as a runner. It says what it runs natively as data: ``native`` maps (op, encoding kind) to
the formats it keeps compressed; anything else is an explicit, reported fallback
(:class:`Fallback`), recorded in the bundle manifest, or an error — never silent.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import NnforgeError
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
class Lowered:
    """The result of ``Backend.lower``: files written (relative paths), how to run them, and
    every fallback taken."""
    files: list[str]
    entry: dict[str, Any]
    fallbacks: list[Fallback] = field(default_factory=list)
    toolchain: dict[str, str] = field(default_factory=dict)


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

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

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
                    raise BackendError(f"input {spec.name}: dim {axis} must be {d}, got shape {list(a.shape)}")
                if isinstance(d, str):
                    if d in bound and bound[d][0] != n:
                        raise BackendError(f"input {spec.name}: dim {axis} ({d}) is {n} but {bound[d][1]} "
                                           f"has {d} = {bound[d][0]}")
                    bound.setdefault(d, (n, spec.name))
            out.append(np.asarray(a, order="C"))     # (np.ascontiguousarray makes 0-d arrays 1-d)
        return out

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


class Backend(ABC):
    name: str
    # (op, encoding kind) -> description of how it runs natively
    native: dict[tuple[str, str], str] = {}

    @abstractmethod
    def lower(self, graph: Graph, target: Target, out_dir: Path) -> Lowered:
        """Write the artifacts for ``graph`` into ``out_dir``."""

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


_BACKENDS: dict[str, str] = {"onnx": "nnforge.backends.onnx:OnnxBackend", "tvm": "nnforge.backends.tvm:TvmBackend"}
_BACKENDS["triton"] = "nnforge.backends.triton:TritonBackend"
_BACKENDS["coreml"] = "nnforge.backends.coreml:CoremlBackend"
_BACKENDS["hls"] = "nnforge.backends.hls:HlsBackend"
_BACKENDS["mlir"] = "nnforge.backends.mlir:MlirBackend"
_LOADED: dict[str, Backend] = {}


def register_backend(name: str, factory: str | Callable[[], Backend]) -> None:
    """Register a backend by import path ('module:Class') or factory; imported lazily."""
    _BACKENDS[name] = factory
    _LOADED.pop(name, None)


def get_backend(name: str) -> Backend:
    if name in _LOADED:
        return _LOADED[name]
    if name not in _BACKENDS:
        raise BackendError(f"no backend named {name!r} is available in this nnforge; "
                           f"available: {', '.join(sorted(_BACKENDS))}")
    factory = _BACKENDS[name]
    if isinstance(factory, str):
        module, cls = factory.split(":")
        factory = getattr(importlib.import_module(module), cls)
    _LOADED[name] = factory()
    return _LOADED[name]


def available_backends() -> list[str]:
    return sorted(_BACKENDS)

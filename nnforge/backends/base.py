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

from ..ir import Graph
from ..targets import Target


class BackendError(RuntimeError):
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


class Runner(ABC):
    """A loaded bundle: call it with numpy arrays or torch tensors."""
    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def run_numpy(self, inputs: list) -> list:
        """Run on numpy arrays, return numpy arrays."""

    def __call__(self, *inputs):
        import numpy as np
        import torch
        if len(inputs) == 1 and isinstance(inputs[0], dict):
            inputs = tuple(inputs[0][n] for n in self.input_names)
        as_torch = any(isinstance(x, torch.Tensor) for x in inputs)
        arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in inputs]
        outs = self.run_numpy(arrays)
        if as_torch:
            outs = [torch.from_numpy(np.ascontiguousarray(o)) for o in outs]
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
        """Open artifacts written by ``lower``; must not execute code from the bundle."""

    def toolchain(self) -> dict[str, str]:
        return {}


_BACKENDS: dict[str, str] = {"onnx": "nnforge.backends.onnx:OnnxBackend"}
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

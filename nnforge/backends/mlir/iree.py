"""Running a bundle's MLIR module compiled by IREE, the MLIR compiler it is written for:
``nf.load(bundle, device="iree")`` compiles ``model.mlir`` for this CPU (IREE's ``llvm-cpu``
backend, tuned for the host) and runs its functions in IREE's runtime, where the default load runs
torch-mlir's reference JIT. Same module, same entry (a decoder's ``prefill`` and ``decode`` fed by
:class:`.decoder.DecoderCalls`), so what it returns is checked against the same reference.

The compiled module (a ``.vmfb``) is cached under ``$NNFORGE_IREE_CACHE`` (default
``~/.cache/nnforge/iree``) by the sha256 of the module's text, the compile flags and IREE's
version; it is written to a temporary file and renamed into place, so concurrent loads never read
half of one.

    >>> lm = nf.load("bundle", device="iree")          # pip install 'nnforge[iree]'
    >>> lm.generate(prompt, 16)
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from pathlib import Path

import numpy as np

from ..base import BackendError
from .runtime import MlirRunner

DEVICES = {"iree": "llvm-cpu", "iree:llvm-cpu": "llvm-cpu"}        # load's device -> IREE's compile backend
DRIVER = {"llvm-cpu": "local-task"}                                # the runtime driver that runs it
INPUT_TYPE = {"linalg-on-tensors": "auto", "tosa": "tosa", "stablehlo": "stablehlo"}
FLAGS = ("--iree-llvmcpu-target-cpu=host",)


def backend_of(device: str) -> str:
    """IREE's compile backend for a load's ``device`` ("iree", "iree:llvm-cpu")."""
    if device not in DEVICES:
        raise BackendError(f"device {device!r}: the mlir backend runs its module under IREE on this CPU with device "
                           f"'iree' (or 'iree:llvm-cpu'); for another IREE backend (cuda, vulkan-spirv, rocm) compile "
                           f"model.mlir with iree-compile on a machine that has the device")
    return DEVICES[device]


def _iree():
    try:
        import iree.compiler as compiler
        import iree.runtime as runtime
    except ImportError:
        raise BackendError("running an mlir bundle under IREE needs IREE's compiler and runtime: "
                           "pip install 'nnforge[iree]'") from None
    return compiler, runtime


def cache_root() -> Path:
    return Path(os.environ.get("NNFORGE_IREE_CACHE") or Path.home() / ".cache" / "nnforge" / "iree")


def compile_module(text: str, dialect: str, backend: str, where: str) -> bytes:
    """The IREE flatbuffer of module ``text`` for ``backend`` (compiled once per content)."""
    compiler, _ = _iree()
    flags = [f"--iree-input-type={INPUT_TYPE[dialect]}", *FLAGS]
    key = hashlib.sha256("\0".join([text, backend, *flags, importlib.metadata.version("iree-base-compiler")])
                         .encode()).hexdigest()
    cached = cache_root() / f"{key}.vmfb"
    if cached.exists():
        return cached.read_bytes()
    try:
        vmfb = compiler.compile_str(text, target_backends=[backend], extra_args=flags)
    except Exception as e:
        raise BackendError(f"{where}: IREE cannot compile this {dialect} module for {backend}: "
                           f"{' '.join(str(e).split())[:600]}") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".part", delete=False) as f:
        f.write(vmfb)
    os.replace(f.name, cached)
    return vmfb


class IreeRunner(MlirRunner):
    """The bundle's module compiled by IREE for this CPU (module docstring)."""

    def __init__(self, path: Path, entry: dict, device: str = "iree"):
        self.backend = backend_of(device)
        super().__init__(path, entry)

    def _compile(self, module, text: str, path: Path, dialect: str) -> None:
        _, runtime = _iree()
        vmfb = compile_module(text, dialect, self.backend, str(path))
        config = runtime.Config(DRIVER[self.backend])
        self._context = runtime.SystemContext(config=config)
        vm_module = runtime.VmModule.copy_buffer(self._context.instance, vmfb)
        self._context.add_vm_module(vm_module)
        self._module = self._context.modules[vm_module.name]

    def invoke(self, function: str, inputs: list) -> list:
        """Call ``function`` of the compiled module on arrays of its argument types and shapes."""
        arrays = [np.ascontiguousarray(x) for x in inputs]
        outs = self._module[function](*arrays)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return [np.array(o.to_host() if hasattr(o, "to_host") else o, copy=True) for o in outs]


__all__ = ["IreeRunner", "compile_module", "backend_of", "DEVICES"]

"""One error root: every exception class nnforge defines derives from nnforge.NnforgeError, keeping
the built-in base it always had, and the kernels of every backend share one KernelError."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import nnforge
from nnforge import NnforgeError
from nnforge.errors import KernelError, UnknownNameError, UsageError

# Private control-flow signals, caught in their own module: a leak is a bug and should show its traceback.
PRIVATE_SIGNALS = {"nnforge.passes.prune.structures._Refuse"}


def _module_names() -> list[str]:
    """Every nnforge module by its file (pkgutil would miss those below a folder without __init__.py,
    such as backends/)."""
    root = Path(nnforge.__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _error_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in an nnforge module, by qualified name; a module whose optional
    dependency is not installed here is skipped (its classes are checked where it is)."""
    found = {}
    for name in _module_names():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] == "nnforge":
                raise
            continue
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{obj.__qualname__}"] = obj
    return found


def test_every_error_class_derives_from_nnforge_error():
    classes = _error_classes()
    assert {"nnforge.ir.errors.GraphError", "nnforge.backends.base.BackendError"} <= set(classes)
    outside = sorted(name for name, cls in classes.items()
                     if not issubclass(cls, NnforgeError) and name not in PRIVATE_SIGNALS)
    assert outside == [], f"derive these from nnforge.errors.NnforgeError (keeping their other base): {outside}"


@pytest.mark.parametrize("name, builtin", [
    ("nnforge.ir.errors.GraphError", ValueError), ("nnforge.ir.serialize.SerializationError", ValueError),
    ("nnforge.passes.base.PassError", ValueError), ("nnforge.frontend.errors.UnsupportedOpsError", ValueError),
    ("nnforge.backends.base.BackendError", RuntimeError), ("nnforge.ir.interpreter.InterpreterError", RuntimeError),
    ("nnforge.backends.coreml.verify.CoreMLVerifyError", AssertionError),
    ("nnforge.models.default.MissingModelError", RuntimeError),
])
def test_each_keeps_its_builtin_base(name, builtin):
    """`except ValueError` (or RuntimeError, AssertionError) callers keep catching what they caught."""
    module, _, cls = name.rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), cls), builtin)


def test_one_kernel_error_for_every_backend():
    from nnforge.backends.tvm.kernels import KernelError as TvmKernelError
    assert TvmKernelError is KernelError and issubclass(KernelError, ValueError)
    pytest.importorskip("triton")
    from nnforge.backends.triton.kernels import KernelError as TritonKernelError
    assert TritonKernelError is KernelError


def test_the_errors_of_the_registry_and_of_usage():
    assert issubclass(UsageError, ValueError) and issubclass(UnknownNameError, KeyError)
    assert str(UnknownNameError("unknown op 'x'; known: add")) == "unknown op 'x'; known: add"
    assert nnforge.NnforgeError is NnforgeError and "NnforgeError" in nnforge.__all__

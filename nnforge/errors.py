"""The root of every error nnforge raises on purpose, and the errors shared by several stages.

Each stage keeps its own error class beside its code (``GraphError`` in ir, ``PassError`` in
passes, ``BackendError`` in backends, ...); each derives from :class:`NnforgeError` and from the
built-in class it always had (``ValueError``, ``RuntimeError``), so ``except ValueError`` callers
keep working. The command line turns any ``NnforgeError`` into exit 2 and one line:

    >>> try:
    ...     nf.compile(model, target="nope", example_inputs=(x,))
    ... except nf.NnforgeError as e:
    ...     print(e)              # names the target and lists the known ones

This module imports nothing from nnforge, so every layer can use it.
"""
from __future__ import annotations


class NnforgeError(Exception):
    """Something nnforge refuses or cannot do; the message names what is at fault and what to do."""


class UsageError(NnforgeError, ValueError):
    """A malformed argument or option (a command-line flag, an inputs file, a batch size list)."""


class RegistryError(NnforgeError, ValueError):
    """Two things registered under one name; the message names both."""


class UnknownNameError(NnforgeError, KeyError):
    """A name no registry entry has; the message names it and every known name."""

    def __str__(self) -> str:          # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class KernelError(NnforgeError, ValueError):
    """A weight, shape or dtype a compute kernel cannot take (tvm's and triton's kernels alike);
    the message names the weight."""


__all__ = ["NnforgeError", "UsageError", "RegistryError", "UnknownNameError", "KernelError"]

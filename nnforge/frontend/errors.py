"""Errors raised by frontends."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import NnforgeError


class FrontendError(NnforgeError, ValueError):
    """A model could not be imported; the message names the node and source location."""


class UnsupportedError(FrontendError):
    """Raised by a converter for an op variant it does not handle (e.g. a transposed conv)."""


@dataclass
class Unsupported:
    op: str
    node: str
    source: str
    reason: str = ""

    def __str__(self) -> str:
        text = f"{self.op} at node {self.node}"
        if self.source:
            text += f" ({self.source})"
        if self.reason:
            text += f": {self.reason}"
        return text


class UnsupportedOpsError(FrontendError):
    """Every unsupported op of a model, reported together."""

    def __init__(self, model: str, items: list[Unsupported]):
        self.items = items
        ops = sorted({i.op for i in items})
        lines = "\n  ".join(str(i) for i in items[:50])
        more = f"\n  ... and {len(items) - 50} more" if len(items) > 50 else ""
        super().__init__(
            f"{model}: {len(items)} node(s) use {len(ops)} unsupported op(s) ({', '.join(ops)}):\n  {lines}{more}\n"
            "Add a converter with the `converters=` argument, or open an issue with this list.")

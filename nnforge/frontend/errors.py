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


@dataclass
class FailedNode:
    """A node of an op the frontend converts whose shape rule refused the inputs it was given."""
    op: str
    node: str
    source: str
    inputs: str
    reason: str

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return f"{self.op} at node {self.node}{where}, inputs {self.inputs}: {self.reason}"


def _listing(items: list) -> str:
    lines = "\n  ".join(str(i) for i in items[:50])
    return f"  {lines}" + (f"\n  ... and {len(items) - 50} more" if len(items) > 50 else "")


_FAILED_ADVICE = ("These ops are supported; the shapes reaching them do not fit their shape rules. Check that "
                  "ONNX Runtime runs the file at these shapes; if it does, open an issue with this message.")


class UnsupportedOpsError(FrontendError):
    """Every unsupported op of a model, reported together (with any node whose shape rule failed)."""

    def __init__(self, model: str, items: list[Unsupported], failed: list[FailedNode] = ()):
        self.items, self.failed = items, list(failed)
        ops = sorted({i.op for i in items})
        text = (f"{model}: {len(items)} node(s) use {len(ops)} unsupported op(s) ({', '.join(ops)}):\n"
                f"{_listing(items)}\nAdd a converter with the `converters=` argument, or open an issue with this list.")
        if self.failed:
            text += f"\nAlso, {len(self.failed)} node(s) failed:\n{_listing(self.failed)}\n{_FAILED_ADVICE}"
        super().__init__(text)


class ShapeRuleError(FrontendError):
    """Nodes of supported ops whose shape rules refused their inputs, reported together."""

    def __init__(self, model: str, failed: list[FailedNode]):
        self.failed = failed
        super().__init__(f"{model}: {len(failed)} node(s) of supported ops failed their shape rules:\n"
                         f"{_listing(failed)}\n{_FAILED_ADVICE}")

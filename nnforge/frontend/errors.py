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

# How a converter is called, per frontend, and where its examples are.
CONVERTER_FORMS = {"torch": ("aten.topk.default", "fn(cx, node) returning the IR value (or a tuple, one per output)",
                             "nnforge/frontend/torch_ops.py"),
                   "onnx": ("TopK", "fn(cx) returning the IR value(s) of cx.node's outputs",
                            "nnforge/frontend/onnx_ops.py")}


class UnsupportedOpsError(FrontendError):
    """Every unsupported op of a model, reported together (with any node whose shape rule failed),
    with how to add converters: through ``nf.compile(..., converters=...)`` from Python, or
    (``cli=True``) why the CLI cannot."""

    def __init__(self, model: str, items: list[Unsupported], failed: list[FailedNode] = (), frontend: str = "torch",
                 *, cli: bool = False):
        self.model, self.items, self.failed, self.frontend = model, items, list(failed), frontend
        ops = sorted({i.op for i in items})
        example, form, where = CONVERTER_FORMS[frontend]
        key = next((op for op in ops if "[" not in op), example)       # "op[1]": an output, not a key
        if cli:
            hint = ("The CLI cannot take converters (they are Python functions): compile from Python with "
                    f"nf.compile(..., converters={{{key!r}: fn}}), fn(cx, ...) as in {where}, or open an issue "
                    "with this list.")
        else:
            hint = (f"Add a converter for each: nf.compile(..., converters={{{key!r}: fn}}) with {form} "
                    f"(examples in {where}; docs/pipeline.md), or open an issue with this list.")
        text = (f"{model}: {len(items)} node(s) use {len(ops)} unsupported op(s) ({', '.join(ops)}):\n"
                f"{_listing(items)}\n{hint}")
        if self.failed:
            text += f"\nAlso, {len(self.failed)} node(s) failed:\n{_listing(self.failed)}\n{_FAILED_ADVICE}"
        super().__init__(text)


class ShapeRuleError(FrontendError):
    """Nodes of supported ops whose shape rules refused their inputs, reported together."""

    def __init__(self, model: str, failed: list[FailedNode]):
        self.failed = failed
        super().__init__(f"{model}: {len(failed)} node(s) of supported ops failed their shape rules:\n"
                         f"{_listing(failed)}\n{_FAILED_ADVICE}")

"""The graph output shapes an ONNX file declares, checked against the shapes the import computed.

An exporter that fixed a dynamic axis to the example's size (torch specialises an axis whose
example size is 1) writes a graph that is right only at that size, while its inputs still say the
axis is free; the outputs' declared shapes give it away, so the import stops there instead of
producing a bundle that is wrong at every other size.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..ir import Value, symbolic as sym
from .errors import FrontendError

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Sizes to compare two expressions at: well above kernel sizes and strides, so that both sides
# describe a valid shape, and distinct per symbol, so that swapped symbols show.
_PROBES = (lambda i: 67 + 4 * i, lambda i: 128 + 32 * i)


def _declared_dim(d, names: dict[str, str]) -> sym.Dim | None:
    """A declared dim over the import's symbols, or None where it says nothing checkable (no dim,
    a name no input uses, syntax the dims grammar lacks)."""
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if not d.dim_param:
        return None
    if d.dim_param in names:
        return names[d.dim_param]
    known = set(names.values())
    unknown = False

    def rename(m: re.Match) -> str:
        nonlocal unknown
        tok = m.group(0)
        if tok in names:
            return names[tok]
        unknown = unknown or (tok not in known and tok not in ("max", "min"))
        return tok

    text = _IDENT.sub(rename, d.dim_param)
    if unknown:
        return None
    try:
        return sym.simplify(text)
    except sym.DimError:
        return None


def _differ(a: sym.Dim, b: sym.Dim) -> bool:
    """True when ``a`` and ``b`` provably take different values at some sizes of their symbols."""
    if sym.equal(a, b):
        return False
    names = sorted(sym.symbols(a) | sym.symbols(b))
    for probe in _PROBES:
        env = {n: probe(i) for i, n in enumerate(names)}
        try:
            if sym.evaluate(a, env) != sym.evaluate(b, env):
                return True
        except sym.DimError:
            continue
    return False


def _text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_declared_outputs(path: Path, declared: list, outputs: list[Value], names: dict[str, str]) -> None:
    """Raise a FrontendError naming the output and both shapes where an output's declared shape
    (its ValueInfo in ``declared``) disagrees with the imported one; ``names`` maps the file's dim
    names to the import's symbols."""
    for vi, v in zip(declared, outputs):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        want = [_declared_dim(d, names) for d in tt.shape.dim]
        got = list(v.shape)
        if len(want) == len(got) and not any(w is not None and _differ(w, g) for w, g in zip(want, got)):
            continue
        fixed = [i for i, (w, g) in enumerate(zip(want, got)) if isinstance(w, int) and sym.symbols(g)]
        if fixed:
            advice = (f"the exporter fixed axis {', '.join(map(str, fixed))} to the example's size while the inputs "
                      "leave it free, so the file computes the right result only at that size (torch specialises "
                      "a dynamic axis whose example size is 1). Re-export it with example inputs whose dynamic "
                      "axes have sizes of at least 2, or give those input axes fixed sizes in the file")
        else:
            advice = ("the file's graph and its declared output disagree, or nnforge's shape inference went wrong: "
                      "check that ONNX Runtime runs the file at two input sizes, and if it does, open an issue "
                      "with this message")
        written = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in tt.shape.dim]
        raise FrontendError(f"{path.name}: graph output {vi.name} is declared {_text(written)} but the imported graph "
                            f"computes {_text(got)}: {advice}")

"""Which input axes of a torch module stay free (dimension symbols) in its graph.

By default every axis of every example input is offered to torch.export as ``Dim.AUTO``: torch
keeps an axis symbolic where the model's code takes any size and fixes it where the code needs
the example's size (a weight's width, a position table added whole, a fixed reshape). Three things
one trace does not settle on its own:

- an axis of size 1: torch specialises sizes 0 and 1, so a batch of one would fix the batch. The
  example's batch of one is traced repeated to two rows, and kept at one only when the model
  refuses two;
- conditions the trace took (``seq <= 64`` for a position table, a branch on a size): torch
  records them as guards, which become the graph's ``shape_guards`` (over nnforge's symbol names)
  and every bundle checks them on its inputs, so a size outside them is refused by name instead
  of computing the branch the trace did not take;
- a relation nnforge cannot keep (an axis product fixed by a flatten into a linear): the next,
  narrower try frees the batch only, and the last keeps the example's exact shapes, with a
  warning that says why.

``dynamic_shapes="static"`` (or ``False``) asks for the example's exact shapes; a torch.export
specification (``Dim``s per input axis) is used as given, with any axis it frees that has size 1
in the example traced at size 2, the same way.

    >>> for tried in attempts(model, (ids, mask), None): ...   # see torch_export.from_torch
"""
from __future__ import annotations

import inspect
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.export import Dim

from ..ir import symbolic as sym
from ..errors import NnforgeError
from .errors import FrontendError

STATIC = "static"
AUTO_NOTE = "free axes as torch.export found them"
GIVEN_NOTE = "free axes as dynamic_shapes gives them"
STATIC_NOTE = "static, as asked"
BATCH_NOTE = "batch free; the other axes fixed"


@dataclass(frozen=True)
class Attempt:
    """One way to export: the example it traces, the specification, and what the manifest says
    of the resulting shapes. ``last`` tries raise their error instead of handing over."""
    example: tuple
    spec: object
    note: str
    last: bool = False


@contextmanager
def quiet_specialisation():
    """torch.export logs a warning for each Dim.AUTO axis it fixes at an example size of 1; nnforge
    widens such axes itself and reports what it kept (the manifest's model.shapes)."""
    log = logging.getLogger("torch._export.non_strict_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def is_static_request(dynamic_shapes) -> bool:
    return dynamic_shapes is False or (isinstance(dynamic_shapes, str) and dynamic_shapes.lower() == STATIC)


def _free(d) -> bool:
    """Whether an entry of a torch.export specification leaves its axis free."""
    return d is not None and not isinstance(d, int) and d is not Dim.STATIC


def _positional(model) -> list[inspect.Parameter]:
    try:
        return [p for p in inspect.signature(model.forward).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        return []


def _per_input(spec, model, n: int) -> list | None:
    """The specification as one entry per positional input (a dict axis -> Dim, a list, or None),
    or None where it is in a form nnforge does not take apart (a ShapesCollection, say)."""
    if isinstance(spec, (list, tuple)):
        return list(spec) + [None] * (n - len(spec))
    if isinstance(spec, dict):
        params = [p.name for p in _positional(model)]
        return [spec.get(p) for p in params[:n]] + [None] * max(0, n - len(params))
    return None


def _free_axes(entry, rank: int) -> list[int]:
    if isinstance(entry, dict):
        return [a for a, d in entry.items() if isinstance(a, int) and a < rank and _free(d)]
    if isinstance(entry, (list, tuple)):
        return [a for a, d in enumerate(entry[:rank]) if _free(d)]
    return []


def _widened(example: tuple, axes: list[list[int]]) -> tuple | None:
    """``example`` with each listed axis of size 1 repeated to size 2; None when there is none."""
    out, changed = [], False
    for x, free in zip(example, axes):
        if isinstance(x, torch.Tensor):
            for a in free:
                if x.shape[a] == 1:
                    x = torch.cat([x, x], dim=a)
                    changed = True
        out.append(x)
    return tuple(out) if changed else None


def auto_spec(example: tuple, axes=None) -> torch.export.ShapesCollection:
    """``Dim.AUTO`` on every axis of every tensor input (or on ``axes`` only, the rest static)."""
    spec = torch.export.ShapesCollection()
    for x in example:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            spec[x] = {a: (Dim.AUTO if axes is None or a in axes else Dim.STATIC) for a in range(x.dim())}
    return spec


def _rekeyed(spec, example: tuple, wide: tuple):
    """A ShapesCollection is keyed by the tensors themselves; re-key it to the widened copies."""
    if not isinstance(spec, torch.export.ShapesCollection):
        return spec
    out = torch.export.ShapesCollection()
    for x, w in zip(example, wide):
        if isinstance(x, torch.Tensor) and x in spec:
            out[w] = spec[x]
    return out


def attempts(model, example: tuple, dynamic_shapes) -> Iterator[Attempt]:
    """The exports to try, widest first (module docstring)."""
    if is_static_request(dynamic_shapes):
        yield Attempt(example, None, STATIC_NOTE, last=True)
        return
    if isinstance(dynamic_shapes, str) and dynamic_shapes.lower() != "auto":
        raise FrontendError(f"{type(model).__name__}: dynamic_shapes={dynamic_shapes!r} is not a choice: leave it "
                            "unset (free axes found by torch.export), 'static' for the example's exact shapes, or "
                            "a torch.export specification (Dim per input axis)")
    if dynamic_shapes is None or isinstance(dynamic_shapes, str):
        batched = [isinstance(x, torch.Tensor) and x.dim() > 1 for x in example]
        # a row of one beside bigger batches is a broadcast operand, not a batch of one
        one_row = all(x.shape[0] == 1 for x, b in zip(example, batched) if b)
        wide = _widened(example, [[0] if b and one_row else [] for b in batched])
        for axes, note in ((None, AUTO_NOTE), ({0}, BATCH_NOTE)):
            for ex in ([wide] if wide is not None else []) + [example]:
                yield Attempt(ex, auto_spec(ex, axes), note)
        yield Attempt(example, None, "static", last=True)
        return
    entries = _per_input(dynamic_shapes, model, len(example))
    if entries is not None:
        wide = _widened(example, [_free_axes(e, x.dim() if isinstance(x, torch.Tensor) else 0)
                                  for e, x in zip(entries, example)])
        if wide is not None:
            yield Attempt(wide, _rekeyed(dynamic_shapes, example, wide), GIVEN_NOTE)
    yield Attempt(example, dynamic_shapes, GIVEN_NOTE, last=True)


def fixed_widened_axis(ep: torch.export.ExportedProgram, tried: Attempt, example: tuple) -> bool:
    """Whether torch fixed an axis the attempt widened from 1 to 2 (the copy's size would then be
    baked into the graph)."""
    if tried.example is example:
        return False
    user = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in set(ep.graph_signature.user_inputs)]
    for n, x, w in zip(user, example, tried.example):
        val = n.meta.get("val")
        if isinstance(x, torch.Tensor) and isinstance(val, torch.Tensor):
            for a, (before, after) in enumerate(zip(x.shape, w.shape)):
                if before != after and isinstance(val.shape[a], int):
                    return True
    return False


def constraint_error(model, error: Exception) -> Exception:
    """The error for a user's Dim that torch.export found cannot be free."""
    cause = str(error.__cause__ or error)
    if not isinstance(error, FrontendError) or "onstraint" not in cause:
        return error
    lines = [ln.strip() for ln in cause.splitlines() if ln.strip()]
    return FrontendError(f"{type(model).__name__}: torch.export found that an axis your dynamic_shapes marks free "
                         f"cannot take any size: {lines[0] if lines else cause}. Drop that Dim (or give it the bounds "
                         "torch suggests), or leave dynamic_shapes unset: nnforge then lets torch.export find the "
                         "free axes itself (Dim.AUTO)")


# --- guards ------------------------------------------------------------------------------------
_SIZE = re.compile(r"L\['(\w+)'\]((?:\[\d+\])?)\.size\(\)\[(\d+)\]")


class UnkeptGuard(NnforgeError):
    """A guard of the trace that nnforge cannot state over its symbols."""


def shape_guards(ep: torch.export.ExportedProgram, model, input_shapes: list[list]) -> list[str]:
    """torch.export's guards on input sizes, over the graph's dimension symbols ("seq <= 64"):
    those over fixed axes only (true of every input the bundle accepts) and those the symbols make
    true by themselves left out. UnkeptGuard for one nnforge cannot state."""
    params = _positional(model)
    index: dict[tuple[str, int], int] = {}
    for i, p in enumerate(params):
        if p.kind == p.VAR_POSITIONAL:
            for k in range(len(input_shapes) - i):
                index[(p.name, k)] = i + k
            break
        index[(p.name, -1)] = i
    out = []
    for code in getattr(ep, "_guards_code", None) or []:
        def dim(m: re.Match) -> str:
            key = (m.group(1), int(m.group(2)[1:-1]) if m.group(2) else -1)
            if key not in index:
                raise UnkeptGuard(f"guard {code!r} reads an input nnforge cannot place")
            d = input_shapes[index[key]][int(m.group(3))]
            return str(d) if isinstance(d, int) else f"({d})"
        guard = _canonical(_SIZE.sub(dim, code), code)
        if guard is not None and guard not in out:
            out.append(guard)
    return out + [g for g in _range_guards(ep, input_shapes) if g not in out]


def _range_guards(ep: torch.export.ExportedProgram, input_shapes: list[list]) -> list[str]:
    """The ranges torch found for the free axes ("height >= 64", "seq <= 512"), as guards. A lower
    bound of 2 is torch's own specialisation of sizes 0 and 1, not the model's: left out."""
    user = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in set(ep.graph_signature.user_inputs)]
    names: dict = {}
    for n, shape in zip(user, input_shapes):
        val = n.meta.get("val")
        for d, ours in zip(getattr(val, "shape", ()), shape):
            if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol and sym.is_symbol(ours):
                names.setdefault(d.node.expr, ours)
    out = []
    for s, r in ep.range_constraints.items():
        if s not in names:
            continue
        lower, upper = int(r.lower), r.upper
        if lower > 2:
            out.append(f"{names[s]} >= {lower}")
        if getattr(upper, "is_Integer", False) or isinstance(upper, int):       # int_oo is neither
            out.append(f"{names[s]} <= {int(upper)}")
    return out


def _canonical(text: str, code: str) -> str | None:
    """``text`` with every comparison in it simplified: "(seq) <= 64", or comparisons joined by
    "or" (torch's broadcast guards: "a == 1 or a == b"); None when it holds whatever the symbols
    are (or reads no symbol: true of the example, and so of every input)."""
    text = _unwrapped(text)
    parts = _split_top(text, " or ")
    if len(parts) > 1:
        kept = []
        for p in parts:
            c = _comparison(p, code)
            if c is None:
                return None             # one side always holds
            kept.append(c)
        return " or ".join(dict.fromkeys(kept))
    return _comparison(text, code)


def _unwrapped(text: str) -> str:
    text = text.strip()
    while text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]):
        text = text[1:-1].strip()
    return text


def _split_top(text: str, word: str) -> list[str]:
    """``text`` split at ``word`` outside parentheses."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        depth += (text[i] == "(") - (text[i] == ")")
        if depth == 0 and text.startswith(word, i):
            parts.append(text[start:i])
            i += len(word)
            start = i
            continue
        i += 1
    return parts + [text[start:]]


def _comparison(text: str, code: str) -> str | None:
    text = _unwrapped(text)
    if " and " in text or " or " in text or text.startswith("not "):
        raise UnkeptGuard(f"guard {code!r} is not comparisons of sizes joined by 'or'")
    m = sym.COMPARISON.match(text)
    if m is None or any(c in m.group(3) for c in "<>=!"):
        raise UnkeptGuard(f"guard {code!r} is not one comparison of sizes")
    try:
        left, right = sym.simplify(m.group(1)), sym.simplify(m.group(3))
    except (sym.DimError, SyntaxError, ValueError) as e:
        raise UnkeptGuard(f"guard {code!r}: {e}") from e
    if not sym.symbols(left) and not sym.symbols(right):
        return None
    if m.group(2) in ("==", "<=", ">=") and sym.equal(left, right):
        return None
    return f"{left} {m.group(2)} {right}"


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += (c == "(") - (c == ")")
        if depth < 0:
            return False
    return depth == 0


# Sizes tried for a symbol when looking for inputs that break a guard: small ones first (cheap to
# run), then around and above the example's.
def _candidates(example_size: int) -> list[int]:
    e = example_size
    return sorted({v for v in (1, 2, 3, 4, e // 2, e - 1, e + 1, 2 * e, 4 * e) if v >= 1})


MAX_TRIES = 256


def _breaking_sizes(guard: str, env: dict[str, int]) -> list[dict[str, int]]:
    """A few sizes (the example's, with the guard's symbols changed) under which ``guard`` is
    false, from the smallest to the largest with no size 1 among them: a size of 1 can hide a
    difference (a sum and a mean of one element agree)."""
    import itertools
    names = sorted(sym.condition_symbols(guard))
    if not set(names) <= set(env):
        return []
    combos = itertools.product(*[_candidates(env[n]) for n in names])
    breaking = [dict(env, **dict(zip(names, vs))) for vs in sorted(itertools.islice(combos, MAX_TRIES),
                                                                      key=lambda vs: (sum(vs), vs))]
    breaking = [t for t in breaking if _breaks(guard, t)]
    if len(breaking) < 3:
        return breaking
    no_ones = [t for t in breaking if all(t[n] > 1 for n in names)] or breaking
    picks = [breaking[0], breaking[len(breaking) // 3], no_ones[len(no_ones) // 2], no_ones[-1]]
    return list({tuple(sorted(t.items())): t for t in picks}.values())


def _breaks(guard: str, env: dict[str, int]) -> bool:
    try:
        return not sym.holds(guard, env)
    except sym.DimError:                # sizes where the guard itself is undefined (x % 0): skipped
        return False


def _inputs_at(graph, example: tuple, env: dict[str, int], seed: int = 0) -> tuple:
    """Inputs shaped by ``env``, with values like the example's (integer ids within its range)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for v, x in zip(graph.inputs, example):
        shape = [d if isinstance(d, int) else sym.evaluate(d, env) for d in v.shape]
        if x.dtype == torch.bool:
            out.append(torch.rand(shape, generator=g) > 0.5)
        elif x.is_floating_point():
            out.append(torch.randn(shape, generator=g).to(x.dtype))
        else:
            lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 1)
            out.append(torch.randint(lo, hi + 1, shape, generator=g, dtype=x.dtype))
    return tuple(out)


def settle_guards(model, graph, example: tuple, guards: list[str]) -> tuple[list[str], list[dict]]:
    """(guards kept, guards dropped with the sizes they were checked at). Many guards come from
    inside torch's decompositions (a pooled map of size 1 taking an identity path, a stride test)
    and change nothing computed. Each guard is tried at a few sizes that break it: where the model
    runs at some of them and the graph gives the model's result at every one of those, it is
    dropped; where they differ, or the model runs at none, the bundle keeps refusing such sizes."""
    if not guards:
        return [], []
    env = {}
    for v, x in zip(graph.inputs, example):
        for d, n in zip(v.shape, getattr(x, "shape", ())):
            if sym.is_symbol(d):
                env.setdefault(d, int(n))
    kept, dropped = [], []
    seen: dict[tuple, bool | None] = {}
    for guard in guards:
        trials = _breaking_sizes(guard, env)
        results = []
        for t in trials:
            key = tuple(sorted(t.items()))
            if key not in seen:
                seen[key] = _same_there(model, graph, example, t)
            results.append(seen[key])
        valid = [r for r in results if r is not None]
        # dropped only where the model runs on the other side and the graph agrees there every
        # time; sizes the model itself refuses stay refused by the bundle too
        if valid and all(valid):
            reads = sorted(sym.condition_symbols(guard))
            dropped.append({"guard": guard, "checked_at": [{k: t[k] for k in reads}
                                                           for t, r in zip(trials, results) if r]})
        else:
            kept.append(guard)
    return kept, dropped


def _same_there(model, graph, example: tuple, env: dict[str, int]) -> bool | None:
    """Whether the graph gives the model's result at sizes ``env``; None where the model itself
    does not run there (sizes it refuses: no evidence either way)."""
    from ..ir import Interpreter
    try:
        inputs = _inputs_at(graph, example, env)
        with torch.no_grad():
            want = torch.utils._pytree.tree_leaves(model(*inputs))
    except Exception:
        return None
    try:
        got = Interpreter(graph).run(*inputs)
    except Exception:
        return False
    # values, not just directions: the other branch may compute the same up to a scale
    return len(got) == len(want) and all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5, equal_nan=True)
        for a, b in zip(got, want))


def axis_name(input_name: str, value, axis: int) -> str:
    """A readable name for a free axis torch found on its own: by the role it usually has."""
    rank = len(getattr(value, "shape", ()))
    floating = getattr(value, "dtype", torch.float32).is_floating_point
    if axis == 0 and rank > 1:
        return "batch"
    if axis == 1 and (rank == 2 and not floating or rank == 3 and floating):
        return "seq"
    if rank == 4 and floating and axis in (2, 3):
        return ("height", "width")[axis - 2]
    return f"{input_name}_{axis}"


__all__ = ["AUTO_NOTE", "Attempt", "STATIC", "UnkeptGuard", "attempts", "auto_spec", "axis_name",
           "constraint_error", "fixed_widened_axis", "is_static_request", "quiet_specialisation", "settle_guards", "shape_guards"]

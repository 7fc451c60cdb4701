"""Symbolic tensor dimensions.

A dimension is an ``int`` or a ``str`` holding a small integer expression over named symbols,
such as ``"batch"``, ``"12*batch"`` or ``"seq + 1"`` (grammar: ints, names, ``+ - * // %``,
``max(..)``, ``min(..)``). Graph inputs introduce the symbols; every other shape is an expression
over them, so one graph serves every batch size and sequence length.

Expressions are parsed with :mod:`ast` and walked by hand: text read from a bundle is never
evaluated as Python. Equality is decided on a polynomial normal form, where anything that is not
a polynomial (a floor division that does not divide, a max) becomes an opaque atom. Symbols stand
for sizes of at least 1, so ``max(batch*seq, seq)`` simplifies to ``batch*seq``.

    >>> simplify("seq*batch + 0")
    'batch*seq'
    >>> evaluate("12*batch", {"batch": 2})
    24
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from typing import Union

from ..errors import NnforgeError

Dim = Union[int, str]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FUNCS = {"max": max, "min": min}
_ARITH = {"add": int.__add__, "sub": int.__sub__, "mul": int.__mul__, "floordiv": int.__floordiv__,
          "mod": int.__mod__}
MAX_EXPR_LEN = 512
# A condition on sizes, "left op right" (a shape guard: "seq <= 64", "batch*seq > 5").
COMPARISON = re.compile(r"^(.*?)\s*(<=|>=|==|!=|<|>)\s*(.*)$")
_COMPARE_OPS = {"<=": int.__le__, ">=": int.__ge__, "==": int.__eq__, "!=": int.__ne__, "<": int.__lt__,
                ">": int.__gt__}


class DimError(NnforgeError, ValueError):
    """A dimension expression is malformed or cannot be evaluated."""


@lru_cache(maxsize=4096)
def _parse(text: str) -> ast.expr:
    if len(text) > MAX_EXPR_LEN:
        raise DimError(f"dimension expression longer than {MAX_EXPR_LEN} characters")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise DimError(f"malformed dimension expression {text!r}") from None
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)):
            stack += [node.left, node.right]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            stack.append(node.operand)
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            pass
        elif isinstance(node, ast.Name) and node.id not in _FUNCS:
            pass
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
              and node.args and not node.keywords):
            stack += node.args
        else:
            raise DimError(f"dimension expression {text!r} uses unsupported syntax")
    return tree


def check(d: Dim) -> None:
    """Raise DimError unless ``d`` is a valid dimension."""
    if isinstance(d, bool) or not isinstance(d, (int, str)):
        raise DimError(f"dimension must be an int or an expression string, got {d!r}")
    if isinstance(d, int):
        if d < 0:
            raise DimError(f"negative dimension {d}")
        return
    _parse(d)


_OPNAMES = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.FloorDiv: "floordiv", ast.Mod: "mod"}


def fold(d: Dim, *, const, symbol, binop, call, neg):
    """Evaluate ``d`` bottom-up with the given callbacks: ``const(int)``, ``symbol(name)``,
    ``binop(op, a, b)`` with op in add/sub/mul/floordiv/mod, ``call(fname, args)`` for max/min,
    ``neg(a)``. Backends use it to emit run-time shape arithmetic."""
    if isinstance(d, int):
        return const(d)
    root = _parse(d)
    out: dict[int, object] = {}
    stack: list[tuple[ast.expr, bool]] = [(root, False)]
    while stack:                                  # iterative post-order walk
        node, ready = stack.pop()
        if isinstance(node, ast.Constant):
            out[id(node)] = const(node.value)
        elif isinstance(node, ast.Name):
            out[id(node)] = symbol(node.id)
        elif not ready:
            stack.append((node, True))
            kids = [node.left, node.right] if isinstance(node, ast.BinOp) else (
                [node.operand] if isinstance(node, ast.UnaryOp) else list(node.args))
            stack += [(k, False) for k in kids]
        elif isinstance(node, ast.BinOp):
            out[id(node)] = binop(_OPNAMES[type(node.op)], out[id(node.left)], out[id(node.right)])
        elif isinstance(node, ast.UnaryOp):
            out[id(node)] = neg(out[id(node.operand)])
        else:
            out[id(node)] = call(node.func.id, [out[id(a)] for a in node.args])
    return out[id(root)]


def evaluate(d: Dim, env: dict[str, int]) -> int:
    """Value of ``d`` with each symbol bound by ``env``."""
    if isinstance(d, int):
        return d

    def symbol(name):
        if name not in env:
            raise DimError(f"symbol {name!r} of dimension {d!r} is not bound")
        return int(env[name])

    def binop(op, a, b):
        if op in ("floordiv", "mod") and b == 0:
            raise DimError(f"division by zero evaluating {d!r} with {env}")
        return _ARITH[op](a, b)

    return fold(d, const=int, symbol=symbol, binop=binop, call=lambda f, args: _FUNCS[f](args),
                neg=lambda a: -a)


# --- polynomial normal form -------------------------------------------------------------------
# A polynomial maps a monomial (sorted tuple of atoms) to its integer coefficient. An atom is a
# symbol name or the canonical text of a non-polynomial sub-expression, written in parentheses.

Poly = dict[tuple[str, ...], int]


def _padd(a: Poly, b: Poly, sign: int = 1) -> Poly:
    out = dict(a)
    for m, c in b.items():
        out[m] = out.get(m, 0) + sign * c
    return {m: c for m, c in out.items() if c != 0}


def _pmul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            m = tuple(sorted(ma + mb))
            out[m] = out.get(m, 0) + ca * cb
    return {m: c for m, c in out.items() if c != 0}


def _const(p: Poly) -> int | None:
    if not p:
        return 0
    if len(p) == 1 and () in p:
        return p[()]
    return None


def _atom(text: str) -> Poly:
    return {(text,): 1}


def _provably_nonneg(p: Poly) -> bool:
    """True when ``p`` >= 0 for every value of its symbols (each at least 1): writing each symbol
    as 1 + x with x >= 0 leaves no negative coefficient. Opaque atoms (a floor division, a max)
    may be anything, so a polynomial holding one is never proved."""
    shifted: Poly = {}
    for mono, coef in p.items():
        term: Poly = {(): coef}
        for atom in mono:
            if not _NAME.match(atom):
                return False
            term = _pmul(term, {(): 1, (atom,): 1})
        shifted = _padd(shifted, term)
    return all(c >= 0 for c in shifted.values())


def _poly_call(fname: str, args: list[Poly]) -> Poly:
    consts = [_const(p) for p in args]
    if all(c is not None for c in consts):
        return _from_int(_FUNCS[fname](consts))
    # Drop every argument another one provably bounds (max(batch*seq, seq) is batch*seq); the
    # arguments are distinct, so no two bound each other.
    uniq = list({_print(p): p for p in args}.values())
    bounds = (lambda q, p: _provably_nonneg(_padd(q, p, -1))) if fname == "max" else \
        (lambda q, p: _provably_nonneg(_padd(p, q, -1)))
    kept = [p for p in uniq if not any(q is not p and bounds(q, p) for q in uniq)]
    if len(kept) == 1:
        return kept[0]
    return _atom(f"{fname}({', '.join(sorted(_print(p) for p in kept))})")


_POLY_BINOP = {
    "add": _padd,
    "sub": lambda a, b: _padd(a, b, -1),
    "mul": lambda a, b: _pmul(a, b),
    "floordiv": lambda a, b: _divmod(a, b, True),
    "mod": lambda a, b: _divmod(a, b, False),
}


def _to_poly(text: str) -> Poly:
    return fold(text, const=lambda v: _from_int(v), symbol=_atom, binop=lambda op, a, b: _POLY_BINOP[op](a, b),
                call=_poly_call, neg=lambda p: {m: -c for m, c in p.items()})


def _from_int(v: int) -> Poly:
    return {(): v} if v else {}


# Atoms standing for N // c (c a positive constant), by their text: what a later division of such
# an atom by a constant needs to merge the two (N // a) // c into N // (a*c).
_FLOORDIV_ATOMS: dict[str, tuple[tuple, int]] = {}


def _floordiv_const(a: Poly, c: int) -> Poly:
    """a // c for a positive constant c, in a normal form: whole multiples of c leave the division
    (a = c*q + r with r's coefficients in [0, c), so a // c = q + r // c), and r = N // d + k, a
    division of a division plus a constant, becomes (N + k*d) // (d*c). So conv output sizes written
    as (h - 4)//4 + 1 and h//4, or ((h - 1)//2)//2 and (h - 1)//4, have one form each."""
    q = {m: k // c for m, k in a.items() if k // c}
    r = {m: k % c for m, k in a.items() if k % c}
    atoms = [m for m in r if m]
    if not atoms:                   # a constant remainder in [0, c)
        return q
    if len(atoms) == 1 and len(atoms[0]) == 1 and r[atoms[0]] == 1 and atoms[0][0] in _FLOORDIV_ATOMS:
        num, d = _FLOORDIV_ATOMS[atoms[0][0]]
        return _padd(q, _floordiv_const(_padd(dict(num), _from_int(r.get((), 0) * d)), d * c))
    if c == 1:
        return _padd(q, r)
    text = f"({_operand(r)}//{c})"
    _FLOORDIV_ATOMS.setdefault(text, (tuple(sorted(r.items())), c))
    return _padd(q, _atom(text))


def _divmod(a: Poly, b: Poly, floordiv: bool) -> Poly:
    ca, cb = _const(a), _const(b)
    if cb == 0:
        raise DimError("division by zero in a dimension expression")
    if ca is not None and cb is not None:
        return _from_int(ca // cb if floordiv else ca % cb)
    if cb is not None and all(c % cb == 0 for c in a.values()):
        return {m: c // cb for m, c in a.items()} if floordiv else {}
    if floordiv and cb is not None and cb > 0:
        return _floordiv_const(a, cb)
    quotient = _exact_monomial_division(a, b)
    if quotient is not None:
        return quotient if floordiv else {}
    if cb == 1:
        return a if floordiv else {}
    op = "//" if floordiv else " % "
    return _atom(f"({_operand(a)}{op}{_operand(b)})")


def _operand(p: Poly) -> str:
    """Text of ``p`` safe to use as an operand of a product or division."""
    text = _print(p)
    return text if _NAME.match(text) or text.isdigit() or (text.startswith("(") and text.endswith(")")
                                                           and len(p) == 1 and len(next(iter(p))) == 1) \
        else f"({text})"


def _exact_monomial_division(a: Poly, b: Poly) -> Poly | None:
    """a / b when b is a single term that divides every term of a exactly (384*b*s // 32*b*s)."""
    if len(b) != 1:
        return None
    (mb, cb), = b.items()
    out: Poly = {}
    for ma, ca in a.items():
        rest = list(ma)
        for atom in mb:
            if atom not in rest:
                return None
            rest.remove(atom)
        if ca % cb:
            return None
        out[tuple(rest)] = ca // cb
    return out


def _print(p: Poly) -> str:
    if not p:
        return "0"
    terms = sorted(p.items(), key=lambda mc: (-len(mc[0]), mc[0]))
    parts = []
    for m, c in terms:
        body = "*".join(m)
        if not body:
            text = str(abs(c))
        elif abs(c) == 1:
            text = body
        else:
            text = f"{abs(c)}*{body}"
        parts.append(("-" if c < 0 else "+", text))
    sign, first = parts[0]
    out = ("-" if sign == "-" else "") + first
    for sign, text in parts[1:]:
        out += f" {sign} {text}"
    return out


@lru_cache(maxsize=8192)
def _simplify_str(text: str) -> Dim:
    p = _to_poly(text)
    c = _const(p)
    return c if c is not None else _print(p)


def simplify(d: Dim) -> Dim:
    """Canonical form of ``d``: an int when it is constant, else a normalised expression."""
    check(d)
    return d if isinstance(d, int) else _simplify_str(d)


def _wrap(d: Dim) -> str:
    return str(d) if isinstance(d, int) else f"({d})"


def add(a: Dim, b: Dim) -> Dim:
    return simplify(a + b) if isinstance(a, int) and isinstance(b, int) else simplify(f"{_wrap(a)} + {_wrap(b)}")


def sub(a: Dim, b: Dim) -> Dim:
    return simplify(a - b) if isinstance(a, int) and isinstance(b, int) else simplify(f"{_wrap(a)} - {_wrap(b)}")


def mul(a: Dim, b: Dim) -> Dim:
    return a * b if isinstance(a, int) and isinstance(b, int) else simplify(f"{_wrap(a)}*{_wrap(b)}")


def floordiv(a: Dim, b: Dim) -> Dim:
    if isinstance(b, int) and b == 0:
        raise DimError(f"dimension {a} divided by zero")
    return a // b if isinstance(a, int) and isinstance(b, int) else simplify(f"{_wrap(a)}//{_wrap(b)}")


def minimum(a: Dim, b: Dim) -> Dim:
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else simplify(f"min({a}, {b})")


def prod(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = mul(out, d)
    return out


def equal(a: Dim, b: Dim) -> bool:
    """True when ``a`` and ``b`` are provably the same dimension."""
    return simplify(a) == simplify(b)


def provably_nonneg(d: Dim) -> bool:
    """True when ``d`` >= 0 for every size of its symbols (each at least 1)."""
    return d >= 0 if isinstance(d, int) else _provably_nonneg(_to_poly(d))


def symbols(d: Dim) -> set[str]:
    """Names of the symbols ``d`` depends on."""
    if isinstance(d, int):
        return set()
    return {n.id for n in ast.walk(_parse(d)) if isinstance(n, ast.Name) and n.id not in _FUNCS}


def is_symbol(d: Dim) -> bool:
    return isinstance(d, str) and bool(_NAME.match(d))


def _comparisons(condition: str) -> list[re.Match]:
    out = []
    for part in condition.split(" or "):
        m = COMPARISON.match(part.strip())
        if m is None or m.group(2) not in _COMPARE_OPS:
            raise DimError(f"not a condition on sizes: {condition!r}")
        out.append(m)
    return out


def condition_symbols(condition: str) -> set[str]:
    """Names of the symbols a condition ("seq <= 64", "a == 1 or a == b") reads."""
    return set().union(*(symbols(m.group(1)) | symbols(m.group(3)) for m in _comparisons(condition)))


def holds(condition: str, env: dict[str, int]) -> bool:
    """Whether ``condition`` (comparisons of two expressions, joined by " or ": "batch*seq > 5")
    holds for ``env``."""
    return any(_COMPARE_OPS[m.group(2)](evaluate(m.group(1), env), evaluate(m.group(3), env))
               for m in _comparisons(condition))

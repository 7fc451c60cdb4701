"""Symbolic dimensions: parsing (and refusing anything that is not a small integer expression),
the polynomial normal form behind simplify/equal, the arithmetic helpers, and fold/evaluate.

The normal form is also checked as a property: for many random expressions, the simplified text
evaluates to the same integer as the original under random bindings of the symbols.
"""
from __future__ import annotations

import random

import pytest

from nnforge.ir import symbolic as sym
from nnforge.ir.symbolic import DimError


# --- parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["batch", "12*batch", "seq + 1", "batch*seq - 3", "(a + b)//2", "a % 7",
                                  "max(a, b)", "min(a, 3, b)", "-a + 2*b", "_x1 * y_2"])
def test_valid_expressions_parse(text):
    sym.check(text)                       # does not raise
    assert sym._parse(text) is sym._parse(text)        # parsed once, then cached


@pytest.mark.parametrize("text, why", [
    ("__import__('os')", "call of a non-whitelisted function"),
    ("__import__('os').system('true')", "attribute access and calls"),
    ("os.getcwd", "attribute access"),
    ("a.b", "attribute access"),
    ("a[0]", "subscript"),
    ("2**3", "power"),
    ("a / 2", "true division"),
    ("1.5 * a", "float constant"),
    ("'a'", "string constant"),
    ("True", "bool constant"),
    ("lambda: 1", "lambda"),
    ("max(a, key=b)", "keyword argument"),
    ("max()", "call without arguments"),
    ("abs(a)", "function outside max/min"),
    ("a if b else c", "conditional"),
    ("[a, b]", "list"),
    ("a < b", "comparison"),
    ("a & b", "bit operation"),
    ("+a", "unary plus is not in the grammar"),
    ("max", "a function name used as a symbol"),
])
def test_unsafe_or_unsupported_expressions_refused(text, why):
    with pytest.raises(DimError, match="unsupported syntax") as info:
        sym.check(text)
    assert repr(text) in str(info.value), f"the error should quote the expression ({why})"


def test_refused_expression_is_never_evaluated(monkeypatch):
    """A hostile dimension must not reach Python's evaluator: __import__ is never called."""
    import builtins
    called = []
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda *a, **k: (called.append(a[0]), real(*a, **k))[1])
    for text in ["__import__('os')", "__import__('os').system('echo hacked')"]:
        with pytest.raises(DimError):
            sym.simplify(text)
        with pytest.raises(DimError):
            sym.evaluate(text, {})
    assert "os" not in called


@pytest.mark.parametrize("text", ["a +", "(a", "a b", "", "1 +* 2"])
def test_malformed_expressions_refused(text):
    with pytest.raises(DimError, match="malformed dimension expression"):
        sym.check(text)


def test_overlong_expression_refused():
    text = " + ".join(["a"] * 200)
    assert len(text) > sym.MAX_EXPR_LEN
    with pytest.raises(DimError, match="longer than 512"):
        sym.check(text)


@pytest.mark.parametrize("bad", [-1, 1.5, None, True, [2], b"a"])
def test_check_rejects_non_dims(bad):
    with pytest.raises(DimError):
        sym.check(bad)


def test_check_accepts_ints():
    for d in (0, 1, 384):
        sym.check(d)


# --- simplify / equal --------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("seq*batch + 0", "batch*seq"),
    ("batch", "batch"),
    ("2 + 3", 5),
    ("a - a", 0),
    ("a*0 + 7", 7),
    ("(a + 1)*(a - 1)", "a*a - 1"),
    ("2*a + 3*a", "5*a"),
    ("(4*a + 8)//4", "a + 2"),
    ("(4*a + 8) % 4", 0),
    ("(384*b*s)//(32*b*s)", 12),
    ("(a*b + a)//a", "b + 1"),
    ("a//1", "a"),
    ("7//2", 3),
    ("-7//2", -4),
    ("7 % 3", 1),
    ("max(3, 5)", 5),
    ("min(3, 5)", 3),
    ("max(b, a)", "max(a, b)"),
    ("1 - a", "-a + 1"),
    # symbols are sizes of at least 1, so an argument another one bounds drops out
    ("max(max(batch*seq, seq), seq)", "batch*seq"),
    ("min(batch*seq, seq)", "seq"),
    ("max(a, 1)", "a"),
    ("min(a, 1)", 1),
    ("max(seq + 1, seq)", "seq + 1"),
    ("max(a*a, a)", "a*a"),
    ("max(a, a)", "a"),
    ("max(a, 3)", "max(3, a)"),            # a may be below 3
    ("max(a, b)", "max(a, b)"),
    ("max(a//2, a)", "max((a//2), a)"),    # opaque atoms prove nothing
])
def test_simplify(text, want):
    assert sym.simplify(text) == want


def test_simplify_ints_pass_through():
    assert sym.simplify(12) == 12


def test_simplify_keeps_non_polynomial_parts_opaque():
    s = sym.simplify("(a + 1)//2")
    assert isinstance(s, str) and "//" in s
    assert sym.evaluate(s, {"a": 5}) == 3


def test_simplify_is_idempotent():
    for text in ["seq*batch + 0", "(a + 1)*(a - 1)", "(2*a + 1)//2 + max(a, b)*3", "-a + b % 3", "1 - a"]:
        once = sym.simplify(text)
        assert sym.simplify(once) == once, text


def test_simplify_division_by_zero():
    with pytest.raises(DimError, match="division by zero"):
        sym.simplify("a // 0")
    with pytest.raises(DimError, match="division by zero"):
        sym.simplify("a % (b - b)")


@pytest.mark.parametrize("a, b", [
    ("batch*seq", "seq*batch"),
    ("2*(a + b)", "2*b + 2*a"),
    ("a + a", "2*a"),
    ("(a*12)//12", "a"),
    (6, "2*3"),
    ("max(a, b) + 1", "1 + max(b, a)"),
    ("a*(b + c)", "a*c + a*b"),
])
def test_equal(a, b):
    assert sym.equal(a, b)
    assert sym.equal(b, a)


@pytest.mark.parametrize("a, b", [("a", "b"), ("a + 1", "a"), ("2*a", "a*a"), (3, "a"), ("a//2", "a"),
                                  ("max(a, b)", "a")])
def test_not_equal(a, b):
    assert not sym.equal(a, b)


# --- arithmetic helpers ---------------------------------------------------------------------------
def test_add_sub_mul_floordiv_on_ints_stay_ints():
    assert sym.add(2, 3) == 5 and isinstance(sym.add(2, 3), int)
    assert sym.sub(7, 3) == 4
    assert sym.mul(4, 6) == 24
    assert sym.floordiv(25, 4) == 6
    assert sym.minimum(3, 9) == 3


def test_add_sub_mul_floordiv_symbolic():
    assert sym.add("a", 0) == "a"
    assert sym.add("a", "a") == "2*a"
    assert sym.add("a + b", "a - b") == "2*a"          # operands are grouped before combining
    assert sym.sub("a + 1", 1) == "a"
    assert sym.sub("a", "a") == 0
    assert sym.mul("a", 1) == "a"
    assert sym.mul("a + 1", 2) == "2*a + 2"            # (a + 1)*2, not a + 1*2
    assert sym.mul(0, "a") == 0
    assert sym.floordiv("12*b", 4) == "3*b"
    assert sym.floordiv("a + 1", 1) == "a + 1"
    assert sym.floordiv("a*b", "b") == "a"
    assert sym.minimum("a", "a") == "a"
    assert sym.evaluate(sym.minimum("a", 4), {"a": 9}) == 4


def test_floordiv_by_zero_is_a_dim_error():
    """BUG: symbolic.floordiv(a, 0) with two ints raises a bare ZeroDivisionError (the int fast
    path does ``a // b``), while the symbolic path raises DimError. Shape inference only turns
    DimError/ValueError/TypeError into errors naming the node, so e.g. a conv with stride 0 escapes
    as an anonymous ZeroDivisionError (see tests/ir/test_ops.py::test_conv_stride_zero_names_node)."""
    with pytest.raises(DimError):
        sym.floordiv("a", 0)
    with pytest.raises(DimError):
        sym.floordiv(4, 0)


def test_prod():
    assert sym.prod([]) == 1
    assert sym.prod([2, 3, 4]) == 24
    assert sym.prod(["a", 2, "b"]) == "2*a*b"
    assert sym.prod(["a", 0]) == 0
    assert sym.equal(sym.prod(("batch", "seq", 384)), "384*seq*batch")
    assert sym.prod(x for x in [3, "n"]) == "3*n"       # any iterable


def test_symbols_and_is_symbol():
    assert sym.symbols(4) == set()
    assert sym.symbols("batch") == {"batch"}
    assert sym.symbols("max(a, b)*c + 2//d") == {"a", "b", "c", "d"}
    assert "max" not in sym.symbols("max(a, 1)")
    assert sym.is_symbol("batch") and sym.is_symbol("_n1")
    assert not sym.is_symbol("2*b")
    assert not sym.is_symbol("a + 1")
    assert not sym.is_symbol(3)
    assert not sym.is_symbol("1a")


# --- evaluate / fold --------------------------------------------------------------------------------
def test_evaluate():
    assert sym.evaluate("12*batch", {"batch": 2}) == 24
    assert sym.evaluate("(a + b) // 2 - a % 3", {"a": 7, "b": 4}) == 5 - 1
    assert sym.evaluate("max(a, b, 3)", {"a": 1, "b": 2}) == 3
    assert sym.evaluate("-a + 10", {"a": 3}) == 7
    assert sym.evaluate(5, {}) == 5


def test_evaluate_errors_name_the_problem():
    with pytest.raises(DimError, match="symbol 'seq' of dimension 'batch\\*seq' is not bound"):
        sym.evaluate("batch*seq", {"batch": 2})
    with pytest.raises(DimError, match="division by zero"):
        sym.evaluate("a // b", {"a": 4, "b": 0})
    with pytest.raises(DimError, match="division by zero"):
        sym.evaluate("a % b", {"a": 4, "b": 0})


def test_fold_with_custom_callbacks_renders_expression():
    """fold visits the tree bottom-up with the given callbacks (what backends use to emit code)."""
    out = sym.fold("max(a, 2) * (b + 1) - c // 4 + -d",
                   const=lambda v: f"C{v}", symbol=lambda n: f"S[{n}]",
                   binop=lambda op, x, y: f"{op}({x},{y})", call=lambda f, args: f"{f}[{','.join(args)}]",
                   neg=lambda x: f"neg({x})")
    assert out == "add(sub(mul(max[S[a],C2],add(S[b],C1)),floordiv(S[c],C4)),neg(S[d]))"


def test_fold_int_and_counts_nodes():
    assert sym.fold(7, const=lambda v: v * 10, symbol=None, binop=None, call=None, neg=None) == 70
    seen = []
    sym.fold("a + b*c", const=int, symbol=lambda n: seen.append(n) or 1,
             binop=lambda op, x, y: seen.append(op) or 1, call=None, neg=None)
    assert sorted(seen) == ["a", "add", "b", "c", "mul"]


def test_fold_is_iterative_on_deep_expressions():
    """Traversals are iterative, never recursive: a long chain folds without RecursionError."""
    text = "+".join(["a"] * 250)            # ast nests 249 BinOps deep
    assert sym.fold(text, const=int, symbol=lambda n: 2, binop=lambda op, x, y: x + y, call=None,
                    neg=None) == 500


def _random_expr(rnd: random.Random, depth: int) -> str:
    if depth == 0 or rnd.random() < 0.25:
        return rnd.choice(["a", "b", "c", str(rnd.randint(0, 9))])
    kind = rnd.random()
    left, right = _random_expr(rnd, depth - 1), _random_expr(rnd, depth - 1)
    if kind < 0.3:
        return f"({left} + {right})"
    if kind < 0.45:
        return f"({left} - {right})"
    if kind < 0.7:
        return f"({left} * {right})"
    if kind < 0.8:
        return f"({left} // {rnd.randint(1, 5)})"
    if kind < 0.85:
        return f"({left} % {rnd.randint(1, 5)})"
    if kind < 0.95:
        return f"max({left}, {right})"
    return f"min({left}, {right})"


def test_simplify_preserves_value_property():
    rnd = random.Random(1234)
    for _ in range(300):
        text = _random_expr(rnd, 4)
        simple = sym.simplify(text)
        for _ in range(4):
            env = {"a": rnd.randint(1, 40), "b": rnd.randint(1, 40), "c": rnd.randint(1, 40)}
            assert sym.evaluate(simple, env) == sym.evaluate(text, env), (text, simple, env)
        if not (isinstance(simple, int) and simple < 0):        # a negative constant is no dim to compare
            assert sym.equal(text, simple)


@pytest.mark.parametrize("a, b", [
    ("((h - 1)//2)//2 + 1", "(h - 1)//4 + 1"),        # two stride-2 convs, and torch's one division
    ("(h - 4)//4 + 1", "h//4"),                       # a 4x4 stride-4 stem, two ways
    ("(2*h + 1)//2", "h"),
    ("((h - 1)//2 + 3)//3", "(h + 5)//6"),
    ("(w*h - 1)//2//2", "(h*w + 3)//4 - 1"),
])
def test_floor_divisions_by_constants_have_one_form(a, b):
    assert sym.equal(a, b)
    for h in range(1, 30):
        assert sym.evaluate(sym.simplify(a), {"h": h, "w": 3}) == sym.evaluate(a, {"h": h, "w": 3})


def test_floor_division_keeps_what_does_not_divide():
    assert not sym.equal("(h + 1)//2", "h//2")
    assert sym.simplify("(2*h + 3)//2") == "h + 1"


def test_conditions_on_sizes():
    assert sym.holds("batch*seq > 5", {"batch": 2, "seq": 3})
    assert not sym.holds("seq <= 64", {"seq": 65})
    assert sym.holds("a == 1 or a == b", {"a": 1, "b": 7}) and not sym.holds("a == 1 or a == b", {"a": 2, "b": 7})
    assert sym.condition_symbols("a == 1 or c*a == b") == {"a", "b", "c"}
    with pytest.raises(DimError, match="not a condition on sizes"):
        sym.holds("seq", {"seq": 1})

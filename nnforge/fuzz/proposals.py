"""How the generator proposes a node: inputs, attributes, and guards for restricted domains.

Three tables, each a dict of small functions (like the backends' rule tables):

- ``PROPOSERS[op]`` (filled by :mod:`.layers`): inputs and attributes together, for ops whose inputs
  must be shaped to each other (a linear's weight to its input, a concat's operands along one axis);
- ``FAMILY_INPUTS[family]``: inputs for every other op of a registry family (unary, binary, ...),
  its attributes then filled one by one from ``ATTR_HINTS[(op, name)]``, ``ATTR_HINTS[name]``, or
  a random value of the attribute's kind (:func:`generic_attr`);
- ``GUARDS[op]``: a rewrite of the inputs that keeps them inside the op's domain for any values
  (``log(x)`` reads ``clamp(abs(x), min=c)``).

Proposals may be invalid: the op's ``infer`` (through ``GraphGenerator.add``) has the last word.
An op that is new to the registry needs no entry here to be fuzzed when its family's inputs and
its attributes' kinds suffice.
"""
from __future__ import annotations

import math

from ..ir import Value, symbolic as sym
from ..ir.ops import OPS
from ..ir.ops.registry import REQUIRED
from ..registry import Registry
from .input_dist import InputDist

PROPOSERS = Registry("fuzz proposer")     # filled by .layers, which the generator imports
DEFAULT = object()      # a hint's answer "leave this attribute at its default"

# Relative frequency of each op (1.0 when absent); layers with weights come often so the
# compression passes have something to compress.
OP_WEIGHTS = {"linear": 5.0, "matmul": 2.0, "conv": 1.5, "embedding": 1.0, "layer_norm": 1.5, "softmax": 1.5,
              "add": 2.0, "mul": 1.5, "reshape": 2.0, "permute": 1.5, "slice": 1.5, "concat": 1.5, "gelu": 1.5,
              "silu": 1.0, "relu": 1.5, "full": 0.3, "arange": 0.3, "fake_quant": 0.5, "dynamic_quant": 0.4, "not": 0.5, "and": 0.5,
              "or": 0.5, "xor": 0.5, "reduce_any": 0.5, "reduce_all": 0.5}


def is_float(v: Value) -> bool:
    return v.dtype.is_float


def static_axes(v: Value, minimum: int = 1) -> list[int]:
    return [i for i, d in enumerate(v.shape) if isinstance(d, int) and d >= minimum]


def broadcastable(a, b) -> bool:
    """Shapes that broadcast without a symbolic max(): each aligned pair equal, or one of them 1."""
    for x, y in zip(reversed(a), reversed(b)):
        if not (sym.equal(x, y) or x == 1 or y == 1):
            return False
    return True


def broadcast_variant(gen, shape) -> list:
    """A shape that broadcasts against ``shape``: some leading dims dropped, some dims set to 1,
    now and then an extra leading dim or a scalar."""
    rng = gen.rng
    r = rng.random()
    if r < 0.08:
        return []
    out = list(shape[rng.choice([0, 0, 0, 1, len(shape)]) if shape else 0:])
    out = [1 if rng.random() < 0.3 else d for d in out]
    if r > 0.9:
        out = [rng.choice([1, 2])] + list(shape)
    return out


def dist_for(fan_in) -> InputDist:
    """Weights that keep activations O(1): uniform with variance about 1/fan_in."""
    a = 1.7 / math.sqrt(max(int(fan_in) if isinstance(fan_in, int) else 4, 1))
    return InputDist("float", -a, a)


def weight_leaf(gen, shape, fan_in, name="w", weight: bool | None = True):
    return gen.leaf(shape, gen.fdt, weight=weight, dist=dist_for(fan_in), name=name)


# --- guards ---------------------------------------------------------------------------------------
def positive(gen, x: Value, lo: float, hi=None) -> Value | None:
    """clamp(abs(x), lo, hi): positive whatever x holds."""
    a = gen.add("abs", [x], {})
    return None if a is None else gen.add("clamp", [a], {"min": lo, "max": hi})


def nonzero(gen, x: Value) -> Value | None:
    lo = 1 if not x.dtype.is_float else gen.rng.choice([0.25, 0.5, 1.0])
    y = positive(gen, x, lo)
    if y is not None and x.dtype.is_float and gen.rng.random() < 0.3:
        y = gen.add("neg", [y], {})
    return y


def _guard_positive(gen, ins):
    return [positive(gen, ins[0], gen.rng.choice([0.1, 0.25, 0.5, 1.0]))]


GUARDS = {
    "log": _guard_positive, "sqrt": _guard_positive, "rsqrt": _guard_positive,
    "reciprocal": lambda gen, ins: [nonzero(gen, ins[0])],
    "div": lambda gen, ins: [ins[0], nonzero(gen, ins[1])],
    # integer powers take no negative exponents (torch refuses them)
    "pow": lambda gen, ins: [positive(gen, ins[0], 0.5, 3.0),
                             gen.add("clamp", [ins[1]], {"min": -2.0 if ins[1].dtype.is_float else 0, "max": 2.0})],
    "exp": lambda gen, ins: [gen.add("clamp", [ins[0]], {"min": -16.0, "max": 8.0})],
}


# --- attributes -----------------------------------------------------------------------------------
def generic_attr(gen, spec):
    """A random value of an attribute's kind (its default most of the time, when it has one)."""
    rng = gen.rng
    if spec.choices:
        return rng.choice(spec.choices)
    if spec.default is not REQUIRED and rng.random() < 0.7:
        return DEFAULT
    k = spec.kind
    if k == "int":
        return rng.randint(-2, 4)
    if k == "float":
        return rng.uniform(-1, 1)
    if k == "bool":
        return rng.random() < 0.5
    if k == "str":
        return DEFAULT
    if k == "scalar":
        return round(rng.uniform(-2, 2), 3)
    if k == "ints":
        return [rng.randint(0, 3) for _ in range(rng.randint(1, 3))]
    if k == "floats":
        return [rng.uniform(-1, 1) for _ in range(rng.randint(1, 3))]
    if k == "dims":
        return gen.random_shape()
    if k == "dim":
        return rng.randint(1, 8)
    return rng.choice(["float32", "int64", "int32", "bool"])     # dtype


def _axis(gen, ins, attrs):
    r = ins[0].type.rank
    return gen.rng.randrange(-r, r) if r else DEFAULT


def _axes(gen, ins, attrs):
    r = ins[0].type.rank
    if not r:
        return None
    axes = gen.rng.sample(range(r), gen.rng.randint(1, r))
    return [a - r if gen.rng.random() < 0.3 else a for a in axes]


def _perm(gen, ins, attrs):
    perm = list(range(ins[0].type.rank))
    gen.rng.shuffle(perm)
    return perm


def _factor(gen, n: int, parts: int) -> list[int]:
    """n split into ``parts`` random factors."""
    primes, p, m = [], 2, n
    while m > 1 and p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    out = [1] * parts
    for q in primes:
        out[gen.rng.randrange(parts)] *= q
    return out


def _reshape_shape(gen, ins, attrs):
    shape = list(ins[0].shape)
    lead = []
    if shape and not isinstance(shape[0], int):
        lead, shape = [shape[0]], shape[1:]
    if any(not isinstance(d, int) for d in shape):
        return None
    n = math.prod(shape)
    out = lead + _factor(gen, n, gen.rng.randint(1, 4))
    rng = gen.rng
    if lead and rng.random() < 0.1 and len(out) > 1:
        out = [sym.mul(out[0], out[1])] + out[2:]          # fold the symbol into a product
    if rng.random() < 0.3 and out:
        out[rng.randrange(len(out))] = -1
    return out


def _expand_shape(gen, ins, attrs):
    shape = [gen.rng.choice([1, 2, 3]) if d == 1 else d for d in ins[0].shape]
    if gen.rng.random() < 0.3:
        shape = [gen.rng.choice([1, 2, 3])] + shape
    return shape


def _slice_axis(gen, ins, attrs):
    axes = static_axes(ins[0], 1)
    if not axes:
        return None
    a = gen.rng.choice(axes)
    return a - ins[0].type.rank if gen.rng.random() < 0.3 else a


def _slice_start(gen, ins, attrs):
    n = ins[0].shape[attrs["axis"]]
    return gen.rng.randint(0, n - 1)


def _slice_end(gen, ins, attrs):
    n = ins[0].shape[attrs["axis"]]
    return gen.rng.randint(attrs["start"] + 1, n)


def _pads(gen, ins, attrs):
    r = ins[0].type.rank
    return [gen.rng.choice([0, 0, 0, 1, 2]) if isinstance(ins[0].shape[i % r], int) or gen.rng.random() < 0.1 else 0
            for i in range(2 * r)]


def _scalar_for(gen, ins, lo=-2.0, hi=2.0):
    x = ins[0]
    if x.dtype.name == "bool":
        return gen.rng.random() < 0.5
    if not x.dtype.is_float:
        return gen.rng.randint(int(lo), int(hi))
    return round(gen.rng.uniform(lo, hi), 3)


def _clamp_min(gen, ins, attrs):
    return None if gen.rng.random() < 0.3 else _scalar_for(gen, ins, -2, 0)


def _clamp_max(gen, ins, attrs):
    return None if gen.rng.random() < 0.3 else _scalar_for(gen, ins, 0, 2)


def _topk_k(gen, ins, attrs):
    """k no larger than the axis at any size: up to a fixed axis's size, else 1 or the whole axis
    (its symbol: an argsort). Picks the axis too, which the op lists after k."""
    r = ins[0].type.rank
    if not r:
        return DEFAULT
    attrs["axis"] = axis = gen.rng.randrange(r)
    size = ins[0].shape[axis]
    if isinstance(size, int):
        return gen.rng.randint(1, size) if size >= 1 else DEFAULT
    return gen.rng.choice([1, size])


def cast_dtype(gen, ins, attrs):
    return gen.rng.choices(["float32", "int64", "int32", "bool", "float16"], [3, 2, 1, 1, 0.5])[0]


ATTR_HINTS = {
    "axis": _axis, "axes": _axes, "perm": _perm,
    ("reshape", "shape"): _reshape_shape, ("expand", "shape"): _expand_shape,
    ("slice", "axis"): _slice_axis, ("slice", "start"): _slice_start, ("slice", "end"): _slice_end,
    ("slice", "step"): lambda gen, ins, attrs: gen.rng.choice([1, 1, 1, 2, 3]),
    ("pad", "pads"): _pads, ("pad", "value"): lambda gen, ins, attrs: _scalar_for(gen, ins),
    ("clamp", "min"): _clamp_min, ("clamp", "max"): _clamp_max,
    ("cast", "dtype"): cast_dtype, ("topk_indices", "k"): _topk_k,
    "negative_slope": lambda gen, ins, attrs: round(gen.rng.uniform(-1, 1), 3),
    "eps": lambda gen, ins, attrs: gen.rng.choice([DEFAULT, 1e-5, 1e-3]),
}


def fill_attrs(gen, op: str, ins: list, attrs: dict | None = None) -> dict | None:
    attrs = dict(attrs or {})
    for name, spec in OPS[op].attrs.items():
        if name in attrs:
            continue
        hint = ATTR_HINTS.get((op, name)) or ATTR_HINTS.get(name)
        value = hint(gen, ins, attrs) if hint else generic_attr(gen, spec)
        if value is DEFAULT:
            if spec.default is REQUIRED:
                return None
            continue
        if value is None and spec.default is not None:
            return None
        attrs[name] = value
    return attrs


# --- inputs by family -----------------------------------------------------------------------------
def _one(gen, op):
    return [gen.pick()]


def operand_like(gen, a: Value, dtype=None) -> Value | None:
    """A second operand for ``a``: itself, an existing broadcast-compatible value, or a new leaf."""
    rng = gen.rng
    dt = dtype or a.dtype
    r = rng.random()
    if r < 0.1:
        return a
    if r < 0.45:
        b = gen.pick(lambda v: v.dtype == dt and v is not a and broadcastable(v.shape, a.shape))
        if b is not None:
            return b
    dist = None if dt.name != "int64" and dt.name != "int32" else InputDist("int", 1, 6)
    return gen.leaf(broadcast_variant(gen, a.shape), dt.name, dist=dist)


def _binary(gen, op):
    a = gen.pick(lambda v: v.dtype.name != "bool")
    if a is None:
        return None
    b = operand_like(gen, a)
    return [b, a] if gen.rng.random() < 0.3 else [a, b]


def bool_operand(gen) -> Value | None:
    """An existing bool value, else now and then a new bool input: comparisons alone make too few
    for the ops that take only bools."""
    x = gen.pick(lambda v: v.dtype.name == "bool")
    if x is None and gen.rng.random() < 0.5:
        x = gen.leaf(gen.random_shape(), "bool", weight=False, name="mask")
    return x


def _logic(gen, op):
    a = bool_operand(gen)
    return None if a is None else [a, operand_like(gen, a)]


def _select(gen, op):
    cond = gen.pick(lambda v: v.dtype.name == "bool")
    if cond is None:
        return None
    a = gen.pick(lambda v: v.dtype.name != "bool" and broadcastable(v.shape, cond.shape))
    return None if a is None else [cond, a, operand_like(gen, a)]


def _float_one(gen, op):
    x = gen.pick(is_float)
    return None if x is None else [x]


FAMILY_INPUTS = {"unary": _one, "binary": _binary, "compare": _binary, "logic": _logic, "select": _select,
                 "reduce": _one, "shape": _one, "nn": _float_one, "quant": _float_one}


def propose(gen, op: str):
    """(inputs, attrs) for a candidate ``op`` node, or None."""
    if op in PROPOSERS:
        return PROPOSERS[op](gen)
    family = FAMILY_INPUTS.get(OPS[op].family, _one)
    for _ in range(3):           # a few draws of inputs the op's dtype rule accepts
        ins = family(gen, op)
        if ins is None or any(v is None for v in ins):
            return None
        if op in GUARDS:
            ins = GUARDS[op](gen, ins)
            if any(v is None for v in ins):
                return None
        attrs = fill_attrs(gen, op, ins)
        if attrs is None:
            continue
        try:
            OPS[op].infer_types([v.type for v in ins], OPS[op].check_attrs(attrs, op), op)
        except Exception:
            continue
        return ins, attrs
    return None

"""Random valid graphs from the op registry's schemas (NNSmith-style type-directed insertion).

A graph grows one node at a time. Each step picks an op from the registry, asks
:mod:`.proposals` for inputs (existing values, or new graph inputs and weights shaped to fit)
and attributes (hints by op and attribute name, else a random value of the attribute's kind), and
keeps the node only if

1. the op's own ``infer`` accepts it (the schema is the only source of truth on validity);
2. its reference kernel runs on the sample inputs, in float32 and float64, and returns what
   ``infer`` said (dtype and shape: a disagreement is recorded as an IR finding);
3. the result is finite, of moderate magnitude, and stable (:mod:`.stability`): fp32 close to
   fp64, no discontinuous op on the edge of a jump.

Ops with a restricted domain (log, sqrt, div, pow, ...) get a guard in front of the restricted
input (``clamp(abs(x), min=c)``...), built the same way, so the graph stays valid whatever the
compression passes later do to the weights.

    >>> case = GraphGenerator(seed=7).generate()
    >>> case.graph, case.inputs          # a verified Graph and NaN-free sample inputs
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from .. import ir
from ..errors import UsageError
from ..ir import Dense, Graph, GraphError, Value, symbolic as sym
from ..ir.ops import OPS, RunContext
from . import layers  # noqa: F401  (registers the per-op proposers)
from . import stability
from .input_dist import SYMBOL, InputDist
from .proposals import OP_WEIGHTS, propose
from .reduce import with_outputs

MAX_ABS = 1e4          # values beyond this magnitude are rejected (float16 casts need < 65504)
MAX_ABS_F16 = 200.0    # ... in float16 graphs, where ops' own sums of squares must stay finite
F16_PARTIAL = 1.5e4    # bound on any partial sum or product a float16 reduction may form
MIN_NONZERO = 1e-20    # ... and nonzero values below it (backends may flush denormals)


@dataclass
class Case:
    """A generated graph with its sample inputs, the sizes of its symbols and how to draw more."""
    graph: Graph
    seed: int
    env: dict[str, int]
    dists: dict[str, InputDist]
    inputs: list[torch.Tensor]
    ir_findings: list[str] = field(default_factory=list)

    def sample_inputs(self, seed: int, env: dict[str, int] | None = None) -> list[torch.Tensor]:
        """Fresh inputs from the same distributions (at other symbol sizes with ``env``)."""
        gen = torch.Generator().manual_seed(seed)
        env = env or self.env
        return [self.dists[v.name].sample(v.type.concrete(env), v.dtype.torch_dtype, gen) for v in self.graph.inputs]

    @property
    def dynamic(self) -> bool:
        return bool(self.graph.symbols())


class GraphGenerator:
    """One random graph per ``generate()``; everything it draws comes from ``seed``."""

    def __init__(self, seed: int, *, max_nodes: int = 12, ops: list[str] | None = None, dynamic: float = 0.3,
                 float16: float = 0.1, max_inputs: int = 4):
        self.seed = seed
        self.rng = random.Random(seed)
        self.tgen = torch.Generator().manual_seed(seed)
        self.max_nodes = max_nodes
        self.max_inputs = max_inputs
        self.dynamic_p = dynamic
        self.float16_p = float16
        names = ops or [op for op in OPS if OP_WEIGHTS.get(op, 1.0) > 0]
        unknown = OPS.missing(names)
        if unknown:
            raise UsageError(f"unknown op(s) {', '.join(unknown)}; the registry has {', '.join(sorted(OPS))}")
        self.ops = names
        self.op_weights = [OP_WEIGHTS.get(op, 1.0) for op in names]

    # --- state of the graph being built ---------------------------------------------------------
    def _reset(self):
        self.g = Graph(f"fuzz_{self.seed}")
        self.env: dict[str, int] = {}
        self.dists: dict[str, InputDist] = {}
        self.c32: dict[Value, torch.Tensor] = {}
        self.c64: dict[Value, torch.Tensor] = {}
        self.exact: set[Value] = set()
        self.ibound: dict[Value, tuple[int, int]] = {}     # int values: lo <= v < hi, structurally
        self.ir_findings: list[str] = []
        self.rejections: dict[str, int] = {}
        self.fdt = "float32"

    def generate(self) -> Case:
        self._reset()
        rng = self.rng
        if rng.random() < self.dynamic_p:
            self.env[SYMBOL] = rng.choice([1, 2, 3, 4])
        self.fdt = "float16" if rng.random() < self.float16_p else "float32"     # the graph's float type
        for i in range(rng.choice([1, 1, 2])):
            shape = self.random_shape()
            if self.env and i == 0:
                shape[0] = SYMBOL         # the symbol is bound by the first input
            self.leaf(shape, self.fdt, weight=False)
        if rng.random() < 0.7:          # most graphs start with a layer the compression passes take
            self._insert("linear")
        target = rng.randint(2, self.max_nodes)
        attempts = 0
        while len(self.g.nodes) < target and attempts < 40 * self.max_nodes:
            attempts += 1
            self._insert(rng.choices(self.ops, self.op_weights)[0])
        self._set_outputs()
        graph, inputs = self._finish()
        return Case(graph, self.seed, dict(self.env), {v.name: self.dists[v.name] for v in graph.inputs}, inputs,
                    self.ir_findings)

    def _insert(self, op: str) -> Value | None:
        try:
            proposal = propose(self, op)
        except (GraphError, ValueError, IndexError, ZeroDivisionError, sym.DimError):
            proposal = None
        if proposal is None:
            self.rejections[op] = self.rejections.get(op, 0) + 1
            return None
        inputs, attrs = proposal
        return self.add(op, inputs, attrs)

    def _set_outputs(self):
        uses = self.g.uses()
        nodes_out = [o for n in self.g.nodes for o in n.outputs]
        sinks = [v for v in nodes_out if v not in uses]
        rng = self.rng
        outs = sinks[-3:] if sinks else []
        if nodes_out and (not outs or rng.random() < 0.2):
            outs.append(rng.choice(nodes_out))          # an intermediate that is also read
        if not outs or rng.random() < 0.03:
            outs.append(rng.choice(self.g.inputs))      # an input passed through
        if rng.random() < 0.03:
            outs.append(outs[0])                        # the same value twice
        self.g.set_outputs(outs)

    def _finish(self) -> tuple[Graph, list[torch.Tensor]]:
        """The graph without dead nodes, unused weights and unused inputs, and its sample inputs."""
        graph = with_outputs(self.g, self.g.outputs)
        if not graph.symbols():
            self.env = {}                               # the symbolic inputs all went unused
        by_name = {v.name: v for v in self.g.inputs}
        return graph, [self.c32[by_name[v.name]].to(v.dtype.torch_dtype) for v in graph.inputs]

    # --- what proposals use ---------------------------------------------------------------------
    def random_shape(self, rank: int | None = None, *, symbolic: bool = True) -> list:
        rng = self.rng
        rank = rng.choice([1, 2, 2, 3, 3, 4]) if rank is None else rank
        dims = [rng.choice([1, 2, 3, 4, 4, 5, 6, 8, 8, 16]) for _ in range(rank)]
        while math.prod(dims) > 1024:
            dims[rng.randrange(rank)] = rng.choice([1, 2, 3, 4])
        if symbolic and self.env and rank and rng.random() < 0.8:
            dims[0] = SYMBOL
        return dims

    def concrete(self, shape) -> tuple[int, ...]:
        return tuple(sym.evaluate(d, self.env) if not isinstance(d, int) else d for d in shape)

    def leaf(self, shape, dtype: str = "float32", *, weight: bool | None = None, dist: InputDist | None = None,
             name: str | None = None) -> Value | None:
        """A new graph input (or, with ``weight``, a dense weight; symbolic dims become 1) holding
        values drawn from ``dist`` (floats in [-2, 2) by default)."""
        rng = self.rng
        if weight is None:
            weight = rng.random() < 0.6 or len(self.g.inputs) >= self.max_inputs
        if not weight and len(self.g.inputs) >= self.max_inputs + 2:
            return None
        dt = ir.dtype(dtype)
        if dist is None:
            dist = (InputDist("float", *rng.choice([(-2, 2), (-2, 2), (-1, 1), (0.5, 3), (-8, 8)])) if dt.is_float
                    else InputDist("bool") if dt.name == "bool" else InputDist("int", 0, 8))
        if weight:
            shape = [d if isinstance(d, int) else 1 for d in shape]
        value = dist.sample(self.concrete(shape), dt.torch_dtype, self.tgen)
        if weight:
            v = self.g.add_weight(self.g.fresh_name(name or "w"), Dense(value))
        else:
            v = self.g.add_input(self.g.fresh_name(name or "x"), ir.tensor(dt, *shape))
            self.dists[v.name] = dist
        # concrete values as the interpreter holds them: every float type computed in fp32 (and fp64)
        self._record(v, value.float() if value.is_floating_point() else value,
                     value.double() if value.is_floating_point() else value, exact=True)
        if dist.kind == "int":
            self.ibound[v] = (int(dist.lo), int(dist.hi))
        return v

    def values(self, pred=None) -> list[Value]:
        return [v for v in self.c32 if pred is None or pred(v)]

    def pick(self, pred=None) -> Value | None:
        """A random existing value satisfying ``pred``; node outputs weigh most, weights least."""
        cands = self.values(pred)
        if not cands:
            return None
        weights = [0.3 if v.is_weight else 1.0 if v.producer is None else 3.0 for v in cands]
        return self.rng.choices(cands, weights)[0]

    def add(self, op: str, inputs: list, attrs: dict) -> Value | None:
        """Validate a candidate node (schema, reference kernel, values) and append it."""
        opdef = OPS[op]
        where = f"candidate {op}"
        try:
            attrs = opdef.check_attrs(attrs, where)
            types = opdef.infer_types([None if v is None else v.type for v in inputs], attrs, where)
        except GraphError:
            self.rejections[op] = self.rejections.get(op, 0) + 1
            return None
        if len(types) != 1 or any(not isinstance(d, int) and sym.symbols(d) - set(self.env) for d in types[0].shape):
            return None
        if any(not isinstance(d, int) and not sym.is_symbol(d) for d in types[0].shape) and self.rng.random() < 0.7:
            return None                # expression dims (2*batch) are allowed, but rarely kept
        want = self.concrete(types[0].shape)
        if math.prod(want) > 1 << 14 or 0 in want:
            return None
        args32 = [None if v is None else self.c32[v] for v in inputs]
        args64 = [None if v is None else self.c64[v] for v in inputs]
        try:
            out32 = opdef.run(RunContext(dict(self.env), torch.float32), args32, attrs)[0]
            out64 = opdef.run(RunContext(dict(self.env), torch.float64), args64, attrs)[0]
        except Exception as e:      # infer accepted what the kernel cannot run: the IR disagrees with itself
            self.ir_findings.append(f"{op} {attrs} on {[str(v.type) if v else None for v in inputs]}: "
                                    f"infer accepts, reference kernel raises {type(e).__name__}: {e}")
            return None
        expect_dt = torch.float32 if types[0].dtype.is_float else types[0].dtype.torch_dtype
        if tuple(out32.shape) != want or out32.dtype != expect_dt:
            self.ir_findings.append(f"{op} {attrs} on {[str(v.type) if v else None for v in inputs]}: infer says "
                                    f"{types[0]}, the reference kernel returns {out32.dtype} {list(out32.shape)}")
            return None
        if not self._acceptable(op, attrs, inputs, args32, out32, out64, types[0].dtype):
            self.rejections[op] = self.rejections.get(op, 0) + 1
            return None
        node = self.g.add_node(op, inputs, attrs)
        v = node.outputs[0]
        self._record(v, out32, out64, exact=stability.node_is_exact(node, [u is None or u in self.exact for u in inputs]))
        if not types[0].dtype.is_float and types[0].dtype.name != "bool":
            self.ibound[v] = self._int_bound(op, attrs, inputs, out32)
        return v

    # --- checks ---------------------------------------------------------------------------------
    def _acceptable(self, op, attrs, inputs, args32, out32, out64, out_dtype) -> bool:
        if out32.is_floating_point():
            if not bool(torch.isfinite(out32).all()) or not bool(torch.isfinite(out64).all()):
                return False
            mag = out32.abs()
            limit = MAX_ABS_F16 if out_dtype.name in ("float16", "bfloat16") else MAX_ABS
            if bool((mag > limit).any()) or bool(((mag < MIN_NONZERO) & (mag > 0)).any()):
                return False
            m = stability.compare([out32], [out64])
            if 1.0 - m["cosine_min"] > stability.PRECISION / 10:
                return False
            if out_dtype.name in ("float16", "bfloat16") and not _f16_partials_ok(op, attrs, args32):
                return False
        elif not torch.equal(out32, out64.to(out32.dtype)):
            return False
        if op in stability.DISCONTINUOUS and not all(v is None or v in self.exact for v in inputs):
            if stability.discontinuity_problem(op, attrs, args32, [v.dtype.name if v is not None else "" for v in inputs]):
                return False
        return True

    def _int_bound(self, op, attrs, inputs, out32) -> tuple[int, int]:
        """Structural bounds of an integer value, for reuse as indices: argmax indexes its axis,
        data movement keeps its input's bounds; anything else is unbounded."""
        if op == "argmax":
            x = inputs[0]
            n = x.shape[attrs["axis"] % x.type.rank] if x.type.rank else 1
            if isinstance(n, int):
                return 0, n
        moved = [v for v in inputs[:1] if v is not None] if op != "concat" else inputs
        if op in ("reshape", "permute", "expand", "slice", "concat") and all(v in self.ibound for v in moved):
            bounds = [self.ibound[v] for v in moved]
            return min(b[0] for b in bounds), max(b[1] for b in bounds)
        return (-(1 << 62), 1 << 62)

    def _record(self, v: Value, t32: torch.Tensor, t64: torch.Tensor, *, exact: bool):
        self.c32[v] = t32
        self.c64[v] = t64
        if exact:
            self.exact.add(v)


def _f16_partials_ok(op: str, attrs: dict, args: list) -> bool:
    """Backends may accumulate a float16 reduction in float16, in any order (the interpreter
    computes in fp32): every partial sum, product or sum of squares must stay well inside float16
    whatever the order, bounded by the sum (product) of the magnitudes."""
    if op not in ("reduce_sum", "reduce_mean", "reduce_prod", "cumsum", "layer_norm", "rms_norm"):
        return True
    x = args[0].double().abs()
    if x.dim() == 0:
        return bool((x < F16_PARTIAL).all())
    if op == "layer_norm":
        dims, x = list(range(attrs["axis"] % x.dim(), x.dim())), x * x
    elif op == "rms_norm":
        dims, x = [x.dim() - 1], x * x
    else:
        dims = [a % x.dim() for a in (attrs["axes"] if "axes" in attrs else [attrs["axis"]])]
    if op == "reduce_prod":
        return bool((x.clamp(min=1).log().sum(dims) < math.log(F16_PARTIAL)).all())
    return bool((x.sum(dims) < F16_PARTIAL).all())

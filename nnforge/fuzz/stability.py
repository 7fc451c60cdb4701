"""When a difference between two correct implementations is *not* a bug: the fuzzer's filter.

Backends may reorder float sums (BACKEND_TOLERANCE allows for it), but an op whose output jumps
(floor, a comparison, argmax, a cast to an integer) turns a last-bit difference of its input into
a whole unit of its output. So a case is only held to the tolerance where the reference itself is
stable on the inputs at hand:

- every input of a discontinuous op is either *exact* (computed from graph inputs and dense
  weights by ops that give the same bits in any IEEE implementation: data movement, min/max,
  comparisons, integer arithmetic; see :func:`exact_values`) or at least ``margin`` (relative) away
  from the nearest jump (:func:`margin_problems`);
- the float32 reference agrees with a float64 run of the same graph far more closely than the
  tolerance (:func:`precision_problems`): cancellation or a near-constant row under layer_norm
  amplifies rounding into noise no backend can be expected to reproduce.

The generator applies both to each candidate node (on its sample inputs) and the runner to each
compressed graph before comparing a backend with it.

    >>> problems = check_stable(graph, inputs)      # [] when the case is a fair test
"""
from __future__ import annotations

import torch

from ..ir import Dense, Graph, Interpreter, Node
from ..numerics import compare

# Relative distance to the nearest discontinuity below which an input counts as "on the edge".
MARGIN = 2e-4
MARGIN_F16 = 1e-2                  # float16 values: the interpreter keeps fp32, backends round
# 1 - cosine allowed between the fp32 and fp64 references (the backend tolerance allows 1e-4).
PRECISION = 1e-6

# Ops whose float output has the same bits in every IEEE implementation, given the same inputs.
EXACT_OPS = frozenset({
    "reshape", "permute", "expand", "slice", "concat", "gather", "gather_elements", "index", "pad",
    "neg", "abs", "relu", "maximum", "minimum", "clamp", "where", "reduce_max", "reduce_min", "max_pool",
    "floor", "ceil", "embedding", "cache_update", "full", "arange", "cast", "not", "and", "or", "xor",
    "eq", "ne", "lt", "le", "gt", "ge", "reduce_any", "reduce_all", "argmax",
})
COMPARE_OPS = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})
# Ops whose output jumps as an input crosses a point; the activation quantisers are handled by
# the rounding rule.
DISCONTINUOUS = COMPARE_OPS | {"floor", "ceil", "argmax", "cast"}
ROUNDING_OPS = frozenset({"fake_quant", "dynamic_quant"})


def node_is_exact(node: Node, inputs_exact: list[bool]) -> bool:
    """Whether ``node``'s outputs are bit-identical across implementations given exact inputs."""
    if not all(inputs_exact):
        return False
    out = node.outputs[0].dtype
    if node.op == "cast":
        return out.name not in ("float16", "bfloat16")     # the interpreter does not round to f16
    if node.op in EXACT_OPS:
        return True
    # integer and boolean arithmetic is exact (div is true division: float)
    return not out.is_float and node.op != "div"


def exact_values(graph: Graph) -> set:
    """The values of ``graph`` that every correct backend computes bit for bit."""
    exact = set(graph.inputs) | {v for v in graph.weights.values() if isinstance(v.encoding, Dense)}
    for node in graph.nodes:
        if node_is_exact(node, [v is None or v in exact for v in node.inputs]):
            exact.update(node.outputs)
    return exact


def _edge(rel: torch.Tensor, scale: torch.Tensor, dtype_name: str) -> bool:
    margin = MARGIN_F16 if dtype_name in ("float16", "bfloat16") else MARGIN
    return bool((rel < margin * scale).any())


def discontinuity_problem(op: str, attrs: dict, args: list, dtypes: list[str]) -> str | None:
    """Why the inputs ``args`` sit too close to a jump of ``op``, or None. Callers pass None for
    all of them when every input is exact (nothing can move then)."""
    if op in COMPARE_OPS:
        a, b = args
        if a is None or b is None or not a.is_floating_point():
            return None
        a, b = torch.broadcast_tensors(a.double(), b.double())
        if _edge((a - b).abs(), 1 + a.abs() + b.abs(), dtypes[0]):
            return f"{op}: operands within {MARGIN:g} (relative) of each other"
    elif op in ("floor", "ceil") or (op == "cast" and not attrs["dtype"].is_float):
        x = args[0]
        if x is None or not x.is_floating_point():
            return None
        x = x.double()
        if op == "cast" and attrs["dtype"].name == "bool":
            if _edge(x.abs(), torch.ones_like(x), dtypes[0]) and bool((x != 0).any()):
                return "cast to bool: a value next to zero"
            return None
        if _edge((x - torch.round(x)).abs(), 1 + x.abs(), dtypes[0]):
            return f"{op}: a value next to an integer"
    elif op == "argmax":
        x = args[0]
        if x is None or x.numel() == 0 or not x.is_floating_point():
            return None
        axis = attrs["axis"] % max(x.dim(), 1)
        if x.dim() == 0 or x.shape[axis] < 2:
            return None
        top = torch.topk(x.double(), 2, dim=axis).values
        first, second = top.select(axis, 0), top.select(axis, 1)
        if _edge(first - second, 1 + first.abs(), dtypes[0]):
            return "argmax: the two largest values are (nearly) tied"
    return None


def margin_problems(graph: Graph, values: dict, exact: set | None = None) -> list[str]:
    """Discontinuous nodes whose non-exact inputs sit on an edge; ``values`` maps Value -> tensor
    (as captured from an interpreter run)."""
    exact = exact_values(graph) if exact is None else exact
    out = []
    for node in graph.nodes:
        if node.op not in DISCONTINUOUS:
            continue
        if all(v is None or v in exact for v in node.inputs):
            continue
        args = [None if v is None else values.get(v) for v in node.inputs]
        why = discontinuity_problem(node.op, node.attrs, args, [v.dtype.name if v is not None else "" for v in node.inputs])
        if why:
            out.append(f"node {node.name}: {why}")
    return out


def capture_all(graph: Graph, inputs, dtype=torch.float32) -> tuple[list[torch.Tensor], dict]:
    """(outputs, every value's tensor) of one interpreter run."""
    interp = Interpreter(graph, dtype)
    values: dict = {}

    def keep(node, outs):
        for o, t in zip(node.outputs, outs):
            values[o] = t
    outs = interp.run(*inputs, capture=keep)
    for v, t in zip(graph.inputs, inputs):
        values[v] = torch.as_tensor(t)
    for name in graph.weights:
        values[graph.weights[name]] = interp.weight(name)
    return outs, values


def precision_problems(out32: list[torch.Tensor], out64: list[torch.Tensor]) -> list[str]:
    """Outputs where the fp32 reference is far from fp64 (beyond PRECISION, or a differing
    integer/boolean element), and outputs that are not finite."""
    problems = []
    for i, (a, b) in enumerate(zip(out32, out64)):
        if a.is_floating_point() and not bool(torch.isfinite(a).all()):
            problems.append(f"output {i} is not finite")
            continue
        m = compare([a], [b.to(a.dtype) if not a.is_floating_point() else b])
        if m["exact_match"] is not None and m["exact_match"] < 1.0:
            problems.append(f"output {i}: fp32 and fp64 references differ in {1 - m['exact_match']:.2%} of elements")
        elif 1.0 - m["cosine_min"] > PRECISION:
            problems.append(f"output {i}: fp32 reference is {1 - m['cosine_min']:.2e} (1 - cosine) from fp64")
    return problems


def downstream_of(graph: Graph, ops: set[str]) -> set:
    """Values computed (transitively) from an output of a node whose op is in ``ops``."""
    tainted: set = set()
    for node in graph.nodes:
        if node.op in ops or any(v in tainted for v in node.inputs if v is not None):
            tainted.update(node.outputs)
    return tainted


def check_stable(graph: Graph, inputs) -> list[str]:
    """Every reason why comparing a backend with the reference on ``inputs`` would not be fair
    (empty: a fair test). Graphs that round activations (ROUNDING_OPS) are judged by the rounding
    rule of the bundle check instead of fp64 agreement, and must not feed a rounded value into a
    discontinuous op."""
    out32, values = capture_all(graph, inputs)
    problems = margin_problems(graph, values)
    rounded = downstream_of(graph, ROUNDING_OPS)
    if rounded:
        problems += [f"node {n.name} ({n.op}) reads a value rounded by an activation quantiser" for n in graph.nodes
                     if n.op in DISCONTINUOUS and any(v in rounded for v in n.inputs if v is not None)]
        problems += [f"output {i} is not finite" for i, t in enumerate(out32)
                     if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        return problems
    out64 = Interpreter(graph, torch.float64).run(*inputs)
    return problems + precision_problems(out32, out64)

"""Fused forms the hls backend recognises before lowering: a chain of primitive ops that torch traces
for one hardware function becomes that function's IR op, so it gets one template (one table, one
norm unit) instead of a rounding per primitive.

    rms_norm   x * rsqrt(mean(x^2, last axis) + eps) [* w]      (Llama's RMSNorm, traced)
    gelu tanh  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (GPT-2's NewGELU)
    silu       x * sigmoid(x)                                   (SwiGLU's gate)
    conv       conv(pad(x) with zeros on the spatial axes)      (MobileNetV2's TF-style padding)

The rules are a table of ``(ops, fn)`` as in :mod:`nnforge.passes.cleanup`; ``fn`` returns None for
"no match". Primitives that are not part of such a chain keep their own templates.

    >>> fused = fuse_patterns(graph)     # a copy; graph is left as it is
"""
from __future__ import annotations

import math

from ...ir import Dense, Graph, Node, Value
from ...ir.simplify import rewrite

REL_TOL = 1e-5       # constants are float32 weights: sqrt(2/pi) and friends arrive rounded


def _const(v: Value | None) -> float | None:
    """The value of a one-element dense weight, else None."""
    if v is None or not v.is_weight or not isinstance(v.encoding, Dense) or v.encoding.data.numel() != 1:
        return None
    return float(v.encoding.data.reshape(()))


def _is(v: Value, c: float) -> bool:
    k = _const(v)
    return k is not None and math.isclose(k, c, rel_tol=REL_TOL)


def _made_by(v: Value | None, op: str) -> Node | None:
    p = None if v is None else v.producer
    return p if p is not None and p.op == op else None


def _pairs(node: Node):
    """Both operand orders of a commutative binary node."""
    a, b = node.inputs
    return ((a, b), (b, a))


def _new(g: Graph, at: Node, op: str, inputs: list, attrs: dict, what: str) -> Value:
    base = at.meta.get("module") or at.name
    with g.inserting_before(at):
        return g.add_node(op, inputs, attrs, name=g.fresh_name(f"{base}.{what}", node=True), meta=dict(at.meta)).output


def _square_of(v: Value) -> Value | None:
    """x for x^2 written as pow(x, 2) or mul(x, x)."""
    p = _made_by(v, "pow")
    if p is not None and _is(p.inputs[1], 2.0):
        return p.inputs[0]
    p = _made_by(v, "mul")
    if p is not None and p.inputs[0] is p.inputs[1]:
        return p.inputs[0]
    return None


def _rms_norm(g, node):
    # mul(x, rsqrt(add(reduce_mean(x^2, axes=[-1], keepdim), eps))) -> rms_norm(x, eps)
    for x, r in _pairs(node):
        rs = _made_by(r, "rsqrt")
        add = rs and _made_by(rs.inputs[0], "add")
        if add is None or x.is_weight or not x.shape:
            continue
        for m, eps in _pairs(add):
            mean = _made_by(m, "reduce_mean")
            if mean is None or _const(eps) is None or _const(eps) <= 0 or not mean.attrs["keepdim"]:
                continue
            if [a % len(x.shape) for a in mean.attrs["axes"]] != [len(x.shape) - 1]:
                continue
            if _square_of(mean.inputs[0]) is x:
                return _new(g, node, "rms_norm", [x], {"eps": _const(eps)}, "rms_norm")
    return None


def _rms_scale(g, node):
    # mul(rms_norm(x) without a weight, w) with w a dense [n] weight -> rms_norm(x, w)
    for r, w in _pairs(node):
        norm = _made_by(r, "rms_norm")
        if norm is None or len(norm.inputs) > 1 and norm.inputs[1] is not None or norm.attrs["offset"]:
            continue
        x = norm.inputs[0]
        if not (w.is_weight and isinstance(w.encoding, Dense) and tuple(w.shape) == (x.shape[-1],)
                and w.dtype == x.dtype and len(g.uses().get(r, [])) == 1):
            continue
        return _new(g, node, "rms_norm", [x, w], {"eps": norm.attrs["eps"]}, "rms_norm")
    return None


def _tanh_gelu(g, node):
    # mul(mul(x, 0.5), add(tanh(mul(add(x, mul(pow(x, 3), 0.044715)), sqrt(2/pi))), 1)) -> gelu(x, tanh)
    for half, one_plus in _pairs(node):
        h = _made_by(half, "mul")
        a = _made_by(one_plus, "add")
        if h is None or a is None:
            continue
        for x, k in _pairs(h):
            if not _is(k, 0.5):
                continue
            for t, one in _pairs(a):
                th = _made_by(t, "tanh")
                scaled = th and _made_by(th.inputs[0], "mul")
                if scaled is None or not _is(one, 1.0):
                    continue
                for inner, c in _pairs(scaled):
                    s = _made_by(inner, "add")
                    if s is None or not _is(c, math.sqrt(2.0 / math.pi)):
                        continue
                    for x2, cube in _pairs(s):
                        m = _made_by(cube, "mul")
                        if x2 is not x or m is None:
                            continue
                        for p, k3 in _pairs(m):
                            pw = _made_by(p, "pow")
                            if pw is not None and pw.inputs[0] is x and _is(pw.inputs[1], 3.0) and _is(k3, 0.044715):
                                return _new(g, node, "gelu", [x], {"approximate": "tanh"}, "gelu")
    return None


def _silu(g, node):
    # mul(x, sigmoid(x)) -> silu(x)
    for x, s in _pairs(node):
        sg = _made_by(s, "sigmoid")
        if sg is not None and sg.inputs[0] is x:
            return _new(g, node, "silu", [x], {}, "silu")
    return None


def _padded_conv(g, node):
    # conv(pad(x, zeros on the spatial axes)) -> conv(x) with the pad added to its own padding
    p = _made_by(node.inputs[0], "pad")
    if p is None or float(p.attrs["value"]) != 0.0:
        return None
    r, pads, padding = len(p.inputs[0].shape), list(p.attrs["pads"]), list(node.attrs["padding"])
    nd = r - 2
    if nd < 1 or any(pads[i] or pads[r + i] for i in (0, 1)):
        return None
    merged = [padding[i] + pads[2 + i] for i in range(nd)] + [padding[nd + i] + pads[r + 2 + i] for i in range(nd)]
    return _new(g, node, "conv", [p.inputs[0], *node.inputs[1:]], {**node.attrs, "padding": merged}, "conv")


FUSIONS = [(("mul",), _rms_norm), (("mul",), _tanh_gelu), (("mul",), _silu), (("conv",), _padded_conv)]
ENDS = ("rsqrt", "tanh", "sigmoid", "pad")      # an op in every chain above
SCALES = [(("mul",), _rms_scale)]


def fuse_patterns(graph: Graph) -> Graph:
    """A copy of ``graph`` with the chains above replaced by their fused ops (``graph`` itself when
    it has none of the ops in ``ENDS``)."""
    if not any(n.op in ENDS for n in graph.nodes):
        return graph
    g = graph.copy()
    if rewrite(g, FUSIONS):
        rewrite(g, SCALES)        # a norm's weight once the norm itself is one node
    return g

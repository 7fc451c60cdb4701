"""Cleanup passes: dead code elimination, constant folding, algebraic simplification (the IR's
own transformations, :mod:`nnforge.ir.simplify`, as recorded steps) and matmul(+add) -> linear
fusion.

Local rewrites are tables of ``(ops, fn)`` rules (tinygrad's PatternMatcher style): ``fn(graph,
node)`` returns the value that replaces the node's output, or None for "no match". One short
comment per rule says what it matches.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Dense, Graph, Node, Value, symbolic as sym
from ..ir.simplify import SIMPLIFY_RULES, eliminate_dead_code, fold_constants, rewrite, simplify
from .base import Pass, register_pass


@register_pass
@dataclass
class DeadCodeElimination(Pass):
    name = "dce"
    exact = True

    def run(self, graph, ctx):
        ctx.record("nodes_removed", eliminate_dead_code(graph))
        return graph


@register_pass
@dataclass
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all dense constants (and nodes with no inputs and a static
    shape) into new weights (:func:`nnforge.ir.simplify.fold_constants`). Outputs larger than
    ``max_growth`` times their inputs (expanding a constant, say) are not folded, and encoded
    (compressed) weights are never decoded here."""
    name = "fold_constants"
    exact = True
    max_growth: float = 1.0
    min_elements: int = 1 << 16

    def run(self, graph, ctx):
        ctx.record("nodes_folded", fold_constants(graph, self.max_growth, self.min_elements))
        return graph


@register_pass
@dataclass
class Simplify(Pass):
    """The IR's algebraic identities (:data:`nnforge.ir.simplify.SIMPLIFY_RULES`)."""
    name = "simplify"
    exact = True

    def run(self, graph, ctx):
        ctx.record("rewrites", simplify(graph))
        return graph


# --- matmul + add -> linear -----------------------------------------------------------------------
def _dense_matrix(v: Value) -> bool:
    return v is not None and v.is_weight and isinstance(v.encoding, Dense) and len(v.shape) == 2 \
        and v.dtype.is_float


def _linear_from_matmul(g: Graph, node: Node, bias: Value | None, at: Node) -> Value:
    x, w = node.inputs
    mm_name = node.name
    layer = node.meta.get("module") or mm_name
    wname = g.fresh_name(f"{layer}.weight")
    weight = g.add_weight(wname, Dense(w.encoding.data.t().contiguous()))
    with g.inserting_before(at):
        return g.add_node("linear", [x, weight, bias], name=g.fresh_name(layer, node=True),
                          meta=dict(node.meta)).output


def _fuse_add(g, node):
    # add(matmul(x, W), b) with W a constant [K, N] and b a constant [N] -> linear(x, W.T, b)
    for mm, bias in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        p = mm.producer
        if p is None or p.op != "matmul" or not _dense_matrix(p.inputs[1]):
            continue
        if not (bias.is_weight and len(bias.shape) == 1 and sym.equal(bias.shape[0], p.inputs[1].shape[1])
                and bias.dtype == mm.dtype and len(g.uses().get(mm, [])) == 1):
            continue
        return _linear_from_matmul(g, p, bias, node)
    return None


def _fuse_matmul(g, node):
    # matmul(x, W) with W a constant [K, N] -> linear(x, W.T)
    # (FuseLinear runs the add rule first, so matmuls with a bias are already fused.)
    if not _dense_matrix(node.inputs[1]) or node.inputs[0].type.rank < 1:
        return None
    return _linear_from_matmul(g, node, None, node)


@register_pass
@dataclass
class FuseLinear(Pass):
    """Turn matmuls by constant matrices (with a following bias add) into ``linear`` nodes, the
    form every weight pass and backend expects (ONNX files arrive as MatMul + Add)."""
    name = "fuse_linear"
    exact = True

    def run(self, graph, ctx):
        count = rewrite(graph, [(("add",), _fuse_add)]) + rewrite(graph, [(("matmul",), _fuse_matmul)])
        ctx.record("fused", count)
        return graph


def cleanup_passes() -> list[Pass]:
    """The passes ``nnforge.compile`` runs before any recipe."""
    return [FoldConstants(), Simplify(), FuseLinear(), DeadCodeElimination()]


__all__ = ["rewrite", "eliminate_dead_code", "DeadCodeElimination", "FoldConstants", "Simplify", "FuseLinear",
           "cleanup_passes", "SIMPLIFY_RULES"]

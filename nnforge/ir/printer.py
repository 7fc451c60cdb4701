"""Human-readable text for graphs, in the spirit of fx's generated code and TVMScript:

    graph minilm(%input_ids: i64[batch, seq], %attention_mask: i64[batch, seq]) {
      %q = linear(%x, @layer.0.q.weight, @layer.0.q.bias)  : f32[batch, seq, 384]   # encoder.layer.0...
      ...
      return %out
    }

Values print as ``%name``, weights as ``@name``; the weight table lists each weight's encoding.
The functions read graphs and nodes by their attributes and import nothing from graph.py, whose
``Graph.__str__`` calls :func:`format_graph`.
"""
from __future__ import annotations


def _ref(v) -> str:
    if v is None:
        return "None"
    return f"@{v.name}" if v.is_weight else f"%{v.name}"


def _scalar(v) -> str:
    if isinstance(v, (list, tuple, dict)):
        return "[...]"          # never in a verified graph: op schemas allow flat lists only
    return repr(v) if isinstance(v, str) else str(v)


def _attr(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, tuple):
        return "(" + ", ".join(_scalar(x) for x in v) + ")"
    return _scalar(v)


def format_node(n) -> str:
    """One line of text for node ``n`` (a :class:`~nnforge.ir.graph.Node`)."""
    outs = ", ".join(f"%{o.name}" for o in n.outputs)
    args = [_ref(v) for v in n.inputs] + [f"{k}={_attr(v)}" for k, v in n.attrs.items()]
    types = ", ".join(str(o.type) for o in n.outputs)
    line = f"{outs} = {n.op}({', '.join(args)})  : {types}"
    where = n.meta.get("module") or n.meta.get("source_op")
    if n.name != n.outputs[0].name:
        line += f"  # node {n.name}" + (f", {where}" if where else "")
    elif where:
        line += f"  # {where}"
    return line


def format_graph(g, *, max_weights: int | None = 40) -> str:
    """The text of graph ``g`` (a :class:`~nnforge.ir.graph.Graph`), listing at most ``max_weights``
    weights (None: all)."""
    sig = ", ".join(f"%{v.name}: {v.type}" for v in g.inputs)
    lines = [f"graph {g.name}({sig}) {{"]
    if g.weights:
        total = sum(v.encoding.numel for v in g.weights.values())
        nbytes = sum(v.encoding.nbytes for v in g.weights.values())
        lines.append(f"  # {len(g.weights)} weights, {total:,} elements, {nbytes:,} bytes stored")
        items = list(g.weights.items())
        shown = items if max_weights is None else items[:max_weights]
        for name, v in shown:
            lines.append(f"  @{name}: {v.type} = {v.encoding.describe()}")
        if len(shown) < len(items):
            lines.append(f"  # ... {len(items) - len(shown)} more weights")
    for n in g.nodes:
        lines.append("  " + format_node(n))
    lines.append("  return " + ", ".join(_ref(v) for v in g.outputs))
    lines.append("}")
    return "\n".join(lines)

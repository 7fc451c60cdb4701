"""Integer W4A8 / W4A4 linears on the CPU: a per-token int8 or int4 ``dynamic_quant`` read only by
linears whose IntQuant weights kernels.lowbit takes becomes int8 codes and float32 row scales
(:func:`int_act_codes`), and each such linear kernels.intact's integer GEMM on them
(:func:`int_act_linear`) instead of the float GEMM on the rounded activation. Which linears:
:func:`act_linears`, recorded in the manifest (``backend.entry.act_linears``: linear -> its weight
and dynamic_quant, as the triton backend records its own). Linears of one quantiser with alike
weights run as one call over their stacked weights (:func:`act_siblings`), as weights.py stacks
float ones. Every other dynamic_quant and linear lowers as before. The functions taking ``lw`` get
the :class:`~.lower.Lowering` in progress.
"""
from __future__ import annotations


from ...ir import Value
from .capabilities import LOWBIT
from .weight_arrays import _jsonable, c_name, perm_key, stacked_perm
from .weights import kernel_bits, stacked_int_args, stored_int_arrays

ACT_FORMATS = ("int8", "int4")      # the dynamic_quant formats whose codes are int8


def _int_weight(lw, node, slot: int) -> Value | None:
    """``node``'s weight when ``node`` is a float32 linear reading the quantiser at ``slot`` 0 with an
    IntQuant weight that kernels.lowbit (its capability row) and kernels.intact both take."""
    from .kernels.intact import act_problem
    if node.op != "linear" or slot != 0 or len(node.inputs) < 2 or node.outputs[0].dtype.name != "float32":
        return None
    w = node.inputs[1]
    if w is None or not w.is_weight or w.encoding.kind != "int" or len(w.shape) != 2:
        return None
    cap, _ = lw.native("linear", w)
    if cap is None or cap.accepts is not LOWBIT:
        return None
    return w if act_problem(kernel_bits(w.encoding), w.encoding.group_size, *w.shape) is None else None


def act_linears(lw) -> dict[str, dict]:
    """Linear node -> {"weight", "quant"} for the linears that run on kernels.intact: those reading a
    per-token (group 0) int8 / int4 ``dynamic_quant`` of a float32 tensor, not a graph output, whose
    every reader is such a linear (:func:`_int_weight`). Computed once per lowering."""
    if lw.act_linears is None:
        readers, out = lw.graph.uses(), {}
        for q in lw.graph.nodes:
            a = q.attrs
            if q.op != "dynamic_quant" or a["format"] not in ACT_FORMATS or a["group"] \
                    or q.inputs[0].dtype.name != "float32" or q.outputs[0] in lw.graph.outputs:
                continue
            users = readers.get(q.outputs[0], [])
            if users and all(_int_weight(lw, n, slot) is not None for n, slot in users):
                out.update({n.name: {"weight": n.inputs[1].name, "quant": q.name} for n, _ in users})
        lw.act_linears = out
    return lw.act_linears


def act_quantizers(lw) -> set[str]:
    """The dynamic_quant nodes lowered to codes and row scales."""
    return {entry["quant"] for entry in act_linears(lw).values()}


def int_act_codes(lw, node) -> None:
    """Emit ``node`` (a dynamic_quant of :func:`act_quantizers`) as int8 codes ``[rows, K]`` and
    float32 scales ``[rows]`` of its input flattened to rows (ops_actquant.act_codes), kept for the
    linears reading it; None: the node's own float output is never made."""
    from .lower import OPAQUE
    from .ops_actquant import act_codes
    from ...ir import symbolic as sym
    from tvm.relax import op
    x = node.inputs[0]
    rows = lw.dim(sym.prod(x.shape[:-1]))
    x2 = lw.arg(x) if x.type.rank == 2 else lw.emit(op.reshape(lw.arg(x), [rows, lw.dim(x.shape[-1])]))
    both = lw.emit(lw.bb.call_te(act_codes(node.attrs["format"], node.attrs["clip"]), x2,
                                 primfunc_name_hint="dynamic_quant_codes", primfunc_attrs={"op_pattern": OPAQUE}),
                   f"{node.name}.quantised")
    codes = lw.emit(lw.relax.TupleGetItem(both, 0), f"{node.name}.codes")
    scale = lw.emit(lw.relax.TupleGetItem(both, 1), f"{node.name}.scale")
    lw.act_codes[node.outputs[0]] = (codes, scale, rows)
    return None


def _sibling_key(w: Value) -> tuple:
    e = w.encoding
    return (e.bits, e.group_size, e.signed, e.zero_point is None, str(e.scale.dtype), w.shape[1], perm_key(e))


def act_siblings(lw, node) -> list:
    """The linears of :func:`act_linears` reading ``node``'s quantiser whose weights stack into one
    call with ``node``'s (one code width, group size, signedness, zero points in all or none, scale
    type and column order; each weight read by its layer alone), in graph order; [node] if none."""
    x = node.inputs[0]
    plan = act_linears(lw)

    def key(n):
        w = n.inputs[1]
        return _sibling_key(w) if n.name in plan and n.inputs[0] is x and lw.readers(w) == [n] else None
    mine = key(node)
    group = [n for n in dict.fromkeys(lw.readers(x)) if mine is not None and key(n) == mine]
    return group if len(group) > 1 else [node]


def intact_kernel(lw, parts: list[Value]) -> tuple:
    """(GlobalVar, const param vars, rows of each part, act-order perm var or None) of kernels.intact
    over the weights ``parts`` (one, or several stacked along their output rows), its arrays made
    when the bundle loads from the weights as stored (as the lowbit kernel's); built once per stack."""
    from .kernels import intact
    key = ("intact", *(w.name for w in parts))
    if key in lw._linear:
        return lw._linear[key]
    args, sizes = stacked_int_args(parts)
    label = parts[0].name if len(parts) == 1 else f"{parts[0].name}_and_{len(parts) - 1}"
    built = intact.int_act_matmul(c_name(label), **args, target=lw.llvm_target)
    consts = _consts_at_load(lw, parts, built, args) or \
        [lw.extra(parts[0].name, f"{built.name}.{i}", c) for i, c in enumerate(built.consts)]
    for w in parts:
        stacked = {"stacked_with": [p.name for p in parts if p is not w]} if len(parts) > 1 else {}
        lw.kernel_notes[w.name] = {"function": built.name, **_jsonable(built.notes), **stacked}
    lw._linear[key] = (lw.func(built.name, built.func), consts, sizes, stacked_perm(lw, parts))
    return lw._linear[key]


def _consts_at_load(lw, parts: list[Value], built, args: dict) -> list | None:
    """kernels.intact's arrays as ``main`` parameters made by ``prepare`` from the stored tensors:
    the dot layout of the codes, float32 scales and uint8 zero points, rows interleaved by its
    lanes; None where the stored scales have no numpy form (bfloat16)."""
    from tvm.relax import op
    from .kernels.intact import LANES, make_plan
    from .kernels.lowbit_layout import relax_dot_layout, relax_interleave_rows
    stored = stored_int_arrays(lw, parts, args)
    if stored is None:
        return None
    codes, scales, zero_points, scale_dtype = stored
    n, k, bits, zp = args["n"], args["k"], args["bits"], args["zero_point"]
    plan = make_plan(bits, n, k, args["group_size"], zp is not None, lw.llvm_target)
    blocks, groups = plan.blocks, plan.groups

    def f32_scales():
        s = scales()
        return relax_interleave_rows(s if scale_dtype == "float32" else op.astype(s, "float32"), n, groups, "float32",
                                     LANES, blocks)
    builds = [lambda: relax_dot_layout(codes(), n, bits, k, LANES, blocks), f32_scales]
    if zp is not None:
        builds.append(lambda: relax_interleave_rows(zero_points(), n, groups, "uint8", LANES, blocks))
    return [lw.made(f"{parts[0].name}.{built.name}.{i}", lw.relax.TensorType(list(c.shape), c.dtype.name), make)
            for i, (c, make) in enumerate(zip(built.consts, builds))]


def int_act_linear(lw, node):
    """The output of a linear of :func:`act_linears`: kernels.intact on its quantiser's codes (their
    columns in the weight's act-order) and row scales, with the bias; the linears stacked with it
    (:func:`act_siblings`) take theirs from ``lw.fused``."""
    from tvm.relax import op
    if node.name in lw.fused:
        return lw.fused.pop(node.name)
    group = act_siblings(lw, node)
    codes, a_scale, rows = lw.act_codes[node.inputs[0]]
    gv, consts, sizes, perm = intact_kernel(lw, [n.inputs[1] for n in group])
    if perm is not None:        # act-order: the kernel's columns are in stored order
        codes = lw.emit(op.take(codes, perm, axis=1), f"{node.name}.codes")

    def bias_of(n):
        return n.inputs[2] if len(n.inputs) > 2 else None
    single = len(group) == 1
    bias = lw.arg(bias_of(node)) if single and bias_of(node) is not None else lw.zeros(sum(sizes))
    y = lw.emit(lw.relax.call_tir(gv, [codes, a_scale, *consts, bias],
                                  lw.relax.TensorType([rows, lw.dim(sum(sizes))], "float32")),
                node.name if single else f"{node.name}.stacked")
    outs, start = {}, 0
    for n, size in zip(group, sizes):
        part = y if single else lw.emit(op.strided_slice(y, axes=[1], begin=[start], end=[start + size]), n.name)
        start += size
        if not single and bias_of(n) is not None:
            part = lw.emit(op.add(part, lw.arg(bias_of(n))))
        out = n.outputs[0]
        outs[n.name] = lw.emit(op.reshape(part, lw.shape(out.shape))) if out.type.rank != 2 else part
    lw.fused.update({name: out for name, out in outs.items() if name != node.name})
    return outs[node.name]


__all__ = ["ACT_FORMATS", "act_linears", "act_quantizers", "act_siblings", "int_act_codes", "int_act_linear",
           "intact_kernel"]

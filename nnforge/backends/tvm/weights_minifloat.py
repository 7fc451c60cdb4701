"""How a MiniFloat linear weight reaches kernels.lowbit_minifloat: the builder's arguments made from
the encoding (:func:`minifloat_args`, which the capability row names), the kernel's arrays made
when the bundle loads from the weight as stored (:func:`minifloat_consts_at_load`), and layers of
one input stacked into one call (:func:`fused_minifloat_kernel`), as tvm/weights.py does for int
codes. The functions taking ``lw`` get the :class:`~.lower.Lowering` in progress.
"""
from __future__ import annotations

import numpy as np

from ...ir import Value
from .weight_arrays import _jsonable, c_name, numpy_of, perm_key, stacked_perm


def minifloat_args(enc) -> dict:
    """minifloat_weight_matmul's arguments for a MiniFloat weight: its codes as stored, and its
    scales decoded to float32 (E8M0 or E4M3 scale codes read, the global scale folded in)."""
    import torch
    n, k = enc.shape
    return {"codes": numpy_of(enc.codes), "fmt": enc.fmt.short, "scale": numpy_of(enc.scale_values(torch.float32)),
            "group_size": enc.group_size, "n": n, "k": k}


def minifloat_sibling_key(enc) -> tuple:
    """What MiniFloat weights of layers reading one input share to run as one stacked call: format,
    group size, columns and their act-order (scales of any kind are decoded per weight at load)."""
    return ("minifloat", enc.fmt.short, enc.group_size, enc.shape[1], perm_key(enc))


def minifloat_consts_at_load(lw, parts: list[Value], built) -> list | None:
    """The arrays of kernels.lowbit_minifloat (codes in the lowbit layout, float32 scales) for the
    weights ``parts`` (one, or several stacked along the output rows) as ``main`` parameters that
    ``prepare`` makes from each weight's stored codes, scales (float, or E8M0 / E4M3 codes read
    through their table) and global scale when the bundle loads, as weights.lowbit_consts_at_load
    does for int codes; None for bfloat16 scales (no numpy form), which then go to
    tvm_params.safetensors as made here."""
    import torch
    from tvm.relax import op
    from ...ir import minifloat as mf
    from .kernels.lowbit import make_plan
    from .kernels.lowbit_layout import relax_dot_layout, relax_interleave_rows
    from .kernels.minifloat_codes import BITS, SCALE_FACTOR
    encs, relax = [w.encoding for w in parts], lw.relax
    if any(str(e.scale.dtype) == "torch.bfloat16" for e in encs):
        return None
    n, k = built.n, built.k
    fmt, gs = encs[0].fmt.short, encs[0].group_size
    bits = BITS[fmt]
    plan = make_plan(bits, n, k, gs, False, lw.llvm_target, "float32", fmt)
    # prepare's parameters exist before its body is built: every stored tensor is asked for here
    stored = [(lw.stored(w, "codes", numpy_of(e.codes)), lw.stored(w, "scale", numpy_of(e.scale)),
               lw.stored(w, "global_scale", numpy_of(e.global_scale)) if e.global_scale is not None else None)
              for w, e in zip(parts, encs)]

    def stacked(pieces):
        return pieces[0] if len(pieces) == 1 else op.concat(pieces, axis=0)

    def layout():
        codes = stacked([c for c, _, _ in stored])
        return relax_dot_layout(codes, n, bits, k, plan.lanes, plan.padded_blocks) if plan.dot else \
            relax_interleave_rows(codes, n, k * bits // 8, "uint8", plan.lanes, plan.padded_blocks)

    def scale_of(e, scale, g):      # MiniFloat.scale_values, then kernels.lowbit_minifloat.kernel_scale
        if e.scale_format.kind == "minifloat":
            table = relax.const(mf.decode(torch.arange(256), e.scale_format).numpy())
            s = op.take(table, op.astype(scale, "int32"), axis=0, mode="clip")     # a uint8 code is in range
        else:
            s = op.astype(scale, "float32")
        if g is not None:
            s = op.multiply(s, g)
        s = op.multiply(s, relax.const(SCALE_FACTOR[fmt], "float32"))
        rows = e.shape[0]
        return s if e.scale.shape[0] == rows else op.broadcast_to(s, [rows, plan.groups])

    def scales():
        s = stacked([scale_of(e, scale, g) for e, (_, scale, g) in zip(encs, stored)])
        return relax_interleave_rows(s, n, plan.groups, "float32", plan.lanes, plan.padded_blocks)

    return [lw.made(f"{parts[0].name}.{built.name}.{i}", relax.TensorType(list(c.shape), c.dtype.name), make)
            for i, (c, make) in enumerate(zip(built.consts, [layout, scales]))]


def fused_minifloat_kernel(lw, parts: list[Value]) -> tuple:
    """(GlobalVar, const param vars, rows of each part, act-order perm var or None) of one
    kernels.lowbit_minifloat GEMM over the weights ``parts`` stacked along their output rows
    (weights.fusable_siblings: one format, group size and act-order)."""
    from .kernels.lowbit_minifloat import minifloat_weight_matmul
    each = [minifloat_args(w.encoding) for w in parts]
    sizes = [a["n"] for a in each]
    groups = -(-each[0]["k"] // each[0]["group_size"])
    scale = np.concatenate([np.broadcast_to(a["scale"], (a["n"], groups)) for a in each])
    args = dict(each[0], n=sum(sizes), codes=np.concatenate([a["codes"] for a in each]), scale=scale)
    built = minifloat_weight_matmul(c_name(f"nf_minifloat_{parts[0].name}_and_{len(parts) - 1}"), **args,
                                    target=lw.llvm_target)
    consts = minifloat_consts_at_load(lw, parts, built) or \
        [lw.extra(parts[0].name, f"{built.name}.{i}", c) for i, c in enumerate(built.consts)]
    for w in parts:
        lw.kernel_notes[w.name] = {"function": built.name, "stacked_with": [p.name for p in parts if p is not w],
                                   **_jsonable(built.notes)}
    return lw.func(built.name, built.func), consts, sizes, stacked_perm(lw, parts)


__all__ = ["fused_minifloat_kernel", "minifloat_args", "minifloat_consts_at_load", "minifloat_sibling_key"]

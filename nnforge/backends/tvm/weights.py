"""How a linear layer's weight reaches its kernel: the arrays each kernel of kernels/ reads, made
from the encoding (``*_args``, which the rows of :mod:`.capabilities` name), and the kernel built
once per weight (:func:`linear_kernel`): the kernel of the weight's capability row, the int8 BSR
kernel after a static int8 activation (:func:`int8_bsr_kernel`), or the dense GEMM on the weight
as stored or decoded (a reported Fallback giving the table's reason). The functions taking ``lw``
get the :class:`~.lower.Lowering` in progress, as the rules of :mod:`.ops` do.
"""
from __future__ import annotations

import importlib

import numpy as np

from ...ir import Value
from ...ir.packing import pack_bits, unpack_bits
from ..base import Fallback
from .weight_arrays import _jsonable, c_name, numpy_of, perm_key, stacked_perm


def int8_blocks(enc) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes [kept, R, C], float32 scale per output row) of a block-sparse weight whose kept
    values are signed 8-bit codes under one scale with a ``row_scale`` (what the capability row of
    kernels.bsr_int8 takes)."""
    v = enc.values
    codes = numpy_of(v.int_codes()).reshape(v.shape).astype(np.int8)
    return codes, (numpy_of(enc.row_scale.float()) * float(v.scale)).astype(np.float32)


def bsr_args(enc) -> dict:
    """bsr_matmul's arguments for a block-sparse weight of fp32 blocks."""
    n, k = enc.shape
    return {"row_ptr": numpy_of(enc.row_ptr), "col_idx": numpy_of(enc.index), "blocks": numpy_of(enc.values.data),
            "n": n, "k": k}


def int8_bsr_args(enc) -> dict:
    """bsr_matmul_int8's weight arguments for int8 block codes with row scales (the activation's
    grid comes from the graph: :func:`int8_bsr_kernel`)."""
    codes, row_scale = int8_blocks(enc)
    n, k = enc.shape
    return {"row_ptr": numpy_of(enc.row_ptr), "col_idx": numpy_of(enc.index), "blocks_int8": codes,
            "row_scale": row_scale, "n": n, "k": k}


def widened_int8_args(enc) -> dict:
    """bsr_matmul's arguments for int8 block codes with row scales read by fp32 activations: the
    codes widened to fp32 blocks for the fp32 kernel (the int8 kernel needs int8 activations),
    reported by the caller as a fallback."""
    codes, row_scale = int8_blocks(enc)
    n, k = enc.shape
    rows = np.repeat(np.arange(n // enc.pattern.r), np.diff(numpy_of(enc.row_ptr).astype(np.int64)))
    scale = row_scale.reshape(-1, enc.pattern.r)[rows][:, :, None]
    return {"row_ptr": numpy_of(enc.row_ptr), "col_idx": numpy_of(enc.index),
            "blocks": (codes.astype(np.float32) * scale).astype(np.float32), "n": n, "k": k}


def kernel_bits(enc) -> int:
    """The code width kernels.lowbit reads ``enc`` at: 3-bit codes as 4-bit ones (a code of 0..7
    is the same code in a nibble), so int3 weights stay 3 bits a weight in the bundle and run on
    the int4 kernel (which streams 4 bits a weight) instead of being decoded to fp32."""
    return 4 if enc.bits == 3 else enc.bits


def int_args(enc) -> dict:
    """int_weight_matmul's arguments for an 8-, 4- or 3-bit IntQuant weight (3-bit codes repacked
    as 4-bit ones): zero points in the domain of the stored code fields (a signed weight's
    offset-binary bias folded in), None for signed symmetric codes (the kernel then subtracts
    2**(bits-1), so a signed 3-bit code is moved into the 4-bit offset-binary range)."""
    n, k = enc.shape
    bits = kernel_bits(enc)
    zp = None
    if enc.zero_point is not None:
        zp = numpy_of(enc.zero_point).astype(np.int32) + ((1 << (enc.bits - 1)) if enc.signed else 0)
    elif not enc.signed:
        zp = np.zeros(tuple(enc.scale.shape), dtype=np.int32)
    codes = numpy_of(enc.codes)
    if bits != enc.bits:
        wide = unpack_bits(enc.codes, enc.bits, k)
        if enc.signed and zp is None:       # offset binary around 4, not 8: keep the value, move the code
            wide = wide + ((1 << (bits - 1)) - (1 << (enc.bits - 1)))
        codes = numpy_of(pack_bits(wide, bits))
    # float16 scales as stored (the kernel reads them so); bfloat16 ones, which numpy lacks, widened
    scale = enc.scale if str(enc.scale.dtype) == "torch.float16" else enc.scale.float()
    return {"codes": codes, "bits": bits, "scale": numpy_of(scale),
            "zero_point": zp, "group_size": enc.group_size, "n": n, "k": k}


def _int8_activation(x: Value):
    """(float input, scale, uint8 zero point) when ``x`` is a static int8/uint8 ``fake_quant`` of a
    float32 tensor: the int8 SpMM kernel quantises that input itself, on the same grid (an int8
    grid is the uint8 grid shifted by 128)."""
    node = x.producer
    if node is None or node.op != "fake_quant" or node.attrs["format"].name not in ("int8", "uint8"):
        return None
    src = node.inputs[0]
    if src.dtype.name != "float32":
        return None
    shift = 128 if node.attrs["format"].int_range[0] < 0 else 0
    return src, float(node.attrs["scale"]), int(node.attrs["zero_point"]) + shift


def int8_bsr_kernel(lw, w: Value, x: Value, kernel):
    """(GlobalVar, const param vars, n, the float input to pass) of the u8 x s8 BSR kernel (``kernel``,
    the capability row's :class:`~.capabilities.Kernel`) for a linear reading a statically
    int8-quantised activation; None when ``x`` is not one (the codes are then widened by
    :func:`linear_kernel`)."""
    act = _int8_activation(x)
    if act is None:
        return None
    src, x_scale, zp = act
    key = (w.name, x_scale, zp)
    if key not in lw._linear:
        build = getattr(importlib.import_module(f"{__package__}.kernels.{kernel.module}"), kernel.builder)
        built = build(c_name(f"nf_bsr_i8_{w.name}_{len(lw._linear)}"), **kernel.args(w.encoding), x_scale=x_scale,
                      x_zero_point=zp, target=lw.llvm_target)
        consts = [lw.extra(w.name, f"{built.name}.{i}", c) for i, c in enumerate(built.consts)]
        lw.kernel_consts[w.name] = consts          # what embedding_rows reads for a tied table
        lw.kernel_notes[w.name] = {"function": built.name, **_jsonable(built.notes)}
        lw._linear[key] = (lw.func(built.name, built.func), consts, built.n, src)
    return lw._linear[key]


def linear_kernel(lw, w: Value, kernel=None, why: str = "", layer: str = "", rows=None) -> tuple:
    """(GlobalVar, const param vars, n, act-order perm var or None, bias in the kernel) for the
    linear weight ``w``, built once per weight: on ``kernel`` (the :class:`~.capabilities.Kernel`
    of the capability row that takes it), else on the dense GEMM, the weight as stored (a dense
    row) or decoded with ``why`` (the table's reason). Int8 block codes whose activation is not a
    static int8 one (:func:`int8_bsr_kernel` took no kernel) are widened to fp32 blocks for
    kernels.bsr, reported. ``layer`` and ``rows`` (the IR dim of the rows x has, flattened) let the
    dispatcher measure the compressed kernel against the dense one (dispatch.py) the first time
    the weight is used."""
    if w.name in lw._linear:
        return lw._linear[w.name]
    enc = w.encoding
    if kernel is not None:
        module, builder, args = kernel.module, kernel.builder, kernel.args
        if module == "bsr_int8":
            module, builder, args = "bsr", "bsr_matmul", widened_int8_args
            lw.fallbacks.append(Fallback(w.name, enc.describe(), "int8 block codes widened to fp32 blocks for the fp32 "
                                         "BSR kernel: the int8 kernel needs a static int8 activation "
                                         "(quantize_activations) on this layer's input"))
        from .weights_minifloat import minifloat_consts_at_load
        mod, args = importlib.import_module(f"{__package__}.kernels.{module}"), args(enc)
        config = lw.kernel_config(mod, builder, args)
        built = getattr(mod, builder)(c_name(f"nf_{enc.kind}_{w.name}"), **args, target=lw.llvm_target,
                                      **({} if config is None else {"config": config}))
        at_load = {"lowbit": lambda: lowbit_consts_at_load(lw, [w], built, args),
                   "lowbit_minifloat": lambda: minifloat_consts_at_load(lw, [w], built)}.get(module)
        consts = (at_load() if at_load is not None else None) or \
            [lw.extra(w.name, f"{built.name}.{i}", c) for i, c in enumerate(built.consts)]
        lw.kernel_consts[w.name] = consts          # what embedding_rows reads for a tied table
        perm = lw.extra(w.name, "perm", numpy_of(enc.perm).astype(np.int64)) if getattr(enc, "perm", None) is not None \
            else None
        entry = _with_dispatch(lw, w, built, consts, perm, layer, rows) or \
            (lw.func(built.name, built.func), consts, built.n, perm, False)
    else:
        lw.weight(w, why)
        n, k = w.shape
        built = lw.dense_kernel(n, k)
        entry = (lw.func(built.name, built.func), [lw.panels(w)], n, None, True)
    lw.kernel_notes[w.name] = {"function": built.name, **_jsonable(built.notes)}
    lw._linear[w.name] = entry
    return entry


def lowbit_consts_at_load(lw, parts: list[Value], built, args: dict) -> list | None:
    """The lowbit kernel's arrays (``built.consts``: codes, scales, zero points in its layout) as
    ``main`` parameters that ``prepare`` makes from the stored tensors of the weights ``parts`` (one
    weight, or several stacked along the output rows: :func:`fused_linear_kernel`) when the bundle
    loads (kernels/lowbit_layout.py), so the bundle stores each weight once, in nnforge's encoding;
    None where a stored tensor is not what the kernel reads as is (bfloat16 scales), which then go
    to tvm_params.safetensors as made here."""
    from .kernels.lowbit import make_plan
    from .kernels.lowbit_layout import relax_dot_layout, relax_interleave_rows
    stored = stored_int_arrays(lw, parts, args)
    if stored is None:
        return None
    codes, scales, zero_points, scale_dtype = stored
    n, k, bits, zp = args["n"], args["k"], args["bits"], args["zero_point"]
    plan = make_plan(bits, n, k, args["group_size"], zp is not None, lw.llvm_target, scale_dtype)
    lanes, blocks, groups = plan.lanes, plan.padded_blocks, plan.groups

    def layout():
        return relax_dot_layout(codes(), n, bits, k, lanes, blocks) if plan.dot else \
            relax_interleave_rows(codes(), n, k * bits // 8, "uint8", lanes, blocks)

    builds = [layout, lambda: relax_interleave_rows(scales(), n, groups, scale_dtype, lanes, blocks)]
    if zp is not None:
        builds.append(lambda: relax_interleave_rows(zero_points(), n, groups, "uint8", lanes, blocks))
    return [lw.made(f"{parts[0].name}.{built.name}.{i}", lw.relax.TensorType(list(c.shape), c.dtype.name), make)
            for i, (c, make) in enumerate(zip(built.consts, builds))]


def stored_int_arrays(lw, parts: list[Value], args: dict) -> tuple | None:
    """Relax builders, for ``prepare``, of what kernels.lowbit and kernels.intact read of the IntQuant
    weights ``parts`` (stacked along their rows), from the tensors the bundle stores: (codes at the
    kernel's width ``[n, k * bits / 8]``, scales as stored ``[n, groups]``, zero points in the
    stored-code domain, uint8 ``[n, groups]`` (``args["zero_point"]`` None: unused), the scales'
    dtype); ``args`` is :func:`int_args` of the stack. None where a stored tensor is not what the
    kernels read as is (bfloat16 scales, which numpy lacks)."""
    from tvm.relax import op
    from .kernels.lowbit_layout import relax_widened_codes
    encs = [w.encoding for w in parts]
    if any(str(e.scale.dtype) not in ("torch.float32", "torch.float16") for e in encs):
        return None
    scales_np = [numpy_of(e.scale) for e in encs]
    if any(s.dtype != args["scale"].dtype for s in scales_np):
        return None
    k, bits, zp = args["k"], args["bits"], args["zero_point"]
    groups = -(-k // args["group_size"])
    # prepare's parameters exist before its body is built: every stored tensor is asked for here
    stored = [(lw.stored(w, "codes", numpy_of(e.codes)), lw.stored(w, "scale", s),
               lw.stored(w, "zero_point", numpy_of(e.zero_point)) if e.zero_point is not None else None)
              for w, e, s in zip(parts, encs, scales_np)]

    def stacked(per_part):
        pieces = [per_part(w, e, *st) for w, e, st in zip(parts, encs, stored)]
        return pieces[0] if len(pieces) == 1 else op.concat(pieces, axis=0)

    def codes_of(w, e, codes, scale, z):
        if e.bits == bits:
            return codes
        shift = (1 << (bits - 1)) - (1 << (e.bits - 1)) if e.signed and zp is None else 0
        return relax_widened_codes(codes, w.shape[0], k, e.bits, bits, shift)    # kernel_bits

    def scale_of(w, e, codes, scale, z):
        return scale if e.scale.shape[0] == w.shape[0] else op.broadcast_to(scale, [w.shape[0], groups])

    def zero_point_of(w, e, codes, scale, z):    # int_args: the stored zero points in the code domain, or zeros
        rows = w.shape[0]
        if z is None:
            return op.zeros([rows, groups], "uint8")
        offset = (1 << (e.bits - 1)) if e.signed else 0
        z = op.astype(z, "int32")
        z = op.astype(op.add(z, lw.relax.const(offset, "int32")) if offset else z, "uint8")
        return z if e.zero_point.shape[0] == rows else op.broadcast_to(z, [rows, groups])

    return (lambda: stacked(codes_of), lambda: stacked(scale_of), lambda: stacked(zero_point_of),
            scales_np[0].dtype.name)


def fusable_siblings(lw, node, kernel) -> list:
    """The linear layers that read ``node``'s input and can run with it as one lowbit GEMM over
    their stacked weights (a decoder block's q/k/v and gate/up projections): ``kernel`` (LOWBIT)
    takes every weight, at one code width, group size, signedness, scale type and column order
    (:func:`perm_key`), with zero points in all or none, each weight read by its layer alone, and
    no per-shape dispatch to join; or (LOWBIT's minifloat kin, MINIFLOAT) at one format, group
    size and column order. In graph order, ``node`` among them;
    [node] when it has no such sibling. One launch then streams what several did, and the
    activations are split once."""
    from .weights_minifloat import minifloat_sibling_key
    if lw.dispatcher.enabled or kernel is None or kernel.module not in ("lowbit", "lowbit_minifloat"):
        return [node]

    def key(n):
        if n.op != "linear" or len(n.inputs) < 2 or n.inputs[0] is not node.inputs[0]:
            return None
        w = n.inputs[1]
        if not w.is_weight or len(w.shape) != 2 or lw.readers(w) != [n]:
            return None
        cap, _ = lw.native("linear", w)
        e = w.encoding
        if cap is None or cap.accepts is not kernel:
            return None
        if kernel.module == "lowbit_minifloat":
            return minifloat_sibling_key(e)
        return (e.bits, e.group_size, e.signed, e.zero_point is None, str(e.scale.dtype), w.shape[1], perm_key(e))
    mine = key(node)
    group = [n for n in dict.fromkeys(lw.readers(node.inputs[0])) if mine is not None and key(n) == mine]
    return group if len(group) > 1 else [node]


def stacked_int_args(parts: list[Value]) -> tuple[dict, list[int]]:
    """:func:`int_args` of linears with alike IntQuant weights stacked along their rows (one call
    computes them all; a per-tensor scale or zero point repeated per row), and each one's rows."""
    each = [int_args(w.encoding) for w in parts]
    sizes = [a["n"] for a in each]
    groups = -(-each[0]["k"] // each[0]["group_size"])

    def rows(a, name):
        x = a[name]
        return x if x is None or x.shape[0] == a["n"] else np.broadcast_to(x, (a["n"], groups))
    args = dict(each[0], n=sum(sizes), codes=np.concatenate([a["codes"] for a in each]),
                scale=np.concatenate([rows(a, "scale") for a in each]),
                zero_point=None if each[0]["zero_point"] is None else
                np.concatenate([rows(a, "zero_point") for a in each]))
    return args, sizes


def fused_linear_kernel(lw, parts: list[Value], kernel) -> tuple:
    """(GlobalVar, const param vars, rows of each part, act-order perm var or None) of one lowbit
    GEMM over the weights ``parts`` stacked along their output rows (:func:`fusable_siblings`)."""
    if kernel.module == "lowbit_minifloat":
        from .weights_minifloat import fused_minifloat_kernel
        return fused_minifloat_kernel(lw, parts)
    mod = importlib.import_module(f"{__package__}.kernels.lowbit")
    args, sizes = stacked_int_args(parts)
    config = lw.kernel_config(mod, "int_weight_matmul", args)
    built = mod.int_weight_matmul(c_name(f"nf_int_{parts[0].name}_and_{len(parts) - 1}"), **args,
                                  target=lw.llvm_target, **({} if config is None else {"config": config}))
    consts = lowbit_consts_at_load(lw, parts, built, args) or \
        [lw.extra(parts[0].name, f"{built.name}.{i}", c) for i, c in enumerate(built.consts)]
    for w in parts:
        lw.kernel_notes[w.name] = {"function": built.name, "stacked_with": [p.name for p in parts if p is not w],
                                   **_jsonable(built.notes)}
    return lw.func(built.name, built.func), consts, sizes, stacked_perm(lw, parts)


def embedding_rows(lw, w: Value, ids: Value, kernel):
    """The embedding of token ids ``ids`` (an IR value of any shape) in the int8/int4 (or FP4/FP8)
    table ``w``: rows gathered and dequantised from the arrays of its lowbit kernel
    (kernels.lowbit.gather_rows), so a table tied to an LM head is read from the head's arrays and
    no float copy of it is made. ``kernel``: the capability row's Kernel of a linear layer on ``w``
    (capabilities.LOWBIT or MINIFLOAT)."""
    from tvm.relax import op
    from ...ir import symbolic as sym
    from .kernels.lowbit import gather_rows
    from .kernels.lowbit_minifloat import minifloat_gather_rows
    from .weights_minifloat import minifloat_args
    linear_kernel(lw, w, kernel)
    gather, args = (minifloat_gather_rows, minifloat_args) if kernel.module == "lowbit_minifloat" else \
        (gather_rows, int_args)
    name, func, plan = gather(c_name(w.name), **args(w.encoding), target=lw.llvm_target)
    count = lw.dim(sym.prod(ids.shape))
    flat = lw.emit(op.reshape(lw.arg(ids), lw.relax.ShapeExpr([count])))
    if ids.dtype.name != "int64":       # the gather kernels index with int64 (token ids may come as int32)
        flat = lw.emit(op.astype(flat, "int64"))
    rows = lw.emit(lw.relax.call_tir(lw.func(name, func), [flat, *lw.kernel_consts[w.name]],
                                     lw.relax.TensorType([count, plan.k], "float32")), name)
    return op.reshape(rows, lw.relax.ShapeExpr(lw.shape([*ids.shape, plan.k])))


def _with_dispatch(lw, w: Value, kernel, consts: list, perm, layer: str, rows) -> tuple | None:
    """The linear_kernel entry of a layer joined with the dense GEMM on its row count
    (kernels/dispatch.py): every eligible layer in the dispatcher's measuring pass, the layers
    whose dense kernel won somewhere in its final pass; None otherwise."""
    if not lw.dispatcher.enabled or rows is None or w.dtype.name != "float32" or len(w.shape) != 2:
        return None
    n, k = kernel.n, kernel.k
    decision = lw.dispatcher.plan(layer or w.name, w.name, kernel.name, rows, dense_bytes=4 * n * k)
    if decision is None or not (decision.dispatched or lw.dispatcher.measuring):
        return None
    from .kernels.dense import vector_lanes
    from .kernels.dispatch import rows_dispatch
    dense = lw.dense_kernel(n, k)
    name = c_name(f"nf_dispatch_{w.name}")
    func = rows_dispatch(name, kernel.func, dense.func, compressed_below=decision.low == "compressed",
                         lanes=vector_lanes(lw.target))
    threshold = lw.extra(w.name, "rows_threshold", np.array([decision.threshold], np.int64))
    lw.dispatch_params[w.name] = lw.params.index(threshold)
    # (x, threshold, *compressed weights, panels, bias, y): the caller appends the bias, as for the dense GEMM
    args = [threshold, *consts, lw.dense_panels_at_load(w, perm)]
    gv = lw.func(name, func)
    # layers of one shape share one function (the BlockBuilder merges equal PrimFuncs; weights and
    # threshold are arguments): the in-model timing tells them apart by call order
    lw.dispatcher.symbols[layer or w.name] = gv.name_hint
    decision.joined = True
    return gv, args, n, perm, True


__all__ = ["bsr_args", "c_name", "int8_blocks", "int8_bsr_args", "int8_bsr_kernel", "int_args", "linear_kernel",
           "numpy_of", "widened_int8_args"]

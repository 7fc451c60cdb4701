"""Which kernel runs each linear layer's weight, and the arrays it reads (as onnx/weights.py).

``KERNELS`` maps an encoding kind to a kernel module under kernels/, its builder, and the function
turning the weight into the builder's arguments: dense fp32 weights run on the scheduled GEMM of
kernels/dense.py (packed into panels at load), block-sparse weights on kernels/bsr.py (fp32 blocks)
or kernels/bsr_int8.py (int8 codes with row scales after a static int8 activation), 8/4-bit integer
weights on kernels/lowbit.py; anything else is decoded to fp32 with a reported Fallback.
The functions taking ``lw`` get the :class:`~.lower.Lowering` in progress, as the rules of
:mod:`.ops` do.
"""
from __future__ import annotations

import importlib
import re
from typing import Callable

import numpy as np

from ...ir import Dense, Value
from ..base import BackendError, Fallback
from .kernels import KernelError


def c_name(text: str) -> str:
    """A C-identifier-safe function name."""
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def numpy_of(t) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        raise BackendError("bfloat16 tensors have no numpy form; the tvm backend takes fp32/fp16 graphs")
    return t.detach().cpu().contiguous().numpy()


def _jsonable(notes: dict) -> dict:
    return {str(k): v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in notes.items()}


def int8_blocks(enc) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 codes [kept, R, C], float32 scale per output row) of a block-sparse weight whose kept
    values are 8-bit signed codes under one scale per output row (``Sparse.row_scale``, as
    ``prune_sparsegpt(format="int8")`` makes them), or None for any other layout."""
    from ...ir import IntQuant
    v = enc.values
    if (enc.pattern.kind != "block" or enc.row_scale is None or not isinstance(v, IntQuant) or v.bits != 8
            or not v.signed or v.zero_point is not None or v.scale.numel() != 1 or v.perm is not None):
        return None
    codes = numpy_of(v.int_codes()).reshape(v.shape).astype(np.int8)
    return codes, (numpy_of(enc.row_scale.float()) * float(v.scale)).astype(np.float32)


def _bsr_args(w: Value) -> dict | None:
    """bsr_matmul's arguments for a block-sparse weight with dense fp32 blocks."""
    enc = w.encoding
    import torch
    if enc.pattern.kind != "block" or not isinstance(enc.values, Dense) or enc.values.data.dtype != torch.float32 \
            or len(enc.shape) != 2:
        return None
    n, k = enc.shape
    return {"row_ptr": numpy_of(enc.row_ptr), "col_idx": numpy_of(enc.index), "blocks": numpy_of(enc.values.data),
            "n": n, "k": k}


def _int8_activation(x: Value):
    """(float input, scale, uint8 zero point) when ``x`` is a static int8/uint8 ``fake_quant`` of a
    float32 tensor: the int8 SpMM kernel quantises that input itself, on the same grid (an int8
    grid is the uint8 grid shifted by 128)."""
    node = x.producer
    if node is None or node.op != "fake_quant" or not node.attrs["format"].is_integer:
        return None
    src = node.inputs[0]
    if src.dtype.name != "float32":
        return None
    shift = 128 if node.attrs["format"].int_range[0] < 0 else 0
    return src, float(node.attrs["scale"]), int(node.attrs["zero_point"]) + shift


def int8_bsr_kernel(lw, w: Value, x: Value):
    """(GlobalVar, const param vars, n, the float input to pass) of the u8 x s8 BSR kernel for a
    linear whose int8 block-sparse weight reads a statically int8-quantised activation; None when
    the weight or the activation is not in that form (or the kernel refuses it, reported)."""
    act = _int8_activation(x)
    found = int8_blocks(w.encoding) if len(w.shape) == 2 else None
    if act is None or found is None:
        return None
    src, x_scale, zp = act
    key = (w.name, x_scale, zp)
    if key not in lw._linear:
        from .kernels.bsr_int8 import bsr_matmul_int8
        enc = w.encoding
        codes, row_scale = found
        n, k = enc.shape
        try:
            kernel = bsr_matmul_int8(c_name(f"nf_bsr_i8_{w.name}_{len(lw._linear)}"), numpy_of(enc.row_ptr),
                                     numpy_of(enc.index), codes, row_scale, x_scale, zp, n, k, lw.llvm_target)
        except KernelError as e:
            lw.fallbacks.append(Fallback(w.name, enc.describe(), f"int8 BSR kernel refused it ({e}): ran as fp32"))
            return None
        consts = [lw.extra(w.name, f"{kernel.name}.{i}", c) for i, c in enumerate(kernel.consts)]
        lw.kernel_notes[w.name] = {"function": kernel.name, **_jsonable(kernel.notes)}
        lw._linear[key] = (lw.func(kernel.name, kernel.func), consts, kernel.n, src)
    return lw._linear[key]


def _bsr_int8_weight_args(w: Value) -> dict | None:
    """bsr_matmul's arguments for int8 block codes with row scales read by fp32 activations: the
    codes widened to fp32 blocks for the fp32 kernel (the int8 kernel needs int8 activations),
    reported by the caller as a fallback."""
    found = int8_blocks(w.encoding)
    if found is None or len(w.shape) != 2:
        return None
    codes, row_scale = found
    enc = w.encoding
    n, k = enc.shape
    rows = np.repeat(np.arange(n // enc.pattern.r), np.diff(numpy_of(enc.row_ptr).astype(np.int64)))
    scale = row_scale.reshape(-1, enc.pattern.r)[rows][:, :, None]
    return {"row_ptr": numpy_of(enc.row_ptr), "col_idx": numpy_of(enc.index),
            "blocks": (codes.astype(np.float32) * scale).astype(np.float32), "n": n, "k": k}


def _int_args(w: Value) -> dict | None:
    """int_weight_matmul's arguments for an 8- or 4-bit IntQuant weight: zero points in the domain
    of the stored code fields (a signed weight's offset-binary bias folded in), None for signed
    symmetric codes (the kernel then subtracts 2**(bits-1))."""
    enc = w.encoding
    if enc.bits not in (4, 8) or len(enc.shape) != 2 or enc.out_dtype.name != "float32":
        return None
    n, k = enc.shape
    zp = None
    if enc.zero_point is not None:
        zp = numpy_of(enc.zero_point).astype(np.int32) + ((1 << (enc.bits - 1)) if enc.signed else 0)
    elif not enc.signed:
        zp = np.zeros(tuple(enc.scale.shape), dtype=np.int32)
    return {"codes": numpy_of(enc.codes), "bits": enc.bits, "scale": numpy_of(enc.scale.float()),
            "zero_point": zp, "group_size": enc.group_size, "n": n, "k": k}


# encoding kind -> (kernel module under kernels/, its builder, the function turning the weight into
# the builder's keyword arguments, or None when the kernel does not take this variant)
KERNELS: dict[str, tuple[str, str, Callable[[Value], dict | None]]] = {
    "sparse": ("bsr", "bsr_matmul", lambda w: _bsr_args(w) or _bsr_int8_weight_args(w)),
    "int": ("lowbit", "int_weight_matmul", _int_args),
}


def linear_kernel(lw, w: Value, layer: str = "", rows=None) -> tuple:
    """(GlobalVar, const param vars, n, act-order perm var or None, bias in the kernel) for the
    linear weight ``w``, built once per weight. ``layer`` and ``rows`` (the IR dim of the rows x
    has, flattened) let the dispatcher measure the compressed kernel against the dense one
    (dispatch.py) the first time the weight is used."""
    if w.name in lw._linear:
        return lw._linear[w.name]
    enc = w.encoding
    name = c_name(f"nf_{enc.kind}_{w.name}")
    kernel = perm = None
    plan = KERNELS.get(enc.kind)
    why = ""
    if plan is not None:
        module, builder, args_of = plan
        args = args_of(w)
        if args is None:
            why = f"the {module} kernel does not take this variant"
        else:
            try:
                mod = importlib.import_module(f"{__package__}.kernels.{module}")
            except ModuleNotFoundError as e:
                if e.name != f"{__package__}.kernels.{module}":
                    raise
                why = f"kernel module kernels/{module}.py is not available"
            else:
                try:
                    config = lw.kernel_config(mod, builder, args)
                    extra = {} if config is None else {"config": config}
                    kernel = getattr(mod, builder)(name, **args, target=lw.llvm_target, **extra)
                except KernelError as e:
                    why = str(e)
    if kernel is not None:
        if enc.kind == "sparse" and int8_blocks(enc) is not None:
            lw.fallbacks.append(Fallback(w.name, enc.describe(), "int8 block codes widened to fp32 blocks for the fp32 "
                                         "BSR kernel: the int8 kernel needs a static int8 activation "
                                         "(quantize_activations) on this layer's input"))
        consts = [lw.extra(w.name, f"{kernel.name}.{i}", c) for i, c in enumerate(kernel.consts)]
        if getattr(enc, "perm", None) is not None:
            perm = lw.extra(w.name, "perm", numpy_of(enc.perm).astype(np.int64))
        entry = _with_dispatch(lw, w, kernel, consts, perm, layer, rows) or \
            (lw.func(kernel.name, kernel.func), consts, kernel.n, perm, False)
    else:
        if not isinstance(enc, Dense) and w.name not in lw._dense:
            lw._dense[w.name] = lw.extra(w.name, "decoded", lw.decoded(w, why))
        n, k = w.shape
        kernel = lw.dense_kernel(n, k)
        entry = (lw.func(kernel.name, kernel.func), [lw.panels(w)], n, None, True)
    lw.kernel_notes[w.name] = {"function": kernel.name, **_jsonable(kernel.notes)}
    lw._linear[w.name] = entry
    return entry


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


__all__ = ["KERNELS", "c_name", "int8_blocks", "int8_bsr_kernel", "linear_kernel", "numpy_of"]

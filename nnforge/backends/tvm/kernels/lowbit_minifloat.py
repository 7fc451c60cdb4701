"""Weight-only minifloat linear layers on the lowbit kernel: ``y = x @ W.T`` with W read as its
FP4 (E2M1) or FP8 (E4M3, E5M2) codes, ``W[n, j] = value(code[n, j]) * scale[n, j // group_size]``.

The codes are the bytes nnforge stores (two FP4 codes a byte, low nibble first; one FP8 code a
byte), in the layouts of kernels/lowbit.py, so a weight streams 4 or 8 bits and no float copy of
it exists; the kernel turns each code into its value in the k loop (kernels/minifloat_codes.py).
FP4 runs on the int4 schedules, the AVX-512 VNNI dot GEMV included (twice an E2M1 value is a
small integer); FP8 on the float GEMV and prefill ones. Scales are float32 per tensor, channel or
group: MX blocks' E8M0 exponents, and NVFP4's E4M3 block scales times its global scale, come
decoded (``MiniFloat.scale_values``); the builder folds in the power of two a format leaves to its
scale (``minifloat_codes.SCALE_FACTOR``).

    >>> kern = minifloat_weight_matmul("fc1.weight", codes, "e2m1", scale, 32, n=3072, k=768,
    ...                                target="llvm -mcpu=native")
    >>> kern.func, [c.shape for c in kern.consts]   # PrimFunc (x, codes, scale, y) and its arrays
"""
from __future__ import annotations

import numpy as np

from . import Kernel, KernelError
from .lowbit import _checked, checked_kernel, gather_rows, layout_problem
from .minifloat_codes import BITS, FORMATS, SCALE_FACTOR


def format_problem(fmt: str, group_size: int, n: int, k: int) -> str | None:
    """Why the kernel cannot read ``fmt`` codes (a format's short name) of an ``[n, k]`` weight in
    groups of ``group_size``, or None when it can (the tvm capability table asks this too).

    >>> format_problem("e3m2", 32, 8, 64)
    'e3m2 codes are not read by the minifloat weight matmul kernel (it reads e2m1, e4m3, e5m2)'
    """
    if fmt not in FORMATS:
        return f"{fmt} codes are not read by the minifloat weight matmul kernel (it reads {', '.join(FORMATS)})"
    return layout_problem(BITS[fmt], group_size, n, k)


def kernel_scale(scale: np.ndarray, fmt: str) -> np.ndarray:
    """The float32 scales the kernel reads for a weight's decoded ``scale`` (what the bundle's
    ``prepare`` makes too: tvm/weights.py)."""
    return (scale.astype(np.float32) * np.float32(SCALE_FACTOR[fmt])).astype(np.float32)


def minifloat_weight_matmul(name: str, codes, fmt: str, scale, group_size: int, n: int, k: int,
                            target: str) -> Kernel:
    """``y = x @ W.T`` for a minifloat-coded weight W [n, k] (see the module doc).

    codes: uint8 [n, ceil(k*bits/8)] packed by ``nnforge.ir.packing.pack_bits`` (``MiniFloat.codes``);
    fmt: "e2m1", "e4m3" or "e5m2"; scale: float [n or 1, G], G = ceil(k / group_size), the decoded
    scales with any global scale folded in; target: an LLVM target string. The PrimFunc's
    parameters are ``(x, codes, scale, y)``. Raises KernelError naming ``name`` for other formats,
    arrays that do not match [n, k] and group_size, and an odd k or group_size with FP4 codes.
    """
    why = format_problem(fmt, group_size, n, k)
    if why is not None:
        raise KernelError(f"{name}: {why}")
    bits = BITS[fmt]
    codes, scale, _ = _checked(name, codes, bits, scale, None, group_size, n, k)
    return checked_kernel(name, codes, bits, kernel_scale(scale, fmt), None, group_size, n, k, target,
                          "minifloat_weight_matmul", fmt)


def minifloat_gather_rows(name: str, codes, fmt: str, scale, group_size: int, n: int, k: int, target: str):
    """(function name, PrimFunc, plan) gathering rows of the weight :func:`minifloat_weight_matmul`
    builds from the same arguments, from the arrays that kernel reads (a token embedding tied to a
    minifloat LM head reads the head's codes)."""
    why = format_problem(fmt, group_size, n, k)
    if why is not None:
        raise KernelError(f"{name}: {why}")
    return gather_rows(name, codes, BITS[fmt], kernel_scale(np.asarray(scale), fmt), None, group_size, n, k, target,
                       fmt)


__all__ = ["format_problem", "kernel_scale", "minifloat_gather_rows", "minifloat_weight_matmul"]

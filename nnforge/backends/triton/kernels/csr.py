"""CSR weights (``Sparse`` in 1x1 blocks, float values) as a gather kernel: ``FORMAT = "csr"``.

These are the few weights a layer keeps apart from its grid (SpQR's outliers, beside a
quantised linear): around one in a hundred, at no fixed place. With so few, tensor cores have
nothing to chew on and the cost is reading x's columns that the kept values name, so each
program takes one output row of W and a tile of M, walks that row's kept values in chunks and
gathers the x columns they name, accumulating value * x in fp32. A row with no kept value
writes zero (or its bias).

Layout of :func:`pack` (W is [N, K], nnz kept values in row-major order, as ``Sparse`` stores a
``block1x1`` weight):

- ``values`` [nnz]: the kept values in their stored float dtype (fp32, fp16 or bf16), kept
  exactly: an outlier is by definition a value a coarse format would round badly.
- ``col`` int32 [nnz]: the column of each value.
- ``row_ptr`` int32 [N + 1]: row n's values are ``values[row_ptr[n]:row_ptr[n + 1]]``.

    >>> enc = Sparse.from_mask(delta, delta != 0, "block1x1")
    >>> y = matmul(x.half().cuda(), pack(enc, "h100").to("cuda"))     # == x @ enc.decode().T
"""
from __future__ import annotations

import torch

from ....ir import Dense, Sparse
from ....ir.encodings import rows_cols
from . import KernelError, PackedWeight
from .common import check_operands, unsupported

FORMAT = "csr"
VERSION = 1
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Kept values one program gathers per step, and the most rows of x it keeps: the tile is
# BLOCK_M x BLOCK_NZ fp32 partial products, small enough for registers at any M.
BLOCK_NZ = 32
MAX_BLOCK_M = 64


def supports(enc, target) -> str | None:
    """None when ``enc`` (a ``block1x1`` Sparse of float values, no row scale) runs here for
    ``target``, else why not. Example: ``supports(enc, "h100") is None``."""
    why = unsupported(enc, target, Sparse, FORMAT)
    if why is not None:
        return why
    p = enc.pattern
    if p.kind != "block" or (p.r, p.c) != (1, 1):
        return f"pattern {p.name}: csr runs block1x1 (CSR) only"
    if enc.row_scale is not None:
        return "a row_scale: csr runs float kept values without per-row scales"
    if not isinstance(enc.values, Dense) or enc.values.data.dtype not in VALUE_DTYPES:
        return f"kept values as {enc.values.describe()}: csr runs float32, float16 or bfloat16 (Dense) kept values"
    return None


def pack(enc, target) -> PackedWeight:
    """The layout of the module docstring. Example: ``pw = pack(enc, "h100")``."""
    reason = supports(enc, target)
    if reason:
        raise KernelError(f"csr cannot pack this weight: {reason}")
    n, k = rows_cols(enc.shape)
    values = enc.values.data.reshape(-1).contiguous()
    t = {"values": values, "col": enc.index.to(torch.int32).contiguous(),
         "row_ptr": enc.row_ptr.to(torch.int32).contiguous()}
    meta = {"target": getattr(target, "name", target), "version": VERSION, "nnz": int(values.numel())}
    return PackedWeight(FORMAT, n, k, t, meta)


# --- the kernel ---------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:            # supports() and pack() run at compile time without triton
    triton = tl = None


def csr_kernel(x_ptr, v_ptr, col_ptr, rp_ptr, bias_ptr, y_ptr, M, stride_xm, stride_xk, stride_ym,
               BM: tl.constexpr, BNZ: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    start = tl.load(rp_ptr + row)
    end = tl.load(rp_ptr + row + 1)
    # per-lane partial sums, reduced once at the end rather than every step
    acc = tl.zeros((BM, BNZ), dtype=tl.float32)
    for j in range(start, end, BNZ):
        offs = j + tl.arange(0, BNZ)
        ok = offs < end
        col = tl.load(col_ptr + offs, mask=ok, other=0)
        v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        xv = tl.load(x_rows + col.to(tl.int64)[None, :] * stride_xk, mask=m_ok[:, None] & ok[None, :], other=0.0)
        acc += xv.to(tl.float32) * v[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + row).to(tl.float32)
    tl.store(y_ptr + offs_m.to(tl.int64) * stride_ym + row, y.to(y_ptr.dtype.element_ty), mask=m_ok)


# Jitted here rather than decorated, so that the module (supports, pack) imports without triton.
if triton is not None:
    csr_kernel = triton.jit(csr_kernel)


def block_m(m: int) -> int:
    """Rows of x per program: all of them up to :data:`MAX_BLOCK_M` (a power of two), so the
    weight's indices are read once per tile of M."""
    return min(MAX_BLOCK_M, 1 << max(0, (m - 1).bit_length()))


def _check(x: torch.Tensor, w: PackedWeight, bias):
    check_operands(x, w, bias, FORMAT, ("values", "col", "row_ptr"), ("nnz",), leading_dims=True, dtypes=X_DTYPES)
    t, nnz = w.tensors, w.meta["nnz"]
    want = {"values": (VALUE_DTYPES, (nnz,)), "col": ((torch.int32,), (nnz,)),
            "row_ptr": ((torch.int32,), (w.n + 1,))}
    for name, (dts, shape) in want.items():
        got = t[name]
        if tuple(got.shape) != shape or got.dtype not in dts:
            raise KernelError(f"csr weight tensor {name!r} is {got.dtype} {tuple(got.shape)}; expected "
                              f"{' or '.join(str(d).removeprefix('torch.') for d in dts)} {shape} (re-pack it)")


def matmul(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with W the packed CSR weight; x fp16, bf16 or fp32 [..., K], y in x's
    dtype. Example: ``y = matmul(x, pack(enc, "h100"))``."""
    if triton is None:
        raise KernelError("csr needs the triton package to run (pip install triton)")
    _check(x, w, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    m, n = x2.shape[0], w.n
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    bm = block_m(m)
    t = w.tensors
    # a decode tile is one warp's worth of lanes; more warps would only idle
    csr_kernel[(n, triton.cdiv(m, bm))](x2, t["values"], t["col"], t["row_ptr"], bias if bias is not None else y, y,
                                        m, x2.stride(0), x2.stride(1), y.stride(0),
                                        BM=bm, BNZ=BLOCK_NZ, HAS_BIAS=bias is not None,
                                        num_warps=4 if bm * BLOCK_NZ >= 1024 else 1)
    return y.reshape(*lead, n)


def signature(x_dtype: str = "fp16", value_dtype: str = "fp32") -> dict[str, str]:
    """Triton argument types of the kernel, for ``compile_for`` (AOT compile tests)."""
    ptrs = {"x_ptr": f"*{x_dtype}", "v_ptr": f"*{value_dtype}", "col_ptr": "*i32", "rp_ptr": "*i32",
            "bias_ptr": f"*{x_dtype}", "y_ptr": f"*{x_dtype}"}
    ints = dict.fromkeys(("M", "stride_xm", "stride_xk", "stride_ym"), "i32")
    return {**ptrs, **ints, **dict.fromkeys(("BM", "BNZ", "HAS_BIAS"), "constexpr")}


__all__ = ["FORMAT", "BLOCK_NZ", "MAX_BLOCK_M", "supports", "pack", "matmul", "block_m", "signature", "csr_kernel"]

"""The ``hadamard`` op: ``x @ kron(H_m, H_p) / sqrt(block)`` down the diagonal of the last axis
(:mod:`nnforge.ir.hadamard` holds the matrix), fp32 inside, the result in x's dtype (float32,
float16 or bfloat16).

One program per tile of rows and block. Each of the block's ``m`` slices of ``p`` values is loaded,
transformed by ``log2(p)`` butterfly stages in registers (the reference's stages, in its order),
and added into the block's ``m`` outputs times its row of the Paley factor ``H_m``, a dense
product; the scale comes last. Like :mod:`.attention` this module packs nothing (the matrix is the
op's), so a bundle records no source for it.

    >>> y = hadamard(x, block=640)       # == hadamard_transform(x, 640): m = 20, p = 32
"""
from __future__ import annotations

import functools
import math

import torch

from ....ir.hadamard import factors, small_matrix
from . import KernelError, interpreting
from .common import unsupported_target

try:
    import triton
    import triton.language as tl
except ModuleNotFoundError:          # the capability table says why (kernel_module)
    triton = tl = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# fp32 values of the outputs a program accumulates (rows x m padded to a power of two x p); the
# interpreter pays per operation, not per element, so it takes far more rows at once
TILE_ELEMENTS = 4096
INTERP_TILE_ELEMENTS = 1 << 16
# a block whose padded outputs exceed this no longer fits one program's registers; torch runs it
MAX_BLOCK_ELEMENTS = 1 << 14


if triton is not None:
    @triton.jit
    def _hadamard_kernel(x_ptr, h_ptr, y_ptr, R, M, blocks, stride_x, stride_y, scale,
                         BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, M_PAD: tl.constexpr, P: tl.constexpr,
                         LOG_P: tl.constexpr):
        # one grid axis (the only one without a 65535 limit) over (tile of rows, block)
        pid = tl.program_id(0)
        rows = (pid // blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = rows < R
        first = (pid % blocks) * BLOCK
        offs_p = tl.arange(0, P)
        offs_j = tl.arange(0, M_PAD)
        mask_j = offs_j < M
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x + first
        acc = tl.zeros((BLOCK_R, M_PAD, P), tl.float32)
        for i in range(M):
            x = tl.load(x_rows + i * P + offs_p[None, :], mask=mask_r[:, None], other=0.0).to(tl.float32)
            # each stage pairs the lowest index bit and moves it to the top, so that the pairs
            # are adjacent values every time and log2(p) stages leave the natural order
            for _ in tl.static_range(LOG_P):
                a, b = tl.split(tl.reshape(x, (BLOCK_R, P // 2, 2)))
                x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (BLOCK_R, P))
            h = tl.load(h_ptr + i * M + offs_j, mask=mask_j, other=0.0)
            acc += x[:, None, :] * h[None, :, None]
        y = y_ptr + rows.to(tl.int64)[:, None, None] * stride_y + first + offs_j[None, :, None] * P \
            + offs_p[None, None, :]
        tl.store(y, (acc * scale).to(y_ptr.dtype.element_ty), mask=mask_r[:, None, None] & mask_j[None, :, None])


def _padded(block: int) -> int:
    m, p = factors(block)
    return (1 << (m - 1).bit_length()) * p


def _block_problem(block) -> str | None:
    """Why this kernel cannot transform blocks of ``block``, or None."""
    if isinstance(block, bool) or not isinstance(block, int) or factors(block) is None:
        return f"no Hadamard matrix of size {block!r}"
    if _padded(block) > MAX_BLOCK_ELEMENTS:
        return (f"block {block} holds {_padded(block)} values with m padded to a power of two, over the "
                f"{MAX_BLOCK_ELEMENTS} one program keeps")
    return None


def supports(block: int, target) -> str | None:
    """None when a ``hadamard`` of ``block`` runs in this kernel on ``target``; otherwise why not.

    >>> supports(12 * 4096, "h100")
    'block 49152 holds 65536 values with m padded to a power of two, over the 16384 one program keeps'"""
    return unsupported_target(target, "Hadamard transform") or _block_problem(block)


def constexprs(block: int, rows: int) -> dict:
    """The kernel's constexpr arguments for ``block`` and tiles of ``rows`` rows (also the AOT tests')."""
    m, p = factors(block)
    return dict(BLOCK=block, BLOCK_R=rows, M_PAD=triton.next_power_of_2(m), P=p, LOG_P=p.bit_length() - 1)


def rows_per_program(block: int, rows: int) -> int:
    """Rows of a tile: as many as the tile budget holds, a power of two, no more than ``rows`` needs."""
    budget = INTERP_TILE_ELEMENTS if interpreting() else TILE_ELEMENTS
    fit = max(1, budget // _padded(block))
    return min(triton.next_power_of_2(max(rows, 1)), 1 << (fit.bit_length() - 1))


@functools.lru_cache(maxsize=None)
def _small_matrix_on(m: int, device: torch.device) -> torch.Tensor:
    # one copy per device, made by the first (eager) call: a CUDA graph capture may not copy
    # from the host
    return small_matrix(m).to(device, torch.float32).contiguous()


def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ hadamard_matrix(block, x.shape[-1])`` for ``x`` [..., n] (float32, float16 or bfloat16,
    ``block`` dividing n), in x's dtype.

    >>> hadamard(torch.randn(4, 384, dtype=torch.float16, device="cuda"), 384).dtype
    torch.float16"""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in DTYPES:
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelError(f"hadamard: x must be a float32, float16 or bfloat16 tensor [..., n], got {got}")
    why = _block_problem(block)
    if why is not None:
        raise KernelError(f"hadamard: {why}")
    n = x.shape[-1]
    if n % block:
        raise KernelError(f"hadamard: block {block} does not divide the last dim of x {list(x.shape)}")
    if x.numel() == 0:
        return torch.empty_like(x)
    rows = x.reshape(-1, n)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    m = factors(block)[0]
    tile = rows_per_program(block, rows.shape[0])
    _hadamard_kernel[(triton.cdiv(rows.shape[0], tile) * (n // block),)](
        rows, _small_matrix_on(m, x.device), y, rows.shape[0], m, n // block, rows.stride(0), y.stride(0),
        1.0 / math.sqrt(block), **constexprs(block, tile), num_warps=8 if _padded(block) > TILE_ELEMENTS else 4)
    return y.reshape(x.shape)


__all__ = ["supports", "hadamard", "constexprs", "rows_per_program", "DTYPES", "MAX_BLOCK_ELEMENTS"]

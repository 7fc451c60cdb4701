"""float32 arithmetic in an order a backend can follow op for op (kv-gear4's power iteration,
docs/kv_cache.md): sums as halving trees, IEEE-rounded square roots, Gram-Schmidt in column order,
rank-1 terms added in order. A library's matmul or sum picks its own order (and blocking), so its
last bits differ between libraries and between shapes; these do not.
"""
from __future__ import annotations

import math

import torch


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis in a fixed order a backend can follow op for op: zeros pad it to a
    power of two, then its second half is added to its first until one element is left (a
    library's sum picks its own order, and a last-bit difference would reach the stored factors)."""
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        x = torch.nn.functional.pad(x, (0, width - n))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def sqrt32(x: torch.Tensor) -> torch.Tensor:
    """The float32 square root of float32 ``x`` >= 0 rounded to nearest as IEEE defines it (what
    ONNX Runtime's and numpy's sqrt give): torch's float32 sqrt is off by an ulp on some CPUs, so
    the float64 root is rounded to float32 and moved to a neighbour when the midpoint towards it
    squares (exactly, in float64: 25 bits) to the other side of ``x``."""
    y = torch.sqrt(x.to(torch.float64)).to(torch.float32)
    wide = x.to(torch.float64)
    for towards, too_far in ((math.inf, lambda m: m * m < wide), (-math.inf, lambda m: m * m > wide)):
        other = torch.nextafter(y, torch.full_like(y, towards))
        y = torch.where((x > 0) & too_far((y.to(torch.float64) + other.to(torch.float64)) / 2), other, y)
    return y


def gram_schmidt(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., n, r] with orthonormal columns, modified Gram-Schmidt in column order: column
    j less its projections on columns 0 .. j-1 (each in turn, on the running remainder), divided by
    its norm; a column of norm 0 stays 0."""
    cols = []
    for j in range(x.shape[-1]):
        v = x[..., j]
        for q in cols:
            v = v - tree_sum(q * v)[..., None] * q
        norm = sqrt32(tree_sum(v * v))[..., None]
        cols.append(torch.where(norm > 0, v / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(v)))
    return torch.stack(cols, dim=-1)


def power_start(cols: int, rank: int) -> torch.Tensor:
    """The fixed start of the power iteration, float32 [cols, rank]: Walsh signs (-1)^popcount(i & j),
    exact in any arithmetic; column 0 is all ones."""
    i, j = torch.arange(cols)[:, None], torch.arange(rank)[None, :]
    bits = i & j
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(torch.float32)


def low_rank(e: torch.Tensor, rank: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [..., n, rank], B [..., rank, d]) float32 with A @ B the projection of ``e`` [..., n, d]
    onto a rank-``rank`` row space found by ``iterations`` steps of subspace iteration from
    :func:`power_start`: U = gs(E V), V = gs(E^T U); then A = E V, B = V^T. Every product is an
    elementwise product summed by :func:`tree_sum`."""
    v = power_start(e.shape[-1], rank).expand(*e.shape[:-2], -1, -1)
    for _ in range(iterations):
        u = gram_schmidt(tree_sum(e[..., :, None, :] * v.transpose(-1, -2)[..., None, :, :]))
        v = gram_schmidt(tree_sum(e.transpose(-1, -2)[..., :, None, :] * u.transpose(-1, -2)[..., None, :, :]))
    a = tree_sum(e[..., :, None, :] * v.transpose(-1, -2)[..., None, :, :])
    return a, v.transpose(-1, -2)


def low_rank_term(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A @ B [..., n, d] of A [..., n, r], B [..., r, d] as a backend computes it: the rank-1
    products a_j b_j added in order j = 0 .. r-1 (no fused multiply-add, no library matmul)."""
    out = a[..., :, 0:1] * b[..., 0:1, :]
    for j in range(1, a.shape[-1]):
        out = out + a[..., :, j:j + 1] * b[..., j:j + 1, :]
    return out


def top_magnitudes(x: torch.Tensor, k: int) -> torch.Tensor:
    """int64 indices [..., k] of the ``k`` entries of largest magnitude along the last axis, the
    largest first, equal magnitudes lower index first (ONNX TopK's order)."""
    return torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices[..., :k]


__all__ = ["tree_sum", "sqrt32", "gram_schmidt", "power_start", "low_rank", "low_rank_term", "top_magnitudes"]

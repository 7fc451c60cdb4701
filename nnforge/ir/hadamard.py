"""Orthonormal Hadamard transforms: the one matrix every kernel of the ``hadamard`` op, and every
weight the ``rotate`` pass folds a rotation into, agree on.

A block of size ``b = m * p`` (``p`` a power of two, ``m`` 1 or the order of a Paley matrix)
transforms as ``x @ kron(H_m, H_p) / sqrt(b)``: ``H_p`` is Sylvester's (symmetric, applied as
``log2(p)`` butterfly stages), ``H_m`` Paley's construction I from the quadratic residues of a prime
``q = m - 1`` with ``q % 4 == 3`` (not symmetric). That covers the widths of real models whose
hidden size is not a power of two (384 = 12 * 32, 640 = 20 * 32, 1536 = 12 * 128, 5632 = 44 * 128);
a width it does not cover is transformed in equal blocks of the largest size it does
(:func:`largest_block`), as QuaRot does for the dimensions it has no matrix for.

    >>> y = hadamard_transform(x, block=640)     # == x @ hadamard_matrix(640)
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

_MAX_PALEY = 128          # the largest m tried: a dense m x m product per block of p


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def factors(block: int) -> tuple[int, int] | None:
    """``(m, p)`` with ``block == m * p``, ``p`` a power of two and ``m`` 1 or a Paley order (the
    largest ``p``); None where ``block`` has no such split."""
    if block < 1:
        return None
    p = block & -block                  # the largest power of two dividing block
    while p >= 1:
        m = block // p
        if m == 1 or (m <= _MAX_PALEY and m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3):
            return m, p
        p //= 2
    return None


def largest_block(n: int, limit: int = 0) -> int:
    """The largest divisor of ``n`` (at most ``limit``, when given) that :func:`factors` splits (at
    least 1): the block size the ``rotate`` pass transforms a width of ``n`` in."""
    for b in sorted((d for d in range(1, math.isqrt(n) + 1) if n % d == 0 for d in (d, n // d)), reverse=True):
        if (not limit or b <= limit) and factors(b) is not None:
            return b
    return 1


@lru_cache(maxsize=None)
def _paley(m: int) -> torch.Tensor:
    """The Paley-I Hadamard matrix of order ``m`` (entries +-1, float64)."""
    q = m - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]        # Q[i, j] = chi(j - i), antisymmetric
    s = torch.zeros(m, m, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jacobsthal
    return s + torch.eye(m, dtype=torch.float64)


@lru_cache(maxsize=None)
def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def small_matrix(m: int) -> torch.Tensor:
    """``H_m`` of a block's split (entries +-1, float64): the factor kernels apply densely."""
    return _paley(m) if m > 1 else torch.ones(1, 1, dtype=torch.float64)


def check_block(block: int, where: str) -> tuple[int, int]:
    """``factors(block)``, or a ValueError naming ``where`` and the sizes that would do."""
    split = factors(block)
    if split is None:
        raise ValueError(f"{where}: no Hadamard matrix of size {block} (sizes are 2^k times 1 or a Paley order "
                         f"q+1, q a prime = 3 mod 4: 12, 20, 24, 44, ...); use a block of {largest_block(block)}")
    return split


@lru_cache(maxsize=16)
def _matrix(block: int) -> torch.Tensor:
    m, p = check_block(block, "hadamard")
    return torch.kron(small_matrix(m), _sylvester(p)) / math.sqrt(block)


def hadamard_matrix(block: int, n: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal ``n x n`` matrix ``M`` that ``hadamard_transform(x, block)`` multiplies by
    (``x @ M``): ``kron(H_m, H_p) / sqrt(block)`` repeated down the diagonal (``n`` defaults to
    ``block``)."""
    n = block if n is None else n
    if n % block:
        raise ValueError(f"hadamard: width {n} is not a multiple of the block {block}")
    h = _matrix(block)
    return torch.block_diag(*[h] * (n // block)).to(dtype) if n > block else h.to(dtype)


ONE_PRODUCT = 64       # blocks up to this size: one product with the block's matrix, cheaper than two


def hadamard_split(block: int) -> int:
    """How a kernel splits a block into products: ``block`` itself (one product) up to
    ``ONE_PRODUCT``, else the power of two ``c`` dividing its Sylvester factor with the fewest
    multiply-adds a value (``block // c + c``) when ``x @ H_block`` runs on x viewed
    ``[..., block // c, c]`` as ``H_a^T X H_c`` with ``H_a = hadamard_matrix(block // c)`` and
    ``H_c = hadamard_matrix(c)``: the Kronecker factors of ``H_block``, each orthonormal, because
    :func:`factors` splits ``block // c`` with the same ``m``."""
    _, p = check_block(block, "hadamard")
    if block <= ONE_PRODUCT:
        return block
    return min((1 << i for i in range(p.bit_length())), key=lambda c: (block // c + c, -c))


def hadamard_transform(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ hadamard_matrix(block, x.shape[-1])`` in ``x``'s dtype, in ``O(n log n)``: butterflies
    over the power-of-two factor, then the small factor as a dense product."""
    n = x.shape[-1]
    m, p = check_block(block, "hadamard")
    if n % block:
        raise ValueError(f"hadamard: width {n} is not a multiple of the block {block}")
    lead = x.shape[:-1]
    y = x.reshape(*lead, n // block, m, p)
    h = 1
    while h < p:
        y = y.reshape(*lead, n // block, m, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    y = y.reshape(*lead, n // block, m, p)
    if m > 1:
        y = torch.einsum("...ip,ij->...jp", y, small_matrix(m).to(y.dtype))
    return (y * (1.0 / math.sqrt(block))).reshape(*lead, n)


__all__ = ["factors", "largest_block", "small_matrix", "check_block", "hadamard_matrix", "hadamard_split",
           "hadamard_transform", "ONE_PRODUCT"]

"""nnforge/ir/hadamard.py: the matrix every hadamard kernel and the rotate pass agree on."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import Graph, GraphError, tensor
from nnforge.ir.hadamard import (factors, hadamard_matrix, hadamard_split, hadamard_transform, largest_block,
                                 small_matrix)

# real widths: MiniLM (384, 1536), Gemma 3 270M (640); the split test below takes 2048 and 5632
# (TinyLlama's MLP) without building their dense matrices
BLOCKS = [1, 2, 12, 20, 24, 44, 64, 96, 384, 640, 1536]


@pytest.mark.parametrize("block", BLOCKS)
def test_the_matrix_is_orthonormal_and_the_fast_transform_is_its_product(block):
    m = hadamard_matrix(block)
    assert torch.allclose(m @ m.T, torch.eye(block, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 2 * block, dtype=torch.float64, generator=torch.Generator().manual_seed(block))
    assert torch.allclose(hadamard_transform(x, block), x @ hadamard_matrix(block, 2 * block), atol=1e-10)


@pytest.mark.parametrize("m", [12, 20, 24, 44, 48, 60])
def test_paley_matrices_are_hadamard(m):
    h = small_matrix(m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))


def test_power_of_two_blocks_are_symmetric_so_the_rotate_pass_can_undo_them_with_the_same_op():
    m = hadamard_matrix(64, 128)
    assert torch.equal(m, m.T)
    assert not torch.equal(hadamard_matrix(12), hadamard_matrix(12).T)


def test_factors_and_largest_block():
    assert factors(640) == (20, 32) and factors(384) == (12, 32) and factors(2048) == (1, 2048)
    assert factors(30) is None and factors(0) is None
    assert largest_block(11008) == 256          # 43 * 256: no Paley matrix of order 172 here
    assert largest_block(7) == 1 and largest_block(640) == 640 and largest_block(640, 64) == 64


@pytest.mark.parametrize("block", [128, 384, 640, 2048, 5632])
def test_the_kernel_split_factors_the_block_matrix(block):
    c = hadamard_split(block)
    a = block // c
    assert block % c == 0 and 1 < c < block
    x = torch.randn(3, block, dtype=torch.float64)
    two = hadamard_matrix(a).T @ x.reshape(3, a, c) @ hadamard_matrix(c)
    assert (two.reshape(3, block) - hadamard_transform(x, block)).abs().max() < 1e-12


def test_a_block_without_a_matrix_is_refused_naming_the_node_and_a_size_that_would_do():
    g = Graph("h")
    x = g.add_input("x", tensor("f32", "batch", 60))
    with pytest.raises(GraphError, match=r"node rot \(hadamard\).*no Hadamard matrix of size 30.*block of 2"):
        g.op("hadamard", x, block=30, name="rot")
    with pytest.raises(GraphError, match=r"node rot2 \(hadamard\).*block 24 does not divide"):
        g.op("hadamard", x, block=24, name="rot2")

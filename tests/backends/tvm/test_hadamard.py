"""The tvm backend's ``hadamard`` (two dense-kernel products of its Kronecker factors) against the
interpreter, in one build of tests/backends/hadamard_cases.py's graph."""
from __future__ import annotations

import pytest
import torch

from tests import conftest
from tests.backends.hadamard_cases import check, hadamard_graph

pytest.importorskip("tvm")

from nnforge.backends.tvm import TvmBackend                  # noqa: E402
from nnforge.backends.tvm.ops import ONE_PRODUCT, hadamard_split  # noqa: E402
from nnforge.ir.hadamard import hadamard_matrix, hadamard_transform  # noqa: E402


@pytest.mark.parametrize("block", [128, 384, 640, 2048, 5632])
def test_the_split_factors_the_block_matrix(block):
    c = hadamard_split(block)
    a = block // c
    assert block > ONE_PRODUCT and block % c == 0 and 1 < c < block
    x = torch.randn(3, block, dtype=torch.float64)
    two = hadamard_matrix(a).T @ x.reshape(3, a, c) @ hadamard_matrix(c)
    assert (two.reshape(3, block) - hadamard_transform(x, block)).abs().max() < 1e-12


def test_hadamard_matches_the_interpreter(tmp_path):
    g = hadamard_graph()
    backend = TvmBackend()
    lowered = conftest.lower_into(backend, g, "cpu", tmp_path)
    assert not lowered.fallbacks
    check(g, backend.load(tmp_path, lowered.entry))

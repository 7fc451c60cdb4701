"""The tvm backend's ``hadamard`` (two dense-kernel products of its Kronecker factors) against the
interpreter, in one build of tests/backends/hadamard_cases.py's graph."""
from __future__ import annotations

import pytest

from tests import conftest
from tests.backends.hadamard_cases import check, hadamard_graph

pytest.importorskip("tvm")

from nnforge.backends.tvm import TvmBackend                  # noqa: E402


def test_hadamard_matches_the_interpreter(tmp_path):
    g = hadamard_graph()
    backend = TvmBackend()
    lowered = conftest.lower_into(backend, g, "cpu", tmp_path)
    assert not lowered.fallbacks
    check(g, backend.load(tmp_path, lowered.entry))

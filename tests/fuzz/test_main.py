"""`python -m nnforge.fuzz --ops BACKEND`: a backend's name stands for the ops its LOWERINGS table lowers."""
from __future__ import annotations

import pytest

from nnforge.fuzz.__main__ import _ops


@pytest.mark.parametrize("backend, module", [("onnx", "nnforge.backends.onnx.ops"), ("tvm", "nnforge.backends.tvm.ops"),
                                             ("hls", "nnforge.backends.hls.project")])
def test_a_backend_name_lists_its_lowerings(backend, module):
    import importlib
    ops = _ops(backend)
    assert ops == sorted(importlib.import_module(module).LOWERINGS) and "linear" in ops


def test_hls_ops_include_the_rules_of_its_logic_module():
    assert {"eq", "where", "reduce_sum", "index"} <= set(_ops("hls"))


def test_a_comma_list_or_nothing():
    assert _ops("relu,add") == ["relu", "add"] and _ops(None) is None and _ops("") is None

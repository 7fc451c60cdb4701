"""torch.export and torch-mlir's import of the module the mlir backend builds.

A constant that reaches a list-taking op (a concat, the indices of an index: ViT's class token, BERT's
mask positions) is imported like any other weight, in every dialect, and runs with the reference's
numbers; every op torch-mlir imports carries the IR node it came from, so a failure, in the importer
or in a lowering pass, names that node and its op.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("torch_mlir")

from nnforge.backends.base import BackendError                      # noqa: E402
from nnforge.backends.mlir.export import DIALECTS, export_program, to_mlir  # noqa: E402
from nnforge.backends.mlir.module import GraphModule                 # noqa: E402
from nnforge.backends.mlir.runtime import MlirRunner                 # noqa: E402
from nnforge.ir import Dense, Graph, run_graph, tensor               # noqa: E402


def constant_operands_graph() -> Graph:
    """x[2, 4] -> concat(token, x) on axis 0 -> rows picked by constant indices: both list operands
    of torch-mlir's imports (the tensors of aten.cat, the indices of aten.index) hold a constant."""
    g = Graph("constant_operands")
    x = g.add_input("x", tensor("f32", 2, 4))
    token = g.add_weight("token", Dense(torch.arange(4, dtype=torch.float32).reshape(1, 4) + 10))
    rows = g.add_weight("rows", Dense(torch.tensor([2, 0, 1, 2])))
    y = g.op("concat", token, x, axis=0, name="with_token")
    g.set_outputs([g.op("index", y, rows, name="pick")])
    return g


def program(graph: Graph):
    module, _ = GraphModule.build(graph)
    return export_program(module, graph)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_constants_in_list_operands_are_imported(tmp_path, dialect):
    g = constant_operands_graph()
    path = tmp_path / "m.mlir"
    with open(path, "w") as f:
        to_mlir(program(g), dialect).operation.print(file=f)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    got = MlirRunner(path, {"dialect": dialect}).run_numpy([x.numpy()])[0]
    np.testing.assert_array_equal(got, run_graph(g, [x])[0].numpy())


def test_importer_failure_names_the_node(monkeypatch):
    """The importer raises while at one FX node (as on a list it cannot import): the error names the
    IR node that node was traced from, its op, and what to do."""
    from torch_mlir import fx

    def importer(ep, **_):
        for node in ep.graph.nodes:                  # (torch-mlir's importer walks the nodes so)
            if node.target is torch.ops.aten.cat.default:
                raise AssertionError("Heterogeneous lists are not supported")

    monkeypatch.setattr(fx, "export_and_import", importer)
    with pytest.raises(BackendError, match=r"could not lower node with_token \(op concat\) to tosa: "
                                           r"AssertionError: Heterogeneous.*Try another dialect"):
        to_mlir(program(constant_operands_graph()), "tosa")


def test_lowering_diagnostic_names_the_node(monkeypatch):
    """MLIR locations of the imported ops name their IR node, so a pass's diagnostic, which starts
    with the failing op's location, names it too."""
    from torch_mlir import fx
    raw = fx.export_and_import
    imported = []

    def lower(prog, **kw):
        imported.append(raw(prog, **{**kw, "output_type": "raw"}).operation.get_asm(enable_debug_info=True))
        where = re.search(r'loc\(("nnforge node pick [^"]*":\d+:\d+)\)', imported[0]).group(1)
        raise RuntimeError("Lowering Torch Backend IR -> StableHLO Backend IR failed with the following "
                           f"diagnostics:\n{where}: error: failed to legalize operation 'torch.aten.index.Tensor'")

    monkeypatch.setattr(fx, "export_and_import", lower)
    with pytest.raises(BackendError, match=r"could not lower node pick \(op index\) to stablehlo: RuntimeError"):
        to_mlir(program(constant_operands_graph()), "stablehlo")
    assert 'loc("nnforge node with_token (op concat)":1:0)' in imported[0]


def test_unattributed_failure_says_so(monkeypatch):
    from torch_mlir import fx

    def importer(ep, **_):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(fx, "export_and_import", importer)
    with pytest.raises(BackendError, match="no single IR node could be named.*out of memory"):
        to_mlir(program(constant_operands_graph()), "linalg-on-tensors")

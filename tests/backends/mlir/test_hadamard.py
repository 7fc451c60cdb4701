"""The mlir backend's ``hadamard`` (matmuls with the block's Kronecker factors as constants) in each
dialect, run under torch-mlir's reference JIT against the interpreter; its export leaves
nnforge.ir.hadamard's cached matrices real tensors."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch_mlir")

import nnforge as nf                                                   # noqa: E402
from nnforge.backends.mlir import MODEL_FILE, MlirBackend              # noqa: E402
from nnforge.backends.mlir.export import CONSTANT_OPS, DIALECTS, export_program, parse  # noqa: E402
from nnforge.backends.mlir.module import GraphModule                   # noqa: E402
from nnforge.ir import Dense, Graph, hadamard as H, run_graph, tensor  # noqa: E402
from tests import conftest                                             # noqa: E402
from tests.backends.hadamard_cases import check                        # noqa: E402

ENV = {"batch": 2, "seq": 3}
# (input, dims before the last, width, block): one product (24, 64), two with a Paley factor
# (384 = 12 * 32, 640 = 20 * 32), blocks narrower than the width (24 of 48, 640 of 1280)
CASES = [("x24", ["batch"], 48, 24), ("x64", ["batch", "seq"], 64, 64), ("x384", ["batch"], 384, 384),
         ("x640", ["batch", "seq"], 1280, 640)]


def hadamard_graph() -> Graph:
    g = Graph("hadamard")
    outs = {name: g.op("hadamard", g.add_input(name, tensor("f32", *lead, width)), block=block, name=f"{name}.rotate")
            for name, lead, width, block in CASES}
    down = g.add_weight("down.weight", Dense(torch.randn(24, 1280, generator=torch.Generator().manual_seed(0)) * 0.05))
    g.set_outputs([*outs.values(), g.op("linear", outs["x640"], down, None, name="down")])
    return g


def float_constant_shapes(module) -> list[tuple[int, ...]]:
    from torch_mlir import ir
    out = []

    def visit(op):
        t = op.results[0].type if op.name in CONSTANT_OPS else None
        if isinstance(t, ir.RankedTensorType) and str(t.element_type) == "f32" and t.rank >= 2:
            out.append(tuple(t.shape))
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    return out


@pytest.mark.parametrize("dialect", DIALECTS)
def test_hadamard_module_matches_the_interpreter(tmp_path, dialect):
    g = hadamard_graph()
    shapes = {v.name: [ENV.get(d, d) for d in v.shape] for v in g.inputs}
    backend = MlirBackend()
    lowered = conftest.lower_into(backend, g, nf.target("mlir").with_options(dialect=dialect), tmp_path, shapes=shapes)
    assert not lowered.fallbacks
    # each block's factors, never its whole matrix, beside the linear's weight
    factors = [s for s in float_constant_shapes(parse((tmp_path / MODEL_FILE).read_text())) if 1280 not in s]
    assert factors and max(max(s) for s in factors) == 64
    check(g, backend.load(tmp_path, lowered.entry), sizes=[ENV])


def test_export_leaves_the_cached_matrices_real():
    for cached in (H._matrix, H._paley, H._sylvester):
        cached.cache_clear()
    g = hadamard_graph()
    module, _ = GraphModule.build(g)
    export_program(module, g, {v.name: [ENV.get(d, d) for d in v.shape] for v in g.inputs})
    assert type(H.hadamard_matrix(384)) is torch.Tensor
    x = torch.randn(2, 384, dtype=torch.float64)
    assert torch.allclose(run_graph(g, [torch.randn(2, 48), torch.randn(2, 3, 64), x.float(),
                                        torch.randn(2, 3, 1280)])[2].double(), x @ H.hadamard_matrix(384), atol=1e-5)

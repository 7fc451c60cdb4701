"""The mlir backend's ``dynamic_quant`` (the reference's float32 steps; minifloat exponents from a
corrected log2 and exact powers of two, as torch-mlir lowers no frexp) run under torch-mlir's
reference JIT against the interpreter on tests/backends/dynamic_quant_cases.py's graph: bit for bit
in linalg-on-tensors and StableHLO; within one grid step in TOSA, which divides by a reciprocal."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch_mlir")

import nnforge as nf                                                   # noqa: E402
from nnforge.backends.mlir import MlirBackend                          # noqa: E402
from nnforge.ir import Graph, run_graph                                # noqa: E402
from tests import conftest                                             # noqa: E402
from tests.backends import dynamic_quant_cases as C                    # noqa: E402

ENV = {"batch": 2, "seq": 3}
# a grid step of each format, as a fraction of its group's largest magnitude (int: one code; minifloat:
# the spacing at the top binade), with room for a block scale that moved one E4M3 step
STEP = {"int8": 1 / 127, "int4": 1 / 7, "e4m3": 1 / 8, "mxfp8": 1 / 8, "mxfp4": 1 / 2, "nvfp4": 1 / 2}
SLACK = 1.25


def graph() -> Graph:
    """The shared graph less its float16 case (the last, so the cases' inputs still line up): the
    module computes every float in float32 and returns float32."""
    g = C.dynamic_quant_graph()
    h8 = next(n for n in g.nodes if n.name == "h8.quant")
    assert C.CASES[-1][0] == "h8"
    g.set_outputs([v for v in g.outputs if v is not h8.outputs[0]])
    g.remove_node(h8)
    g.remove_input(g.inputs[-1])
    return g


def lowered(tmp_path, dialect):
    g = graph()
    backend = MlirBackend()
    shapes = {v.name: [ENV.get(d, d) for d in v.shape] for v in g.inputs}
    low = conftest.lower_into(backend, g, nf.target("mlir").with_options(dialect=dialect), tmp_path, shapes=shapes)
    assert not low.fallbacks
    return g, backend.load(tmp_path, low.entry)


# one dialect in the default run: each build of the whole case graph takes tens of seconds
@pytest.mark.parametrize("dialect", ["linalg-on-tensors", pytest.param("stablehlo", marks=pytest.mark.slow)])
def test_module_equals_the_interpreter(tmp_path, dialect):
    g, runner = lowered(tmp_path, dialect)
    C.check(g, runner, sizes=[ENV])


@pytest.mark.slow
def test_tosa_is_within_one_grid_step(tmp_path):
    g, runner = lowered(tmp_path, "tosa")
    xs = C.inputs(g, ENV, seed=0)
    got = runner(*[x.numpy() for x in xs])
    cases = {f"{name}.quant": (x, attrs) for x, (name, *_, attrs) in zip(xs, C.CASES)}
    for v, out, ref in zip(g.outputs, got, run_graph(g, xs)):
        if v.producer.op != "dynamic_quant":
            continue
        x, attrs = cases[v.producer.name]
        size = attrs.get("group") or {"mxfp8": 32, "mxfp4": 32, "nvfp4": 16}.get(attrs["format"], x.shape[-1])
        amax = x.float().reshape(-1, size).abs().amax(-1, keepdim=True)
        err = (torch.as_tensor(out) - ref).reshape(-1, size).abs()
        assert (err <= SLACK * STEP[attrs["format"]] * amax).all(), v.producer.name

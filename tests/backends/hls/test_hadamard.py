"""The hls backend's ``hadamard`` (two fixed-weight matrix-unit products of the block's Kronecker
factors, permutes between): its C-simulation equals the bit-accurate emulation and is within the
fixed-point tolerance of the interpreter."""
from __future__ import annotations

import numpy as np
import torch

from tests import conftest

from nnforge.backends.hls import HlsBackend
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.ir import Dense, Graph, run_graph, tensor

# of the interpreter, in the default activation format (16 fraction bits): a rotation rounds twice
# and each factor's row scale is a fixed-point mantissa; the linear after one has int16 weights
TOL_ABS = {"rotate": 1e-4, "down": 1e-3}
# (input, shape, block): one product (24 of 48, 64), two with a Paley factor (384 = 12 * 32,
# 640 = 20 * 32 of 1280)
CASES = [("x24", [2, 48], 24), ("x64", [2, 3, 64], 64), ("x384", [2, 384], 384), ("x640", [2, 1280], 640)]


def hadamard_graph() -> Graph:
    g = Graph("hadamard")
    outs = {name: g.op("hadamard", g.add_input(name, tensor("f32", *shape)), block=block, name=f"{name}.rotate")
            for name, shape, block in CASES}
    down = g.add_weight("down.weight", Dense(torch.randn(24, 1280, generator=torch.Generator().manual_seed(0)) * 0.05))
    g.set_outputs([*outs.values(), g.op("linear", outs["x640"], down, None, name="down")])
    return g


def inputs(g: Graph) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*v.shape, generator=gen) for v in g.inputs]


def close_to_the_interpreter(g: Graph, xs, got) -> None:
    for v, y, ref in zip(g.outputs, got, run_graph(g, xs)):
        err = float(np.abs(np.asarray(y, np.float64) - ref.double().numpy()).max())
        assert err <= TOL_ABS[v.name.split(".")[-1]], f"{v.name}: max abs error {err:.3g}"


def test_a_block_with_a_paley_factor_is_two_products_and_two_permutes():
    g = hadamard_graph()
    plan = build_plan(g, HlsOptions())
    kinds = {n: [type(layer).__name__ for layer in plan.layers if layer.node == n] for n in ("x64.rotate", "x640.rotate")}
    assert kinds == {"x64.rotate": ["MatMat"], "x640.rotate": ["MatMat", "Strided", "MatMat", "Strided"]}
    assert [f.where for f in plan.fallbacks] == ["node down (down.weight)"]      # the factors are not the user's
    xs = inputs(g)
    close_to_the_interpreter(g, xs, plan.emulate([x.numpy() for x in xs]))


def test_csim_equals_the_emulation(tmp_path, monkeypatch):
    monkeypatch.setenv("NNFORGE_HLS_CACHE", str(tmp_path / "cache"))
    g = hadamard_graph()
    backend = HlsBackend()
    lowered = conftest.lower_into(backend, g, "alveo-u280", tmp_path / "b")
    runner = backend.load(tmp_path / "b", lowered.entry)
    xs = inputs(g)
    got = runner(*[x.numpy() for x in xs])
    for y, emu in zip(got, runner.plan.emulate([x.numpy() for x in xs])):
        assert np.array_equal(np.asarray(y), emu)
    close_to_the_interpreter(g, xs, got)


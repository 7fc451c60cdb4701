"""One graph of ``hadamard`` nodes for every backend that lowers the op: power-of-two blocks
(16, 64, 2048), blocks with a Paley factor (24 = 12 * 2, 384 = 12 * 32, 640 = 20 * 32), blocks
smaller than the width (32 of 128, 384 of 768), ranks 2 and 3 with symbolic dims, a ``linear``
after one (as the rotate pass places it), and float16 and float64 inputs; and the comparison of a
loaded bundle with the interpreter."""
from __future__ import annotations

import numpy as np
import torch

from nnforge.ir import Dense, Graph, run_graph, tensor

SIZES = [{"batch": 1, "seq": 3}, {"batch": 3, "seq": 5}]
# of the largest reference value (inputs are standard normal, and the transform is orthonormal):
# float32 rounding of the products (the interpreter computes float64 graphs in float32 too);
# float16, one unit in the last place of the rounded result
RTOL = {"float32": 1e-5, "float64": 1e-5, "float16": 2e-3}

# (input name, dtype, dims before the last, width, block)
CASES = [("x16", "f32", ["batch", "seq"], 16, 16), ("x24", "f32", ["batch"], 24, 24),
         ("x64", "f32", ["batch", "seq"], 64, 64), ("x384", "f32", ["batch"], 384, 384),
         ("x640", "f32", ["batch", "seq"], 640, 640), ("x2048", "f32", ["batch"], 2048, 2048),
         ("x2048s", "f32", ["batch", "seq"], 2048, 2048), ("x128", "f32", ["batch", "seq"], 128, 32),
         ("x768", "f32", ["batch", "seq"], 768, 384), ("h64", "f16", ["batch", "seq"], 64, 64),
         ("h640", "f16", ["batch"], 640, 640), ("d384", "f64", ["batch"], 384, 384)]


def hadamard_graph() -> Graph:
    g = Graph("hadamard")
    outs = {name: g.op("hadamard", g.add_input(name, tensor(dt, *lead, width)), block=block, name=f"{name}.rotate")
            for name, dt, lead, width, block in CASES}
    down = g.add_weight("down.weight", Dense(torch.randn(24, 640, generator=torch.Generator().manual_seed(0)) * 0.05))
    g.set_outputs([*outs.values(), g.op("linear", outs["x640"], down, None, name="down")])
    return g


def inputs(graph: Graph, env: dict, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn([d if isinstance(d, int) else env[d] for d in v.shape], generator=gen,
                        dtype=torch.float64).to(v.dtype.torch_dtype) for v in graph.inputs]


def check(graph: Graph, runner, sizes=SIZES) -> None:
    """Run ``runner`` and the interpreter on standard normal inputs at every size; every output
    within :data:`RTOL` of the reference."""
    for i, env in enumerate(sizes):
        xs = inputs(graph, env, seed=i)
        ref = run_graph(graph, xs)
        got = runner(*[x.numpy() for x in xs])
        got = list(got) if isinstance(got, tuple) else [got]
        assert len(got) == len(ref)
        for v, g, r in zip(graph.outputs, got, ref):
            g = np.asarray(g)
            assert g.dtype == np.dtype(v.dtype.name) and g.shape == tuple(r.shape), (v.name, g.dtype, g.shape)
            err = float((torch.from_numpy(g).double() - r.double()).abs().max())
            tol = RTOL[v.dtype.name] * max(1.0, float(r.double().abs().max()))
            assert err <= tol, f"{v.name} at {env}: max abs error {err:.3g} > {tol:.3g}"

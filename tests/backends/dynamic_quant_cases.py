"""One graph of ``dynamic_quant`` nodes for every backend that lowers the op: each format per token
and in groups, with a clip, NVFP4 with a static and with each row's tensor scale, ranks 2 and 3
with symbolic dims, a float16 input, and a ``linear`` after one (as quantize_activations places it);
and the comparison of a loaded bundle with the interpreter.

Inputs are normal with an outlier channel, at several magnitudes (every other row's largest a
power of two), with an all-zero row and a row of ties: a scale of exactly 1 (the row's amax is the
grid's top) and values halfway between grid points, where rounding half to even and saturation
show; and MXFP4 rows whose amax runs over the whole float32 range."""
from __future__ import annotations

import numpy as np
import torch

from nnforge.ir import Dense, Graph, run_graph, tensor

SIZES = [{"batch": 2, "seq": 3}, {"batch": 3, "seq": 5}]
LINEAR_RTOL = 1e-5      # of the largest output: float32 sums in another order

# per format, 16 values tiled along the row: each block's amax makes its scale exactly 1 (int8's
# 127, E4M3's 448, E2M1's 6; MX's scale is 1 for any amax up to twice the grid's top, so their rows
# also saturate), the rest ties between grid points
_E4M3 = [448.0, 1.0625, 1.1875, 17.0, 19.0, 1.5 * 2 ** -9, 2.0 ** -10, 232.0,
         432.0, -1.0625, -1.5 * 2 ** -9, 2.5 * 2 ** -9, -232.0, -17.0, 0.0, 2.0 ** -12]
_E2M1 = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -2.5, -5.0, 4.9, 0.1, 0.0, -3.0]
TIES = {"int8": [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5, 3.5, 4.5, -2.5, 0.0, 63.5, -64.5, 1.0, -1.0],
        "int4": [7.0, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -0.5, -1.5, -2.5, -6.5, -3.5, 0.25, 0.75, 0.0],
        "e4m3": _E4M3, "mxfp8": _E4M3[:-2] + [460.0, -500.0], "nvfp4": _E2M1, "mxfp4": _E2M1[:-2] + [7.0, -6.5]}

# (input name, dtype, dims before the last, width, attrs); nvfp4's static scale 0.25 makes the
# ties row's block scale 6 / 6 / 0.25 = 4, exactly, and so its scale 1
CASES = [("i8", "f32", ["batch", "seq"], 64, dict(format="int8")),
         ("i8g", "f32", ["batch", "seq"], 64, dict(format="int8", group=16, clip=0.9)),
         ("i4", "f32", ["batch", "seq"], 64, dict(format="int4", clip=0.9)),
         ("i4g", "f32", ["batch"], 64, dict(format="int4", group=32)),
         ("f8", "f32", ["batch", "seq"], 64, dict(format="e4m3")),
         ("mx8", "f32", ["batch"], 64, dict(format="mxfp8")),
         ("mx4", "f32", ["batch", "seq"], 96, dict(format="mxfp4")),
         ("nv", "f32", ["batch", "seq"], 64, dict(format="nvfp4", global_scale=0.25)),
         ("nvrow", "f32", ["batch", "seq"], 64, dict(format="nvfp4")),
         ("nvclip", "f32", ["batch"], 32, dict(format="nvfp4", group=16, clip=0.9)),
         ("mxrange", "f32", [4 * 277], 32, dict(format="mxfp4")),
         ("h8", "f16", ["batch", "seq"], 32, dict(format="int8"))]        # last: backends that compute in f32 drop it


def quantiser_rows(k: int, fmt: str, seed: int = 0) -> torch.Tensor:
    """12 rows of ``k`` for a per-token quantiser: several magnitudes with an outlier channel, every
    other row's amax a power of two, a row of ties (its scale exactly 1: the grid's top is its
    amax) and a zero row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(12, k, generator=gen) * 10.0 ** torch.randint(-3, 3, (12, 1), generator=gen)
    x[:, 3] *= 40.0
    x[::2] *= 2.0 ** torch.randint(-10, 10, (6, 1), generator=gen) / x[::2].abs().amax(-1, keepdim=True)
    x[0] = torch.tensor(TIES[fmt]).repeat(-(-k // 16))[:k]
    x[-1] = 0.0
    return x


def _amax_range() -> torch.Tensor:
    """Rows whose amax is each power of two of float32 (subnormals included), one ulp either side
    of it, or 1.5 times it: every E8M0 exponent, and the edges where log2 rounds the wrong way."""
    p = (2.0 ** torch.arange(-149, 128, dtype=torch.float64)).float()
    amax = torch.cat([p, p.nextafter(torch.zeros(())), p.nextafter(torch.tensor(float("inf"))), p * 1.5])
    rows = amax[:, None] * torch.linspace(-1, 1, 32)
    rows[:, 0] = amax
    return rows


def dynamic_quant_graph() -> Graph:
    g = Graph("dynamic_quant")
    outs = {name: g.op("dynamic_quant", g.add_input(name, tensor(dt, *lead, width)), name=f"{name}.quant", **attrs)
            for name, dt, lead, width, attrs in CASES}
    fc = g.add_weight("fc.weight", Dense(torch.randn(24, 64, generator=torch.Generator().manual_seed(0)) * 0.05))
    g.set_outputs([*outs.values(), g.op("linear", outs["i8"], fc, None, name="fc")])
    return g


def inputs(graph: Graph, env: dict, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v, (name, _, _, width, attrs) in zip(graph.inputs, CASES):
        if name == "mxrange":
            out.append(_amax_range())
            continue
        shape = [d if isinstance(d, int) else env[d] for d in v.shape]
        x = torch.randn(shape, generator=gen).reshape(-1, width)
        x *= 10.0 ** torch.randint(-3, 3, (len(x), 1), generator=gen)      # rows of several magnitudes
        x[:, 3] *= 40.0                                                      # an outlier channel
        # every other row's amax a power of two, where a scale's exponent is easiest to get wrong
        x[::2] *= 2.0 ** torch.randint(-10, 10, (len(x[::2]), 1), generator=gen) / x[::2].abs().amax(-1, keepdim=True)
        x[0] = torch.tensor(TIES[attrs["format"]]).repeat(width // 16)
        x[-1] = 0.0
        out.append(x.reshape(shape).to(v.dtype.torch_dtype))
    return out


def check(graph: Graph, runner, sizes=SIZES, linear_rtol: float = LINEAR_RTOL) -> None:
    """Run ``runner`` and the interpreter at every size: each quantiser's output equal bit for bit
    (float16 ones to the interpreter's float32 result rounded to float16), the linear after one
    within ``linear_rtol`` (a backend whose linears take fp16 operands passes its own)."""
    for i, env in enumerate(sizes):
        xs = inputs(graph, env, seed=i)
        ref = run_graph(graph, xs)
        got = runner(*[x.numpy() for x in xs])
        got = list(got) if isinstance(got, tuple) else [got]
        assert len(got) == len(ref)
        for v, g, r in zip(graph.outputs, got, ref):
            g = np.asarray(g)
            assert g.dtype == np.dtype(v.dtype.name) and g.shape == tuple(r.shape), (v.name, g.dtype, g.shape)
            g = torch.from_numpy(g)
            if v.producer.op == "dynamic_quant":
                r = r.to(g.dtype)       # the interpreter computes float16 graphs in float32
                bad = (g != r).nonzero()
                assert not len(bad), (f"{v.producer.name} at {env}: {len(bad)} of {r.numel()} values differ, first "
                                      f"at {bad[0].tolist()}: {float(g[tuple(bad[0])])} != {float(r[tuple(bad[0])])}")
            else:
                err = float((g.double() - r.double()).abs().max())
                assert err <= linear_rtol * float(r.abs().max()), f"{v.name} at {env}: max abs error {err:.3g}"

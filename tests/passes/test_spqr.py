"""SpQR-style outliers in GPTQ (quantize_gptq's ``outliers``): the costliest weights kept exact in a
sparse linear beside the quantised one, and left out of their group's scale fit."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import Dense, Graph, run_graph, tensor
from nnforge.ir.sparse import Sparse
from nnforge.passes import PassContext, PassError, resolve_recipe
from nnforge.passes.quantize import QuantizeGPTQ
from nnforge.passes.quantize.formats import parse_format
from nnforge.passes.quantize.gptq import gptq_quantize


def _layer(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=gen) * 0.05
    w[torch.rand(64, 128, generator=gen) < 0.01] *= 20          # a few weights no group grid holds
    return w


def _inputs(n, seed):
    x = torch.randn(n, 128, generator=torch.Generator().manual_seed(seed))
    x[:, 7] *= 10
    return x


def test_outliers_are_kept_exact_and_lower_the_held_out_error():
    w, x = _layer(), _inputs(2048, 1)
    h = 2 * x.T @ x / len(x)
    fmt = parse_format("uint3", group_size=16, scale_dtype="float16")
    plain, _ = gptq_quantize(w, h, fmt)
    base, figs = gptq_quantize(w, h, fmt, outliers=0.01)
    delta = figs["outlier_delta"]
    assert 0.005 < float((delta != 0).float().mean()) < 0.02
    held = _inputs(512, 2)                                      # rows the Hessian never saw
    y = held @ w.T
    err = lambda wh: float((held @ wh.T - y).norm() / y.norm())   # noqa: E731
    assert err(base.decode(torch.float32) + delta) < 0.75 * err(plain.decode(torch.float32))
    # the groups holding an outlier fit a narrower range than plain GPTQ gave them
    assert float(base.scale.float().median()) <= float(plain.scale.float().median())


def mlp():
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", 128))
    h = g.op("linear", x, g.add_weight("fc1.weight", Dense(_layer(0))), None, name="fc1")
    g.set_outputs([g.op("linear", g.op("relu", h, name="act"), g.add_weight("fc2.weight", Dense(_layer(1)[:, :64])),
                        None, name="fc2")])
    return g


def test_the_pass_adds_a_sparse_linear_beside_each_layer_but_a_graph_output():
    g = mlp()
    ctx = PassContext(calibration=[(_inputs(256, s),) for s in range(3)])
    ctx.current = "quantize_gptq"
    out = QuantizeGPTQ(format="uint3", group_size=16, outliers=0.02)(g.copy(), ctx)
    sparse = [n for n in out.nodes if n.op == "linear" and isinstance(n.inputs[1].encoding, Sparse)]
    assert [n.name for n in sparse] == ["fc1.outliers"]          # fc2's output is the graph's
    enc = sparse[0].inputs[1].encoding
    assert enc.pattern.name == "block1x1" and enc.values.dtype.name == "float32"
    assert ctx.figures["quantize_gptq"]["outliers"]["fc1"] == pytest.approx(0.02, abs=0.01)
    add = next(n for n in out.nodes if n.op == "add")
    assert out.node("act").inputs[0] is add.output
    plain = QuantizeGPTQ(format="uint3", group_size=16)(g.copy(), PassContext(calibration=ctx.calibration))
    x = _inputs(64, 9)
    ref = run_graph(g, [x])[0]
    err = lambda q: float((run_graph(q, [x])[0] - ref).norm() / ref.norm())   # noqa: E731
    assert err(out) < err(plain)


def test_outlier_options_are_checked():
    with pytest.raises(PassError, match=r"outliers must be a fraction in \[0, 0.5\)"):
        QuantizeGPTQ(format="uint3", group_size=16, outliers=0.5)
    with pytest.raises(PassError, match="outliers are left out of their group's scale fit, which needs groups"):
        QuantizeGPTQ(format="uint3", group_size=16, outliers=0.01, static_groups=True)
    with pytest.raises(PassError, match="outliers are left out of their group's scale fit, which needs groups"):
        QuantizeGPTQ(format="int4", outliers=0.01)
    assert resolve_recipe("w3-spqr")[1][0].outliers == 0.01

"""AWQ: activation-aware channel scales and clipping, folded where the input's producer allows."""
from __future__ import annotations

import pytest
import torch

from nnforge.frontend.decoders.importer import import_decoder
from nnforge.ir import Dense, Graph, run_graph, tensor
from nnforge.passes import PassContext, PassError, PassManager, resolve_recipe
from nnforge.passes.quantize import AWQ, QuantizeRTN
from nnforge.passes.quantize.awq import _output_error, fake_quantize_weight, search_scales
from nnforge.passes.quantize.formats import parse_format
from tests.frontend.decoders.families import tiny_model


def _rows(n, seed, width=64):
    """Activations with a few salient channels, as LLM layers see them."""
    x = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
    x[:, [5, 40]] *= 25.0
    return x


def norm_block():
    """rms_norm -> two linears reading its output (a q/k-like group)."""
    gen = torch.Generator().manual_seed(0)
    g = Graph("blk")
    x = g.add_input("x", tensor("f32", "batch", 64))
    h = g.op("rms_norm", x, g.add_weight("norm.weight", Dense(torch.rand(64, generator=gen) + 0.5)), eps=1e-6,
             name="norm")
    outs = [g.op("linear", h, g.add_weight(f"{n}.weight", Dense(torch.randn(32, 64, generator=gen) * 0.1)), None,
                 name=n) for n in ("a", "b")]
    g.set_outputs([g.op("add", *outs, name="sum")])
    return g


def _batches(seeds):
    return [(_rows(48, s),) for s in seeds]


def test_the_scale_search_never_does_worse_than_no_scaling_on_its_rows():
    fmt = parse_format("uint4", group_size=32)
    x = _rows(256, 0)
    w = [torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.1]
    ys = [x @ w[0].T]
    s, r = search_scales(x, w, fmt, 20)
    assert r > 0 and _output_error(x, w, s, fmt, ys) < _output_error(x, w, torch.ones(64), fmt, ys)


def test_awq_then_rtn_beats_rtn_on_held_out_rows_and_folds_into_the_norm():
    g = norm_block()
    ctx = PassContext(calibration=_batches(range(4)))
    ctx.current = "awq"
    awq = PassManager([AWQ(format="uint4", group_size=32), QuantizeRTN(format="uint4", group_size=32)]).run(
        g.copy(), ctx)
    rtn = QuantizeRTN(format="uint4", group_size=32)(g.copy(), PassContext())
    x = _rows(64, 99)                                   # rows no pass saw
    want = run_graph(g, [x])[0]
    err = {name: float((run_graph(q, [x])[0] - want).norm()) for name, q in (("awq", awq), ("rtn", rtn))}
    assert err["awq"] < 0.8 * err["rtn"]
    assert ctx.figures["awq"]["folded_into"] == {"a": "rms_norm"} and ctx.figures["awq"]["multiplies_inserted"] == 0
    assert not any(n.op == "mul" for n in awq.nodes)


def test_without_clipping_the_float_model_is_unchanged_on_a_decoder():
    """Llama: the scales fold into the RMS norms (q/k/v, gate/up) and the up projection (down, through
    the gate multiply); the attention output projection's input needs a multiply."""
    graph = import_decoder(tiny_model("llama-linear"), max_len=16).graph
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    calibration = [(torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(s)),
                    torch.arange(12)[None], *[torch.zeros([1 if d == "batch" else d for d in v.shape])
                                              for v in graph.inputs[2:]]) for s in range(3)]
    ctx = PassContext(calibration=calibration)
    ctx.current = "awq"
    scaled = AWQ(clip=False, grid=5, layers=["model.layers.*"])(graph.copy(), ctx)
    feed = [ids, torch.arange(8)[None], *calibration[0][2:]]
    want, got = run_graph(graph, feed)[0], run_graph(scaled, feed)[0]
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    kinds = ctx.figures["awq"]["folded_into"]
    assert set(kinds.values()) <= {"rms_norm", "linear through mul", "multiply"}
    assert kinds.get("model.layers.0.mlp.down_proj") in (None, "linear through mul")


def test_fake_quantize_weight_is_what_rtn_stores():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(3))
    fmt = parse_format("uint4", group_size=16)
    g = Graph("l")
    x = g.add_input("x", tensor("f32", 2, 40))
    g.set_outputs([g.op("linear", x, g.add_weight("w", Dense(w)), None, name="l")])
    q = QuantizeRTN(format="uint4", group_size=16, ragged_groups=True)(g, PassContext())
    assert torch.equal(fake_quantize_weight(w, fmt), q.weights["w"].encoding.decode(torch.float32))


def test_preset_and_errors():
    assert [p.name for p in resolve_recipe("w4-awq")[1]] == ["awq", "quantize_rtn"]
    with pytest.raises(PassError, match="awq: unknown weight format 'int9'|awq: format 'int9'"):
        AWQ(format="int9")
    with pytest.raises(PassError, match="grid must be a positive integer"):
        AWQ(grid=0)
    with pytest.raises(PassError, match="awq needs calibration data"):
        AWQ()(norm_block(), PassContext())

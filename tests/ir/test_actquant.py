"""nnforge/ir/actquant.py and the dynamic_quant op: scales from each token's own values."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import Graph, GraphError, tensor
from nnforge.ir.actquant import act_quantize
from nnforge.passes.quantize.formats import parse_format


def _x(*shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[..., 3] *= 40.0                       # an outlier channel, as LLM activations have
    return x


def test_int8_per_token_is_each_rows_own_grid():
    x = _x(6, 64)
    scale = x.abs().amax(-1, keepdim=True) / 127
    want = torch.clamp(torch.round(x / scale), -128, 127) * scale
    assert torch.equal(act_quantize(x, "int8"), want)
    # a token's codes do not depend on the others in its batch (prefill and decode agree)
    assert torch.equal(act_quantize(x[2:3], "int8"), want[2:3])


def test_int4_groups_and_clip():
    x = _x(4, 64)
    g = x.reshape(4, 4, 16)
    scale = g.abs().amax(-1, keepdim=True) * 0.9 / 7
    want = (torch.clamp(torch.round(g / scale), -8, 7) * scale).reshape(4, 64)
    assert torch.equal(act_quantize(x, "int4", group=16, clip=0.9), want)
    # the group holding the outlier loses it; the others keep their finer grids
    err = (act_quantize(x, "int4", group=16) - x).abs().reshape(4, 4, 16).amax(-1)
    assert bool((err[:, 1:] < err[:, :1]).all())


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "nvfp4"])
def test_block_formats_round_as_the_weight_formats_of_that_name(fmt):
    """The activation grid of MX and NVFP4 is the weight quantiser's (passes/quantize/formats.py)
    on the same blocks: with a static tensor scale, NVFP4 takes the one given."""
    x = _x(8, 64)
    wf = parse_format(fmt)
    groups = x.reshape(8, -1, wf.group_size)
    gs = wf.global_scale(x)
    scale, _ = wf.fit(groups, gs)
    want = wf.snap(groups, scale[..., None]).reshape(8, 64)
    got = act_quantize(x, fmt, global_scale=float(gs) if gs is not None else 0.0)
    assert torch.equal(got, want)


def test_nvfp4_without_a_static_scale_takes_each_rows():
    x = _x(3, 32)
    rows = torch.cat([act_quantize(x[i:i + 1], "nvfp4", global_scale=float(x[i].abs().max()) / (6 * 448))
                      for i in range(3)])
    assert torch.equal(act_quantize(x, "nvfp4"), rows)


def test_e4m3_per_token_matches_torchs_float8():
    x = _x(5, 64)
    scale = x.abs().amax(-1, keepdim=True) / 448
    want = (x / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale
    assert torch.equal(act_quantize(x, "e4m3"), want)


def test_zero_rows_stay_zero():
    for fmt in ("int8", "int4", "e4m3", "mxfp4", "nvfp4"):
        assert torch.equal(act_quantize(torch.zeros(2, 32), fmt), torch.zeros(2, 32))


@pytest.mark.parametrize("attrs,message", [
    (dict(format="int3"), "unknown activation format 'int3'"),
    (dict(format="mxfp4", group=16), "mxfp4 scales blocks of 32 channels, not 16"),
    (dict(format="int8", group=24), "the last dim 64 is not a multiple of the int8 block of 24"),
    (dict(format="int8", global_scale=0.5), "global_scale is nvfp4's static tensor scale"),
    (dict(format="int4", clip=0.0), r"clip must be in \(0, 1\]"),
])
def test_bad_attributes_are_refused_naming_the_node(attrs, message):
    g = Graph("q")
    x = g.add_input("x", tensor("f32", "batch", 64))
    with pytest.raises(GraphError, match=r"node act \(dynamic_quant\).*" + message):
        g.op("dynamic_quant", x, name="act", **attrs)

"""Activation quantisation: a quantise-dequantise of a tensor on a static grid.

``fake_quant`` stands for "this activation is held in ``format`` with this scale" (W8A8): the
reference interpreter rounds through the grid, and a backend lowers it to its quantise/dequantise
pair (ONNX QuantizeLinear + DequantizeLinear, which runtimes fuse into integer or FP8 matmuls).
"""
from __future__ import annotations

import torch

from .. import minifloat
from .registry import Attr, defop

FAKE_QUANT_FORMATS = ("int8", "uint8", "float8_e4m3fn", "float8_e5m2", "int4")


def _infer(x, *, format, scale, zero_point):
    if not x.dtype.is_float or x.dtype.kind == "minifloat":
        raise TypeError(f"fake_quant needs a float input, got {x.dtype}")
    if format.name not in FAKE_QUANT_FORMATS:
        raise ValueError(f"fake_quant format must be one of {', '.join(FAKE_QUANT_FORMATS)}, got {format.name}")
    if not scale > 0:
        raise ValueError(f"fake_quant scale must be positive, got {scale}")
    if format.kind == "minifloat" and zero_point != 0:
        raise ValueError("float8 activations take no zero point")
    if format.name == "int4" and zero_point != 0:
        raise ValueError("int4 activations are symmetric: zero point must be 0")
    if format.is_integer:
        lo, hi = format.int_range
        if not lo <= zero_point <= hi:
            raise ValueError(f"zero point {zero_point} outside {format.name}'s range [{lo}, {hi}]")
    return x


def fake_quantize(x: torch.Tensor, format, scale: float, zero_point: int = 0) -> torch.Tensor:
    """``x`` rounded onto the static grid of ``format`` (a DType) and back: what ``fake_quant``
    computes, for passes that need to predict its error."""
    if format.is_integer:
        lo, hi = format.int_range
        return (torch.clamp(torch.round(x / scale) + zero_point, lo, hi) - zero_point) * scale
    return (minifloat.round_to(x / scale, format) * scale).to(x.dtype)


def _ref(ctx, x, *, format, scale, zero_point):
    return fake_quantize(x, format, scale, zero_point)


defop("fake_quant", ["x"], {"format": Attr("dtype"), "scale": Attr("float"), "zero_point": Attr("int", 0)},
      infer=_infer, ref=_ref, family="quant",
      doc="Round x onto a static int8/uint8/int4/FP8 grid (x/scale + zero_point, saturating) and back.")


def _dynamic_infer(x, *, format, group, clip, global_scale):
    from ..actquant import check
    if not x.dtype.is_float or x.dtype.kind == "minifloat" or x.rank < 1:
        raise TypeError(f"dynamic_quant needs a float input of rank >= 1, got {x}")
    check(format, group, clip, global_scale, x.shape[-1], "dynamic_quant")
    return x


def _dynamic_ref(ctx, x, *, format, group, clip, global_scale):
    from ..actquant import act_quantize
    return act_quantize(x, format, group, clip, global_scale).to(x.dtype)


defop("dynamic_quant", ["x"], {"format": Attr("str"), "group": Attr("int", 0), "clip": Attr("float", 1.0),
                               "global_scale": Attr("float", 0.0)},
      infer=_dynamic_infer, ref=_dynamic_ref, family="quant",
      doc="Round x onto an int8/int4/FP8/MX/NVFP4 grid with scales computed from x per token or per block "
          "of channels (nnforge.ir.actquant), and back: dynamic activation quantisation.")

"""Dynamic activation quantisation: scales computed from the activation itself at run time, per
token or per block of channels, as W4A8 / W4A4 / NVFP4 inference computes them (llm-compressor's
dynamic per-token schemes, QuaRot's int4 activations, ModelOpt's NVFP4 activations).

Formats (``ACT_FORMATS``), each symmetric with one scale per group of ``group`` channels along the
last axis (``group == 0``: the whole row, i.e. per token):

- ``int8``, ``int4``: codes ``clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)``, ``s = amax / (2^(b-1) - 1)``
  in float32 (``clip`` < 1 shrinks ``amax``, which QuaRot finds helps int4).
- ``e4m3``: FP8 E4M3 elements, ``s = amax / 448`` in float32.
- ``mxfp8``, ``mxfp4``: OCP MX, blocks of 32, an E8M0 power-of-two scale per block.
- ``nvfp4``: E2M1 in blocks of 16, an E4M3 scale per block times a float32 ``global_scale``:
  static (calibrated, ``global_scale > 0``) or, with 0, each row's ``amax / (6 * 448)``.

    >>> y = act_quantize(x, "int8", group=0)          # per-token int8, dequantised
"""
from __future__ import annotations

import torch

from . import minifloat as mf
from .dtypes import dtype

TINY = 1e-12
# format -> (element kind, element dtype name or bits, fixed block size or None, scale kind)
ACT_FORMATS: dict[str, tuple] = {
    "int8": ("int", 8, None, "float32"),
    "int4": ("int", 4, None, "float32"),
    "e4m3": ("float", "float8_e4m3fn", None, "float32"),
    "mxfp8": ("float", "float8_e4m3fn", 32, "e8m0"),
    "mxfp4": ("float", "float4_e2m1fn", 32, "e8m0"),
    "nvfp4": ("float", "float4_e2m1fn", 16, "e4m3"),
}


def check(format: str, group: int, clip: float, global_scale: float, width, where: str) -> int:
    """The group size a row of ``width`` channels is cut into (``width`` for per-token), or a
    ValueError naming ``where``."""
    if format not in ACT_FORMATS:
        raise ValueError(f"{where}: unknown activation format {format!r}; known: {', '.join(ACT_FORMATS)}")
    fixed = ACT_FORMATS[format][2]
    if fixed is not None and group not in (0, fixed):
        raise ValueError(f"{where}: {format} scales blocks of {fixed} channels, not {group}")
    if group < 0:
        raise ValueError(f"{where}: group must be 0 (per token) or a positive block size, got {group}")
    if not 0 < clip <= 1:
        raise ValueError(f"{where}: clip must be in (0, 1], got {clip}")
    if global_scale < 0 or (global_scale and format != "nvfp4"):
        raise ValueError(f"{where}: global_scale is nvfp4's static tensor scale (> 0, or 0 for per token), "
                         f"got {global_scale} for {format}")
    size = fixed or group or width
    if not isinstance(width, int):
        if fixed or group:
            return size
        raise ValueError(f"{where}: per-token scales need a static last dim, got {width}")
    if width % size:
        raise ValueError(f"{where}: the last dim {width} is not a multiple of the {format} block of {size}")
    return size


def act_quantize(x: torch.Tensor, format: str, group: int = 0, clip: float = 1.0,
                 global_scale: float = 0.0) -> torch.Tensor:
    """``x`` rounded onto ``format``'s grid with scales from its own values, and back, in float32
    (module docstring); ``x``'s shape."""
    size = check(format, group, clip, global_scale, x.shape[-1], "dynamic_quant")
    kind, element, _, scale_kind = ACT_FORMATS[format]
    g = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // size, size)
    amax = g.abs().amax(-1, keepdim=True) * clip
    if kind == "int":
        top = (1 << (element - 1)) - 1
        scale = (amax / top).clamp(min=TINY)
        q = torch.clamp(torch.round(g / scale), -top - 1, top) * scale
        return q.reshape(x.shape)
    el = dtype(element)
    if scale_kind == "e8m0":
        scale = mf.decode(mf.e8m0_exponent(amax, el), dtype("e8m0"))
    elif scale_kind == "e4m3":
        gs = torch.tensor(global_scale, dtype=torch.float32) if global_scale else \
            (g.abs().amax((-2, -1), keepdim=True) / (el.max_value * dtype("e4m3").max_value)).clamp(min=TINY)
        scale = mf.round_to(amax / el.max_value / gs, dtype("e4m3")).to(torch.float32) * gs
    else:
        scale = (amax / el.max_value).clamp(min=TINY)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = mf.round_to(g / safe, el).to(torch.float32) * safe
    return torch.where(scale > 0, q, torch.zeros_like(q)).reshape(x.shape)


__all__ = ["ACT_FORMATS", "check", "act_quantize"]

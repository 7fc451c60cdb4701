"""Convolutional networks on the hls backend: 1-D and 2-D convolution (stride, padding, dilation,
groups, depthwise) and max pooling (templates in ``nnforge/hls/nf_conv.h``), and batch norm as a
per-channel multiply and add (the element-wise template), with their lowering rules.

A convolution's weight is the matrix unit's: the IR's [O, C/groups, kh, kw] flattens to the
[O, C/groups * kh * kw] matrix a linear would have, so the capability table's conv rows are the
linear's (int codes as stored, minifloat codes by table, N:M kept values, float weights quantised
per output channel) and ``mat_weights`` lays it out. Zero padding a convolution reads through
(MobileNetV2's TF-style ``pad``) is folded into it by :mod:`.patterns`; any other ``pad`` of rank
<= 4 is a copy with a fill value (``nf::pad`` in ``nf_elementwise.h``).

    >>> LOWERINGS["conv"](plan, node, "n_conv")     # [Conv(groups=1, filt=(3, 3), ...)]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..base import BackendError
from . import emulate as E
from .layers import Binary, Layer, MatMat, pad4, struct
from .project import LOWERINGS, _dense, _matrix_weights, _raw


def _pairs(attrs: dict, nd: int, out_hw) -> dict:
    """(rows, columns) pairs of the geometry; a 1-D op is the 2-D one on a single row."""
    pad = list(attrs["padding"])[:nd]
    pick = (lambda v: (1, int(v[0]))) if nd == 1 else (lambda v: (int(v[0]), int(v[1])))
    dil = attrs.get("dilation") or [1] * nd
    return {"stride": pick(attrs["stride"]), "dil": pick(dil), "pad": (0, pad[0]) if nd == 1 else tuple(pad),
            "out_hw": pick(out_hw)}


def _image(node, x) -> tuple[int, int, int, int]:
    """[N, C, H, W] of the input (a 1-D op's [N, C, L] as [N, C, 1, L])."""
    if len(x.shape) == 3:
        return (x.shape[0], x.shape[1], 1, x.shape[2])
    if len(x.shape) == 4:
        return tuple(x.shape)
    raise BackendError(f"node {node.name} ({node.op}): input {list(x.shape)}; the hls backend runs 1-D and 2-D "
                       f"{node.op} on [N, C, L] or [N, C, H, W] inputs")


@dataclass
class Conv(MatMat):
    """conv: one nf::conv call over the matrix unit's weight rows (``w``: [O, C/groups * kh * kw])."""
    shape: tuple = ()           # input [N, C, H, W]
    groups: int = 1
    out_hw: tuple = (1, 1)
    filt: tuple = (1, 1)
    stride: tuple = (1, 1)
    dil: tuple = (1, 1)
    pad: tuple = (0, 0)         # top, left
    kernel = "conv"

    @property
    def pack2(self) -> bool:
        return False            # nf::conv runs one filter at a time: no row pairs to pack

    def config(self):
        w, (n, c, h, wd) = self.w, self.shape
        codes = f"{w.w_bits}-bit LUT-decoded codes" if w.lut is not None else f"int{w.w_bits} codes"
        geometry = [("unsigned", k, v) for k, v in (
            ("n_batch", n), ("groups", self.groups), ("n_chan", c // self.groups), ("n_filt", w.n_out // self.groups),
            ("in_h", h), ("in_w", wd), ("out_h", self.out_hw[0]), ("out_w", self.out_hw[1]),
            ("filt_h", self.filt[0]), ("filt_w", self.filt[1]), ("stride_h", self.stride[0]),
            ("stride_w", self.stride[1]), ("dil_h", self.dil[0]), ("dil_w", self.dil[1]),
            ("pad_top", self.pad[0]), ("pad_left", self.pad[1]))]
        return struct(self.cfg, f"{self.node}: conv {c} -> {w.n_out}, {self.filt[0]}x{self.filt[1]} stride "
                      f"{self.stride} dilation {self.dil} groups {self.groups}, {w.sp_n}:{w.sp_m}, {codes}", geometry + [
            ("unsigned", "n_in", w.n_in), ("unsigned", "sp_n", w.sp_n), ("unsigned", "sp_m", w.sp_m),
            ("unsigned", "idx_bits", w.idx_bits), ("unsigned", "n_kept", w.n_kept), ("unsigned", "w_bits", w.w_bits),
            ("unsigned", "val_bits", w.val_bits), ("bool", "lut_decode", w.lut is not None),
            ("unsigned long", "lut_off", self.offsets["lut_off"]), ("unsigned", "group", w.group),
            ("unsigned", "n_groups", w.n_groups), ("bool", "row_scales", w.scales.shape[0] > 1),
            ("int", "scale_shift", self.shift), ("bool", "has_bias", self.bias is not None),
            ("unsigned", "acc_bits", self.acc_bits), ("unsigned", "chain", self.chain),
            *[("unsigned long", k, self.offsets[k]) for k in ("w_off", "idx_off", "scale_off", "bias_off")],
            ("unsigned", "w_row_bytes", self.offsets["w_row_bytes"]),
            ("unsigned", "idx_row_bytes", self.offsets["idx_row_bytes"])])

    def call(self, ids):
        return f"nf::conv<act_t, act_t, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]}, wmem);"

    def emulate(self, env, fmt):
        return E.conv(env[self.inputs[0]], self.shape, self.w.w_eff(self.mant), self.bias, self.shift, self.groups,
                      self.out_hw, self.filt, self.stride, self.dil, self.pad, fmt, fmt, exact64=self.exact64)


@dataclass
class MaxPool(Layer):
    shape: tuple = ()           # input [N, C, H, W]
    out_hw: tuple = (1, 1)
    filt: tuple = (1, 1)
    stride: tuple = (1, 1)
    dil: tuple = (1, 1)
    pad: tuple = (0, 0)

    def config(self):
        n, c, h, w = self.shape
        return struct(self.cfg, f"{self.node}: max pool {self.filt[0]}x{self.filt[1]} stride {self.stride}", [
            ("unsigned", k, v) for k, v in (
                ("planes", n * c), ("in_h", h), ("in_w", w), ("out_h", self.out_hw[0]), ("out_w", self.out_hw[1]),
                ("filt_h", self.filt[0]), ("filt_w", self.filt[1]), ("stride_h", self.stride[0]),
                ("stride_w", self.stride[1]), ("dil_h", self.dil[0]), ("dil_w", self.dil[1]),
                ("pad_top", self.pad[0]), ("pad_left", self.pad[1]))])

    def call(self, ids):
        return f"nf::max_pool<act_t, act_t, {self.cfg}>({ids[self.inputs[0]]}, {ids[self.output]});"

    def emulate(self, env, fmt):
        return E.max_pool(env[self.inputs[0]], self.shape, self.out_hw, self.filt, self.stride, self.dil, self.pad,
                          fmt, fmt)


@dataclass
class Pad(Layer):
    """IR pad of an activation, rank <= 4, that no conv reads (those fold it in): nf::pad."""
    in_shape: tuple = ()
    out_shape: tuple = ()
    begins: tuple = ()
    raw: int = 0                # the fill value, raw at the activation format

    def config(self):
        (d, _), (n, b) = pad4(self.out_shape), pad4(self.in_shape, self.begins)
        return struct(self.cfg, f"{self.node}: pad {list(self.in_shape)} -> {list(self.out_shape)}",
                      [("unsigned", f"d{i}", d[i]) for i in range(4)] + [("unsigned", f"n{i}", n[i]) for i in range(4)]
                      + [("unsigned", f"b{i}", b[i]) for i in range(4)])

    def call(self, ids):
        return (f"nf::pad<act_t, {self.cfg}>({ids[self.inputs[0]]}, nf::from_raw<act_t>({self.raw}), "
                f"{ids[self.output]});")

    def emulate(self, env, fmt):
        y = np.full(self.out_shape, self.raw, np.int64)
        y[tuple(slice(b, b + n) for b, n in zip(self.begins, self.in_shape))] = env[self.inputs[0]].reshape(self.in_shape)
        return y


@LOWERINGS.register("pad")
def _pad(plan, node, name):
    x, out = node.inputs[0], node.output
    r = len(x.shape)
    if r > 4:
        raise BackendError(f"node {node.name} (pad): rank {r} > 4; the hls backend pads tensors of rank <= 4")
    raw = int(E.from_float(np.array([float(node.attrs["value"])]), plan.opts.act)[0])
    return [Pad(name, node.name, [x.name], out.name, in_shape=tuple(x.shape), out_shape=tuple(out.shape),
                begins=tuple(node.attrs["pads"][:r]), raw=raw)]


@LOWERINGS.register("conv")
def _conv(plan, node, name):
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if not w.is_weight:
        raise BackendError(f"node {node.name} (conv): the weight is an activation; the hls backend streams "
                           f"convolution weights from memory")
    nd = len(w.shape) - 2
    if nd not in (1, 2):
        raise BackendError(f"node {node.name} (conv): {nd}-D convolution; the hls backend runs 1-D and 2-D")
    shape = _image(node, x)
    geo = _pairs(node.attrs, nd, node.output.shape[2:])
    mw = _matrix_weights(plan, node, w)
    bias = _raw(_dense(b, f"node {node.name} bias"), plan.opts.act.frac) if b is not None else None
    filt = (1, w.shape[2]) if nd == 1 else tuple(w.shape[2:])
    return [Conv(name, node.name, [x.name], node.output.name, w=mw, bias=bias, scale_bits=plan.opts.scale_bits,
                 chain=plan.opts.chain, shape=shape, groups=node.attrs["groups"], filt=filt, **geo)]


@LOWERINGS.register("max_pool")
def _max_pool(plan, node, name):
    x = node.inputs[0]
    nd = len(node.attrs["kernel"])
    if nd not in (1, 2):
        raise BackendError(f"node {node.name} (max_pool): {nd}-D pooling; the hls backend runs 1-D and 2-D")
    kernel = node.attrs["kernel"]
    return [MaxPool(name, node.name, [x.name], node.output.name, shape=_image(node, x),
                    filt=(1, kernel[0]) if nd == 1 else tuple(kernel), **_pairs(node.attrs, nd, node.output.shape[2:]))]


@LOWERINGS.register("batch_norm")
def _batch_norm(plan, node, name):
    """Inference batch norm is y = x * s + t per channel, s = w / sqrt(var + eps), t = b - mean * s:
    a multiply and an add by constants broadcast over the channel axis."""
    x = node.inputs[0]
    mean, var, w, b = (_dense(v, f"node {node.name} {what}") for v, what in
                       zip(list(node.inputs[1:]) + [None] * (5 - len(node.inputs)), ("mean", "var", "weight", "bias")))
    if len(x.shape) > 4:
        raise BackendError(f"node {node.name} (batch_norm): rank {len(x.shape)} > 4")
    s = torch.rsqrt(var + node.attrs["eps"]) * (1.0 if w is None else w)
    t = (0.0 if b is None else b) - mean * s
    const_shape = (x.shape[1],) + (1,) * (len(x.shape) - 2)
    words = E.Fixed(32, 32 - plan.opts.act.frac)
    scaled = plan.temp(f"{node.output.name}.scaled", f"t_{name[2:]}_scaled", x.shape)
    common = dict(a_shape=tuple(x.shape), b_shape=const_shape, out_shape=tuple(x.shape), b_frac=plan.opts.act.frac)
    return [Binary(name, node.name, [x.name], scaled, op="mul", b_const=E.from_float(s.numpy(), words), **common),
            Binary(f"{name}_shift", node.name, [scaled], node.output.name, op="add",
                   b_const=E.from_float(t.numpy(), words), **common)]


__all__ = ["Conv", "MaxPool", "Pad"]

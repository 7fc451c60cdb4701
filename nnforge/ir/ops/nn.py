"""Normalisation, softmax and pooling ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import symbolic as sym
from .linalg import conv_out_dim, pad_input
from .registry import Attr, defop, norm_axis, same_dtype


def _softmax_infer(x, axis):
    if not x.dtype.is_float:
        raise TypeError(f"softmax needs a float input, got {x.dtype}")
    norm_axis(axis, x.rank)
    return x


defop("softmax", ["x"], {"axis": Attr("int")}, infer=_softmax_infer,
      ref=lambda ctx, x, axis: torch.softmax(x, axis), family="nn")
defop("log_softmax", ["x"], {"axis": Attr("int")}, infer=_softmax_infer,
      ref=lambda ctx, x, axis: torch.log_softmax(x, axis), family="nn")


def _layer_norm_infer(x, weight=None, bias=None, *, axis, eps):
    same_dtype(x, weight, bias)
    a = norm_axis(axis, x.rank)
    norm_shape = x.shape[a:]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.rank != len(norm_shape) or not all(sym.equal(p, q) for p, q in zip(t.shape, norm_shape))):
            raise ValueError(f"layer_norm {name} {t} must have the normalised shape {list(norm_shape)}")
    return x


def _layer_norm_ref(ctx, x, weight=None, bias=None, *, axis, eps):
    a = axis % x.dim()
    return F.layer_norm(x, x.shape[a:], weight, bias, eps)


defop("layer_norm", ["x", "weight?", "bias?"], {"axis": Attr("int", -1), "eps": Attr("float", 1e-5)},
      infer=_layer_norm_infer, ref=_layer_norm_ref, family="nn",
      doc="Normalise over dims axis..-1 (ONNX LayerNormalization semantics), then scale and shift.")


def _batch_norm_infer(x, mean, var, weight=None, bias=None, *, eps):
    same_dtype(x, mean, var, weight, bias)
    if x.rank < 2:
        raise ValueError(f"batch_norm needs (N, C, ...) input, got {x}")
    for name, t in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        if t is not None and (t.rank != 1 or not sym.equal(t.shape[0], x.shape[1])):
            raise ValueError(f"batch_norm {name} {t} must be [{x.shape[1]}]")
    return x


defop("batch_norm", ["x", "mean", "var", "weight?", "bias?"], {"eps": Attr("float", 1e-5)},
      infer=_batch_norm_infer,
      ref=lambda ctx, x, m, v, w=None, b=None, *, eps: F.batch_norm(x, m, v, w, b, False, 0.0, eps),
      family="nn", doc="Inference-mode batch normalisation over channel axis 1.")


def _pool_infer(x, *, kernel, stride, padding, dilation=None, ceil_mode, **_):
    nd = len(kernel)
    if x.rank != nd + 2:
        raise ValueError(f"{nd}-d pooling needs an (N, C, {nd} spatial) input, got {x}")
    dilation = dilation or [1] * nd
    if len(stride) != nd or len(padding) != 2 * nd:
        raise ValueError(f"pooling needs stride of length {nd} and padding of length {2 * nd}")
    spatial = tuple(conv_out_dim(x.shape[2 + i], kernel[i], stride[i], padding[i], padding[nd + i], dilation[i],
                                 ceil_mode) for i in range(nd))
    return x.with_shape(x.shape[:2] + spatial)


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _window_shape(x, kernel, stride, padding, dilation, ceil_mode):
    nd = len(kernel)
    return [conv_out_dim(x.shape[2 + i], kernel[i], stride[i], padding[i], padding[nd + i], dilation[i], ceil_mode)
            for i in range(nd)]


def _crop(y, shape):
    """Explicitly padded input under ceil_mode can give torch an extra trailing window (its
    "last window starts inside" rule then sees the end padding as input); keep the IR's count."""
    return y[(Ellipsis, *[slice(0, n) for n in shape])]


def _max_pool_ref(ctx, x, *, kernel, stride, padding, dilation, ceil_mode):
    nd = len(kernel)
    shape = _window_shape(x, kernel, stride, padding, dilation, ceil_mode)
    # torch takes symmetric padding of at most half the kernel; anything else is padded explicitly.
    if list(padding[:nd]) == list(padding[nd:]) and all(p <= k // 2 for p, k in zip(padding[:nd], kernel)):
        return _MAXPOOL[nd](x, kernel, stride, list(padding[:nd]), dilation, ceil_mode=ceil_mode)
    xp, _ = pad_input(x, padding, value=float("-inf"), explicit=True)
    return _crop(_MAXPOOL[nd](xp, kernel, stride, 0, dilation, ceil_mode=ceil_mode), shape)


def _avg_pool_ref(ctx, x, *, kernel, stride, padding, ceil_mode, count_include_pad):
    nd = len(kernel)
    if list(padding[:nd]) == list(padding[nd:]) and all(p <= k // 2 for p, k in zip(padding[:nd], kernel)):
        return _AVGPOOL[nd](x, kernel, stride, list(padding[:nd]), ceil_mode=ceil_mode,
                            count_include_pad=count_include_pad)
    shape = _window_shape(x, kernel, stride, padding, [1] * nd, ceil_mode)
    xp, _ = pad_input(x, padding, explicit=True)
    total = _AVGPOOL[nd](xp, kernel, stride, 0, ceil_mode=ceil_mode)
    if not count_include_pad:
        # Mean over the real elements only: the same pooling of a padded mask of ones gives each
        # window's share of real elements.
        mask, _ = pad_input(torch.ones_like(x[:1, :1]), padding, explicit=True)
        total = total / _AVGPOOL[nd](mask, kernel, stride, 0, ceil_mode=ceil_mode)
    return _crop(total, shape)


_POOL_ATTRS = {"kernel": Attr("ints"), "stride": Attr("ints"), "padding": Attr("ints"), "ceil_mode": Attr("bool", False)}
defop("max_pool", ["x"], {**_POOL_ATTRS, "dilation": Attr("ints")}, infer=_pool_infer, ref=_max_pool_ref,
      family="nn", doc="N-d max pooling; padding lists begins then ends and pads with -inf.")
defop("avg_pool", ["x"], {**_POOL_ATTRS, "count_include_pad": Attr("bool", True)}, infer=_pool_infer,
      ref=_avg_pool_ref, family="nn", doc="N-d average pooling.")


def _adaptive_infer(x, output_size):
    nd = len(output_size)
    if x.rank != nd + 2:
        raise ValueError(f"{nd}-d adaptive pooling needs an (N, C, {nd} spatial) input, got {x}")
    return x.with_shape(x.shape[:2] + tuple(output_size))


_ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
defop("adaptive_avg_pool", ["x"], {"output_size": Attr("ints")}, infer=_adaptive_infer,
      ref=lambda ctx, x, output_size: _ADAPTIVE[len(output_size)](x, output_size), family="nn")

"""Ops that carry weights: linear, matmul, conv, embedding. Their ``weight`` slot is where
compression passes put encoded tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import symbolic as sym
from ..dtypes import int32, int64
from ..types import TensorType
from .registry import Attr, broadcast_shapes, defop, same_dtype

# Ops whose input slot "weight" holds a parameter tensor that compression may encode.
WEIGHT_OPS = ("linear", "matmul", "conv", "embedding")
WEIGHT_SLOT = 1      # the input that may hold a weight, for every op in WEIGHT_OPS


def _linear_infer(x, weight, bias=None):
    same_dtype(x, weight, bias)
    if weight.rank != 2:
        raise ValueError(f"linear weight must be 2-D [out, in], got {weight}")
    if x.rank < 1 or not sym.equal(x.shape[-1], weight.shape[1]):
        raise ValueError(f"linear input {x} does not match weight {weight} (last dim must be {weight.shape[1]})")
    if bias is not None and (bias.rank != 1 or not sym.equal(bias.shape[0], weight.shape[0])):
        raise ValueError(f"linear bias {bias} must be [{weight.shape[0]}]")
    return x.with_shape(x.shape[:-1] + (weight.shape[0],))


defop("linear", ["x", "weight", "bias?"], infer=_linear_infer,
      ref=lambda ctx, x, w, b=None: F.linear(x, w, b), family="linalg",
      doc="y = x @ weight.T + bias; weight is [out_features, in_features].")


def _matmul_infer(a, b):
    dt = same_dtype(a, b)
    if a.rank < 2 or b.rank < 2:
        raise ValueError(f"matmul needs operands of rank >= 2, got {a} and {b}")
    if not sym.equal(a.shape[-1], b.shape[-2]):
        raise ValueError(f"matmul inner dimensions differ: {a} @ {b}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return TensorType(dt, batch + (a.shape[-2], b.shape[-1]))


defop("matmul", ["a", "b"], infer=_matmul_infer, ref=lambda ctx, a, b: torch.matmul(a, b), family="linalg",
      doc="Batched matrix product with numpy broadcasting of the leading dims (covers bmm).")


def conv_out_dim(size, kernel, stride, pad_begin, pad_end, dilation, ceil_mode=False):
    """Output length of a convolution/pooling window along one axis (symbolic-aware)."""
    span = dilation * (kernel - 1) + 1
    if isinstance(size, int):
        num = size + pad_begin + pad_end - span
        if num < 0:
            raise ValueError(f"window of {span} does not fit an input of {size} with padding {pad_begin}+{pad_end}")
        out = (num + (stride - 1 if ceil_mode else 0)) // stride + 1
        if ceil_mode and (out - 1) * stride >= size + pad_begin:
            out -= 1        # the last window must start inside the input or the begin padding
        return out
    if ceil_mode:
        raise ValueError("ceil_mode with a symbolic spatial size is not supported")
    return sym.add(sym.floordiv(sym.add(size, pad_begin + pad_end - span), stride), 1)


def _conv_attrs_check(nd, stride, padding, dilation):
    if len(stride) != nd or len(dilation) != nd or len(padding) != 2 * nd:
        raise ValueError(f"conv over {nd} spatial dims needs stride/dilation of length {nd} and padding of "
                         f"length {2 * nd} (begins then ends), got {stride}, {dilation}, {padding}")


def _conv_infer(x, weight, bias=None, *, stride, padding, dilation, groups):
    same_dtype(x, weight, bias)
    nd = weight.rank - 2
    if nd < 1 or x.rank != nd + 2:
        raise ValueError(f"conv input {x} and weight {weight} ranks do not match (N, C, spatial...)")
    _conv_attrs_check(nd, stride, padding, dilation)
    cin = x.shape[1]
    if not sym.equal(sym.mul(weight.shape[1], groups), cin):
        raise ValueError(f"conv weight {weight} with groups={groups} expects {sym.mul(weight.shape[1], groups)} "
                         f"input channels, input has {cin}")
    if weight.shape[0] % groups:
        raise ValueError(f"conv output channels {weight.shape[0]} not divisible by groups={groups}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"conv bias {bias} must be [{weight.shape[0]}]")
    spatial = tuple(conv_out_dim(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], padding[nd + i],
                                 dilation[i]) for i in range(nd))
    return x.with_shape((x.shape[0], weight.shape[0]) + spatial)


def pad_input(x, padding, value=0.0, explicit=False):
    """Apply (begins..., ends...) padding over the trailing spatial dims unless it is symmetric
    and not ``explicit``; returns x and the padding left for torch to apply."""
    nd = len(padding) // 2
    begins, ends = padding[:nd], padding[nd:]
    if list(begins) == list(ends) and not explicit:
        return x, list(begins)
    torch_pad = []
    for i in reversed(range(nd)):
        torch_pad += [begins[i], ends[i]]
    return F.pad(x, torch_pad, value=value), [0] * nd


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_ref(ctx, x, w, b=None, *, stride, padding, dilation, groups):
    x, pad = pad_input(x, padding)
    return _CONV[w.dim() - 2](x, w, b, stride=stride, padding=pad, dilation=dilation, groups=groups)


defop("conv", ["x", "weight", "bias?"],
      {"stride": Attr("ints"), "padding": Attr("ints"), "dilation": Attr("ints"), "groups": Attr("int", 1)},
      infer=_conv_infer, ref=_conv_ref, family="linalg",
      doc="N-d convolution (1-3 spatial dims), NC... layout; padding lists all begins then all ends.")


def _embedding_infer(indices, weight):
    if indices.dtype not in (int64, int32):
        raise TypeError(f"embedding indices must be int64 or int32, got {indices.dtype}")
    if weight.rank != 2:
        raise ValueError(f"embedding table must be 2-D [num, dim], got {weight}")
    return TensorType(weight.dtype, indices.shape + (weight.shape[1],))


defop("embedding", ["indices", "weight"], infer=_embedding_infer,
      ref=lambda ctx, idx, w: F.embedding(idx, w), family="linalg",
      doc="Row lookup: out[..., :] = weight[indices[...], :].")


def _hadamard_infer(x, *, block):
    from ..hadamard import check_block
    if not x.dtype.is_float or x.rank < 1:
        raise ValueError(f"hadamard needs a float input of rank >= 1, got {x}")
    n = x.shape[-1]
    if not isinstance(n, int):
        raise ValueError(f"hadamard needs a static last dim, got {x}")
    check_block(block, "hadamard")
    if n % block:
        raise ValueError(f"hadamard block {block} does not divide the last dim of {x}")
    return x


def _hadamard_ref(ctx, x, *, block):
    from ..hadamard import hadamard_transform
    h = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return hadamard_transform(h, block).to(x.dtype)


defop("hadamard", ["x"], {"block": Attr("int")}, infer=_hadamard_infer, ref=_hadamard_ref, family="linalg",
      doc="x @ M along the last axis, M = kron(H_m, H_p) / sqrt(block) down the diagonal "
          "(nnforge.ir.hadamard): the online rotation QuaRot puts where a rotation cannot fold.")

"""Weights in ONNX, in the form the capability table (:mod:`.capabilities`) gives each layer:
dense tensors read in place from weights.safetensors, DequantizeLinear of uint8/uint4/float8
codes in place, or ORT's MatMulNBits reading our packed 4-bit codes directly. A layer weight no
row takes falls back, reported: 2/3/5/6/7-bit codes widened to uint8, FP6/FP4 codes widened
exactly to int8/int16 lattice values (both for DequantizeLinear), act-order columns re-ordered by
a Gather, anything else decoded to dense."""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from ...ir import Dense, IntQuant, MiniFloat, Node, Value, WEIGHT_OPS
from ...ir import minifloat as mf
from ...ir.encodings import rows_cols
from ...ir.ops import WEIGHT_SLOT
from ...ir.packing import pack_bits, unpack_bits
from ..base import Capability, Fallback
from .builder import INLINE_LIMIT, NP_TYPES, OnnxBuilder, onnx_type
from .capabilities import CAPABILITIES, FLOAT8, block_size, code_type


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        raise TypeError("bfloat16 has no numpy type")
    return t.detach().cpu().numpy()


def _tensor(b: OnnxBuilder, name: str, key: str, t: torch.Tensor, data_type: int, dims) -> str:
    """An initializer with ``t``'s bytes: in place from safetensors when large, else inline."""
    if t.numel() * t.element_size() > INLINE_LIMIT:
        ref = b.external(b.fresh(name), key, data_type, dims)
        if ref is not None:
            return ref
    if data_type == TensorProto.BFLOAT16:
        return b.raw(b.fresh(name), data_type, dims, t.contiguous().view(torch.int16).numpy().tobytes())
    if data_type in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2):
        # float8 codes are stored as uint8: inline them with their ONNX type, not numpy's
        return b.raw(b.fresh(name), data_type, dims, t.contiguous().numpy().tobytes())
    return b.const(_np(t).reshape(dims), name)


def lookup(b: OnnxBuilder, node: Node) -> tuple[Capability | None, str]:
    """How ``node`` (a linear, matmul, conv or embedding) runs its weight: the row of
    :data:`CAPABILITIES` for its op and its weight's encoding on the target being built, or None
    and why not. The one place the onnx backend decides what runs natively."""
    return CAPABILITIES.find(node.op, node.inputs[WEIGHT_SLOT].encoding, b.target)


def is_layer_weight(node: Node, slot: int) -> bool:
    """Input ``slot`` of ``node`` is a layer's weight, which the capability table decides."""
    return node.op in WEIGHT_OPS and slot == WEIGHT_SLOT and node.inputs[slot] is not None \
        and node.inputs[slot].is_weight


def dense(b: OnnxBuilder, v: Value, fallbacks: list[Fallback], found=None) -> str:
    """ONNX name of weight ``v`` as a dense tensor of its logical dtype and shape. ``found``: what
    :func:`lookup` said for the layer reading ``v`` as its weight; None for any other weight
    operand (a bias, a norm's parameters, a folded constant), which ONNX ops read as a plain
    tensor, so an encoded one is decoded (no pass encodes those)."""
    if v.name in b.weight_cache:
        return b.weight_cache[v.name]
    enc = v.encoding
    cap, why = found or (None, "only the weight of a linear, matmul, conv or embedding runs encoded")
    if isinstance(enc, Dense) and (cap is not None or found is None):
        out = _tensor(b, v.name, f"{v.name}::data", enc.data, onnx_type(v.dtype), v.shape)
    elif cap is not None or found is not None and dequantize_ok(enc):
        out = dequantize(b, v, fallbacks, why)
        if cap is None and enc.perm is not None:
            # Generic consumers need the original column order; linear layers avoid this by
            # permuting their activations instead (see ops.lower_linear).
            inv = torch.argsort(enc.perm)
            out = b.node("Gather", [out, b.ints(inv.tolist())], axis=1)
            fallbacks.append(Fallback(v.name, enc.describe(), "act-order columns re-ordered by a Gather on the "
                                      f"dequantised weight ({why})"))
        if len(v.shape) != 2:
            out = b.node("Reshape", [out, b.ints(v.shape)])
    else:
        fallbacks.append(Fallback(v.name, enc.describe(), f"decoded to {v.dtype.name} at export ({why})"))
        data = enc.decode(v.dtype.torch_dtype)
        out = b.raw(b.fresh(v.name), onnx_type(v.dtype), list(v.shape), data.contiguous().view(torch.int16).numpy()
                    .tobytes()) if data.dtype == torch.bfloat16 else b.const(data.numpy(), v.name)
    b.weight_cache[v.name] = out
    return out


def lattice(enc) -> tuple[int, float] | None:
    """(ONNX integer type, quantum) for a minifloat ONNX has no type for, where every value is a
    whole multiple of the format's smallest subnormal (the quantum) and the largest multiple fits
    int8 or int16: E2M1 (values x2 reach 12), E2M3 (x8: 60), E3M2 (x16: 448). Such codes widen
    exactly to integers, the quantum folds into the scales, and DequantizeLinear runs them."""
    if not isinstance(enc, MiniFloat) or enc.fmt.short in FLOAT8:
        return None
    quantum = 2.0 ** (1 - enc.fmt.bias - enc.fmt.man_bits)
    top = enc.fmt.max_value / quantum
    if top <= 127:
        return TensorProto.INT8, quantum
    if top <= 32767:
        return TensorProto.INT16, quantum
    return None


def dequantize_ok(enc) -> bool:
    """Encodings that run as a DequantizeLinear of their stored or widened codes (natively where
    the capability table takes the stored ones, else as a reported fallback)."""
    return isinstance(enc, IntQuant) or (isinstance(enc, MiniFloat) and (enc.fmt.short in FLOAT8
                                                                         or lattice(enc) is not None))


def _code_tensor(b: OnnxBuilder, v: Value, enc, fallbacks, why: str) -> tuple[str, int]:
    """The codes as an ONNX uint8, uint4, float8 or widened integer tensor [rows, cols] (stored
    column order); widening is reported with ``why`` the codes did not run as stored."""
    rows, cols = rows_cols(enc.shape)
    key = f"{v.name}::codes"
    stored = code_type(enc)
    if stored in (TensorProto.UINT8, *FLOAT8.values()):
        return _tensor(b, f"{v.name}.codes", key, enc.codes, stored, [rows, cols]), stored
    if stored == TensorProto.UINT4:
        # Our per-row packing equals ONNX's flat low-nibble-first uint4 packing when rows are whole bytes.
        ref = b.external(b.fresh(f"{v.name}.codes"), key, TensorProto.UINT4, [rows, cols]) \
            if enc.codes.numel() > INLINE_LIMIT else None
        return ref or b.raw(b.fresh(f"{v.name}.codes"), TensorProto.UINT4, [rows, cols],
                            enc.codes.numpy().tobytes()), TensorProto.UINT4
    if isinstance(enc, MiniFloat):
        widened, quantum = lattice(enc)
        np_type = np.int8 if widened == TensorProto.INT8 else np.int16
        fallbacks.append(Fallback(v.name, enc.describe(), f"{enc.fmt.short} codes widened exactly to "
                                  f"{np.dtype(np_type).name} multiples of {quantum:g} for DequantizeLinear ({why})"))
        ints = torch.round(mf.decode(enc.fields(), enc.fmt, torch.float64) / quantum)
        return b.const(ints.numpy().astype(np_type), f"{v.name}.codes"), widened
    fallbacks.append(Fallback(v.name, enc.describe(), f"{enc.bits}-bit codes widened to uint8 for "
                              f"DequantizeLinear ({why})"))
    fields = unpack_bits(enc.codes, enc.bits, cols).to(torch.uint8)
    return b.const(fields.numpy(), f"{v.name}.codes"), TensorProto.UINT8


def _zero_points(b: OnnxBuilder, v: Value, enc: IntQuant, codes_type: int, shape) -> str:
    zp = _zero_points_of(enc)
    if zp.shape[0] == 1 and shape and len(shape) == 2 and shape[0] != 1:
        zp = zp.expand(shape[0], -1)
    zp = zp.reshape(shape)
    if codes_type == TensorProto.UINT4:
        flat = zp.reshape(1, -1)
        return b.raw(b.fresh(f"{v.name}.zero_point"), TensorProto.UINT4, list(shape),
                     pack_bits(flat, 4).numpy().tobytes())
    return b.const(zp.to(torch.uint8).numpy(), f"{v.name}.zero_point")


def _scales(b: OnnxBuilder, v: Value, enc, dims) -> str:
    """The scales as an ONNX tensor of the weight's float type (DequantizeLinear and MatMulNBits
    output the scale's type), read in place when stored in that type and shape already. Scales
    stored as E8M0/E4M3 codes (MX, NVFP4) have no ONNX form and are decoded (exactly) to floats;
    widened minifloat codes carry their quantum in the scales."""
    want = v.dtype.torch_dtype
    widened = lattice(enc)
    in_place = isinstance(enc, IntQuant) or (enc.scale_format.kind == "float" and enc.global_scale is None
                                             and widened is None)
    scale = enc.scale if in_place else enc.scale_values(torch.float32)
    if widened is not None:
        scale = scale * widened[1]                 # a power of two: exact
    full = scale.numel() == int(np.prod(dims)) if dims else scale.numel() == 1
    if in_place and scale.dtype == want and full:
        return _tensor(b, f"{v.name}.scale", f"{v.name}::scale", scale.reshape(dims), onnx_type(v.dtype), dims)
    scale = scale.to(torch.float32)
    if not full:                       # one shared row of group scales, repeated for every row
        scale = scale.expand(dims[0], -1)
    scale = scale.reshape(dims).to(want)
    if want == torch.bfloat16:
        return b.raw(b.fresh(f"{v.name}.scale"), TensorProto.BFLOAT16, dims,
                     scale.contiguous().view(torch.int16).numpy().tobytes())
    return b.const(scale.numpy(), f"{v.name}.scale")


def dequantize(b: OnnxBuilder, v: Value, fallbacks, why: str = "") -> str:
    """DequantizeLinear of an IntQuant or MiniFloat weight: [rows, cols] of the weight's dtype,
    stored column order. ``why``: why the capability table did not take it as stored (reported
    with any widening), empty where it did."""
    enc = v.encoding
    rows, cols = rows_cols(enc.shape)
    codes, codes_type = _code_tensor(b, v, enc, fallbacks, why)
    gran = enc.granularity
    attrs = {}
    if gran == "tensor":
        scale_name = _scales(b, v, enc, [])
        zp_shape = []
    elif gran == "channel":
        scale_name = _scales(b, v, enc, [rows])
        zp_shape, attrs = [rows], {"axis": 0}
    else:
        groups = enc.scale.shape[1]
        scale_name = _scales(b, v, enc, [rows, groups])
        zp_shape, attrs = [rows, groups], {"axis": 1, "block_size": enc.group_size}
    zp = None if isinstance(enc, MiniFloat) else _zero_points(b, v, enc, codes_type, zp_shape)
    return b.node("DequantizeLinear", [codes, scale_name, zp], **attrs)


def _per_block(enc: IntQuant, t: torch.Tensor, block: int) -> torch.Tensor:
    """A [1 or rows, groups] tensor of ``enc`` (scales, zero points) as [rows, K / block]: each
    group's value repeated for every block in it (exact)."""
    rows = enc.shape[0]
    per_group = (enc.group_size if enc.granularity == "group" else enc.shape[1]) // block
    return t.expand(rows, -1).repeat_interleave(per_group, dim=1)


def matmulnbits(b: OnnxBuilder, x: str, v: Value, out: str | None) -> str:
    """y = x @ W.T with W held as MatMulNBits blocks (:func:`.capabilities.block_size`) that read
    our packed codes in place; each group's scale (and zero point) repeated for its blocks."""
    enc: IntQuant = v.encoding
    n, k = enc.shape
    block = block_size(enc)
    blocks = k // block
    codes = _tensor(b, f"{v.name}.codes", f"{v.name}::codes", enc.codes, TensorProto.UINT8,
                    [n, blocks, block * enc.bits // 8])
    if enc.group_size == block and enc.scale.shape[0] == n:
        scales = _scales(b, v, enc, [n * blocks])
    else:
        scales = b.const(_per_block(enc, enc.scale.to(torch.float32), block).reshape(-1).to(v.dtype.torch_dtype)
                         .numpy(), f"{v.name}.scale")
    inputs = [x, codes, scales]
    if enc.zero_point is not None or not enc.signed:       # signed codes are offset binary: ORT's default
        zp = _per_block(enc, _zero_points_of(enc), block)
        zp = pack_bits(zp, 4) if enc.bits == 4 else zp.to(torch.uint8)          # [n, ceil(blocks * bits / 8)]
        inputs.append(b.const(zp.numpy(), f"{v.name}.zero_point"))
    # ORT's only fast 8-bit kernel rounds activations to int8 per block (the capability row lets
    # 8-bit weights here only where the target allows that); its fp32 form dequantises the whole
    # weight on every call.
    attrs = {"accuracy_level": 4} if enc.bits == 8 else {}
    return b.node("MatMulNBits", inputs, out, domain="com.microsoft", K=k, N=n, bits=enc.bits, block_size=block,
                  **attrs)


def _zero_points_of(enc: IntQuant) -> torch.Tensor:
    """The zero point of every group [1 or rows, groups], in the stored code domain (signed codes
    are stored in offset binary)."""
    if enc.zero_point is not None:
        return enc.zero_point.to(torch.int64)
    return torch.full(tuple(enc.scale.shape), 1 << (enc.bits - 1) if enc.signed else 0, dtype=torch.int64)


def gather_rows(b: OnnxBuilder, ids: str, v: Value, out: str, ids_rank: int) -> str:
    """Rows ``ids`` (a tensor of rank ``ids_rank``) of 8- or 4-bit weight ``v`` (an embedding):
    the code rows (uint8 bytes read in place; 4-bit ones split into their two nibbles, low first
    as nnforge packs them) and their scale and zero-point rows gathered first, then only those
    rows dequantised, in float32 as the reference decodes, so no float table of the whole weight
    is made."""
    enc: IntQuant = v.encoding
    rows, cols = enc.shape
    width = cols * enc.bits // 8
    codes = _tensor(b, f"{v.name}.codes", f"{v.name}::codes", enc.codes, TensorProto.UINT8, [rows, width])
    q = b.node("Gather", [codes, ids], axis=0)
    if enc.bits == 4:
        low = b.node("BitwiseAnd", [q, b.const(np.array(15, np.uint8), f"{v.name}.low_mask")])
        high = b.node("BitShift", [q, b.const(np.array(4, np.uint8), f"{v.name}.high_shift")], direction="RIGHT")
        last = b.ints([-1])
        pairs = b.node("Concat", [b.node("Unsqueeze", [low, last]), b.node("Unsqueeze", [high, last])], axis=-1)
        q = b.node("Reshape", [pairs, b.ints([0] * ids_rank + [cols])])
    q = b.node("Cast", [q], to=TensorProto.FLOAT)
    by_column = b.ints((torch.arange(cols) // enc.group_size).tolist()) if enc.scale.shape[1] > 1 else None

    def rows_of(t: torch.Tensor, name: str) -> str:
        """[1 or rows, groups] -> per column of the gathered rows, or a 1-D row every row shares."""
        if t.shape[0] == rows and rows > 1:
            picked = b.node("Gather", [b.const(t.numpy(), f"{v.name}.{name}"), ids], axis=0)
        else:
            picked = b.const(t.reshape(-1).numpy(), f"{v.name}.{name}")
        return picked if by_column is None else b.node("Gather", [picked, by_column], axis=-1)

    q = b.node("Sub", [q, rows_of(_zero_points_of(enc).to(torch.float32), "zero_point")])
    y = b.node("Mul", [q, rows_of(enc.scale.to(torch.float32), "scale")],
               out if v.dtype.name == "float32" else None)
    return y if v.dtype.name == "float32" else b.node("Cast", [y], out, to=onnx_type(v.dtype))


__all__ = ["lookup", "is_layer_weight", "dense", "dequantize", "dequantize_ok", "gather_rows", "matmulnbits",
           "NP_TYPES"]

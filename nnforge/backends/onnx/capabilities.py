"""What the onnx backend runs natively: one row per (layer op, weight encoding kind), read by its
lowering (:func:`.weights.lookup`) and by ``nnforge targets --explain``. A layer weight no row
accepts is dequantised from widened codes or decoded to dense, and reported as a Fallback.

    >>> cap, why = CAPABILITIES.find("linear", weight.encoding, target)
"""
from __future__ import annotations

import math

from onnx import TensorProto

from ...ir import IntQuant, MiniFloat
from ...ir.encodings import rows_cols
from ..base import Capabilities, Capability

# Minifloats ONNX (opset 21) holds as tensor types; their bit patterns are our codes.
FLOAT8 = {"e4m3": TensorProto.FLOAT8E4M3FN, "e5m2": TensorProto.FLOAT8E5M2}


def code_type(enc) -> int | None:
    """The ONNX type DequantizeLinear reads ``enc``'s stored codes as, byte for byte: uint8 for
    8-bit integers, uint4 for 4-bit integers whose rows are whole bytes (our per-row packing is
    then ONNX's flat one), float8 for E4M3/E5M2; None when they must be widened or decoded first."""
    if isinstance(enc, MiniFloat):
        return FLOAT8.get(enc.fmt.short)
    if isinstance(enc, IntQuant):
        if enc.bits == 8:
            return TensorProto.UINT8
        if enc.bits == 4 and rows_cols(enc.shape)[1] % 2 == 0:
            return TensorProto.UINT4
    return None


def codes_in_place(enc, target) -> str | None:
    """Why DequantizeLinear cannot read ``enc``'s codes as they are stored."""
    if code_type(enc) is not None:
        return None
    if isinstance(enc, MiniFloat):
        return f"ONNX has no tensor type for {enc.fmt.short} codes (float8 e4m3 and e5m2 only)"
    cols = rows_cols(enc.shape)[1]
    if enc.bits == 4:
        return f"4-bit codes in rows of {cols} (odd) do not pack as ONNX uint4"
    return f"DequantizeLinear takes 8-bit or 4-bit codes, not {enc.bits}-bit"


def in_column_order(enc, target) -> str | None:
    """Why an op other than linear cannot take ``enc`` as stored: act-order columns, which only a
    linear layer absorbs (by permuting its activations)."""
    return None if enc.perm is None else "act-order columns, which only a linear layer absorbs"


def dequantized(enc, target) -> str | None:
    """A weight of a matmul, conv or embedding: codes in place and columns in order."""
    whys = [w for w in (codes_in_place(enc, target), in_column_order(enc, target)) if w]
    return "; ".join(whys) or None


def block_size(enc) -> int | None:
    """The MatMulNBits block for ``enc``: the largest power of two >= 16 dividing its group (the
    whole row for per-channel and per-tensor scales) and K, so that each block lies in one group
    and its scale is the group's, repeated; None when there is none."""
    cols = rows_cols(enc.shape)[1]
    group = enc.group_size if enc.granularity == "group" else cols
    if cols % group:                     # a short last group
        return None
    both = math.gcd(group, cols)
    block = both & -both                 # the largest power of two dividing both
    return block if block >= 16 else None


# The target option that lets 8-bit weights run as MatMulNBits: ORT's only 8-bit kernel rounds the
# activations to int8 per block (accuracy_level 4), which the reference interpreter does not.
INT8_ACTIVATIONS = "int8_activations"


def matmulnbits(enc, target) -> str | None:
    """Why ORT's MatMulNBits cannot hold ``enc``: it takes 4-bit codes in per-row groups, or 8-bit
    codes with any scales where ``target`` allows int8 activations (:data:`INT8_ACTIVATIONS`), in
    blocks along K of a power of two >= 16 (:func:`block_size`), and outputs fp32 or fp16."""
    if enc.bits not in (4, 8):
        return f"MatMulNBits takes 4-bit or 8-bit codes, not {enc.bits}-bit"
    if enc.bits == 8 and not (target is not None and target.options.get(INT8_ACTIVATIONS)):
        return f"8-bit MatMulNBits rounds activations to int8 (target option {INT8_ACTIVATIONS} is off)"
    if len(enc.shape) != 2:
        return f"MatMulNBits takes a 2-D weight, not {len(enc.shape)}-D"
    rows, cols = enc.shape
    gs = enc.group_size
    if enc.bits == 4 and (enc.granularity != "group" or enc.scale.shape[0] != rows):
        return "MatMulNBits takes 4-bit codes with a scale per row and group"
    if enc.bits == 4 and (gs < 16 or gs & (gs - 1) or cols % gs):
        return f"MatMulNBits takes groups of a power of two >= 16 dividing K, not {gs} of {cols}"
    if block_size(enc) is None:
        return f"MatMulNBits takes blocks of a power of two >= 16 dividing K and the group; {cols} columns " \
               f"in groups of {gs if enc.granularity == 'group' else cols} have none"
    if enc.out_dtype.name not in ("float32", "float16"):
        return f"MatMulNBits outputs fp32 or fp16, not {enc.out_dtype.name}"
    return None


def gathered_rows(enc, target) -> str | None:
    """Why an embedding cannot gather ``enc``'s code rows and scale rows and dequantise only the
    rows it gathered: that takes 8-bit codes, or 4-bit ones two a byte (an even row length), in
    column order."""
    if enc.bits not in (8, 4):
        return f"gathering code rows takes 8- or 4-bit codes, not {enc.bits}-bit"
    if enc.bits == 4 and enc.shape[1] % 2:
        return f"gathering 4-bit code rows takes an even row length (two codes a byte), not {enc.shape[1]}"
    return in_column_order(enc, target)


MATMULNBITS = Capability("linear", "int", "MatMulNBits (com.microsoft) reading the codes in place: 4-bit per-row "
                         "groups in fp32; 8-bit codes with any scales (repeated per block) only with target option "
                         f"{INT8_ACTIVATIONS}, as ORT rounds their activations to int8 per block", matmulnbits)
GATHER_ROWS = Capability("embedding", "int", "Gather of the 8- or 4-bit code rows read in place (uint8 bytes; "
                         "nibbles split after the gather) and of their scale rows, dequantised after the gather (no "
                         "float table is made)", gathered_rows)
# An encoded KV cache (docs/kv_cache.md), lowered by kvcache.py: the state stays in its stored dtypes.
KV_CACHE = [
    Capability("kv_cache_write", "kv8", "int8 codes and float16 scales per token and group of channels scattered "
               "into the state (ScatterElements), quantised in float32 ops as the reference rounds"),
    Capability("kv_cache_read", "kv8", "int8 codes times their float16 scales (Cast, Mul) before attention"),
    Capability("kv_cache_write", "kv-fp8", "E4M3 codes (uint8 bit patterns, worked out arithmetically) and float16 "
               "per-token scales scattered into the state"),
    Capability("kv_cache_read", "kv-fp8", "E4M3 codes through a 256-entry table (Gather) times their float16 "
               "scales before attention"),
    Capability("kv_cache_write", "kv4", "KIVI: groups and tokens completed by the step quantised to packed 4-bit "
               "codes and float16 scales and minimums (Where over the state), the float window refilled; needs "
               "each row's positions consecutive, continuing its sequence"),
    Capability("kv_cache_read", "kv4", "KIVI: unpacked codes times scales plus minimums for the quantised tokens, "
               "the float window for the recent ones, zeros past the last position"),
    Capability("kv_cache_write", "kv-gear4", "GEAR: kv4's write, and per token its outliers (TopK) and per "
               "completed group the factors of the error, by a power iteration unrolled in elementwise ops and "
               "halving sums, as the reference orders them"),
    Capability("kv_cache_read", "kv-gear4", "GEAR: kv4's read with each quantised token's rank-1 terms added and its "
               "outliers put back (ScatterElements)"),
    Capability("kv_cache_write", "kv-nvfp4", "E2M1 codes packed two a byte, E4M3 block scales (both worked out "
               "arithmetically) and float16 per-token scales scattered into the state"),
    Capability("kv_cache_read", "kv-nvfp4", "E2M1 and E4M3 codes through their tables (Gather), times the float16 "
               "scales, before attention"),
    Capability("kv_cache_write", "kv-f16", "float16 values (a saturating Clip and Cast) scattered into the state"),
    Capability("kv_cache_read", "kv-f16", "float16 values widened (Cast) before attention"),
]

CAPABILITIES = Capabilities([
    Capability("linear", "dense", "Gemm on the tensor read in place from weights.safetensors"),
    Capability("matmul", "dense", "MatMul on the tensor read in place"),
    Capability("conv", "dense", "Conv on the tensor read in place"),
    Capability("embedding", "dense", "Gather from the tensor read in place"),
    MATMULNBITS,
    GATHER_ROWS,
    Capability("linear", "int", "DequantizeLinear of uint8/uint4 codes in place + Gemm "
               "(act-order: activations permuted)", codes_in_place),
    Capability("matmul", "int", "DequantizeLinear of uint8/uint4 codes in place + MatMul", dequantized),
    Capability("conv", "int", "DequantizeLinear of uint8/uint4 codes in place + Conv", dequantized),
    Capability("linear", "minifloat", "DequantizeLinear of float8 (e4m3/e5m2) codes in place + Gemm "
               "(act-order: activations permuted)", codes_in_place),
    Capability("matmul", "minifloat", "DequantizeLinear of float8 codes in place + MatMul", dequantized),
    Capability("conv", "minifloat", "DequantizeLinear of float8 codes in place + Conv", dequantized),
    Capability("embedding", "minifloat", "DequantizeLinear of float8 codes in place + Gather", dequantized),
    *KV_CACHE,
])

__all__ = ["CAPABILITIES", "KV_CACHE", "MATMULNBITS", "GATHER_ROWS", "FLOAT8", "INT8_ACTIVATIONS", "block_size", "code_type"]

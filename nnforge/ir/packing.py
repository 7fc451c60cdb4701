"""Bit packing of n-bit codes into bytes.

Layout (one documented layout, used by every encoding and backend): codes are packed along the
last axis of a 2-D array as a little-endian bit stream per row — code ``j`` occupies bits
``[j*b, (j+1)*b)`` of the row, bit 0 being the least significant bit of byte 0. For 4 bits this is
"low nibble first", the layout of ONNX int4 tensors and of ONNX Runtime's MatMulNBits. Rows are
padded to whole bytes independently, so a row can be read without its neighbours.
"""
from __future__ import annotations

import torch


def packed_cols(cols: int, bits: int) -> int:
    return (cols * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack an integer tensor [rows, cols] with values in [0, 2**bits) into uint8 [rows, ceil(cols*bits/8)]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can only pack 1..8-bit codes, got {bits}")
    codes = codes.to(torch.int64)
    if codes.dim() != 2:
        raise ValueError(f"pack_bits expects a 2-D tensor, got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    rows, cols = codes.shape
    if bits == 8:
        return codes.to(torch.uint8)
    if rows == 0:
        return torch.zeros(0, packed_cols(cols, bits), dtype=torch.uint8)
    if 8 % bits == 0:                       # 1, 2, 4: whole codes per byte, no straddling
        per = 8 // bits
        pad = (-cols) % per
        c = torch.nn.functional.pad(codes, (0, pad)).view(rows, -1, per)
        shifts = torch.arange(per, dtype=torch.int64) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(rows, cols * bits)
    stream = torch.nn.functional.pad(stream, (0, (-stream.shape[1]) % 8)).view(rows, -1, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 [rows, nbytes] -> int64 [rows, cols] in [0, 2**bits)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_bits expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_cols(cols, bits):
        raise ValueError(f"{cols} codes of {bits} bits need {packed_cols(cols, bits)} bytes per row, "
                         f"got {packed.shape[1]}")
    rows = packed.shape[0]
    p = packed.to(torch.int64)
    if bits == 8:
        return p
    if rows == 0:
        return torch.zeros(0, cols, dtype=torch.int64)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int64) * bits
        return ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)[:, :cols]
    stream = ((p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(rows, -1)
    stream = stream[:, : cols * bits].reshape(rows, cols, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(-1)


def to_unsigned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes in [-2**(b-1), 2**(b-1)) -> offset-binary fields ``code + 2**(b-1)``.

    Offset binary (not two's complement) is the stored form of signed codes because it is what
    the kernels read without conversion: ONNX Runtime's MatMulNBits with its default zero point
    2**(b-1), DequantizeLinear on uint4/uint8 with that zero point, and MARLIN-style GPU kernels."""
    return codes.to(torch.int64) + (1 << (bits - 1))


def to_signed(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Offset-binary fields -> signed codes."""
    return fields.to(torch.int64) - (1 << (bits - 1))

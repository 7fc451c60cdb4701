"""The arrays the lowbit kernel reads (kernels/lowbit.py's module doc), made from the arrays the
bundle stores: once in numpy (the kernel's tests and tuning), and as Relax expressions that the
library's ``prepare`` function evaluates when a bundle loads, so the bundle keeps only nnforge's own
encoding on disk (as the dense kernel's panels are made at load) and not a second, re-laid-out copy
of every int8/int4 weight.

Both forms pad the rows to ``blocks * lanes`` with zero codes, zero scales and zero points; the
Relax form is checked against the numpy one (tests/backends/tvm/test_lowbit_kernels.py).
"""
from __future__ import annotations

import numpy as np

DOT_LANE_CODES = 4          # codes of one row in a 32-bit lane of vpdpbusd


def interleave_rows(a: np.ndarray, lanes: int, blocks: int, fill=0) -> np.ndarray:
    """``[rows, cols] -> [blocks, cols, lanes]`` with ``out[b, c, l] = a[b * lanes + l, c]``;
    rows past the end hold ``fill``."""
    rows, cols = a.shape
    padded = np.full((blocks * lanes, cols), fill, dtype=a.dtype)
    padded[:rows] = a
    return np.ascontiguousarray(padded.reshape(blocks, lanes, cols).transpose(0, 2, 1))


def dot_layout(codes: np.ndarray, bits: int, k: int, lanes: int, blocks: int) -> np.ndarray:
    """Stored codes ``[rows, k * bits / 8]`` -> the dot layout ``[blocks, k / step, lanes * 4]``
    (lowbit's module doc); rows past the end hold zero codes."""
    rows = codes.shape[0]
    padded = np.zeros((blocks * lanes, k), np.uint8)
    if bits == 8:
        padded[:rows] = codes
    else:                               # nnforge's packing: column 2p in the low nibble of byte p
        padded[:rows, 0::2] = codes & 15
        padded[:rows, 1::2] = codes >> 4
    if bits == 4:                       # byte j of a step: column 8q + j low, 8q + 4 + j high
        pairs = padded.reshape(blocks * lanes, k // 8, 2, DOT_LANE_CODES)
        padded = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
    steps = padded.reshape(blocks, lanes, -1, DOT_LANE_CODES).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(steps.reshape(blocks, steps.shape[1], lanes * DOT_LANE_CODES))


# --- the same, as Relax expressions of the stored arrays ------------------------------------------
def _padded_rows(x, rows: int, cols: int, total: int, dtype: str):
    from tvm.relax import op
    if total == rows:
        return x
    return op.concat([x, op.zeros([total - rows, cols], dtype)], axis=0)


def relax_interleave_rows(x, rows: int, cols: int, dtype: str, lanes: int, blocks: int):
    """:func:`interleave_rows` of the Relax tensor ``x`` ``[rows, cols]`` (zero fill)."""
    from tvm.relax import op
    padded = _padded_rows(x, rows, cols, blocks * lanes, dtype)
    return op.permute_dims(op.reshape(padded, [blocks, lanes, cols]), [0, 2, 1])


def relax_dot_layout(codes, rows: int, bits: int, k: int, lanes: int, blocks: int):
    """:func:`dot_layout` of the Relax tensor ``codes`` (stored bytes ``[rows, k * bits / 8]``)."""
    from tvm import relax
    from tvm.relax import op

    def u8(v):
        return relax.const(v, "uint8")
    if bits == 4:                       # nibbles to one code a byte: column 2p low, 2p + 1 high
        low = op.expand_dims(op.bitwise_and(codes, u8(15)), 2)
        high = op.expand_dims(op.right_shift(codes, u8(4)), 2)
        codes = op.reshape(op.concat([low, high], axis=2), [rows, k])
    padded = _padded_rows(codes, rows, k, blocks * lanes, "uint8")
    if bits == 4:                       # byte j of a step: column 8q + j low, 8q + 4 + j high
        pairs = op.reshape(padded, [blocks * lanes, k // 8, 2, DOT_LANE_CODES])
        first = op.strided_slice(pairs, axes=[2], begin=[0], end=[1])
        second = op.strided_slice(pairs, axes=[2], begin=[1], end=[2])
        padded = op.bitwise_or(op.reshape(first, [blocks * lanes, k // 8, DOT_LANE_CODES]),
                               op.left_shift(op.reshape(second, [blocks * lanes, k // 8, DOT_LANE_CODES]), u8(4)))
    steps = op.permute_dims(op.reshape(padded, [blocks, lanes, k // (DOT_LANE_CODES * 8 // bits), DOT_LANE_CODES]),
                            [0, 2, 1, 3])
    return op.reshape(steps, [blocks, k // (DOT_LANE_CODES * 8 // bits), lanes * DOT_LANE_CODES])


def relax_widened_codes(codes, rows: int, k: int, bits: int, to_bits: int, add: int = 0):
    """Stored ``bits``-bit codes (nnforge's packing: a little-endian bit stream per row) as
    ``to_bits``-bit stored codes, each plus ``add``: 3-bit codes (eight in three bytes) as nibbles,
    for the 4-bit kernel. ``k`` is a multiple of 8."""
    from tvm import relax
    from tvm.relax import op
    if (bits, to_bits) != (3, 4) or k % 8:
        raise ValueError(f"widens 3-bit codes to 4 bits, k a multiple of 8; got {bits} -> {to_bits}, k = {k}")
    triples = op.astype(op.reshape(codes, [rows, k // 8, 3]), "int32")
    byte = [op.reshape(op.strided_slice(triples, axes=[2], begin=[i], end=[i + 1]), [rows, k // 8]) for i in range(3)]
    word = op.bitwise_or(op.bitwise_or(byte[0], op.left_shift(byte[1], relax.const(8, "int32"))),
                         op.left_shift(byte[2], relax.const(16, "int32")))
    seven, extra = relax.const(7, "int32"), relax.const(add, "int32")
    one = [op.add(op.bitwise_and(op.right_shift(word, relax.const(3 * j, "int32")), seven), extra) for j in range(8)]
    # code 2p in the low nibble of byte p, 2p + 1 in the high one
    nibbles = [op.bitwise_or(one[2 * p], op.left_shift(one[2 * p + 1], relax.const(4, "int32"))) for p in range(4)]
    packed = op.concat([op.expand_dims(b, 2) for b in nibbles], axis=2)
    return op.astype(op.reshape(packed, [rows, k // 2]), "uint8")


__all__ = ["DOT_LANE_CODES", "dot_layout", "interleave_rows", "relax_dot_layout", "relax_interleave_rows",
           "relax_widened_codes"]

"""An encoded KV cache (docs/kv_cache.md) in ONNX ops: ``kv_cache_write`` quantises a step's keys or
values and scatters codes and scales into the state, ``kv_cache_read`` dequantises the state into
the float cache attention reads. The state is graph input and output in its stored dtypes (int8 or
uint8 codes, float16 scales; kv-f16's float16 values), so it stays compressed between steps.

Every rounding is the reference's (ir/kvcache.py), op for op in float32: float16 scales by a
saturating Clip and Cast (nearest even), codes by Round (half to even). E4M3 codes are worked out
arithmetically (ONNX has no bit cast from float8 to uint8): the binade by comparisons with powers of
two, the mantissa by an exact division by the binade's quantum.

Their capability rows (``capabilities.KV_CACHE``) name each encoding.
"""
from __future__ import annotations

import numpy as np
import torch

from onnx import TensorProto

from ...ir import Node
from ...ir.kvcache import FP16_MAX, KV4, KVF16, KVFP8, KVGear4, KVNVFP4
from ...ir.ordered import power_start
from ...ir.minifloat import decode as decode_minifloat, encode as encode_minifloat
from ...ir.ops.kvcache import encoding_of
from .builder import OnnxBuilder, onnx_type
from .ops import operand, rule

F32, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64


def _f32(b: OnnxBuilder, x: float) -> str:
    return b.const(np.asarray(x, np.float32), "scalar")


def _i64(b: OnnxBuilder, x: int) -> str:
    return b.const(np.asarray(x, np.int64), "scalar")


def _f16(b: OnnxBuilder, x: str, out: str | None = None) -> str:
    """float32 -> float16, nearest even, saturating (ir/kvcache.f16)."""
    return b.node("Cast", [b.node("Clip", [x, _f32(b, -FP16_MAX), _f32(b, FP16_MAX)])], out, to=F16)


def _safe_ratio(b: OnnxBuilder, x: str, s: str) -> tuple[str, str]:
    """(s > 0, x / s where s > 0 else 0) as the reference divides."""
    positive = b.node("Greater", [s, _f32(b, 0.0)])
    return positive, b.node("Div", [x, b.node("Where", [positive, s, _f32(b, 1.0)])])


def _per_token_scale(b: OnnxBuilder, x: str, top: float) -> tuple[str, str]:
    """(float16 scale [.., 1] = f16(max|x| / top), x / scale (0 where the scale is 0))."""
    amax = b.node("ReduceMax", [b.node("Abs", [x]), b.ints([-1])], keepdims=1)
    scale = _f16(b, b.node("Div", [amax, _f32(b, top)]))
    positive, ratio = _safe_ratio(b, x, b.node("Cast", [scale], to=F32))
    return scale, b.node("Where", [positive, ratio, _f32(b, 0.0)])


def _scatter_tokens(b: OnnxBuilder, state: str, rows: str, positions: str, out: str) -> None:
    """``state`` [b, h, L, c] with ``rows`` [b, h, s, c] written at slots ``positions`` [b, s]."""
    index = b.node("Unsqueeze", [b.node("Cast", [positions], to=I64), b.ints([1, 3])])
    b.node("ScatterElements", [state, b.node("Expand", [index, b.node("Shape", [rows])]), rows], out, axis=2)


def _minifloat_codes(b: OnnxBuilder, ratio: str, fmt) -> str:
    """float32 codes (the integer fields) of the minifloat ``fmt`` (E4M3, E2M1) of float32 ``ratio``,
    nearest even, saturating (ir/minifloat.encode): binade e = how many of the normal binades'
    lower bounds 2^(1 - bias) .. |x| reaches (0: subnormal), at least 1; n = round(|x| / 2^(e -
    bias - m)); code = 2^m (e - 1) + n, at most the largest finite value's, with the sign bit of x
    (-0 included)."""
    m, bias = fmt.man_bits, fmt.bias
    top = int(encode_minifloat(torch.tensor([fmt.max_value]), fmt)[0])
    a = b.node("Abs", [ratio])
    steps = b.const(np.asarray([2.0 ** (e - bias) for e in range(1, top // 2 ** m + 1)], np.float32),
                    f"{fmt.short}_binades")
    reached = b.node("Cast", [b.node("GreaterOrEqual", [b.node("Unsqueeze", [a, b.ints([-1])]), steps])], to=F32)
    binade = b.node("Max", [b.node("ReduceSum", [reached, b.ints([-1])], keepdims=0), _f32(b, 1.0)])
    quanta = np.asarray([2.0 ** (e - bias - m) for e in range(top // 2 ** m + 1)], np.float32)
    quantum = b.node("Gather", [b.const(quanta, f"{fmt.short}_quanta"), b.node("Cast", [binade], to=I64)])
    n = b.node("Round", [b.node("Div", [a, quantum])])
    code = b.node("Min", [b.node("Add", [b.node("Mul", [b.node("Sub", [binade, _f32(b, 1.0)]), _f32(b, 2.0 ** m)]),
                                         n]), _f32(b, float(top))])
    negative = b.node("Less", [b.node("Div", [_f32(b, 1.0), ratio]), _f32(b, 0.0)])     # 1 / -0 is -inf
    sign = _f32(b, 2.0 ** (fmt.exp_bits + m))
    return b.node("Add", [code, b.node("Mul", [b.node("Cast", [negative], to=F32), sign])])


def _minifloat_values(b: OnnxBuilder, codes: str, fmt) -> str:
    """float32 values of integer ``codes`` of ``fmt``, through its table."""
    table = decode_minifloat(torch.arange(2 ** fmt.bits), fmt, torch.float32).numpy()
    return b.node("Gather", [b.const(table, f"{fmt.short}_values"), b.node("Cast", [codes], to=I64)])


@rule("kv_cache_write")
def _write(b: OnnxBuilder, node: Node, fb) -> None:
    enc = encoding_of(node.attrs)
    new, positions, *state = (operand(b, v, fb) for v in node.inputs)
    new = b.node("Cast", [new], to=F32)
    outs = [v.name for v in node.outputs]
    if isinstance(enc, KV4):
        _kv4_write(b, node, enc, new, positions, state, outs)
        return
    if isinstance(enc, KVNVFP4):
        for part, rows, out in zip(state, _nvfp4_quantize(b, enc, new, node.attrs["head_dim"]), outs):
            _scatter_tokens(b, part, rows, positions, out)
        return
    if isinstance(enc, KVF16):
        _scatter_tokens(b, state[0], _f16(b, new), positions, outs[0])
        return
    d = node.attrs["head_dim"]
    groups = d // enc.channels(d)
    scale, ratio = _per_token_scale(b, _split_groups(b, new, groups, d), enc.top)
    if groups > 1:             # back to [b, h, s, groups] scales and [b, h, s, d] ratios
        scale, ratio = (b.node("Reshape", [y, b.ints([0, 0, 0, cols])]) for y, cols in ((scale, groups), (ratio, d)))
    if isinstance(enc, KVFP8):
        codes = b.node("Cast", [_minifloat_codes(b, ratio, enc.FORMAT)], to=TensorProto.UINT8)
    else:
        codes = b.node("Cast", [b.node("Clip", [b.node("Round", [ratio]), _f32(b, -127.0), _f32(b, 127.0)])],
                       to=TensorProto.INT8)
    _scatter_tokens(b, state[0], codes, positions, outs[0])
    _scatter_tokens(b, state[1], scale, positions, outs[1])


@rule("kv_cache_read")
def _read(b: OnnxBuilder, node: Node, fb) -> None:
    enc = encoding_of(node.attrs)
    positions, *state = (operand(b, v, fb) for v in node.inputs)
    out = node.output.name
    if isinstance(enc, KV4):
        _kv4_read(b, node, enc, positions, state, out)
        return
    if isinstance(enc, KVNVFP4):
        _nvfp4_read(b, node, enc, state, out)
        return
    if isinstance(enc, KVF16):
        b.node("Cast", [state[0]], out, to=F32)
        return
    values = _minifloat_values(b, state[0], enc.FORMAT) if isinstance(enc, KVFP8) else b.node("Cast", [state[0]],
                                                                                                to=F32)
    scale = b.node("Cast", [state[1]], to=F32)
    L, d = node.attrs["max_len"], node.attrs["head_dim"]
    groups = d // enc.channels(d)
    if groups == 1:
        b.node("Mul", [values, scale], out)
        return
    grouped = b.node("Mul", [_split_groups(b, values, groups, d), b.node("Unsqueeze", [scale, b.ints([-1])])])
    b.node("Reshape", [grouped, b.ints([0, 0, L, d])], out)


def _split_groups(b: OnnxBuilder, x: str, groups: int, d: int) -> str:
    """[b, h, n, d] -> [b, h, n, groups, d / groups]: the channels that share a kv8 scale (x itself
    where the head is one group)."""
    return x if groups == 1 else b.node("Reshape", [x, b.ints([0, 0, 0, groups, d // groups])])


# --- kv4 ---------------------------------------------------------------------------------------
def _row_scalar(b: OnnxBuilder, positions: str, which: str) -> str:
    """Per batch row, as int64 [b, 1, 1, 1]: the step's first position ("first") or how many tokens
    the sequence holds after it ("end": the largest position + 1)."""
    p = b.node("Cast", [positions], to=I64)
    if which == "first":
        p = b.node("Slice", [p, b.ints([0]), b.ints([1]), b.ints([1])])
    else:
        p = b.node("Add", [b.node("ReduceMax", [p, b.ints([1])], keepdims=1), _i64(b, 1)])
    return b.node("Reshape", [p, b.ints([-1, 1, 1, 1])])


def _quantized(b: OnnxBuilder, enc: KV4, n: str) -> str:
    """KV4.quantized in int64 ops: G * floor(max(n - R, 0) / G) (Div of non-negatives floors)."""
    past = b.node("Max", [b.node("Sub", [n, _i64(b, enc.residual)]), _i64(b, 0)])
    return b.node("Mul", [b.node("Div", [past, _i64(b, enc.group)]), _i64(b, enc.group)])


def _slots(b: OnnxBuilder, count: int, base: str) -> str:
    """0 .. count-1 as int64 [1, 1, count, 1]."""
    return b.const(np.arange(count, dtype=np.int64).reshape(1, 1, count, 1), base)


def _between(b: OnnxBuilder, t: str, lo: str, hi: str) -> str:
    """lo <= t < hi."""
    return b.node("And", [b.node("GreaterOrEqual", [t, lo]), b.node("Less", [t, hi])])


def _asym4(b: OnnxBuilder, x: str, axis: int) -> tuple[str, str, str]:
    """(float32 codes 0..15, float16 scale, float16 min) over ``axis`` (kept): ir/kvcache.quantize_asym4."""
    lo = b.node("ReduceMin", [x, b.ints([axis])], keepdims=1)
    hi = b.node("ReduceMax", [x, b.ints([axis])], keepdims=1)
    m, scale = _f16(b, lo), _f16(b, b.node("Div", [b.node("Sub", [hi, lo]), _f32(b, 15.0)]))
    positive, ratio = _safe_ratio(b, b.node("Sub", [x, b.node("Cast", [m], to=F32)]), b.node("Cast", [scale], to=F32))
    q = b.node("Where", [positive, b.node("Round", [ratio]), _f32(b, 0.0)])
    return b.node("Clip", [q, _f32(b, 0.0), _f32(b, 15.0)]), scale, m


def _pack4(b: OnnxBuilder, codes: str, length: int, d: int) -> str:
    """float32 codes [b, h, length, d] -> uint8 [b, h, length, d/2], low nibble first (ir/packing.py)."""
    pairs = b.node("Reshape", [codes, b.ints([0, 0, length, d // 2, 2])])
    packed = b.node("ReduceSum", [b.node("Mul", [pairs, b.const(np.asarray([1.0, 16.0], np.float32), "nibbles")]),
                                  b.ints([-1])], keepdims=0)
    return b.node("Cast", [packed], to=TensorProto.UINT8)


def _unpack4(b: OnnxBuilder, packed: str, length: int, d: int) -> str:
    """uint8 [b, h, length, d/2] -> float32 codes [b, h, length, d]."""
    byte = b.node("Cast", [packed], to=F32)
    high = b.node("Floor", [b.node("Div", [byte, _f32(b, 16.0)])])
    low = b.node("Sub", [byte, b.node("Mul", [high, _f32(b, 16.0)])])
    pairs = b.node("Concat", [b.node("Unsqueeze", [x, b.ints([-1])]) for x in (low, high)], axis=-1)
    return b.node("Reshape", [pairs, b.ints([0, 0, length, d])])


def _kv4_write(b: OnnxBuilder, node: Node, enc: KV4, new: str, positions: str, state: list[str],
               outs: list[str]) -> None:
    """The step's tokens and the window's earlier ones laid out at their positions (``seq``, valid
    from the first token not yet quantised to the last one written); the groups (keys) or tokens
    (values) the step completes quantised from it into the state; the window refilled from it."""
    codes, scale, mn, window = state[:4]
    L, d, g, w = node.attrs["max_len"], node.attrs["head_dim"], enc.group, enc.window
    first, end = _row_scalar(b, positions, "first"), _row_scalar(b, positions, "end")
    q_old, q_new = _quantized(b, enc, first), _quantized(b, enc, end)
    t = _slots(b, L, "kv4_slots")
    last_new = b.node("Sub", [b.node("Shape", [new], start=2, end=3), _i64(b, 1)])
    in_new = b.node("Min", [b.node("Max", [b.node("Sub", [t, first]), _i64(b, 0)]), last_new])   # [b, 1, L, 1]
    shape = b.node("Concat", [b.node("Shape", [new], start=0, end=2), b.ints([L, d])], axis=0)
    from_new = b.node("GatherElements", [new, b.node("Expand", [in_new, shape])], axis=2)
    from_window = b.node("Gather", [window, b.const(np.arange(L, dtype=np.int64) % w, "kv4_window_rows")], axis=2)
    seq = b.node("Where", [b.node("GreaterOrEqual", [t, first]), from_new, from_window])      # [b, h, L, d]
    done = _between(b, t, q_old, q_new)                                                       # [b, 1, L, 1]
    x = seq
    if isinstance(enc, KVGear4):
        index, outlier, x = _gear_outliers(b, enc, seq, d)
    if enc.role == "k":
        groups = -(-L // g)
        padded = x if groups * g == L else b.node("Pad", [x, b.ints([0, 0, 0, 0, 0, 0, groups * g - L, 0])])
        c, s, m = _asym4(b, b.node("Reshape", [padded, b.ints([0, 0, groups, g, d])]), 3)
        deq = _unpad(b, _dequantize(b, c, s, m), groups * g, L, d) if isinstance(enc, KVGear4) else None
        c = _unpad(b, c, groups * g, L, d)
        group_done = _groups_done(b, g, groups, q_old, q_new)
        s, m = (b.node("Reshape", [y, b.ints([0, 0, groups, d])]) for y in (s, m))
        b.node("Where", [group_done, s, scale], outs[1])
        b.node("Where", [group_done, m, mn], outs[2])
    else:
        c, s, m = _asym4(b, x, 3)
        deq = _dequantize(b, c, s, m) if isinstance(enc, KVGear4) else None
        b.node("Where", [done, s, scale], outs[1])
        b.node("Where", [done, m, mn], outs[2])
    if isinstance(enc, KVGear4):
        _gear_write(b, enc, node, x, deq, index, outlier, done, q_old, q_new, state[4:], outs[4:])
    b.node("Where", [done, _pack4(b, c, L, d), codes], outs[0])
    # window row r holds the token t = q_new + ((r - q_new) mod W) when it is written (t < end)
    r = _slots(b, w, "kv4_rows")
    token = b.node("Add", [q_new, b.node("Mod", [b.node("Sub", [r, q_new]), _i64(b, w)], fmod=0)])   # [b, 1, W, 1]
    index = b.node("Min", [token, _i64(b, L - 1)])
    rows_shape = b.node("Concat", [b.node("Shape", [new], start=0, end=2), b.ints([w, d])], axis=0)
    held = b.node("GatherElements", [seq, b.node("Expand", [index, rows_shape])], axis=2)
    b.node("Where", [b.node("Less", [token, end]), held, _f32(b, 0.0)], outs[3])


def _dequantize(b: OnnxBuilder, codes: str, scale: str, mn: str) -> str:
    """codes * scale + min in float32, the float16 scale and min widened (ir/kvcache.KV4.dequantized)."""
    return b.node("Add", [b.node("Mul", [codes, b.node("Cast", [scale], to=F32)]), b.node("Cast", [mn], to=F32)])


def _groups_done(b: OnnxBuilder, g: int, groups: int, q_old: str, q_new: str) -> str:
    """Which groups of ``g`` tokens the step quantises: [b, 1, groups, 1], q_old <= j g and (j + 1) g <= q_new."""
    j = _slots(b, groups, "kv4_groups")
    return b.node("And", [b.node("GreaterOrEqual", [b.node("Mul", [j, _i64(b, g)]), q_old]),
                          b.node("LessOrEqual", [b.node("Mul", [b.node("Add", [j, _i64(b, 1)]), _i64(b, g)]), q_new])])


def _unpad(b: OnnxBuilder, x: str, padded: int, length: int, d: int) -> str:
    """[b, h, groups, g, d] -> [b, h, length, d]: the tokens, less the padding of the last group."""
    x = b.node("Reshape", [x, b.ints([0, 0, padded, d])])
    return x if padded == length else b.node("Slice", [x, b.ints([0]), b.ints([length]), b.ints([2])])


def _kv4_read(b: OnnxBuilder, node: Node, enc: KV4, positions: str, state: list[str], out: str) -> None:
    codes, scale, mn, window = state[:4]
    L, d = node.attrs["max_len"], node.attrs["head_dim"]
    end = _row_scalar(b, positions, "end")
    q = _quantized(b, enc, end)
    t = _slots(b, L, "kv4_slots")
    s, m = (b.node("Cast", [x], to=F32) for x in (scale, mn))
    if enc.role == "k":            # one scale and min per channel and group: each token's group's
        group_of = b.const(np.arange(L, dtype=np.int64) // enc.group, "kv4_group_of")
        s, m = (b.node("Gather", [x, group_of], axis=2) for x in (s, m))
    deq = b.node("Add", [b.node("Mul", [_unpack4(b, codes, L, d), s]), m])
    if isinstance(enc, KVGear4):
        deq = _gear_read(b, enc, L, d, deq, state[4:])
    recent = b.node("Gather", [window, b.const(np.arange(L, dtype=np.int64) % enc.window, "kv4_window_rows")], axis=2)
    recent = b.node("Where", [b.node("Less", [t, end]), recent, _f32(b, 0.0)])
    b.node("Where", [b.node("Less", [t, q]), deq, recent], out)


# --- kv-gear4 ------------------------------------------------------------------------------------
def _tree_sum(b: OnnxBuilder, x: str, n: int) -> str:
    """ir/ordered.tree_sum over the last axis (static length ``n``), the axis dropped: zero-padded
    to a power of two, then second halves added to first halves."""
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        pad_shape = b.node("Concat", [b.node("Shape", [x], end=-1), b.ints([width - n])], axis=0)
        x = b.node("Concat", [x, b.node("Expand", [_f32(b, 0.0), pad_shape])], axis=-1)
    while width > 1:
        width //= 2
        x = b.node("Add", [b.node("Slice", [x, b.ints([0]), b.ints([width]), b.ints([-1])]),
                           b.node("Slice", [x, b.ints([width]), b.ints([2 * width]), b.ints([-1])])])
    return b.node("Squeeze", [x, b.ints([-1])])


def _gram_schmidt(b: OnnxBuilder, x: str, n: int, r: int) -> str:
    """ir/ordered.gram_schmidt of float32 x [..., n, r]."""
    cols = []
    for j in range(r):
        v = b.node("Gather", [x, _i64(b, j)], axis=-1)
        for q in cols:
            v = b.node("Sub", [v, b.node("Mul", [b.node("Unsqueeze", [_tree_sum(b, b.node("Mul", [q, v]), n),
                                                                     b.ints([-1])]), q])])
        norm = b.node("Unsqueeze", [b.node("Sqrt", [_tree_sum(b, b.node("Mul", [v, v]), n)]), b.ints([-1])])
        positive, ratio = _safe_ratio(b, v, norm)
        cols.append(b.node("Where", [positive, ratio, _f32(b, 0.0)]))
    return b.node("Concat", [b.node("Unsqueeze", [c, b.ints([-1])]) for c in cols], axis=-1)


def _products(b: OnnxBuilder, x: str, y: str, n: int) -> str:
    """[..., p, r] of x [..., p, n] and y [..., n, r], each entry tree-summed over n."""
    pairs = b.node("Mul", [b.node("Unsqueeze", [x, b.ints([-2])]), b.node("Unsqueeze", [_swap(b, y), b.ints([-3])])])
    return _tree_sum(b, pairs, n)


def _swap(b: OnnxBuilder, x: str) -> str:
    """The last two axes of a rank-5 x swapped."""
    return b.node("Transpose", [x], perm=[0, 1, 2, 4, 3])


def _low_rank(b: OnnxBuilder, enc: KVGear4, e: str, g: int, d: int) -> tuple[str, str]:
    """ir/ordered.low_rank of the groups' errors e [b, h, groups, g, d]: (A [.., g, r], B [.., r, d])."""
    r = enc.rank
    v = b.const(power_start(d, r).numpy().reshape(1, 1, 1, d, r), "gear_start")
    et = _swap(b, e)
    for _ in range(enc.ITERATIONS):
        u = _gram_schmidt(b, _products(b, e, v, d), g, r)
        v = _gram_schmidt(b, _products(b, et, u, g), d, r)
    return _products(b, e, v, d), _swap(b, v)


def _gear_outliers(b: OnnxBuilder, enc: KVGear4, seq: str, d: int) -> tuple[str, str, str]:
    """(int64 indices [b, h, L, k] of each token's largest magnitudes, their float32 values, seq with
    them zeroed): TopK's order is top_magnitudes' (largest first, ties lower index first)."""
    k = b.ints([enc.outliers])
    _, index = b.node("TopK", [b.node("Abs", [seq]), k], axis=-1, largest=1, sorted=1, n_out=2)
    values = b.node("GatherElements", [seq, index], axis=-1)
    zeros = b.node("Expand", [_f32(b, 0.0), b.node("Shape", [index])])
    return index, values, b.node("ScatterElements", [seq, index, zeros], axis=-1)


def _gear_write(b: OnnxBuilder, enc: KVGear4, node: Node, kept: str, deq: str, index: str, outlier: str, done: str,
                q_old: str, q_new: str, state: list[str], outs: list[str]) -> None:
    """KVGear4.encode_tokens past kv4's codes: the outliers, and the factors of every group's error
    (the error of ``kept`` [b, h, L, d], less the outliers, against its dequantised ``deq``), each
    written where the step completes its token or group."""
    L, d, g, r = node.attrs["max_len"], node.attrs["head_dim"], enc.group, enc.rank
    groups = -(-L // g)
    error = b.node("ScatterElements", [b.node("Sub", [kept, deq]), index,
                                       b.node("Expand", [_f32(b, 0.0), b.node("Shape", [index])])], axis=-1)
    if groups * g != L:
        error = b.node("Pad", [error, b.ints([0, 0, 0, 0, 0, 0, groups * g - L, 0])])
    a, factor_b = _low_rank(b, enc, b.node("Reshape", [error, b.ints([0, 0, groups, g, d])]), g, d)
    old_outlier, old_index, old_a, old_b = state
    # chosen in float32 and rounded after: ONNX Runtime's CPU Where has no float16 kernel, and the
    # casts it puts around one drop the rounding of a float16 Cast feeding it
    _f16(b, b.node("Where", [done, outlier, b.node("Cast", [old_outlier], to=F32)]), outs[0])
    b.node("Cast", [b.node("Where", [done, index, b.node("Cast", [old_index], to=I64)])],
           outs[1], to=onnx_type(enc.parts(L, d)[5].dtype))
    _f16(b, b.node("Where", [done, _unpad(b, a, groups * g, L, r), b.node("Cast", [old_a], to=F32)]), outs[2])
    rows_done = b.node("Gather", [_groups_done(b, g, groups, q_old, q_new),
                                  b.const(np.arange(groups * r, dtype=np.int64) // r, "gear_b_groups")], axis=2)
    _f16(b, b.node("Where", [rows_done, b.node("Reshape", [factor_b, b.ints([0, 0, groups * r, d])]),
                             b.node("Cast", [old_b], to=F32)]), outs[3])


def _gear_read(b: OnnxBuilder, enc: KVGear4, L: int, d: int, deq: str, state: list[str]) -> str:
    """KVGear4.dequantized past kv4's: each token's group's B, A's rank-1 terms added in order to
    the dequantised codes, then the outliers put back."""
    outlier, index, fa, fb = state
    g, r = enc.group, enc.rank
    groups = -(-L // g)
    per_group = b.node("Reshape", [b.node("Cast", [fb], to=F32), b.ints([0, 0, groups, r, d])])
    per_token = b.node("Gather", [per_group, b.const(np.arange(L, dtype=np.int64) // g, "kv4_group_of")], axis=2)
    terms = b.node("Mul", [b.node("Unsqueeze", [b.node("Cast", [fa], to=F32), b.ints([-1])]), per_token])
    term = None
    for j in range(r):
        t = b.node("Squeeze", [b.node("Slice", [terms, b.ints([j]), b.ints([j + 1]), b.ints([3])]), b.ints([3])])
        term = t if term is None else b.node("Add", [term, t])
    values = b.node("Add", [deq, term])
    return b.node("ScatterElements", [values, b.node("Cast", [index], to=I64), b.node("Cast", [outlier], to=F32)],
                  axis=-1)


# --- kv-nvfp4 ------------------------------------------------------------------------------------
def _nvfp4_quantize(b: OnnxBuilder, enc: KVNVFP4, new: str, d: int) -> tuple[str, str, str]:
    """(packed E2M1 codes, E4M3 block scale codes, float16 scale) of float32 ``new`` [b, h, s, d]:
    KVNVFP4.quantize op for op."""
    amax = b.node("ReduceMax", [b.node("Abs", [new]), b.ints([-1])], keepdims=1)
    scale = _f16(b, b.node("Div", [amax, _f32(b, enc.SCALE_TOP * enc.TOP)]))
    s2 = b.node("Cast", [scale], to=F32)                                              # [b, h, s, 1]
    blocks = b.node("Reshape", [new, b.ints([0, 0, 0, d // enc.BLOCK, enc.BLOCK])])
    block_max = b.node("ReduceMax", [b.node("Abs", [blocks]), b.ints([-1])], keepdims=0)
    positive, wanted = _safe_ratio(b, b.node("Div", [block_max, _f32(b, enc.TOP)]), s2)
    block_codes = _minifloat_codes(b, b.node("Where", [positive, wanted, _f32(b, 0.0)]), enc.SCALE)
    block_scale = b.node("Cast", [block_codes], to=TensorProto.UINT8)
    step = b.node("Unsqueeze", [b.node("Mul", [_minifloat_values(b, block_codes, enc.SCALE), s2]), b.ints([-1])])
    positive, ratio = _safe_ratio(b, blocks, step)
    codes = _minifloat_codes(b, b.node("Where", [positive, ratio, _f32(b, 0.0)]), enc.CODE)
    return _pack4(b, b.node("Reshape", [codes, b.ints([0, 0, 0, d])]), 0, d), block_scale, scale


def _nvfp4_read(b: OnnxBuilder, node: Node, enc: KVNVFP4, state: list[str], out: str) -> None:
    codes, block_scale, scale = state
    L, d = node.attrs["max_len"], node.attrs["head_dim"]
    values = _minifloat_values(b, _unpack4(b, codes, L, d), enc.CODE)
    step = b.node("Mul", [_minifloat_values(b, block_scale, enc.SCALE), b.node("Cast", [scale], to=F32)])
    blocks = b.node("Mul", [b.node("Reshape", [values, b.ints([0, 0, L, d // enc.BLOCK, enc.BLOCK])]),
                            b.node("Unsqueeze", [step, b.ints([-1])])])
    b.node("Reshape", [blocks, b.ints([0, 0, L, d])], out)


__all__: list[str] = []

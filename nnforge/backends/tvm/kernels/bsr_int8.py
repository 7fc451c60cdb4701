"""The int8 block-sparse (BSR) SpMM: ``y = x_scale * row_scale * (W_codes @ (q(x) - zp))`` with x
quantised inside the kernel to uint8 on the graph's static grid and exact int32 u8 x s8 sums
(``vpdpbusd`` with AVX-512 VNNI / AVX-VNNI, ``vpmaddwd`` on AVX2). The BSR layout, the checks and the
tokens-in-lanes tiling are the fp32 kernel's (:mod:`.bsr`); this module adds the dot instruction,
the regrouping of codes into its lanes, and a GEMV path for small m. See
:func:`bsr_matmul_int8`.
"""
# no `from __future__ import annotations`: TVMScript reads the T.Buffer annotations as live objects
import math
from dataclasses import dataclass

import numpy as np

from . import Kernel, KernelError
from .bsr import (CpuTarget, _Tiling, _as_array, _at_least_one, _check_bsr, _largest_divisor, _padded, _tile_store,
                  _token_tiles, llvm_target)


@dataclass(frozen=True)
class _DotInstr:
    """The integer dot product of the int8 kernel: each int32 lane accumulates ``group`` products of
    an unsigned activation and a signed weight."""
    name: str
    lanes: int              # int32 lanes of one instruction
    group: int              # k values per int32 lane: 4 (u8 x s8), 2 (s16 x s16) or 1
    intrinsic: str | None   # the LLVM intrinsic; None: plain vector arithmetic (any CPU)


def _dot_instr(cpu: CpuTarget) -> _DotInstr:
    f = cpu.features
    if cpu.lanes == 16 and "avx512vnni" in f:
        return _DotInstr("vpdpbusd zmm", 16, 4, "llvm.x86.avx512.vpdpbusd.512")
    if "avxvnni" in f or {"avx512vnni", "avx512vl"} <= f:
        return _DotInstr("vpdpbusd ymm", 8, 4, "llvm.x86.avx512.vpdpbusd.256")
    # no VNNI: vpmaddubsw (u8 x s8 pairs) would saturate its int16 sums (255*127*2 > 32767) unless x
    # were cut to 7 bits; vpmaddwd on 16-bit values is exact and as fast per instruction on Zen/Intel
    if cpu.lanes == 16 and "avx512bw" in f:
        return _DotInstr("vpmaddwd zmm", 16, 2, "llvm.x86.avx512.pmaddw.d.512")
    if "avx2" in f:
        return _DotInstr("vpmaddwd ymm", 8, 2, "llvm.x86.avx2.pmadd.wd")
    if "sse2" in f:
        return _DotInstr("pmaddwd xmm", 4, 2, "llvm.x86.sse2.pmadd.wd")
    return _DotInstr("int32 multiply-add", cpu.lanes, 1, None)


def _int8_groups(row_ptr, cols, codes, r: int, c: int, group: int):
    """Regroup BSR int8 codes into k-groups of ``group`` columns of one block-row, what one int32 lane
    of the dot instruction consumes. Returns (grp_ptr [block_rows + 1], gk, gw, paired):

    - paired (C a multiple of the group: 1x4 blocks): a group is ``group`` consecutive columns of one
      block and ``gk`` [groups, 1] indexes x packed ``group`` columns to a word;
    - otherwise (4x1, 16x1...): a group takes the next ``group`` block columns of a block-row (the
      last one padded with zero weights) and ``gk`` [groups, group] holds their columns of x.

    ``gw`` [groups, R] int32 packs each row's ``group`` codes (int8 lanes for 4, int16 for 2)."""
    kept = codes.shape[0]
    if c % group == 0:
        per_block = c // group
        gk = ((cols.astype(np.int64)[:, None] * c) // group + np.arange(per_block)).reshape(-1, 1)
        lanes = codes.reshape(kept, r, per_block, group).transpose(0, 2, 1, 3).reshape(-1, r, group)
        grp_ptr, paired = row_ptr.astype(np.int64) * per_block, True
    else:
        slice_k = (cols.astype(np.int64)[:, None] * c + np.arange(c)).reshape(-1)     # one per column
        slice_w = codes.transpose(0, 2, 1).reshape(-1, r)
        per_row = np.diff(row_ptr.astype(np.int64)) * c
        grp_ptr = np.concatenate([[0], np.cumsum(-(-per_row // group))])
        pos = np.arange(slice_k.shape[0]) - np.repeat(row_ptr[:-1].astype(np.int64) * c, per_row)
        grp = np.repeat(grp_ptr[:-1], per_row) + pos // group
        gk = np.full((int(grp_ptr[-1]), group), -1, np.int64)
        gk[grp, pos % group] = slice_k
        gk = np.where(gk < 0, gk[:, :1], gk)       # padding lanes read a valid column, times 0
        lanes = np.zeros((gk.shape[0], r, group), np.int8)
        lanes[grp, :, pos % group] = slice_w
        paired = False
    pack = {4: np.int8, 2: np.int16, 1: np.int32}[group]
    gw = np.ascontiguousarray(lanes.astype(pack)).view(np.int32).reshape(-1, r)
    return grp_ptr.astype(np.int32), gk.astype(np.int32), gw, paired


@dataclass(frozen=True)
class _GemvLayout:
    """Rows in lanes for the int8 kernel at small m. An int32 lane of a dot vector is one output row
    times one *word*, ``group`` consecutive columns of x (or, ``gathered``, any ``group`` kept columns of
    the block-row); a *unit* is ``span`` consecutive words (a 1x4 block is one unit of two vpmaddwd
    words), one unaligned load of the quantised token. A vector
    holds ``segments`` units, each ``rows x span`` lanes (row-major): the rows of a block-row, or a
    ``lanes``-row chunk of a taller one, so that a segment's activations are its unit repeated for
    each row. The partial sums of a row (over segments and span) are added once per chunk."""
    rows: int               # output rows of a chunk
    span: int               # words of a unit
    segments: int           # units of one vector
    small_m: int            # m below this takes this schedule
    gathered: bool          # C is not a multiple of ``group``: words gather kept columns


def _gemv_layout(r: int, c: int, dot: _DotInstr) -> _GemvLayout | None:
    """None when R neither divides nor is a multiple of the lanes (3x5 blocks): tokens in lanes for all m."""
    V, G = dot.lanes, dot.group
    if V % r and r % V:
        return None
    rows = min(r, V)
    span = _largest_divisor(V // rows, max(1, c // G))      # a wide block's words in one load
    # below V/2 tokens, tokens in lanes idles most lanes and reloads every weight for each vector anyway;
    # narrow blocks gather each word's columns (consecutive words would be mostly zero codes when
    # blocks are scattered)
    return _GemvLayout(rows, span, V // (rows * span), max(2, V // 2), c % G != 0)


def _gemv_col_dtype(k: int) -> str:
    """The GEMV columns' type: uint16 halves their bytes (a word's columns are as many bytes as its
    codes with 4x1 blocks) wherever a column and the padding past k fit."""
    return "uint16" if k + 64 < 2 ** 16 else "int32"


def _gemv_words(row_ptr, cols, codes, r: int, c: int, group: int, layout: _GemvLayout):
    """Regroup BSR int8 codes for the GEMV schedule. A block-row's kept columns are taken in order:
    ``layout.gathered``, ``group`` at a time into a word (the last one padded with column 0 and zero
    codes), as the tokens-in-lanes groups of narrow blocks; else covered by units of ``span * group``
    consecutive columns, each starting at a kept one (zero codes for its columns no kept block covers:
    none where the unit divides C). A chunk of ``layout.rows`` rows takes its units
    ``layout.segments`` to a vector, the last padded with zero units. Returns (vec_ptr int32
    [n/rows + 1], vec_col [vectors, segments] each unit's first column, or [vectors, segments * group]
    each word's columns when gathered, vec_w int8 [vectors, lanes * group]: segment s, row i, word p,
    column g)."""
    RL, S, width = layout.rows, layout.segments, layout.span * group
    chunks_per_row = max(1, r // RL)
    ptr, unit_cols, unit_codes = [0], [], []
    rp = row_ptr.astype(np.int64)
    for br in range(row_ptr.shape[0] - 1):
        covered = {}        # column of x -> its R codes in this block-row
        for b in range(rp[br], rp[br + 1]):
            for j in range(c):
                covered[int(cols[b]) * c + j] = codes[b, :, j]
        kept_cols = sorted(covered)
        if layout.gathered:     # words of ``group`` kept columns in turn, the last padded by column 0
            starts = [kept_cols[i:i + group] for i in range(0, len(kept_cols), group)]
            starts = [w + [0] * (group - len(w)) for w in starts]
            units = np.zeros((len(starts) + -len(starts) % S, r, width), np.int8)     # zero units pad
            for u, cols_of_word in enumerate(starts):
                for g in range(len(kept_cols[u * group:(u + 1) * group])):
                    units[u, :, g] = covered[cols_of_word[g]]
            starts = np.asarray(starts + [[0] * group] * (units.shape[0] - len(starts)), np.int64)
            starts = starts.reshape(-1, S * group)
        else:
            starts, last = [], -1
            for col in kept_cols:
                if col > last:
                    starts.append(col)
                    last = col + width - 1
            units = np.zeros((len(starts) + -len(starts) % S, r, width), np.int8)     # zero units pad
            for u, start in enumerate(starts):
                for g in range(width):
                    if start + g in covered:
                        units[u, :, g] = covered[start + g]
            starts = np.asarray(starts + [0] * (units.shape[0] - len(starts)), np.int64).reshape(-1, S)
        for q in range(chunks_per_row):
            unit_cols.append(starts)
            unit_codes.append(units[:, q * RL:(q + 1) * RL, :].reshape(-1, S * RL * width))
            ptr.append(ptr[-1] + starts.shape[0])
    vec_col = np.concatenate(unit_cols)
    vec_w = np.ascontiguousarray(np.concatenate(unit_codes), np.int8)
    return np.asarray(ptr, np.int32), vec_col, vec_w


def _int8_func(n: int, k: int, r: int, groups: int, paired: bool, dot: _DotInstr, tiling: _Tiling,
               x_scale: float, zero_point: int, gemv: _GemvLayout | None, gemv_vectors: int):
    """The PrimFunc (x, grp_ptr, gk, gw, corr, scale, vec_ptr, vec_col, vec_w, y); the last three are
    the GEMV schedule's (one unread entry each when ``gemv`` is None)."""
    from tvm.script import tirx as T

    V, G, RT = dot.lanes, dot.group, tiling.rows
    bits = 32 // G
    small_m = gemv.small_m if gemv else 0
    operand = {4: f"int8x{4 * V}", 2: f"int16x{2 * V}", 1: f"int32x{V}"}[G]
    words = k // G if paired else k         # rows of the quantised x: packed words, or columns
    k_step, per_word = _largest_divisor(words, 8), G if paired else 1

    def quantized(values, lanes):
        """clip(round_half_even(x / x_scale) + zero_point, 0, 255) as uint32; a true division, as the
        formula says: vectorised, it costs under a cycle a value."""
        q = T.nearbyint(values / T.broadcast(T.float32(x_scale), lanes)) + T.broadcast(T.float32(zero_point), lanes)
        q = T.max(T.min(q, T.broadcast(T.float32(255), lanes)), T.broadcast(T.float32(0), lanes))
        return T.Cast(f"uint32x{lanes}", q)

    def quantized_words(x, t, cb):
        """Token t's words cb*k_step.. as one uint32 vector: word w packs columns w*G.. in bit fields
        of ``bits`` (paired), or holds column w."""
        q = quantized(x[t, T.ramp(cb * k_step * per_word, 1, k_step * per_word)], k_step * per_word)
        if per_word == 1:
            return q
        word = T.Shuffle([q], [w * G for w in range(k_step)])
        for j in range(1, G):
            field = T.Shuffle([q], [w * G + j for w in range(k_step)])
            word = word | (field << T.broadcast(T.uint32(bits * j), k_step))
        return word

    def activations(xq, gk, g, t0):
        """Group g's activations of tokens t0.. as uint32 x V, in the dot instruction's lane format."""
        if paired:
            return xq[gk[g, 0], T.ramp(t0, 1, V)]
        word = T.Cast(f"uint32x{V}", xq[gk[g, 0], T.ramp(t0, 1, V)])
        for j in range(1, G):
            word = word | (T.Cast(f"uint32x{V}", xq[gk[g, j], T.ramp(t0, 1, V)]) << T.broadcast(T.uint32(bits * j), V))
        return word

    def dot_step(acc, act, weights):
        wb = T.broadcast(weights, V)
        if dot.intrinsic is None:
            return acc + _emulated_dot(T, act, wb, G, V)
        a, b = T.reinterpret(operand, act), T.reinterpret(operand, wb)
        if G == 4:      # vpdpbusd adds into acc itself: unsigned activations first, signed weights
            return T.call_llvm_pure_intrin(f"int32x{V}", dot.intrinsic, acc, a, b)
        return acc + T.call_llvm_pure_intrin(f"int32x{V}", dot.intrinsic, a, b)

    @T.macro
    def quantize(x, xq, m):
        # runs of k_step words, as the fp32 transpose: quantised as one vector along k (bound once: LLVM
        # cannot tell the xq stores from x, and would redo the vector for every lane), scattered down
        # the token-contiguous rows of xq; padding tokens quantise to 0
        for cb in T.parallel(words // k_step):
            for t in T.serial(m):
                packed = quantized_words(x, t, cb)
                for w in T.unroll(k_step):
                    xq[cb * k_step + w, t] = T.Cast(xq.dtype, T.Shuffle([packed], [w]))
            for t in T.serial(_padded(m, V) - m):
                for w in T.unroll(k_step):
                    xq[cb * k_step + w, m + t] = T.Cast(xq.dtype, 0)

    store = _tile_store(tiling, r)

    @T.macro
    def tile(xq, out, consts, m, br, rg, t0, nvec, guarded):
        grp_ptr, gk, gw, corr, scale = consts
        acc = T.alloc_buffer((RT, nvec * V), "int32", scope="global")
        res = T.alloc_buffer((RT, nvec * V), "float32", scope="global")
        for i in T.unroll(RT):
            for j in T.unroll(nvec):
                acc[i, T.ramp(j * V, 1, V)] = T.broadcast(T.int32(0), V)
        for g in range(grp_ptr[br], grp_ptr[br + 1]):
            for j in T.unroll(nvec):
                for i in T.unroll(RT):
                    acc[i, T.ramp(j * V, 1, V)] = dot_step(acc[i, T.ramp(j * V, 1, V)],
                                                           activations(xq, gk, g, t0 + j * V), gw[g, rg * RT + i])
        # y = x_scale * row_scale * (sum w*q - zero_point * sum w), both factors folded per row
        for i in T.unroll(RT):
            for j in T.unroll(nvec):
                res[i, T.ramp(j * V, 1, V)] = T.Cast(f"float32x{V}", acc[i, T.ramp(j * V, 1, V)] - T.broadcast(
                    corr[br * r + rg * RT + i], V)) * T.broadcast(scale[br * r + rg * RT + i], V)
        store(res, out, m, br, rg, t0, nvec, guarded)

    tokens_in_lanes = _token_tiles(tiling, r, n, tile)

    @T.macro
    def tokens_path(x, y, consts, m):
        xq = T.alloc_buffer((words, T.max((m + V - 1) // V * V, V)), "uint32" if paired else "uint8")
        quantize(x, xq, m)
        tokens_in_lanes(xq, y, consts, m)

    RL, SP, S = (gemv.rows, gemv.span, gemv.segments) if gemv else (1, 1, 1)
    gathered = gemv is not None and gemv.gathered
    x_step = _largest_divisor(k, 16)
    unit = SP * G           # columns of a unit
    col_dtype = _gemv_col_dtype(k)

    @T.macro
    def quantize_rows(x, xr, m):
        # token-major, a ``bits`` field a column and a unit of zeros past k: unit loads may start at
        # any column (a unit covering the last kept columns reads the padding)
        for t in T.serial(m):
            for cb in T.serial(k // x_step):
                xr[t, T.ramp(cb * x_step, 1, x_step)] = T.Cast(f"uint{bits}x{x_step}", quantized(
                    x[t, T.ramp(cb * x_step, 1, x_step)], x_step))
            for j in T.unroll(unit):
                xr[t, k + j] = T.Cast(f"uint{bits}", 0)

    def unit_words(xr, t, col):
        """Columns col.. of token t as ``span`` uint32 words in the dot instruction's lane format."""
        if unit == 1:
            return xr[t, col]
        return T.reinterpret("uint32" if SP == 1 else f"uint32x{SP}", xr[t, T.ramp(col, 1, unit)])

    def gathered_word(xr, t, vec_col, v, s):
        """Segment s's word of token t from its ``G`` columns: zero-extended ``bits`` fields."""
        word = T.Cast("uint32", xr[t, T.Cast("int64", vec_col[v, s * G])])
        for g in range(1, G):
            word = word | (T.Cast("uint32", xr[t, T.Cast("int64", vec_col[v, s * G + g])]) << T.uint32(bits * g))
        return word

    def gemv_activations(xr, vec_col, t, v):
        """Vector v's activations of token t: each segment's unit repeated for each of its rows."""
        parts = []
        for s in range(S):
            if gathered:
                words_ = gathered_word(xr, t, vec_col, v, s)
            else:
                words_ = unit_words(xr, t, T.Cast("int64", vec_col[v, s]))
            if RL == 1:
                parts.append(words_)
            elif SP == 1:
                parts.append(T.broadcast(words_, RL))
            else:
                parts.append(T.Shuffle([words_], [p for _ in range(RL) for p in range(SP)]))
        return parts[0] if S == 1 else T.Shuffle(parts, list(range(V)))

    def gemv_weights(vec_w, v):
        """Vector v's codes as int32 x V words, in the lane format (sign-extended to ``bits``)."""
        codes = vec_w[v, T.ramp(0, 1, V * G)]
        if G != 4:
            codes = T.Cast(f"int{bits}x{V * G}", codes)
        return T.reinterpret(f"int32x{V}", codes)

    def gemv_dot(acc, act, wv):
        if dot.intrinsic is None:
            return acc + _emulated_dot(T, act, wv, G, V)
        a, b = T.reinterpret(operand, act), T.reinterpret(operand, wv)
        if G == 4:
            return T.call_llvm_pure_intrin(f"int32x{V}", dot.intrinsic, acc, a, b)
        return acc + T.call_llvm_pure_intrin(f"int32x{V}", dot.intrinsic, a, b)

    def rows_of_chunk(ch):
        return T.ramp(ch * RL, 1, RL) if RL > 1 else ch * RL

    def row_sums(acc):
        """Each row's sum over its segments and span: RL int32 (shuffles of the whole vector)."""
        whole, total = acc[0, T.ramp(0, 1, V)], None
        for s in range(S):
            for p in range(SP):
                lanes = [s * RL * SP + i * SP + p for i in range(RL)]
                part = T.Shuffle([whole], lanes) if RL > 1 else acc[0, lanes[0]]
                total = part if total is None else total + part
        return total

    @T.macro
    def rows_in_lanes(xr, y, vec_ptr, vec_col, vec_w, corr, scale, m):
        for ch in T.parallel(n // RL):
            for t in T.serial(m):
                # two accumulators: vpdpbusd's latency would otherwise stall a chain of dependent sums
                acc = T.alloc_buffer((2, V), "int32", scope="global")
                for a in T.unroll(2):
                    acc[a, T.ramp(0, 1, V)] = T.broadcast(T.int32(0), V)
                for q in T.serial((vec_ptr[ch + 1] - vec_ptr[ch]) // 2):
                    for a in T.unroll(2):
                        acc[a, T.ramp(0, 1, V)] = gemv_dot(
                            acc[a, T.ramp(0, 1, V)], gemv_activations(xr, vec_col, t, vec_ptr[ch] + q * 2 + a),
                            gemv_weights(vec_w, vec_ptr[ch] + q * 2 + a))
                if (vec_ptr[ch + 1] - vec_ptr[ch]) % 2 == 1:
                    acc[0, T.ramp(0, 1, V)] = gemv_dot(
                        acc[0, T.ramp(0, 1, V)], gemv_activations(xr, vec_col, t, vec_ptr[ch + 1] - 1),
                        gemv_weights(vec_w, vec_ptr[ch + 1] - 1))
                acc[0, T.ramp(0, 1, V)] = acc[0, T.ramp(0, 1, V)] + acc[1, T.ramp(0, 1, V)]
                # the tokens-in-lanes formula, a vector of rows
                y[t, rows_of_chunk(ch)] = T.Cast(f"float32x{RL}" if RL > 1 else "float32", row_sums(
                    acc) - corr[rows_of_chunk(ch)]) * scale[rows_of_chunk(ch)]

    @T.prim_func
    def bsr_int8(x_handle: T.handle, grp_ptr: T.Buffer((n // r + 1,), "int32"),
                 gk: T.Buffer((max(groups, 1), 1 if paired else G), "int32"),
                 gw: T.Buffer((max(groups, 1), r), "int32"), corr: T.Buffer((n,), "int32"),
                 scale: T.Buffer((n,), "float32"), vec_ptr: T.Buffer((n // RL + 1,), "int32"),
                 vec_col: T.Buffer((max(gemv_vectors, 1), S * G if gathered else S), col_dtype),
                 vec_w: T.Buffer((max(gemv_vectors, 1), V * G), "int8"), y_handle: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_handle, (m, k), "float32")
        y = T.match_buffer(y_handle, (m, n), "float32")
        if gemv is None:
            tokens_path(x, y, (grp_ptr, gk, gw, corr, scale), m)
        elif m < small_m:
            xr = T.alloc_buffer((T.max(m, 1), k + unit), f"uint{bits}")
            quantize_rows(x, xr, m)
            rows_in_lanes(xr, y, vec_ptr, vec_col, vec_w, corr, scale, m)
        else:
            tokens_path(x, y, (grp_ptr, gk, gw, corr, scale), m)

    return bsr_int8


def _emulated_dot(T, act, wb, group: int, lanes: int):
    """The dot instructions' arithmetic in plain vector operations, for CPUs without one (and to test
    the lane formats of the others anywhere): sum over the ``group`` bit fields of zero-extended
    activations times sign-extended weights."""
    if group == 1:
        return T.reinterpret(f"int32x{lanes}", act) * wb
    bits, total = 32 // group, None
    for j in range(group):
        a = T.reinterpret(f"int32x{lanes}", (act >> T.broadcast(T.uint32(bits * j), lanes))
                          & T.broadcast(T.uint32((1 << bits) - 1), lanes))
        w = (wb << T.broadcast(T.int32(32 - bits * (j + 1)), lanes)) >> T.broadcast(T.int32(32 - bits), lanes)
        total = a * w if total is None else total + a * w
    return total


def sums_problem(k: int) -> str | None:
    """Why int32 sums of ``k`` products of a uint8 activation and an int8 code may overflow, or None
    (the tvm capability table asks this too)."""
    return f"k = {k} is too long for exact int32 sums of 8-bit products" if k * 128 * 255 >= 2 ** 31 else None


def bsr_matmul_int8(name: str, row_ptr, col_idx, blocks_int8, row_scale, x_scale: float, x_zero_point: int,
                    n: int, k: int, target: str) -> Kernel:
    """int8 BSR SpMM ``y[m, n] = x_scale * row_scale[n] * sum_k W[n, k] * (qx[m, k] - x_zero_point)`` with
    ``qx = clip(round_half_to_even(x / x_scale) + x_zero_point, 0, 255)`` (a float32 division),
    quantised inside the kernel (a static per-tensor scale and zero point), W's int8 codes ``blocks_int8`` [kept, R, C] and one
    float32 ``row_scale`` per output row. The sums are exact int32; the zero point comes off through
    per-row code sums precomputed here.

    The dot instruction depends on the target: ``vpdpbusd`` (4 u8 x s8 products a lane, exact) with
    AVX-512 VNNI or AVX-VNNI; else ``vpmaddwd`` on 16-bit activations and codes (2 products a lane,
    exact). ``vpmaddubsw`` is not used: two 255 x 127 products overflow its saturating int16 sums,
    and avoiding that means cutting activations to 7 bits, as oneDNN does on CPUs without VNNI.
    Codes are regrouped here into the instruction's lanes twice. For m of at least ``small_m`` (V/2,
    V the int32 lanes) the tiles and stores are the fp32 kernel's tokens-in-lanes schedule
    (:func:`_int8_groups`). Below it (GEMV, a run-time branch on the symbolic m) output rows are in
    the lanes (:class:`_GemvLayout`, :func:`_gemv_words`): each lane is a row times a word of the
    quantised token, broadcast over the rows, so no lane idles at m = 1. A word is consecutive columns
    (one unaligned load) for blocks at least a word wide (1x4: a block is one 8-byte load on AVX2), or
    gathered from ``group`` kept columns for narrower ones (4x1, 16x1). Blocks whose R neither divides
    nor is a multiple of V (3x5) take tokens in lanes at every m.

    consts: ``grp_ptr`` int32 [n/R + 1], ``gk`` int32 [groups, 1 or group], ``gw`` int32 [groups, R],
    ``corr`` int32 [n] (``x_zero_point * sum_k W[n, k]``), ``scale`` float32 [n] (``x_scale * row_scale``);
    the GEMV schedule's ``vec_ptr`` int32 [n/rows + 1], ``vec_col`` uint16 (int32 for k near 2**16)
    [vectors, segments or segments * group] and ``vec_w`` int8 [vectors, V * group], a byte a kept
    weight but for each block-row's padding; one unread entry each where there is no GEMV schedule.

    >>> kern = bsr_matmul_int8("fc1", row_ptr, col_idx, codes, row_scale, 0.02, 128, 768, 768, "llvm -mcpu=native")
    >>> kern.notes["dot"]
    'vpmaddwd ymm'
    """
    row_ptr, cols, codes, r, c = _check_bsr(name, row_ptr, col_idx, blocks_int8, n, k, np.int8)
    where = f"BSR weight {name!r} ({n} x {k})"
    row_scale = _as_array(row_scale)
    if row_scale.dtype != np.float32 or row_scale.shape != (n,) or not np.all(np.isfinite(row_scale)):
        raise KernelError(f"{where}: row_scale must be finite float32 [{n}] (one scale per output row), got "
                          f"{row_scale.dtype} {row_scale.shape}")
    if not (isinstance(x_scale, (int, float, np.floating)) and math.isfinite(x_scale) and x_scale > 0):
        raise KernelError(f"{where}: x_scale must be a positive finite number, got {x_scale!r}")
    if isinstance(x_zero_point, bool) or not (isinstance(x_zero_point, (int, np.integer))
                                              and 0 <= int(x_zero_point) <= 255):
        raise KernelError(f"{where}: x_zero_point must be an integer in [0, 255] (uint8 activations), got "
                          f"{x_zero_point!r}")
    if sums_problem(k) is not None:
        raise KernelError(f"{where}: {sums_problem(k)}")
    cpu = llvm_target(target)
    dot = _dot_instr(cpu)
    grp_ptr, gk, gw, paired = _int8_groups(row_ptr, cols, codes, r, c, dot.group)
    tiling = _Tiling.fit(r, dot.lanes, cpu.registers, spare=2)
    row_sums = np.zeros((n // r, r), np.int64)
    np.add.at(row_sums, np.repeat(np.arange(n // r), np.diff(row_ptr.astype(np.int64))),
              codes.astype(np.int64).sum(axis=2))
    corr = (int(x_zero_point) * row_sums.reshape(n)).astype(np.int32)
    scale = (np.float64(x_scale) * row_scale.astype(np.float64)).astype(np.float32)
    gemv = _gemv_layout(r, c, dot)
    if gemv is not None:
        vec_ptr, vec_col, vec_w = _gemv_words(row_ptr, cols, codes, r, c, dot.group, gemv)
    else:       # never read: the kernel has no GEMV branch
        vec_ptr, vec_col, vec_w = (np.zeros(n + 1, np.int32), np.zeros((0, 1), np.int32),
                                   np.zeros((0, dot.lanes * dot.group), np.int8))
    vec_col = vec_col.astype(_gemv_col_dtype(k))
    func = _int8_func(n, k, r, gk.shape[0], paired, dot, tiling, float(x_scale), int(x_zero_point), gemv,
                      vec_col.shape[0])
    notes = {"kernel": "bsr_int8", "block": f"{r}x{c}", "kept_blocks": int(codes.shape[0]),
             "density": codes.shape[0] * r * c / (n * k), "dot": dot.name, "k_per_lane": dot.group,
             "activations": "packed words" if paired else "a byte a column", "schedule": tiling.describe(),
             "lanes": dot.lanes}
    if gemv is not None:
        notes["small_m_schedule"] = (f"rows in lanes for m < {gemv.small_m}, {gemv.segments} units of {gemv.span} "
                                     f"words x {gemv.rows} rows a vector")
        notes["small_m_code_bytes"] = int(vec_w.size)
    consts = [grp_ptr, _at_least_one(gk), _at_least_one(gw), corr, scale, vec_ptr, _at_least_one(vec_col),
              _at_least_one(vec_w)]
    return Kernel(name, func.with_attr("global_symbol", name), consts, n, k, notes)

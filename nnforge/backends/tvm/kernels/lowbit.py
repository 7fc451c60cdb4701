"""Weight-only int8 / int4 linear layers: ``y = x @ W.T`` with W read as integer codes.

``W[n, j] = (code[n, j] - zero_point[n, j // group_size]) * scale[n, j // group_size]``, codes
stored as nnforge packs them (``ir/packing.py``: 8-bit codes one a byte, 4-bit codes two a byte,
low nibble first), signed codes in offset binary (zero point ``2**(bits-1)`` when none is given).
No fp32 copy of W is ever kept in memory: both schedules read the codes and dequantise in the
k loop.

Layout the kernel reads (built once, from the stored bytes, by :func:`interleave_rows`): rows are
taken in blocks of ``lanes`` (the target's fp32 vector width) and each block's bytes are
transposed, ``codes[b, p, l] = stored[b * lanes + l, p]``. One byte load per k step then fills
one vector lane per row (int8), or two k steps at once (int4: low and high nibble), so the
vector loop runs over output features and needs no horizontal sums. Scales (float32) and zero
points (uint8) get the same blocking, ``[blocks, groups, lanes]``. Rows are padded with zero
scales up to whole tiles; padded columns of y are never written. Codes keep ``bits/8`` bytes a
weight.

On CPUs with AVX-512 VNNI the layout is the *dot* layout instead, the one ``vpdpbusd`` reads:
a block's codes for four consecutive columns of a row are one 32-bit lane,
``codes[b, q, 4 * l + j] = code(row b * lanes + l, column 4 q + j)`` for 8-bit codes; 4-bit codes
pair columns ``8 q + j`` (low nibble) and ``8 q + 4 + j`` (high nibble) in byte ``4 * l + j``.
Its GEMV multiplies the codes as integers: each row of x is split into three signed bytes per
element, ``x = s (a1 + a2 / 254 + a3 / 254**2)`` with ``s`` a per-row-and-group scale, so the
split is exact to float32 precision (its error is below ``2**-23`` of the group's largest
``|x|``) and one ``vpdpbusd`` multiplies 64 codes by 64 bytes of x. A 64-byte load then feeds 64
(8-bit) or 128 (4-bit) weights with one to two instructions per piece, where converting each code
to float and multiplying it costs three; that is what lets decoding stream the weights at memory
bandwidth, as llama.cpp's quantised dot products do (llama.cpp rounds x to one int8 per element;
the three pieces keep the float32 result).

Two schedules in one PrimFunc, chosen at run time on the row count ``m``:

- GEMV (``m < GEMV_MAX_ROWS``, decoding): parallel over row blocks of W; rows of x in blocks of
  ``GEMV_ROW_BLOCK`` so one unpack of the codes feeds every row of the block; per group,
  up to ``GEMV_CHAINS`` independent vector partial sums of ``code * x`` (load, unpack, convert
  and FMA fused), then scale and zero point once per group,
  ``sum_j (c - z) s x = s (sum_j c x - z sum_j x)``, with ``sum_j x`` computed once per call.
- Prefill (``m >= GEMV_MAX_ROWS``): parallel over tiles of ``tile_blocks * lanes`` columns; each
  task dequantises a k-tile of its columns into an fp32 scratch sized to stay in L1, then runs a
  ``row_block x tile`` register-tiled micro-kernel over all m rows (broadcast x, FMA into
  accumulators that live in vector registers), accumulating into y across k-tiles.

Both take the rows that do not fill a row block as static blocks of 4, 2 and 1 rows, so every
loop body has a constant row count and its accumulators stay in registers.

Minifloat codes (kernels/lowbit_minifloat.py: FP4 on the 4-bit schedules, dot GEMV included,
FP8 on the 8-bit float ones) take the same layouts: ``Plan.codes`` says how a code field becomes
a number (kernels/minifloat_codes.py), with no zero point.

Supports 4 and 8 bits (2, 3 and 5..7 are refused); 4-bit codes need even ``k`` and an even
``group_size`` (a byte never holds two groups). Any n; the last group may be shorter
(``k % group_size != 0``). Zero points are integers in the stored-code domain, within
``[0, 2**bits - 1]`` (a signed IntQuant with zero points passes ``zero_point + 2**(bits-1)``); a
``[1, G]`` scale (or zero point) is repeated for every row.

    >>> kern = int_weight_matmul("fc1.weight", codes, 4, scale, None, 128, n=3072, k=768,
    ...                          target="llvm -mcpu=native")
    >>> kern.func, [c.shape for c in kern.consts]   # PrimFunc (x, codes, scale, y) and its arrays
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..llvm_targets import resolve_target
from . import Kernel, KernelError
from .lowbit_layout import DOT_LANE_CODES, dot_layout, interleave_rows  # noqa: F401  (tests read them here)
from .minifloat_codes import FLOAT_UNIT, FP4_DOT_ZERO, code_value, fp4_lookup

SUPPORTED_BITS = (4, 8)
# m below this runs the GEMV schedule, at or above it the prefill one. Measured on AVX2 (one
# thread, K=768 N=3072 and K=3072 N=768): GEMV wins up to m = 9, prefill from m = 10 on (its
# dequantisation costs about two GEMV passes over W and pays off over more rows).
GEMV_MAX_ROWS = 10
GEMV_ROW_BLOCK = 4          # GEMV rows sharing one unpack of the codes
# GEMV partial sums in flight, by code width: 8 hides the FMA latency (4 cycles x 2 ports); int4
# keeps 4, as its unpacking needs the other registers (measured: 8 spills and runs slower).
GEMV_CHAINS = {8: 8, 4: 4}
GEMV_STEP_CODES = 4         # codes a lane unpacks per GEMV k step; more spills registers (AVX2)
SCRATCH_BYTES = 16 * 1024   # dequantised k-tile of one prefill task: half an L1 data cache
DOT_PIECES = 3              # signed bytes each element of x is split into (dot GEMV)
DOT_RADIX = 254.0           # the weight of each piece relative to the one before: |piece| <= 127
# How far ahead (64-byte steps) the dot GEMV asks for its codes. Its integer work per byte is high
# enough that the hardware prefetcher alone leaves DRAM idle between loads once the weights no longer
# fit in the last-level cache (a decode step streams every layer's); a software prefetch this far
# ahead keeps enough lines in flight. Past the end of the codes it is a hint for memory never read.
DOT_PREFETCH_STEPS = 128


# ---------------------------------------------------------------------------------------------
# Target: vector width and register count from an LLVM target string
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def llvm_target(target: str):
    """The ``tvm.target.Target`` of an LLVM target string, as the tvm backend resolves it
    (``resolve_target``: TVM 0.27's dict form; ``-mcpu=native`` is this host's CPU name and
    feature list, so a VM that hides AVX-512 from a Zen 4 gets AVX2)."""
    from ...base import BackendError
    try:
        return resolve_target(target)
    except BackendError as e:
        raise KernelError(str(e)) from None


@dataclass(frozen=True)
class SimdShape:
    lanes: int       # fp32 lanes of one vector register
    registers: int   # architectural vector registers


def simd_shape(target: str) -> SimdShape:
    """fp32 vector lanes and register count of an x86 LLVM target (AVX-512, AVX2/AVX, SSE)."""
    from tvm.target import codegen
    t = llvm_target(target)
    if codegen.llvm_cpu_has_features("avx512f", t):
        return SimdShape(16, 32)
    if codegen.llvm_cpu_has_features("avx", t):
        return SimdShape(8, 16)
    return SimdShape(4, 16)


# ---------------------------------------------------------------------------------------------
# Plan: every build-time number the generated code depends on
# ---------------------------------------------------------------------------------------------

def _runs(total: int, size: int) -> list[tuple[int, int, int]]:
    """(first index, count, length each) covering ``range(total)`` in pieces of ``size``: the
    whole pieces, then a shorter last one if any. Lengths are static, so each run is a loop
    with a constant extent."""
    full, last = divmod(total, size)
    return ([(0, full, size)] if full else []) + ([(full * size, 1, last)] if last else [])


@dataclass(frozen=True)
class Plan:
    bits: int
    n: int
    k: int
    group_size: int
    has_zero_point: bool
    lanes: int
    tile_blocks: int    # prefill: row blocks (vectors) per column tile
    row_block: int      # prefill: rows of x per micro-kernel step (register tile height)
    k_tile: int         # prefill: columns of W dequantised at once
    unroll: int         # GEMV, one row: bytes per k step, each feeding 8/bits partial sums
    dot: bool = False   # AVX-512 VNNI: the dot layout and its integer GEMV (module doc)
    scale_dtype: str = "float32"    # float16 where the weight's scales are: half the bytes a step streams
    codes: str = "int"      # what a code field is: an integer, or minifloat bits (minifloat_codes.py)

    @property
    def implicit_zero(self) -> float:
        """The zero point of a plan without zero-point arrays, on the float paths: offset binary for
        integer codes, none for minifloat ones (their values carry a sign)."""
        return float(1 << (self.bits - 1)) if self.codes == "int" else 0.0

    @property
    def dot_zero(self) -> float:
        """The same for the dot GEMV, whose codes are unsigned bytes: FP4 codes are looked up as
        ``FP4_DOT_ZERO + 2 e2m1(c)``."""
        return float(FP4_DOT_ZERO) if self.codes == "e2m1" else self.implicit_zero

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def groups(self) -> int:
        return -(-self.k // self.group_size)

    @property
    def blocks(self) -> int:
        """Row blocks of ``lanes`` that hold real rows (the GEMV work items)."""
        return -(-self.n // self.lanes)

    @property
    def tiles(self) -> int:
        """Prefill column tiles (its work items)."""
        return -(-self.blocks // self.tile_blocks)

    @property
    def padded_blocks(self) -> int:
        return self.tiles * self.tile_blocks

    @property
    def tile(self) -> int:
        return self.tile_blocks * self.lanes

    @property
    def chains(self) -> int:
        return self.unroll * self.per_byte

    @property
    def dot_step(self) -> int:
        """Columns one 64-byte dot-layout step of a row block holds: 4 (8-bit) or 8 (4-bit)."""
        return DOT_LANE_CODES * self.per_byte

    def group_runs(self) -> list[tuple[int, int, int]]:
        """(first group, count, columns each)."""
        return [(first // self.group_size, count, length) for first, count, length in _runs(self.k, self.group_size)]

    def k_tile_runs(self) -> list[tuple[int, int, int]]:
        """(first column, count, columns each) of the prefill k-tiles."""
        return _runs(self.k, self.k_tile)


def make_plan(bits: int, n: int, k: int, group_size: int, has_zero_point: bool, target: str,
              scale_dtype: str = "float32", codes: str = "int") -> Plan:
    """Tile sizes from the target's vector shape: accumulators ``row_block x tile_blocks`` plus
    one register per W vector and one for the broadcast x fit the register file; the k-tile
    scratch fits ``SCRATCH_BYTES``; a GEMV step unpacks ``GEMV_STEP_CODES`` codes a lane."""
    simd = simd_shape(target)
    tile_blocks = 2
    row_block = max(1, min(8, (simd.registers - tile_blocks - 1) // tile_blocks))
    k_tile = max(2, SCRATCH_BYTES // (4 * tile_blocks * simd.lanes)) // 2 * 2
    per_byte = 8 // bits
    byte_lengths = [length // per_byte for _, _, length in _runs(k, group_size)]
    unroll = next(u for u in (4, 2, 1)
                  if u * per_byte <= GEMV_STEP_CODES and all(b % u == 0 for b in byte_lengths))
    step = DOT_LANE_CODES * per_byte
    # the dot GEMV multiplies integers: FP8 codes are not, FP4 ones are (twice their value)
    dot = (codes in ("int", "e2m1") and has_vnni(target) and simd.lanes == 16 and k_tile % step == 0
           and all(length % step == 0 for _, _, length in _runs(k, group_size)))
    return Plan(bits, n, k, group_size, has_zero_point, simd.lanes, tile_blocks, row_block, k_tile, unroll, dot,
                scale_dtype, codes)


def has_vnni(target: str) -> bool:
    """Whether ``target`` has AVX-512 VNNI (``vpdpbusd`` on 512-bit vectors)."""
    from tvm.target import codegen
    return bool(codegen.llvm_cpu_has_features(["avx512f", "avx512vnni"], llvm_target(target)))


# ---------------------------------------------------------------------------------------------
# The PrimFunc
# ---------------------------------------------------------------------------------------------

def weight_buffers(plan: Plan):
    """(codes, scale, zero_point or None): the buffers of the arrays ``int_weight_matmul`` makes
    (``Kernel.consts``), in the layout ``plan`` chose; every PrimFunc reading them declares these."""
    from tvm import tirx
    P, lanes = plan, plan.lanes
    codes = tirx.decl_buffer((P.padded_blocks, P.k // P.dot_step, lanes * DOT_LANE_CODES) if P.dot
                             else (P.padded_blocks, P.k // P.per_byte, lanes), "uint8", name="codes")
    scale = tirx.decl_buffer((P.padded_blocks, P.groups, lanes), P.scale_dtype, name="scale")
    zp = tirx.decl_buffer((P.padded_blocks, P.groups, lanes), "uint8", name="zero_point") \
        if P.has_zero_point else None
    return codes, scale, zp


def _scheduled_func(name: str, buffers):
    """The IRBuilder frame of a scheduled PrimFunc ``name`` taking ``buffers`` (None: left out)."""
    from contextlib import contextmanager

    from tvm.script.ir_builder import tirx as T

    @contextmanager
    def frame():
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for buf in buffers:
                if buf is not None:
                    T.arg(buf.name, buf)
            yield
    return frame()


def build_func(plan: Plan, name: str):
    """The PrimFunc ``name(x, codes, scale[, zero_point], y)`` of ``plan`` (see the module doc)."""
    from contextlib import contextmanager

    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    P = plan
    lanes, gs = P.lanes, P.group_size
    m = tirx.Var("m", "int64")
    x = tirx.decl_buffer((m, P.k), "float32", name="x")
    codes, scale, zp = weight_buffers(P)
    y = tirx.decl_buffer((m, P.n), "float32", name="y")

    def f32(e):
        return tirx.Cast("float32", e)

    def store(buf, value, *idx):
        T.buffer_store(buf, value, list(idx))

    @contextmanager
    def loop(kind, extent, var_name):
        with kind(extent) as v:
            IRBuilder.name(var_name, v)
            yield v

    def zero_point(b, g, lane, dot=False):
        return f32(zp[b, g, lane]) if zp is not None else tirx.const(P.dot_zero if dot else P.implicit_zero, "float32")

    def offset(total, b, g, lane, sums=None, dot=False):
        """A group's ``sum code * x`` less ``zero_point * sums`` (``sums``: the group's sum of x), or
        one code less its zero point (``sums`` None); as it is for codes without one (minifloat
        values carry their sign)."""
        if zp is None and (P.dot_zero if dot else P.implicit_zero) == 0:
            return total
        z = zero_point(b, g, lane, dot)
        return total - (z if sums is None else z * sums)

    def in_units(value):
        """A float path's sum of code values in the units of the scales (minifloat_codes.FLOAT_UNIT)."""
        unit = FLOAT_UNIT[P.codes]
        return value if unit == 1 else value * tirx.const(unit, "float32")

    def nibbles(byte):
        """The codes in one stored byte, first column first."""
        if P.bits == 8:
            return [byte]
        return [tirx.bitwise_and(byte, tirx.const(15, "uint8")), tirx.shift_right(byte, tirx.const(4, "uint8"))]

    def each_column(item, count, width, body, rows=(0,)):
        """``body(r, c)`` for each r in ``rows`` and column c < width of work item ``item`` of
        ``count``, vectorised in chunks of ``lanes``; the last item stops at column n (its lanes
        past n are padding, so y is never touched there)."""
        def chunks(valid):
            for r in rows:
                for c0 in range(0, width, lanes):
                    w = min(lanes, valid - c0)
                    if w > 0:
                        with loop(T.vectorized if w == lanes else T.serial, w, "l") as lane:
                            body(r, c0 + lane)
        last_valid = P.n - (count - 1) * width
        if last_valid == width:
            chunks(width)
            return
        with T.If(item < count - 1):
            with T.Then():
                chunks(width)
            with T.Else():
                chunks(last_valid)

    def row_blocks(block, body):
        """``body(row0, rows)`` over the m rows of x: blocks of ``block`` rows, then the
        remainder (< block) as static blocks of 4, 2 and 1 rows, so every body has a constant
        row count and keeps its accumulators in registers."""
        full = tirx.floordiv(m, block)
        with loop(T.serial, full, "rb") as rb:
            body(rb * block, block)
        rest = m - full * block
        size = 1 << ((block - 1).bit_length() - 1) if block > 1 else 0     # largest power of 2 < block
        while size >= 1:
            with T.If(tirx.bitwise_and(rest, size) != 0):
                with T.Then():
                    body(full * block + tirx.bitwise_and(rest, ~(2 * size - 1)), size)
            size //= 2

    def gemv_rows(xsum, b, row0, rows):
        """y[row0:row0+rows, block b]: per group, ``rows x chains`` partial sums of code * x
        (each code unpacked once for all rows), then scale and zero point once per group."""
        unroll = max(1, min(P.unroll, GEMV_CHAINS[P.bits] // (rows * P.per_byte)))
        chains = unroll * P.per_byte
        acc = T.alloc_buffer((rows, lanes), "float32")
        part = T.alloc_buffer((rows, chains, lanes), "float32")
        IRBuilder.name("acc", acc)
        IRBuilder.name("part", part)
        with loop(T.vectorized, lanes, "l") as lane:
            for r in range(rows):
                store(acc, tirx.const(0.0, "float32"), r, lane)
        for g0, count, length in P.group_runs():
            with loop(T.serial, count, "g") as gi:
                g = g0 + gi
                with loop(T.vectorized, lanes, "l") as lane:
                    for r in range(rows):
                        for c in range(chains):
                            store(part, tirx.const(0.0, "float32"), r, c, lane)
                with loop(T.serial, length // chains, "s") as step:
                    with loop(T.vectorized, lanes, "l") as lane:
                        for u in range(unroll):
                            byte_col = g * (gs // P.per_byte) + step * unroll + u
                            for h, code in enumerate(nibbles(codes[b, byte_col, lane])):
                                c, w = u * P.per_byte + h, code_value(P.codes, code)
                                for r in range(rows):
                                    store(part, part[r, c, lane] + w * x[row0 + r, byte_col * P.per_byte + h],
                                          r, c, lane)
                with loop(T.vectorized, lanes, "l") as lane:
                    for r in range(rows):
                        total = part[r, 0, lane]
                        for c in range(1, chains):
                            total = total + part[r, c, lane]
                        part_sum = in_units(offset(total, b, g, lane, xsum[row0 + r, g]))
                        store(acc, acc[r, lane] + f32(scale[b, g, lane]) * part_sum, r, lane)
        each_column(b, P.blocks, lanes, lambda r, c: store(y, acc[r, c], row0 + r, b * lanes + c), range(rows))

    def group_sums(xsum):
        """xsum[i, g] = sum of x[i] over group g: one vector of partial sums, then its lanes."""
        part = T.alloc_buffer((lanes,), "float32")
        IRBuilder.name("part", part)
        with loop(T.serial, m, "i") as i:
            for g0, count, length in P.group_runs():
                with loop(T.serial, count, "g") as gi:
                    g = g0 + gi
                    with loop(T.vectorized, lanes, "l") as lane:
                        store(part, tirx.const(0.0, "float32"), lane)
                    with loop(T.serial, length // lanes, "s") as step:
                        with loop(T.vectorized, lanes, "l") as lane:
                            store(part, part[lane] + x[i, g * gs + step * lanes + lane], lane)
                    total = part[0]
                    for lane in range(1, lanes):
                        total = total + part[lane]
                    store(xsum, total, i, g)
                    with loop(T.serial, length % lanes, "j") as j:
                        store(xsum, xsum[i, g] + x[i, g * gs + length // lanes * lanes + j], i, g)

    def gemv():
        xsum = T.alloc_buffer((GEMV_MAX_ROWS - 1, P.groups), "float32")
        IRBuilder.name("x_group_sum", xsum)
        if zp is not None or P.implicit_zero:
            group_sums(xsum)
        with loop(T.parallel, P.blocks, "b") as b:
            row_blocks(GEMV_ROW_BLOCK, lambda row0, rows: gemv_rows(xsum, b, row0, rows))

    def split_x(xq, xs):
        """Each row of x as DOT_PIECES signed bytes an element, ``x = s (a1 + a2 / R + a3 / R**2)``
        with ``s = max |x| / 127`` of its group (xs; 1 for an all-zero group) and R = DOT_RADIX:
        ``a1 = round(x / s)``, and each next piece rounds the remainder of the one before, times R."""
        top = T.alloc_buffer((1,), "float32")
        IRBuilder.name("top", top)
        with loop(T.serial, m, "i") as i:
            for g0, count, length in P.group_runs():
                with loop(T.serial, count, "g") as gi:
                    g = g0 + gi
                    store(top, tirx.const(0.0, "float32"), 0)
                    with loop(T.serial, length, "j") as j:
                        store(top, tirx.max(top[0], tirx.abs(x[i, g * gs + j])), 0)
                    store(xs, tirx.Select(top[0] > tirx.const(0.0, "float32"), top[0] / tirx.const(127.0, "float32"),
                                          tirx.const(1.0, "float32")), i, g)

                    def pieces(col):
                        u = x[i, col] / xs[i, g]
                        for piece in range(DOT_PIECES):
                            a = tirx.round(u)
                            store(xq, tirx.Cast("int8", a), i, piece, col)
                            u = (u - a) * tirx.const(DOT_RADIX, "float32")
                    with loop(T.serial, length // lanes, "c") as c:
                        with loop(T.vectorized, lanes, "l") as lane:
                            pieces(g * gs + c * lanes + lane)
                    with loop(T.serial, length % lanes, "t") as t:
                        pieces(g * gs + length // lanes * lanes + t)

    def dot_row(xq, xs, xsum, b, i):
        """y[i, block b] by vpdpbusd: per group, int32 sums of code * piece for each piece (two
        chains each), then ``scale (s sum_p acc_p / R**p - zero_point sum x)`` in float32."""
        vec = tirx.Ramp(0, 1, lanes)
        acc = T.alloc_buffer((DOT_PIECES * 2, lanes), "int32")
        out = T.alloc_buffer((lanes,), "float32")
        IRBuilder.name("acc", acc)
        IRBuilder.name("out", out)
        with loop(T.vectorized, lanes, "l") as lane:
            store(out, tirx.const(0.0, "float32"), lane)
        for g0, count, length in P.group_runs():
            steps = length // P.dot_step
            unroll = 2 if steps % 2 == 0 else 1
            with loop(T.serial, count, "g") as gi:
                g = g0 + gi
                with loop(T.vectorized, lanes, "l") as lane:
                    for c in range(DOT_PIECES * 2):
                        store(acc, tirx.const(0, "int32"), c, lane)
                with loop(T.serial, steps // unroll, "s") as step:
                    for u in range(unroll):
                        q = tirx.floordiv(g * gs, P.dot_step) + step * unroll + u
                        # llvm.prefetch(address, read, keep in all cache levels, data)
                        T.evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0",
                                                         tirx.address_of(codes[b, q + DOT_PREFETCH_STEPS, 0]),
                                                         tirx.const(0, "int32"), tirx.const(3, "int32"),
                                                         tirx.const(1, "int32")))
                        v = codes[b, q, tirx.Ramp(0, 1, lanes * DOT_LANE_CODES)]
                        if P.bits == 8:
                            parts = [(v, q * P.dot_step)]
                        else:
                            parts = [(tirx.bitwise_and(v, tirx.Broadcast(tirx.const(15, "uint8"), 64)), q * 8),
                                     (tirx.shift_right(v, tirx.Broadcast(tirx.const(4, "uint8"), 64)), q * 8 + 4)]
                        for h, (w, col) in enumerate(parts):
                            w = fp4_lookup(w, 64, FP4_DOT_ZERO) if P.codes == "e2m1" else tirx.reinterpret("int8x64", w)
                            chain = (u * len(parts) + h) % 2
                            for piece in range(DOT_PIECES):
                                four = tirx.reinterpret("int32", xq[i, piece, tirx.Ramp(col, 1, DOT_LANE_CODES)])
                                xb = tirx.reinterpret("int8x64", tirx.Broadcast(four, lanes))
                                c = piece * 2 + chain
                                T.buffer_store(acc, tirx.call_llvm_pure_intrin(
                                    "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[c, vec], w, xb), [c, vec])
                with loop(T.vectorized, lanes, "l") as lane:
                    total = tirx.const(0.0, "float32")
                    for piece in reversed(range(DOT_PIECES)):
                        total = total * tirx.const(1.0 / DOT_RADIX, "float32") + \
                            f32(acc[piece * 2, lane] + acc[piece * 2 + 1, lane])
                    part = offset(xs[i, g] * total, b, g, lane, xsum[i, g], dot=True)
                    store(out, out[lane] + f32(scale[b, g, lane]) * part, lane)
        each_column(b, P.blocks, lanes, lambda r, c: store(y, out[c], i, b * lanes + c))

    def dot_gemv():
        xsum = T.alloc_buffer((GEMV_MAX_ROWS - 1, P.groups), "float32")
        xs = T.alloc_buffer((GEMV_MAX_ROWS - 1, P.groups), "float32")
        xq = T.alloc_buffer((GEMV_MAX_ROWS - 1, DOT_PIECES, P.k), "int8")
        IRBuilder.name("x_group_sum", xsum)
        IRBuilder.name("x_scale", xs)
        IRBuilder.name("x_pieces", xq)
        group_sums(xsum)
        split_x(xq, xs)
        with loop(T.parallel, P.blocks, "b") as b:
            with loop(T.serial, m, "i") as i:
                dot_row(xq, xs, xsum, b, i)

    def dequantize(wt, t, k0, length):
        """``wt[j, c] = W[t * tile + c, k0 + j]`` for j < length."""
        if P.dot:
            dequantize_dot(wt, t, k0, length)
            return
        with loop(T.serial, length // P.per_byte, "p") as p:
            g = tirx.floordiv(k0 + p * P.per_byte, gs)
            for v in range(P.tile_blocks):
                b = t * P.tile_blocks + v
                with loop(T.vectorized, lanes, "l") as lane:
                    for h, code in enumerate(nibbles(codes[b, k0 // P.per_byte + p, lane])):
                        store(wt, in_units(offset(code_value(P.codes, code), b, g, lane)) * f32(scale[b, g, lane]),
                              p * P.per_byte + h, v * lanes + lane)

    def dequantize_dot(wt, t, k0, length):
        """:func:`dequantize` from the dot layout (k0 and length are whole steps): one 64-byte
        load a step and row block, its bytes for each column taken apart by a shuffle."""
        vec, fvec = tirx.Ramp(0, 1, lanes), f"float32x{lanes}"
        with loop(T.serial, length // P.dot_step, "q") as qq:
            q = k0 // P.dot_step + qq
            g = tirx.floordiv(k0 + qq * P.dot_step, gs)       # a step never straddles two groups
            for v in range(P.tile_blocks):
                b = t * P.tile_blocks + v
                raw = codes[b, q, tirx.Ramp(0, 1, lanes * DOT_LANE_CODES)]
                z = tirx.Cast(fvec, zp[b, g, vec]) if zp is not None else \
                    tirx.Broadcast(tirx.const(P.implicit_zero, "float32"), lanes)
                for j in range(DOT_LANE_CODES):
                    byte = tirx.Shuffle([raw], [DOT_LANE_CODES * lane + j for lane in range(lanes)])
                    if P.bits == 8:
                        parts = [byte]
                    else:
                        parts = [tirx.bitwise_and(byte, tirx.Broadcast(tirx.const(15, "uint8"), lanes)),
                                 tirx.shift_right(byte, tirx.Broadcast(tirx.const(4, "uint8"), lanes))]
                    for h, code in enumerate(parts):
                        value = tirx.Cast(fvec, fp4_lookup(code, lanes, 0) if P.codes == "e2m1" else code)
                        if zp is not None or P.implicit_zero:
                            value = value - z
                        T.buffer_store(wt, value * tirx.Cast(fvec, scale[b, g, vec]),
                                       [qq * P.dot_step + h * DOT_LANE_CODES + j, tirx.Ramp(v * lanes, 1, lanes)])

    def micro_kernel(wt, t, k0, length, row0, rows):
        """y[row0:row0+rows, tile t] += x[row0:row0+rows, k0:k0+length] @ wt[:length], the
        ``rows x tile`` accumulators in registers (every index below is a constant)."""
        acc = T.alloc_buffer((rows, P.tile), "float32")
        IRBuilder.name("acc", acc)
        with T.If(k0 == 0):
            with T.Then():
                with loop(T.vectorized, lanes, "l") as lane:
                    for r in range(rows):
                        for v in range(P.tile_blocks):
                            store(acc, tirx.const(0.0, "float32"), r, v * lanes + lane)
            with T.Else():
                each_column(t, P.tiles, P.tile, lambda r, c: store(acc, y[row0 + r, t * P.tile + c], r, c),
                            range(rows))
        with loop(T.serial, length, "j") as j:
            with loop(T.vectorized, lanes, "l") as lane:
                for r in range(rows):
                    for v in range(P.tile_blocks):
                        c = v * lanes + lane
                        store(acc, acc[r, c] + x[row0 + r, k0 + j] * wt[j, c], r, c)
        each_column(t, P.tiles, P.tile, lambda r, c: store(y, acc[r, c], row0 + r, t * P.tile + c), range(rows))

    def prefill():
        with loop(T.parallel, P.tiles, "t") as t:
            wt = T.alloc_buffer((P.k_tile, P.tile), "float32")
            IRBuilder.name("w_tile", wt)
            for c0, count, length in P.k_tile_runs():
                with loop(T.serial, count, "kt") as kt:
                    k0 = c0 + kt * P.k_tile
                    dequantize(wt, t, k0, length)
                    row_blocks(P.row_block, lambda row0, rows: micro_kernel(wt, t, k0, length, row0, rows))

    with IRBuilder() as ib:
        with _scheduled_func(name, (x, codes, scale, zp, y)):
            with T.If(m < GEMV_MAX_ROWS):
                with T.Then():
                    dot_gemv() if P.dot else gemv()
                with T.Else():
                    prefill()
    return ib.get()


def gather_rows_func(plan: Plan, name: str):
    """PrimFunc ``name(ids [t], codes, scale[, zero_point], out [t, k])``: rows ``ids`` of W,
    dequantised from the kernel's own layout (so an embedding tied to an LM head reads the head's
    codes, and no float copy of the table exists). An id outside ``[0, n)`` reads the nearest row,
    as Relax's ``take(mode="clip")`` does for a dense table."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    P, lanes, gs = plan, plan.lanes, plan.group_size
    t = tirx.Var("t", "int64")
    ids = tirx.decl_buffer((t,), "int64", name="ids")
    codes, scale, zp = weight_buffers(P)
    out = tirx.decl_buffer((t, P.k), "float32", name="out")

    def field(byte, which):
        if P.bits == 8:
            return byte
        return tirx.bitwise_and(tirx.shift_right(byte, tirx.Cast("uint8", which * 4)), tirx.const(15, "uint8"))

    with IRBuilder() as ib:
        with _scheduled_func(name, (ids, codes, scale, zp, out)):
            with T.serial(t) as i:
                row = tirx.max(tirx.min(ids[i], tirx.const(P.n - 1, "int64")), tirx.const(0, "int64"))
                b, lane = tirx.floordiv(row, lanes), tirx.floormod(row, lanes)
                with T.serial(P.k) as c:
                    if P.dot:
                        step, r = tirx.floordiv(c, P.dot_step), tirx.floormod(c, P.dot_step)
                        byte = codes[b, step, lane * DOT_LANE_CODES + tirx.floormod(r, DOT_LANE_CODES)]
                        code = field(byte, tirx.floordiv(r, DOT_LANE_CODES))
                    else:
                        code = field(codes[b, tirx.floordiv(c, P.per_byte), lane], tirx.floormod(c, P.per_byte))
                    g = tirx.floordiv(c, gs)
                    value = code_value(P.codes, code)       # the float paths' reading, in the scales' units
                    if FLOAT_UNIT[P.codes] != 1:
                        value = value * tirx.const(FLOAT_UNIT[P.codes], "float32")
                    if zp is not None:
                        value = value - tirx.Cast("float32", zp[b, g, lane])
                    elif P.implicit_zero:
                        value = value - tirx.const(P.implicit_zero, "float32")
                    T.buffer_store(out, value * tirx.Cast("float32", scale[b, g, lane]), [i, c])
    return ib.get()


def gather_rows(name: str, codes, bits: int, scale, zero_point, group_size: int, n: int, k: int,
                target: str, code_format: str = "int") -> tuple[str, object, Plan]:
    """(function name, PrimFunc, plan) gathering rows of the weight :func:`int_weight_matmul` builds from the same
    arguments, from the arrays (``Kernel.consts``) that kernel reads (``code_format``: as
    :func:`checked_kernel` reads them, for kernels.lowbit_minifloat)."""
    codes, scale, zero_point = _checked(name, codes, bits, scale, zero_point, group_size, n, k)
    plan = make_plan(bits, n, k, group_size, zero_point is not None, target, _scale_dtype(scale), code_format)
    prefix = f"int{bits}" if code_format == "int" else code_format
    func_name = "".join(ch if ch.isalnum() else "_" for ch in f"{prefix}_rows_{name}")
    return func_name, gather_rows_func(plan, func_name), plan


# ---------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------

def _array(a, what: str, name: str) -> np.ndarray:
    """numpy view of a numpy array or CPU torch tensor (bf16 scales widened to float32; float16
    ones kept: the kernel reads them as stored)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu()
        a = a.float() if a.is_floating_point() and str(a.dtype) != "torch.float16" else a
        a = a.numpy()
    if not isinstance(a, np.ndarray):
        raise KernelError(f"{name}: {what} must be a numpy array or torch tensor, got {type(a).__name__}")
    return a


def _scale_dtype(scale: np.ndarray) -> str:
    return "float16" if scale.dtype == np.float16 else "float32"


def layout_problem(bits: int, group_size: int, n: int, k: int) -> str | None:
    """Why the kernel cannot read ``bits``-bit codes of an ``[n, k]`` weight in groups of
    ``group_size`` along k, or None when it can (the tvm capability table asks this too).

    >>> layout_problem(4, 33, 8, 64)
    '4-bit codes need an even group_size (a byte must not straddle two groups), got 33'
    """
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        return (f"{bits}-bit codes are not supported by the int weight matmul kernel "
                f"(supported: {', '.join(map(str, SUPPORTED_BITS))} bits)")
    if n < 1 or k < 1:
        return f"weight shape [{n}, {k}] must have n >= 1 and k >= 1"
    if not 1 <= group_size <= k:
        return f"group_size {group_size} outside 1..{k} (k = {k})"
    if bits == 4 and k % 2:
        return f"4-bit codes need an even k (two codes a byte), got k = {k}"
    if bits == 4 and group_size % 2:
        return f"4-bit codes need an even group_size (a byte must not straddle two groups), got {group_size}"
    return None


def _checked(name, codes, bits, scale, zero_point, group_size, n, k):
    """The inputs as numpy arrays, after checking they describe one [n, k] weight."""
    why = layout_problem(bits, group_size, n, k)
    if why is not None:
        raise KernelError(f"{name}: {why}")
    codes = _array(codes, "codes", name)
    want = (n, (k * bits + 7) // 8)
    if codes.dtype != np.uint8 or codes.shape != want:
        raise KernelError(f"{name}: codes must be uint8 {list(want)} ({bits}-bit codes of a [{n}, {k}] weight), "
                          f"got {codes.dtype} {list(codes.shape)}")
    groups = -(-k // group_size)
    scale = _array(scale, "scale", name)
    if scale.ndim != 2 or scale.shape[0] not in (1, n) or scale.shape[1] != groups:
        raise KernelError(f"{name}: scale must be [{n} or 1, {groups}] ({groups} groups of {group_size} "
                          f"along k = {k}), got {list(scale.shape)}")
    if not np.issubdtype(scale.dtype, np.floating):
        raise KernelError(f"{name}: scale must hold floats, got {scale.dtype}")
    if zero_point is not None:
        zero_point = _array(zero_point, "zero_point", name)
        if zero_point.shape != scale.shape:
            raise KernelError(f"{name}: zero_point shape {list(zero_point.shape)} differs from scale shape "
                              f"{list(scale.shape)}")
        if not np.issubdtype(zero_point.dtype, np.integer):
            raise KernelError(f"{name}: zero_point must hold integers (in the code domain), got {zero_point.dtype}")
        top = (1 << bits) - 1
        if zero_point.size and (int(zero_point.min()) < 0 or int(zero_point.max()) > top):
            raise KernelError(f"{name}: zero points must lie in the {bits}-bit code range [0, {top}], got "
                              f"[{int(zero_point.min())}, {int(zero_point.max())}]")
    return codes, scale, zero_point


def int_weight_matmul(name: str, codes, bits: int, scale, zero_point, group_size: int, n: int, k: int,
                      target: str) -> Kernel:
    """``y = x @ W.T`` for an integer-coded weight W [n, k] (see the module doc for W and the layout).

    codes: uint8 [n, ceil(k*bits/8)] packed by ``nnforge.ir.packing.pack_bits``; scale: float
    [n or 1, G] with G = ceil(k / group_size); zero_point: integer [n or 1, G] in the code
    domain, or None for signed codes stored offset-binary; target: an LLVM target string
    (``"llvm -mcpu=native"``), which sets the vector width and tiles. The PrimFunc's parameters
    are ``(x, codes, scale[, zero_point], y)``. Raises KernelError naming ``name`` for bits other
    than 4 or 8, arrays that do not match [n, k] and group_size, an odd k or group_size with
    4-bit codes, and zero points outside the code range.
    """
    codes, scale, zero_point = _checked(name, codes, bits, scale, zero_point, group_size, n, k)
    return checked_kernel(name, codes, bits, scale, zero_point, group_size, n, k, target, "int_weight_matmul")


def checked_kernel(name: str, codes, bits: int, scale, zero_point, group_size: int, n: int, k: int, target: str,
                   kernel: str, code_format: str = "int") -> Kernel:
    """The Kernel of arrays ``_checked`` passed, reading codes as ``code_format`` (Plan.codes), its
    notes naming it ``kernel``: :func:`int_weight_matmul`, and kernels.lowbit_minifloat."""
    try:
        plan = make_plan(bits, n, k, group_size, zero_point is not None, target, _scale_dtype(scale), code_format)
    except KernelError as e:
        raise KernelError(f"{name}: {e}") from None
    blocks = plan.padded_blocks
    scale = np.broadcast_to(scale.astype(plan.scale_dtype), (n, plan.groups))
    layout = dot_layout(codes, bits, k, plan.lanes, blocks) if plan.dot else interleave_rows(codes, plan.lanes, blocks)
    consts = [layout, interleave_rows(scale, plan.lanes, blocks)]
    if zero_point is not None:
        zp = np.broadcast_to(zero_point.astype(np.uint8), (n, plan.groups))
        consts.append(interleave_rows(zp, plan.lanes, blocks))
    prefix = f"int{bits}" if code_format == "int" else code_format
    func_name = "".join(ch if ch.isalnum() else "_" for ch in f"{prefix}_matmul_{name}")
    return Kernel(func_name, build_func(plan, func_name), consts, n, k, notes={
        "kernel": kernel, "codes": code_format, "bits": bits, "group_size": group_size,
        "zero_point": zero_point is not None, "lanes": plan.lanes,
        "schedules": {f"m < {GEMV_MAX_ROWS}": (f"dot gemv (AVX-512 VNNI): parallel over {plan.blocks} row blocks, "
                                               f"x split into {DOT_PIECES} int8 pieces, vpdpbusd per group"
                                               if plan.dot else f"gemv: parallel over {plan.blocks} row blocks, "
                                               f"{plan.chains} partial sums per group"),
                      f"m >= {GEMV_MAX_ROWS}": f"prefill: parallel over {plan.tiles} tiles of {plan.tile} "
                                               f"columns, k-tile {plan.k_tile}, register tile "
                                               f"{plan.row_block}x{plan.tile}"},
        "layout": (f"codes {list(layout.shape)} (dot layout: {DOT_LANE_CODES} columns of a row a 32-bit lane, "
                   f"rows interleaved by {plan.lanes})" if plan.dot else
                   f"codes [{blocks}, {codes.shape[1]}, {plan.lanes}] (stored bytes, rows interleaved by "
                   f"{plan.lanes})"),
        "const_bytes": int(sum(c.nbytes for c in consts))})

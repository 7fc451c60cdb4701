"""Block-sparse (BSR) products ``y = x @ W.T`` as TensorIR kernels for x86 (and any LLVM CPU).

W is ``[n, k]`` (out x in features) stored as BSR with ``R x C`` blocks (:mod:`nnforge.ir.sparse`):
``row_ptr`` int32 ``[n/R + 1]``, ``col_idx`` the block-column of every kept block, increasing within
a block-row, and the kept blocks ``[kept, R, C]``. Both builders return a :class:`Kernel` whose
PrimFunc is ``(x [m, k] float32, *consts, y [m, n] float32)`` for any ``m >= 0`` (a symbolic int64).

The schedules follow Intel's sparse accelerator for transformers (Shen et al., 2022, "An Efficient
Sparse Inference Software Accelerator for Transformer-based Language Models on CPUs"), picked per
block shape, vector width ``V`` and, at run time, ``m``:

- tokens in lanes: x is transposed inside the kernel into a ``[k, m]`` scratch (``m*k`` moves, small
  next to the ``m*n*k*density`` products) so that tokens are contiguous; every weight of a kept block
  is broadcast against vectors of tokens, into a register tile of ``rows x vectors`` accumulators.
  The scratch is padded with zeros to whole vectors, so tails cost no scalar loop. A tile of >= 4
  rows is shuffled (transposed in registers) straight into y; narrower tiles go through a ``[n, m]``
  scratch and a final transposition, because single floats stored n apart thrash L1 sets.
- rows in lanes: a block's R (or C) values form the vector and a token's x value is broadcast; y
  rows are stored whole, and nothing is transposed. For tall blocks (R a multiple of V, 16x1 on
  AVX2) at every m, and for any block at small m (GEMV), where tokens in lanes would idle lanes.

:func:`bsr_matmul_int8` quantises x inside the kernel and sums exact int32 dot products with the
target's instruction (``vpdpbusd`` with VNNI, ``vpmaddwd`` on AVX2), tokens in lanes, and rows in lanes
below V/2 tokens (its GEMV schedule, with codes regrouped for it); see its docstring.

    >>> kern = bsr_matmul("fc1", row_ptr, col_idx, blocks, n=768, k=768, target="llvm -mcpu=native")
    >>> lib = tvm.compile(tvm.IRModule({kern.name: kern.func}), target=llvm_target("llvm -mcpu=native").target)
"""
# no `from __future__ import annotations`: TVMScript reads the T.Buffer annotations as live objects
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import Kernel, KernelError

# --- the LLVM target -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuTarget:
    """What the kernel builders need to know of an LLVM CPU target."""
    target: object          # tvm.target.Target, the one to compile the kernels (and their module) with
    lanes: int              # float32 lanes of a vector register: 4 (SSE, NEON), 8 (AVX2), 16 (AVX-512)
    registers: int          # architectural vector registers: 16, or 32 with AVX-512 / NEON
    features: frozenset     # the LLVM features the target enables


@lru_cache(maxsize=None)
def llvm_target(target) -> CpuTarget:
    """What the kernels need of an LLVM target: a string such as ``"llvm -mcpu=native"`` or ``"llvm
    -mtriple=x86_64-linux-gnu -mcpu=sapphirerapids"``, or a tvm Target. Strings are resolved by the
    backend's :func:`nnforge.backends.tvm.resolve_target` (``native``: this host's CPU name *and*
    features, so a VM hiding AVX-512 gets AVX2 code), the target the kernels must be compiled with.

    >>> llvm_target("llvm -mtriple=x86_64-linux-gnu -mcpu=sapphirerapids").lanes
    16
    """
    from tvm.target import codegen

    from ...base import BackendError
    from .. import resolve_target
    try:
        resolved = resolve_target(target)
    except BackendError as e:
        raise KernelError(str(e)) from None
    features = frozenset(codegen.llvm_get_cpu_features(resolved))
    wide = "avx512f" in features
    lanes = 16 if wide else 8 if "avx" in features else 4
    return CpuTarget(resolved, lanes, 32 if wide or "neon" in features else 16, features)


# --- checking and reading BSR arrays ---------------------------------------------------------------


def _as_array(value) -> np.ndarray:
    if hasattr(value, "detach"):        # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _check_bsr(name: str, row_ptr, col_idx, blocks, n: int, k: int, value_dtype) -> tuple:
    """KernelError unless the arrays are a BSR form of an ``[n, k]`` weight with ``value_dtype`` blocks;
    returns (row_ptr int32, col_idx int32, blocks, R, C)."""
    row_ptr, col_idx, blocks = _as_array(row_ptr), _as_array(col_idx), _as_array(blocks)
    where = f"BSR weight {name!r} ({n} x {k})"
    if blocks.dtype != np.dtype(value_dtype) or blocks.ndim != 3 or 0 in blocks.shape[1:]:
        raise KernelError(f"{where}: blocks must be {np.dtype(value_dtype).name} [kept, R, C], got "
                          f"{blocks.dtype} {blocks.shape}")
    kept, r, c = blocks.shape
    if n < 1 or k < 1 or n % r or k % c:
        raise KernelError(f"{where}: {r}x{c} blocks do not tile the {n} x {k} weight")
    for label, arr in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
            raise KernelError(f"{where}: {label} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    if row_ptr.shape[0] != n // r + 1:
        raise KernelError(f"{where}: row_ptr must have {n // r + 1} entries (one per block-row of {r}x{c} "
                          f"blocks, plus one), got {row_ptr.shape[0]}")
    rp = row_ptr.astype(np.int64)
    if rp[0] != 0 or np.any(np.diff(rp) < 0) or rp[-1] != kept or col_idx.shape[0] != kept:
        raise KernelError(f"{where}: inconsistent BSR arrays: row_ptr must start at 0, never decrease and end "
                          f"at the number of kept blocks; it ends at {rp[-1]}, col_idx has {col_idx.shape[0]} "
                          f"entries, blocks has {kept}")
    cols = col_idx.astype(np.int64)
    if kept and (cols.min() < 0 or cols.max() >= k // c):
        raise KernelError(f"{where}: col_idx out of range: block-columns must lie in [0, {k // c}), got "
                          f"values in [{cols.min()}, {cols.max()}]")
    same_row = np.repeat(np.arange(n // r), np.diff(rp))
    if kept > 1 and np.any(np.diff(cols)[same_row[1:] == same_row[:-1]] <= 0):
        raise KernelError(f"{where}: col_idx must increase strictly within each block-row")
    return rp.astype(np.int32), cols.astype(np.int32), blocks, r, c


def _at_least_one(arr: np.ndarray) -> np.ndarray:
    """TVM buffers cannot be empty: a weight with no kept block passes one entry, never read."""
    return arr if arr.shape[0] else np.zeros((1,) + arr.shape[1:], arr.dtype)


def dense_from_bsr(row_ptr, col_idx, blocks, n: int, k: int) -> np.ndarray:
    """The dense ``[n, k]`` matrix of a BSR triple (the reference of the tests and benchmarks).

    >>> dense_from_bsr([0, 1, 1], [1], np.ones((1, 2, 2)), 4, 4)[:2]
    array([[0., 0., 1., 1.],
           [0., 0., 1., 1.]])
    """
    row_ptr, col_idx, blocks = _as_array(row_ptr), _as_array(col_idx), _as_array(blocks)
    kept, r, c = blocks.shape
    dense = np.zeros((n // r, r, k // c, c), blocks.dtype)
    block_row = np.repeat(np.arange(n // r), np.diff(row_ptr.astype(np.int64)))
    dense[block_row, :, col_idx.astype(np.int64), :] = blocks
    return dense.reshape(n, k)


# --- the tokens-in-lanes schedule, shared by both kernels ------------------------------------------


def _largest_divisor(value: int, cap: int) -> int:
    return max(d for d in range(1, min(value, cap) + 1) if value % d == 0)


@dataclass(frozen=True)
class _Tiling:
    """A tokens-in-lanes register tile: ``rows`` rows of a block x ``vectors`` vectors of ``lanes`` tokens."""
    lanes: int
    rows: int
    vectors: int
    direct_store: bool      # shuffle the tile into y (else write a [n, m] scratch, transposed at the end)

    @classmethod
    def fit(cls, r: int, lanes: int, registers: int, spare: int) -> "_Tiling":
        rows = _largest_divisor(r, 8 if registers > 16 else 4)
        # accumulators + one broadcast per row + ``spare`` must fit the registers, or LLVM spills the tile
        vectors = max(1, min(4, (registers - spare - rows) // rows))
        return cls(lanes, rows, vectors, rows >= 4)

    def describe(self) -> str:
        return f"tokens in lanes, tile {self.rows} rows x {self.vectors}x{self.lanes} tokens"


def _padded(m, lanes: int):
    return (m + lanes - 1) // lanes * lanes


def _token_tiles(tiling: _Tiling, r: int, n: int, tile):
    """Macro ``run(src, y, consts, m)``: ``tile(src, out, consts, m, br, rg, t0, vectors, guarded)`` over
    every block-row ``br`` (in parallel), row group ``rg`` and token tile, with whole tiles first, then
    single vectors up to m rounded up to V (``src`` holds zeros there); ``guarded`` marks the tiles
    whose stores must skip tokens past m."""
    from tvm.script import tirx as T

    V, RT, MV = tiling.lanes, tiling.rows, tiling.vectors
    VT, n_step = V * MV, _largest_divisor(n, 8)

    @T.macro
    def run(src, y, consts, m):
        if tiling.direct_store:
            for br in T.parallel(n // r):
                for rg in T.serial(r // RT):
                    for mt in T.serial(m // VT):
                        tile(src, y, consts, m, br, rg, mt * VT, MV, False)
                    for mv in T.serial((_padded(m, V) - m // VT * VT) // V):
                        tile(src, y, consts, m, br, rg, m // VT * VT + mv * V, 1, True)
        else:
            # (the shape spells _padded out: a bound variable in an allocation shape trips FlattenBuffer)
            yT = T.alloc_buffer((n, T.max((m + V - 1) // V * V, V)), "float32")
            for br in T.parallel(n // r):
                for rg in T.serial(r // RT):
                    for mt in T.serial(_padded(m, V) // VT):
                        tile(src, yT, consts, m, br, rg, mt * VT, MV, False)
                    for mv in T.serial(_padded(m, V) % VT // V):
                        tile(src, yT, consts, m, br, rg, _padded(m, V) // VT * VT + mv * V, 1, False)
            for nb in T.parallel(n // n_step):      # y row segments of n_step, one cache line or so
                for t in T.serial(m):
                    for j in T.unroll(n_step):
                        y[t, nb * n_step + j] = yT[nb * n_step + j, t]

    return run


def _tile_store(tiling: _Tiling, r: int):
    """Macro ``store(res, out, m, br, rg, t0, vectors, guarded)``: a float32 tile ``res`` [rows, vectors*V]
    into y (direct store) or into the [n, m] scratch."""
    from tvm.script import tirx as T

    V, RT = tiling.lanes, tiling.rows

    def lane_across_rows(res, j, lane):
        """Token ``lane`` of vector j across the tile's rows: a transposing shuffle, so the tile is only
        ever read as whole vectors (element reads make LLVM scalarise it, registers and all)."""
        return T.Shuffle([res[i, T.ramp(j * V, 1, V)] for i in range(RT)], [i * V + lane for i in range(RT)])

    def rows_of(first):
        return T.ramp(first, 1, RT) if RT > 1 else first

    @T.macro
    def store(res, out, m, br, rg, t0, nvec, guarded):
        if tiling.direct_store:
            for j in T.unroll(nvec):
                for lane in T.unroll(V):
                    if guarded:
                        if t0 + j * V + lane < m:
                            out[t0 + j * V + lane, rows_of(br * r + rg * RT)] = lane_across_rows(res, j, lane)
                    else:
                        out[t0 + j * V + lane, rows_of(br * r + rg * RT)] = lane_across_rows(res, j, lane)
        else:
            for i in T.unroll(RT):
                for j in T.unroll(nvec):
                    out[br * r + rg * RT + i, T.ramp(t0 + j * V, 1, V)] = res[i, T.ramp(j * V, 1, V)]

    return store


# --- the fp32 kernel -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fp32Plan:
    """How the fp32 kernel walks one block shape."""
    lanes: int
    tiling: _Tiling | None  # tokens in lanes for m >= small_m; None: rows in lanes for every m
    small_m: int            # below this m, rows in lanes (tokens in lanes would idle lanes)
    tok_tile: int           # rows in lanes: tokens of a register tile
    layout: str             # blocks stored "cr" ([kept, C, R]: a block column is a vector) or "rc"

    def describe(self) -> dict:
        notes = {"lanes": self.lanes, "block_layout": self.layout}
        rows = f"rows in lanes, {self.tok_tile} tokens a tile"
        if self.tiling is None:
            return {"schedule": rows, **notes}
        return {"schedule": self.tiling.describe(), "small_m_schedule": f"rows in lanes for m < {self.small_m}",
                **notes}


def _fp32_plan(r: int, c: int, cpu: CpuTarget) -> _Fp32Plan:
    lanes = cpu.lanes
    if r % lanes == 0:
        # a block column is whole vectors: tokens fill the registers left after two in flight
        per_token = r // lanes
        return _Fp32Plan(lanes, None, 0, max(1, min(6, (cpu.registers - 4) // per_token)), "cr")
    layout = "cr" if r >= c else "rc"
    # measured on Zen 4 (AVX2): rows in lanes wins for GEMV with tall blocks, and up to m = 3 for wide
    # ones (whose tokens-in-lanes tile has a single row)
    small_m = 2 if layout == "cr" else lanes // 2
    return _Fp32Plan(lanes, _Tiling.fit(r, lanes, cpu.registers, spare=1), small_m, 1, layout)


def _fp32_func(n: int, k: int, r: int, c: int, kept: int, plan: _Fp32Plan):
    """The PrimFunc (x, row_ptr, kcol, w, y): ``kcol`` is each kept block's first column of W and ``w``
    each block flattened in the plan's layout."""
    from tvm.script import tirx as T

    V, n_block_rows, cr = plan.lanes, n // r, plan.layout == "cr"
    sr, sc = (1, r) if cr else (c, 1)       # element strides of row i and column j in a stored block
    k_step = _largest_divisor(k, 8)
    partials = 4                            # accumulators of a lone token, round-robin over blocks

    def unrolled(extent):
        return T.unroll(extent) if extent <= 8 else T.serial(extent)

    @T.macro
    def transpose(x, xT, m):
        # columns in runs of k_step: a source row is read a cache line at a time and k_step rows of xT
        # are written sequentially (walking down a column whose stride is a multiple of 4 KiB would
        # thrash a handful of L1 sets); padding tokens get zeros, not garbage (denormals slow FMAs)
        for cb in T.parallel(k // k_step):
            for t in T.serial(m):
                for j in T.unroll(k_step):
                    xT[cb * k_step + j, t] = x[t, cb * k_step + j]
            for t in T.serial(_padded(m, V) - m):
                for j in T.unroll(k_step):
                    xT[cb * k_step + j, m + t] = T.float32(0)

    if plan.tiling is not None:
        RT = plan.tiling.rows
        store = _tile_store(plan.tiling, r)

        @T.macro
        def tokens_tile(xT, out, consts, m, br, rg, t0, nvec, guarded):
            row_ptr, kcol, w = consts
            # on the stack ("global" scope under 1 KiB) and only ever accessed as whole vectors, so
            # LLVM keeps the tile in registers
            acc = T.alloc_buffer((RT, nvec * V), "float32", scope="global")
            for i in T.unroll(RT):
                for j in T.unroll(nvec):
                    acc[i, T.ramp(j * V, 1, V)] = T.broadcast(T.float32(0), V)
            for b in range(row_ptr[br], row_ptr[br + 1]):
                for cc in unrolled(c):
                    for j in T.unroll(nvec):
                        for i in T.unroll(RT):
                            acc[i, T.ramp(j * V, 1, V)] = acc[i, T.ramp(j * V, 1, V)] + T.broadcast(
                                w[b, (rg * RT + i) * sr + cc * sc], V) * xT[kcol[b] + cc, T.ramp(t0 + j * V, 1, V)]
            store(acc, out, m, br, rg, t0, nvec, guarded)

        tokens_in_lanes = _token_tiles(plan.tiling, r, n, tokens_tile)

    @T.macro
    def accumulate(acc, a, w, b, x, t, kcol):
        # acc[a] += block b x token t, vectorised along the stored block's inner axis
        if cr:
            for j in unrolled(c):
                for i in T.vectorized(r):
                    acc[a, j * r + i] = acc[a, j * r + i] + w[b, j * r + i] * x[t, kcol[b] + j]
        else:
            for i in unrolled(r):
                for j in T.vectorized(c):
                    acc[a, i * c + j] = acc[a, i * c + j] + w[b, i * c + j] * x[t, kcol[b] + j]

    @T.macro
    def store_rows(acc, a, y, t, br):
        if cr:
            for i in T.vectorized(r):
                y[t, br * r + i] = acc[a, i]
            for j in T.serial(c - 1):
                for i in T.vectorized(r):
                    y[t, br * r + i] = y[t, br * r + i] + acc[a, (j + 1) * r + i]
        else:
            for i in T.serial(r):
                y[t, br * r + i] = acc[a, i * c]
                for j in T.serial(c - 1):
                    y[t, br * r + i] = y[t, br * r + i] + acc[a, i * c + j + 1]

    @T.macro
    def rows_tile(x, y, row_ptr, kcol, w, br, t0, tokens):
        acc = T.alloc_buffer((tokens, r * c), "float32", scope="global")
        for t in T.unroll(tokens):
            for e in T.vectorized(r * c):
                acc[t, e] = T.float32(0)
        for b in range(row_ptr[br], row_ptr[br + 1]):
            for t in T.unroll(tokens):
                accumulate(acc, t, w, b, x, t0 + t, kcol)
        for t in T.unroll(tokens):
            store_rows(acc, t, y, t0 + t, br)

    @T.macro
    def rows_one_token(x, y, row_ptr, kcol, w, br, t):
        # a lone accumulator would wait out the FMA latency on every block: blocks go round-robin to
        # ``partials`` accumulators, summed at the end
        acc = T.alloc_buffer((partials, r * c), "float32", scope="global")
        for p in T.unroll(partials):
            for e in T.vectorized(r * c):
                acc[p, e] = T.float32(0)
        for q in T.serial((row_ptr[br + 1] - row_ptr[br]) // partials):
            for p in T.unroll(partials):
                accumulate(acc, p, w, row_ptr[br] + q * partials + p, x, t, kcol)
        for q in T.serial((row_ptr[br + 1] - row_ptr[br]) % partials):
            accumulate(acc, 0, w, row_ptr[br + 1] - 1 - q, x, t, kcol)
        for p in T.unroll(partials - 1):
            for e in T.vectorized(r * c):
                acc[0, e] = acc[0, e] + acc[p + 1, e]
        store_rows(acc, 0, y, t, br)

    @T.macro
    def rows_in_lanes(x, y, row_ptr, kcol, w, m, tokens):
        for br in T.parallel(n_block_rows):
            for tt in T.serial(m // tokens):
                rows_tile(x, y, row_ptr, kcol, w, br, tt * tokens, tokens)
            for tail in T.serial(m % tokens):
                rows_one_token(x, y, row_ptr, kcol, w, br, m // tokens * tokens + tail)

    @T.prim_func
    def bsr_fp32(x_handle: T.handle, row_ptr: T.Buffer((n_block_rows + 1,), "int32"),
                 kcol: T.Buffer((max(kept, 1),), "int32"), w: T.Buffer((max(kept, 1), r * c), "float32"),
                 y_handle: T.handle):
        T.func_attr({"tir.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_handle, (m, k), "float32")
        y = T.match_buffer(y_handle, (m, n), "float32")
        if plan.tiling is None:
            rows_in_lanes(x, y, row_ptr, kcol, w, m, plan.tok_tile)
        elif m < plan.small_m:
            rows_in_lanes(x, y, row_ptr, kcol, w, m, plan.small_m)     # every token a tail: one at a time
        else:
            xT = T.alloc_buffer((k, T.max((m + V - 1) // V * V, V)), "float32")
            transpose(x, xT, m)
            tokens_in_lanes(xT, y, (row_ptr, kcol, w), m)

    return bsr_fp32


def bsr_matmul(name: str, row_ptr, col_idx, blocks, n: int, k: int, target: str) -> Kernel:
    """fp32 BSR SpMM ``y[m, n] = x[m, k] @ W.T`` for any R x C blocks that tile ``[n, k]`` (fast paths:
    1x4, 4x1, 16x1), vectorised and parallelised over the output for the LLVM ``target``.

    consts: ``row_ptr`` int32 ``[n/R + 1]``; ``kcol`` int32 ``[kept]``, the first column of W each kept
    block covers (``col_idx * C``); ``w`` float32 ``[kept, R*C]``, each block flattened column-major
    (``[C, R]``) when ``R >= C`` so that a block column is a vector, else row-major. A weight without
    kept blocks passes one unread entry in each (TVM buffers cannot be empty).

    >>> kern = bsr_matmul("fc1", row_ptr, col_idx, blocks, n=768, k=3072, target="llvm -mcpu=native")
    >>> kern.notes["schedule"]
    'tokens in lanes, tile 4 rows x 2x8 tokens'
    """
    row_ptr, cols, blocks, r, c = _check_bsr(name, row_ptr, col_idx, blocks, n, k, np.float32)
    plan = _fp32_plan(r, c, llvm_target(target))
    stored = blocks.transpose(0, 2, 1) if plan.layout == "cr" else blocks
    w = np.ascontiguousarray(stored).reshape(blocks.shape[0], r * c)
    func = _fp32_func(n, k, r, c, blocks.shape[0], plan).with_attr("global_symbol", name)
    notes = {"kernel": "bsr_fp32", "block": f"{r}x{c}", "kept_blocks": int(blocks.shape[0]),
             "density": blocks.shape[0] * r * c / (n * k), **plan.describe()}
    return Kernel(name, func, [row_ptr, _at_least_one(cols * c), _at_least_one(w)], n, k, notes)


# --- the int8 kernel -------------------------------------------------------------------------------


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
        T.func_attr({"tir.noalias": True})
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
    if k * 128 * 255 >= 2 ** 31:
        raise KernelError(f"{where}: k = {k} is too long for exact int32 sums of 8-bit products")
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

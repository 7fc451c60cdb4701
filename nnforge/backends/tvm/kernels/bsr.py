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

:func:`.bsr_int8.bsr_matmul_int8` (its own module) quantises x inside the kernel and sums exact int32 dot products with the
target's instruction (``vpdpbusd`` with VNNI, ``vpmaddwd`` on AVX2), tokens in lanes, and rows in lanes
below V/2 tokens (its GEMV schedule, with codes regrouped for it); see its docstring.

    >>> kern = bsr_matmul("fc1", row_ptr, col_idx, blocks, n=768, k=768, target="llvm -mcpu=native")
    >>> lib = tvm.compile(tvm.IRModule({kern.name: kern.func}), target=llvm_target("llvm -mcpu=native").target)
"""
# no `from __future__ import annotations`: TVMScript reads the T.Buffer annotations as live objects
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from ..llvm_targets import resolve_target
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


def _fp32_plan(r: int, c: int, cpu: CpuTarget, config: dict | None = None) -> _Fp32Plan:
    """The default schedule of an R x C block shape, with ``config``'s knobs (see :func:`config_space`) over it."""
    lanes = cpu.lanes
    if r % lanes == 0:
        # a block column is whole vectors: tokens fill the registers left after two in flight
        per_token = r // lanes
        plan = _Fp32Plan(lanes, None, 0, max(1, min(6, (cpu.registers - 4) // per_token)), "cr")
    else:
        layout = "cr" if r >= c else "rc"
        # measured on Zen 4 (AVX2): rows in lanes wins for GEMV with tall blocks, and up to m = 3 for wide
        # ones (whose tokens-in-lanes tile has a single row)
        small_m = 2 if layout == "cr" else lanes // 2
        plan = _Fp32Plan(lanes, _Tiling.fit(r, lanes, cpu.registers, spare=1), small_m, 1, layout)
    for knob, value in (config or {}).items():
        if knob == "vectors" and plan.tiling is not None and 1 <= value <= 4:
            plan = replace(plan, tiling=replace(plan.tiling, vectors=int(value)))
        elif knob == "tok_tile" and plan.tiling is None and 1 <= value <= 8:
            plan = replace(plan, tok_tile=int(value))
        else:
            raise KernelError(f"fp32 BSR config {config}: {knob}={value!r} does not apply to {r}x{c} blocks "
                              f"with {lanes} lanes")
    return plan


def config_space(n: int, k: int, blocks, target, **_) -> tuple[str, list[dict]]:
    """(the key a tuned choice is shared under, the configs worth measuring, default first) for an
    fp32 BSR weight: the token vectors of the tokens-in-lanes tile (1 up to what the registers
    hold), or the tokens of a rows-in-lanes tile. Layers of one shape, block and density (to 5%)
    share a choice: their speed depends on those, not on where the blocks are."""
    cpu = llvm_target(target)
    kept, r, c = np.asarray(blocks).shape
    plan = _fp32_plan(r, c, cpu)
    key = f"{n}x{k} block{r}x{c} d{round(kept * r * c / (n * k) * 20) / 20:.2f}"
    if plan.tiling is not None:
        rows = plan.tiling.rows
        most = max(1, min(4, (cpu.registers - 1 - rows) // rows))
        values = [plan.tiling.vectors] + [v for v in range(1, most + 1) if v != plan.tiling.vectors]
        return key, [{"vectors": v} for v in values]
    most = max(1, min(8, (cpu.registers - 2) // (r // cpu.lanes)))
    return key, [{"tok_tile": t} for t in [plan.tok_tile] + [t for t in (1, 2, 4, most) if t != plan.tok_tile]]


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
        T.func_attr({"tirx.noalias": True})
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


def bsr_matmul(name: str, row_ptr, col_idx, blocks, n: int, k: int, target: str, config: dict | None = None) -> Kernel:
    """fp32 BSR SpMM ``y[m, n] = x[m, k] @ W.T`` for any R x C blocks that tile ``[n, k]`` (fast paths:
    1x4, 4x1, 16x1), vectorised and parallelised over the output for the LLVM ``target``.

    consts: ``row_ptr`` int32 ``[n/R + 1]``; ``kcol`` int32 ``[kept]``, the first column of W each kept
    block covers (``col_idx * C``); ``w`` float32 ``[kept, R*C]``, each block flattened column-major
    (``[C, R]``) when ``R >= C`` so that a block column is a vector, else row-major. A weight without
    kept blocks passes one unread entry in each (TVM buffers cannot be empty).

    >>> kern = bsr_matmul("fc1", row_ptr, col_idx, blocks, n=768, k=3072, target="llvm -mcpu=native")
    >>> kern.notes["schedule"]
    'tokens in lanes, tile 4 rows x 2x8 tokens'

    ``config``: knobs from :func:`config_space` (a tuned choice); None for the default schedule.
    """
    row_ptr, cols, blocks, r, c = _check_bsr(name, row_ptr, col_idx, blocks, n, k, np.float32)
    plan = _fp32_plan(r, c, llvm_target(target), config)
    stored = blocks.transpose(0, 2, 1) if plan.layout == "cr" else blocks
    w = np.ascontiguousarray(stored).reshape(blocks.shape[0], r * c)
    func = _fp32_func(n, k, r, c, blocks.shape[0], plan).with_attr("global_symbol", name)
    notes = {"kernel": "bsr_fp32", "block": f"{r}x{c}", "kept_blocks": int(blocks.shape[0]),
             "density": blocks.shape[0] * r * c / (n * k), **plan.describe()}
    return Kernel(name, func, [row_ptr, _at_least_one(cols * c), _at_least_one(w)], n, k, notes)

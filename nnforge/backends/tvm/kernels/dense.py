"""Scheduled fp32 kernels in TensorIR for the dense (not compressed) work of a model: GEMM for
linear layers, batched GEMM for activation matmuls, row softmax.

Relax legalises ``matmul`` into a plain loop nest that the default CPU pipeline leaves unscheduled
(one thread, no register tiling: far slower than torch), so dense products
run on these kernels instead. They follow the contract of :mod:`.` (``(x, *consts, y)``, fp32):

- :func:`dense_matmul` — ``y[m, n] = sum_k x[m, k] * w[n, k] + bias[n]``. The weight is read as
  k-major panels of ``NB`` (two vectors of) output columns, ``[ceil(N/NB), K, NB]``, which
  :func:`pack_panels` makes from the stored ``[N, K]`` array once, when a bundle loads (the
  bundle keeps only the graph's copy). Work is split into tasks of one panel x up to
  ``ROWS_PER_TASK`` rows, run in parallel; a task walks its rows in register tiles of ``MR`` rows
  x ``NB`` columns (``MR * NB / lanes`` vector accumulators: broadcast ``x[m, k]``, FMA with the
  panel row), with a one-row tail, and adds the bias as it stores. At m = 1 this is a GEMV that
  streams each panel once.
- :func:`batch_matmul` — ``y[b, m, n] = sum_k a[b, m, k] * c[b, k, n]`` for two activations
  (attention's Q.K^T and P.V), every dim symbolic or static; parallel over the batch, register
  tiles of ``MR`` rows x one vector of n, scalar tails in m and n.
- :func:`softmax_func` — softmax over the last axis, a row per task.

The vector width comes from the resolved LLVM target (8 fp32 lanes with AVX2, 16 with AVX-512),
so the same builder serves ``cpu``, ``xeon-spr`` and ``epyc``.

    >>> k = dense_matmul("nf_dense_384x1536", 384, 1536, "llvm -mcpu=native")
    >>> k.func                        # PrimFunc (x [m, 1536], panels [24, 1536, 16], bias [384], y [m, 384])
"""
from __future__ import annotations

from functools import lru_cache

from ..llvm_targets import resolve_target
from . import Kernel, KernelError

ROWS_PER_TASK = 240          # rows of x one parallel task covers (a multiple of every MR below)
STACK_BYTES = 1024           # TVM's kMaxStackAlloca: smaller "global" allocations are allocas on the stack


def vector_lanes(target) -> int:
    """fp32 lanes of one vector register of ``target`` (a string or a tvm Target)."""
    from tvm.target import codegen
    features = codegen.llvm_get_cpu_features(resolve_target(target))
    if "avx512f" in features:
        return 16
    if "avx" in features:
        return 8
    return 4


def _tile(lanes: int) -> tuple[int, int]:
    """(MR rows, NB columns) of the default register tile: 2 vectors wide, and as many rows as leave
    registers for the two weight vectors and the broadcast (16 ymm on AVX2, 32 zmm on AVX-512)."""
    return (8 if lanes >= 16 else 6), 2 * lanes


def default_config(lanes: int) -> dict:
    """The dense GEMM's schedule when nothing was measured: :func:`_tile`, ``ROWS_PER_TASK`` rows a task."""
    mr, nb = _tile(lanes)
    return {"mr": mr, "vectors": nb // lanes, "rows_per_task": ROWS_PER_TASK}


def config_space(lanes: int, registers: int) -> list[dict]:
    """Register tiles worth measuring: for 1..4 vectors of output columns, the most rows whose
    accumulators, weight vectors, one broadcast and one spare fit the register file (a tile using
    all 16 ymm registers spills), and half of that. Tasks keep about ROWS_PER_TASK rows."""
    space = []
    for vectors in (1, 2, 3, 4):
        most = (registers - vectors - 2) // vectors
        for mr in sorted({most, max(1, most // 2)}, reverse=True):
            if mr >= 1:
                space.append({"mr": mr, "vectors": vectors, "rows_per_task": mr * max(1, round(ROWS_PER_TASK / mr))})
    default = default_config(lanes)
    return [default] + [c for c in space if c != default]


def _check_config(config: dict, lanes: int) -> tuple[int, int, int]:
    mr, vectors, mc = (int(config.get(key, 0)) for key in ("mr", "vectors", "rows_per_task"))
    if mr < 1 or vectors < 1 or mc < mr or mc % mr:
        raise KernelError(f"dense GEMM config {config}: needs mr >= 1, vectors >= 1 and rows_per_task a "
                          "multiple of mr")
    return mr, vectors * lanes, mc


def panel_width(lanes: int, config: dict | None = None) -> int:
    """Output columns of one weight panel (``vectors`` vectors; two by default)."""
    return _check_config(config or default_config(lanes), lanes)[1]


def pack_panels(w, n: int, k: int, nb: int, transposed: bool = False):
    """The Relax expression packing weight ``w`` (``[n, k]``, or ``[k, n]`` if ``transposed``)
    into the panels :func:`dense_matmul_func` reads: ``[ceil(n / NB), k, NB]``, panel p holding
    output columns p*NB .. p*NB+NB-1 k-major, zero-padded past n. Run once, when a bundle loads."""
    from tvm.relax import op
    blocks = -(-n // nb)
    if transposed:             # [k, n] -> [k, blocks, nb] -> [blocks, k, nb]
        padded = op.nn.pad(w, [0, 0, 0, blocks * nb - n]) if blocks * nb != n else w
        return op.permute_dims(op.reshape(padded, [k, blocks, nb]), [1, 0, 2])
    padded = op.nn.pad(w, [0, blocks * nb - n, 0, 0]) if blocks * nb != n else w
    return op.permute_dims(op.reshape(padded, [blocks, nb, k]), [0, 2, 1])


@lru_cache(maxsize=64)
def dense_matmul_func(n: int, k: int, mr: int, nb: int, mc: int):
    """The PrimFunc ``(x [m, k], panels [ceil(n/NB), k, NB], bias [n], y [m, n])`` with an ``mr`` x
    ``nb`` register tile and ``mc`` rows a task: the bias is added as the tile is stored (a layer
    without one passes zeros).

    The tile's accumulators are "global" allocations under :data:`STACK_BYTES`, which TVM makes
    stack allocas that LLVM keeps in registers whatever it knows of aliasing (two buffers of half
    the rows when one would be too big). A "local" one becomes a TVMBackendAllocWorkspace pointer
    that LLVM promotes only while the function's buffers are ``noalias``, and TVM 0.27's LLVM
    codegen gives every function of a module the ``noalias`` setting of the last one by name: with
    Relax's ``shape_func`` last (a graph with biases, so no ``zeros`` function sorts after it) the
    tile went through memory at every FMA. ``jb``, ``m0``, ``rows`` are let-bound
    for the same reason (assigned, they were 1-element "local" buffers, a workspace each per task)."""
    from tvm.script import tirx as T
    nblk = -(-n // nb)
    ragged = n % nb != 0           # the last panel is partial: its padding columns are not stored
    lo = mr if mr * nb * 4 < STACK_BYTES else (mr + 1) // 2     # rows of the first accumulator
    hi = mr - lo                                                # rows of the second (0: none)

    @T.macro
    def zero(acc, count):
        for r in T.unroll(count):
            for c in T.vectorized(nb):
                acc[r, c] = T.float32(0)

    @T.macro
    def fma(acc, count, x, row, w, jb, kk):
        for r in T.unroll(count):
            for c in T.vectorized(nb):
                acc[r, c] = acc[r, c] + x[row + r, kk] * w[jb, kk, c]

    @T.macro
    def store(acc, count, y, row, b, jb):
        for r in T.unroll(count):
            if ragged:
                for c in range(nb):
                    if jb * nb + c < n:
                        y[row + r, jb * nb + c] = acc[r, c] + b[jb * nb + c]
            else:
                for c in T.vectorized(nb):
                    y[row + r, jb * nb + c] = acc[r, c] + b[jb * nb + c]

    @T.prim_func(private=True)
    def dense(x_h: T.handle, w: T.Buffer((nblk, k, nb), "float32"), b: T.Buffer((n,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        for t in T.parallel(nblk * ((m + mc - 1) // mc)):
            acc = T.alloc_buffer((lo, nb), "float32", scope="global")
            if hi > 0:
                acc_hi = T.alloc_buffer((hi, nb), "float32", scope="global")
            jb: T.let[T.int64] = t % nblk
            m0: T.let[T.int64] = t // nblk * mc
            rows: T.let[T.int64] = T.min(mc, m - m0)
            for mo in range(rows // mr):
                zero(acc, lo)
                if hi > 0:
                    zero(acc_hi, hi)
                for kk in range(k):
                    fma(acc, lo, x, m0 + mo * mr, w, jb, kk)
                    if hi > 0:
                        fma(acc_hi, hi, x, m0 + mo * mr + lo, w, jb, kk)
                store(acc, lo, y, m0 + mo * mr, b, jb)
                if hi > 0:
                    store(acc_hi, hi, y, m0 + mo * mr + lo, b, jb)
            for mt in range(rows % mr):
                zero(acc, 1)
                for kk in range(k):
                    fma(acc, 1, x, m0 + rows // mr * mr + mt, w, jb, kk)
                store(acc, 1, y, m0 + rows // mr * mr + mt, b, jb)
    return dense


def dense_matmul(name: str, n: int, k: int, target, config: dict | None = None) -> Kernel:
    """Kernel for ``y = x @ w.T + bias``, ``w`` float32 ``[n, k]``. Its parameters are
    ``(x, panels, bias, y)``: the panels are made from the stored weight by :func:`pack_panels`
    when a bundle loads, so ``consts`` is empty and the bundle keeps the graph's copy only.
    ``config`` (``mr``, ``vectors``, ``rows_per_task``; see :func:`config_space`) is the schedule,
    :func:`default_config` when None; the panels must be packed with its :func:`panel_width`."""
    if not (isinstance(n, int) and isinstance(k, int) and n > 0 and k > 0):
        raise KernelError(f"{name}: dense_matmul needs a non-empty static [n, k] weight, got [{n}, {k}]")
    lanes = vector_lanes(target)
    mr, nb, mc = _check_config(config or default_config(lanes), lanes)
    return Kernel(name, dense_matmul_func(n, k, mr, nb, mc), [], n, k,
                  notes={"kernel": "dense", "tile": f"{mr}x{nb}", "rows_per_task": mc, "lanes": lanes,
                         "panels": f"{-(-n // nb)}x{k}x{nb}"})


@lru_cache(maxsize=64)
def batch_matmul_func(k: int | None, n: int | None, lanes: int):
    """PrimFunc ``(a [b, m, k], c [b, k, n], y [b, m, n])``; ``k``/``n`` None are symbolic."""
    from tvm import tirx
    from tvm.script import tirx as T
    mr = 4
    # Static k or n (head size) let LLVM unroll and drop tails; the rest are size variables.
    kk_ = tirx.Var("k", "int64") if k is None else k
    nn_ = tirx.Var("n", "int64") if n is None else n

    @T.prim_func(private=True)
    def bmm(a_h: T.handle, c_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        b = T.int64()
        m = T.int64()
        a = T.match_buffer(a_h, (b, m, kk_), "float32")
        c = T.match_buffer(c_h, (b, kk_, nn_), "float32")
        y = T.match_buffer(y_h, (b, m, nn_), "float32")
        for bb in T.parallel(b):
            acc = T.alloc_buffer((mr, lanes), "float32", scope="local")
            one = T.alloc_buffer((1,), "float32", scope="local")
            for mo in range(m // mr):
                for jo in range(nn_ // lanes):
                    for r in T.unroll(mr):
                        for v in T.vectorized(lanes):
                            acc[r, v] = T.float32(0)
                    for q in range(kk_):
                        for r in T.unroll(mr):
                            for v in T.vectorized(lanes):
                                acc[r, v] = acc[r, v] + a[bb, mo * mr + r, q] * c[bb, q, jo * lanes + v]
                    for r in T.unroll(mr):
                        for v in T.vectorized(lanes):
                            y[bb, mo * mr + r, jo * lanes + v] = acc[r, v]
            for i in range(m // mr * mr, m):
                for jo in range(nn_ // lanes):
                    for v in T.vectorized(lanes):
                        acc[0, v] = T.float32(0)
                    for q in range(kk_):
                        for v in T.vectorized(lanes):
                            acc[0, v] = acc[0, v] + a[bb, i, q] * c[bb, q, jo * lanes + v]
                    for v in T.vectorized(lanes):
                        y[bb, i, jo * lanes + v] = acc[0, v]
            for i in range(m):
                for j in range(nn_ // lanes * lanes, nn_):
                    one[0] = T.float32(0)
                    for q in range(kk_):
                        one[0] = one[0] + a[bb, i, q] * c[bb, q, j]
                    y[bb, i, j] = one[0]
    # Static k or n let LLVM unroll and drop the tails: bind them in a copy.
    return bmm


def batch_matmul(name: str, k: int | None, n: int | None, target) -> Kernel:
    """Kernel for a batched product of two activations (no weight: ``consts`` is empty)."""
    lanes = vector_lanes(target)
    return Kernel(name, batch_matmul_func(k, n, lanes), [], n if n is not None else -1,
                  k if k is not None else -1, notes={"kernel": "batch_matmul", "lanes": lanes})


@lru_cache(maxsize=4)
def softmax_func(lanes: int):
    """PrimFunc ``(x [rows, n], n, y [rows, n])``: softmax of each row. Rows run in parallel; each
    is three passes (max, exp and sum, scale) over vectors of the row plus a scalar tail.
    Relax's legalised softmax, once FuseOps merges the attention mask into it, recomputes a
    clamped index per element and ran far slower. ``n`` is passed as a scalar: a call with one
    tensor argument is taken for a reshape by Relax's RewriteDataflowReshape, which then needs
    block-form TIR."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def softmax(x_h: T.handle, n: T.int64, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, n), "float32")
        y = T.match_buffer(y_h, (rows, n), "float32")
        with T.sblock("root"):
            for i in T.parallel(rows):
                vec = T.alloc_buffer((lanes,), "float32", scope="local")
                top = T.alloc_buffer((1,), "float32", scope="local")
                total = T.alloc_buffer((1,), "float32", scope="local")
                for v in T.vectorized(lanes):
                    vec[v] = T.min_value("float32")
                for jo in range(n // lanes):
                    for v in T.vectorized(lanes):
                        vec[v] = T.max(vec[v], x[i, jo * lanes + v])
                top[0] = T.min_value("float32")
                for v in range(lanes):
                    top[0] = T.max(top[0], vec[v])
                for j in range(n // lanes * lanes, n):
                    top[0] = T.max(top[0], x[i, j])
                for v in T.vectorized(lanes):
                    vec[v] = T.float32(0)
                for jo in range(n // lanes):
                    for v in T.vectorized(lanes):
                        y[i, jo * lanes + v] = T.exp(x[i, jo * lanes + v] - top[0])
                        vec[v] = vec[v] + y[i, jo * lanes + v]
                total[0] = T.float32(0)
                for v in range(lanes):
                    total[0] = total[0] + vec[v]
                for j in range(n // lanes * lanes, n):
                    y[i, j] = T.exp(x[i, j] - top[0])
                    total[0] = total[0] + y[i, j]
                total[0] = T.float32(1) / total[0]
                for jo in range(n // lanes):
                    for v in T.vectorized(lanes):
                        y[i, jo * lanes + v] = y[i, jo * lanes + v] * total[0]
                for j in range(n // lanes * lanes, n):
                    y[i, j] = y[i, j] * total[0]
    return softmax


__all__ = ["softmax_func", "dense_matmul", "dense_matmul_func", "batch_matmul", "batch_matmul_func", "vector_lanes"]

"""One linear layer, two kernels, chosen per call on the row count: per-shape dispatch.

A compressed kernel is not faster than the dense GEMM at every shape: an int4 weight-only kernel
wins while ``m`` is small (the layer is bound by reading W) and can lose once the dense kernel's
register tiles are fed by many rows; a block-sparse SpMM at moderate density loses at every size.
:func:`rows_dispatch` joins two kernels of the same ``[m, K] -> [m, N]`` contract into one PrimFunc
that runs one below ``threshold[0]`` rows and the other from there on, and adds the layer's bias
in both (the dense GEMM as it stores, an epilogue after the compressed kernel). The threshold is a
parameter, not a constant, so a runner can force either kernel without recompiling (how the speed
records time "compressed kernels only" on the same library).

    >>> f = rows_dispatch("nf_dispatch_fc1", int4.func, dense.func, compressed_below=True)
    >>> f.params     # (x, threshold [1] int64, *int4 consts, panels, bias, y)
"""
from __future__ import annotations

from functools import lru_cache

from . import KernelError

THRESHOLD_DTYPE = "int64"


def _views(src_x, src_y, func) -> list:
    """Statements declaring ``func``'s x / y buffers and row count as views of ``src_x`` / ``src_y``
    (a spliced body reads its own variables)."""
    from tvm import tirx
    x, y = func.params[0], func.params[-1]
    return [tirx.Bind(x.ty.shape[0], src_x.ty.shape[0]), tirx.DeclBuffer(x, data=src_x), tirx.DeclBuffer(y, data=src_y)]


def _check_same_io(name: str, a, b) -> None:
    from tvm import tirx
    for u, v, what in ((a.params[0], b.params[0], "x"), (a.params[-1], b.params[-1], "y")):
        su, sv = list(u.ty.shape), list(v.ty.shape)
        if len(su) != 2 or len(sv) != 2 or str(u.ty.dtype) != str(v.ty.dtype) or \
                not (isinstance(su[1], tirx.IntImm) and isinstance(sv[1], tirx.IntImm) and int(su[1]) == int(sv[1])):
            raise KernelError(f"{name}: cannot dispatch between kernels whose {what} differ: {su} {u.ty.dtype} "
                              f"and {sv} {v.ty.dtype}")


@lru_cache(maxsize=64)
def bias_epilogue(n: int, lanes: int):
    """PrimFunc ``(y [m, n], b [n])``: ``y += b`` in place, a row per task, vectors across n."""
    from tvm.script import tirx as T
    full = n // lanes * lanes

    @T.prim_func(private=True)
    def epilogue(y_h: T.handle, b: T.Buffer((n,), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        y = T.match_buffer(y_h, (m, n), "float32")
        for i in T.parallel(m):
            for jo in range(full // lanes):
                for v in T.vectorized(lanes):
                    y[i, jo * lanes + v] = y[i, jo * lanes + v] + b[jo * lanes + v]
            for j in range(full, n):
                y[i, j] = y[i, j] + b[j]
    return epilogue


def rows_dispatch(name: str, compressed, dense, compressed_below: bool, lanes: int = 8):
    """The PrimFunc ``(x, threshold, *compressed's weights, panels, bias, y)`` of one linear layer:
    the compressed kernel's body, then ``y += bias``, on one side of ``threshold[0]`` rows (below
    it when ``compressed_below``), the dense GEMM (which adds the bias as it stores) on the other.
    ``dense`` is :func:`.dense.dense_matmul`'s ``(x, panels, bias, y)``; ``compressed`` any kernel
    of the contract of :mod:`.` ``(x, *weights, y)`` with the same K, N. The bias is the
    layer's (zeros for a layer without one), so the lowering adds none after it."""
    from tvm import tirx
    _check_same_io(name, compressed, dense)
    x, y = compressed.params[0], compressed.params[-1]
    n = int(y.ty.shape[1])
    bias = dense.params[-2]
    epi = bias_epilogue(n, lanes)
    ey, eb = epi.params
    compressed_body = tirx.SeqStmt([compressed.body, tirx.Bind(ey.ty.shape[0], x.ty.shape[0]),
                                    tirx.DeclBuffer(ey, data=y), tirx.DeclBuffer(eb, data=bias), epi.body])
    dense_body = tirx.SeqStmt(_views(x, y, dense) + [dense.body])
    threshold = tirx.decl_buffer((1,), THRESHOLD_DTYPE, name="rows_threshold")
    below = x.ty.shape[0] < tirx.BufferLoad(threshold, [tirx.IntImm("int64", 0)])
    body = tirx.IfThenElse(below, compressed_body, dense_body) if compressed_below else \
        tirx.IfThenElse(below, dense_body, compressed_body)
    func = tirx.PrimFunc([x, threshold, *compressed.params[1:-1], *dense.params[1:-1], y], body,
                         attrs=compressed.attrs)
    return func.without_attr("global_symbol")        # the lowering names it


__all__ = ["bias_epilogue", "rows_dispatch", "THRESHOLD_DTYPE"]

"""One linear layer, two kernels, chosen per call on the row count: per-shape dispatch.

A compressed kernel is not faster than the dense GEMM at every shape: an int4 weight-only kernel
wins while ``m`` is small (the layer is bound by reading W) and can lose once the dense kernel's
register tiles are fed by many rows; a block-sparse SpMM at moderate density loses at every size.
:func:`rows_dispatch` joins two kernels of the same ``[m, K] -> [m, N]`` contract into one PrimFunc
that runs ``low`` when ``m < threshold[0]`` and ``high`` otherwise. The threshold is a parameter,
not a constant, so a runner can force either kernel without recompiling (how the speed records
time "compressed kernels only" on the same library).

    >>> f = rows_dispatch("nf_dispatch_fc1", int4.func, dense.func)
    >>> f.params     # (x, *int4 consts, panels, bias, threshold [1] int64, y)
"""
from __future__ import annotations

from . import KernelError

THRESHOLD_DTYPE = "int64"


def rows_dispatch(name: str, low, high):
    """The PrimFunc ``(x, *low's weights, *high's weights, threshold, y)``: ``low``'s body when
    ``x`` has fewer rows than ``threshold[0]``, ``high``'s otherwise. Both must read ``x [m, K]``
    and write ``y [m, N]`` of the same K, N and dtype (the contract of :mod:`.`)."""
    from tvm import tirx
    xa, ya, xb, yb = low.params[0], low.params[-1], high.params[0], high.params[-1]
    for a, b, what in ((xa, xb, "x"), (ya, yb, "y")):
        sa, sb = list(a.ty.shape), list(b.ty.shape)
        if len(sa) != 2 or len(sb) != 2 or str(a.ty.dtype) != str(b.ty.dtype) or \
                not (isinstance(sa[1], tirx.IntImm) and isinstance(sb[1], tirx.IntImm) and int(sa[1]) == int(sb[1])):
            raise KernelError(f"{name}: cannot dispatch between kernels whose {what} differ: {sa} {a.ty.dtype} "
                              f"and {sb} {b.ty.dtype}")
    m_low, m_high = xa.ty.shape[0], xb.ty.shape[0]
    threshold = tirx.decl_buffer((1,), THRESHOLD_DTYPE, name="rows_threshold")
    # high's body reads its own x/y buffer variables and row count: declare them as views of low's
    high_body = tirx.SeqStmt([tirx.Bind(m_high, m_low), tirx.DeclBuffer(xb, data=xa), tirx.DeclBuffer(yb, data=ya),
                              high.body])
    cond = m_low < tirx.BufferLoad(threshold, [tirx.IntImm("int64", 0)])
    body = tirx.IfThenElse(cond, low.body, high_body)
    func = tirx.PrimFunc([xa, *low.params[1:-1], *high.params[1:-1], threshold, ya], body, attrs=low.attrs)
    return func.without_attr("global_symbol")        # the lowering names it


__all__ = ["rows_dispatch", "THRESHOLD_DTYPE"]

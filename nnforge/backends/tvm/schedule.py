"""Default CPU schedules for the loop nests Relax legalisation makes (everything but the kernels).

Relax's CPU pipeline leaves legalised loops as they are: one thread, and vectorised only where
LLVM manages by itself. dlight's CPU rules cover GEMV and softmax/layer-norm shaped reductions;
:class:`Parallel` covers the rest (elementwise ops with the activations fused into them, data
movement, masks, reductions dlight declines): it inlines what can be inlined, then runs each
remaining block's spatial loops in parallel, vectorising the innermost one when its extent is a
static multiple of the vector width. :class:`Guarded` keeps a rule that raises from failing the
build: the block is then left for the next rule (or unscheduled, which is correct, only slower).
:func:`fast_exp` swaps float32 ``exp`` for a polynomial: LLVM turns ``exp`` into one libm call
per element on x86 (no vector math library), which made softmax the slowest op after the GEMMs.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule


class Guarded(ScheduleRule):
    """``rule``, with any exception it raises treated as "does not apply"."""

    def __init__(self, rule: ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except Exception:      # s_tir raises ScheduleError and TVMError subclasses from C++
            return None

    def apply_config(self, func, config):
        return None


def inline(sch, infos: list) -> list:
    """dlight's ``try_inline`` (compute-inline, else reverse-compute-inline, until neither
    applies), except that nothing is reverse-inlined into a reduction block: when normalisation
    has dropped a reduction's unit-extent loops, s_tir accepts it and repeats the epilogue in the
    block's init and its update (a conv1d's bias added twice; found by nnforge.fuzz)."""
    def into_reduction(block_rv) -> bool:
        return any(sch.get(p).init is not None for p in sch.get_producers(block_rv))

    while True:
        done = None
        for reverse, step in ((False, sch.compute_inline), (True, sch.reverse_compute_inline)):
            for i, info in enumerate(infos):
                if reverse and into_reduction(info.block_rv):
                    continue
                try:
                    step(info.block_rv)
                except Exception:      # noqa: BLE001 — s_tir raises ScheduleError from C++: not inlinable
                    continue
                done = i
                break
            if done is not None:
                break
        if done is None:
            return infos
        infos.pop(done)


class Parallel(ScheduleRule):
    """Outer spatial loops of every block in parallel, the innermost vectorised when it is a
    static multiple of the vector width (else left to LLVM's loop vectoriser)."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = inline(sch, infos)
        scheduled = False
        for info in infos:
            block = info.block_rv
            loops = sch.get_loops(block)
            kinds = info.dom_kind()
            if not loops or len(kinds) != len(loops):
                continue
            spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
            others = [lp for lp, k in zip(loops, kinds) if k != "S"]
            if not spatial:
                continue
            sch.reorder(*spatial, *others)
            if others or len(spatial) == 1:
                sch.parallel(sch.fuse(*spatial))
                scheduled = True
                continue
            # The innermost loop stays a loop of its own: fusing it too would cost an integer
            # division per element to recover the indices (a transpose ran far slower).
            sch.parallel(sch.fuse(*spatial[:-1]))
            inner = sch.get(spatial[-1]).extent
            if isinstance(inner, tirx.IntImm) and int(inner) % self.lanes == 0:
                _, vec = sch.split(spatial[-1], factors=[None, self.lanes])
                sch.vectorize(vec)
            scheduled = True
        return sch if scheduled else None

    def apply_config(self, func, config):
        return None


def _fast_exp(x):
    """exp(x) for float32 as topi.fast_exp computes it: 2^n * p(r) with x = n ln2 + r and a
    degree-7 polynomial p (relative error ~3e-7; 0 below -88.4, saturating above 88.4)."""
    def f32(v):
        return tirx.const(v, "float32")
    xc = tirx.max(tirx.min(x, f32(88.3762626647950)), f32(-88.3762626647949))
    n = tirx.floor(xc * f32(1.44269504088896341) + f32(0.5))
    r = xc - n * f32(0.6931471805599453)
    p = f32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + f32(c)
    two_n = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n + f32(127.0)), tirx.const(23, "int32")))
    return tirx.max((p * r * r + r + f32(1.0)) * two_n, x)


def fast_exp():
    """A module pass replacing every float32 ``exp`` call in the module's PrimFuncs."""
    exp = tvm.ir.Op.get("tirx.exp")

    def replace(call):
        if call.op.same_as(exp) and str(call.ty) == "float32":
            return _fast_exp(call.args[0])
        return call

    @tvm.transform.module_pass(opt_level=0, name="NnforgeFastExp")
    def rewrite(mod, _ctx):
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                mod[gv] = tvm_ffi.structural_map(func, [(tvm.ir.Call, replace)])
        return mod
    return rewrite


__all__ = ["Guarded", "Parallel", "fast_exp", "inline"]

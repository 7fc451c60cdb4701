"""Integer W4A8 / W4A4 / W8A8 linear on CPU vectors: per-token int8 activation codes times the 4- or
8-bit code fields of an IntQuant weight, int32 sums per weight group (the Triton backend's
kernels/intact.py, written for LLVM's x86 integer dot instructions).

    y[i, n] = a_scale[i] * sum_g s[n, g] * (sum_{k in g} a[i, k] c[n, k] - z[n, g] sum_{k in g} a[i, k]) + bias[n]

``a`` are the int8 codes (of the int8 or the int4 grid) and ``a_scale`` their float32 row scales,
as the graph's per-token ``dynamic_quant`` computes them (ops_actquant.act_codes); ``c`` are the
weight's stored code fields (``0 .. 2^b - 1``: offset binary for signed codes) and ``z`` its zero
point in that domain (``2^(b-1)`` for signed codes without one), as kernels.lowbit reads them.

Why it is written this way:

- The fields are the unsigned operand and the activations the signed one: x86's byte dot products
  (``vpmaddubsw``, ``vpdpbusd``) take u8 x s8, and the zero term comes out of the integer sum through
  the per-group sums of the activation codes, ``sum a (c - z) = sum a c - z sum a``, one int32
  multiply per output and group. ``|a| <= 128`` and ``|c - z| <= 255`` bound a group to
  ``MAX_GROUP`` columns of exact int32 sums.
- Layout: kernels.lowbit's dot layout (lowbit_layout.dot_layout) over the ``LANES`` int32 lanes of
  a 256-bit vector: a lane holds four columns of one output row (8-bit: one byte each; 4-bit: eight
  columns, low nibbles first), so one 32-byte load feeds eight rows and the four activation codes
  of those columns are one broadcast 32-bit word. Rows in lanes need no horizontal sums, at any m.
- The dot instruction (:func:`dot_instr`): ``vpdpbusd`` with AVX-VNNI or AVX-512 VNNI (VL);
  else, on AVX2, ``vpmaddubsw`` for 4-bit fields (``15 x 128 x 2`` cannot saturate its int16
  pairs; the low and high nibbles' pairs are added in int16, then ``vpmaddwd`` by ones widens
  them to int32) and ``vpmaddwd`` for 8-bit ones (``255 x 128 x 2`` would saturate
  ``vpmaddubsw``): a lane's even and odd bytes are two int16 vectors by a mask and a shift, and
  the activations are widened to int16 once per call in the order ``a0 a2 a1 a3`` of each four
  columns to match. Other CPUs run the same sums in plain int32 vectors (``emulated``).
- Schedule: parallel over blocks of ``LANES`` output rows; activation rows in blocks of
  ``ROW_BLOCK`` (then 2 and 1) share each load and unpack of the codes; one int32 accumulator per
  row and group, then one conversion and one multiply by the group's float32 scales. A prologue,
  parallel over rows, sums the activation codes per group (and widens them for ``vpmaddwd``).
- Act-order is the caller's: it passes the codes with their columns in the weight's stored order
  (a permutation does not change a row's scale).

    >>> kern = int_act_matmul("fc.weight", codes, 4, scale, None, 128, n=3072, k=768,
    ...                       target="llvm -mcpu=native")
    >>> kern.func   # PrimFunc (a int8 [m, k], a_scale [m], codes, scale[, zero_point], bias [n], y)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Kernel, KernelError
from .bsr import llvm_target
from .lowbit import _checked, _runs, layout_problem
from .lowbit_layout import DOT_LANE_CODES, dot_layout, interleave_rows

LANES = 8                   # int32 lanes of the dot: one 256-bit vector
ROW_BLOCK = 4               # activation rows sharing one load and unpack of the codes
MAX_GROUP = 1 << 16         # columns of one exact int32 group sum (module doc)


@dataclass(frozen=True)
class DotInstr:
    """How one 32-byte vector of codes is multiplied into the int32 accumulators."""
    name: str               # for the kernel's notes
    kind: str               # "vnni" | "maddubs" (4-bit fields) | "maddwd" (8-bit fields) | "emulated"


def dot_instr(bits: int, target: str) -> DotInstr:
    """The dot instruction for ``bits``-bit fields on the LLVM target ``target`` (module doc)."""
    f = llvm_target(target).features
    if "avxvnni" in f or {"avx512vnni", "avx512vl"} <= f:
        return DotInstr("vpdpbusd ymm", "vnni")
    if "avx2" in f:
        return DotInstr("vpmaddubsw + vpmaddwd ymm", "maddubs") if bits == 4 else DotInstr("vpmaddwd ymm", "maddwd")
    return DotInstr("int32 multiply-add", "emulated")


@dataclass(frozen=True)
class Plan:
    bits: int
    n: int
    k: int
    group_size: int
    has_zero_point: bool
    dot: DotInstr

    @property
    def step(self) -> int:
        """Columns of one 32-byte load of the codes: 4 (8-bit) or 8 (4-bit)."""
        return DOT_LANE_CODES * 8 // self.bits

    @property
    def groups(self) -> int:
        return -(-self.k // self.group_size)

    @property
    def blocks(self) -> int:
        return -(-self.n // LANES)

    @property
    def implicit_zero(self) -> int:
        return 1 << (self.bits - 1)

    def group_runs(self) -> list[tuple[int, int, int]]:
        """(first group, count, columns each)."""
        return [(first // self.group_size, count, length) for first, count, length in _runs(self.k, self.group_size)]


def act_problem(bits: int, group_size: int, n: int, k: int) -> str | None:
    """Why the kernel cannot take ``bits``-bit codes of an ``[n, k]`` weight in groups of
    ``group_size``, or None (the tvm lowering asks this before it fuses a linear)."""
    why = layout_problem(bits, group_size, n, k)
    if why is not None:
        return why
    step = DOT_LANE_CODES * 8 // bits
    if any(length % step for _, _, length in _runs(k, group_size)):
        return (f"every group of {bits}-bit codes must hold a multiple of {step} columns (one 32-bit lane of the "
                f"dot), got k = {k} in groups of {group_size}")
    if group_size > MAX_GROUP:
        return f"groups of {group_size} columns overflow exact int32 sums (at most {MAX_GROUP})"
    return None


# ---------------------------------------------------------------------------------------------
# The PrimFunc
# ---------------------------------------------------------------------------------------------

def build_func(plan: Plan, name: str):
    """The PrimFunc ``name(a, a_scale, codes, scale[, zero_point], bias, y)`` of ``plan``."""
    from contextlib import contextmanager

    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    from .lowbit import _scheduled_func

    P, V = plan, LANES
    gs, kind = P.group_size, P.dot.kind
    m = tirx.Var("m", "int64")
    a = tirx.decl_buffer((m, P.k), "int8", name="a")
    a_scale = tirx.decl_buffer((m,), "float32", name="a_scale")
    codes = tirx.decl_buffer((P.blocks, P.k // P.step, V * DOT_LANE_CODES), "uint8", name="codes")
    scale = tirx.decl_buffer((P.blocks, P.groups, V), "float32", name="scale")
    zp = tirx.decl_buffer((P.blocks, P.groups, V), "uint8", name="zero_point") if P.has_zero_point else None
    bias = tirx.decl_buffer((P.n,), "float32", name="bias")
    y = tirx.decl_buffer((m, P.n), "float32", name="y")
    vec = tirx.Ramp(0, 1, V)

    def const(value, dtype, lanes=None):
        c = tirx.const(value, dtype)
        return c if lanes is None else tirx.Broadcast(c, lanes)

    def store(buf, value, *idx):
        T.buffer_store(buf, value, list(idx))

    @contextmanager
    def loop(kind_, extent, var_name):
        with kind_(extent) as v:
            IRBuilder.name(var_name, v)
            yield v

    def word(buf, i, col, width):
        """``width`` consecutive elements of row i from column col as one int32, broadcast to every lane."""
        return tirx.Broadcast(tirx.reinterpret("int32", buf[i, tirx.Ramp(col, 1, width)]), V)

    def intrin(ret, name, *args):
        return tirx.call_llvm_pure_intrin(ret, name, *args)

    def vnni(acc, fields, act_word):
        return intrin(f"int32x{V}", "llvm.x86.avx512.vpdpbusd.256", acc,
                      tirx.reinterpret("int8x32", fields), tirx.reinterpret("int8x32", act_word))

    def maddubs(fields, act_word):
        return intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw",
                      tirx.reinterpret("int8x32", fields), tirx.reinterpret("int8x32", act_word))

    def maddwd(x16, act_word):
        return intrin(f"int32x{V}", "llvm.x86.avx2.pmadd.wd", x16, tirx.reinterpret("int16x16", act_word))

    def emulated(fields, i, col):
        """sum_j field(lane, j) * a[i, col + j] over a lane's four columns, in int32 vectors."""
        total = None
        for j in range(DOT_LANE_CODES):
            f = tirx.Cast(f"int32x{V}", tirx.Shuffle([fields], [DOT_LANE_CODES * lane + j for lane in range(V)]))
            t = f * tirx.Broadcast(tirx.Cast("int32", a[i, col + j]), V)
            total = t if total is None else total + t
        return total

    def unpacked(b, q):
        """Step q's fields in row block b, bound once for all rows: [(fields or their 16-bit halves, the
        first activation column they multiply)]."""
        raw = codes[b, q, tirx.Ramp(0, 1, V * DOT_LANE_CODES)]
        if P.bits == 4:
            low = T.Bind(tirx.bitwise_and(raw, const(15, "uint8", 32)))
            high = T.Bind(tirx.shift_right(raw, const(4, "uint8", 32)))
            return [(low, q * 8), (high, q * 8 + 4)]
        if kind == "maddwd":        # a lane's bytes 0 and 2 (columns 0, 2), then 1 and 3
            raw16 = T.Bind(tirx.reinterpret("uint16x16", raw))
            even = tirx.reinterpret("int16x16", tirx.bitwise_and(raw16, const(255, "uint16", 16)))
            odd = tirx.reinterpret("int16x16", tirx.shift_right(raw16, const(8, "uint16", 16)))
            return [(T.Bind(even), q * 4), (T.Bind(odd), q * 4 + 2)]
        return [(T.Bind(raw), q * 4)]

    def dot(acc, parts, i, a16):
        if kind == "vnni":
            for fields, col in parts:
                acc = vnni(acc, fields, word(a, i, col, 4))
            return acc
        if kind == "maddubs":
            pairs = None
            for fields, col in parts:
                p = maddubs(fields, word(a, i, col, 4))
                pairs = p if pairs is None else pairs + p
            return acc + maddwd(pairs, tirx.reinterpret(f"int32x{V}", const(1, "int16", 16)))
        if kind == "maddwd":
            for fields, col in parts:   # a16 holds a0 a2 a1 a3: the even bytes' pair, then the odd ones'
                acc = acc + maddwd(fields, word(a16, i, col, 2))
            return acc
        for fields, col in parts:
            acc = acc + emulated(fields, i, col)
        return acc

    def rows_of_block(b, asum, a16, row0, rows):
        """y[row0:row0+rows, block]: per group, int32 sums of code x field for each row, then the zero
        term, the group's scales, the row scale and the bias."""
        acc = T.alloc_buffer((rows, V), "int32")
        out = T.alloc_buffer((rows, V), "float32")
        IRBuilder.name("acc", acc)
        IRBuilder.name("out", out)
        for r in range(rows):
            store(out, const(0.0, "float32", V), r, vec)
        for g0, count, length in P.group_runs():
            with loop(T.serial, count, "g") as gi:
                g = g0 + gi
                for r in range(rows):
                    store(acc, const(0, "int32", V), r, vec)
                with loop(T.serial, length // P.step, "s") as s:
                    parts = unpacked(b, tirx.floordiv(g * gs, P.step) + s)
                    for r in range(rows):
                        store(acc, dot(acc[r, vec], parts, row0 + r, a16), r, vec)
                z = tirx.Cast(f"int32x{V}", zp[b, g, vec]) if zp is not None else const(P.implicit_zero, "int32", V)
                s_g = scale[b, g, vec]
                for r in range(rows):
                    exact = acc[r, vec] - z * tirx.Broadcast(asum[row0 + r, g], V)
                    store(out, out[r, vec] + tirx.Cast(f"float32x{V}", exact) * s_g, r, vec)
        valid = P.n - (P.blocks - 1) * V

        def stores(width):
            for r in range(rows):
                if width == V:
                    cols = tirx.Ramp(b * V, 1, V)
                    store(y, out[r, vec] * tirx.Broadcast(a_scale[row0 + r], V) + bias[cols], row0 + r, cols)
                else:
                    with loop(T.serial, width, "l") as lane:
                        store(y, out[r, lane] * a_scale[row0 + r] + bias[b * V + lane], row0 + r, b * V + lane)
        if valid == V:
            stores(V)
            return
        with T.If(b < P.blocks - 1):
            with T.Then():
                stores(V)
            with T.Else():
                stores(valid)

    def row_blocks(body):
        """``body(row0, rows)`` over the m rows: blocks of ROW_BLOCK, then the rest as static blocks
        of 2 and 1 (every body has a constant row count: its accumulators stay in registers)."""
        full = tirx.floordiv(m, ROW_BLOCK)
        with loop(T.serial, full, "rb") as rb:
            body(rb * ROW_BLOCK, ROW_BLOCK)
        rest = m - full * ROW_BLOCK
        size = ROW_BLOCK // 2
        while size >= 1:
            with T.If(tirx.bitwise_and(rest, size) != 0):
                with T.Then():
                    body(full * ROW_BLOCK + tirx.bitwise_and(rest, ~(2 * size - 1)), size)
            size //= 2

    def prologue(asum, a16):
        """Per row: the group sums of the codes (the zero term), and for vpmaddwd the codes as int16
        in the order a0 a2 a1 a3 of each four columns."""
        with loop(T.parallel, m, "i") as i:
            for g0, count, length in P.group_runs():
                with loop(T.serial, count, "g") as gi:
                    g = g0 + gi
                    store(asum, const(0, "int32"), i, g)
                    with loop(T.serial, length, "j") as j:
                        store(asum, asum[i, g] + tirx.Cast("int32", a[i, g * gs + j]), i, g)
            if a16 is not None:
                with loop(T.serial, P.k // 4, "q") as q:
                    four = tirx.Cast("int16x4", a[i, tirx.Ramp(q * 4, 1, 4)])
                    store(a16, tirx.Shuffle([four], [0, 2, 1, 3]), i, tirx.Ramp(q * 4, 1, 4))

    with IRBuilder() as ib:
        with _scheduled_func(name, (a, a_scale, codes, scale, zp, bias, y)):
            rows = tirx.max(m, tirx.const(1, "int64"))
            asum = T.alloc_buffer((rows, P.groups), "int32")
            IRBuilder.name("a_group_sum", asum)
            a16 = None
            if kind == "maddwd":
                a16 = T.alloc_buffer((rows, P.k), "int16")
                IRBuilder.name("a16", a16)
            prologue(asum, a16)
            with loop(T.parallel, P.blocks, "b") as b:
                row_blocks(lambda row0, count: rows_of_block(b, asum, a16, row0, count))
    return ib.get()


# ---------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------

def make_plan(bits: int, n: int, k: int, group_size: int, has_zero_point: bool, target: str) -> Plan:
    return Plan(bits, n, k, group_size, has_zero_point, dot_instr(bits, target))


def int_act_matmul(name: str, codes, bits: int, scale, zero_point, group_size: int, n: int, k: int,
                   target: str) -> Kernel:
    """The integer linear (module doc) of an IntQuant weight given as kernels.lowbit takes it
    (``weights.int_args``: stored fields, zero points in their domain or None for offset binary).

    consts: the codes in the dot layout ``[blocks, k / step, 32]``, the scales as float32 and the
    zero points (if any) as uint8, both ``[blocks, groups, 8]`` (rows interleaved); the caller
    passes the bias (zeros for none) after them. Raises KernelError naming ``name`` where
    :func:`act_problem` finds one, or the arrays do not describe the weight.
    """
    why = act_problem(bits, group_size, n, k)
    if why is not None:
        raise KernelError(f"{name}: {why}")
    codes, scale, zero_point = _checked(name, codes, bits, scale, zero_point, group_size, n, k)
    plan = make_plan(bits, n, k, group_size, zero_point is not None, target)
    groups, blocks = plan.groups, plan.blocks
    consts = [dot_layout(codes, bits, k, LANES, blocks),
              interleave_rows(np.broadcast_to(scale.astype(np.float32), (n, groups)), LANES, blocks)]
    if zero_point is not None:
        consts.append(interleave_rows(np.broadcast_to(zero_point.astype(np.uint8), (n, groups)), LANES, blocks))
    func_name = "".join(ch if ch.isalnum() else "_" for ch in f"int{bits}_act_matmul_{name}")
    return Kernel(func_name, build_func(plan, func_name), consts, n, k, notes={
        "kernel": "int_act_matmul", "bits": bits, "group_size": group_size, "zero_point": zero_point is not None,
        "activations": "int8 codes per token", "dot": plan.dot.name, "lanes": LANES,
        "schedule": f"parallel over {blocks} blocks of {LANES} rows, {ROW_BLOCK} activation rows a step, int32 "
                    f"sums per group of {group_size}",
        "const_bytes": int(sum(c.nbytes for c in consts))})


__all__ = ["LANES", "MAX_GROUP", "DotInstr", "Plan", "act_problem", "build_func", "dot_instr", "int_act_matmul",
           "make_plan"]

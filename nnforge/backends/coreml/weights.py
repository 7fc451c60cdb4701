"""Encoded weights as Core ML constexpr ops (iOS 18 opset), and their decoding back to numpy.

CONTRACT (ops.py / __init__.py use these three functions; verify.py uses decode_op):

    mil_name(name: str, used: set[str]) -> str
        A valid MIL identifier ([A-Za-z_][A-Za-z0-9_]*) for ``name``, added to ``used``. Every
        character outside [A-Za-z0-9_] becomes "_"; a name not starting with a letter or "_" gets
        a "_" prefix; coremltools' reserved words and dtype names (fp16, int4, program...) get a
        "_" suffix; a name already in ``used`` gets "_1", "_2"... (first free). Deterministic: the
        same names in the same order give the same result. coremltools' own sanitiser leaves
        these names unchanged, so they survive ``save``.

    emit_weight(enc: Encoding, name: str) -> (var, note: str | None, perm: numpy int32 [cols] | None)
        Inside an active ``mb.program`` / ``Function`` context (iOS18 opset), a const-like MIL var
        (``const`` or a ``constexpr_*`` chain, so linear/conv accept it as weight) holding the
        fp16 weight of ``enc``, shape ``enc.shape``; the last op of the chain is named ``name``
        (a valid MIL identifier: use mil_name). ``note`` says what was mapped, widened or stored
        uncompressed (None when the encoding is kept as it is); the backend reports it.
        ``perm`` is the act-order permutation of IntQuant/MiniFloat (2-D weights only): the var
        then holds the columns in STORED order, ``var[:, j] == W[:, perm[j]]``, and the caller
        must feed the layer ``x[..., perm]`` (``mb.gather(x=x, indices=perm, axis=-1)``), since
        ``x[..., perm] @ var.T == x @ W.T``. None means the var is W itself.
        Exactness: ``var`` decodes to ``enc.decode(torch.float16)`` bit for bit (the IR decode
        computed in fp32 and rounded once to fp16; for Sparse, +0 where the IR gives -0), with the
        columns in stored order when ``perm`` is returned. Encodings Core ML cannot hold exactly
        and compactly (LowRank, unknown kinds, layouts no constexpr grid expresses) become a
        dense fp16 const of that same decode, said in ``note``.

    decode_op(op) -> numpy.ndarray
        The dense value a ``const`` or ``constexpr_*`` op of a (re)loaded pymil program stands
        for, computed in numpy from the op's stored tensors, walking chains (lut_to_dense ->
        blockwise_shift_scale, lut_to_sparse / sparse_blockwise_shift_scale -> sparse_to_dense).
        Products are formed exactly (float64) and rounded once to the output dtype, which is what
        Core ML's reference decode (coremltools' value inference) gives.

Mapping per encoding (a constexpr is chosen only where it decodes exactly; among exact forms the
smallest one is taken, so every choice below is "exact, then compact"):
  Dense       -> const fp16 (fp32/bf16 cast; beyond +-65504 clamped, noted).
  IntQuant    -> constexpr_blockwise_shift_scale (int4/uint4/int8/uint8 data; 2-3 bit codes
                 widened to 4, 5-7 bit to 8; offset = zero point in the code domain) when the
                 scales are fp16 values: then (q - z) * s is exact in fp32, so Core ML's single
                 fp16 rounding equals the IR's. Or constexpr_lut_to_dense with one LUT per scale
                 block holding fp16((k - z) * s) for every code k: exact for ANY scale, and smaller
                 for 3-bit codes with large groups (3 + 256/g bits vs 4 + 16/g). Non-fp16 scales
                 leave only the LUT form (or dense, if the LUTs outweigh fp16).
  MiniFloat   -> formats whose values are int8 multiples of a power of two q (FP4 E2M1, FP6 E2M3)
                 with scales s where s*q is an fp16 value (MX E8M0 in fp16 range, fp16 scales):
                 constexpr_blockwise_shift_scale, int8 data v/q, fp16 scale s*q, blocks along any
                 axis (MX blocks of 32 along K directly): exact, 8 bits + scales. Else per-block
                 LUTs of fp16(value * scale) (exact, any scale); else dense fp16 (e.g. NVFP4, whose
                 fp32 x E4M3 scales are not fp16 values, would need 16 fp16 entries per 16 weights).
                 lut_to_dense -> blockwise_shift_scale is not used: coremltools rewrites that
                 chain into per-block LUTs for iOS18 (canonicalize_quantized_lut_pattern).
  Palettized  -> constexpr_lut_to_dense, LUT [rows/group, 1.., 2^b, 1]; 5/7-bit indices widened
                 to uint6/uint8 (Core ML has no uint5/uint7), LUT padded; fp32 LUT cast to fp16.
  Sparse      -> constexpr_sparse_to_dense (uint1 mask). Kept values IntQuant (N:M, or per-tensor
                 unstructured) -> constexpr_sparse_blockwise_shift_scale; Palettized (N:M, or
                 per-tensor unstructured) -> constexpr_lut_to_sparse; anything else (Dense,
                 MiniFloat, block patterns, row_scale) -> fp16 kept values (decode folds row_scale).
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from nnforge.errors import NnforgeError
from nnforge.ir.encodings import Dense, Encoding, IntQuant, MiniFloat, rows_cols
from nnforge.ir.palette import Palettized
from nnforge.ir.sparse import Sparse

FP16_MAX = 65504.0
# Names coremltools' NameSanitizer would rewrite, plus the sub-byte dtype names of the iOS18 opset.
_RESERVED = {"any", "bool", "program", "func", "tensor", "list", "dict", "tuple", "true", "false", "string",
             "bf16", "fp16", "fp32", "fp64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
             "uint64", "state", "int4", "uint1", "uint2", "uint3", "uint4", "uint6"}
INDEX_BITS = (1, 2, 3, 4, 6, 8)         # Core ML LUT index dtypes (IndicesT of constexpr_lut_to_dense)
SHIFT_SCALE_BITS = (4, 8)               # data widths of constexpr_blockwise_shift_scale (int/uint)


class CoreMLWeightError(NnforgeError, ValueError):
    """A weight or a saved constexpr op that this module cannot map or decode."""


def mil_name(name: str, used: set) -> str:
    """A valid, unused MIL identifier for ``name`` (see the module docstring); adds it to ``used``.

    >>> mil_name("layer.0.weight", set())
    'layer_0_weight'
    """
    base = re.sub(r"[^A-Za-z0-9_]", "_", str(name)) or "_"
    if not re.match(r"[A-Za-z_]", base):
        base = "_" + base
    if base.lower() in _RESERVED:
        base += "_"
    out, i = base, 0
    while out in used:
        i += 1
        out = f"{base}_{i}"
    used.add(out)
    return out


# --- helpers ----------------------------------------------------------------------------------
def _types():
    from coremltools.converters.mil.mil import types
    return types


def _np_dtype(kind: str, bits: int):
    """numpy dtype coremltools reads as ``kind`` (int/uint) of ``bits`` bits, sub-byte included."""
    if bits == 8:
        return np.int8 if kind == "int" else np.uint8
    return getattr(_types(), f"np_{kind}{bits}_dtype")


def _index_bits(bits: int) -> int:
    return next(b for b in INDEX_BITS if b >= bits)


def _fp16_exact(x: torch.Tensor) -> bool:
    x = x.to(torch.float32)
    return bool(torch.isfinite(x).all()) and torch.equal(x.to(torch.float16).to(torch.float32), x)


def _blocks(shape, b: int) -> tuple[int, tuple[int, ...]]:
    """A column block ``b`` (of the 2-D view) as a full-rank Core ML block grid: (block actually
    used, grid shape without the row axis). A block must be a trailing box of the weight's axes;
    when ``b`` is not, the gcd with the last axis is (more scales, still exact)."""
    for cand in (b, math.gcd(b, shape[-1] if len(shape) > 1 else 1)):
        rest, grid = cand, []
        for d in reversed(shape[1:]):
            if rest == 1:
                grid.append(d)
            elif rest % d == 0:
                grid.append(1)
                rest //= d
            elif d % rest == 0:
                grid.append(d // rest)
                rest = 1
            else:
                break
        else:
            return cand, tuple(reversed(grid))
    raise AssertionError("unreachable: a block dividing the last axis always tiles")


def _grid_scales(t: torch.Tensor, group_size: int, cols: int, b: int) -> torch.Tensor:
    """[R, G] per-group values repeated onto [R, cols/b] blocks (b divides group_size)."""
    return t[:, (torch.arange(cols // b) * b) // group_size]


def _mb():
    from coremltools.converters.mil import Builder as mb
    return mb


def _dense(w16: torch.Tensor, name: str):
    return _mb().const(val=w16.numpy(), name=name)


def beyond_fp16(t: torch.Tensor) -> int:
    """How many values of float tensor ``t`` lie beyond the fp16 range (a dense const clamps them)."""
    return int((t.to(torch.float32).abs() > FP16_MAX).sum()) if t.numel() else 0


def _fits(t: torch.Tensor, kind: str, bits: int) -> bool:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if kind == "int" else (0, (1 << bits) - 1)
    return bool(((t >= lo) & (t <= hi)).all())


# --- per-encoding plans: each returns [(bytes, build_fn, note)], exact forms only -----------------
def _lut_plan(enc, name, fields, values16, ib, grid_shape):
    """Indices (uint<ib>) into per-block LUTs ``values16`` [blocks, 2^ib] on ``grid_shape``."""
    n = fields.numel()
    lut = values16.reshape(*grid_shape, 1 << ib, 1).numpy()
    idx = fields.reshape(enc.shape).numpy().astype(_np_dtype("uint", ib))

    def build():
        return _mb().constexpr_lut_to_dense(indices=idx, lut=lut, name=name)
    return (math.ceil(n * ib / 8) + lut.size * 2, build)


def _int_grid(enc: IntQuant):
    """(block along the 2-D view's columns, its Core ML grid, fp32 scales and int64 zero points
    (or None) per row block) of ``enc``'s scale groups."""
    cols = rows_cols(enc.shape)[1]
    b, grid = _blocks(enc.shape, math.gcd(enc.group_size, cols))
    s32 = _grid_scales(enc.scale.to(torch.float32), enc.group_size, cols, b)           # [R, cols/b]
    zp = None if enc.zero_point is None else _grid_scales(enc.zero_point.to(torch.int64), enc.group_size, cols, b)
    return b, grid, s32, zp


def shift_scale_plan(enc: IntQuant, name: str):
    """The constexpr_blockwise_shift_scale plan of ``enc`` (bytes, build, note): its codes as
    int4/uint4/int8/uint8 data (2-3 bit codes widened to 4, 5-7 bit to 8, said in the note), fp16
    block scales, offsets from the zero points; None when the scales are not fp16 values."""
    _, grid, s32, zp = _int_grid(enc)
    if not _fp16_exact(s32):
        return None
    R = enc.scale.shape[0]
    kind, dbits = ("int" if enc.signed else "uint"), (4 if enc.bits <= 4 else 8)
    widened = f"{enc.bits}-bit codes widened to {kind}{dbits}" if dbits != enc.bits else None
    data = enc.int_codes().reshape(enc.shape).numpy().astype(_np_dtype(kind, dbits))
    scale = s32.to(torch.float16).reshape(R, *grid).numpy()
    offset = None
    if zp is not None:
        # Offset in the data's dtype when it fits (compact), else fp16 (integers, exact).
        offset = zp.reshape(R, *grid).numpy().astype(_np_dtype(kind, dbits) if _fits(zp, kind, dbits)
                                                     else np.float16)

    def build():
        kw = {} if offset is None else {"offset": offset}
        return _mb().constexpr_blockwise_shift_scale(data=data, scale=scale, name=name, **kw)
    nbytes = math.ceil(data.size * dbits / 8) + scale.size * 2 + (0 if offset is None else offset.nbytes)
    return nbytes, build, widened


def _int_plans(enc: IntQuant, name: str):
    rows, cols = rows_cols(enc.shape)
    R = enc.scale.shape[0]
    b, grid, s32, zp = _int_grid(enc)
    shift_scale = shift_scale_plan(enc, name)
    plans = [] if shift_scale is None else [shift_scale]
    # Per-block LUT of fp16((k - z) * s), computed with the same fp32 operations as IntQuant.decode.
    ib = _index_bits(enc.bits)
    k = torch.arange(1 << enc.bits)
    codes = (k - (1 << (enc.bits - 1)) if enc.signed else k).to(torch.float32)
    q = codes[None, None, :] - (0 if zp is None else zp.to(torch.float32)[:, :, None])
    vals = torch.zeros(R, cols // b, 1 << ib, dtype=torch.float16)
    vals[:, :, : 1 << enc.bits] = (q * s32[:, :, None]).to(torch.float16)
    fields = enc.int_codes() + ((1 << (enc.bits - 1)) if enc.signed else 0)
    why = "scales are not fp16 values: " if not plans else ""
    plans.append((*_lut_plan(enc, name, fields, vals.reshape(-1, 1 << ib), ib, (R, *grid)),
                  f"{why}{enc.bits}-bit codes as uint{ib} indices into per-block fp16 LUTs of the decoded values"))
    return plans


def _mini_plans(enc: MiniFloat, name: str):
    from nnforge.ir import minifloat
    rows, cols = rows_cols(enc.shape)
    R, bits = enc.scale.shape[0], enc.fmt.bits
    b, grid = _blocks(enc.shape, math.gcd(enc.group_size, cols))
    s32 = _grid_scales(enc.scale_values(torch.float32), enc.group_size, cols, b)
    ib = _index_bits(bits)
    table = torch.zeros(1 << ib, dtype=torch.float32)
    table[: 1 << bits] = minifloat.decode(torch.arange(1 << bits), enc.fmt, torch.float32)
    fields = enc.fields()
    plans = []
    finite = table[: 1 << bits]
    quantum = _grid_quantum(finite)
    if quantum is not None and _fp16_exact(s32 * quantum):
        # Small formats (FP4 E2M1, FP6 E2M3) are integers times a power of two: int8 codes
        # value/quantum with fp16 scales s*quantum give exactly v*s, rounded once like the IR.
        # (lut_to_dense -> blockwise_shift_scale would be smaller, but on iOS18 coremltools'
        # canonicalize_quantized_lut_pattern rewrites it into per-block LUTs: a Core ML issue
        # fixed only in iOS26.)
        data = (finite / quantum).to(torch.int64)[fields].reshape(enc.shape).numpy().astype(np.int8)
        scale = (s32 * quantum).to(torch.float16).reshape(R, *grid).numpy()

        def build():
            return _mb().constexpr_blockwise_shift_scale(data=data, scale=scale, name=name)
        plans.append((data.size + scale.size * 2, build,
                      f"{enc.fmt.short} codes as int8 multiples of {float(quantum):g} with fp16 block scales"))
    vals = (table[None, None, :] * s32[:, :, None]).to(torch.float16)
    why = "scales are not fp16 values: " if not plans else ""
    plans.append((*_lut_plan(enc, name, fields, vals.reshape(-1, 1 << ib), ib, (R, *grid)),
                  f"{why}{enc.fmt.short} codes as uint{ib} indices into per-block fp16 LUTs of value x scale"))
    return plans


def _grid_quantum(values: torch.Tensor):
    """The power of two q such that every value is an int8 multiple of it, or None."""
    if not bool(torch.isfinite(values).all()):
        return None
    for k in range(0, 16):
        q = 2.0 ** -k
        m = values / q
        if bool((m == torch.round(m)).all()):
            return torch.tensor(q) if float(m.abs().max()) <= 127 else None
    return None


def lut_plan(enc: Palettized, name: str):
    """The constexpr_lut_to_dense plan of ``enc`` (bytes, build, note): its indices as uint1..uint8
    (5 and 7 bits widened, said in the note), its LUT per tensor or group in fp16."""
    ib = _index_bits(enc.bits)
    lut = torch.zeros(enc.groups, 1 << ib, dtype=torch.float16)
    lut[:, : 1 << enc.bits] = enc.lut.to(torch.float16)   # decode(fp16) rounds the LUT entry once
    grid = (enc.groups, *([1] * (len(enc.shape) - 1)))
    note = f"{enc.bits}-bit indices widened to uint{ib}" if ib != enc.bits else None
    return (*_lut_plan(enc, name, enc.index_values(), lut, ib, grid), note)


def _pal_plans(enc: Palettized, name: str):
    return [lut_plan(enc, name)]


def _sparse_mask(enc: Sparse):
    """(mask, as uint1, kept positions row-major (Core ML's order), mask bytes) of ``enc``."""
    mask = enc.mask().reshape(enc.shape)
    return (mask, mask.numpy().astype(_types().np_uint1_dtype), mask.reshape(-1).nonzero().squeeze(1),
            math.ceil(mask.numel() / 8))


def kept_fp16_plan(enc: Sparse, name: str):
    """The constexpr_sparse_to_dense plan of ``enc`` with fp16 kept values (bytes, build, note):
    always exact, the decode at the kept positions (row_scale folded in); the note says when the
    kept values were encoded otherwise."""
    _, mask_np, sel, mbytes = _sparse_mask(enc)
    v = enc.values
    nz16 = enc.decode(torch.float16).reshape(-1)[sel].numpy()

    def build():
        return _mb().constexpr_sparse_to_dense(nonzero_data=nz16, mask=mask_np, name=name)
    what = None if isinstance(v, Dense) and enc.row_scale is None else \
        f"kept values ({v.describe()}{', row_scale' if enc.row_scale is not None else ''}) stored as fp16"
    return mbytes + nz16.size * 2, build, what


def _sparse_plans(enc: Sparse, name: str):
    mb = _mb()
    mask, mask_np, sel, mbytes = _sparse_mask(enc)
    v, p = enc.values, enc.pattern
    plain = enc.row_scale is None and getattr(v, "perm", None) is None
    plans = []
    if plain and isinstance(v, (IntQuant, Palettized)) and (p.kind == "nm" or _per_tensor(v)):
        if isinstance(v, IntQuant):
            qd = _scatter_int(v, enc, mask)
            if qd is not None and _fp16_exact(qd.scale):
                plans += _joint_int(qd, mask_np, sel, name, mbytes)
        else:
            ib = _index_bits(v.bits)
            lut = torch.zeros(v.groups, 1 << ib, dtype=torch.float16)
            lut[:, : 1 << v.bits] = v.lut.to(torch.float16)
            lut_np = lut.reshape(v.groups, *([1] * (len(enc.shape) - 1)), 1 << ib, 1).numpy()
            nz_idx = v.index_values().reshape(-1).numpy().astype(_np_dtype("uint", ib))

            def build():
                m, nz = mb.constexpr_lut_to_sparse(indices_mask=mask_np, indices_nonzero_data=nz_idx, lut=lut_np,
                                                   name=name + "_values")
                return mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=m, name=name)
            plans.append((mbytes + math.ceil(nz_idx.size * ib / 8) + lut_np.size * 2, build,
                          f"{p.name} sparse + palettized (uint{ib}) via constexpr_lut_to_sparse"))
    # Always exact: the fp16 decode at the kept positions (row_scale and perm folded by decode).
    plans.append(kept_fp16_plan(enc, name))
    return plans


def _per_tensor(v) -> bool:
    return (isinstance(v, IntQuant) and tuple(v.scale.shape) == (1, 1)) or (isinstance(v, Palettized) and v.groups == 1)


def _scatter_int(v: IntQuant, enc: Sparse, mask: torch.Tensor):
    """The kept IntQuant values as an IntQuant of the full weight (zeros where dropped), with the
    scale groups mapped onto dense columns; None when they do not map onto dense blocks."""
    rows, cols = rows_cols(enc.shape)
    p = enc.pattern
    if p.kind == "nm":
        _, kcols = rows_cols(v.shape)
        g = math.gcd(v.group_size, kcols)
        if g % p.n:
            return None
        dense_g = g * p.m // p.n
        scale = _grid_scales(v.scale, v.group_size, kcols, g)
        zp = None if v.zero_point is None else _grid_scales(v.zero_point, v.group_size, kcols, g)
    else:
        dense_g, scale, zp = cols, v.scale, v.zero_point
    q = torch.zeros(rows * cols, dtype=torch.int64)
    q[mask.reshape(-1)] = v.int_codes().reshape(-1)
    return IntQuant.from_codes(q, scale, bits=v.bits, signed=v.signed, shape=enc.shape, group_size=dense_g,
                               zero_point=zp)


def _joint_int(qd: IntQuant, mask_np, sel, name, mbytes):
    mb = _mb()
    rows, cols = rows_cols(qd.shape)
    kind, dbits = ("int" if qd.signed else "uint"), (4 if qd.bits <= 4 else 8)
    b, grid = _blocks(qd.shape, math.gcd(qd.group_size, cols))
    R = qd.scale.shape[0]
    scale = _grid_scales(qd.scale.to(torch.float16), qd.group_size, cols, b).reshape(R, *grid).numpy()
    nz = qd.int_codes().reshape(-1)[sel].numpy().astype(_np_dtype(kind, dbits))
    offset = None
    if qd.zero_point is not None:
        zp = _grid_scales(qd.zero_point.to(torch.int64), qd.group_size, cols, b)
        offset = zp.reshape(R, *grid).numpy().astype(_np_dtype(kind, dbits) if _fits(zp, kind, dbits) else np.float16)

    def build():
        kw = {} if offset is None else {"offset": offset}
        m, v = mb.constexpr_sparse_blockwise_shift_scale(data_mask=mask_np, nonzero_data=nz, scale=scale,
                                                         name=name + "_values", **kw)
        return mb.constexpr_sparse_to_dense(nonzero_data=v, mask=m, name=name)
    nbytes = mbytes + math.ceil(nz.size * dbits / 8) + scale.size * 2 + (0 if offset is None else offset.nbytes)
    return [(nbytes, build, f"sparse + {kind}{dbits} via constexpr_sparse_blockwise_shift_scale"
             + (f" ({qd.bits}-bit codes widened)" if dbits != qd.bits else ""))]


# --- the contract -----------------------------------------------------------------------------
def emit_weight(enc: Encoding, name: str, gather: bool = True):
    """The fp16 weight of ``enc`` as a const-like MIL var named ``name`` (see the module docstring).
    ``gather``: the layers reading it can take their input with its columns permuted (linear
    layers only); without that, an act-order weight is stored decoded, in column order.

    >>> var, note, perm = emit_weight(IntQuant.quantize(torch.randn(8, 64), 4, group_size=32), "fc_w")
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or ""):
        raise CoreMLWeightError(f"weight name {name!r} is not a MIL identifier; map it with mil_name() first")
    if isinstance(enc, Dense):
        return _emit_dense(enc, name)
    perm = getattr(enc, "perm", None)
    if perm is not None and len(enc.shape) != 2:
        # Only a linear's input can be gathered; other layouts get the decoded (un-permuted) weight.
        return _dense(enc.decode(torch.float16), name), f"act-order {enc.describe()} on a rank-{len(enc.shape)} " \
            "weight stored as dense fp16", None
    if perm is not None and not gather:
        return _dense(enc.decode(torch.float16), name), f"act-order {enc.describe()} stored as dense fp16 in column " \
            "order", None
    rows, cols = rows_cols(enc.shape)
    if len(enc.shape) == 0 or enc.numel == 0:
        return _dense(enc.decode(torch.float16), name), f"{enc.describe()} stored as dense fp16 (empty/scalar)", None
    planner = {IntQuant: _int_plans, MiniFloat: _mini_plans, Palettized: _pal_plans, Sparse: _sparse_plans}.get(type(enc))
    if planner is None:
        return _dense(enc.decode(torch.float16), name), \
            f"{enc.describe()} has no Core ML constexpr form: stored as dense fp16", None
    plans = planner(enc, name)
    nbytes, build, note = min(plans, key=lambda t: t[0])
    if nbytes >= enc.numel * 2:
        # An exact compressed form larger than fp16 itself helps nobody.
        dense = enc.decode(torch.float16)
        if perm is not None:
            dense = dense[:, perm]
        return _dense(dense, name), f"{enc.describe()}: exact Core ML forms are not smaller than fp16 " \
            "(e.g. non-fp16 scales on small groups): stored as dense fp16" + \
            (" in stored column order" if perm is not None else ""), _perm_np(perm)
    return build(), note, _perm_np(perm)


def _perm_np(perm):
    return None if perm is None else perm.to(torch.int32).numpy()


def _emit_dense(enc: Dense, name: str):
    d = enc.data
    if not d.is_floating_point():
        # Integer/boolean constants (indices, masks): Core ML has no int64 const on most paths.
        val = d.numpy().astype(np.int32) if d.dtype == torch.int64 else d.numpy()
        return _mb().const(val=val, name=name), ("int64 constant narrowed to int32" if d.dtype == torch.int64
                                                 else None), None
    f = d.to(torch.float32)
    over = beyond_fp16(f)
    note = None
    if over:
        f = f.clamp(-FP16_MAX, FP16_MAX)
        note = f"{over} value(s) beyond the fp16 range clamped to +-{FP16_MAX:g}"
    return _dense(f.to(torch.float16), name), note, None


# --- decoding saved programs --------------------------------------------------------------------
def _input_val(op, key):
    """Value of input ``key`` of ``op``: its stored tensor, or the decode of the op producing it."""
    var = op.inputs.get(key)
    if var is None:
        return None
    if var.val is not None:
        return np.asarray(var.val)
    src = var.op
    if src is None:
        raise CoreMLWeightError(f"op {op.name} ({op.op_type}): input {key!r} is not a constant")
    out = _decode(src)
    return out[src.outputs.index(var)] if isinstance(out, tuple) else out


def _expand(t: np.ndarray, shape) -> np.ndarray:
    """Repeat each entry of a block grid over its block (Core ML's block rule: shape[i] / t.shape[i])."""
    for axis, (n, m) in enumerate(zip(shape, t.shape)):
        if n % m:
            raise CoreMLWeightError(f"grid of shape {t.shape} does not tile a tensor of shape {tuple(shape)}")
        t = np.repeat(t, n // m, axis=axis)
    return t


def _shift_scale(data, scale, offset):
    x = data.astype(np.float64)
    if offset is not None:
        x = x - _expand(offset.astype(np.float64), data.shape)
    return (x * _expand(scale.astype(np.float64), data.shape)).astype(scale.dtype)


def _lut(indices, lut, vector_axis):
    if lut.shape[-1] != 1:
        raise CoreMLWeightError(f"vector palettisation (vector size {lut.shape[-1]}) is not decoded here")
    table = _expand(lut[..., 0], (*indices.shape, lut.shape[-2]))
    return np.take_along_axis(table, indices.astype(np.int64)[..., None], axis=-1)[..., 0]


def _scatter(nonzero, mask):
    out = np.zeros(mask.shape, dtype=nonzero.dtype)
    out[mask != 0] = nonzero
    return out


def _decode(op):
    t, v = op.op_type, lambda k: _input_val(op, k)
    if t == "const":
        return np.asarray(op.outputs[0].val)
    if t == "constexpr_blockwise_shift_scale":
        return _shift_scale(v("data"), v("scale"), v("offset"))
    if t == "constexpr_lut_to_dense":
        return _lut(v("indices"), v("lut"), v("vector_axis"))
    if t == "constexpr_sparse_to_dense":
        return _scatter(v("nonzero_data"), v("mask"))
    if t == "constexpr_lut_to_sparse":
        mask = v("indices_mask")
        dense = _lut(_scatter(v("indices_nonzero_data"), mask), v("lut"), v("vector_axis"))
        return mask, dense[mask != 0]
    if t == "constexpr_sparse_blockwise_shift_scale":
        mask = v("data_mask")
        dense = _shift_scale(_scatter(v("nonzero_data"), mask), v("scale"), v("offset"))
        return mask, dense[mask != 0]
    raise CoreMLWeightError(f"op {op.name}: cannot decode op type {t!r} (not a const or known iOS18 constexpr)")


def decode_op(op) -> np.ndarray:
    """Dense value of a const / constexpr op (for the sparse ops with two outputs: the kept values)."""
    out = _decode(op)
    return out[1] if isinstance(out, tuple) else out


__all__ = ["CoreMLWeightError", "mil_name", "emit_weight", "decode_op", "beyond_fp16", "shift_scale_plan", "lut_plan",
           "kept_fp16_plan", "FP16_MAX", "INDEX_BITS", "SHIFT_SCALE_BITS"]

"""Integer W4A8 / W4A4 / W8A8 GEMM: per-token int8 (or int4) activation codes times the 4- or 8-bit
weight codes of :mod:`.intweight`'s packed layout on int8 tensor cores, int32 accumulation.

Two launches, as vLLM runs llm-compressor's dynamic per-token schemes (a quantiser, then the
integer GEMM); a graph's dynamic_quant read by several linears is quantised once for all of them:

- :func:`quantize` (``quantize_kernel``, one program per row): the row's amax over K times
  ``clip``, ``scale = max(amax / top, 1e-12)`` (top 127 for int8, 7 for int4), codes
  ``clamp(round(x / scale))`` as int8, scale fp32 [M]. The same float32 operations in the same
  order as ``nnforge.ir.actquant.act_quantize`` for group 0, so codes and scales are bit for bit
  the graph's ``dynamic_quant``.
- :func:`matmul` (``intact_kernel``): ``y = a_scale[m] * sum_g s[g, n] * sum_{k in g} a[m, k] * w[k, n]``
  (+ bias), reading the weight exactly as ``intweight.pack`` laid it out (no second packed file).

    >>> a = quantize(x, bits=8)                         # x [..., K] float: ActCodes
    >>> y = matmul(a, intweight.pack(enc, "h100").to("cuda"), bias)   # [..., N] float16

Why it is written this way:

- Weight codes are offset binary (code + 2^(b-1)), so ``field - 2^(b-1)`` is the signed code,
  which int8 holds for 4 and 8 bits, and is what the tensor cores take. A weight whose effective
  zero is not 2^(b-1) (zero points, or unsigned codes without them) is
  ``(field - z) * s = (signed - (z - 2^(b-1))) * s``; the zero term is taken out of the integer sum
  with the row sums of the activation codes over the group, ``sum a*(q - z') = sum a*q - z' * sum a``,
  as integer GEMMs with asymmetric weights do, so the dot stays int8 x int8 for 8-bit zero points too.
- int32 accumulates one weight group (the whole of K per channel), then one conversion and one
  multiply by the group's fp32 scale per output: the integer sums are exact, only the group sums
  round. |a| <= 128 and |q - z'| <= 255 bound a group to 2^16 columns (``MAX_GROUP``).
- Groups of more than one tile are walked by an unrolled inner loop (``tl.static_range``) inside
  the pipelined loop over groups, so the per-group epilogue is straight-line code, not a branch
  in the software-pipelined loop.
- Rounding is ``(y + 1.5 * 2^23) - 1.5 * 2^23`` after clamping y to the code range: for |y| < 2^22
  that is float32 round-half-to-even, what torch.round does, in plain IEEE adds that the GPU and
  Triton's interpreter both run (libdevice's ``rint`` is an extern call the interpreter cannot run,
  and the interpreter must run the GPU's kernel). Clamping before rounding gives the same codes as
  rounding before clamping, since the bounds are integers. Divisions are ``tl.math.div_rn``
  (IEEE, as torch divides): Triton's ``/`` on fp32 is the GPU's approximate division.
- int4 activations are int8 codes in [-8, 7]: Triton has no int4 tensor-core dot, so W4A4 runs on
  the int8 MMAs (the int4 grid is the graph's accuracy choice; the kernel is W4A8's).
- int8 MMAs take K in steps of 32, so groups must be multiples of 32 (``MIN_BLOCK_K``).
- Split-K at small M, the act-order read of the activation columns through ``perm``, the M-tile-
  fastest CTA order and the deterministic one-launch reduction are intweight's (its
  ``finish_tile`` epilogue and lock workspace); splits hold whole weight groups.
- Tiles: ``[tiles.intact]`` of each GPU architecture file per M bucket, autotuned as intweight's;
  the interpreter always runs ``INTERPRETER_CONFIG``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import KernelError, PackedWeight
from . import intweight as iw
from .common import (INTERP, GpuTarget, TileConfig, autotune, bucket_of, check_bias, check_split_k, gpu_target,
                     runtime_target, tiles_for, tune_key)
from .intweight import finish_tile

ACT_BITS = {"int8": 8, "int4": 4}       # the dynamic_quant formats this module runs (per token)
TINY = tl.constexpr(1e-12)              # act_quantize's smallest scale
MIN_BLOCK_K = 32                        # K of one int8 MMA step (Triton's least dot K for 8-bit operands)
MAX_GROUP = 1 << 16                     # columns one int32 group sum holds (module docstring)
_RNE = tl.constexpr(12582912.0)         # 1.5 * 2^23: adding and subtracting it rounds half to even
QUANT_BLOCK = 1024                      # columns of a row the quantiser loads at a time

INTERPRETER_CONFIG = TileConfig(16, 64, 64, 4, 1)


@dataclass
class ActCodes:
    """A quantised activation: int8 ``codes`` [..., K] and fp32 ``scale`` [...] (one per row),
    ``x ~ codes * scale[..., None]``; ``bits`` of the grid (8, or 4 for int4 codes in [-8, 7])."""
    codes: torch.Tensor
    scale: torch.Tensor
    bits: int


def candidates_for(target, m: int) -> tuple[str, tuple[TileConfig, ...]]:
    """The M bucket and its candidate tiles for ``m`` rows on ``target``, the default first."""
    gpu = gpu_target(target)
    if gpu.interpreter:
        return INTERP, (INTERPRETER_CONFIG,)
    name = bucket_of("intact", m)
    return name, tiles_for(gpu, "intact", name, {})


def config_for(target, m: int) -> TileConfig:
    """The default tile config for ``m`` rows on ``target`` (what runs untuned)."""
    return candidates_for(target, m)[1][0]


def _group_len(groups: int, group_size: int, k: int) -> int:
    return k if groups == 1 else group_size


def _int8_mma(target) -> str | None:
    """Why ``target`` has no int8 tensor-core path (its TOML's formats.native lacks int8), or None."""
    if isinstance(target, GpuTarget) or target == INTERP:
        return None
    from ....targets import TargetError, get_target
    try:
        t = get_target(target)
    except TargetError as e:
        return str(e)
    if "int8" not in t.native_formats:
        return f"target {t.name} lists no int8 tensor cores (formats.native in {t.path})"
    return None


def supports(enc, target, act_format: str = "int8") -> str | None:
    """None when this module runs a linear with weight ``enc`` (an IntQuant that intweight packs)
    behind a per-token ``act_format`` dynamic_quant on ``target``; else why not."""
    if act_format not in ACT_BITS:
        return f"{act_format} activations (intact runs per-token {' and '.join(ACT_BITS)})"
    why = iw.supports(enc, target) or _int8_mma(target)
    if why is not None:
        return why
    k = enc.shape[1]
    length = _group_len(enc.scale.shape[1], enc.group_size, k)
    if enc.scale.shape[1] > 1 and length % MIN_BLOCK_K:
        return f"group_size {length} (int8 tensor cores take groups of a multiple of {MIN_BLOCK_K})"
    if length > MAX_GROUP:
        return f"a group of {length} columns (an int32 group sum holds at most {MAX_GROUP})"
    return None


# --------------------------------------------------------------------------------------------------
# The kernels.

@triton.jit
def quantize_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, clip, TOP: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * K
    peak = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        peak = tl.maximum(peak, tl.abs(x))
    # act_quantize: amax * clip, then / top, then at least TINY, each a float32 operation
    amax = tl.max(peak, axis=0) * clip
    scale = tl.maximum(tl.math.div_rn(amax, TOP * 1.0), TINY)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -TOP - 1.0), TOP * 1.0)
        code = (y + _RNE) - _RNE
        tl.store(q_row + offs, code.to(tl.int8), mask=offs < K)


@triton.jit
def _tile_mac(acc_i, sums, t, a_ptr, q_ptr, perm_ptr, offs_m, m_ok, offs_n, q_cols, K, KW, NP,
              BITS: tl.constexpr, HAS_PERM: tl.constexpr, ROW_SUMS: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, PANEL_N: tl.constexpr):
    """``acc_i + a[:, tile t] @ w[tile t, :]`` in int32, and ``sums`` plus the tile's row sums of
    the activation codes (when ROW_SUMS)."""
    PER_WORD: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // PER_WORD
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    if HAS_PERM:
        cols = tl.load(perm_ptr + offs_k, mask=k_ok, other=0)
    else:
        cols = offs_k
    a = tl.load(a_ptr + offs_m[:, None] * K + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
    # Word (i, c) of panel p sits at (p * KW + i) * PANEL_N + c (intweight's layout).
    offs_w = t * BKW + tl.arange(0, BKW)
    words = tl.load(q_ptr + offs_w[:, None] * PANEL_N + q_cols[None, :],
                    mask=(offs_w < KW)[:, None] & (offs_n < NP)[None, :], other=0)
    shifts = tl.arange(0, PER_WORD) * BITS
    fields = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    # offset binary -> the signed code; rows past K (padding) meet zero activation codes
    w = tl.reshape((fields - (1 << (BITS - 1))).to(tl.int8), (BLOCK_K, BLOCK_N))
    acc_i = tl.dot(a, w, acc_i)
    if ROW_SUMS:
        sums += tl.sum(a.to(tl.int32), axis=1)
    return acc_i, sums


@triton.jit
def _add_group(acc, acc_i, sums, g, s_ptr, z_ptr, offs_n, n_ok, N, BITS: tl.constexpr, ZERO_CONST: tl.constexpr,
               HAS_ZERO: tl.constexpr, ROW_SUMS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``acc`` plus group ``g``'s int32 sums, less the zero term, times its fp32 scale row."""
    if ROW_SUMS:
        if HAS_ZERO:
            z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.int32) - (1 << (BITS - 1))
        else:
            z = tl.full((BLOCK_N,), ZERO_CONST - (1 << (BITS - 1)), tl.int32)
        acc_i -= sums[:, None] * z[None, :]
    s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    return acc + acc_i.to(tl.float32) * s[None, :]


@triton.jit
def intact_kernel(a_ptr, as_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr,
                  M, N, K, KW, NP, units_per_split,
                  BITS: tl.constexpr, GROUP: tl.constexpr, ZERO_CONST: tl.constexpr, HAS_ZERO: tl.constexpr,
                  ROW_SUMS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PANEL_N: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    q_cols = (offs_n // PANEL_N) * KW * PANEL_N + offs_n % PANEL_N

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if GROUP == 0:
        # one group (per channel or tensor): this split's K tiles summed in int32, scaled once
        t0 = pid_k * units_per_split
        t1 = tl.minimum(t0 + units_per_split, (K + BLOCK_K - 1) // BLOCK_K)
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        sums = tl.zeros((BLOCK_M,), tl.int32)
        for t in range(t0, t1):
            acc_i, sums = _tile_mac(acc_i, sums, t, a_ptr, q_ptr, perm_ptr, offs_m, m_ok, offs_n, q_cols, K, KW, NP,
                                    BITS, HAS_PERM, ROW_SUMS, BLOCK_N, BLOCK_K, PANEL_N)
        acc = _add_group(acc, acc_i, sums, 0, s_ptr, z_ptr, offs_n, n_ok, N, BITS, ZERO_CONST, HAS_ZERO, ROW_SUMS,
                         BLOCK_N)
    else:
        # this split's weight groups, each its GROUP // BLOCK_K tiles unrolled
        tl.static_assert(GROUP % BLOCK_K == 0, "a K tile must lie inside one weight group")
        TILES: tl.constexpr = GROUP // BLOCK_K
        g0 = pid_k * units_per_split
        g1 = tl.minimum(g0 + units_per_split, K // GROUP)
        for g in range(g0, g1):
            acc_i = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
            sums = tl.zeros((BLOCK_M,), tl.int32)
            for j in tl.static_range(TILES):
                acc_i, sums = _tile_mac(acc_i, sums, g * TILES + j, a_ptr, q_ptr, perm_ptr, offs_m, m_ok, offs_n,
                                        q_cols, K, KW, NP, BITS, HAS_PERM, ROW_SUMS, BLOCK_N, BLOCK_K, PANEL_N)
            acc = _add_group(acc, acc_i, sums, g, s_ptr, z_ptr, offs_n, n_ok, N, BITS, ZERO_CONST, HAS_ZERO,
                             ROW_SUMS, BLOCK_N)
    acc = acc * tl.load(as_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    finish_tile(acc, y_ptr, part_ptr, lock_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, M, N, pid, pid_k,
                HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


# --------------------------------------------------------------------------------------------------
# Host side.

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quantize(x: torch.Tensor, bits: int = 8, clip: float = 1.0) -> ActCodes:
    """x [..., K] (fp32, fp16 or bf16) as per-row ``bits``-bit codes and fp32 scales, bit for bit
    ``act_quantize(x, "int8" or "int4", 0, clip)`` (which is ``codes * scale``).

    >>> a = quantize(x, 4, clip=0.9); torch.equal(a.codes * a.scale[..., None], act_quantize(x, "int4", 0, 0.9))
    True"""
    if bits not in (4, 8):
        raise KernelError(f"intact quantises to 8- or 4-bit codes, not {bits}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] < 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelError(f"x must be a [..., K] tensor with K >= 1, got {got}")
    if x.dtype not in X_DTYPES:
        raise KernelError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not 0 < clip <= 1:
        raise KernelError(f"clip must be in (0, 1], got {clip}")
    runtime_target(x)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        quantize_kernel[(m,)](x2, codes, scale, k, x2.stride(0), float(clip), TOP=(1 << (bits - 1)) - 1,
                              BLOCK_K=min(QUANT_BLOCK, triton.next_power_of_2(k)), num_warps=4)
    return ActCodes(codes.reshape(x.shape), scale.reshape(x.shape[:-1]), bits)


def _block_k(cfg: TileConfig, k: int, group: int) -> int:
    """The config's BLOCK_K, shrunk for a short K (not below one int8 MMA step), and dividing the
    group (groups are multiples of MIN_BLOCK_K)."""
    bk = min(cfg.block_k, max(MIN_BLOCK_K, triton.next_power_of_2(k)))
    return math.gcd(bk, group) if group else bk


def _check(a, w, bias, out_dtype) -> None:
    if not isinstance(a, ActCodes):
        raise KernelError(f"a must be ActCodes (intact.quantize(x)), got {type(a).__name__}")
    iw.check_packed(w)
    codes, scale = a.codes, a.scale
    if codes.dtype != torch.int8 or codes.dim() < 1 or codes.shape[-1] != w.k:
        raise KernelError(f"activation codes must be int8 [..., {w.k}] for a [{w.n}, {w.k}] weight, got "
                          f"{codes.dtype} {tuple(codes.shape)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != tuple(codes.shape[:-1]):
        raise KernelError(f"activation scales must be float32 {tuple(codes.shape[:-1])}, got {scale.dtype} "
                          f"{tuple(scale.shape)}")
    if a.bits not in (4, 8):
        raise KernelError(f"activation codes of {a.bits} bits (intact runs 8 and 4)")
    if out_dtype not in OUT_DTYPES:
        raise KernelError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    groups, size = w.meta["groups"], w.meta["group_size"]
    length = _group_len(groups, size, w.k)
    if (groups > 1 and length % MIN_BLOCK_K) or length > MAX_GROUP:
        raise KernelError(f"weight groups of {length} columns: intact needs a multiple of {MIN_BLOCK_K} up to "
                          f"{MAX_GROUP}; run the weight through intweight.matmul")
    check_bias(bias, w.n)
    for name, t in [("scale", scale), ("bias", bias), *w.tensors.items()]:
        if t is not None and t.device != codes.device:
            raise KernelError(f"the activation codes are on {codes.device} but {name} is on {t.device}")


def matmul(a: ActCodes, w: PackedWeight, bias: torch.Tensor | None = None, *,
           out_dtype: torch.dtype = torch.float16, split_k: int | None = None) -> torch.Tensor:
    """y[..., N] = (a.codes * a.scale) @ W.T (+ bias) in ``out_dtype``, W intweight's packed
    weight (its decoded IntQuant). ``split_k`` overrides the split-K heuristic (1 turns it off).

    >>> y = matmul(quantize(x, 8), intweight.pack(enc, "h100").to("cuda"), bias)"""
    _check(a, w, bias, out_dtype)
    check_split_k(split_k)
    lead = tuple(a.codes.shape[:-1])
    codes, scale = a.codes.reshape(-1, w.k).contiguous(), a.scale.reshape(-1).contiguous()
    m, n = codes.shape[0], w.n
    if m == 0 or n == 0:
        y = torch.zeros(m, n, dtype=out_dtype, device=codes.device)
        return (y if bias is None else y + bias.to(out_dtype)).reshape(*lead, n)
    gpu = runtime_target(codes)
    name, cands = candidates_for(gpu, m)
    key = tune_key(name, m, out_dtype, w, bias is not None, split_k)
    cfg = autotune("intact", gpu.name, key, cands, lambda c: _launch(codes, scale, w, bias, c, split_k, gpu, out_dtype),
                   reset=lambda: iw._locks(codes.device, 0).zero_())
    return _launch(codes, scale, w, bias, cfg, split_k, gpu, out_dtype).reshape(*lead, n)


def _launch(codes, scale, w: PackedWeight, bias, cfg: TileConfig, split_k: int | None, target,
            out_dtype) -> torch.Tensor:
    """One launch under ``cfg`` into fresh outputs (what an autotuning trial runs)."""
    gpu = gpu_target(target)
    m, n, k = codes.shape[0], w.n, w.k
    meta = w.meta
    group = 0 if meta["groups"] == 1 else meta["group_size"]
    bk = _block_k(cfg, k, group)
    k_tiles = -(-k // bk)
    units = k // group if group else k_tiles          # what a split holds whole: weight groups, or K tiles
    tiles_mn = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    split = iw._split_k(tiles_mn, k_tiles, m, gpu.sms) if split_k is None else split_k
    per_split = -(-units // min(split, units))
    split = -(-units // per_split)                    # no empty splits
    y = torch.empty(m, n, dtype=out_dtype, device=codes.device)
    q, s = w.tensors["qweight"], w.tensors["scale"]
    zero, perm = w.tensors.get("zero", s), w.tensors.get("perm", q)
    part = torch.empty(split, m, n, dtype=torch.float32, device=codes.device) if split > 1 else y
    locks = iw._locks(codes.device, tiles_mn) if split > 1 else q
    zc = meta["zero_const"]
    intact_kernel[(tiles_mn, split)](
        codes, scale, q, s, zero, perm, bias if bias is not None else s, y, part, locks,
        m, n, k, q.shape[1], q.shape[0] * iw.PANEL, per_split,
        BITS=meta["bits"], GROUP=group, ZERO_CONST=zc or 0, HAS_ZERO=zc is None,
        ROW_SUMS=zc is None or zc != 1 << (meta["bits"] - 1), HAS_PERM=bool(meta["act_order"]),
        HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk,
        PANEL_N=iw.PANEL, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def compile_spec(cfg: TileConfig, *, bits: int = 4, group: int = 128, out: str = "fp16", split_k: int = 1,
                 has_zero: bool = False, has_perm: bool = False, has_bias: bool = True):
    """``(kernel, signature, constexprs)`` of the GEMM for ``kernels.compile_for``:

    >>> compile_for(*compile_spec(config_for("h100", 4)), 90, num_warps=4, num_stages=4)"""
    sig = {"a_ptr": "*i8", "as_ptr": "*fp32", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
           "perm_ptr": "*i32", "bias_ptr": f"*{out}", "y_ptr": f"*{out}", "part_ptr": "*fp32", "lock_ptr": "*i32",
           "M": "i32", "N": "i32", "K": "i32", "KW": "i32", "NP": "i32", "units_per_split": "i32"}
    consts = {"BITS": bits, "GROUP": group, "ZERO_CONST": 0 if has_zero else 1 << (bits - 1), "HAS_ZERO": has_zero,
              "ROW_SUMS": has_zero, "HAS_PERM": has_perm, "HAS_BIAS": has_bias, "SPLIT_K": split_k,
              "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": _block_k(cfg, 1 << 16, group),
              "PANEL_N": iw.PANEL}
    sig.update({name: "constexpr" for name in consts})
    return intact_kernel, sig, consts


def quantize_compile_spec(*, bits: int = 8, x: str = "fp32", block_k: int = QUANT_BLOCK):
    """``(kernel, signature, constexprs)`` of the quantiser for ``kernels.compile_for``."""
    sig = {"x_ptr": f"*{x}", "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32", "stride_xm": "i32", "clip": "fp32"}
    consts = {"TOP": (1 << (bits - 1)) - 1, "BLOCK_K": block_k}
    sig.update({name: "constexpr" for name in consts})
    return quantize_kernel, sig, consts


__all__ = ["ACT_BITS", "ActCodes", "INTERPRETER_CONFIG", "MIN_BLOCK_K", "MAX_GROUP", "candidates_for", "config_for",
           "supports", "quantize", "matmul", "compile_spec", "quantize_compile_spec"]

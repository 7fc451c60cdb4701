"""Minifloat-weight GEMM: y = x @ W.T with W stored as ExMy codes (FP8 E4M3/E5M2, FP6 E3M2/E2M3,
FP4 E2M1) and float, E8M0 (MX) or E4M3 (NVFP4) scales, decoded in registers; fp32 accumulation.

Layout the kernel streams (``pack``): the codes stay the IR's little-endian bit stream when the
width divides 8 (FP8: one byte per code, FP4: two codes per byte, low nibble first), so packing
is free. Widths that straddle bytes are split into planes whose widths divide 8, as FP6-LLM does:
FP6 becomes a 4-bit plane (code bits 0..3) and a 2-bit plane (bits 4..5), 0.75 byte per code as
before (at most one byte more per row when K is not a multiple of 4). Scales stay as stored: float
scales, or the uint8 E8M0/E4M3 codes, decoded in-kernel; NVFP4's fp32 global scale is one scalar.

    W row n = [0x3c, 0x2a, ...] (e2m1 codes 0xc, 0x3, 0xa, 0x2, ...)  ->  p0[n] = codes[n]
    e3m2 codes [0b101101, ...]  ->  p0 = 4-bit stream of [0b1101, ...], p1 = 2-bit stream of [0b10, ...]
    >>> pw = pack(enc, "h100"); y = matmul(x, pw, bias)

Why this shape: at M <= 16 a linear layer is a stream of its weight bytes, so the kernel's job is
to read every byte once, at full bandwidth, and hide the decode behind the loads. Codes are read as
contiguous byte rows of a [BLOCK_N, BLOCK_K] tile (vector loads), unpacked by shifts, decoded to
fp16 by placing the exponent/mantissa bits in an fp16 pattern and multiplying by 2^(15 - bias)
(exact, subnormals included; E4M3's NaN code re-inserted), then scaled and fed to tl.dot. On a
GPU with fp8 tensor cores (its architecture file's ``fp8_tensor_cores``) FP8 codes convert
natively (``cvt.rn.f16x2.e4m3x2``); without them Triton has no fp8 type and the bit decode runs.
Per-channel scales and the global scale multiply the accumulator once, not every weight. Small M
splits K across programs (``split_k``) so a thin GEMM still fills all SMs; partials meet in an
fp32 buffer by atomic add (order-dependent in the last bits on a GPU).

The fp8-activation path (``matmul_fp8act``) is for graphs whose activations are quantised to E4M3
with a static per-tensor scale (the fp8-w8a8 preset): tl.dot on float8e4nv operands, which Triton
lowers to e4m3 tensor-core instructions (mma on sm_89, wgmma on sm_90 for tiles of 64+ rows) and
refuses without fp8 tensor cores.

Tiles are autotuned per GPU: its architecture file (nnforge/targets/gpu/) lists, per M bucket,
the candidates of ``[tiles.minifloat]`` and ``[tiles.fp8act]`` with the hand-picked default first;
under the interpreter ``INTERP_TILES`` run. On a GPU :func:`.common.autotune` times them
once per shape on the real operands and keeps the fastest (every trial allocates its own zeroed
split-K output, so the atomics of one trial never add onto another's); the interpreter always runs
the default.
"""
from __future__ import annotations

import torch

from ....ir.encodings import MiniFloat, rows_cols
from . import KernelError, PackedWeight
from .common import (SMALL_M, TileConfig, autotune, bucket_of, check_bias, check_operands, check_weight,
                     gpu_target, runtime_target, split_launch, tiles_for, tune_key, unsupported)

try:
    import triton
    import triton.language as tl
except ImportError:                     # the module still imports; supports() then says why not
    triton = None

FORMAT = "minifloat"
# (exponent bits, mantissa bits, bias) of the element formats the fp16 bit decode covers exactly.
ELEMENTS = {"e4m3": (4, 3, 7), "e5m2": (5, 2, 15), "e3m2": (3, 2, 3), "e2m3": (2, 3, 1), "e2m1": (2, 1, 1)}
SCALE_FORMATS = {"float32": 0, "float16": 0, "bfloat16": 0, "e8m0": 1, "e4m3": 2}

# The interpreter's tiles per M bucket (both paths): small, so the tests stay fast. A GPU's come
# from its architecture file.
INTERP_TILES = {"decode": (TileConfig(16, 32, 64, 1, 1),), "gemm": (TileConfig(32, 32, 64, 1, 1),)}


# --- shared with lut.py: bit planes --------------------------------------------------------------
def plane_widths(bits: int) -> tuple[int, ...]:
    """Widths (each dividing 8) a ``bits``-bit code is split into, low bits first."""
    if 8 % bits == 0:
        return (bits,)
    widths, left = [], bits
    for w in (4, 2, 1):
        if left >= w:
            widths.append(w)
            left -= w
    return tuple(widths)


def split_planes(fields: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """uint8 bit streams, one per plane of :func:`plane_widths`, of int fields [rows, cols]."""
    from ....ir import packing
    out, shift = [], 0
    for w in plane_widths(bits):
        out.append(packing.pack_bits((fields >> shift) & ((1 << w) - 1), w))
        shift += w
    return out


if triton is not None:
    from .common import mma, store_tile

    @triton.jit
    def unpack_plane(ptr, stride, offs_n, mask_n, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BITS: tl.constexpr):
        """int32 [BLOCK_N, BLOCK_K] fields of a BITS-bit stream (BITS divides 8) for columns
        k0.. of rows offs_n: one contiguous byte row per weight row, then shifts."""
        PER: tl.constexpr = 8 // BITS
        ob = k0 // PER + tl.arange(0, BLOCK_K // PER)
        ptrs = ptr + offs_n.to(tl.int64)[:, None] * stride + ob[None, :]
        b = tl.load(ptrs, mask=mask_n[:, None] & (ob[None, :] < stride), other=0).to(tl.int32)
        if PER == 1:
            return b
        sh = tl.arange(0, PER) * BITS
        f = (b[:, :, None] >> sh[None, None, :]) & ((1 << BITS) - 1)
        return tl.reshape(f, (BLOCK_N, BLOCK_K))

    @triton.jit
    def load_codes(p0, p1, s0, s1, offs_n, mask_n, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   B0: tl.constexpr, B1: tl.constexpr):
        c = unpack_plane(p0, s0, offs_n, mask_n, k0, BLOCK_N, BLOCK_K, B0)
        if B1 > 0:
            c = c | (unpack_plane(p1, s1, offs_n, mask_n, k0, BLOCK_N, BLOCK_K, B1) << B0)
        return c

    @triton.jit
    def _to_f16(c, E: tl.constexpr, MB: tl.constexpr, BIAS: tl.constexpr):
        """Exact fp16 value of ExMy codes (int32): the magnitude bits placed under fp16's exponent
        field read as 2^(15 - BIAS) too small, subnormals included, so one multiply fixes it."""
        SIGN: tl.constexpr = 1 << (E + MB)
        mag = c & (SIGN - 1)
        bits = (mag << (10 - MB)) | ((c & SIGN) << (15 - E - MB))
        v = bits.to(tl.int16).to(tl.float16, bitcast=True) * (2.0 ** (15 - BIAS))
        if E == 4:                      # E4M3 (OCP "fn"): no infinities, S.1111.111 is NaN
            v = tl.where(mag == 0x7F, float("nan"), v)
        return v.to(tl.float16)

    @triton.jit
    def _scale(s, SCALE_FMT: tl.constexpr):
        """fp32 value of loaded scales: floats, E8M0 codes (2^(c-127)) or E4M3 codes."""
        if SCALE_FMT == 0:
            return s.to(tl.float32)
        elif SCALE_FMT == 1:
            c = s.to(tl.int32)
            v = (c << 23).to(tl.float32, bitcast=True)
            v = tl.where(c == 0, 5.877471754111438e-39, v)       # 2^-127 is an fp32 subnormal
            return tl.where(c == 255, float("nan"), v)
        else:
            return _to_f16(s.to(tl.int32), 4, 3, 7).to(tl.float32)

    @triton.jit
    def _minifloat_kernel(x_ptr, p0_ptr, p1_ptr, s_ptr, g_ptr, perm_ptr, bias_ptr, y_ptr,
                          M, N, K, stride_xm, stride_p0, stride_p1, stride_sr, stride_sg, stride_ym, k_split,
                          E: tl.constexpr, MB: tl.constexpr, BIAS: tl.constexpr, B0: tl.constexpr,
                          B1: tl.constexpr, GROUP: tl.constexpr, SCALE_FMT: tl.constexpr,
                          SCALE_MODE: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_PERM: tl.constexpr,
                          HAS_BIAS: tl.constexpr, NATIVE_FP8: tl.constexpr, SPLIT: tl.constexpr,
                          BF16_IN_FP32: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        dt = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * k_split
        k_hi = tl.minimum(K, k_lo + k_split)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0) if HAS_PERM else offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            c = load_codes(p0_ptr, p1_ptr, stride_p0, stride_p1, offs_n, mask_n, k0, BLOCK_N, BLOCK_K, B0, B1)
            if NATIVE_FP8:
                w = c.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
            else:
                w = _to_f16(c, E, MB, BIAS)
            srow = s_ptr + offs_n[:, None] * stride_sr
            if SCALE_MODE == 1:          # a group spans whole K steps: one scale per row
                s = _scale(tl.load(srow + (k0 // GROUP) * stride_sg, mask=mask_n[:, None], other=0), SCALE_FMT)
                w = w.to(tl.float32) * s
            elif SCALE_MODE == 2:        # BLOCK_K // GROUP blocks per step (MX, NVFP4)
                NG: tl.constexpr = BLOCK_K // GROUP
                g = k0 // GROUP + tl.arange(0, NG)
                s = _scale(tl.load(srow + g[None, :] * stride_sg, mask=mask_n[:, None] & (g[None, :] * GROUP < K),
                                   other=0), SCALE_FMT)
                w = tl.reshape(tl.reshape(w.to(tl.float32), (BLOCK_N, NG, GROUP)) * s[:, :, None],
                               (BLOCK_N, BLOCK_K))
            elif SCALE_MODE == 3:        # group sizes that fit neither way: one scale per element
                s = _scale(tl.load(srow + (offs_k // GROUP)[None, :] * stride_sg,
                                   mask=mask_n[:, None] & mask_k[None, :], other=0), SCALE_FMT)
                w = w.to(tl.float32) * s
            acc = mma(x, tl.trans(w.to(dt)), acc, BF16_IN_FP32)
        if SCALE_MODE == 0:              # per channel / per tensor: scale the sums, not the weights
            acc = acc * _scale(tl.load(s_ptr + offs_n * stride_sr, mask=mask_n, other=0), SCALE_FMT)[None, :]
        if HAS_GLOBAL:
            acc = acc * tl.load(g_ptr)
        store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, N, pid_k, HAS_BIAS, SPLIT)

    @triton.jit
    def _fp8act_kernel(x_ptr, w_ptr, s_ptr, perm_ptr, bias_ptr, y_ptr, x_scale,
                       M, N, K, stride_xm, stride_w, stride_sr, stride_ym,
                       HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0) if HAS_PERM else offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            c = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_w + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0)
            acc = tl.dot(x, tl.trans(c.to(tl.float8e4nv, bitcast=True)), acc)
        s = tl.load(s_ptr + offs_n * stride_sr, mask=mask_n, other=0).to(tl.float32)
        acc = acc * (s * x_scale)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


# --- the contract --------------------------------------------------------------------------------
def supports(enc, target, *, activations: str | None = None) -> str | None:
    """None when ``enc`` runs on ``target`` (a Triton GPU target or its name); otherwise why not.
    ``activations="e4m3"`` asks about the fp8 x fp8 tensor-core path (:func:`matmul_fp8act`),
    which needs fp8 tensor cores (``fp8_tensor_cores`` in the target's architecture file).

    >>> supports(enc, "a100", activations="e4m3")
    'fp8 x fp8 tensor-core dot (e4m3 activations) needs fp8 tensor cores, which a100 (sm_80, ...) lacks ...'"""
    why = unsupported(enc, target, MiniFloat, FORMAT)
    if why is not None:
        return why
    fmt, sf = enc.fmt.short, enc.scale_format.short if enc.scale_format.kind == "minifloat" else enc.scale_format.name
    if fmt not in ELEMENTS:
        return f"element format {enc.fmt.name} has no in-register decode (supported: {', '.join(ELEMENTS)})"
    if sf not in SCALE_FORMATS:
        return f"scale format {enc.scale_format.name} is not decoded in-kernel (supported: {', '.join(SCALE_FORMATS)})"
    if activations is None:
        return None
    if activations != "e4m3":
        return f"activation format {activations!r} has no minifloat kernel (only e4m3 activations)"
    gpu = gpu_target(target)
    if not gpu.native_fp8:
        return (f"fp8 x fp8 tensor-core dot (e4m3 activations) needs fp8 tensor cores, which {gpu.describe()} "
                f"lacks (they come with {_fp8_archs()}): run the weight-only path instead")
    if fmt != "e4m3" or enc.scale.shape[1] != 1 or SCALE_FORMATS[sf] != 0 or enc.global_scale is not None:
        return ("fp8 x fp8 dot needs e4m3 weights with per-channel or per-tensor float scales, got "
                f"{enc.describe()}")
    return None


def _fp8_archs() -> str:
    from ....targets.architectures import gpu_archs
    return "; ".join(f"{a.name}: {a.description}" for a in gpu_archs() if a.fp8_tensor_cores) or "no known GPU"


def pack(enc: MiniFloat, target) -> PackedWeight:
    """The kernel layout of ``enc`` (see the module docstring): planes p0 (and p1 for FP6), scales as
    stored, global_scale and perm (int32) when present. meta records what the kernel needs and
    the code bytes against the encoding's own.

    >>> pw = pack(quantize_rtn(w, parse_format("mxfp4")), "h100")"""
    why = supports(enc, target)
    if why is not None:
        raise KernelError(f"minifloat kernel cannot take this weight: {why}")
    n, k = rows_cols(enc.shape)
    bits = enc.fmt.bits
    widths = plane_widths(bits)
    planes = [enc.codes] if len(widths) == 1 else split_planes(enc.fields(), bits)
    tensors = {f"p{i}": p.contiguous() for i, p in enumerate(planes)}
    tensors["scale"] = enc.scale.contiguous()
    if enc.global_scale is not None:
        tensors["global_scale"] = enc.global_scale.reshape(1).to(torch.float32)
    if enc.perm is not None:
        tensors["perm"] = enc.perm.to(torch.int32)
    sf = enc.scale_format
    meta = {"element": enc.fmt.short, "planes": list(widths), "group_size": enc.group_size,
            "scale_format": sf.short if sf.kind == "minifloat" else sf.name,
            "code_bytes": sum(p.numel() for p in planes), "stream_bytes": enc.codes.numel(),
            "target": getattr(target, "name", target)}
    return PackedWeight(FORMAT, n, k, tensors, meta)


def _scale_mode(w: PackedWeight, block_k: int) -> int:
    g, groups = w.meta["group_size"], w.tensors["scale"].shape[1]
    if groups == 1:
        return 0
    if g % block_k == 0:
        return 1
    if block_k % g == 0 and g & (g - 1) == 0:
        return 2
    return 3


def kernel_args(w: PackedWeight, cfg: TileConfig, *, has_bias: bool, native_fp8: bool = False, split: int = 1,
                bf16_in_fp32: bool = False) -> dict:
    """constexpr arguments of the weight-only kernel for ``w`` under ``cfg`` (also used by the AOT
    compile tests)."""
    e, mb, bias = ELEMENTS[w.meta["element"]]
    widths = w.meta["planes"]
    return dict(E=e, MB=mb, BIAS=bias, B0=widths[0], B1=widths[1] if len(widths) > 1 else 0,
                GROUP=w.meta["group_size"], SCALE_FMT=SCALE_FORMATS[w.meta["scale_format"]],
                SCALE_MODE=_scale_mode(w, cfg.block_k), HAS_GLOBAL="global_scale" in w.tensors,
                HAS_PERM="perm" in w.tensors, HAS_BIAS=has_bias, NATIVE_FP8=native_fp8, SPLIT=split,
                BF16_IN_FP32=bf16_in_fp32,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)


def matmul(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, *,
           split_k: int | None = None) -> torch.Tensor:
    """y[M, N] = x @ W.T (+ bias) for a packed minifloat W; y in x's dtype. ``split_k`` overrides
    the split of K (1: none), which the split is otherwise chosen from M, N and the GPU.

    >>> y = matmul(torch.randn(4, 256, dtype=torch.float16), pack(enc, "h100"))"""
    check_operands(x, w, bias, FORMAT, ("p0", "scale"))
    x = x if x.stride(1) == 1 else x.contiguous()
    gpu, m = runtime_target(x), x.shape[0]
    b = bucket_of("minifloat", m)
    key = tune_key(b, m, x.dtype, w, bias is not None, split_k)
    cfg = autotune(FORMAT, gpu.name, key, tiles_for(gpu, "minifloat", b, INTERP_TILES),
                   lambda c: _launch(x, w, bias, c, split_k))
    return _launch(x, w, bias, cfg, split_k)


def _launch(x: torch.Tensor, w: PackedWeight, bias, cfg: TileConfig, split_k: int | None) -> torch.Tensor:
    """One launch under ``cfg`` into fresh outputs (what an autotuning trial runs)."""
    run = split_launch(x, w.n, cfg, split_k)
    y = run.y
    t = w.tensors
    p0, p1 = t["p0"], t.get("p1", t["p0"])
    scale = t["scale"]
    native = w.meta["element"] == "e4m3" and run.target.native_fp8
    consts = kernel_args(w, cfg, has_bias=bias is not None, native_fp8=native, split=run.split,
                         bf16_in_fp32=run.target.interpreter and x.dtype == torch.bfloat16)
    _minifloat_kernel[run.grid](
        x, p0, p1, scale, t.get("global_scale", scale), t.get("perm", p0), bias if bias is not None else scale, y,
        x.shape[0], w.n, w.k, x.stride(0), p0.shape[1], p1.shape[1], scale.stride(0) if scale.shape[0] > 1 else 0,
        scale.stride(1), y.stride(0), run.k_split, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return run.result(x.dtype)


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale rounded to E4M3 (nearest even, saturating at ±448): what the graph's
    ``fake_quant`` does before the fp8 linear, as a torch.float8_e4m3fn tensor. The division is
    in float32, as the graph's reference op does it for fp32 activations, so both round alike."""
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def matmul_fp8act(xq: torch.Tensor, x_scale: float, w: PackedWeight, bias: torch.Tensor | None = None, *,
                  out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """y = (xq * x_scale) @ W.T (+ bias) on fp8 x fp8 tensor cores: ``xq`` float8_e4m3fn
    [M, K] (see :func:`quantize_fp8`), W packed from e4m3 codes with per-channel/tensor scales.

    >>> y = matmul_fp8act(quantize_fp8(x, 0.02), 0.02, pack(enc, "h100"), bias)"""
    if not isinstance(xq, torch.Tensor) or xq.dtype != torch.float8_e4m3fn or xq.dim() != 2:
        got = (xq.dtype, tuple(xq.shape)) if isinstance(xq, torch.Tensor) else type(xq).__name__
        raise KernelError(f"xq must be a 2-D torch.float8_e4m3fn tensor (quantize_fp8(x, scale)), got {got}")
    if out_dtype not in (torch.float16, torch.bfloat16):
        raise KernelError(f"out_dtype must be float16 or bfloat16, got {out_dtype}")
    check_weight(w, FORMAT, ("p0", "scale"))
    check_bias(bias, w.n)
    if xq.shape[1] != w.k:
        raise KernelError(f"xq has {xq.shape[1]} columns but the weight has K={w.k}")
    if w.meta.get("element") != "e4m3" or w.tensors["scale"].shape[1] != 1 or "global_scale" in w.tensors \
            or SCALE_FORMATS[w.meta["scale_format"]] != 0:
        raise KernelError("matmul_fp8act needs e4m3 weights with per-channel or per-tensor float scales, got "
                          f"{w.meta.get('element')} with {w.meta.get('scale_format')} scales "
                          f"[{', '.join(map(str, w.tensors['scale'].shape))}]")
    gpu = runtime_target(xq)
    if not gpu.interpreter and not gpu.native_fp8:
        raise KernelError(f"matmul_fp8act needs fp8 tensor cores, which {gpu.describe()} lacks; use matmul()")
    m = xq.shape[0]
    xq = xq if xq.stride(1) == 1 else xq.contiguous()
    b = bucket_of("fp8act", m)
    key = tune_key(b, m, out_dtype, w, bias is not None, "fp8act")
    cfg = autotune(FORMAT + "-fp8act", gpu.name, key, tiles_for(gpu, "fp8act", b, INTERP_TILES),
                   lambda c: _launch_fp8act(xq, x_scale, w, bias, out_dtype, c))
    return _launch_fp8act(xq, x_scale, w, bias, out_dtype, cfg)


def _launch_fp8act(xq, x_scale, w: PackedWeight, bias, out_dtype, cfg: TileConfig) -> torch.Tensor:
    """One fp8 x fp8 launch under ``cfg`` (no split-K: the output is written, never added to)."""
    m, n, k = xq.shape[0], w.n, w.k
    t = w.tensors
    scale = t["scale"]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
    _fp8act_kernel[grid](xq, t["p0"], scale, t.get("perm", t["p0"]), bias if bias is not None else scale, y,
                         float(x_scale), m, n, k, xq.stride(0), t["p0"].shape[1],
                         scale.stride(0) if scale.shape[0] > 1 else 0, y.stride(0),
                         HAS_PERM="perm" in t, HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m,
                         BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)
    return y


__all__ = ["FORMAT", "INTERP_TILES", "SMALL_M", "TileConfig", "supports", "pack", "matmul", "matmul_fp8act",
           "quantize_fp8", "kernel_args", "plane_widths", "split_planes"]

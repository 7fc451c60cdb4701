"""Palettized-weight GEMM: y = x @ W.T with W[n, k] = lut[n // group_size, index[n, k]], the
indices n-bit codes and one fp16/fp32 look-up table per group of rows; fp32 accumulation.

Layout the kernel streams (``pack``): indices stay the IR's little-endian bit stream when the
width divides 8 (2-bit: four per byte, 4-bit: two per byte, low bits first; 8-bit: one byte), so
packing is free. 3-, 5- and 6-bit indices are split into planes whose widths divide 8 (3 = 2 + 1,
5 = 4 + 1, 6 = 4 + 2, low bits first), the same bits per weight as the stream (at most one byte
more per row when K is not a multiple of 8; ``meta`` states code_bytes against stream_bytes). The
LUT keeps its stored dtype ([groups, 2^bits], per tensor is one group).

    3-bit row [5, 2, 7, 0, ...]  ->  p0 = 2-bit stream [1, 2, 3, 0, ...], p1 = 1-bit stream [1, 0, 1, 0, ...]
    >>> pw = pack(palettize_weight(w, 4, group_size=1)[0], "h100"); y = matmul(x, pw)

Why this shape: at M <= 16 the layer streams its index bytes, so the kernel reads each byte once
as contiguous byte rows of a [BLOCK_N, BLOCK_K] tile, unpacks by shifts and looks each index up
with a load from the table (``lut + group * 2^bits + index``): a table is at most 512 bytes per
group and stays in L1, so the look-up costs issue slots, not DRAM bandwidth. Small M splits K
across programs, with fp32 partials added atomically (:mod:`.common`'s launch plumbing); the
bit-plane unpacking is :mod:`.minifloat`'s.

Tiles are autotuned per GPU: its architecture file (nnforge/targets/gpu/) lists the candidates of
``[tiles.lut]`` per M bucket, the hand-picked default first; on a GPU :func:`.common.autotune`
times them once per shape and keeps the fastest (each trial allocates its own zeroed split-K
output); the interpreter always runs minifloat's ``INTERP_TILES``.
"""
from __future__ import annotations

import torch

from ....ir.encodings import rows_cols
from ....ir.palette import Palettized
from . import KernelError, PackedWeight
from .common import (SMALL_M, TileConfig, autotune, bucket_of, check_operands, runtime_target, split_launch,
                     tiles_for, tune_key, unsupported)
from .minifloat import INTERP_TILES, plane_widths, split_planes, triton

if triton is not None:
    import triton.language as tl
    from .common import mma, store_tile
    from .minifloat import load_codes

FORMAT = "palettized"
BITS = (1, 2, 3, 4, 5, 6, 8)

if triton is not None:
    @triton.jit
    def _lut_kernel(x_ptr, p0_ptr, p1_ptr, lut_ptr, bias_ptr, y_ptr,
                    M, N, K, stride_xm, stride_p0, stride_p1, stride_ym, k_split,
                    B0: tl.constexpr, B1: tl.constexpr, ENTRIES: tl.constexpr, GROUP_ROWS: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BF16_IN_FP32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        dt = x_ptr.dtype.element_ty
        # Each row's table, found once per tile; the per-element look-up adds only the index.
        table = lut_ptr + (offs_n // GROUP_ROWS)[:, None] * ENTRIES
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * k_split
        k_hi = tl.minimum(K, k_lo + k_split)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            idx = load_codes(p0_ptr, p1_ptr, stride_p0, stride_p1, offs_n, mask_n, k0, BLOCK_N, BLOCK_K, B0, B1)
            w = tl.load(table + idx, mask=mask_n[:, None], other=0.0)
            acc = mma(x, tl.trans(w.to(tl.float32).to(dt)), acc, BF16_IN_FP32)
        store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, N, pid_k, HAS_BIAS, SPLIT)


def supports(enc, target) -> str | None:
    """None when ``enc`` runs on ``target``; otherwise why not.

    >>> supports(enc7bit, "h100")
    '7-bit palette indices are not supported (index widths: 1, 2, 3, 4, 5, 6, 8)'"""
    why = unsupported(enc, target, Palettized, FORMAT)
    if why is not None:
        return why
    if enc.bits not in BITS:
        return (f"{enc.bits}-bit palette indices are not supported (index widths: {', '.join(map(str, BITS))}); "
                f"re-palettize with 8 bits")
    return None


def pack(enc: Palettized, target) -> PackedWeight:
    """The kernel layout of ``enc`` (module docstring): planes p0 (p1 for 3/5/6 bits) and the LUT.

    >>> pw = pack(Palettized.from_indices(idx, lut, bits=3, shape=(64, 128)), "a100")"""
    why = supports(enc, target)
    if why is not None:
        raise KernelError(f"palettized kernel cannot take this weight: {why}")
    n, k = rows_cols(enc.shape)
    widths = plane_widths(enc.bits)
    planes = [enc.indices] if len(widths) == 1 else split_planes(enc.index_values(), enc.bits)
    tensors = {f"p{i}": p.contiguous() for i, p in enumerate(planes)}
    tensors["lut"] = enc.lut.contiguous()
    meta = {"bits": enc.bits, "planes": list(widths), "group_rows": enc.group_size,
            "lut_dtype": str(enc.lut.dtype).removeprefix("torch."),
            "code_bytes": sum(p.numel() for p in planes), "stream_bytes": enc.indices.numel(),
            "target": getattr(target, "name", target)}
    return PackedWeight(FORMAT, n, k, tensors, meta)


def kernel_args(w: PackedWeight, cfg: TileConfig, *, has_bias: bool, split: int = 1,
                bf16_in_fp32: bool = False) -> dict:
    """constexpr arguments of the kernel for ``w`` under ``cfg`` (also used by the AOT tests)."""
    widths = w.meta["planes"]
    return dict(B0=widths[0], B1=widths[1] if len(widths) > 1 else 0, ENTRIES=1 << w.meta["bits"],
                GROUP_ROWS=w.meta["group_rows"], HAS_BIAS=has_bias, SPLIT=split, BF16_IN_FP32=bf16_in_fp32,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)


def matmul(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, *,
           split_k: int | None = None) -> torch.Tensor:
    """y[M, N] = x @ W.T (+ bias) for a packed palettized W; y in x's dtype. ``split_k``
    overrides the split of K (1: none).

    >>> y = matmul(torch.randn(4, 256, dtype=torch.float16), pack(enc, "h100"))"""
    check_operands(x, w, bias, FORMAT, ("p0", "lut"))
    if len(w.meta.get("planes", ())) > 2 or w.tensors["lut"].shape[1] != 1 << w.meta["bits"]:
        raise KernelError(f"palettized PackedWeight meta {w.meta} disagrees with its LUT "
                          f"{tuple(w.tensors['lut'].shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    gpu, m = runtime_target(x), x.shape[0]
    b = bucket_of("lut", m)
    key = tune_key(b, m, x.dtype, w, bias is not None, split_k)
    cfg = autotune(FORMAT, gpu.name, key, tiles_for(gpu, "lut", b, INTERP_TILES),
                   lambda c: _launch(x, w, bias, c, split_k))
    return _launch(x, w, bias, cfg, split_k)


def _launch(x: torch.Tensor, w: PackedWeight, bias, cfg: TileConfig, split_k: int | None) -> torch.Tensor:
    """One launch under ``cfg`` into fresh outputs (what an autotuning trial runs)."""
    run = split_launch(x, w.n, cfg, split_k)
    t = w.tensors
    p0, p1 = t["p0"], t.get("p1", t["p0"])
    consts = kernel_args(w, cfg, has_bias=bias is not None, split=run.split,
                         bf16_in_fp32=run.target.interpreter and x.dtype == torch.bfloat16)
    _lut_kernel[run.grid](x, p0, p1, t["lut"], bias if bias is not None else t["lut"], run.y,
                          x.shape[0], w.n, w.k, x.stride(0), p0.shape[1], p1.shape[1], run.y.stride(0), run.k_split,
                          **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return run.result(x.dtype)


__all__ = ["FORMAT", "SMALL_M", "supports", "pack", "matmul", "kernel_args"]

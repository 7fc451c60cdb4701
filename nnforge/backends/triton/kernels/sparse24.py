"""2:4-sparse weights (kept values int4 or fp16) as a bandwidth kernel: ``FORMAT = "sparse24"``.

Triton has no ``mma.sp`` (sparse tensor core) instruction, so this is not a 2x-compute kernel. It
wins on bytes: decode-time GEMM (M <= 16 tokens) is bound by streaming the weight, and a 2:4
weight streams half the values (int4: a quarter of fp16's bytes, 0.28 byte per weight with
metadata and g128 scales, against 2 for dense fp16). Each K tile of compressed values plus
2-bit metadata is expanded to a dense tile in registers, dequantised in the same step, and fed to
``tl.dot`` (mma on sm_80 and sm_90).

Layout of :func:`pack` (W is [N, K]; Kc = K/2 kept values per row, padded to KP, a multiple of 16;
a *pair* is the two kept values of one group of 4 columns, pair g covering columns 4g..4g+3):

- ``qweight`` int32 [KP/8, N] (int4 values): word i of row n holds pairs 4i..4i+3; nibble j < 4
  is the first kept value (``v0``) of pair 4i+j, nibble 4+j its second (``v1``). Splitting v0 and
  v1 into the low and high half-word lets the kernel unpack each with one shift per nibble, no
  interleave. ``values`` fp16/bf16 [2, KP/2, N] takes its place for float kept values.
- ``meta`` int32 [KP/16, N]: word i holds pairs 8i..8i+7, bits 2j..2j+1 the in-group position of
  v0 of pair 8i+j, bits 16+2j.. that of its v1.
- ``scale``, ``shift`` fp16 [G, N] (int4 only): the value is ``field * scale + shift``, one FMA,
  with ``shift = -(zero_point + 8 if signed) * scale`` folded at pack time. Groups run along the
  compressed columns (MARLIN's 2:4 + int4); the last group may be shorter.
- ``perm`` int32 [K] (act-order only): the x column each kernel column reads. An act-order
  permutation of the kept columns that moves whole pairs is one of x's columns in groups of 4.
- ``row_scale`` fp32 [N] (optional): applied to the fp32 accumulator, exact.

Everything is N-contiguous, so a tile load is BN consecutive words: coalesced and vectorised.

    >>> enc = Sparse.from_mask(w, keep, "2:4", lambda v: IntQuant.quantize(v, 4, group_size=64, symmetric=False))
    >>> pw = pack(enc, "h100"); pw.tensors["qweight"].shape        # w [256, 4096] -> Kc = 2048
    torch.Size([256, 256])
    >>> y = matmul(x.half().cuda(), pw.to("cuda"))                   # == x @ enc.decode().T

Design choices:

- Expansion without shuffles: position p of every group of 4 holds ``where(i0 == p, v0,
  where(i1 == p, v1, 0))``. Instead of interleaving the four [BK/4, BN] tiles back into K order
  (a register shuffle through shared memory), the kernel splits the x tile the same way (x columns
  4g+p, one reshape + two ``tl.split`` of a contiguous load) and issues four dots of K = BK/4: the
  sum over K does not care about its order.
- Split-K for M <= 16: a 4096x4096 layer has only N/BN output tiles, too few to fill the SMs
  and their memory pipes; K is cut so that about two waves of programs run, partial sums
  atomically added into an fp32 buffer (in L2: M*N*4 bytes) then cast.
- One quantisation group per K tile when the group size is a multiple of BK/2 (the pass's g128):
  one [BN] scale load per tile; other group sizes gather the scale per pair.
- Tiles are autotuned per GPU: its architecture file (nnforge/targets/gpu/) lists the candidates
  of ``[tiles.sparse24]`` per M bucket, the hand-picked default first; on a GPU
  :func:`.common.autotune` times them once per shape on the real operands and keeps the fastest.
  The split-K atomics need a zeroed buffer per trial: each trial is a whole launch that allocates
  its own zeroed fp32 output. The interpreter always runs ``INTERPRET_CONFIG``. Compile tests
  check every candidate for its architecture.
"""
from __future__ import annotations

import math

import torch

from ....ir import Dense, IntQuant, Sparse, packing
from ....ir.encodings import rows_cols
from . import KernelError, PackedWeight
from .common import (SMALL_M, TileConfig, autotune, bucket_of, check_operands, check_split_k, check_weight,
                     gpu_target, runtime_target, tiles_for, tune_key, unsupported)

FORMAT = "sparse24"
VERSION = 1


# A tile's block_k counts dense K columns (BK/2 kept values, BK/4 pairs; a multiple of 32 for the
# metadata words). The GPU's tiles come from its architecture file, [tiles.sparse24]: decode
# (M <= 16, split-K, wide BK for long streaming runs) and gemm. The interpreter runs one small tile.
INTERPRET_CONFIG = TileConfig(16, 32, 64, 1, 1)
FP16_MAX = 65504.0


# --- what runs --------------------------------------------------------------------------------
def _pair_order(perm: torch.Tensor | None, kc: int) -> torch.Tensor | None:
    """The logical pair each stored pair holds, or None (no act-order); raises if ``perm`` moves
    kept values between pairs or swaps them, which no permutation of x can express."""
    if perm is None:
        return None
    p = perm.to(torch.int64).reshape(-1, 2)
    if bool((p[:, 0] % 2 != 0).any()) or not torch.equal(p[:, 1], p[:, 0] + 1):
        raise KernelError("act-order permutation of the kept values splits 2:4 pairs: sparse24 needs every stored "
                          "pair of kept columns to be one group's pair, in order")
    return p[:, 0] // 2


def supports(enc, target) -> str | None:
    """None when ``enc`` (a 2:4 Sparse with int4 or float kept values) runs here for ``target``,
    else why not. Example: ``supports(enc, "h100") is None``."""
    why = unsupported(enc, target, Sparse, FORMAT)
    if why is not None:
        return why
    p = enc.pattern
    if p.kind != "nm":
        return (f"pattern {p.name}: sparse24 runs the 2:4 N:M pattern only; block and unstructured sparsity "
                f"need an SpMM kernel")
    if (p.n, p.m) != (2, 4):
        return f"pattern {p.name}: sparse24 runs 2:4 only (2 kept of every 4, 2-bit metadata)"
    vals = enc.values
    kc = rows_cols(enc.shape)[1] // 2
    if isinstance(vals, IntQuant):
        if vals.bits != 4:
            return f"kept values in {vals.bits}-bit integers: sparse24 streams int4 (or fp16) kept values"
        if vals.group_size % 2 and vals.group_size != kc:
            return (f"quantisation group_size {vals.group_size} is odd: sparse24 needs groups of whole 2:4 pairs "
                    f"(an even group_size)")
        try:
            _pair_order(vals.perm, kc)
        except KernelError as e:
            return str(e)
        span = vals.scale.abs().max() * (15 + (0 if vals.zero_point is None else vals.zero_point.abs().max()))
        if not bool(torch.isfinite(span)) or float(span) > FP16_MAX:
            return "kept-value scales overflow fp16 (sparse24 stores scale and shift in fp16)"
        return None
    if isinstance(vals, Dense):
        d = vals.data
        if d.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"kept values of dtype {d.dtype}: sparse24 runs fp16, bf16 or fp32 kept values (or int4)"
        if d.dtype == torch.float32 and d.numel() and float(d.abs().max()) > FP16_MAX:
            return "fp32 kept values beyond the fp16 range: sparse24 stores float kept values in fp16"
        return None
    return f"kept values as {vals.describe()}: sparse24 runs int4 (IntQuant 4-bit) or float (Dense) kept values"


# --- packing (CPU, compile time) ----------------------------------------------------------------
def _words(fields: torch.Tensor, per_pair: int, bits: int) -> torch.Tensor:
    """[N, pairs, 2] fields -> int32 [pairs / per_pair, N]: v0 of ``per_pair`` pairs in the low
    half-word, v1 in the high one."""
    n, pairs, _ = fields.shape
    f = fields.reshape(n, pairs // per_pair, per_pair, 2).transpose(2, 3).reshape(n, pairs // per_pair, 2 * per_pair)
    shifts = torch.arange(2 * per_pair, dtype=torch.int64) * bits
    w = (f.to(torch.int64) << shifts).sum(-1)
    w = torch.where(w >= 1 << 31, w - (1 << 32), w)        # reinterpret as int32
    return w.to(torch.int32).t().contiguous()


def pack(enc, target) -> PackedWeight:
    """The streamed layout (module docstring) of a 2:4 Sparse weight. Example:
    ``pw = pack(enc, "a100")``; ``pw.tensors`` go to safetensors, ``pw.meta`` to the manifest."""
    reason = supports(enc, target)
    if reason:
        raise KernelError(f"sparse24 cannot pack this weight: {reason}")
    n, k = rows_cols(enc.shape)
    kc = k // 2
    kp = -(-kc // 16) * 16
    pad = (kp - kc) // 2
    vals = enc.values
    order = _pair_order(vals.perm, kc) if isinstance(vals, IntQuant) else None
    idx = enc.group_indices()                                            # [N, pairs, 2], logical order
    if order is not None:
        idx = idx[:, order]
    # Padded pairs point at (0, 1) so the metadata stays a valid pattern; x is zero there.
    idx = torch.cat([idx, torch.tensor([0, 1]).expand(n, pad, 2)], 1)
    t = {"meta": _words(idx, 8, 2)}
    meta = {"target": getattr(target, "name", target), "version": VERSION, "k_padded": kp, "perm": order is not None,
            "row_scale": enc.row_scale is not None}
    if isinstance(vals, IntQuant):
        fields = packing.unpack_bits(vals.codes, 4, kc).reshape(n, -1, 2)
        t["qweight"] = _words(torch.cat([fields, fields.new_zeros(n, pad, 2)], 1), 4, 4)
        s = vals.scale.to(torch.float32).expand(n, -1)
        z = vals.zero_point.to(torch.float32).expand(n, -1) if vals.zero_point is not None else torch.zeros_like(s)
        off = 8.0 if vals.signed else 0.0
        t["scale"] = s.t().contiguous().to(torch.float16)
        t["shift"] = (-(z + off) * s).t().contiguous().to(torch.float16)
        meta.update(kind="int4", group_size=int(vals.group_size) if vals.group_size < kc else kp)
    else:
        d = vals.data.reshape(n, -1, 2)
        dt = torch.float16 if d.dtype == torch.float32 else d.dtype
        d = torch.cat([d, d.new_zeros(n, pad, 2)], 1)
        t["values"] = d.permute(2, 1, 0).contiguous().to(dt)
        meta.update(kind="float", group_size=kp)
    if order is not None:
        t["perm"] = (order[:, None] * 4 + torch.arange(4)).reshape(-1).to(torch.int32)
    if enc.row_scale is not None:
        t["row_scale"] = enc.row_scale.to(torch.float32).contiguous()
    return PackedWeight(FORMAT, n, k, t, meta)


# --- the kernel ---------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:            # supports() and pack() run at compile time without triton
    triton = tl = None


def sparse24_kernel(x_ptr, q_ptr, meta_ptr, s_ptr, z_ptr, perm_ptr, rs_ptr, bias_ptr, y_ptr,
                    M, N, K, KP, G, stride_xm, stride_xk, stride_ym, tiles_per_split,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr,
                    IS_INT: tl.constexpr, HAS_PERM: tl.constexpr, HAS_RS: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr):
    G4: tl.constexpr = BK // 4
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_g = tl.arange(0, G4)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, (K + BK - 1) // BK)
    for t in range(t0, t1):
        k0 = t * BK
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        if HAS_PERM:
            xk = tl.load(perm_ptr + offs_k, mask=k_ok, other=0)
        else:
            xk = offs_k
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + xk[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # column 4g + 2a + b of the tile -> x_{2a+b}[:, g], matching the expanded tiles below
        xe, xo = tl.split(tl.reshape(xt, (BM, G4, 2, 2)))
        x0, x2 = tl.split(xe)
        x1, x3 = tl.split(xo)

        pairs = k0 // 4 + offs_g
        mrow = k0 // 32 + tl.arange(0, BK // 32)
        mw = tl.load(meta_ptr + mrow[:, None] * N + offs_n[None, :],
                     mask=(mrow < KP // 16)[:, None] & n_ok[None, :], other=0)
        msh = tl.arange(0, 8) * 2
        i0 = tl.reshape((mw[:, None, :] >> msh[None, :, None]) & 3, (G4, BN))
        i1 = tl.reshape((mw[:, None, :] >> (msh + 16)[None, :, None]) & 3, (G4, BN))
        if IS_INT:
            qrow = k0 // 16 + tl.arange(0, BK // 16)
            qw = tl.load(q_ptr + qrow[:, None] * N + offs_n[None, :],
                         mask=(qrow < KP // 8)[:, None] & n_ok[None, :], other=0)
            qsh = tl.arange(0, 4) * 4
            v0 = tl.reshape((qw[:, None, :] >> qsh[None, :, None]) & 0xF, (G4, BN)).to(tl.float32)
            v1 = tl.reshape((qw[:, None, :] >> (qsh + 16)[None, :, None]) & 0xF, (G4, BN)).to(tl.float32)
            if GS % (BK // 2) == 0:
                grp = (k0 // 2) // GS          # < G: tiles start below K
                s_ok = n_ok
                s = tl.load(s_ptr + grp * N + offs_n, mask=s_ok, other=0.0).to(tl.float32)[None, :]
                z = tl.load(z_ptr + grp * N + offs_n, mask=s_ok, other=0.0).to(tl.float32)[None, :]
            else:
                grp = (2 * pairs) // GS
                s_ok = (grp < G)[:, None] & n_ok[None, :]
                s = tl.load(s_ptr + grp[:, None] * N + offs_n[None, :], mask=s_ok, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + grp[:, None] * N + offs_n[None, :], mask=s_ok, other=0.0).to(tl.float32)
            w0 = (v0 * s + z).to(x_ptr.dtype.element_ty)
            w1 = (v1 * s + z).to(x_ptr.dtype.element_ty)
        else:
            v_ok = (pairs < KP // 2)[:, None] & n_ok[None, :]
            vp = q_ptr + pairs[:, None] * N + offs_n[None, :]
            w0 = tl.load(vp, mask=v_ok, other=0.0).to(x_ptr.dtype.element_ty)
            w1 = tl.load(vp + (KP // 2) * N, mask=v_ok, other=0.0).to(x_ptr.dtype.element_ty)
        zero = tl.zeros((G4, BN), dtype=w0.dtype)
        d0 = tl.where(i0 == 0, w0, tl.where(i1 == 0, w1, zero))
        d1 = tl.where(i0 == 1, w0, tl.where(i1 == 1, w1, zero))
        d2 = tl.where(i0 == 2, w0, tl.where(i1 == 2, w1, zero))
        d3 = tl.where(i0 == 3, w0, tl.where(i1 == 3, w1, zero))
        if UPCAST:
            # Triton 3.9's interpreter gets bf16 tl.dot wrong; fp32 operands holding the same
            # bf16-rounded numbers give the GPU's result.
            x0, x1, x2, x3 = x0.to(tl.float32), x1.to(tl.float32), x2.to(tl.float32), x3.to(tl.float32)
            d0, d1, d2, d3 = d0.to(tl.float32), d1.to(tl.float32), d2.to(tl.float32), d3.to(tl.float32)
        acc = tl.dot(x0, d0, acc)
        acc = tl.dot(x1, d1, acc)
        acc = tl.dot(x2, d2, acc)
        acc = tl.dot(x3, d3, acc)
    if HAS_RS:
        acc = acc * tl.load(rs_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, stride_ym, N, pid_k, HAS_BIAS, SPLIT_K)


# Jitted here rather than decorated, so that the module (supports, pack) imports without triton.
if triton is not None:
    from .common import store_tile
    sparse24_kernel = triton.jit(sparse24_kernel)


def candidates_for(target, m: int) -> tuple[TileConfig, ...]:
    """The candidate tiles for ``m`` rows of x on ``target`` (a Triton GPU target, its name, a
    GpuTarget, or "interp"), the default first."""
    gpu = gpu_target(target)
    if gpu.interpreter:
        return (INTERPRET_CONFIG,)
    return tiles_for(gpu, "sparse24", bucket_of("sparse24", m), {})


def config_for(target, m: int) -> TileConfig:
    """The default tile config for ``m`` rows of x on ``target`` (what runs untuned)."""
    return candidates_for(target, m)[0]


def _split(m: int, n: int, k: int, cfg: TileConfig, sms: int) -> int:
    """Enough K slices for about two waves of programs, at M <= 16 only."""
    if m > SMALL_M:
        return 1
    tiles = math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n)
    return max(1, min(math.ceil(k / cfg.block_k), 2 * sms // tiles))


NEEDS = {"int4": ("qweight", "meta", "scale", "shift"), "float": ("values", "meta")}


def _check(x: torch.Tensor, w: PackedWeight, bias):
    check_weight(w, FORMAT)
    kind = w.meta.get("kind")
    if kind not in NEEDS:
        raise KernelError(f"sparse24 weight meta 'kind' is {kind!r}; expected 'int4' or 'float' (re-pack it)")
    need = NEEDS[kind] + (("perm",) if w.meta.get("perm") else ()) + (("row_scale",) if w.meta.get("row_scale") else ())
    check_operands(x, w, bias, FORMAT, need, ("k_padded", "group_size"), leading_dims=True)
    kp = w.meta["k_padded"]
    want = {"meta": (torch.int32, (kp // 16, w.n)), "qweight": (torch.int32, (kp // 8, w.n)),
            "values": (None, (2, kp // 2, w.n)), "perm": (torch.int32, (w.k,)), "row_scale": (torch.float32, (w.n,))}
    for name, (dt, shape) in want.items():
        got = w.tensors.get(name)
        if got is not None and (tuple(got.shape) != shape or (dt is not None and got.dtype != dt)):
            raise KernelError(f"sparse24 weight tensor {name!r} is {got.dtype} {tuple(got.shape)}; expected "
                              f"{dt or 'fp16/bf16'} {shape}")


def matmul(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, *,
           split_k: int | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with W the packed 2:4 weight; x fp16/bf16 [..., K], y in x's dtype.
    ``split_k`` overrides the K slicing (tests, benchmarks). Example: ``y = matmul(x, pack(enc, "h100"))``."""
    if triton is None:
        raise KernelError("sparse24 needs the triton package to run (pip install triton)")
    _check(x, w, bias)
    check_split_k(split_k)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    m, n = x2.shape[0], w.n
    if m == 0:
        return x.new_zeros(*lead, n)
    gpu = runtime_target(x)
    key = tune_key(bucket_of("sparse24", m), m, x.dtype, w, bias is not None, split_k)
    cfg = autotune(FORMAT, gpu.name, key, candidates_for(gpu, m), lambda c: _launch(x2, w, bias, c, split_k, gpu))
    return _launch(x2, w, bias, cfg, split_k, gpu).reshape(*lead, n)


def _launch(x2: torch.Tensor, w: PackedWeight, bias, cfg: TileConfig, split_k: int | None,
            target) -> torch.Tensor:
    """One launch under ``cfg`` into a fresh output (zeroed fp32 for split-K) on ``target`` (a
    GpuTarget, or anything :func:`.common.gpu_target` takes): what an autotuning trial runs.
    Returns [M, N] in x's dtype."""
    gpu = gpu_target(target)
    m, n, k = x2.shape[0], w.n, w.k
    k_tiles = math.ceil(k / cfg.block_k)
    split = split_k if split_k is not None else _split(m, n, k, cfg, gpu.sms)
    per = math.ceil(k_tiles / min(split, k_tiles))
    split = math.ceil(k_tiles / per)
    y = torch.zeros(m, n, dtype=torch.float32, device=x2.device) if split > 1 else \
        torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    t = w.tensors
    is_int = w.meta["kind"] == "int4"
    q = t["qweight"] if is_int else t["values"]
    s, z = (t["scale"], t["shift"]) if is_int else (q, q)
    grid = (math.ceil(n / cfg.block_n), math.ceil(m / cfg.block_m), split)
    sparse24_kernel[grid](x2, q, t["meta"], s, z, t.get("perm", t["meta"]), t.get("row_scale", q),
                    bias if bias is not None else q, y, m, n, k, w.meta["k_padded"], s.shape[0] if is_int else 1,
                    x2.stride(0), x2.stride(1), y.stride(0), per,
                    BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GS=int(w.meta["group_size"]), IS_INT=is_int,
                    HAS_PERM="perm" in t, HAS_RS="row_scale" in t, HAS_BIAS=bias is not None, SPLIT_K=split,
                    UPCAST=gpu.interpreter and x2.dtype == torch.bfloat16,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x2.dtype)


def signature(x_dtype: str = "fp16", value_dtype: str = "i32") -> dict[str, str]:
    """Triton argument types of the kernel, for ``compile_for`` (AOT compile tests)."""
    ptrs = {"x_ptr": f"*{x_dtype}", "q_ptr": f"*{value_dtype}", "meta_ptr": "*i32", "s_ptr": "*fp16",
            "z_ptr": "*fp16", "perm_ptr": "*i32", "rs_ptr": "*fp32", "bias_ptr": f"*{x_dtype}", "y_ptr": "*fp32"}
    ints = dict.fromkeys(("M", "N", "K", "KP", "G", "stride_xm", "stride_xk", "stride_ym", "tiles_per_split"), "i32")
    consts = dict.fromkeys(("BM", "BN", "BK", "GS", "IS_INT", "HAS_PERM", "HAS_RS", "HAS_BIAS", "SPLIT_K",
                            "UPCAST"),
                           "constexpr")
    return {**ptrs, **ints, **consts}


__all__ = ["FORMAT", "INTERPRET_CONFIG", "TileConfig", "supports", "pack", "matmul", "candidates_for", "config_for",
           "signature", "sparse24_kernel"]

"""Weight-only integer GEMM (W4A16, W8A16): fp16/bf16 activations times 4- or 8-bit IntQuant codes.

Layout (``pack``), for a weight W [N, K] with ``b``-bit codes, ``P = 32 // b`` codes per word:

- ``qweight`` int32 [ceil(N/64), ceil(K/P), 64]: N is cut into panels of 64 output channels and
  each panel is stored K-major, so word ``qweight[p, i, c]`` holds the codes of W[64p + c,
  Pi .. Pi+P-1], code ``j`` in bits ``[j*b, (j+1)*b)`` (low bits first). That is exactly the IR's
  byte stream (packing.py) read four bytes at a time, little-endian, so a nibble never straddles
  a word. Codes are offset binary (signed codes + 2**(b-1)); padding is zero.
- ``scale`` fp16 [G, N]: one row per group of ``group_size`` stored columns (R = 1 broadcast).
- ``zero`` fp16 [G, N], only where the encoding has zero points: the *effective* zero in the
  stored-field domain, ``zero_point + 2**(b-1)`` for signed codes. Without zero points it is a
  compile-time constant (``meta["zero_const"]``: 2**(b-1) for signed codes, 0 for unsigned).
- ``perm`` int32 [K], only with act-order: stored column j holds original column perm[j].

Example: int4, N = 100, K = 256 gives qweight [2, 32, 64] (panels 0 and 1; rows 100..127 zero);
W[70, 19] is nibble 3 of ``qweight[1, 2, 6]`` and its scale is ``scale[19 // group_size, 70]``.

Why this layout and this kernel (decode is memory bound; the aim on H100 is ~4x fp16 cuBLAS):

- A CTA owns BLOCK_N columns (one or more panels) and walks K; a panel's words for a K range are
  one contiguous block (BLOCK_K/P rows of 256 B), so each tile is a few fully coalesced 128-bit
  loads per thread and a CTA streams one contiguous region, read exactly once. MARLIN also
  pre-shuffles words into the tensor-core fragment order; in Triton the compiler owns register
  layouts (the move into the mma operand layout is its convert_layout), so the layout fixes only
  what Triton cannot: contiguity, alignment, and no straddling codes.
- Unpacking avoids int->float conversions (quarter rate on sm_80/90, which would make decode ALU
  bound): ``(q | 0x6400)`` read as fp16 is exactly 1024 + q, so dequantisation is shift/mask/or,
  one exact fp16 subtraction of (1024 + zero), which bf16 also holds exactly, and, for groups
  smaller than a tile, one multiply by the scale. Subtracting the zero exactly before scaling keeps
  the result to one rounding; the folded ``q * s - z * s`` FMA in fp16 cancels catastrophically
  for 8-bit codes (an error of up to ~0.1 quantisation steps).
- When a tile lies inside one group (per-channel, or group_size a multiple of BLOCK_K) the scale
  is applied to the tile's fp32 dot product instead: one multiply per output per tile, not per
  weight, and the integers fed to the tensor cores are exact in fp16/bf16.
- Split-K for M <= 16: few output tiles cannot occupy the SMs, so K is split until about two
  waves of CTAs stream the weight. Each split writes fp32 partials [SPLIT_K, M, N]; the last CTA
  of an output tile to arrive (an acq_rel counter per tile) sums them in split order and adds the
  bias: deterministic, and one launch (a separate reduction launch costs as much as streaming a
  4096x4096 int4 weight). Counters live in a cached per-device workspace that the last CTA resets,
  as MARLIN's does, so concurrent calls on different streams of one device are not supported.
- Act-order: the kernel reads x's columns through ``perm`` (the same as ``x[:, perm]`` before the
  kernel), so groups stay contiguous in stored order and no gather launch or copy of x is needed.
- CTAs are ordered M-tile fastest, so CTAs sharing a weight panel run together and it is read
  from DRAM once even for large M.
- Tiles are autotuned per GPU: its architecture file (nnforge/targets/gpu/) lists the candidates
  of ``[tiles.intweight]`` per M bucket (decode, prefill, gemm), the hand-picked default first; on
  a GPU :func:`.common.autotune` times them once per shape and keeps the fastest. Each trial
  allocates its own partial buffer, and the lock counters are zeroed before each candidate (a
  trial that dies mid-launch could leave them counting); the interpreter always runs
  ``INTERPRETER_CONFIG``.
"""
from __future__ import annotations

import math
import sys

import torch
import triton
import triton.language as tl

from . import KernelError, PackedWeight
from .common import (INTERP, TileConfig, autotune, bucket_of, check_operands, check_split_k, check_weight,
                     gpu_target, runtime_target, tiles_for, tune_key, unsupported)

FORMAT = "int-weight"
PANEL = 64                      # output channels per panel of ``qweight``
SPLIT_M_MAX = 16                # rows up to which split-K is used
_MAX_SPLIT = 16
_FP16_MAX = 65504.0


# The GPU's tiles come from its architecture file, [tiles.intweight] (block_n a multiple of PANEL):
# decode tiles narrow in N and deep in K, so each CTA has many bytes in flight; prefill and gemm
# tiles square enough to reuse x and W from shared memory. The CPU interpreter runs each program in
# numpy: one small tile keeps the tests fast.
INTERPRETER_CONFIG = TileConfig(16, 64, 64, 4, 1)


def candidates_for(target, m: int) -> tuple[str, tuple[TileConfig, ...]]:
    """The M bucket and its candidate tiles for ``m`` rows on ``target`` (a Triton GPU target,
    its name, a GpuTarget, or "interp"), the default first."""
    gpu = gpu_target(target)
    if gpu.interpreter:
        return INTERP, (INTERPRETER_CONFIG,)
    name = bucket_of("intweight", m)
    return name, tiles_for(gpu, "intweight", name, {})


def config_for(target, m: int) -> TileConfig:
    """The default tile config for ``m`` rows on ``target`` (what runs untuned)."""
    return candidates_for(target, m)[1][0]


def supports(enc, target) -> str | None:
    """None when this module runs ``enc`` for ``target``, else why not (naming the feature)."""
    from nnforge.ir.encodings import IntQuant
    why = unsupported(enc, target, IntQuant, FORMAT)
    if why is not None:
        return why
    if enc.bits not in (4, 8):
        return f"{enc.bits}-bit codes (int-weight runs 4- and 8-bit codes)"
    if len(enc.shape) != 2:
        return f"{len(enc.shape)}-D weight of shape {enc.shape} (int-weight runs 2-D [N, K] weights)"
    k = enc.shape[1]
    if enc.scale.shape[1] > 1 and (enc.group_size % 16 or k % enc.group_size):
        return f"group_size {enc.group_size} for K={k} (groups must be a multiple of 16 dividing K)"
    if not torch.isfinite(enc.scale).all() or float(enc.scale.abs().max()) > _FP16_MAX:
        return "scales beyond the fp16 range (int-weight stores fp16 scales)"
    if enc.zero_point is not None:
        z = enc.zero_point.to(torch.int64) + ((1 << (enc.bits - 1)) if enc.signed else 0)
        if int(z.min()) < 0 or int(z.max()) > (1 << enc.bits) - 1:
            return f"zero points outside the {enc.bits}-bit code range"
    return None


def pack(enc, target) -> PackedWeight:
    """Re-lay an IntQuant weight for the kernel (see the module docstring for the layout).

    >>> w = pack(IntQuant.quantize(torch.randn(96, 256), 4, group_size=128), "h100")
    >>> w.tensors["qweight"].shape, w.tensors["scale"].shape
    (torch.Size([2, 32, 64]), torch.Size([2, 96]))
    """
    why = supports(enc, target)
    if why is not None:
        raise KernelError(f"int-weight cannot pack this weight: {why}")
    n, k = enc.shape
    bits, per_word = enc.bits, 32 // enc.bits
    kw, panels = -(-k // per_word), -(-n // PANEL)
    codes = torch.zeros(panels * PANEL, kw * 4, dtype=torch.uint8)
    codes[:n, : enc.codes.shape[1]] = enc.codes
    if sys.byteorder != "little":    # the bytes are read back as little-endian words
        raise KernelError("int-weight packing needs a little-endian host")
    qweight = codes.view(torch.int32).reshape(panels, PANEL, kw).transpose(1, 2).contiguous()
    groups = enc.scale.shape[1]
    scale = enc.scale.to(torch.float32).expand(n, groups).t().to(torch.float16).contiguous()
    tensors = {"qweight": qweight, "scale": scale}
    offset = (1 << (bits - 1)) if enc.signed else 0
    if enc.zero_point is not None:
        zero = enc.zero_point.to(torch.int64).expand(n, groups) + offset
        tensors["zero"] = zero.t().to(torch.float16).contiguous()
    if enc.perm is not None:
        tensors["perm"] = enc.perm.to(torch.int32).contiguous()
    meta = {"layout": f"qweight int32 [N/{PANEL}, K/{per_word}, {PANEL}] K-major panels, low bits first; "
                      "scale/zero fp16 [G, N]; perm int32 [K]",
            "bits": bits, "group_size": enc.group_size if groups > 1 else k, "groups": groups,
            "zero_const": None if enc.zero_point is not None else offset, "act_order": enc.perm is not None,
            "target": getattr(target, "name", target)}
    return PackedWeight(FORMAT, n, k, tensors, meta)


# --------------------------------------------------------------------------------------------------
# The kernel.

@triton.jit
def intweight_kernel(x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr,
                     M, N, K, KW, NP, tiles_per_split,
                     BITS: tl.constexpr, GROUP: tl.constexpr, ZERO_CONST: tl.constexpr,
                     HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BF16: tl.constexpr, UPCAST_DOT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PANEL_N: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K // PER_WORD
    # GROUP == 0: one group over all K (per channel / tensor).
    WHOLE_TILE: tl.constexpr = GROUP == 0 or GROUP >= BLOCK_K
    DOT_T: tl.constexpr = tl.bfloat16 if BF16 else tl.float16

    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Word (i, c) of panel p sits at (p * KW + i) * PANEL_N + c.
    q_cols = (offs_n // PANEL_N) * KW * PANEL_N + offs_n % PANEL_N
    shifts = tl.arange(0, PER_WORD) * BITS

    if GROUP == 0:
        s_all = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z_all = tl.load(z_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        else:
            z_all = tl.full((BLOCK_N,), ZERO_CONST, tl.float32)
        c_all = (z_all + 1024.0).to(tl.float16)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, (K + BLOCK_K - 1) // BLOCK_K)
    for t in range(t0, t1):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs_k, mask=k_ok, other=0)
        else:
            cols = offs_k
        x = tl.load(x_ptr + offs_m[:, None] * K + cols[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        offs_w = t * BKW + tl.arange(0, BKW)
        words = tl.load(q_ptr + offs_w[:, None] * PANEL_N + q_cols[None, :],
                        mask=(offs_w < KW)[:, None] & (offs_n < NP)[None, :], other=0)
        q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        # Exact: (q | 0x6400) read as fp16 is 1024 + q, and v - (1024 + zero) an exact small integer,
        # which bf16 also holds exactly (|d| <= 255).
        v = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        if WHOLE_TILE:
            if GROUP == 0:
                c = c_all
                s = s_all
            else:
                g = (t * BLOCK_K) // GROUP
                s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                else:
                    z = tl.full((BLOCK_N,), ZERO_CONST, tl.float32)
                c = (z + 1024.0).to(tl.float16)
            d = (v - c[None, None, :]).to(DOT_T)
            w = tl.reshape(d, (BLOCK_K, BLOCK_N))
            # Triton 3.9's interpreter multiplies bf16 dot operands as their uint16 bit patterns;
            # bf16 products are exact in fp32, so an fp32 dot there gives what tensor cores give.
            if UPCAST_DOT:
                part = tl.dot(x.to(tl.float32), w.to(tl.float32))
            else:
                part = tl.dot(x, w)
            acc += part * s[None, :]
        else:
            offs_g = (t * BLOCK_K) // GROUP + tl.arange(0, BLOCK_K // GROUP)
            g_mask = (offs_g < (K + GROUP - 1) // GROUP)[:, None] & n_ok[None, :]
            g_ptrs = offs_g[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + g_ptrs, mask=g_mask, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + g_ptrs, mask=g_mask, other=0.0).to(tl.float32)
            else:
                z = tl.full((BLOCK_K // GROUP, BLOCK_N), ZERO_CONST, tl.float32)
            c = (z + 1024.0).to(tl.float16)
            # Per-group rows -> one row per word row: [BLOCK_K/GROUP, BN] -> [BKW, 1, BN].
            c = tl.reshape(tl.broadcast_to(c[:, None, :], (BLOCK_K // GROUP, GROUP // PER_WORD, BLOCK_N)),
                           (BKW, BLOCK_N))[:, None, :]
            s = tl.reshape(tl.broadcast_to(s[:, None, :], (BLOCK_K // GROUP, GROUP // PER_WORD, BLOCK_N)),
                           (BKW, BLOCK_N))[:, None, :]
            d = v - c
            # One rounding either way; sm_80 has no bf16 multiply, so bf16 scales in fp32.
            if BF16:
                w = (d.to(tl.float32) * s.to(tl.float32)).to(tl.bfloat16)
            else:
                w = d * s
            w = tl.reshape(w, (BLOCK_K, BLOCK_N))
            if UPCAST_DOT:
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
            else:
                acc = tl.dot(x, w, acc)

    finish_tile(acc, y_ptr, part_ptr, lock_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, M, N, pid, pid_k,
                HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def finish_tile(acc, y_ptr, part_ptr, lock_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, M, N, pid, pid_k,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The epilogue of an fp32 output tile (this module's and intact's kernels): the bias and a
    store in y's dtype; with SPLIT_K > 1 the partial goes to ``part_ptr`` and the last split of the
    tile to arrive sums all of them in split order (deterministic), adds the bias, stores y and
    resets the tile's counter."""
    y_ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        p_ptrs = part_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(p_ptrs + pid_k * M * N, acc, mask=y_mask)
        # acq_rel: our partial is visible before the count, and the last CTA sees all of them.
        arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            for s_ in range(SPLIT_K):
                total += tl.load(p_ptrs + s_ * M * N, mask=y_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(lock_ptr + pid, 0)


# --------------------------------------------------------------------------------------------------
# Host side.

_LOCKS: dict[torch.device, torch.Tensor] = {}
_REQUIRED_META = ("bits", "group_size", "groups", "zero_const", "act_order")


def _locks(device: torch.device, count: int) -> torch.Tensor:
    buf = _LOCKS.get(device)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _LOCKS[device] = buf
    return buf


def _block_k(cfg: TileConfig, k: int, group: int) -> int:
    """The config's BLOCK_K, shrunk for a short K, and made to nest with the groups (a tile lies
    inside one group or holds whole groups)."""
    bk = min(cfg.block_k, max(16, triton.next_power_of_2(k)))
    if group and group % bk and bk % group:
        bk = math.gcd(bk, group)
    return bk


def _split_k(tiles_mn: int, k_tiles: int, m: int, sms: int) -> int:
    """About two waves of CTAs over the SMs, each split keeping >= 2 K tiles to pipeline."""
    if m > SPLIT_M_MAX or k_tiles < 4:
        return 1
    want = -(-2 * sms // tiles_mn)
    return max(1, min(want, k_tiles // 2, _MAX_SPLIT))


def check_packed(w) -> None:
    """KernelError unless ``w`` is an int-weight PackedWeight holding every tensor its meta asks
    for, in the shapes of the layout (the weight half of the operand checks; intact's too)."""
    need = ["qweight", "scale"]
    if isinstance(w, PackedWeight) and w.meta.get("zero_const", 0) is None:
        need.append("zero")
    if isinstance(w, PackedWeight) and w.meta.get("act_order"):
        need.append("perm")
    check_weight(w, FORMAT, tuple(need), _REQUIRED_META)
    bits, per_word = w.meta["bits"], 32 // max(w.meta["bits"], 1)
    want = (-(-w.n // PANEL), -(-w.k // per_word), PANEL)
    q = w.tensors["qweight"]
    if bits not in (4, 8) or q.dtype != torch.int32 or tuple(q.shape) != want:
        raise KernelError(f"qweight must be int32 {want} for {bits}-bit codes of a [{w.n}, {w.k}] weight, got "
                          f"{q.dtype} {tuple(q.shape)}")
    if tuple(w.tensors["scale"].shape) != (w.meta["groups"], w.n):
        raise KernelError(f"scale must be [{w.meta['groups']}, {w.n}], got {tuple(w.tensors['scale'].shape)}")


def _check(x, w, bias) -> None:
    check_packed(w)
    check_operands(x, w, bias, FORMAT)


def matmul(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, *,
           split_k: int | None = None) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W.T (+ bias) in x's dtype, W the packed weight's decoded IntQuant.

    ``split_k`` overrides the split-K heuristic (1 turns it off).

    >>> y = matmul(torch.randn(4, 256, dtype=torch.float16, device="cuda"), pack(enc, "h100").to("cuda"))
    """
    _check(x, w, bias)
    check_split_k(split_k)
    m, n, k = x.shape[0], w.n, w.k
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    if n == 0 or k == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    x = x.contiguous()
    gpu = runtime_target(x)
    name, cands = candidates_for(gpu, m)
    cfg = autotune(FORMAT, gpu.name, tune_key(name, m, x.dtype, w, bias is not None, split_k), cands,
                   lambda c: _launch(x, w, bias, c, split_k, gpu), reset=lambda: _locks(x.device, 0).zero_())
    return _launch(x, w, bias, cfg, split_k, gpu)


def _launch(x: torch.Tensor, w: PackedWeight, bias, cfg: TileConfig, split_k: int | None,
            target) -> torch.Tensor:
    """One launch under ``cfg`` into fresh outputs (what an autotuning trial runs) on ``target``
    (a GpuTarget, or anything :func:`.common.gpu_target` takes)."""
    gpu = gpu_target(target)
    m, n, k = x.shape[0], w.n, w.k
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    meta = w.meta
    group = 0 if meta["groups"] == 1 else meta["group_size"]
    bk = _block_k(cfg, k, group)
    k_tiles = -(-k // bk)
    tiles_mn = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    split = _split_k(tiles_mn, k_tiles, m, gpu.sms) if split_k is None else min(split_k, k_tiles)
    per_split = -(-k_tiles // split)
    split = -(-k_tiles // per_split)           # no empty splits
    q = w.tensors["qweight"]
    scale = w.tensors["scale"]
    zero = w.tensors.get("zero", scale)
    perm = w.tensors.get("perm", q)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    locks = _locks(x.device, tiles_mn) if split > 1 else q
    intweight_kernel[(tiles_mn, split)](
        x, q, scale, zero, perm, bias if bias is not None else scale, y, part, locks,
        m, n, k, q.shape[1], q.shape[0] * PANEL, per_split,
        BITS=meta["bits"], GROUP=group, ZERO_CONST=meta["zero_const"] or 0,
        HAS_ZERO=meta["zero_const"] is None, HAS_PERM=bool(meta["act_order"]), HAS_BIAS=bias is not None,
        BF16=x.dtype == torch.bfloat16,
        UPCAST_DOT=x.dtype == torch.bfloat16 and gpu.interpreter,
        SPLIT_K=split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk,
        PANEL_N=PANEL, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def compile_spec(cfg: TileConfig, *, bits: int = 4, group: int = 128, dtype: str = "fp16", split_k: int = 1,
                 has_zero: bool = False, has_perm: bool = False, has_bias: bool = True):
    """``(kernel, signature, constexprs)`` for ``kernels.compile_for`` (ahead-of-time builds):

    >>> fn, sig, consts = compile_spec(config_for("h100", 4))
    >>> compile_for(fn, sig, consts, 90, num_warps=4, num_stages=4)
    """
    fn = intweight_kernel
    act = "bf16" if dtype == "bf16" else "fp16"
    sig = {"x_ptr": f"*{act}", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "perm_ptr": "*i32",
           "bias_ptr": f"*{act}", "y_ptr": f"*{act}", "part_ptr": "*fp32", "lock_ptr": "*i32",
           "M": "i32", "N": "i32", "K": "i32", "KW": "i32", "NP": "i32", "tiles_per_split": "i32"}
    consts = {"BITS": bits, "GROUP": group, "ZERO_CONST": 0 if has_zero else 1 << (bits - 1), "HAS_ZERO": has_zero,
              "HAS_PERM": has_perm, "HAS_BIAS": has_bias, "BF16": dtype == "bf16", "UPCAST_DOT": False,
              "SPLIT_K": split_k,
              "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "PANEL_N": PANEL}
    sig.update({name: "constexpr" for name in consts})
    return fn, sig, consts


__all__ = ["FORMAT", "INTERPRETER_CONFIG", "candidates_for", "config_for", "supports", "pack", "matmul",
           "check_packed", "finish_tile", "compile_spec"]

"""What every kernel module needs besides its kernel: the tile config type, the GPU a call runs on
and its SM count (read from ``nnforge/targets``, never written here), the operand checks, and the
split-K launch plumbing of the kernels that add fp32 partials atomically (minifloat, lut).

    >>> target = runtime_target(x)                  # "interp", "a100" or "h100"
    >>> check_operands(x, w, bias, "minifloat", ("p0", "scale"))
    >>> split = choose_split(m, n, k, cfg, target, split_k=None)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import KernelError, PackedWeight, interpreting

INTERP = "interp"              # the config key of Triton's CPU interpreter
# The interpreter runs programs one after another, so its "SM count" only decides how far split-K
# is exercised in tests: a few is enough, and keeps the programs few.
INTERP_SMS = 4
GPU_TARGETS = ("a100", "h100")
SMALL_M = 16                   # rows up to which a GEMM is a weight stream ("decode")


@dataclass(frozen=True)
class TileConfig:
    """One launch shape: the output tile (block_m x block_n), the K step, warps and pipeline stages."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def target_sms(target: str) -> int:
    """SMs of ``target`` as its ``nnforge/targets/<target>.toml`` states them (``compute.sms``);
    the interpreter's small fixed count for ``"interp"``.

    >>> target_sms("h100")
    132"""
    if target == INTERP:
        return INTERP_SMS
    from ....targets import get_target
    sms = get_target(target).compute.get("sms")
    if not sms:
        raise KernelError(f"target {target!r} states no compute.sms in its targets/{target}.toml; the split-K "
                          "heuristics need it")
    return int(sms)


@functools.lru_cache(maxsize=None)
def native_formats(target: str) -> frozenset:
    """The number formats ``target``'s tensor cores take (``formats.native`` in its toml); none
    for the interpreter, which decodes everything the portable way."""
    if target == INTERP:
        return frozenset()
    from ....targets import get_target
    return frozenset(get_target(target).formats.get("native", ()))


@functools.lru_cache(maxsize=None)
def _capabilities() -> tuple[tuple[tuple[int, int], str], ...]:
    from ....targets import get_target
    caps = []
    for name in GPU_TARGETS:
        major, minor = str(get_target(name).options["compute_capability"]).split(".")
        caps.append(((int(major), int(minor)), name))
    return tuple(sorted(caps))


def runtime_target(x: torch.Tensor) -> str:
    """Config key for where ``x`` runs: ``"interp"``, or the newest GPU target whose compute
    capability (``options.compute_capability`` in its toml) the device of ``x`` has."""
    if interpreting():
        return INTERP
    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        raise KernelError(f"x is on {getattr(x, 'device', type(x).__name__)}; Triton kernels need a CUDA tensor "
                          f"(or TRITON_INTERPRET=1 set before triton is imported)")
    have = torch.cuda.get_device_capability(x.device)
    fits = [name for cap, name in _capabilities() if cap <= have]
    if not fits:
        raise KernelError(f"GPU of compute capability {have[0]}.{have[1]} is older than every Triton target "
                          f"({', '.join(GPU_TARGETS)})")
    return fits[-1]


def unsupported(enc, target: str, cls: type, fmt: str) -> str | None:
    """Why a module cannot take ``enc`` for ``target`` on the grounds every module checks first:
    Triton missing, a target that is not a Triton GPU, an encoding of another class; else None."""
    if triton is None:
        return f"Triton is not installed (the {fmt} GEMM is a Triton kernel)"
    if target not in GPU_TARGETS:
        return f"target {target!r} is not a Triton GPU target (known: {', '.join(GPU_TARGETS)})"
    if not isinstance(enc, cls):
        return f"{fmt} kernels take {cls.__name__} encodings, got a {getattr(enc, 'kind', type(enc).__name__)} encoding"
    return None


def check_weight(w, fmt: str, need: tuple[str, ...] = (), meta: tuple[str, ...] = ()) -> None:
    """KernelError unless ``w`` is a PackedWeight of ``fmt`` with tensors ``need`` and meta keys ``meta``."""
    if not isinstance(w, PackedWeight) or w.format != fmt:
        got = w.format if isinstance(w, PackedWeight) else type(w).__name__
        raise KernelError(f"the {fmt} kernel needs a PackedWeight of format {fmt!r}, got {got!r}")
    missing = [t for t in need if t not in w.tensors] + [f"meta[{k!r}]" for k in meta if k not in w.meta]
    if missing:
        raise KernelError(f"{fmt} PackedWeight lacks {', '.join(missing)}; rebuild it with pack()")


def check_bias(bias, n: int) -> None:
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)
                             or not bias.is_floating_point()):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise KernelError(f"bias must be a float tensor of shape ({n},), got {got}")


def check_operands(x, w, bias, fmt: str, need: tuple[str, ...] = (), meta: tuple[str, ...] = (), *,
                   leading_dims: bool = False) -> None:
    """KernelError naming what is wrong with the operands of a weight GEMM: the packed weight
    (:func:`check_weight`), x (2-D [M, K], or [..., K] with ``leading_dims``; fp16/bf16; K
    columns), the bias, and every tensor on x's device."""
    check_weight(w, fmt, need, meta)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or (x.dim() != 2 and not leading_dims):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelError(f"x must be a {'[..., K]' if leading_dims else '2-D [M, K]'} tensor, got {got}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise KernelError(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] != w.k:
        raise KernelError(f"x has {x.shape[-1]} columns but the weight has K={w.k} (weight is [{w.n}, {w.k}])")
    check_bias(bias, w.n)
    for name, t in [("bias", bias), *w.tensors.items()]:
        if t is not None and t.device != x.device:
            raise KernelError(f"x is on {x.device} but {name} is on {t.device}; move the weight with .to()")


def check_split_k(split_k) -> None:
    if split_k is not None and (not isinstance(split_k, int) or isinstance(split_k, bool) or split_k < 1):
        raise KernelError(f"split_k must be a positive integer or None, got {split_k!r}")


# --- split-K with atomically added fp32 partials (minifloat, lut) --------------------------------
def pick(configs: dict, target: str, m: int) -> TileConfig:
    """The "decode" (M <= SMALL_M) or "gemm" tile of ``configs[target]``."""
    return configs[target]["decode" if m <= SMALL_M else "gemm"]


def choose_split(m: int, n: int, k: int, cfg: TileConfig, target: str, split_k: int | None) -> int:
    """How many programs share one output tile's K range: enough to give every SM two tiles at
    small M, never so many that a program gets fewer than two K steps."""
    check_split_k(split_k)
    steps = -(-k // cfg.block_k)
    if split_k is not None:
        return min(split_k, steps)
    if m > SMALL_M:
        return 1
    tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
    split = 1
    while tiles * split * 2 <= 2 * target_sms(target) and steps // (split * 2) >= 2:
        split *= 2
    return split


def k_per_split(k: int, cfg: TileConfig, split: int) -> int:
    """Columns of K each split walks, a whole number of K steps."""
    return -(-(-(-k // cfg.block_k)) // split) * cfg.block_k


def launch_out(x: torch.Tensor, n: int, split: int) -> torch.Tensor:
    """Split-K partials add into fp32 zeros; otherwise the kernel writes x's dtype directly."""
    return torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device) if split > 1 else \
        torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)


@dataclass
class SplitLaunch:
    """Where and how a split-K GEMM of x [M, K] by an [N, K] weight launches (:func:`split_launch`)."""
    target: str
    cfg: TileConfig
    split: int
    k_split: int                # K columns per split
    y: torch.Tensor             # what the kernel writes
    grid: tuple[int, int, int]  # (N tiles, M tiles, splits)

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self.y.to(dtype) if self.split > 1 else self.y


def split_launch(x: torch.Tensor, n: int, configs: dict, split_k: int | None) -> SplitLaunch:
    """The launch of a split-K kernel for x on its runtime target with that target's ``configs``.

    >>> L = split_launch(x, w.n, CONFIGS, None); kernel[L.grid](..., L.y, ..., L.k_split, ...)"""
    target = runtime_target(x)
    m, k = x.shape
    cfg = pick(configs, target, m)
    split = choose_split(m, n, k, cfg, target, split_k)
    return SplitLaunch(target, cfg, split, k_per_split(k, cfg, split), launch_out(x, n, split),
                       (-(-n // cfg.block_n), -(-m // cfg.block_m), split))


try:
    import triton
    import triton.language as tl
except ImportError:                    # the helpers above still serve supports() and pack()
    triton = None

if triton is not None:
    @triton.jit
    def mma(x, w, acc, BF16_IN_FP32: tl.constexpr):
        """acc + x @ w; BF16_IN_FP32 (interpreter only) multiplies bf16 operands as fp32, since
        Triton 3.9's interpreter returns garbage for a bf16 tl.dot."""
        if BF16_IN_FP32:
            return tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        return tl.dot(x, w, acc)

    @triton.jit
    def store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, N, pid_k,
                   HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
        """The epilogue of a split-K tile: the bias, added by the first K split only, then a store
        in y's dtype, or an atomic add of the fp32 partial when SPLIT > 1."""
        if HAS_BIAS:
            n_bias = tl.where(pid_k == 0, N, 0)
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < n_bias, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT > 1:
            tl.atomic_add(y_ptrs, acc, mask=mask)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


__all__ = ["TileConfig", "INTERP", "INTERP_SMS", "SMALL_M", "GPU_TARGETS", "target_sms", "native_formats",
           "runtime_target", "unsupported", "check_weight", "check_bias", "check_operands", "check_split_k", "pick",
           "choose_split", "k_per_split", "launch_out", "SplitLaunch", "split_launch"]

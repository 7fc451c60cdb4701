"""What every kernel module needs besides its kernel: the tile config type, the GPU a kernel is
built or run for (:class:`GpuTarget`: everything about it read from ``nnforge/targets``, never
written here), the operand checks, the split-K launch plumbing of the kernels that add fp32
partials atomically (minifloat, lut), and the autotuner that picks each call's tile config from
the candidates the GPU's architecture file lists (:func:`autotune`).

    >>> gpu = runtime_target(x)                     # the interpreter, or the GPU x is on
    >>> check_operands(x, w, bias, "minifloat", ("p0", "scale"))
    >>> cands = tiles_for(gpu, "lut", bucket_of("lut", m), minifloat.INTERP_TILES)
    >>> cfg = autotune("lut", gpu.name, key, cands, lambda c: launch(x, w, c))
    >>> split = choose_split(m, n, k, cfg, gpu, split_k=None)
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from . import KernelError, PackedWeight, interpreting

if TYPE_CHECKING:
    from ....targets.architectures import GpuArch

INTERP = "interp"              # the name of Triton's CPU interpreter as a GpuTarget
# The interpreter runs programs one after another, so its "SM count" only decides how far split-K
# is exercised in tests: a few is enough, and keeps the programs few.
INTERP_SMS = 4
SMALL_M = 16                   # rows up to which a GEMM is a weight stream ("decode")
# The M buckets of each kernel family, (name, largest M; None: every larger M). The tile candidates
# of each bucket are data: ``[tiles.<family>] <bucket>`` in every GPU architecture file
# (nnforge/targets/gpu/); "fp8act" (minifloat's fp8 x fp8 path) only where there are fp8 tensor cores.
BUCKETS = {
    "intweight": (("decode", SMALL_M), ("prefill", 64), ("gemm", None)),
    "intact": (("decode", SMALL_M), ("prefill", 64), ("gemm", None)),
    "minifloat": (("decode", SMALL_M), ("gemm", None)),
    "fp8act": (("decode", SMALL_M), ("gemm", None)),
    "lut": (("decode", SMALL_M), ("gemm", None)),
    "sparse24": (("decode", SMALL_M), ("gemm", None)),
}
FP8_FAMILIES = ("fp8act",)


@dataclass(frozen=True)
class TileConfig:
    """One launch shape: the output tile (block_m x block_n), the K step, warps and pipeline stages."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class GpuTarget:
    """The GPU a kernel is built or run for, as the kernels see it: ``name`` (a target's name, a
    device's name, or "interp"; only messages and autotuning keys read it), its SM count and its
    architecture file (:class:`nnforge.targets.architectures.GpuArch`: tiles, fp8 tensor cores),
    which is None for Triton's interpreter.

    >>> gpu_target("h100").native_fp8, gpu_target("h100").arch.name
    (True, 'sm_90')"""
    name: str
    sms: int
    arch: GpuArch | None = None

    @property
    def interpreter(self) -> bool:
        return self.arch is None

    @property
    def native_fp8(self) -> bool:
        """Whether e4m3 codes convert and multiply natively (fp8 tensor cores); never in the interpreter."""
        return self.arch is not None and self.arch.fp8_tensor_cores

    def describe(self) -> str:
        if self.arch is None:
            return "Triton's interpreter"
        return f"{self.name} ({self.arch.name}, {self.arch.description})"


INTERP_GPU = GpuTarget(INTERP, INTERP_SMS)


def check_tiles(arch) -> None:
    """KernelError naming ``arch``'s file unless it lists candidates for every kernel family and
    M bucket in :data:`BUCKETS` (fp8act only with fp8 tensor cores) and nothing else."""
    need = {f: {b for b, _ in bs} for f, bs in BUCKETS.items() if f not in FP8_FAMILIES or arch.fp8_tensor_cores}
    known = {f: {b for b, _ in bs} for f, bs in BUCKETS.items()}
    problems = [f"[tiles.{f}] has no {b} = [...]" for f, bs in need.items() for b in sorted(bs)
                if b not in arch.tiles.get(f, {})]
    problems += [f"[tiles.{f}] is not a kernel family (families: {', '.join(BUCKETS)})" for f in arch.tiles
                 if f not in known]
    problems += [f"[tiles.{f}] {b} is not one of its M buckets ({', '.join(sorted(known[f]))})"
                 for f, bs in arch.tiles.items() if f in known for b in bs if b not in known[f]]
    if problems:
        raise KernelError(f"{arch.path}: " + "; ".join(problems))


def gpu_target(target) -> GpuTarget:
    """The :class:`GpuTarget` of ``target``: a Triton GPU target (a name, or a ``Target``),
    :data:`INTERP`, or a GpuTarget already. KernelError when it is not a Triton GPU target or its
    files lack what the kernels need (the message names the file).

    >>> gpu_target("a100").sms
    108"""
    if isinstance(target, GpuTarget):
        return target
    if isinstance(target, str) and target == INTERP:
        return INTERP_GPU
    from ....targets import TargetError, get_target
    from ....targets.architectures import arch_of
    try:
        t = get_target(target)
    except TargetError as e:
        raise KernelError(str(e)) from None
    if t.backend != "triton":
        raise KernelError(f"target {t.name!r} is not a Triton GPU target (its backend is {t.backend!r})")
    try:
        arch = arch_of(t)
    except TargetError as e:
        raise KernelError(str(e)) from None
    sms = t.compute.get("sms")
    if not isinstance(sms, int) or isinstance(sms, bool) or sms < 1:
        raise KernelError(f"{t.path}: target {t.name} states no [compute] sms (a positive integer); the split-K "
                          "heuristics need it")
    check_tiles(arch)
    return GpuTarget(t.name, sms, arch)


def device_gpu(name: str, capability: tuple[int, int], sms: int) -> GpuTarget:
    """The :class:`GpuTarget` of a CUDA device: its own name and SM count, and the architecture
    file of its compute capability (for one with no file of its own, the newest older one, whose
    code it runs)."""
    from ....targets.architectures import arch_for_capability, gpu_archs
    arch = arch_for_capability(capability)
    if arch is None:
        raise KernelError(f"{name}: compute capability {capability[0]}.{capability[1]} is older than every GPU "
                          f"architecture nnforge has a file for ({', '.join(a.name for a in gpu_archs())})")
    check_tiles(arch)
    return GpuTarget(name, sms, arch)


@functools.lru_cache(maxsize=None)
def _device_gpu(index: int, targets_path: str) -> GpuTarget:
    props = torch.cuda.get_device_properties(index)
    return device_gpu(props.name, (props.major, props.minor), props.multi_processor_count)


def target_sms(target) -> int:
    """SMs of ``target`` (see :func:`gpu_target`): its TOML's ``compute.sms``, a device's own
    count, or the interpreter's small fixed one.

    >>> target_sms("h100")
    132"""
    return gpu_target(target).sms


def runtime_target(x: torch.Tensor) -> GpuTarget:
    """Where ``x`` runs: Triton's interpreter (:data:`INTERP_GPU`), or the CUDA device of ``x``
    (:func:`device_gpu`)."""
    if interpreting():
        return INTERP_GPU
    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        raise KernelError(f"x is on {getattr(x, 'device', type(x).__name__)}; Triton kernels need a CUDA tensor "
                          f"(or TRITON_INTERPRET=1 set before triton is imported)")
    from ....targets import PATH_ENV
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _device_gpu(index, os.environ.get(PATH_ENV, ""))


def tiles_for(gpu: GpuTarget, family: str, bucket_name: str, interp: dict) -> tuple[TileConfig, ...]:
    """The candidate tiles of kernel ``family`` for M bucket ``bucket_name`` on ``gpu``, the
    default first: its architecture file's ``[tiles.<family>] <bucket>``, or ``interp[bucket]``
    in Triton's interpreter.

    >>> tiles_for(gpu_target("h100"), "minifloat", "decode", minifloat.INTERP_TILES)[0]
    TileConfig(block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=4)"""
    if gpu.arch is None:
        return interp[bucket_name]
    rows = gpu.arch.tiles.get(family, {}).get(bucket_name)
    if not rows:
        raise KernelError(f"{gpu.arch.path}: no [tiles.{family}] {bucket_name} = [...] tile candidates")
    return tuple(TileConfig(*r) for r in rows)


def bucket_of(family: str, m: int) -> str:
    """The M bucket of ``m`` rows for kernel ``family`` (:data:`BUCKETS`)."""
    for name, max_m in BUCKETS[family]:
        if max_m is None or m <= max_m:
            return name
    raise AssertionError(f"BUCKETS[{family!r}] must end with an open bucket")


def unsupported_target(target, what: str) -> str | None:
    """Why no Triton kernel (``what``, for the message) runs for ``target``: Triton missing, or a
    target that is not a Triton GPU; else None. A Triton GPU target whose files lack what the
    kernels need raises (KernelError)."""
    if triton is None:
        return f"Triton is not installed (the {what} is a Triton kernel)"
    if not isinstance(target, GpuTarget) and target != INTERP:
        from ....targets import TargetError, get_target
        try:
            backend = get_target(target).backend
        except TargetError as e:
            return str(e)
        if backend != "triton":
            return f"target {getattr(target, 'name', target)!r} is not a Triton GPU target (its backend is {backend!r})"
    gpu_target(target)
    return None


def unsupported(enc, target, cls: type, fmt: str) -> str | None:
    """Why a module cannot take ``enc`` for ``target`` on the grounds every module checks first:
    :func:`unsupported_target`, or an encoding of another class; else None."""
    why = unsupported_target(target, f"{fmt} GEMM")
    if why is not None:
        return why
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


X_DTYPES = (torch.float16, torch.bfloat16)


def check_operands(x, w, bias, fmt: str, need: tuple[str, ...] = (), meta: tuple[str, ...] = (), *,
                   leading_dims: bool = False, dtypes: tuple[torch.dtype, ...] = X_DTYPES) -> None:
    """KernelError naming what is wrong with the operands of a weight GEMM: the packed weight
    (:func:`check_weight`), x (2-D [M, K], or [..., K] with ``leading_dims``; one of ``dtypes``,
    fp16/bf16 unless the kernel takes more; K columns), the bias, and every tensor on x's device."""
    check_weight(w, fmt, need, meta)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or (x.dim() != 2 and not leading_dims):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelError(f"x must be a {'[..., K]' if leading_dims else '2-D [M, K]'} tensor, got {got}")
    if x.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise KernelError(f"x must be {names}, got {x.dtype}")
    if x.shape[-1] != w.k:
        raise KernelError(f"x has {x.shape[-1]} columns but the weight has K={w.k} (weight is [{w.n}, {w.k}])")
    check_bias(bias, w.n)
    for name, t in [("bias", bias), *w.tensors.items()]:
        if t is not None and t.device != x.device:
            raise KernelError(f"x is on {x.device} but {name} is on {t.device}; move the weight with .to()")


def check_split_k(split_k) -> None:
    if split_k is not None and (not isinstance(split_k, int) or isinstance(split_k, bool) or split_k < 1):
        raise KernelError(f"split_k must be a positive integer or None, got {split_k!r}")


# --- autotuning ----------------------------------------------------------------------------------
# Each GPU architecture file lists, per kernel family and M bucket, a short tuple of candidate
# tiles, the hand-picked default first. On a GPU the first call with a new key times every
# candidate on the real operands and keeps the fastest for the rest of the process; under the
# interpreter (and so in the tests) the default runs with no timing, since interpreter times say
# nothing about a GPU. The choice is kept in
# memory only: a JSON cache would have to be keyed by driver, Triton version and kernel source to be
# safe, and a few hundred milliseconds per layer shape once per process is cheap next to loading.
AUTOTUNE_ENV = "NNFORGE_TRITON_AUTOTUNE"     # "0": always the default tile (reproducible benchmarks)


def _do_bench(fn: Callable[[], object]) -> float:
    """Milliseconds per call of ``fn`` on the GPU (Triton's own timer, L2 flushed between calls);
    short windows, since a candidate only has to be told apart from a few others."""
    return triton.testing.do_bench(fn, warmup=5, rep=20)


class Autotuner:
    """Picks the fastest of a key's candidate configs once and remembers it.

    ``bench(fn)`` times a zero-argument launch (default: ``triton.testing.do_bench``); it is a
    parameter so the selection logic can be tested on the CPU with made-up times.

    >>> tuner = Autotuner(bench=lambda fn: 1.0)
    >>> tuner.choose(("lut", gpu.name, "decode", 4096, 4096), cands, lambda c: launch(x, w, c))"""

    def __init__(self, bench: Callable[[Callable[[], object]], float] | None = None):
        self.bench = bench or _do_bench
        self.best: dict[tuple, TileConfig] = {}
        self.times: dict[tuple, dict[TileConfig, float]] = {}      # what was measured, for reports

    def choose(self, key: tuple, candidates: Sequence[TileConfig], trial: Callable[[TileConfig], object], *,
               reset: Callable[[], object] | None = None) -> TileConfig:
        """The fastest candidate for ``key``, measured on the first call only. ``trial(cfg)`` runs
        one whole launch under ``cfg``: it must allocate its own outputs (split-K's fp32 zeros,
        partial buffers), so no repetition adds onto another's partial sums. ``reset`` runs before
        each candidate and after one that failed, to restore state that outlives a launch (the
        int-weight lock counters, which a launch that died mid-way may leave non-zero). A
        candidate that fails to compile or run is skipped; if all fail, the default (first) is
        kept, and the caller's real launch then raises the real error."""
        if key in self.best:
            return self.best[key]
        times: dict[TileConfig, float] = {}
        for cfg in candidates:
            if reset is not None:
                reset()
            try:
                times[cfg] = float(self.bench(lambda cfg=cfg: trial(cfg)))
            except Exception:          # noqa: BLE001 - e.g. OutOfResources: not a candidate here
                if reset is not None:
                    reset()
        best = min(times, key=times.get) if times else candidates[0]
        self.best[key], self.times[key] = best, times
        return best


TUNER = Autotuner()                  # the process's choices, shared by every kernel module


def autotune(kernel: str, target: str, key: tuple, candidates: Sequence[TileConfig],
             trial: Callable[[TileConfig], object], *, reset: Callable[[], object] | None = None) -> TileConfig:
    """The tile config to launch ``kernel`` with on the GPU named ``target`` (a GpuTarget's
    name: part of the key only): ``candidates[0]`` under the interpreter, with one candidate, or
    with ``NNFORGE_TRITON_AUTOTUNE=0``; otherwise :data:`TUNER`'s choice for ``(kernel, target,
    *key)`` (see :meth:`Autotuner.choose`). ``key`` holds what changes the best tile besides the
    GPU: M's bucket, N, K, dtype, format options.

    >>> cfg = autotune("minifloat", gpu.name, ("decode", m_class(m), n, k, x.dtype), cands, trial)"""
    if target == INTERP or len(candidates) == 1 or os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return candidates[0]
    if _capturing():
        # Timing synchronises, which a CUDA graph capture forbids: use what is known. The launcher
        # runs a shape eagerly before capturing it, so the choice is normally made by then.
        return TUNER.best.get((kernel, target, *key), candidates[0])
    return TUNER.choose((kernel, target, *key), candidates, trial, reset=reset)


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def m_class(m: int) -> int:
    """M rounded up to a power of two: the part of M in a tuning key (M=4096 and M=17 share a
    bucket's candidates but not their best tile; M=4000 and M=4096 do)."""
    return 1 << max(0, (m - 1).bit_length())


def tune_key(bucket_name: str, m: int, dtype, w: PackedWeight, *extra) -> tuple:
    """What a weight GEMM's best tile depends on besides the target: M's bucket and power-of-two
    class, N, K, the activation dtype, the packed format (its meta and which tensors it has: bits,
    group size, zero points, act-order...), and ``extra`` (bias, a split_k override).

    >>> tune_key("decode", 5, torch.float16, w, False, None)[:4]
    ('decode', 8, 4096, 4096)"""
    meta = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(w.meta.items()))
    return (bucket_name, m_class(m), w.n, w.k, str(dtype), w.format, meta, tuple(sorted(w.tensors)), *extra)


# --- split-K with atomically added fp32 partials (minifloat, lut) --------------------------------
def choose_split(m: int, n: int, k: int, cfg: TileConfig, gpu: GpuTarget, split_k: int | None) -> int:
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
    while tiles * split * 2 <= 2 * gpu.sms and steps // (split * 2) >= 2:
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
    target: GpuTarget
    cfg: TileConfig
    split: int
    k_split: int                # K columns per split
    y: torch.Tensor             # what the kernel writes
    grid: tuple[int, int, int]  # (N tiles, M tiles, splits)

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self.y.to(dtype) if self.split > 1 else self.y


def split_launch(x: torch.Tensor, n: int, cfg: TileConfig, split_k: int | None) -> SplitLaunch:
    """The launch of a split-K kernel for x on its runtime target with tile ``cfg`` (from
    :func:`autotune`); fresh outputs each time, so every autotuning trial starts from zeros.

    >>> L = split_launch(x, w.n, cfg, None); kernel[L.grid](..., L.y, ..., L.k_split, ...)"""
    target = runtime_target(x)
    m, k = x.shape
    split = choose_split(m, n, k, cfg, target, split_k)
    return SplitLaunch(target, cfg, split, k_per_split(k, cfg, split), launch_out(x, n, split),
                       (-(-n // cfg.block_n), -(-m // cfg.block_m), split))


try:
    import triton
    import triton.language as tl
    import triton.testing
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


__all__ = ["TileConfig", "GpuTarget", "INTERP", "INTERP_GPU", "INTERP_SMS", "SMALL_M", "BUCKETS", "gpu_target",
           "device_gpu", "check_tiles", "target_sms", "runtime_target", "tiles_for", "bucket_of", "unsupported",
           "unsupported_target",
           "check_weight", "check_bias", "check_operands", "check_split_k", "m_class", "tune_key", "Autotuner",
           "TUNER", "AUTOTUNE_ENV", "autotune",
           "choose_split", "k_per_split", "launch_out", "SplitLaunch", "split_launch"]

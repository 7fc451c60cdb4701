"""What the ahead-of-time compile tests of every kernel module check on a build
(:func:`nnforge.backends.triton.kernels.compile_many`): tensor-core instructions, cp.async
pipelining and shared memory within the architecture's per-block limit; and the architectures
they build for: every GPU architecture file nnforge ships (nnforge/targets/gpu/), each with its
own tile candidates, in two groups (ARCH_GROUPS)."""
import re

import pytest

from nnforge.backends.triton.kernels.common import TileConfig
from nnforge.targets.architectures import gpu_archs

ARCHS = gpu_archs()
# Shared memory one block may use, from each architecture file.
SHARED_LIMIT = {a.sm: a.shared_memory_per_block_kb * 1024 for a in ARCHS}


def tiles(arch, family: str) -> dict[str, tuple[TileConfig, ...]]:
    """``arch``'s candidate tiles of kernel ``family`` per M bucket, the default first."""
    return {b: tuple(TileConfig(*r) for r in rows) for b, rows in arch.tiles.get(family, {}).items()}


def mma_ops(ptx: str) -> set[str]:
    """The tensor-core instructions in ``ptx`` (``mma.sync...``, ``wgmma.mma_async...``)."""
    return set(re.findall(r"\b(?:wgmma\.mma_async|mma)\S*", ptx))


def check_build(k, *, wgmma: bool = False, cp_async: bool = True) -> None:
    """``k`` (an AotKernel) uses tensor cores (wgmma where asked), fits in shared memory and, when
    asked, streams its operands through cp.async stages."""
    assert not isinstance(k, Exception), k
    ops = mma_ops(k.ptx)
    assert ops, f"{k.name} sm_{k.capability}: the dot did not lower to tensor-core instructions"
    assert not wgmma or any(o.startswith("wgmma") for o in ops), (k.name, k.capability, sorted(ops))
    assert 0 < k.shared <= SHARED_LIMIT[k.capability], f"{k.name} sm_{k.capability}: {k.shared} bytes of shared memory"
    assert not cp_async or "cp.async.c" in k.ptx, f"{k.name} sm_{k.capability}: no cp.async in the PTX"
    assert k.cubin


# The default run builds for the a100 and h100 targets' architectures; the other architecture files
# (each build takes seconds, and CI starts with Triton's cache empty) build under -m slow.
MAIN = ("sm_80", "sm_90")
ARCH_GROUPS = [pytest.param(tuple(a for a in ARCHS if a.name in MAIN), id="sm_80+sm_90"),
               pytest.param(tuple(a for a in ARCHS if a.name not in MAIN), id="other-archs", marks=pytest.mark.slow)]

"""What the ahead-of-time compile tests of every kernel module check on a build
(:func:`nnforge.backends.triton.kernels.compile_many`): tensor-core instructions, cp.async
pipelining and shared memory within the GPU's per-block limit."""
import re

# Shared memory one block may use (CUDA programming guide, compute capability tables).
SHARED_LIMIT = {80: 164 * 1024, 90: 227 * 1024}


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

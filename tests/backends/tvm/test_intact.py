"""kernels/intact.py, the integer W4A8 / W4A4 linear of the tvm backend: against the integer
formula in float64 for 4- and 8-bit codes with and without zero points, per channel and in groups,
on this host's dot instruction and emulated; the dot instructions in its assembly; its refusals.

Tolerance against float64: 1e-5 of the largest |output| (float32 sums in another order; the
integer sums themselves are exact)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from nnforge.backends.tvm.kernels import KernelError, intact                     # noqa: E402
from nnforge.backends.tvm.kernels.lowbit import llvm_target                      # noqa: E402
from nnforge.ir.packing import pack_bits                                         # noqa: E402

NATIVE = "llvm -mcpu=native"
ALDERLAKE = "llvm -mtriple=x86_64-linux-gnu -mcpu=alderlake"      # AVX-VNNI: built, never run here
RTOL = 1e-5
HAS_AVX2 = "avx2" in {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(llvm_target(NATIVE))}


# --- the kernel against the integer formula -----------------------------------------------------
def make_weight(bits, n, k, group_size, zero_point, seed=0):
    """Random code fields (packed), scales, zero points (or None: offset binary) and W in float64."""
    rng = np.random.default_rng(seed)
    groups = -(-k // group_size)
    fields = rng.integers(0, 1 << bits, (n, k))
    scale = rng.uniform(0.005, 0.05, (n, groups)).astype(np.float32)
    zp = rng.integers(0, 1 << bits, scale.shape).astype(np.uint8) if zero_point else None
    col = np.arange(k) // group_size
    z = zp[:, col].astype(np.float64) if zp is not None else float(1 << (bits - 1))
    return pack_bits(torch.from_numpy(fields), bits).numpy(), scale, zp, (fields - z) * scale[:, col]


@pytest.mark.parametrize("dot", ["native", "emulated"])
@pytest.mark.parametrize("bits,zero_point,group_size,n,k", [
    (4, False, 128, 37, 384),      # groups of 128, n not a multiple of the 8 lanes
    (4, True, None, 16, 200),      # per channel, zero points
    (4, True, 32, 24, 200),        # a ragged last group (200 = 6 x 32 + 8)
    (8, False, None, 20, 100),     # per channel, k a multiple of 4 only
    (8, True, 64, 45, 256),
])
def test_kernel_matches_the_integer_formula(monkeypatch, dot, bits, zero_point, group_size, n, k):
    """Every row count up to two blocks of four and their remainders (and none), activation codes
    over the whole int8 range, at the extremes of the code fields and zero points."""
    if dot == "emulated":
        monkeypatch.setattr(intact, "dot_instr", lambda bits, target: intact.DotInstr("emulated", "emulated"))
    gs = group_size or k
    codes, scale, zp, w = make_weight(bits, n, k, gs, zero_point)
    kern = intact.int_act_matmul("layer.weight", codes, bits, scale, zp, gs, n, k, NATIVE)
    rng = np.random.default_rng(1)
    m = 11
    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
    a[0] = -128                     # the largest products: -128 x the field's extremes
    a_scale = rng.uniform(0.01, 0.1, m).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    fn = tvm.compile(kern.func, target=llvm_target(NATIVE))[kern.name]
    consts = [tvm.runtime.tensor(c) for c in kern.consts]
    for rows_ in (0, 1, 2, 3, 4, 7, m):
        y = tvm.runtime.tensor(np.full((rows_, n), np.nan, np.float32))
        fn(tvm.runtime.tensor(a[:rows_]), tvm.runtime.tensor(a_scale[:rows_]), *consts, tvm.runtime.tensor(bias), y)
        want = (a[:rows_].astype(np.float64) @ w.T) * a_scale[:rows_, None] + bias
        err = np.abs(y.numpy() - want).max(initial=0.0)
        assert err <= RTOL * np.abs(want).max(initial=1.0), (rows_, err)


def assembly(kern, target: str) -> str:
    return tvm.compile(tvm.IRModule({kern.name: kern.func}), target=llvm_target(target)).mod.inspect_source("asm")


@pytest.mark.parametrize("bits", [4, 8])
def test_assembly_uses_the_dot_instruction(bits):
    """This host (AVX2): vpmaddubsw then vpmaddwd for 4-bit fields, vpmaddwd alone for 8-bit ones;
    an AVX-VNNI target (cross-compiled): vpdpbusd on ymm for both."""
    codes, scale, _, _ = make_weight(bits, 64, 256, 128, False)
    if HAS_AVX2 and intact.dot_instr(bits, NATIVE).kind != "vnni":
        kern = intact.int_act_matmul("w", codes, bits, scale, None, 128, 64, 256, NATIVE)
        asm = assembly(kern, NATIVE)
        assert "vpmaddwd" in asm and "%ymm" in asm
        assert ("vpmaddubsw" in asm) == (bits == 4), kern.notes["dot"]
    kern = intact.int_act_matmul("w", codes, bits, scale, None, 128, 64, 256, ALDERLAKE)
    assert kern.notes["dot"] == "vpdpbusd ymm"
    asm = assembly(kern, ALDERLAKE)
    assert "vpdpbusd" in asm and "vpmaddubsw" not in asm


@pytest.mark.parametrize("bits,group_size,k,message", [
    (4, 36, 72, "every group of 4-bit codes must hold a multiple of 8 columns"),
    (8, 32, 98, "every group of 8-bit codes must hold a multiple of 4 columns"),
    (3, 32, 64, "3-bit codes are not supported"),
])
def test_errors_name_the_weight(bits, group_size, k, message):
    codes, scale, _, _ = make_weight(8, 8, k, group_size, False)
    with pytest.raises(KernelError, match=f"fc.weight: {message}"):
        intact.int_act_matmul("fc.weight", codes, bits, scale, None, group_size, 8, k, NATIVE)

"""The lowbit kernel reading minifloat codes (kernels/lowbit_minifloat.py) against the reference
decode (``MiniFloat.decode``): FP4 (MXFP4 blocks of 32, NVFP4 blocks of 16, e2m1 with float
scales) and FP8 (e4m3, e5m2), on this host's schedules (the AVX-512 VNNI dot GEMV for FP4 where
the host has it) and on Skylake-AVX512's, which has no VNNI (the float GEMV and prefill; Haswell's
8 lanes too for every code), at row
counts on both sides of the GEMV / prefill switch; every code of each format; the layouts and
instructions each target gets; and the errors."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from nnforge.backends.tvm.kernels import KernelError                          # noqa: E402
from nnforge.backends.tvm.kernels import lowbit                               # noqa: E402
from nnforge.backends.tvm.kernels.lowbit_minifloat import minifloat_weight_matmul   # noqa: E402
from nnforge.ir import MiniFloat                                              # noqa: E402
from nnforge.passes.quantize.formats import parse_format, quantize_rtn        # noqa: E402
from tests.backends.tvm.test_lowbit_kernels import NATIVE, ROWS, SKX, SPR, compiled, check_rows  # noqa: E402

HSW = "llvm -mtriple=x86_64-linux-gnu -mcpu=haswell"       # AVX2: 8 lanes


def kernel(enc: MiniFloat, target: str, name: str = "w"):
    n, k = enc.shape
    return minifloat_weight_matmul(name, enc.codes, enc.fmt.short, enc.scale_values(torch.float32), enc.group_size,
                                   n, k, target)


def reference(enc: MiniFloat) -> np.ndarray:
    return enc.decode(torch.float64).numpy()


@pytest.mark.parametrize("target", [NATIVE, SKX])
@pytest.mark.parametrize("spec,group_size,n,k", [
    ("mxfp4", None, 37, 256),     # e8m0 exponents, blocks of 32; n not a multiple of the vector lanes
    ("nvfp4", None, 37, 160),     # e4m3 block scales of 16 and an fp32 global scale
    ("e2m1", 16, 20, 200),        # float scales, a last group of 8 columns
    ("e2m1", None, 24, 96),       # per channel
    ("e4m3", None, 37, 200),      # the fp8 preset: per channel
    ("e4m3", 32, 13, 203),        # odd k, a last group of 11 columns, n below one vector
    ("e5m2", 32, 40, 256),
])
def test_matches_the_reference_decode(target, spec, group_size, n, k):
    torch.manual_seed(n + k)
    enc = quantize_rtn(torch.randn(n, k) * 0.1, parse_format(spec, group_size=group_size))
    run, _ = compiled(kernel(enc, target), target)
    check_rows(run, reference(enc), ROWS)


def _every_code(fmt: str, n: int, k: int) -> MiniFloat:
    """Row r holds every finite code of ``fmt``, shifted by r, under random power-of-two-free scales."""
    bits = 4 if fmt == "e2m1" else 8
    table = MiniFloat.from_fields(torch.arange(1 << bits).reshape(1, -1), torch.ones(1, 1), fmt=fmt,
                                  shape=(1, 1 << bits)).decode()
    finite = torch.nonzero(torch.isfinite(table[0])).flatten()
    fields = torch.stack([finite[(torch.arange(k) + r) % len(finite)] for r in range(n)])
    scale = torch.rand(n, 1) + 0.5
    return MiniFloat.from_fields(fields, scale, fmt=fmt, shape=(n, k))


@pytest.mark.parametrize("target", [NATIVE, SKX, HSW])
@pytest.mark.parametrize("fmt", ["e2m1", "e4m3", "e5m2"])
def test_every_code_reads_as_its_value(target, fmt):
    """Signs, subnormals and the largest values of each format: W itself comes back through one-hot
    rows of x, all at once (prefill: exactly) and one at a time (GEMV: to float32 precision, as the
    dot GEMV's split of x and its zero-point correction leave a rounding error)."""
    n, k = 18, 256
    enc = _every_code(fmt, n, k)
    run, _ = compiled(kernel(enc, target), target)
    w = reference(enc)
    eye = np.eye(k, dtype=np.float32)
    np.testing.assert_allclose(run(eye), w.T, rtol=1e-6, atol=0)
    for j in range(0, k, 37):
        np.testing.assert_allclose(run(eye[j:j + 1]), w.T[j:j + 1], rtol=1e-6, atol=1e-6 * np.abs(w).max())


def test_fp4_on_vnni_targets_takes_the_dot_gemv_through_a_table():
    """FP4 codes keep the int4 dot layout (half a byte a weight) and vpshufb turns each nibble into
    the unsigned byte vpdpbusd multiplies; FP8 codes, not integers, take the float GEMV."""
    torch.manual_seed(1)
    w = torch.randn(40, 256)
    fp4 = kernel(quantize_rtn(w, parse_format("nvfp4")), SPR)
    assert lowbit.has_vnni(SPR) and "dot layout" in fp4.notes["layout"]
    assert fp4.consts[0].nbytes == fp4.consts[0].shape[0] * 16 * 256 // 2
    asm = tvm.compile(fp4.func, target=lowbit.llvm_target(SPR)).mod.inspect_source("asm")
    assert re.search(r"vpshufb\s+.*zmm", asm) and "vpdpbusd" in asm
    fp8 = kernel(quantize_rtn(w, parse_format("e4m3")), SPR)
    assert "dot" not in fp8.notes["layout"] and fp8.consts[0].dtype == np.uint8
    assert fp8.consts[0].nbytes == fp8.consts[0].shape[0] * 16 * 256
    assert fp8.notes["codes"] == "e4m3" and fp8.notes["kernel"] == "minifloat_weight_matmul"


@pytest.mark.skipif(not lowbit.has_vnni(NATIVE), reason="this host has no AVX-512 VNNI")
def test_fp4_dot_gemv_keeps_float32_accuracy_on_outliers():
    n, k = 64, 256
    torch.manual_seed(2)
    enc = quantize_rtn(torch.randn(n, k), parse_format("mxfp4"))
    run, lib = compiled(kernel(enc, NATIVE))
    assert "vpdpbusd" in lib.mod.inspect_source("asm")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, k)).astype(np.float32)
    x[0, 5] = 1000.0
    x[1] = 0.0
    x[2, :32] *= 1e-6
    want = x.astype(np.float64) @ reference(enc).T
    np.testing.assert_allclose(run(x), want, rtol=1e-5, atol=2e-6 * np.abs(want).max())


# --- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,k,message", [
    ("mxfp6", 64, "e3m2 codes are not read by the minifloat weight matmul kernel (it reads e2m1, e4m3, e5m2)"),
    ("e2m1", 63, "4-bit codes need an even k (two codes a byte), got k = 63"),
])
def test_errors_name_the_weight(spec, k, message):
    enc = quantize_rtn(torch.randn(8, k), parse_format(spec))
    with pytest.raises(KernelError) as e:
        kernel(enc, NATIVE, name="dec.0.fc1.weight")
    assert str(e.value) == f"dec.0.fc1.weight: {message}"

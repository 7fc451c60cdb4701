"""The int8 / int4 weight-only matmul kernel of the tvm backend against numpy.

W is rebuilt in float64 from codes packed by ``nnforge.ir.packing.pack_bits``; each built kernel
runs at several row counts (one PrimFunc, m symbolic) that cover both schedules (GEMV below
``GEMV_MAX_ROWS``, prefill at or above it) and every remainder of their row blocks. Shapes are
ragged on purpose: n not a multiple of the vector tile, k not a multiple of the group size.
Also: the vector registers in the LLVM assembly for this host and, cross-compiled, for Sapphire
Rapids; the kernel inside a Relax module (``call_tir``); the byte count of the consts; and every
error message.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from nnforge.backends.tvm.kernels import KernelError                     # noqa: E402
from nnforge.backends.tvm.kernels import lowbit                          # noqa: E402
from nnforge.backends.tvm.kernels.lowbit import int_weight_matmul, llvm_target, simd_shape   # noqa: E402
from nnforge.ir.packing import pack_bits                                 # noqa: E402

NATIVE = "llvm -mcpu=native"
SPR = "llvm -mtriple=x86_64-linux-gnu -mcpu=sapphirerapids"
SKX = "llvm -mtriple=x86_64-linux-gnu -mcpu=skylake-avx512"      # AVX-512 without VNNI
# GEMV (remainders 1 and 4+1), both sides of the switch, prefill (remainders and full blocks).
ROWS = sorted({0, 1, 5, lowbit.GEMV_MAX_ROWS - 1, lowbit.GEMV_MAX_ROWS, 13, 64})


def make_weight(bits, n, k, group_size, zero_point, seed=0, shared_scale=False, scale_dtype=np.float32):
    """Random codes (packed), scales and zero points for an [n, k] weight, and W itself."""
    rng = np.random.default_rng(seed)
    groups = -(-k // group_size)
    fields = rng.integers(0, 1 << bits, (n, k))
    codes = pack_bits(torch.from_numpy(fields), bits).numpy()
    scale = rng.uniform(0.005, 0.05, (1 if shared_scale else n, groups)).astype(scale_dtype)
    zp = rng.integers(0, 1 << bits, scale.shape).astype(np.uint8) if zero_point else None
    col_group = np.arange(k) // group_size
    z = zp[:, col_group].astype(np.float64) if zp is not None else float(1 << (bits - 1))
    w = (fields - z) * scale[:, col_group].astype(np.float64)
    return codes, scale, zp, w


def host_runs(target: str) -> bool:
    """Whether this host can run code built for ``target`` (an AVX-512 target on an AVX2 host
    cannot: its kernels are still built and inspected, not run)."""
    if "avx512" not in target and "sapphirerapids" not in target and "cascadelake" not in target:
        return True
    with open("/proc/cpuinfo") as f:
        return "avx512f" in f.read()


def compiled(kernel, target=NATIVE):
    if not host_runs(target):
        pytest.skip(f"runs code built for {target}: this host has no AVX-512")
    lib = tvm.compile(kernel.func, target=llvm_target(target))
    fn = lib[kernel.name]
    consts = [tvm.runtime.tensor(c) for c in kernel.consts]

    def run(x: np.ndarray) -> np.ndarray:
        y = tvm.runtime.tensor(np.full((x.shape[0], kernel.n), np.nan, np.float32))
        fn(tvm.runtime.tensor(x), *consts, y)
        return y.numpy()
    return run, lib


def check_rows(run, w, rows=ROWS, seed=1):
    rng = np.random.default_rng(seed)
    for m in rows:
        x = rng.standard_normal((m, w.shape[1])).astype(np.float32)
        y = run(x)
        want = x.astype(np.float64) @ w.T
        assert y.shape == want.shape
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(initial=1.0),
                                   err_msg=f"m = {m}")


@pytest.mark.parametrize("bits,zero_point,group_size,n,k", [
    (8, False, 32, 37, 200),      # ragged last group (200 = 6*32 + 8), n not a multiple of the tile
    (8, True, 128, 37, 200),      # 200 = 128 + 72
    (8, False, None, 50, 300),    # per-channel (group_size = k)
    (8, True, None, 16, 96),
    (8, True, 32, 13, 203),       # odd k, last group of 11 columns, n below one tile
    (4, False, 128, 37, 200),
    (4, True, 32, 40, 200),
    (4, False, None, 37, 300),
    (4, True, 128, 64, 256),      # whole groups, whole tiles
])
def test_matches_numpy(bits, zero_point, group_size, n, k):
    gs = group_size or k
    codes, scale, zp, w = make_weight(bits, n, k, gs, zero_point)
    run, _ = compiled(int_weight_matmul("layer.weight", codes, bits, scale, zp, gs, n, k, NATIVE))
    check_rows(run, w)


def test_every_row_count_from_one_to_twenty():
    """Every remainder of the GEMV (4) and prefill row blocks, and the switch between them."""
    codes, scale, zp, w = make_weight(4, 24, 64, 32, True, seed=3)
    run, _ = compiled(int_weight_matmul("w", codes, 4, scale, zp, 32, 24, 64, NATIVE))
    check_rows(run, w, rows=range(1, 21))


def test_shared_scale_row_and_torch_inputs():
    """A [1, G] scale serves every row; torch tensors (fp16 scales) are accepted as inputs."""
    codes, scale, zp, w = make_weight(8, 20, 64, 32, True, shared_scale=True, scale_dtype=np.float16)
    kern = int_weight_matmul("w", *map(torch.from_numpy, (codes,)), 8, torch.from_numpy(scale),
                             torch.from_numpy(zp), 32, 20, 64, NATIVE)
    run, _ = compiled(kern)
    check_rows(run, w, rows=[1, 9])


@pytest.mark.parametrize("target", [NATIVE, SKX])
@pytest.mark.parametrize("bits", [8, 4])
def test_float16_scales_are_read_as_stored(target, bits):
    """float16 scales stay float16 in the kernel's arrays (half the scale bytes a step streams) and
    are widened in the kernel: GEMV and prefill, with and without the dot layout, and the row gather."""
    n, k = 40, 256
    codes, scale, zp, w = make_weight(bits, n, k, 32, True, seed=5, scale_dtype=np.float16)
    kern = int_weight_matmul("w", codes, bits, scale, zp, 32, n, k, target)
    assert kern.consts[1].dtype == np.float16
    run, _ = compiled(kern, target)
    check_rows(run, w)
    name, func, _ = lowbit.gather_rows("w", codes, bits, scale, zp, 32, n, k, target)
    gather = tvm.compile(func, target=llvm_target(target))[name]
    ids = np.array([3, 0, 39, 17], np.int64)
    out = tvm.runtime.tensor(np.zeros((4, k), np.float32))
    gather(tvm.runtime.tensor(ids), *[tvm.runtime.tensor(c) for c in kern.consts], out)
    np.testing.assert_allclose(out.numpy(), w[ids], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits,n,k", [(8, 37, 64), (4, 37, 64), (4, 32, 96)])
def test_the_layouts_made_at_load_equal_the_numpy_ones(bits, n, k):
    """lowbit_layout's Relax forms (what a bundle's prepare runs) give the arrays of its numpy forms:
    the dot layout and the interleaved rows, padded to whole tiles."""
    from tvm import relax
    from nnforge.backends.tvm.kernels import lowbit_layout as L
    codes, scale, _, _ = make_weight(bits, n, k, 32, False, seed=7)
    lanes, blocks = 16, -(-n // 16) + 1
    bb = relax.BlockBuilder()
    c = relax.Var("c", relax.TensorType(list(codes.shape), "uint8"))
    s = relax.Var("s", relax.TensorType(list(scale.shape), "float32"))
    with bb.function("main", [c, s]):
        with bb.dataflow():
            out = bb.emit_output(relax.Tuple([
                bb.emit(L.relax_dot_layout(c, n, bits, k, lanes, blocks)),
                bb.emit(L.relax_interleave_rows(c, n, codes.shape[1], "uint8", lanes, blocks)),
                bb.emit(L.relax_interleave_rows(s, n, scale.shape[1], "float32", lanes, blocks))]))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=llvm_target(NATIVE)), tvm.cpu())
    dot, rows, scales = (t.numpy() for t in vm["main"](tvm.runtime.tensor(codes), tvm.runtime.tensor(scale)))
    np.testing.assert_array_equal(dot, L.dot_layout(codes, bits, k, lanes, blocks))
    np.testing.assert_array_equal(rows, L.interleave_rows(codes, lanes, blocks))
    np.testing.assert_array_equal(scales, L.interleave_rows(scale, lanes, blocks))


@pytest.mark.parametrize("add", [0, 4])
def test_3bit_codes_widened_at_load_are_nnforges_4bit_packing(add):
    """relax_widened_codes: 3-bit codes (nnforge's bit stream, eight in three bytes) as nibbles,
    each plus ``add`` (a signed symmetric weight's offset moves from 4 to 8)."""
    from tvm import relax
    from nnforge.backends.tvm.kernels import lowbit_layout as L
    rng = np.random.default_rng(add)
    n, k = 5, 48
    wide = torch.from_numpy(rng.integers(0, 8, (n, k)))
    stored = pack_bits(wide, 3).numpy()
    bb = relax.BlockBuilder()
    c = relax.Var("c", relax.TensorType(list(stored.shape), "uint8"))
    with bb.function("main", [c]):
        with bb.dataflow():
            out = bb.emit_output(L.relax_widened_codes(c, n, k, 3, 4, add))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=llvm_target(NATIVE)), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(stored)).numpy(), pack_bits(wide + add, 4).numpy())
    with pytest.raises(ValueError, match="k a multiple of 8"):
        L.relax_widened_codes(c, n, 44, 3, 4)


def test_consts_are_the_stored_bytes_interleaved():
    """Without VNNI: codes[b, p, l] = stored[b * lanes + l, p]: bits/8 bytes a weight, rows padded
    to the tile with zero scales; scales blocked the same way."""
    n, k = 90, 256
    for bits in (8, 4):
        codes, scale, _, _ = make_weight(bits, n, k, 128, False)
        kern = int_weight_matmul("w", codes, bits, scale, None, 128, n, k, SKX)
        assert not lowbit.has_vnni(SKX) and "dot" not in kern.notes["layout"]
        packed, blocked_scale = kern.consts
        blocks, cols, lanes = packed.shape
        assert packed.dtype == np.uint8 and cols == k * bits // 8 and lanes == simd_shape(SKX).lanes
        assert blocks * lanes >= n and blocks * lanes - n < 2 * lanes
        rows = packed.transpose(0, 2, 1).reshape(blocks * lanes, cols)
        np.testing.assert_array_equal(rows[:n], codes)
        np.testing.assert_array_equal(rows[n:], 0)
        scales = blocked_scale.transpose(0, 2, 1).reshape(blocks * lanes, -1)
        np.testing.assert_array_equal(scales[:n], scale)
        np.testing.assert_array_equal(scales[n:], 0)


@pytest.mark.parametrize("bits", [8, 4])
def test_vnni_targets_get_the_dot_layout(bits):
    """With AVX-512 VNNI: codes[b, q, 4 l + j] holds columns 4q + j (8-bit), or 8q + j in the low
    and 8q + 4 + j in the high nibble (4-bit), of row b * lanes + l; the same bytes a weight."""
    n, k = 40, 192
    codes, scale, _, _ = make_weight(bits, n, k, 64, False)
    kern = int_weight_matmul("w", codes, bits, scale, None, 64, n, k, SPR)
    assert lowbit.has_vnni(SPR) and "dot layout" in kern.notes["layout"]
    assert "vpdpbusd" in kern.notes["schedules"][f"m < {lowbit.GEMV_MAX_ROWS}"]
    packed = kern.consts[0]
    step = 4 * (8 // bits)
    blocks = packed.shape[0]
    assert packed.shape == (blocks, k // step, 64) and packed.nbytes == blocks * 16 * k * bits // 8
    fields = np.zeros((blocks * 16, k), np.int64)
    fields[:n] = codes if bits == 8 else np.stack([codes & 15, codes >> 4], -1).reshape(n, k)
    for b, q, lane, j in [(0, 0, 0, 0), (1, 5, 7, 3), (2, k // step - 1, 15, 2), (2, 3, 9, 1)]:
        byte = int(packed[b, q, 4 * lane + j])
        row = b * 16 + lane
        if bits == 8:
            assert byte == fields[row, 4 * q + j]
        else:
            assert (byte & 15, byte >> 4) == (fields[row, 8 * q + j], fields[row, 8 * q + 4 + j])


@pytest.mark.skipif(not lowbit.has_vnni(NATIVE), reason="this host has no AVX-512 VNNI")
@pytest.mark.parametrize("bits", [8, 4])
def test_dot_gemv_keeps_float32_accuracy_on_outliers(bits):
    """The three-piece split of x keeps the float32 result where one int8 a value would not: a
    row with a 1000x outlier, a row of zeros, and one tiny group."""
    n, k, gs = 64, 256, 64
    codes, scale, zp, w = make_weight(bits, n, k, gs, True, seed=4)
    run, lib = compiled(int_weight_matmul("w", codes, bits, scale, zp, gs, n, k, NATIVE))
    assert "vpdpbusd" in lib.mod.inspect_source("asm")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, k)).astype(np.float32)
    x[0, 5] = 1000.0
    x[1] = 0.0
    x[2, :gs] *= 1e-6
    want = x.astype(np.float64) @ w.T
    np.testing.assert_allclose(run(x), want, rtol=1e-5, atol=2e-6 * np.abs(want).max())


def _fma_registers(asm: str) -> set[str]:
    return set(re.findall(r"vfmadd\w*ps\s+%([xyz]mm)", asm))


def test_native_asm_uses_the_host_vector_width():
    """-mcpu=native gets the host's widest fp32 FMA (ymm on AVX2, zmm only where the host
    really has AVX-512, which a VM may hide from a CPU whose name says it has it)."""
    with open("/proc/cpuinfo") as f:
        avx512 = "avx512f" in f.read()
    lanes = simd_shape(NATIVE).lanes
    assert lanes == (16 if avx512 else 8)
    codes, scale, _, _ = make_weight(4, 32, 256, 128, False)
    _, lib = compiled(int_weight_matmul("w", codes, 4, scale, None, 128, 32, 256, NATIVE))
    regs = _fma_registers(lib.mod.inspect_source("asm"))
    assert regs == {"zmm" if avx512 else "ymm"}


def test_sapphire_rapids_cross_compile_uses_zmm():
    codes, scale, zp, _ = make_weight(8, 64, 256, 128, True)
    kern = int_weight_matmul("w", codes, 8, scale, zp, 128, 64, 256, SPR)
    assert kern.notes["lanes"] == 16
    asm = tvm.compile(kern.func, target=llvm_target(SPR)).mod.inspect_source("asm")
    assert "zmm" in _fma_registers(asm)
    # the dot GEMV asks for its codes ahead of the loads (a decode step streams them from DRAM)
    assert "vpdpbusd" in asm and "prefetcht0" in asm


def test_runs_inside_a_relax_module():
    """The contract of kernels/__init__.py: relax.call_tir(func, [x, *consts]) -> y [m, n]."""
    from tvm import relax
    n, k = 24, 64
    codes, scale, _, w = make_weight(4, n, k, 32, False, seed=5)
    kern = int_weight_matmul("fc.weight", codes, 4, scale, None, 32, n, k, NATIVE)
    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    with bb.function("main", [x]):
        gv = bb.add_func(kern.func, kern.name)
        y = bb.emit(relax.call_tir(gv, [x, *map(relax.const, kern.consts)], relax.TensorType((m, n), "float32")))
        bb.emit_func_output(y)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=llvm_target(NATIVE)), tvm.cpu())
    rng = np.random.default_rng(0)
    for rows in (1, 20):
        xs = rng.standard_normal((rows, k)).astype(np.float32)
        np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(xs)).numpy(), xs @ w.T, rtol=1e-5, atol=1e-5)


# --- errors ------------------------------------------------------------------------------------
def _args(**over):
    codes, scale, zp, _ = make_weight(4, 8, 64, 32, True)
    args = dict(name="enc.0.fc1.weight", codes=codes, bits=4, scale=scale, zero_point=zp, group_size=32, n=8, k=64,
                target=NATIVE)
    args.update(over)
    return args


@pytest.mark.parametrize("over,message", [
    (dict(bits=3), "3-bit codes are not supported by the int weight matmul kernel (supported: 4, 8 bits)"),
    (dict(bits=2), "2-bit codes are not supported"),
    (dict(codes=np.zeros((8, 31), np.uint8)), "codes must be uint8 [8, 32] (4-bit codes of a [8, 64] weight), "
                                              "got uint8 [8, 31]"),
    (dict(codes=np.zeros((8, 32), np.int8)), "codes must be uint8 [8, 32]"),
    (dict(codes=np.zeros((8, 32), np.uint8), n=9), "codes must be uint8 [9, 32]"),
    (dict(codes=[[0] * 32] * 8), "codes must be a numpy array or torch tensor, got list"),
    (dict(scale=np.ones((8, 3), np.float32)), "scale must be [8 or 1, 2] (2 groups of 32 along k = 64), "
                                              "got [8, 3]"),
    (dict(scale=np.ones((4, 2), np.float32)), "scale must be [8 or 1, 2]"),
    (dict(scale=np.ones((8, 2), np.int32)), "scale must hold floats, got int32"),
    (dict(zero_point=np.zeros((8, 3), np.uint8)), "zero_point shape [8, 3] differs from scale shape [8, 2]"),
    (dict(zero_point=np.zeros((8, 2), np.float32)), "zero_point must hold integers (in the code domain)"),
    (dict(zero_point=np.full((8, 2), 16, np.int32)), "zero points must lie in the 4-bit code range [0, 15], "
                                                     "got [16, 16]"),
    (dict(k=63, codes=np.zeros((8, 32), np.uint8)), "4-bit codes need an even k (two codes a byte), got k = 63"),
    (dict(group_size=33, scale=np.ones((8, 2), np.float32)), "4-bit codes need an even group_size"),
    (dict(group_size=0), "group_size 0 outside 1..64"),
    (dict(group_size=65), "group_size 65 outside 1..64"),
    (dict(n=0), "weight shape [0, 64] must have n >= 1 and k >= 1"),
    (dict(target="cuda -arch=sm_90"), "LLVM target 'cuda -arch=sm_90'"),
    (dict(target="llvm -mcpu=sapphirerapids -bogus=1"), "LLVM target 'llvm -mcpu=sapphirerapids -bogus=1'"),
])
def test_errors_name_the_weight(over, message):
    with pytest.raises(KernelError) as e:
        int_weight_matmul(**_args(**over))
    assert str(e.value).startswith("enc.0.fc1.weight: ")
    assert message in str(e.value)


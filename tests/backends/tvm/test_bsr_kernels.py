"""The BSR SpMM kernels (fp32 and int8) against numpy, built once per weight and run at several m.

Random block masks at several densities (with empty block-rows, and with no block at all), every fast
block shape (1x4, 4x1, 16x1) and odd ones (2x2, 3x5), m in {0, 1, 3, 32, 37} through one built
function (m is symbolic); int8 against the exact integer formula, rounding ties and clipping
included, and its small-m (GEMV, rows in lanes) schedule shown to be the one that runs below V/2
tokens (V the dot instruction's int32 lanes on this host: 8 with AVX2, 16 with AVX-512). The AVX-512
tiling and the VNNI lane format run on any host: LLVM splits 16-lane vectors for AVX2, and the dot
instruction's arithmetic has a plain-vector emulation. The assembly is checked for the instructions
each path exists for (this host's, whether AVX2 or AVX-512; Sapphire Rapids, Skylake-AVX512 and
Alder Lake cross-compiled, never run), and every documented error for its message.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from nnforge.backends.tvm.kernels import Kernel, KernelError  # noqa: E402
from nnforge.backends.tvm.kernels import bsr, bsr_int8  # noqa: E402
from nnforge.backends.tvm.kernels.bsr import bsr_matmul, dense_from_bsr, llvm_target  # noqa: E402
from nnforge.backends.tvm.kernels.bsr_int8 import bsr_matmul_int8  # noqa: E402
from nnforge.ir.sparse import Sparse  # noqa: E402

NATIVE = "llvm -mcpu=native"
MS = [0, 1, 3, 32, 37]
FAST_BLOCKS = [(1, 4), (4, 1), (16, 1)]


def random_bsr(n, k, r, c, density, seed=0, values=np.float32):
    """BSR arrays of an [n, k] weight keeping each r x c block with probability ``density``; block-row 1
    is always empty."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n // r, k // c)) < density
    mask[min(1, n // r - 1)] = False
    nz = np.argwhere(mask)
    row_ptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
    if values == np.int8:
        blocks = rng.integers(-128, 128, (len(nz), r, c)).astype(np.int8)
    else:
        blocks = rng.standard_normal((len(nz), r, c)).astype(np.float32)
    return row_ptr, nz[:, 1].astype(np.int32), blocks


def runner(kern: Kernel, target: str = NATIVE):
    """Compile the kernel's PrimFunc alone; returns (x, consts=kern.consts) -> y (numpy)."""
    lib = tvm.compile(tvm.IRModule({kern.name: kern.func}), target=llvm_target(target).target)
    dev = tvm.cpu()
    consts = [tvm.runtime.tensor(a, dev) for a in kern.consts]

    def run(x: np.ndarray, other_consts=None) -> np.ndarray:
        y = tvm.runtime.tensor(np.full((x.shape[0], kern.n), np.nan, np.float32), dev)
        args = consts if other_consts is None else [tvm.runtime.tensor(a, dev) for a in other_consts]
        lib[kern.name](tvm.runtime.tensor(np.ascontiguousarray(x), dev), *args, y)
        return y.numpy()
    return run


def check_fp32(kern, w, ms=MS, target=NATIVE, seed=1):
    run = runner(kern, target)
    rng = np.random.default_rng(seed)
    for m in ms:
        x = rng.standard_normal((m, kern.k)).astype(np.float32)
        np.testing.assert_allclose(run(x), x @ w.T, rtol=1e-4, atol=1e-4, err_msg=f"m={m}")


def int8_reference(x, codes_dense, row_scale, x_scale, zero_point):
    """The exact integer formula: x_scale * row_scale[n] * sum_k w[n, k] * (qx[m, k] - zp)."""
    q = np.clip(np.rint(x / np.float32(x_scale)) + zero_point, 0, 255).astype(np.int64)   # rint: ties to even
    return x_scale * row_scale.astype(np.float64) * ((q - zero_point) @ codes_dense.astype(np.int64).T)


def check_int8(kern, codes_dense, row_scale, x_scale, zero_point, ms=MS, target=NATIVE, seed=1):
    run = runner(kern, target)
    rng = np.random.default_rng(seed)
    for m in ms:
        x = (rng.standard_normal((m, kern.k)) * 60 * x_scale).astype(np.float32)   # some values clip
        want = int8_reference(x, codes_dense, row_scale, x_scale, zero_point)
        np.testing.assert_allclose(run(x), want, rtol=2e-6, atol=1e-5, err_msg=f"m={m}")


# --- fp32 ---------------------------------------------------------------------------------------


def _densities(densities, default):
    """(r, c, density) per fast block shape: ``default`` in the default run, the others under -m slow."""
    return [pytest.param(r, c, d, marks=() if d == default else pytest.mark.slow)
            for r, c in FAST_BLOCKS for d in densities]


@pytest.mark.parametrize("r,c,density", _densities((0.0, 0.15, 0.6), 0.15) + [(2, 2, 0.0), (3, 5, 0.6)])
def test_fp32_matches_numpy(r, c, density):
    n, k = 48 // r * r, 80 // c * c
    row_ptr, col_idx, blocks = random_bsr(n, k, r, c, density)
    kern = bsr_matmul("fc", row_ptr, col_idx, blocks, n, k, NATIVE)
    assert kern.notes["kept_blocks"] == blocks.shape[0] and len(kern.consts) == 3
    check_fp32(kern, dense_from_bsr(row_ptr, col_idx, blocks, n, k))


def test_fp32_reads_the_ir_sparse_encoding():
    """The arrays exactly as nnforge.ir.sparse stores them (int16 block-columns, torch tensors)."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    keep = (torch.rand(16, 96, generator=torch.Generator().manual_seed(4)) < 0.25).repeat_interleave(4, 0)
    enc = Sparse.from_mask(w, keep, "block4x1")
    assert enc.index.dtype == torch.int16
    kern = bsr_matmul("enc", enc.row_ptr, enc.index, enc.values.decode(), 64, 96, NATIVE)
    check_fp32(kern, enc.decode().numpy(), ms=[1, 37])


def test_fp32_schedules_per_block_shape():
    def schedule(r, c):
        return bsr_matmul("s", *random_bsr(32, 32, r, c, 0.5), 32, 32, NATIVE).notes["schedule"]
    lanes = llvm_target(NATIVE).lanes
    assert schedule(16, 1).startswith("rows in lanes") == (16 % lanes == 0)
    assert schedule(4, 1).startswith("tokens in lanes, tile 4 rows")
    assert schedule(1, 4).startswith("tokens in lanes, tile 1 rows")


@pytest.mark.parametrize("r,c", [(4, 1), (1, 4), (16, 1), (8, 2)])
def test_fp32_avx512_tiling_runs_here(r, c, monkeypatch):
    """The AVX-512 plan (16 lanes, 32 registers) compiled for this host: LLVM splits the vectors."""
    native = llvm_target(NATIVE)
    wide = bsr.CpuTarget(native.target, 16, 32, native.features)
    monkeypatch.setattr(bsr, "llvm_target", lambda text: wide)
    n, k = 64, 96
    row_ptr, col_idx, blocks = random_bsr(n, k, r, c, 0.3)
    kern = bsr_matmul("wide", row_ptr, col_idx, blocks, n, k, NATIVE)
    assert kern.notes["lanes"] == 16
    check_fp32(kern, dense_from_bsr(row_ptr, col_idx, blocks, n, k), ms=[1, 5, 16, 37, 64])


# --- int8 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("r,c,density", _densities((0.0, 0.3), 0.3) + [(2, 2, 0.0), (3, 5, 0.3), (1, 8, 0.3)])
def test_int8_matches_the_integer_formula(r, c, density):
    n, k = 48 // r * r, 80 // c * c
    row_ptr, col_idx, codes = random_bsr(n, k, r, c, density, values=np.int8)
    row_scale = np.random.default_rng(2).uniform(0.001, 0.01, n).astype(np.float32)
    kern = bsr_matmul_int8("fc", row_ptr, col_idx, codes, row_scale, 0.05, 131, n, k, NATIVE)
    check_int8(kern, dense_from_bsr(row_ptr, col_idx, codes, n, k), row_scale, 0.05, 131)


SMALL_MS = [1, 2, 3]


def isa_dot(features) -> tuple[str, str]:
    """The int8 dot instruction and register an x86 CPU with these LLVM features should get, from its
    instruction sets alone: u8 x s8 ``vpdpbusd`` with VNNI (on zmm with AVX-512), else the exact 16-bit
    ``vpmaddwd`` (zmm with AVX-512BW)."""
    if {"avx512f", "avx512vnni"} <= features:
        return "vpdpbusd", "zmm"
    if "avxvnni" in features or {"avx512vnni", "avx512vl"} <= features:
        return "vpdpbusd", "ymm"
    if {"avx512f", "avx512bw"} <= features:
        return "vpmaddwd", "zmm"
    return "vpmaddwd", "ymm"


def host_dot() -> tuple[str, str, int]:
    """This host's int8 dot instruction, its register and its int32 lanes."""
    dot, register = isa_dot(llvm_target(NATIVE).features)
    return dot, register, 16 if register == "zmm" else 8


@pytest.mark.parametrize("r,c", FAST_BLOCKS + [(2, 2), (1, 8), (1, 6)])
def test_int8_small_m_takes_rows_in_lanes(r, c):
    """Below V/2 tokens (V this host's int32 dot lanes: m = 1..3 with AVX2, 1..7 with AVX-512) the
    GEMV schedule runs, from V/2 on (and at m = 37) tokens in lanes: the results stay exact with the
    other schedule's codes zeroed, and do not with the expected schedule's codes zeroed."""
    n, k = 64 // r * r, 96 // c * c
    row_ptr, col_idx, codes = random_bsr(n, k, r, c, 0.3, values=np.int8)
    row_scale = np.random.default_rng(2).uniform(0.001, 0.01, n).astype(np.float32)
    kern = bsr_matmul_int8("gemv", row_ptr, col_idx, codes, row_scale, 0.05, 131, n, k, NATIVE)
    lanes = host_dot()[2]
    small_ms = list(range(1, lanes // 2))
    assert kern.notes["lanes"] == lanes
    assert kern.notes["small_m_schedule"].startswith(f"rows in lanes for m < {lanes // 2}")
    dense = dense_from_bsr(row_ptr, col_idx, codes, n, k)
    run, consts = runner(kern), kern.consts
    tokens_codes_zeroed = consts[:2] + [np.zeros_like(consts[2])] + consts[3:]
    gemv_codes_zeroed = consts[:-1] + [np.zeros_like(consts[-1])]
    rng = np.random.default_rng(5)
    for m in small_ms + [lanes // 2, 37]:
        x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
        want = int8_reference(x, dense, row_scale, 0.05, 131)
        np.testing.assert_allclose(run(x), want, rtol=2e-6, atol=1e-5, err_msg=f"m={m}")
        other_zeroed, expected_zeroed = ((tokens_codes_zeroed, gemv_codes_zeroed) if m in small_ms
                                         else (gemv_codes_zeroed, tokens_codes_zeroed))
        np.testing.assert_allclose(run(x, other_zeroed), want, rtol=2e-6, atol=1e-5,
                                   err_msg=f"m={m}: the other schedule ran")
        assert not np.allclose(run(x, expected_zeroed), want, rtol=1e-3, atol=1e-3), \
            f"m={m}: the expected schedule did not run"


def test_int8_odd_block_heights_keep_tokens_in_lanes():
    """3-row blocks neither fill nor split the lanes: tokens in lanes at every m, m = 1 included."""
    n, k = 48, 80
    row_ptr, col_idx, codes = random_bsr(n, k, 3, 5, 0.3, values=np.int8)
    kern = bsr_matmul_int8("odd", row_ptr, col_idx, codes, np.ones(n, np.float32), 0.05, 0, n, k, NATIVE)
    assert "small_m_schedule" not in kern.notes
    check_int8(kern, dense_from_bsr(row_ptr, col_idx, codes, n, k), np.ones(n, np.float32), 0.05, 0,
               ms=SMALL_MS)


def test_int8_gemv_words_gather_a_block_row_in_order():
    """4x1 blocks in vpmaddwd words (2 kept columns) with 8 lanes: 2 words of 4 rows a vector. Block-row
    0 keeps columns 1, 2 and 5: words (1, 2) and (5, padding); block-row 1 is empty; block-row 2 keeps
    column 7, one word padded with a zero word."""
    dot = bsr_int8._DotInstr("vpmaddwd ymm", 8, 2, "llvm.x86.avx2.pmadd.wd")
    layout = bsr_int8._gemv_layout(4, 1, dot)
    assert (layout.rows, layout.span, layout.segments) == (4, 1, 2)
    row_ptr = np.array([0, 3, 3, 4], np.int32)
    cols = np.array([1, 2, 5, 7], np.int32)
    codes = np.arange(1, 17, dtype=np.int8).reshape(4, 4, 1)
    vec_ptr, vec_col, vec_w = bsr_int8._gemv_words(row_ptr, cols, codes, 4, 1, 2, layout)
    assert vec_ptr.tolist() == [0, 1, 1, 2]
    assert vec_col.tolist() == [[1, 2, 5, 0], [7, 0, 0, 0]]
    lanes = vec_w.reshape(2, 2, 4, 2)           # vector, segment, row, column of the word
    assert lanes[0, 0, :, 0].tolist() == [1, 2, 3, 4] and lanes[0, 0, :, 1].tolist() == [5, 6, 7, 8]
    assert lanes[0, 1, :, 0].tolist() == [9, 10, 11, 12] and lanes[0, 1, :, 1].tolist() == [0, 0, 0, 0]
    assert lanes[1, 0, :, 0].tolist() == [13, 14, 15, 16] and not lanes[1, 0, :, 1].any()
    assert not lanes[1, 1].any()


def test_int8_gemv_units_of_wide_blocks_are_consecutive_columns():
    """1x4 blocks on AVX2: a unit is a block (2 words, one load); 1x6 blocks in units of 4 columns leave
    zero codes where a unit runs past a block into columns no block keeps."""
    dot = bsr_int8._DotInstr("vpmaddwd ymm", 8, 2, "llvm.x86.avx2.pmadd.wd")
    row_ptr, cols = np.array([0, 2], np.int32), np.array([0, 3], np.int32)
    codes = np.arange(1, 9, dtype=np.int8).reshape(2, 1, 4)
    vec_ptr, vec_col, vec_w = bsr_int8._gemv_words(row_ptr, cols, codes, 1, 4, 2, bsr_int8._gemv_layout(1, 4, dot))
    assert vec_ptr.tolist() == [0, 1] and vec_col.tolist() == [[0, 12, 0, 0]]
    assert vec_w.reshape(4, 4).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [0] * 4, [0] * 4]
    wide = bsr_int8._gemv_layout(1, 6, dot)
    assert (wide.span, wide.segments, wide.gathered) == (2, 4, False)
    codes6 = np.arange(1, 13, dtype=np.int8).reshape(2, 1, 6)
    vec_ptr, vec_col, vec_w = bsr_int8._gemv_words(row_ptr[:2], np.array([0, 2], np.int32), codes6, 1, 6, 2, wide)
    assert vec_col.tolist() == [[0, 4, 12, 16]]
    assert vec_w.reshape(4, 4).tolist() == [[1, 2, 3, 4], [5, 6, 0, 0], [7, 8, 9, 10], [11, 12, 0, 0]]


def test_int8_gemv_layout_per_block_shape():
    """A 1x4 block is one unit of two words on AVX2 (one 8-byte load a block), a 16x1 block-row two
    8-row chunks; with 16-lane VNNI a 4x1 vector holds 4 words of 4 rows."""
    avx2 = bsr_int8._DotInstr("vpmaddwd ymm", 8, 2, "x")
    vnni512 = bsr_int8._DotInstr("vpdpbusd zmm", 16, 4, "x")
    assert bsr_int8._gemv_layout(1, 4, avx2) == bsr_int8._GemvLayout(1, 2, 4, 4, False)
    assert bsr_int8._gemv_layout(16, 1, avx2) == bsr_int8._GemvLayout(8, 1, 1, 4, True)
    assert bsr_int8._gemv_layout(4, 1, vnni512) == bsr_int8._GemvLayout(4, 1, 4, 8, True)
    assert bsr_int8._gemv_layout(1, 4, vnni512) == bsr_int8._GemvLayout(1, 1, 16, 8, False)
    assert bsr_int8._gemv_layout(3, 5, avx2) is None


def test_int8_rounds_half_to_even_and_clips():
    """x_scale 0.5 makes x / x_scale exact: 0.25 -> 0.5 -> 0, 0.75 -> 1.5 -> 2, -0.25 -> -0; far values clip."""
    n, k = 8, 16
    row_ptr, col_idx = np.array([0, 16, 16], np.int32), np.arange(16, dtype=np.int32)
    codes = np.random.default_rng(0).integers(-128, 128, (16, 4, 1)).astype(np.int8)
    row_scale = np.ones(n, np.float32)
    kern = bsr_matmul_int8("ties", row_ptr, col_idx, codes, row_scale, 0.5, 7, n, k, NATIVE)
    x = np.array([[0.25, 0.75, 1.25, -0.25, -0.75, 1e4, -1e4, 0.0, 3.0, -3.5, 63.5, 64.5, -2.5, 2.5, 0.5, -0.5]],
                 np.float32)
    want = int8_reference(x, dense_from_bsr(row_ptr, col_idx, codes, n, k), row_scale, 0.5, 7)
    np.testing.assert_array_equal(runner(kern)(x), want.astype(np.float32))


@pytest.mark.parametrize("group,r,c", [(4, 1, 4), (4, 4, 1), (4, 3, 5), (1, 4, 1), (2, 16, 1)])
def test_int8_lane_formats_emulated(group, r, c, monkeypatch):
    """vpdpbusd's 4-column lanes (paired for 1x4, gathered for 4x1), and the plain 1-column path,
    with the dot instruction's arithmetic emulated in plain vectors so that they run on any CPU."""
    monkeypatch.setattr(bsr_int8, "_dot_instr", lambda cpu: bsr_int8._DotInstr("emulated", cpu.lanes, group, None))
    n, k = 48 // r * r, 80 // c * c
    row_ptr, col_idx, codes = random_bsr(n, k, r, c, 0.3, values=np.int8)
    row_scale = np.full(n, 0.01, np.float32)
    kern = bsr_matmul_int8("emu", row_ptr, col_idx, codes, row_scale, 0.1, 255, n, k, NATIVE)
    assert kern.notes["k_per_lane"] == group
    check_int8(kern, dense_from_bsr(row_ptr, col_idx, codes, n, k), row_scale, 0.1, 255, ms=SMALL_MS + [9, 37])


def test_int8_groups_pack_a_block_row_in_order():
    """4x1 blocks in vpmaddwd pairs: a block-row with 3 blocks gives 2 groups, the last padded with a
    zero weight that reads a valid column."""
    row_ptr = np.array([0, 3, 3], np.int32)
    cols = np.array([1, 5, 6], np.int32)
    codes = np.arange(12, dtype=np.int8).reshape(3, 4, 1)
    grp_ptr, gk, gw, paired = bsr_int8._int8_groups(row_ptr, cols, codes, 4, 1, 2)
    assert not paired and grp_ptr.tolist() == [0, 2, 2]
    assert gk.tolist() == [[1, 5], [6, 6]]
    lanes = gw.view(np.int16).reshape(2, 4, 2)
    assert lanes[0, :, 0].tolist() == [0, 1, 2, 3] and lanes[0, :, 1].tolist() == [4, 5, 6, 7]
    assert lanes[1, :, 0].tolist() == [8, 9, 10, 11] and lanes[1, :, 1].tolist() == [0, 0, 0, 0]


# --- the assembly -------------------------------------------------------------------------------


def assembly(kern: Kernel, target: str) -> str:
    lib = tvm.compile(tvm.IRModule({kern.name: kern.func}), target=llvm_target(target).target)
    return lib.mod.inspect_source("asm")


@pytest.mark.skipif("avx2" not in llvm_target(NATIVE).features, reason="this host has no AVX2")
def test_native_assembly_uses_fma_and_pmaddwd():
    """FMAs and the int8 dot instruction of this host's instruction sets, on its widest registers:
    vpmaddwd on ymm with AVX2, vpdpbusd on zmm with AVX-512 VNNI."""
    dot, register, lanes = host_dot()
    args = random_bsr(64, 64, 4, 1, 0.3)
    asm = assembly(bsr_matmul("f", *args, 64, 64, NATIVE), NATIVE)
    assert "vfmadd" in asm and f"%{register}" in asm
    codes = random_bsr(64, 64, 4, 1, 0.3, values=np.int8)
    kern = bsr_matmul_int8("q", *codes, np.ones(64, np.float32), 0.1, 3, 64, 64, NATIVE)
    assert kern.notes["dot"] == f"{dot} {register}" and kern.notes["lanes"] == lanes
    asm8 = assembly(kern, NATIVE)
    assert dot in asm8 and f"%{register}" in asm8
    assert "vpmaddubsw" not in asm8           # it would saturate on 8-bit activations


@pytest.mark.parametrize("cpu,r,c,dot,register", [
    ("sapphirerapids", 4, 1, "vpdpbusd", "zmm"),
    pytest.param("sapphirerapids", 1, 4, "vpdpbusd", "zmm", marks=pytest.mark.slow),
    pytest.param("skylake-avx512", 4, 1, "vpmaddwd", "zmm", marks=pytest.mark.slow),    # AVX-512 without VNNI
    ("alderlake", 4, 1, "vpdpbusd", "ymm"),            # AVX-VNNI without AVX-512
])
def test_cross_compiled_assembly(cpu, r, c, dot, register):
    """Cross-compiled only, never run: the fp32 tile's FMAs and the int8 dot on the target's registers."""
    target = f"llvm -mtriple=x86_64-linux-gnu -mcpu={cpu}"
    lanes = 16 if register == "zmm" else 8
    assert llvm_target(target).lanes == lanes and isa_dot(llvm_target(target).features) == (dot, register)
    asm = assembly(bsr_matmul("f", *random_bsr(64, 64, r, c, 0.3), 64, 64, target), target)
    assert "vfmadd" in asm and (f"%{register}" in asm)
    codes = random_bsr(64, 64, r, c, 0.3, values=np.int8)
    kern = bsr_matmul_int8("q", *codes, np.ones(64, np.float32), 0.1, 3, 64, 64, target)
    assert kern.notes["dot"] == f"{dot} {register}" and kern.notes["lanes"] == lanes
    asm8 = assembly(kern, target)
    assert dot in asm8 and f"%{register}" in asm8 and "vpmaddubsw" not in asm8


@pytest.mark.parametrize("cpu,r,c,dot", [
    pytest.param("native", 4, 1, None, id="native-4-1-host_dot"),     # vpmaddwd with AVX2, vpdpbusd with VNNI
    ("sapphirerapids", 4, 1, "vpdpbusd"),
    ("alderlake", 1, 4, "vpdpbusd"),
])
def test_gemv_schedule_assembly_uses_the_dot_instruction(cpu, r, c, dot, monkeypatch):
    """The small-m branch is one more parallel function with the dot instruction than the
    tokens-in-lanes kernel alone has (cross-compiled targets are never run)."""
    target = NATIVE if cpu == "native" else f"llvm -mtriple=x86_64-linux-gnu -mcpu={cpu}"
    if cpu == "native" and "avx2" not in llvm_target(NATIVE).features:
        pytest.skip("this host has no AVX2")
    dot = dot or host_dot()[0]
    args = (*random_bsr(64, 64, r, c, 0.3, values=np.int8), np.ones(64, np.float32), 0.1, 3, 64, 64, target)
    with_gemv = assembly(bsr_matmul_int8("q", *args), target)
    monkeypatch.setattr(bsr_int8, "_gemv_layout", lambda r, c, dot: None)
    tokens_only = assembly(bsr_matmul_int8("q", *args), target)

    def functions_with_dot(asm):
        return sum(dot in body for body in asm.split("@function")[1:])
    assert functions_with_dot(with_gemv) == functions_with_dot(tokens_only) + 1 >= 2
    assert "vpmaddubsw" not in with_gemv


# --- errors -------------------------------------------------------------------------------------


def fp32_args(**change):
    row_ptr, col_idx, blocks = random_bsr(16, 16, 4, 1, 0.5)
    args = dict(name="enc.fc1", row_ptr=row_ptr, col_idx=col_idx, blocks=blocks, n=16, k=16, target=NATIVE)
    args.update(change)
    return args


@pytest.mark.parametrize("change,message", [
    (dict(n=18), r"'enc.fc1' \(18 x 16\): 4x1 blocks do not tile the 18 x 16 weight"),
    (dict(blocks=np.zeros((3, 4, 3), np.float32)), r"4x3 blocks do not tile the 16 x 16 weight"),
    (dict(blocks=np.zeros((0, 4, 1), np.float64)), r"blocks must be float32 \[kept, R, C\], got float64"),
    (dict(blocks=np.zeros((4, 4), np.float32)), r"blocks must be float32 \[kept, R, C\], got float32 \(4, 4\)"),
    (dict(row_ptr=np.zeros(4, np.int32)), r"row_ptr must have 5 entries"),
    (dict(row_ptr=np.array([0, 1, 2, 3, 4.0])), r"row_ptr must be a 1-D integer array, got float64"),
    (dict(col_idx=np.zeros(3, np.float32)), r"col_idx must be a 1-D integer array"),
    (dict(row_ptr=np.array([0, 1, 1, 1, 1], np.int32)), r"inconsistent BSR arrays: row_ptr .* ends at 1"),
    (dict(row_ptr=np.array([1, 1, 1, 1, 1], np.int32)), r"inconsistent BSR arrays"),
    (dict(col_idx=np.full(9, 16, np.int32)), r"col_idx out of range: block-columns must lie in \[0, 16\)"),
    (dict(col_idx=np.full(9, -1, np.int32)), r"col_idx out of range"),
    (dict(target="x86 native"), r"must start with 'llvm'"),
    (dict(target="llvm mcpu=native"), r"unknown option 'mcpu=native'"),
    (dict(target="llvm -mcpu=pentium9"), r"LLVM knows no CPU 'pentium9'"),
])
def test_fp32_errors(change, message):
    args = fp32_args()
    if "col_idx" in change or "row_ptr" in change:
        # keep the sizes consistent unless the case is about them
        args["row_ptr"], args["col_idx"], args["blocks"] = (np.array([0, 2, 4, 7, 9], np.int32),
                                                            np.array([0, 3, 1, 2, 0, 5, 9, 3, 4], np.int32),
                                                            np.ones((9, 4, 1), np.float32))
    args.update(change)
    with pytest.raises(KernelError, match=message):
        bsr_matmul(**args)


def test_fp32_error_when_block_columns_repeat():
    with pytest.raises(KernelError, match="'dup'.*col_idx must increase strictly within each block-row"):
        bsr_matmul("dup", np.array([0, 2, 2], np.int32), np.array([3, 3], np.int32), np.ones((2, 1, 4), np.float32),
                   2, 16, NATIVE)


@pytest.mark.parametrize("change,message", [
    (dict(blocks_int8=np.ones((9, 4, 1), np.float32)), r"'q' \(16 x 16\): blocks must be int8"),
    (dict(row_scale=np.ones(16, np.float64)), r"row_scale must be finite float32 \[16\]"),
    (dict(row_scale=np.ones(8, np.float32)), r"row_scale must be finite float32 \[16\] .* got float32 \(8,\)"),
    (dict(row_scale=np.full(16, np.inf, np.float32)), r"row_scale must be finite"),
    (dict(x_scale=0.0), r"x_scale must be a positive finite number, got 0.0"),
    (dict(x_scale=float("nan")), r"x_scale must be a positive finite number"),
    (dict(x_zero_point=256), r"x_zero_point must be an integer in \[0, 255\]"),
    (dict(x_zero_point=1.5), r"x_zero_point must be an integer"),
])
def test_int8_errors(change, message):
    args = dict(name="q", row_ptr=np.array([0, 2, 4, 7, 9], np.int32),
                col_idx=np.array([0, 3, 1, 2, 0, 5, 9, 3, 4], np.int32), blocks_int8=np.ones((9, 4, 1), np.int8),
                row_scale=np.ones(16, np.float32), x_scale=0.1, x_zero_point=128, n=16, k=16, target=NATIVE)
    args.update(change)
    with pytest.raises(KernelError, match=message):
        bsr_matmul_int8(**args)


def test_int8_error_for_a_too_long_reduction():
    with pytest.raises(KernelError, match=r"'long' \(4 x 70000\): k = 70000 is too long for exact int32 sums"):
        bsr_matmul_int8("long", np.array([0, 1], np.int32), np.array([2], np.int32), np.ones((1, 4, 1), np.int8),
                        np.ones(4, np.float32), 0.1, 0, 4, 70000, NATIVE)


def test_native_target_matches_this_host():
    """-mcpu=native takes the host's features too: no AVX-512 code where a VM hides it."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo")
    cpu = llvm_target(NATIVE)
    assert ("avx512f" in cpu.features) == ("avx512f" in flags)
    assert cpu.lanes == (16 if "avx512f" in flags else 8 if "avx" in flags else 4)

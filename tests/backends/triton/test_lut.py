"""The palettized-weight GEMM under Triton's CPU interpreter, checked against the IR's decode, and
compiled ahead of time for every GPU architecture file (sm_80 and sm_90 in the default run, sm_86
and sm_89 under -m slow).

Tolerances: the largest error relative to max|reference| is held to 3e-3 for fp16 (fp16 table
values, fp16 output) and 2.5e-2 for bf16 (table values and output rounded to bf16)."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import json

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from nnforge.backends.triton.kernels import Build, KernelError, PackedWeight, compile_many, lut as lk  # noqa: E402
from nnforge.ir.palette import Palettized  # noqa: E402
from nnforge.passes.cluster.kmeans import palettize_weight  # noqa: E402

from .aot import ARCH_GROUPS, check_build, tiles  # noqa: E402

TOL = {torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
N, K = 72, 200                      # N and K not multiples of any tile


def _random(bits, group_size=None, lut_dtype=torch.float16, n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 1 << bits, (n, k), generator=g)
    lut = torch.randn(n // (group_size or n), 1 << bits, generator=g).to(lut_dtype)
    return Palettized.from_indices(idx, lut, bits=bits, shape=(n, k), group_size=group_size)


def _kmeans(bits, group_size):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(bits))
    return palettize_weight(w, bits, group_size=group_size, iters=10, generator=torch.Generator().manual_seed(0))[0]


def _check(y, x, enc, bias=None):
    ref = x.float() @ enc.decode().T + (0 if bias is None else bias.float())
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = float((y.float() - ref).abs().max() / ref.abs().max())
    assert err <= TOL[x.dtype], err


CASES = {
    "2bit-tensor": lambda: _random(2),
    "2bit-g8": lambda: _random(2, 8),
    "3bit-kmeans-row": lambda: _kmeans(3, 1),
    "3bit-tensor": lambda: _random(3),
    "4bit-kmeans-row": lambda: _kmeans(4, 1),
    "4bit-tensor-f32lut": lambda: _random(4, lut_dtype=torch.float32),
    "8bit-g24": lambda: _random(8, 24),
}


@pytest.mark.parametrize("case", list(CASES))
# m = 1: the weight-streaming path (M <= SMALL_M, a decode step); 33: the tiled path with a partial last
# tile. 5 and 16 (a partial stream, its largest M) under -m slow.
@pytest.mark.parametrize("m", [1, pytest.param(5, marks=pytest.mark.slow), pytest.param(16, marks=pytest.mark.slow), 33])
def test_matches_decode(case, m):
    enc = CASES[case]()
    pw = lk.pack(enc, "h100")
    g = torch.Generator().manual_seed(m)
    bias = torch.randn(N, generator=g)
    for dt in (torch.float16, torch.bfloat16):
        x = torch.randn(m, K, generator=g).to(dt)
        for split in ((1, 2) if m <= lk.SMALL_M else (None,)):
            _check(lk.matmul(x, pw, bias.to(dt), split_k=split), x, enc, bias.to(dt))


@pytest.mark.parametrize("bits", [1, 5, 6])
def test_other_widths(bits):
    enc = _random(bits, 8)
    x = torch.randn(4, K, dtype=torch.float16)
    _check(lk.matmul(x, lk.pack(enc, "a100")), x, enc)


def test_layout_keeps_storage():
    enc = _random(3, k=256)
    pw = lk.pack(enc, "a100")
    assert pw.meta["planes"] == [2, 1] and set(pw.tensors) == {"p0", "p1", "lut"}
    assert pw.meta["code_bytes"] == pw.meta["stream_bytes"] == enc.indices.numel()
    odd = lk.pack(_random(3, k=K + 1), "a100")       # a row of 201 codes: at most a byte more per row
    assert odd.meta["code_bytes"] - odd.meta["stream_bytes"] <= N
    four = _random(4)
    assert torch.equal(lk.pack(four, "a100").tensors["p0"], four.indices)      # 4-bit: the stream as is


def test_rebuilt_packed_weight_gives_same_result():
    pw = lk.pack(_random(3, 8), "h100")
    meta = json.loads(json.dumps(pw.meta))
    again = PackedWeight(pw.format, pw.n, pw.k, {k: v.clone() for k, v in pw.tensors.items()}, meta)
    x = torch.randn(3, K, dtype=torch.float16)
    assert torch.equal(lk.matmul(x, pw), lk.matmul(x, again))


def test_supports_names_the_feature():
    assert lk.supports(_random(4), "a100") is None
    assert "7-bit" in lk.supports(_random(7), "h100")
    assert "target" in lk.supports(_random(4), "cpu")
    assert "Palettized" in lk.supports(object(), "h100")


def test_kernel_errors():
    enc = _random(4)
    pw = lk.pack(enc, "h100")
    x = torch.randn(2, K, dtype=torch.float16)
    with pytest.raises(KernelError, match="7-bit"):
        lk.pack(_random(7), "h100")
    with pytest.raises(KernelError, match="format 'palettized'"):
        lk.matmul(x, PackedWeight("minifloat", N, K, {}))
    with pytest.raises(KernelError, match="lacks lut"):
        lk.matmul(x, PackedWeight("palettized", N, K, {"p0": pw.tensors["p0"]}, pw.meta))
    with pytest.raises(KernelError, match="disagrees"):
        lk.matmul(x, PackedWeight("palettized", N, K, pw.tensors, dict(pw.meta, bits=3)))
    with pytest.raises(KernelError, match="2-D"):
        lk.matmul(x[None], pw)
    with pytest.raises(KernelError, match="float16 or bfloat16"):
        lk.matmul(x.float(), pw)
    with pytest.raises(KernelError, match=f"K={K}"):
        lk.matmul(x[:, :100], pw)
    with pytest.raises(KernelError, match="bias"):
        lk.matmul(x, pw, torch.zeros(N, 1))
    with pytest.raises(KernelError, match="split_k"):
        lk.matmul(x, pw, split_k=-1)


# --- ahead-of-time compilation, specialised as a real launch is (aligned pointers, K and strides
# multiples of 16), for every GPU architecture file: its default tiles per index width, and every
# autotuning alternative with 3-bit (two planes) and 8-bit indices. ----------------------------------
DIVISIBLE = ("K", "stride_xm", "stride_p0", "stride_p1", "stride_ym", "k_split")
BASE = {"x_ptr": "*fp16", "p0_ptr": "*u8", "p1_ptr": "*u8", "lut_ptr": "*fp16", "bias_ptr": "*fp16", "y_ptr": "*fp16",
        **dict.fromkeys("M N K stride_xm stride_p0 stride_p1 stride_ym k_split".split(), "i32")}


@pytest.fixture(scope="module", params=ARCH_GROUPS)
def aot(request):
    archs, labels, builds = request.param, [], []
    for bits in (2, 3, 4, 8):
        enc = Palettized.from_indices(torch.randint(0, 1 << bits, (64, 256)), torch.randn(64, 1 << bits).half(),
                                      bits=bits, shape=(64, 256), group_size=1)
        pw = lk.pack(enc, "h100")
        for arch in archs:
            for cname, cands in tiles(arch, "lut").items():
                for i, cfg in enumerate(cands):
                    if i > 0 and bits not in (3, 8):
                        continue
                    split = 2 if cname == "decode" else 1
                    c = lk.kernel_args(pw, cfg, has_bias=True, split=split)
                    sig = dict(BASE, y_ptr="*fp32" if split > 1 else "*fp16", **dict.fromkeys(c, "constexpr"))
                    labels.append((f"{bits}bit/{arch.name}/{cname}/{i}", arch.sm, cfg))
                    builds.append(Build(lk._lut_kernel, sig, c, arch.sm, cfg.num_warps, cfg.num_stages, DIVISIBLE))
    return archs, list(zip(labels, compile_many(builds)))


def test_aot_configs_compile(aot):
    # every autotuning candidate of every architecture is built for it
    archs, built = aot
    cands = {(label.split("/")[1], label.split("/")[2], int(label.split("/")[3])) for (label, _, _), _ in built}
    assert cands == {(a.name, c, i) for a in archs for c, cs in tiles(a, "lut").items() for i in range(len(cs))}
    for (label, cap, cfg), k in built:
        check_build(k, wgmma=cap >= 90 and cfg.block_m >= 64)

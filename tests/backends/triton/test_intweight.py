"""The int-weight (W4A16 / W8A16) Triton kernel: under the CPU interpreter against
``x.float() @ enc.decode().T (+ bias)``, and compiled ahead of time for every GPU architecture file.

Encodings are real ones: RTN (``quantize_rtn``) and GPTQ with act-order (``gptq_quantize``), plus
``IntQuant.from_codes`` for the combinations no quantiser makes (signed codes with zero points,
unsigned without). N = 100 is not a multiple of the 64-wide tile, so every case masks columns.

Tolerances, on the largest |reference| output: fp16 2e-3 (output rounding 2^-11, fp16 scale
storage 2^-11, dequantisation 2^-11 on weights); bf16 1.6e-2 (bf16 output and weight rounding 2^-8).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"          # before triton (and the kernels) are imported

import pytest                                 # noqa: E402
import torch                                  # noqa: E402

pytest.importorskip("triton", reason="the int-weight kernels need triton")

from nnforge.backends.triton.kernels import Build, KernelError, PackedWeight, compile_many  # noqa: E402
from nnforge.backends.triton.kernels.common import target_sms                            # noqa: E402
from nnforge.backends.triton.kernels import intweight as iw                              # noqa: E402
from nnforge.ir.encodings import IntQuant                                                # noqa: E402
from nnforge.passes.quantize.formats import parse_format, quantize_rtn                    # noqa: E402
from nnforge.passes.quantize.gptq import gptq_quantize                                    # noqa: E402

from .aot import ARCHS, MAIN, check_build, tiles                                                # noqa: E402

N, K = 100, 256
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def weight(seed=0, n=N, k=K):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def rtn(spec, group_size=None, seed=0, n=N, k=K):
    return quantize_rtn(weight(seed, n, k), parse_format(spec, group_size=group_size))


def gptq(spec, group_size, seed=0):
    w = weight(seed)
    x = torch.randn(512, K, generator=torch.Generator().manual_seed(seed + 1)) * torch.linspace(0.1, 3, K)
    enc, _ = gptq_quantize(w, 2 * x.T @ x / x.shape[0], parse_format(spec, group_size=group_size), act_order=True)
    assert enc.perm is not None
    return enc


def from_codes(signed, zero, bits=4, group_size=32):
    g = torch.Generator().manual_seed(3)
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if signed else (0, (1 << bits) - 1)
    codes = torch.randint(lo, hi + 1, (N, K), generator=g)
    scale = torch.rand(N, K // group_size, generator=g) * 0.05 + 0.01
    zp = torch.randint(lo, hi + 1, scale.shape, generator=g) if zero else None
    return IntQuant.from_codes(codes, scale, bits=bits, signed=signed, shape=(N, K), group_size=group_size,
                               zero_point=zp)


def activations(m, dtype, k=K, seed=7):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check(enc, m, dtype, bias=True, split_k=None, target="h100"):
    x = activations(m, dtype, enc.shape[1])
    b = torch.randn(enc.shape[0], generator=torch.Generator().manual_seed(9)) if bias else None
    y = iw.matmul(x, iw.pack(enc, target), b, split_k=split_k)
    ref = x.float() @ enc.decode().T + (b if bias else 0)
    assert y.dtype == dtype and y.shape == (m, enc.shape[0])
    err = (y.float() - ref).abs().max().item()
    assert err <= RTOL[dtype] * ref.abs().max().item(), f"max error {err} on outputs up to {ref.abs().max()}"
    return y


CASES = {
    "int4-sym-g128": lambda: rtn("int4", 128),
    "int4-zero-g32": lambda: rtn("uint4", 32),
    "int4-sym-channel": lambda: rtn("int4"),
    "int4-zero-channel": lambda: rtn("uint4"),
    "int4-sym-g32": lambda: rtn("int4", 32),
    "int4-zero-g128": lambda: rtn("uint4", 128),
    "int8-sym-channel": lambda: rtn("int8"),
    "int8-zero-g32": lambda: rtn("uint8", 32),
    "int4-gptq-actorder-g32": lambda: gptq("int4", 32),
    "int4-gptq-actorder-zero-g128": lambda: gptq("uint4", 128),
    "int4-signed-with-zero": lambda: from_codes(True, True),
    "int4-unsigned-no-zero": lambda: from_codes(False, False),
    "int8-signed-with-zero-g64": lambda: from_codes(True, True, bits=8, group_size=64),
    "int4-per-tensor": lambda: IntQuant.quantize(weight(), 4, per_tensor=True),
}
# Each case runs at one row count and dtype; together they cover M in {1, 5, 16, 33}, both dtypes,
# split-K (M <= 16) and the direct path (M = 33).
RUNS = [("int4-sym-g128", 1, torch.float16), ("int4-zero-g32", 5, torch.float16),
        ("int4-sym-channel", 16, torch.bfloat16), ("int4-zero-channel", 33, torch.float16),
        ("int4-sym-g32", 33, torch.bfloat16), ("int4-zero-g128", 16, torch.bfloat16),
        ("int8-sym-channel", 1, torch.float16), ("int8-sym-channel", 33, torch.bfloat16),
        ("int8-zero-g32", 5, torch.bfloat16), ("int4-gptq-actorder-g32", 5, torch.float16),
        ("int4-gptq-actorder-zero-g128", 33, torch.bfloat16), ("int4-signed-with-zero", 16, torch.float16),
        ("int4-unsigned-no-zero", 5, torch.bfloat16), ("int8-signed-with-zero-g64", 33, torch.float16),
        ("int4-per-tensor", 1, torch.bfloat16)]


@pytest.mark.parametrize("case,m,dtype", RUNS, ids=[f"{c}-m{m}-{str(d)[6:]}" for c, m, d in RUNS])
def test_matches_decode(case, m, dtype):
    check(CASES[case](), m, dtype)


def test_split_k_and_direct_agree_and_are_deterministic():
    enc, x = rtn("int4", 32), activations(5, torch.float16)
    pw = iw.pack(enc, "a100")
    assert iw._split_k(2, 4, 5, target_sms("a100")) > 1 and iw._split_k(6, 4, 33, target_sms("a100")) == 1
    direct, split = iw.matmul(x, pw, split_k=1), iw.matmul(x, pw, split_k=4)
    assert torch.equal(split, iw.matmul(x, pw, split_k=4))
    assert (direct.float() - split.float()).abs().max() <= 2e-3 * direct.float().abs().max()
    check(enc, 5, torch.float16, bias=False, split_k=3)      # 4 K tiles in 3 splits: uneven
    assert iw._LOCKS[x.device].count_nonzero() == 0           # the last CTA of each tile reset its counter


def test_short_k_not_a_multiple_of_the_tile():
    check(rtn("int4", 16, n=70, k=144), 5, torch.float16)
    check(rtn("uint8", n=64, k=40), 33, torch.bfloat16)


def test_layout_matches_the_docstring_example():
    enc = rtn("int4", 32)
    pw = iw.pack(enc, "h100")
    q, codes = pw.tensors["qweight"], enc.int_codes() + 8
    assert q.shape == (2, 32, 64) and pw.tensors["scale"].shape == (8, N) and q[1, :, 36:].eq(0).all()
    assert (int(q[1, 2, 6]) >> 12) & 0xF == codes[70, 19]
    assert pw.tensors["scale"][19 // 32, 70] == enc.scale[70, 0].half()
    assert "zero" not in pw.tensors and pw.meta["zero_const"] == 8
    assert gptq_perm_packed(gptq("int4", 32))


def gptq_perm_packed(enc):
    pw = iw.pack(enc, "a100")
    return pw.meta["act_order"] and torch.equal(pw.tensors["perm"], enc.perm.to(torch.int32))


def test_round_trip_through_tensors_and_meta():
    import json
    enc, x = gptq("uint4", 32), activations(5, torch.float16)
    pw = iw.pack(enc, "h100")
    again = PackedWeight(pw.format, pw.n, pw.k, {k: v.clone() for k, v in pw.tensors.items()},
                         json.loads(json.dumps(pw.meta)))
    assert torch.equal(iw.matmul(x, pw), iw.matmul(x, again))


@pytest.mark.parametrize("enc,target,why", [
    (lambda: rtn("int3"), "h100", "3-bit codes"),
    (lambda: rtn("e4m3"), "h100", "minifloat encoding"),
    (lambda: IntQuant.quantize(torch.randn(4, 8, 16), 4), "a100", "3-D weight"),
    (lambda: rtn("int4", 32), "cpu", "target 'cpu'"),
    (lambda: rtn("int4", 8), "h100", "group_size 8"),
    (lambda: IntQuant.quantize(torch.randn(8, 256) * 1e7, 4), "h100", "fp16 range"),
    (lambda: IntQuant.from_codes(torch.zeros(8, 32), torch.ones(8, 1), bits=4, signed=False, shape=(8, 32),
                                 zero_point=torch.full((8, 1), 200)), "h100", "zero points outside"),
], ids=["bits", "minifloat", "3d", "target", "group", "scale-range", "zero-range"])
def test_unsupported_weights_are_named(enc, target, why):
    e = enc()
    assert why in iw.supports(e, target)
    with pytest.raises(KernelError, match=why):
        iw.pack(e, target)


def test_supported_weights():
    assert iw.supports(rtn("int8", 64), "a100") is None and iw.supports(gptq("int4", 32), "h100") is None


def _bad(field, value):
    pw = iw.pack(rtn("int4", 32), "h100")
    if field in pw.meta:
        pw.meta[field] = value
    elif value is None:
        del pw.tensors[field]
    else:
        pw.tensors[field] = value
    return pw


@pytest.mark.parametrize("make,why", [
    (lambda: (activations(2, torch.float16), PackedWeight("w4a16", N, K, {}), None), "format 'int-weight'"),
    (lambda: (activations(2, torch.float16), _bad("qweight", None), None), "lacks qweight"),
    (lambda: (activations(2, torch.float16), PackedWeight(iw.FORMAT, N, K, iw.pack(rtn("int4"), "h100").tensors, {}),
              None), "meta\\['bits'\\]"),
    (lambda: (activations(2, torch.float16), iw.pack(gptq("int4", 32), "h100").__class__(
        iw.FORMAT, N, K, {k: v for k, v in iw.pack(gptq("int4", 32), "h100").tensors.items() if k != "perm"},
        iw.pack(gptq("int4", 32), "h100").meta), None), "lacks perm"),
    (lambda: (torch.randn(K).half(), iw.pack(rtn("int4"), "h100"), None), "2-D \\[M, K\\] tensor, got \\(256,\\)"),
    (lambda: (torch.randn(2, K), iw.pack(rtn("int4"), "h100"), None), "float16 or bfloat16, got torch.float32"),
    (lambda: (activations(2, torch.float16, k=100), iw.pack(rtn("int4", 32, k=128), "h100"), None),
     "x has 100 columns but the weight has K=128"),
    (lambda: (activations(2, torch.float16), _bad("qweight", torch.zeros(2, 32, 64, dtype=torch.int8)), None),
     "qweight must be int32 \\(2, 32, 64\\)"),
    (lambda: (activations(2, torch.float16), _bad("scale", torch.zeros(4, N, dtype=torch.float16)), None),
     "scale must be \\[8, 100\\]"),
    (lambda: (activations(2, torch.float16), iw.pack(rtn("int4"), "h100"), torch.zeros(N + 1)),
     "bias must be a float tensor of shape \\(100,\\), got \\(101,\\)"),
    (lambda: (activations(2, torch.float16, K).to("meta"), iw.pack(rtn("int4"), "h100"), None),
     "x is on meta but qweight is on cpu"),
], ids=["format", "tensor", "meta", "perm", "x-dims", "x-dtype", "k", "qweight", "scale", "bias", "device"])
def test_matmul_errors_name_the_problem(make, why):
    x, w, b = make()
    with pytest.raises(KernelError, match=why):
        iw.matmul(x, w, b)


def test_split_k_argument_is_checked():
    with pytest.raises(KernelError, match="split_k must be a positive int"):
        iw.matmul(activations(2, torch.float16), iw.pack(rtn("int4"), "h100"), split_k=0)


def test_empty_rows():
    assert iw.matmul(activations(0, torch.float16), iw.pack(rtn("int4"), "h100")).shape == (0, N)


# Ahead-of-time builds, specialised as a real launch is (aligned pointers; N, K and the word and
# panel counts multiples of 16), for every GPU architecture file: each of its candidate tiles (each
# autotuning candidate of each M bucket), with its decode variant split over K, and the per-group
# scaling path (int8, groups of 32, zero points, act-order, bf16) for every decode candidate.
AOT = [(arch.name, arch.sm, b, i, variant) for arch in ARCHS for b, cands in tiles(arch, "intweight").items()
       for i in range(len(cands)) for variant in (["whole-tile"] + (["per-group"] if b == "decode" else []))]
DIVISIBLE = ("N", "K", "KW", "NP")


def _config(arch_name, bucket, index):
    return tiles(next(a for a in ARCHS if a.name == arch_name), "intweight")[bucket][index]


def _build(case) -> Build:
    arch_name, capability, bucket, index, variant = case
    cfg = _config(arch_name, bucket, index)
    split = 4 if bucket == "decode" else 1
    if variant == "whole-tile":
        spec = iw.compile_spec(cfg, bits=4, group=128 if cfg.block_k <= 128 else 0, split_k=split)
    else:
        spec = iw.compile_spec(cfg, bits=8, group=32, dtype="bf16", split_k=split, has_zero=True, has_perm=True)
    return Build(*spec, capability, cfg.num_warps, cfg.num_stages, DIVISIBLE)


@pytest.fixture(scope="module")
def aot():
    """The build of a case: the cases of the a100 and h100 architectures are compiled together on
    first use, those of the other architectures (under -m slow) together too."""
    built = {}

    def get(case):
        if case not in built:
            group = [c for c in AOT if (c[0] in MAIN) == (case[0] in MAIN)]
            built.update(zip(group, compile_many([_build(c) for c in group])))
        return built[case]
    return get


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c[0] in MAIN else pytest.mark.slow) for c in AOT],
                         ids=[f"{a}-{b}-cfg{i}-{v}" for a, _, b, i, v in AOT])
def test_compiles_for_architecture(aot, case):
    arch_name, capability, bucket, index, _ = case
    # sm_90's tiles of 64+ rows run on wgmma; the 16-row decode tile stays on mma.sync
    check_build(aot(case), wgmma=capability >= 90 and _config(arch_name, bucket, index).block_m >= 64)


def test_every_bucket_of_every_architecture_is_built():
    assert {(a, b) for a, _, b, _, _ in AOT} == {(a.name, b) for a in ARCHS for b in ("decode", "prefill", "gemm")}


def test_default_config_is_the_first_candidate():
    h100, a100 = (next(a for a in ARCHS if a.name == n) for n in ("sm_90", "sm_80"))
    assert iw.config_for("h100", 4) == tiles(h100, "intweight")["decode"][0]
    assert iw.config_for("h100", 17) == tiles(h100, "intweight")["prefill"][0]
    assert iw.config_for("a100", 4096) == tiles(a100, "intweight")["gemm"][0]
    assert iw.candidates_for("interp", 4) == ("interp", (iw.INTERPRETER_CONFIG,))

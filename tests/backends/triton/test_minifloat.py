"""The minifloat-weight GEMM under Triton's CPU interpreter, checked against the IR's decode, and
compiled ahead of time for every GPU architecture file (sm_80, sm_86, sm_89, sm_90).

Tolerances: the largest error relative to max|reference| is held to 3e-3 for fp16 (weights
rounded to fp16 after scaling, fp16 output) and 2.5e-2 for bf16 (bf16 weights and output)."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import json

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from nnforge.backends.triton.kernels import (Build, CompileError, KernelError, PackedWeight,  # noqa: E402
                                             compile_many, minifloat as mk)
from nnforge.ir import MiniFloat  # noqa: E402
from nnforge.ir.dtypes import dtype  # noqa: E402
from nnforge.ir.ops.quant import fake_quantize  # noqa: E402
from nnforge.passes.quantize.formats import parse_format, quantize_rtn  # noqa: E402

from .aot import ARCH_GROUPS, ARCHS, check_build, mma_ops, tiles  # noqa: E402

TOL = {torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
N, K = 72, 256                      # N not a multiple of any tile
CASES = {                           # name: (format spec, group_size)
    "e4m3-channel": ("e4m3", None),
    "e3m2-g32": ("e3m2", 32),
    "e2m3-g64": ("e2m3", 64),
    "e2m1-g128": ("e2m1", 128),
    "e2m1-g48": ("e2m1", 48),
    "mxfp4": ("mxfp4", None),
    "nvfp4": ("nvfp4", None),
}


def _enc(case, n=N, k=K, seed=0):
    spec, gs = CASES[case]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return quantize_rtn(w, parse_format(spec, group_size=gs))


def _check(y, x, enc, bias=None):
    ref = x.float() @ enc.decode().T + (0 if bias is None else bias.float())
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = float((y.float() - ref).abs().max() / ref.abs().max())
    assert err <= TOL[x.dtype], err


@pytest.mark.parametrize("case", list(CASES))
# m = 1: the weight-streaming path (M <= SMALL_M, a decode step); 33: the tiled path with a partial last
# tile. 5 and 16 (a partial stream, its largest M) under -m slow.
@pytest.mark.parametrize("m", [1, pytest.param(5, marks=pytest.mark.slow), pytest.param(16, marks=pytest.mark.slow), 33])
def test_matches_decode(case, m):
    enc = _enc(case)
    pw = mk.pack(enc, "h100")
    g = torch.Generator().manual_seed(m)
    bias = torch.randn(N, generator=g)
    for dt in (torch.float16, torch.bfloat16):
        x = torch.randn(m, K, generator=g).to(dt)
        for split in ((1, 2) if m <= mk.SMALL_M else (None,)):
            _check(mk.matmul(x, pw, bias.to(dt), split_k=split), x, enc, bias.to(dt))


def test_no_bias_and_auto_split():
    enc = _enc("mxfp4")
    x = torch.randn(3, K, dtype=torch.float16)
    _check(mk.matmul(x, mk.pack(enc, "a100")), x, enc)


def test_fp6_planes_keep_storage():
    enc = _enc("e3m2-g32")
    pw = mk.pack(enc, "a100")
    assert pw.meta["planes"] == [4, 2] and set(pw.tensors) == {"p0", "p1", "scale"}
    assert pw.meta["code_bytes"] == pw.meta["stream_bytes"] == enc.codes.numel()
    assert mk.pack(_enc("mxfp4"), "h100").tensors["p0"] is not None


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")       # NaN/inf codes, by design
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1"])
def test_every_code_decodes_exactly(fmt):
    """Row n holds code n in column 0: y[0, n] is that code's value, NaN included."""
    f = dtype(fmt)
    codes = torch.arange(1 << f.bits)
    fields = torch.zeros(len(codes), 32, dtype=torch.int64)
    fields[:, 0] = codes
    enc = MiniFloat.from_fields(fields, torch.ones(1, 1), fmt=f, shape=(len(codes), 32))
    x = torch.zeros(1, 32, dtype=torch.float16)
    x[0, 0] = 1
    y = mk.matmul(x, mk.pack(enc, "a100")).float()[0]
    want = enc.decode()[:, 0]
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    finite = ~torch.isnan(want) & (want.abs() <= 65504)
    assert torch.equal(y[finite], want[finite])


def test_act_order_perm():
    w = torch.randn(N, K)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(3))
    base = quantize_rtn(w[:, perm], parse_format("e2m1", group_size=32))
    enc = MiniFloat(base.shape, base.fmt, base.codes, base.scale, base.group_size, perm=perm)
    pw = mk.pack(enc, "h100")
    assert pw.tensors["perm"].dtype == torch.int32
    x = torch.randn(5, K, dtype=torch.float16)
    _check(mk.matmul(x, pw, split_k=2), x, enc)
    _check(mk.matmul(x, pw, split_k=1), x, enc)


def test_rebuilt_packed_weight_gives_same_result():
    pw = mk.pack(_enc("nvfp4"), "h100")
    meta = json.loads(json.dumps(pw.meta))
    again = PackedWeight(pw.format, pw.n, pw.k, {k: v.clone() for k, v in pw.tensors.items()}, meta)
    x = torch.randn(4, K, dtype=torch.float16)
    assert torch.equal(mk.matmul(x, pw), mk.matmul(x, again))


def test_fp8_activation_path_in_interpreter():
    enc = _enc("e4m3-channel")
    pw = mk.pack(enc, "h100")
    assert mk.supports(enc, "h100", activations="e4m3") is None
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, K, generator=g)
    scale = float(x.abs().max()) / 400          # the largest values saturate at 448
    xq = mk.quantize_fp8(x, scale)
    xf = fake_quantize(x, dtype("float8_e4m3fn"), scale)
    assert torch.equal((xq.double() * scale).float(), xf)
    bias = torch.randn(N, generator=g)
    ref = xf @ enc.decode().T + bias
    for out in (torch.float16, torch.bfloat16):
        y = mk.matmul_fp8act(xq, scale, pw, bias, out_dtype=out)
        assert y.dtype == out
        assert float((y.float() - ref).abs().max() / ref.abs().max()) <= TOL[out]


def test_supports_names_the_feature():
    enc = _enc("e4m3-channel")
    assert mk.supports(enc, "h100") is None and mk.supports(_enc("nvfp4"), "a100") is None
    assert "H100" in mk.supports(enc, "a100", activations="e4m3")
    assert "per-channel" in mk.supports(_enc("mxfp4"), "h100", activations="e4m3")
    assert "e5m2" in mk.supports(enc, "h100", activations="e5m2")
    assert "target" in mk.supports(enc, "cpu")
    assert "MiniFloat" in mk.supports(object(), "h100")


def test_kernel_errors():
    enc = _enc("e4m3-channel")
    pw = mk.pack(enc, "h100")
    x = torch.randn(2, K, dtype=torch.float16)
    with pytest.raises(KernelError, match="target 'tpu'"):
        mk.pack(enc, "tpu")
    with pytest.raises(KernelError, match="format 'minifloat'"):
        mk.matmul(x, PackedWeight("palettized", N, K, {}))
    with pytest.raises(KernelError, match="lacks scale"):
        mk.matmul(x, PackedWeight("minifloat", N, K, {"p0": pw.tensors["p0"]}, pw.meta))
    with pytest.raises(KernelError, match="2-D"):
        mk.matmul(x[0], pw)
    with pytest.raises(KernelError, match="float16 or bfloat16"):
        mk.matmul(x.float(), pw)
    with pytest.raises(KernelError, match="K=256"):
        mk.matmul(x[:, :128], pw)
    with pytest.raises(KernelError, match="bias"):
        mk.matmul(x, pw, torch.zeros(N + 1))
    with pytest.raises(KernelError, match="split_k"):
        mk.matmul(x, pw, split_k=0)
    with pytest.raises(KernelError, match="float8_e4m3fn"):
        mk.matmul_fp8act(x, 1.0, pw)
    xq = mk.quantize_fp8(x.float(), 1.0)
    with pytest.raises(KernelError, match="out_dtype"):
        mk.matmul_fp8act(xq, 1.0, pw, out_dtype=torch.float32)
    with pytest.raises(KernelError, match="e4m3 weights"):
        mk.matmul_fp8act(xq, 1.0, mk.pack(_enc("mxfp4"), "h100"))
    with pytest.raises(KernelError, match="K=256"):
        mk.matmul_fp8act(xq[:, :64], 1.0, pw)


# --- ahead-of-time compilation, specialised as a real launch is (aligned pointers, K and strides
# multiples of 16), for every GPU architecture file: each of its candidate tiles, FP8 codes by bit
# decode and, with fp8 tensor cores, natively; and the fp8 x fp8 kernel with each architecture's
# own tiles where it has fp8 tensor cores, refused where it has none. --------------------------------
DIVISIBLE = ("K", "stride_xm", "stride_p0", "stride_p1", "stride_w", "stride_sr", "stride_ym", "k_split")
I32 = "M N K stride_xm stride_p0 stride_p1 stride_sr stride_sg stride_ym k_split".split()
BASE = {"x_ptr": "*fp16", "p0_ptr": "*u8", "p1_ptr": "*u8", "s_ptr": "*fp32", "g_ptr": "*fp32", "perm_ptr": "*i32",
        "bias_ptr": "*fp16", "y_ptr": "*fp16", **dict.fromkeys(I32, "i32")}
FP8 = {"x_ptr": "*fp8e4nv", "w_ptr": "*u8", "s_ptr": "*fp32", "perm_ptr": "*i32", "bias_ptr": "*fp16",
       "y_ptr": "*fp16", "x_scale": "fp32",
       **dict.fromkeys("M N K stride_xm stride_w stride_sr stride_ym".split(), "i32")}
NO_FP8 = next(a for a in ARCHS if not a.fp8_tensor_cores)


def _builds(archs):
    labels, builds = [], []

    def add(label, kernel, sig, consts, cap, cfg):
        labels.append((label, cap, cfg))
        builds.append(Build(kernel, {**sig, **dict.fromkeys(consts, "constexpr")}, consts, cap, cfg.num_warps,
                            cfg.num_stages, DIVISIBLE))
    for name, spec, gs in (("mxfp4", "mxfp4", None), ("e4m3", "e4m3", None), ("e3m2-g32", "e3m2", 32),
                           ("nvfp4", "nvfp4", None)):
        pw = mk.pack(quantize_rtn(torch.randn(64, 256), parse_format(spec, group_size=gs)), "h100")
        sig = dict(BASE, s_ptr="*u8" if pw.meta["scale_format"] in ("e8m0", "e4m3") else "*fp32")
        for arch in archs:
            for cname, cands in tiles(arch, "minifloat").items():
                for i, cfg in enumerate(cands):
                    split = 2 if cname == "decode" else 1
                    # defaults: every format; autotuning alternatives: the byte-aligned, the two-plane
                    # and (with fp8 tensor cores) the native-fp8 decode
                    if i > 0 and name not in ("mxfp4", "e3m2-g32", "e4m3"):
                        continue
                    natives = ([False] if name != "e4m3" or i == 0 else []) + \
                        ([True] if name == "e4m3" and arch.fp8_tensor_cores else [])
                    for native in natives:
                        c = mk.kernel_args(pw, cfg, has_bias=True, native_fp8=native, split=split)
                        add(f"{name}/{arch.name}/{cname}/native={native}/{i}", mk._minifloat_kernel,
                            dict(sig, y_ptr="*fp32" if split > 1 else "*fp16"), c, arch.sm, cfg)
    for arch in archs:
        for cname, cands in tiles(arch, "fp8act").items():
            for i, cfg in enumerate(cands):
                c = dict(HAS_PERM=False, HAS_BIAS=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
                # the refusal without fp8 tensor cores needs showing once
                for cap in ((NO_FP8.sm, arch.sm) if i == 0 and cname == "decode" else (arch.sm,)):
                    add(f"fp8act/{arch.name}/{cname}/{i}", mk._fp8act_kernel, FP8, c, cap, cfg)
    return labels, builds


@pytest.fixture(scope="module", params=ARCH_GROUPS)
def aot(request):
    labels, builds = _builds(request.param)
    return request.param, list(zip(labels, compile_many(builds)))


def test_aot_weight_only_configs_compile(aot):
    archs, built = aot
    rows = [(label, cap, cfg, k) for (label, cap, cfg), k in built if not label.startswith("fp8act")]
    # every autotuning candidate of every architecture is built for it
    cands = {(label.split("/")[1], label.split("/")[2], int(label.split("/")[4])) for label, *_ in rows}
    assert cands == {(a.name, c, i) for a in archs for c, cs in tiles(a, "minifloat").items() for i in range(len(cs))}
    assert {(label.split("/")[1], label.split("/")[2]) for label, *_ in rows if "native=True" in label} == \
        {(a.name, c) for a in archs if a.fp8_tensor_cores for c in tiles(a, "minifloat")}
    for label, cap, cfg, k in rows:
        check_build(k, wgmma=cap >= 90 and cfg.block_m >= 64)
        assert ("cvt.rn.f16x2.e4m3x2" in k.ptx) == ("native=True" in label), label


def test_aot_fp8_dot_is_e4m3_mma_only_with_fp8_tensor_cores(aot):
    archs, built = aot
    rows = [(label, cap, cfg, k) for (label, cap, cfg), k in built if label.startswith("fp8act")]
    fp8_archs = [a for a in archs if a.fp8_tensor_cores]
    assert fp8_archs and len(rows) == sum(len(cs) for a in fp8_archs for cs in tiles(a, "fp8act").values()) + \
        len(fp8_archs)
    for label, cap, cfg, k in rows:
        if cap == NO_FP8.sm:       # Triton has no fp8e4nv without fp8 tensor cores
            assert isinstance(k, CompileError) and "fp8e4nv" in str(k), k
        else:
            check_build(k, wgmma=cap >= 90 and cfg.block_m >= 64)
            assert any("e4m3.e4m3" in m for m in mma_ops(k.ptx)), (label, k.name)

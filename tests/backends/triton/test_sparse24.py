"""The sparse24 Triton kernel (2:4 sparse, int4 or float kept values) under the CPU interpreter,
against ``x.float() @ enc.decode().T``, plus ahead-of-time compiles for every GPU architecture file.

Tolerance: the kernel rounds weights (and the folded int4 shift) to x's dtype and y to x's dtype,
so the error is bounded by RTOL * (|x| @ |W|.T) + RTOL * |y|, RTOL = 4e-3 for fp16 (2^-11 per
rounding, a few roundings) and 2e-2 for bf16 (2^-8 per rounding)."""
from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the GPU backend's kernels cannot run")

from nnforge.backends.triton.kernels import Build, KernelError, PackedWeight, compile_many  # noqa: E402
from nnforge.backends.triton.kernels.common import runtime_target, target_sms  # noqa: E402
from nnforge.backends.triton.kernels import sparse24 as s24  # noqa: E402
from nnforge.ir import Dense, IntQuant, MiniFloat, Sparse  # noqa: E402
from nnforge.passes.prune.sparsity import nm_keep, sparsegpt_prune  # noqa: E402
from nnforge.passes.quantize.formats import parse_format  # noqa: E402

from .aot import ARCH_GROUPS, ARCHS, check_build, tiles  # noqa: E402

N, K = 72, 256                   # N not a multiple of the interpreter's BN = 32
RTOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _weight(n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g), torch.randn(64, k, generator=g)


def _keep(w):
    return nm_keep(w.abs().reshape(w.shape[0], -1, 4), 2, 4).reshape(w.shape)


def _check(y, x, enc, bias=None):
    w = enc.decode().float()
    ref = x.float() @ w.T + (0 if bias is None else bias.float())
    bound = RTOL[x.dtype] * ((x.float().abs() @ w.abs().T) + ref.abs()) + 1e-6
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


@pytest.fixture(scope="module")
def sparsegpt_int4():
    """What the sparse24-w4 preset produces: SparseGPT + joint uint4 (zero points), groups of 32
    kept columns here (128 in the preset), with two all-zero output rows."""
    w, xs = _weight()
    w[3] = 0
    w[40] = 0
    enc, _ = sparsegpt_prune(w, xs.T @ xs, "2:4", fmt=parse_format("uint4", group_size=32))
    return enc


@pytest.fixture(scope="module")
def sparsegpt_fp():
    """The sparse24 preset: SparseGPT, kept values as they are (Dense)."""
    w, xs = _weight(seed=1)
    enc, _ = sparsegpt_prune(w.half(), (xs.T @ xs), "2:4")
    return enc


@pytest.mark.parametrize("m", [1, 5, 16, 33])
def test_sparsegpt_int4_matches_decode(sparsegpt_int4, m):
    pw = s24.pack(sparsegpt_int4, "h100")
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).half()
    bias = torch.randn(N) if m in (5, 33) else None
    y = s24.matmul(x, pw, bias)
    _check(y, x, sparsegpt_int4, bias)
    if bias is None:                                          # the all-zero rows stay exactly zero
        assert y[:, [3, 40]].abs().max() == 0


@pytest.mark.parametrize("m", [1, 33])
def test_sparsegpt_fp_values(sparsegpt_fp, m):
    x = torch.randn(m, K).half()
    _check(s24.matmul(x, s24.pack(sparsegpt_fp, "a100")), x, sparsegpt_fp)


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16])
def test_float_values_and_bf16_x(vdtype, xdtype):
    w, _ = _weight(n=40, k=128, seed=2)
    enc = Sparse.from_mask(w.to(vdtype), _keep(w), "2:4")
    x = torch.randn(5, 128).to(xdtype)
    bias = torch.randn(40).to(xdtype)
    _check(s24.matmul(x, s24.pack(enc, "h100"), bias), x, enc, bias)


@pytest.mark.parametrize("group_size,symmetric", [(16, True), (None, False), (48, False)])
def test_int4_group_layouts(group_size, symmetric):
    """Groups smaller than a tile (per-pair scale gather), per channel, and a ragged last group."""
    w, _ = _weight(n=24, k=192, seed=3)
    enc = Sparse.from_mask(w, _keep(w), "2:4",
                           lambda v: IntQuant.quantize(v, 4, group_size=group_size, symmetric=symmetric))
    for xdtype in (torch.float16, torch.bfloat16):
        x = torch.randn(5, 192).to(xdtype)
        _check(s24.matmul(x, s24.pack(enc, "a100")), x, enc)


def test_split_k_matches_no_split(sparsegpt_int4):
    pw = s24.pack(sparsegpt_int4, "h100")
    x = torch.randn(5, K).half()
    assert s24._split(5, N, K, s24.INTERPRET_CONFIG, target_sms(runtime_target(x))) > 1      # the default splits
    ys = [s24.matmul(x, pw, split_k=sk) for sk in (1, 3, None)]
    for y in ys:
        _check(y, x, sparsegpt_int4)
    assert torch.allclose(ys[0].float(), ys[1].float(), atol=2e-2, rtol=2e-3)


def test_act_order_and_row_scale():
    """A permutation of whole kept pairs becomes a permutation of x's columns; row_scale is
    applied to the accumulator."""
    w, _ = _weight(n=40, k=128, seed=4)
    plain = Sparse.from_mask(w, _keep(w), "2:4")
    vals = plain.values.data                                  # [40, 64] logical order
    pairs = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    perm = (pairs[:, None] * 2 + torch.arange(2)).reshape(-1)
    q = IntQuant.quantize(vals[:, perm], 4, group_size=32, symmetric=False)
    q = IntQuant(q.shape, 4, False, q.codes, q.scale, 32, q.zero_point, perm)
    enc = Sparse(w.shape, "2:4", q, plain.index, row_scale=torch.rand(40) + 0.5)
    pw = s24.pack(enc, "h100")
    assert pw.tensors["perm"].shape == (128,) and "row_scale" in pw.tensors
    for m in (1, 33):
        x = torch.randn(m, 128).half()
        _check(s24.matmul(x, pw), x, enc)


def test_leading_dims_and_empty(sparsegpt_int4):
    pw = s24.pack(sparsegpt_int4, "h100")
    x = torch.randn(2, 3, K).half()
    y = s24.matmul(x, pw)
    assert y.shape == (2, 3, N)
    _check(y.reshape(6, N), x.reshape(6, K), sparsegpt_int4)
    assert s24.matmul(torch.zeros(0, K).half(), pw).shape == (0, N)


def test_rebuilt_packed_weight_runs_unchanged(sparsegpt_int4, sparsegpt_fp):
    for enc in (sparsegpt_int4, sparsegpt_fp):
        pw = s24.pack(enc, "a100")
        rebuilt = PackedWeight(pw.format, pw.n, pw.k, {k: v.clone() for k, v in pw.tensors.items()},
                               json.loads(json.dumps(pw.meta)))
        x = torch.randn(5, K).half()
        assert torch.equal(s24.matmul(x, pw, split_k=1), s24.matmul(x, rebuilt, split_k=1))


def test_pack_layout_is_the_documented_one(sparsegpt_int4):
    """Rebuild W from the packed tensors alone, following the module docstring."""
    enc = sparsegpt_int4
    pw = s24.pack(enc, "h100")
    t, n, kp = pw.tensors, pw.n, pw.meta["k_padded"]
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (kp // 8, n)
    assert t["meta"].shape == (kp // 16, n) and t["scale"].dtype == torch.float16
    nib = (t["qweight"].to(torch.int64)[:, None, :] >> (4 * torch.arange(8))[None, :, None]) & 15  # [W, 8, N]
    v = torch.stack([nib[:, :4], nib[:, 4:]], 2).reshape(kp // 2, 2, n)           # [pair, v0/v1, N]
    bits = (t["meta"].to(torch.int64)[:, None, :] >> (2 * torch.arange(16))[None, :, None]) & 3
    idx = torch.stack([bits[:, :8], bits[:, 8:]], 2).reshape(kp // 2, 2, n)
    grp = (torch.arange(kp) // pw.meta["group_size"]).clamp(max=t["scale"].shape[0] - 1).reshape(-1, 2)
    val = v * t["scale"].float()[grp] + t["shift"].float()[grp]
    dense = torch.zeros(kp // 2, 4, n).scatter_(1, idx, val).reshape(-1, n)[:K].T
    assert torch.allclose(dense, enc.decode(), atol=1e-2 * enc.decode().abs().max().item())


# --- what is refused, and why --------------------------------------------------------------------
def _nm(pattern, w):
    n, m = map(int, pattern.split(":"))
    return Sparse.from_mask(w, nm_keep(w.abs().reshape(w.shape[0], -1, m), n, m).reshape(w.shape), pattern)


def _unsupported():
    w, _ = _weight(n=8, k=32, seed=5)
    keep = _keep(w)
    blocks = (torch.arange(32) // 4 % 2 == 0).expand(8, 32)
    q8 = Sparse.from_mask(w, keep, "2:4", lambda v: IntQuant.quantize(v, 8))
    odd = Sparse.from_mask(w, keep, "2:4", lambda v: IntQuant.quantize(v, 4, group_size=1))
    mf = Sparse.from_mask(w, keep, "2:4", lambda v: MiniFloat.from_fields(torch.zeros_like(v, dtype=torch.int64),
                                                                          torch.ones(8, 1), fmt="e2m1",
                                                                          shape=tuple(v.shape)))
    base = Sparse.from_mask(w, keep, "2:4", lambda v: IntQuant.quantize(v, 4))
    swap = base.values
    swap = IntQuant(swap.shape, 4, True, swap.codes, swap.scale, swap.group_size, None,
                    torch.arange(16).reshape(-1, 2).flip(1).reshape(-1))
    split = Sparse(w.shape, "2:4", swap, base.index)
    huge = Sparse.from_mask(w * 1e6, keep, "2:4")
    return [
        (_nm("4:8", w), "h100", "pattern 4:8"),
        (_nm("1:4", w), "h100", "pattern 1:4"),
        (Sparse.from_mask(w, blocks, "block1x4"), "h100", "pattern block1x4"),
        (Sparse.from_mask(w, keep, "unstructured"), "h100", "pattern unstructured"),
        (q8, "h100", "8-bit integers"),
        (odd, "a100", "group_size 1 is odd"),
        (mf, "h100", "kept values as e2m1"),
        (split, "h100", "splits 2:4 pairs"),
        (huge, "h100", "beyond the fp16 range"),
        (IntQuant.quantize(w, 4), "h100", "got a int encoding"),
        (Dense(w), "h100", "got a dense encoding"),
        (base, "cpu", "target 'cpu'"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_unsupported_reasons(case):
    enc, target, why = _unsupported()[case]
    assert why in (s24.supports(enc, target) or "")
    with pytest.raises(KernelError, match=why):
        s24.pack(enc, target)


def test_supported(sparsegpt_int4, sparsegpt_fp):
    for enc in (sparsegpt_int4, sparsegpt_fp):
        assert s24.supports(enc, "h100") is None and s24.supports(enc, "a100") is None


def test_matmul_errors(sparsegpt_int4):
    pw = s24.pack(sparsegpt_int4, "h100")
    x = torch.randn(2, K).half()

    def edited(tensors=None, meta=None, fmt=s24.FORMAT):
        return PackedWeight(fmt, pw.n, pw.k, {**pw.tensors, **(tensors or {})}, {**pw.meta, **(meta or {})})

    cases = [
        (dict(x=x.float()), "float16 or bfloat16, got torch.float32"),
        (dict(x=torch.randn(2, K + 4).half()), f"x has {K + 4} columns but the weight has K={K}"),
        (dict(bias=torch.randn(N + 1)), f"bias must be a float tensor of shape \\({N},\\)"),
        (dict(w=edited(fmt="w4a16")), "format 'sparse24', got 'w4a16'"),
        (dict(w=edited(meta={"kind": "int8"})), "meta 'kind' is 'int8'"),
        (dict(w=PackedWeight(s24.FORMAT, pw.n, pw.k, {k: v for k, v in pw.tensors.items() if k != "shift"},
                             pw.meta)), "lacks shift"),
        (dict(w=edited({"meta": pw.tensors["meta"][:1]})), "tensor 'meta' is torch.int32 \\(1, 72\\)"),
        (dict(split_k=0), "split_k must be a positive integer"),
    ]
    for kw, msg in cases:
        args = {"x": x, "w": pw, "bias": None, **kw}
        with pytest.raises(KernelError, match=msg):
            s24.matmul(args.pop("x"), args.pop("w"), **args)


# --- ahead-of-time compiles for every GPU architecture file, specialised as a real launch is
# (aligned pointers, K, N and strides multiples of 16). Per config (every autotuning candidate): the
# int4 kernel with every option on (act-order, row scales, bias, split-K for the decode tile, a
# per-pair scale gather via group_size 64 < BK/2) and, for the default decode tile, the fp16-values
# kernel. ----------------------------------------------------------------------------------------------
DIVISIBLE = ("N", "K", "KP", "stride_xm", "stride_ym")


@pytest.fixture(scope="module", params=ARCH_GROUPS)
def aot(request):
    labels, builds = [], []
    for arch in request.param:
        for tile, cands in tiles(arch, "sparse24").items():
            for i, cfg in enumerate(cands):
                variants = [("i32", dict(GS=64, IS_INT=True, HAS_PERM=True, HAS_RS=True, HAS_BIAS=True,
                                         SPLIT_K=4 if tile == "decode" else 1))]
                if tile == "decode" and i == 0:
                    variants.append(("fp16", dict(GS=1 << 20, IS_INT=False, HAS_PERM=False, HAS_RS=False,
                                                  HAS_BIAS=False, SPLIT_K=1)))
                for vdt, flags in variants:
                    sig = s24.signature("bf16" if vdt == "i32" else "fp16", vdt)
                    consts = dict(BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, UPCAST=False, **flags)
                    labels.append((arch.name, f"{tile}-{vdt}-{i}", cfg))
                    builds.append(Build(s24.sparse24_kernel, sig, consts, arch.sm, cfg.num_warps, cfg.num_stages,
                                        DIVISIBLE))
    return request.param, list(zip(labels, compile_many(builds)))


def test_compiles_for_gpu(aot):
    """Every autotuning candidate compiles for its architecture, uses tensor cores and fits in its
    shared memory."""
    archs, builds = aot
    for arch in archs:
        built = {name: (cfg, k) for (a, name, cfg), k in builds if a == arch.name}
        assert set(built) == {f"{t}-i32-{i}" for t, cs in tiles(arch, "sparse24").items() for i in range(len(cs))} \
            | {"decode-fp16-0"}
        for name, (cfg, k) in built.items():          # sm_90's tiles of 64+ rows run on wgmma
            check_build(k, wgmma=arch.sm >= 90 and cfg.block_m >= 64)


def test_default_config_is_the_first_candidate():
    h100, a100 = (next(a for a in ARCHS if a.name == n) for n in ("sm_90", "sm_80"))
    assert s24.config_for("a100", 4) == tiles(a100, "sparse24")["decode"][0]
    assert s24.config_for("h100", 64) == tiles(h100, "sparse24")["gemm"][0]
    assert s24.candidates_for("interp", 4) == (s24.INTERPRET_CONFIG,)

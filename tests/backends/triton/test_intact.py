"""The integer W4A8 / W4A4 Triton path (kernels/intact.py) under the CPU interpreter: the quantiser
bit for bit against ``act_quantize``; the GEMM against the reference interpreter on the graph it
replaces (a per-token ``dynamic_quant`` and a ``linear`` with the decoded weight); the lowering
that marks such linears (``entry["act_linears"]``) and the launcher that runs them; a tiny Llama
compiled with the w4a8 preset end to end; and the kernels compiled ahead of time for the a100 and
h100 architectures (every architecture and tile candidate under -m slow).

Weights are test_intweight's (RTN, GPTQ with act-order, hand-made codes); N = 100 masks columns.
Tolerance of the GEMM, on the largest |reference| output: 2e-3, as test_intweight's fp16 one (fp16
weight scales and fp16 output, 2^-11 each); the integer sums themselves are exact.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"          # before triton (and the kernels) are imported

import re                                     # noqa: E402

import pytest                                 # noqa: E402
import torch                                  # noqa: E402

pytest.importorskip("triton", reason="the intact kernels need triton")

from tests import conftest                                                                # noqa: E402
from tests.backends.dynamic_quant_cases import quantiser_rows                                      # noqa: E402

from nnforge.backends.base import BackendError                                           # noqa: E402
from nnforge.backends.triton import TritonBackend                                        # noqa: E402
from nnforge.backends.triton.kernels import Build, KernelError, PackedWeight, compile_many  # noqa: E402
from nnforge.backends.triton.kernels import intact, intweight as iw                      # noqa: E402
from nnforge.ir import Dense, Graph, IntQuant, Interpreter, tensor                       # noqa: E402
from nnforge.ir.actquant import act_quantize                                             # noqa: E402
from nnforge.targets import get_target                                                   # noqa: E402

from .aot import ARCHS, MAIN, check_build, tiles                                         # noqa: E402
from .test_intweight import K, N, from_codes, gptq, rtn, weight                          # noqa: E402

RTOL = 2e-3
TOP = {"int8": 127, "int4": 7}


# --- the quantiser ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,clip,dtype,k", [
    ("int8", 1.0, torch.float32, 64), ("int4", 1.0, torch.float32, 96), ("int8", 0.9, torch.float32, 1500),
    ("int4", 0.9, torch.float16, 64), ("int8", 1.0, torch.bfloat16, 48)], ids=lambda v: str(v).removeprefix("torch."))
def test_codes_and_scales_equal_act_quantize(fmt, clip, dtype, k):
    x = quantiser_rows(k, fmt).to(dtype)
    a = intact.quantize(x.reshape(3, 4, k), intact.ACT_BITS[fmt], clip)
    assert a.codes.shape == (3, 4, k) and a.codes.dtype == torch.int8 and a.scale.shape == (3, 4)
    codes, scale = a.codes.reshape(12, k), a.scale.reshape(12)
    # act_quantize's float32 operations, step by step
    xf = x.float()
    want_scale = (xf.abs().amax(-1) * clip / TOP[fmt]).clamp(min=1e-12)
    want_codes = torch.clamp(torch.round(xf / want_scale[:, None]), -TOP[fmt] - 1, TOP[fmt])
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.float(), want_codes)
    assert torch.equal(codes * scale[:, None], act_quantize(x, fmt, 0, clip))
    if clip == 1.0:                     # the ties row: scale 1, halves rounded to even
        assert scale[0] == 1.0 and torch.equal(codes[0].float(), torch.round(xf[0]))


def test_quantize_refuses_what_it_cannot_quantise():
    with pytest.raises(KernelError, match="8- or 4-bit codes, not 2"):
        intact.quantize(torch.randn(2, 32), 2)
    with pytest.raises(KernelError, match="float32, float16 or bfloat16, got torch.int32"):
        intact.quantize(torch.zeros(2, 32, dtype=torch.int32))
    with pytest.raises(KernelError, match=r"clip must be in \(0, 1\], got 1.5"):
        intact.quantize(torch.randn(2, 32), 8, 1.5)
    with pytest.raises(KernelError, match="K >= 1"):
        intact.quantize(torch.randn(2, 0))


# --- the GEMM against the graph it replaces -----------------------------------------------------
def reference_graph(enc, fmt: str, clip: float, bias: torch.Tensor | None, lead: tuple) -> Graph:
    """x -> dynamic_quant(fmt, per token, clip) -> linear(decoded weight, bias)."""
    g = Graph("w4a8")
    x = g.add_input("x", tensor("f32", *lead, enc.shape[1]))
    q = g.op("dynamic_quant", x, format=fmt, group=0, clip=clip, global_scale=0.0)
    b = g.add_weight("fc.bias", Dense(bias)) if bias is not None else None
    g.set_outputs([g.op("linear", q, g.add_weight("fc.weight", Dense(enc.decode())), b)])
    return g


def check(enc, fmt: str, lead: tuple, *, clip: float = 1.0, bias: bool = True, split_k=None) -> torch.Tensor:
    k = enc.shape[1]
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(7)) * 2
    b = torch.randn(enc.shape[0], generator=torch.Generator().manual_seed(9)) if bias else None
    ref = Interpreter(reference_graph(enc, fmt, clip, b, lead)).run(x)[0]
    y = intact.matmul(intact.quantize(x, intact.ACT_BITS[fmt], clip), iw.pack(enc, "h100"), b, split_k=split_k)
    assert y.dtype == torch.float16 and y.shape == (*lead, enc.shape[0])
    err = (y.float() - ref).abs().max().item()
    assert err <= RTOL * ref.abs().max().item(), f"max error {err} on outputs up to {ref.abs().max()}"
    return y


CASES = {
    "int4-sym-g128": lambda: rtn("int4", 128),
    "int4-zero-g32": lambda: rtn("uint4", 32),
    "int4-sym-channel": lambda: rtn("int4"),
    "int4-zero-channel-k200": lambda: rtn("uint4", k=200),        # K not a multiple of the 64-wide tile
    "int8-sym-channel": lambda: rtn("int8"),
    "int8-zero-g64": lambda: rtn("uint8", 64),
    "int4-gptq-actorder-g32": lambda: gptq("int4", 32),
    "int4-gptq-actorder-zero-g128": lambda: gptq("uint4", 128),
    "int4-unsigned-no-zero": lambda: from_codes(False, False),     # zero 0: the row-sum term without zero points
    "int8-signed-with-zero-g64": lambda: from_codes(True, True, bits=8, group_size=64),
    "int4-per-tensor": lambda: IntQuant.quantize(weight(), 4, per_tensor=True),
}
# (case, activation format, clip, x's leading dims): M in {1, 5, 6, 17, 33}; M <= 16 takes split-K
RUNS = [("int4-sym-g128", "int8", 1.0, (1,)), ("int4-sym-g128", "int4", 0.9, (33,)),
        ("int4-zero-g32", "int8", 1.0, (5,)), ("int4-zero-g32", "int4", 1.0, (2, 3)),
        ("int4-sym-channel", "int8", 1.0, (17,)), ("int4-zero-channel-k200", "int8", 1.0, (5,)),
        ("int4-zero-channel-k200", "int4", 0.9, (33,)), ("int8-sym-channel", "int8", 1.0, (1,)),
        ("int8-zero-g64", "int8", 1.0, (17,)), ("int4-gptq-actorder-g32", "int8", 1.0, (5,)),
        ("int4-gptq-actorder-zero-g128", "int4", 0.9, (1,)), ("int4-gptq-actorder-zero-g128", "int8", 1.0, (33,)),
        ("int4-unsigned-no-zero", "int8", 1.0, (5,)), ("int8-signed-with-zero-g64", "int4", 1.0, (17,)),
        ("int4-per-tensor", "int8", 1.0, (1,))]


@pytest.mark.parametrize("case,fmt,clip,lead", RUNS,
                         ids=[f"{c}-a{f[3]}-m{'x'.join(map(str, lead))}" for c, f, _, lead in RUNS])
def test_matches_the_interpreter(case, fmt, clip, lead):
    check(CASES[case](), fmt, lead, clip=clip, bias=case != "int4-per-tensor")


def test_split_k_and_direct_agree_and_are_deterministic():
    enc = rtn("uint4", 64)            # 4 groups of one 64-wide tile each: splits of whole groups
    assert intact.supports(enc, "h100") is None
    direct, split = check(enc, "int8", (5,), split_k=1), check(enc, "int8", (5,), split_k=3)     # 4 groups in 2 + 2
    assert torch.equal(split, check(enc, "int8", (5,), split_k=3))
    assert (direct.float() - split.float()).abs().max() <= RTOL * direct.float().abs().max()
    check(rtn("int4", k=200), "int8", (3,), bias=False, split_k=2)   # per channel: split over K tiles
    assert iw._LOCKS[torch.device("cpu")].count_nonzero() == 0        # the last CTA of each tile reset its counter


def test_empty_rows_and_outputs():
    pw = iw.pack(rtn("int4", 32), "h100")
    a = intact.quantize(torch.randn(0, K), 8)
    assert intact.matmul(a, pw).shape == (0, N)
    b = torch.randn(N)
    y = intact.matmul(intact.quantize(torch.zeros(2, K), 8), pw, b, out_dtype=torch.float32)
    assert torch.allclose(y, b.expand(2, N), atol=1e-6)                # zero rows: scale 1e-12, codes 0


@pytest.mark.parametrize("enc,fmt,target,why", [
    (lambda: rtn("int4", 16), "int8", "h100", "group_size 16"),
    (lambda: rtn("int4", 48, k=192), "int8", "a100", "group_size 48"),
    (lambda: rtn("int4", 128), "e4m3", "h100", "e4m3 activations"),
    (lambda: rtn("int3"), "int8", "h100", "3-bit codes"),
    (lambda: rtn("int4", 128), "int8", "cpu", "target 'cpu'"),
], ids=["group16", "group48", "format", "bits", "target"])
def test_unsupported_are_named(enc, fmt, target, why):
    assert why in intact.supports(enc(), target, fmt)


def test_a_target_without_int8_tensor_cores_is_refused(tmp_path, monkeypatch):
    from nnforge.targets import PATH_ENV
    text = open(get_target("h100").path).read()
    (tmp_path / "h100-noint8.toml").write_text(text.replace('name = "h100"', 'name = "h100-noint8"')
                                               .replace('"int8", "uint8"', '"uint8"'))
    monkeypatch.setenv(PATH_ENV, str(tmp_path))
    assert "lists no int8 tensor cores" in intact.supports(rtn("int4", 128), "h100-noint8")
    assert intact.supports(rtn("int4", 128), "a100") is None


def _codes(m=2, k=K):
    return intact.quantize(torch.randn(m, k), 8)


@pytest.mark.parametrize("make,why", [
    (lambda: (torch.randn(2, K), iw.pack(rtn("int4"), "h100"), {}), "a must be ActCodes"),
    (lambda: (_codes(), PackedWeight("lut", N, K, {}), {}), "format 'int-weight'"),
    (lambda: (intact.ActCodes(torch.zeros(2, K, dtype=torch.int16), torch.ones(2), 8), iw.pack(rtn("int4"), "h100"),
              {}), "int8 \\[..., 256\\]"),
    (lambda: (_codes(k=128), iw.pack(rtn("int4"), "h100"), {}), "int8 \\[..., 256\\]"),
    (lambda: (intact.ActCodes(torch.zeros(2, K, dtype=torch.int8), torch.ones(3), 8), iw.pack(rtn("int4"), "h100"),
              {}), "scales must be float32 \\(2,\\)"),
    (lambda: (_codes(), iw.pack(rtn("int4"), "h100"), {"out_dtype": torch.int8}), "out_dtype must be"),
    (lambda: (_codes(), iw.pack(rtn("int4", 16), "h100"), {}), "groups of 16 columns"),
    (lambda: (_codes(), iw.pack(rtn("int4"), "h100"), {"bias": torch.zeros(N + 1)}), "bias must be"),
    (lambda: (_codes(), iw.pack(rtn("int4"), "h100").to("meta"), {}), "on cpu but qweight is on meta"),
    (lambda: (_codes(), iw.pack(rtn("int4"), "h100"), {"split_k": 0}), "split_k must be"),
], ids=["not-codes", "format", "codes-dtype", "k", "scale", "out-dtype", "group", "bias", "device", "split"])
def test_matmul_errors_name_the_problem(make, why):
    a, w, kw = make()
    with pytest.raises(KernelError, match=why):
        intact.matmul(a, w, **kw)


# --- lowering and the launcher ------------------------------------------------------------------
def lowering_graph() -> Graph:
    """Four dynamic_quants: ``qk`` (int8, read by two int4 linears: fused, quantised once), ``a4``
    (int4, clip 0.9, read by one: fused), ``also_relu`` (another reader is a relu: not fused) and
    ``g16`` (its linear's weight has groups of 16: not fused)."""
    g = Graph("lowering")
    x = g.add_input("x", tensor("f32", "batch", "seq", 64))
    gen = torch.Generator().manual_seed(0)

    def linear(inp, name, spec, group, n=64):
        w = rtn(spec, group, seed=len(g.nodes), n=n, k=64)
        b = g.add_weight(f"{name}.bias", Dense(torch.randn(n, generator=gen)))
        return g.op("linear", inp, g.add_weight(f"{name}.weight", w), b, name=name)

    qk = g.op("dynamic_quant", x, format="int8", name="qk")
    h = g.op("add", linear(qk, "q", "int4", 32), linear(qk, "k", "uint4", None))
    a4 = g.op("dynamic_quant", h, format="int4", clip=0.9, name="a4")
    h = linear(a4, "o", "uint8", None)
    r = g.op("dynamic_quant", h, format="int8", name="also_relu")
    h = g.op("add", linear(r, "up", "int4", 32), g.op("relu", r))
    s = g.op("dynamic_quant", h, format="int8", name="g16")
    g.set_outputs([linear(s, "down", "int4", 16, n=24)])
    return g


@pytest.mark.parametrize("target", ["h100", "a100"])
def test_lowering_marks_the_fused_linears_and_the_launcher_runs_them(tmp_path, target, monkeypatch):
    g = lowering_graph()
    backend = TritonBackend()
    lowered = conftest.lower_into(backend, g, target, tmp_path)
    entry = lowered.entry
    assert entry["act_linears"] == {"q": {"weight": "q.weight", "quant": "qk"},
                                    "k": {"weight": "k.weight", "quant": "qk"},
                                    "o": {"weight": "o.weight", "quant": "a4"}}
    assert set(entry["linears"]) == {"q.weight", "k.weight", "o.weight", "up.weight", "down.weight"}
    assert {"intact", "intweight", "common", "__init__"} <= set(entry["kernels"]) and lowered.fallbacks == []
    assert all(f"kernels/{n}.py" in lowered.files for n in entry["kernels"])
    quantised, fused = [], []
    real_q, real_mm = intact.quantize, intact.matmul
    monkeypatch.setattr(intact, "quantize", lambda x, *a: quantised.append(tuple(x.shape)) or real_q(x, *a))
    monkeypatch.setattr(intact, "matmul", lambda a, w, *r, **kw: fused.append(w.n) or real_mm(a, w, *r, **kw))
    runner = backend.load(tmp_path, entry, "cpu")
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    got, ref = runner(x), Interpreter(g).run(x)[0]
    assert quantised == [(2, 5, 64), (2, 5, 64)] and fused == [64, 64, 64]     # qk once for q and k
    # rounding upstream can flip a code downstream (the numerics check's rule); the chain is short
    cos = float(torch.nn.functional.cosine_similarity(got.reshape(-1).double(), ref.reshape(-1).double(), dim=0))
    assert got.dtype == torch.float32 and cos >= 0.999, cos


def test_an_entry_that_does_not_match_the_graph_is_refused(tmp_path):
    g = lowering_graph()
    lowered = conftest.lower_into(TritonBackend(), g, "h100", tmp_path)
    for bad in ({"up": {"weight": "up.weight", "quant": "also_relu"}},       # the relu reads it too
                {"q": {"weight": "q.weight", "quant": "a4"}},                  # not q's dynamic_quant
                {"down": {"weight": "down.weight", "quant": "g16"}, "q": {"weight": "k.weight", "quant": "qk"}}):
        entry = {**lowered.entry, "act_linears": {**lowered.entry["act_linears"], **bad}}
        with pytest.raises(BackendError, match="int8 x int8 linear fed by dynamic_quant .*recompile"):
            TritonBackend().load(tmp_path, entry, "cpu")
    entry = {**lowered.entry, "kernels": {k: v for k, v in lowered.entry["kernels"].items() if k != "intact"}}
    with pytest.raises(BackendError, match="records no intact kernel source"):
        TritonBackend().load(tmp_path, entry, "cpu")


def test_a_w4a8_decoder_fuses_its_linears_and_verifies(tmp_path):
    """The w4a8 preset on a tiny Llama (hidden 64): every linear behind a dynamic_quant runs in
    intact, and the compile-time check and nf.verify pass (held, as rounded activations are, to no
    further from fp32 than the reference: nnforge.numerics)."""
    import nnforge as nf
    from tests.frontend.decoders.families import llama_directory
    root = llama_directory(tmp_path / "llm", words=300)
    bundle = nf.compile(root / "model", "h100", "w4a8", calibration=root / "calib.txt", out=tmp_path / "b", max_len=32)
    entry, graph = bundle.manifest["backend"]["entry"], bundle.graph()
    behind = {n.name for q in graph.nodes if q.op == "dynamic_quant" for n, _ in graph.uses()[q.outputs[0]]}
    assert len(behind) == 14 and set(entry["act_linears"]) == behind          # 2 layers x 7 projections
    assert "intact" in entry["kernels"] and "kernels/intact.py" in bundle.manifest["files"]
    numerics = bundle.manifest["numerics"]
    assert numerics["runtime_checked"] and numerics["backend_vs_reference"]["cosine_min"] >= 0.999
    assert nf.verify(bundle.path)["passed"]


# --- ahead-of-time builds -----------------------------------------------------------------------
# Every architecture's tile candidates per M bucket (int4 weights, groups of 128, fp16 out; decode
# tiles split over K), its decode default with 8-bit zero points, act-order and bf16 output, and the
# quantiser. The default run builds the decode and gemm defaults of sm_80 and sm_90, and sm_90's
# variant and quantiser (a few seconds each with Triton's cache empty); the rest under -m slow.
AOT = [(a.name, a.sm, b, i, "g128") for a in ARCHS for b, cands in tiles(a, "intact").items()
       for i in range(len(cands))]
AOT += [(a.name, a.sm, "decode", 0, "int8-zero-perm") for a in ARCHS] + [(a.name, a.sm, "quant", 0, "") for a in ARCHS]
DEFAULT_RUN = {(arch, b, 0, "g128") for arch in MAIN for b in ("decode", "gemm")} | {
    ("sm_90", "decode", 0, "int8-zero-perm"), ("sm_90", "quant", 0, "")}
DIVISIBLE = ("N", "K", "KW", "NP")


def _build(case) -> Build:
    arch_name, capability, bucket, index, variant = case
    if bucket == "quant":
        return Build(*intact.quantize_compile_spec(), capability, 4, 1, ("K", "stride_xm"))
    cfg = tiles(next(a for a in ARCHS if a.name == arch_name), "intact")[bucket][index]
    split = 4 if bucket == "decode" else 1
    if variant == "g128":
        spec = intact.compile_spec(cfg, bits=4, group=128, split_k=split)
    else:
        spec = intact.compile_spec(cfg, bits=8, group=0, out="bf16", split_k=split, has_zero=True, has_perm=True)
    return Build(*spec, capability, cfg.num_warps, cfg.num_stages, DIVISIBLE)


def _default_run(case) -> bool:
    arch, _, bucket, index, variant = case
    return (arch, bucket, index, variant) in DEFAULT_RUN


@pytest.fixture(scope="module")
def aot():
    """The build of a case; the default run's cases are compiled together on first use, the rest
    (under -m slow) together too."""
    built = {}

    def get(case):
        if case not in built:
            group = [c for c in AOT if _default_run(c) == _default_run(case)]
            built.update(zip(group, compile_many([_build(c) for c in group])))
        return built[case]
    return get


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if _default_run(c) else pytest.mark.slow) for c in AOT],
                         ids=[f"{a}-{b}-cfg{i}-{v}".rstrip("-") for a, _, b, i, v in AOT])
def test_compiles_for_architecture(aot, case):
    k = aot(case)
    if case[2] == "quant":
        assert not isinstance(k, Exception), k
        # IEEE divisions, and the round-half-even add and subtract of 1.5 * 2^23 left unfolded
        assert "div.rn.f32" in k.ptx and re.search(r"add\.f32\s.*0f4B400000", k.ptx) \
            and re.search(r"(add\.f32\s.*0fCB400000|sub\.f32\s.*0f4B400000)", k.ptx), k.ptx[-3000:]
        return
    check_build(k, wgmma=case[1] >= 90 and tiles(next(a for a in ARCHS if a.name == case[0]),
                                                   "intact")[case[2]][case[3]].block_m >= 64)
    assert re.search(r"\.s32\.s8\.s8", k.ptx), "the dot is not int8 x int8 -> int32"


def test_every_architecture_lists_intact_tiles_and_the_default_comes_first():
    assert all(set(tiles(a, "intact")) == {"decode", "prefill", "gemm"} for a in ARCHS)
    h100 = next(a for a in ARCHS if a.name == "sm_90")
    assert intact.config_for("h100", 4) == tiles(h100, "intact")["decode"][0]
    assert intact.config_for("h100", 4096) == tiles(h100, "intact")["gemm"][0]
    assert intact.candidates_for("interp", 4) == ("interp", (intact.INTERPRETER_CONFIG,))


def test_supports_takes_what_the_presets_make():
    assert intact.supports(gptq("uint4", 128), "h100") is None and intact.supports(rtn("int8"), "a100", "int4") is None

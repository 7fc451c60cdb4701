"""The integer W4A8 / W4A4 path of the tvm backend (kernels/intact.py, weights_intact.py): the
quantiser's codes and row scales bit for bit against ``act_quantize`` (through the backend's own
CPU pipeline); the kernel against the integer formula in float64 for 4- and 8-bit codes with and
without zero points, per channel and in groups, on this host's dot instruction and emulated;
the dot instructions in its assembly; and one lowered graph against the interpreter (dynamic_quant
+ linear on the decoded weight), which also checks which linears the lowering fused and records.
The tiny Llama through nf.compile(..., "cpu", "w4a8") is in test_dynamic_quant.py (slow).

Tolerance against float64 / the interpreter: 1e-5 of the largest |output| (float32 sums in
another order; the codes themselves are exact)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from tests import conftest                                                       # noqa: E402
from tests.backends.dynamic_quant_cases import quantiser_rows                              # noqa: E402

from nnforge.backends.tvm import TvmBackend                                      # noqa: E402
from nnforge.backends.tvm.kernels import KernelError, intact                     # noqa: E402
from nnforge.backends.tvm.kernels.lowbit import llvm_target                      # noqa: E402
from nnforge.ir import Dense, Graph, IntQuant, Interpreter, tensor               # noqa: E402
from nnforge.ir.actquant import act_quantize                                     # noqa: E402
from nnforge.ir.packing import pack_bits                                         # noqa: E402
from nnforge.passes.quantize.formats import parse_format, quantize_rtn           # noqa: E402
from nnforge.passes.quantize.gptq import gptq_quantize                           # noqa: E402

NATIVE = "llvm -mcpu=native"
ALDERLAKE = "llvm -mtriple=x86_64-linux-gnu -mcpu=alderlake"      # AVX-VNNI: built, never run here
RTOL = 1e-5
HAS_AVX2 = "avx2" in {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(llvm_target(NATIVE))}


# --- the quantiser ------------------------------------------------------------------------------


def test_codes_and_scales_equal_act_quantize():
    """int8 and int4 (clip 0.9) codes and scales from one Relax module built with the backend's
    pipeline (the schedules a bundle gets): ``codes * scale`` is ``act_quantize`` bit for bit."""
    from tvm import relax
    from nnforge.backends.tvm import cpu_pipeline, resolve_target
    from nnforge.backends.tvm.ops_actquant import act_codes
    cases = [("int8", 1.0, 64), ("int4", 0.9, 96), ("int8", 0.9, 200)]
    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64")
    xs = [relax.Var(f"x{i}", relax.TensorType([m, k], "float32")) for i, (_, _, k) in enumerate(cases)]
    with bb.function("main", xs):
        with bb.dataflow():
            outs = [bb.emit(bb.call_te(act_codes(fmt, clip), x)) for x, (fmt, clip, _) in zip(xs, cases)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    target = resolve_target(NATIVE)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=target, relax_pipeline=cpu_pipeline(target)), tvm.cpu())
    inputs = [quantiser_rows(k, fmt, seed) for seed, (fmt, _, k) in enumerate(cases)]
    got = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    for (fmt, clip, _), x, pair in zip(cases, inputs, got):
        codes, scale = (torch.from_numpy(t.numpy()) for t in pair)
        assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (12,)
        top = 127 if fmt == "int8" else 7
        assert torch.equal(scale, (x.abs().amax(-1) * clip / top).clamp(min=1e-12)), fmt
        assert int(codes.min()) >= -top - 1 and int(codes.max()) <= top
        assert torch.equal(codes * scale[:, None], act_quantize(x, fmt, 0, clip)), fmt
        if clip == 1.0:     # the ties row: scale 1, halves to even
            assert scale[0] == 1.0 and torch.equal(codes[0].float(), torch.round(x[0]))


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


# --- lowering: which linears, and the bundle against the interpreter ----------------------------
def weight(n, k, seed):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def gptq(spec, group_size, n, k, seed):
    x = torch.randn(512, k, generator=torch.Generator().manual_seed(seed + 1)) * torch.linspace(0.1, 3, k)
    enc, _ = gptq_quantize(weight(n, k, seed), 2 * x.T @ x / x.shape[0], parse_format(spec, group_size=group_size),
                           act_order=True)
    assert enc.perm is not None
    return enc


def lowering_graph(k: int = 256) -> Graph:
    """Five per-token dynamic_quants of one input [batch, seq, k]:

    - ``qa`` int8, read by ``a`` and ``b`` (uint4 zero points, groups of 32: stacked, ``a`` with a
      bias), ``c`` (int8 per channel, bias) and ``j`` (uint4 per channel, bfloat16 scales: its
      arrays made here, not at load): all fused, quantised once;
    - ``qd`` int4 with clip 0.9, read by ``d`` (int4 GPTQ act-order, groups of 128), ``e``
      (unsigned 4-bit codes without zero points, per tensor) and ``i`` (int3, float16 scales:
      widened to nibbles at load): fused;
    - ``qf`` int8 read by ``f`` (uint8 zero points, groups of 64) and a relu: not fused;
    - ``qg`` int8 in groups of 32 read by ``g``: not fused (not per token);
    - ``qh`` int8 read by ``h``, whose weight is dense: not fused."""
    g = Graph("intact")
    x = g.add_input("x", tensor("f32", "batch", "seq", k))
    gen = torch.Generator().manual_seed(0)

    def linear(inp, name, enc, bias=False):
        b = g.add_weight(f"{name}.bias", Dense(torch.randn(enc.shape[0], generator=gen))) if bias else None
        return g.op("linear", inp, g.add_weight(f"{name}.weight", enc), b, name=name)

    def rtn(spec, group_size, n, seed, scale_dtype="float32"):
        return quantize_rtn(weight(n, k, seed), parse_format(spec, group_size=group_size, scale_dtype=scale_dtype))
    e_codes = torch.randint(0, 16, (24, k), generator=gen)
    outs = []
    qa = g.op("dynamic_quant", x, format="int8", name="qa")
    outs += [linear(qa, "a", rtn("uint4", 32, 40, 1), bias=True), linear(qa, "b", rtn("uint4", 32, 24, 2)),
             linear(qa, "c", rtn("int8", None, 16, 3), bias=True),
             linear(qa, "j", rtn("uint4", None, 8, 8, "bfloat16"))]
    qd = g.op("dynamic_quant", x, format="int4", clip=0.9, name="qd")
    outs += [linear(qd, "d", gptq("int4", 128, 48, k, 4), bias=True),
             linear(qd, "e", IntQuant.from_codes(e_codes, torch.tensor([[0.01]]), bits=4, signed=False, shape=(24, k))),
             linear(qd, "i", rtn("int3", 32, 16, 9, "float16"))]
    qf = g.op("dynamic_quant", x, format="int8", name="qf")
    outs += [linear(qf, "f", rtn("uint8", 64, 16, 5)), g.op("relu", qf)]
    qg = g.op("dynamic_quant", x, format="int8", group=32, name="qg")
    outs += [linear(qg, "g", rtn("int4", 32, 16, 6))]
    qh = g.op("dynamic_quant", x, format="int8", name="qh")
    outs += [linear(qh, "h", Dense(weight(8, k, 7)))]
    g.set_outputs(outs)
    return g


def test_lowering_fuses_the_linears_and_matches_the_interpreter(tmp_path):
    g = lowering_graph()
    backend = TvmBackend()
    lowered = conftest.lower_into(backend, g, "cpu", tmp_path, steps=[{"batch": 1, "seq": 1}])
    entry = lowered.entry
    assert entry["act_linears"] == {name: {"weight": f"{name}.weight", "quant": "qd" if name in "dei" else "qa"}
                                    for name in "abcjdei"}
    assert not lowered.fallbacks, lowered.fallbacks
    kernels = entry["kernels"]
    assert kernels["a.weight"]["stacked_with"] == ["b.weight"] and kernels["a.weight"]["kernel"] == "int_act_matmul"
    assert all(kernels[f"{n}.weight"]["kernel"] == "int_act_matmul" for n in "cdeij")
    assert all(kernels[f"{n}.weight"]["kernel"] == "int_weight_matmul" for n in "fg")
    # the bundle keeps each weight as stored: the kernel's arrays are made at load (bfloat16 scales,
    # which numpy lacks, aside)
    read = {p["key"]: p["file"] for p in entry["params"] if p["key"].startswith(tuple(f"{n}.weight" for n in "abdij"))}
    stored = {f"{n}.weight::{f}" for n, fields in [("a", "csz"), ("b", "csz"), ("d", "cs"), ("i", "cs")]
              for f in [{"c": "codes", "s": "scale", "z": "zero_point"}[f] for f in fields]}
    assert {key for key, file in read.items() if file == "weights.safetensors"} == stored
    assert {key for key, file in read.items() if file == "tvm_params.safetensors"} == \
        {"d.weight::perm"} | {f"j.weight::int4_act_matmul_j_weight.{i}" for i in range(3)}
    runner = backend.load(tmp_path, entry)
    for seed, (batch, seq) in enumerate([(1, 1), (2, 7), (3, 5)]):       # 1, 14 and 15 rows; one token's copy
        x = torch.randn(batch, seq, 256, generator=torch.Generator().manual_seed(seed)) * 3
        x[0, 0, 5] = 40.0                                                 # an outlier channel in one token
        ref = Interpreter(g).run(x)
        got = runner(x.numpy())
        for v, y, r in zip(g.outputs, got, ref):
            err = float((torch.from_numpy(np.asarray(y)).double() - r.double()).abs().max())
            assert err <= RTOL * float(r.abs().max()), (v.name, (batch, seq), err)

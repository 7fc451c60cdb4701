"""Which encoded weight reaches which tvm kernel, against the reference interpreter: int8/int4
(and int3, widened) codes on the lowbit kernel, FP4 / FP8 minifloat codes on it too, act-order,
linears on one input stacked into one call, block-sparse weights on the BSR kernels (fp32, and
u8 x s8 after a static int8 activation), and the fallbacks (decoded to fp32) that name why a weight has no kernel."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("tvm")

from nnforge.backends.tvm import PARAMS_FILE                      # noqa: E402
from nnforge.ir import Graph, IntQuant, Sparse, dtype, tensor    # noqa: E402
from nnforge.passes.quantize.formats import parse_format, quantize_rtn  # noqa: E402
from tests.backends.tvm.test_tvm_backend import lower_run_compare, w  # noqa: E402


def _one_linear(enc, k: int) -> Graph:
    g = Graph("lin")
    x = g.add_input("x", tensor("f32", "batch", "seq", k))
    g.set_outputs([g.op("linear", x, g.add_weight("fc.weight", enc), w(g, "fc.bias", torch.randn(enc.shape[0])),
                        name="fc")])
    return g


@pytest.mark.parametrize("spec,group_size", [("mxfp4", None), ("nvfp4", None), ("e4m3", None), ("e2m1", 16),
                                             ("e5m2", 32)])
def test_minifloat_linear_runs_on_its_codes(tmp_path, spec, group_size):
    """MXFP4, NVFP4, FP8 (and e2m1 / e5m2 with float scales) run on kernels.lowbit_minifloat, no
    fallback: the kernel's arrays are made at load from the codes, scales (E8M0 / E4M3 codes
    decoded there) and global scale as the bundle stores them, and nothing else is written."""
    torch.manual_seed(1)
    enc = quantize_rtn(torch.randn(40, 96) * 0.1, parse_format(spec, group_size=group_size))
    lowered = lower_run_compare(_one_linear(enc, 96), tmp_path)
    assert not lowered.fallbacks, lowered.fallbacks
    notes = lowered.entry["kernels"]["fc.weight"]
    assert notes["kernel"] == "minifloat_weight_matmul" and notes["codes"] == enc.fmt.short
    read = {p["key"]: p["file"] for p in lowered.entry["params"] if p["key"].startswith("fc.weight")}
    assert read == {f"fc.weight::{f}": "weights.safetensors" for f in enc.tensors()}


def test_act_order_minifloat_permutes_the_activations(tmp_path):
    """GPTQ's MXFP4 / NVFP4 keep act-order columns (no static groups): x is permuted, as for int codes."""
    torch.manual_seed(2)
    enc = dataclasses.replace(quantize_rtn(torch.randn(24, 64) * 0.1, parse_format("nvfp4")), perm=torch.randperm(64))
    lowered = lower_run_compare(_one_linear(enc, 64), tmp_path)
    assert not lowered.fallbacks, lowered.fallbacks
    assert any(p["key"] == "fc.weight::perm" for p in lowered.entry["params"])


def test_minifloat_linears_on_one_input_run_as_one_stacked_call(tmp_path):
    """NVFP4 q/k/v with one act-order (GPTQ gives the layers of one input the same) run as one call
    on x permuted once, each with its own global scale; FP8 gate/up on another input stack too; a
    weight with another act-order, or another format, runs alone."""
    torch.manual_seed(7)
    g = Graph("block")
    x = g.add_input("x", tensor("f32", "batch", "seq", 64))
    perm = torch.randperm(64)

    def fp4(rows, order=perm):
        return dataclasses.replace(quantize_rtn(torch.randn(rows, 64) * 0.1, parse_format("nvfp4")), perm=order.clone())
    encs = {"q": fp4(48), "k": fp4(16), "v": fp4(16), "other_order": fp4(8, torch.randperm(64)),
            "mx": quantize_rtn(torch.randn(8, 64) * 0.1, parse_format("mxfp4"))}
    outs = [g.op("linear", x, g.add_weight(f"{name}.weight", enc),
                 w(g, f"{name}.bias", torch.randn(enc.shape[0])) if name == "k" else None, name=name)
            for name, enc in encs.items()]
    h = g.op("relu", outs[0])
    outs += [g.op("linear", h, g.add_weight(f"{name}.weight", quantize_rtn(torch.randn(24, 48) * 0.1,
                                                                              parse_format("e4m3"))), None, name=name)
             for name in ("gate", "up")]
    g.set_outputs(outs)
    lowered = lower_run_compare(g, tmp_path)
    assert not lowered.fallbacks, lowered.fallbacks
    kernels = lowered.entry["kernels"]
    assert kernels["q.weight"]["stacked_with"] == ["k.weight", "v.weight"]
    assert kernels["gate.weight"]["stacked_with"] == ["up.weight"]
    assert all("stacked_with" not in kernels[f"{name}.weight"] for name in ("other_order", "mx"))
    perms = [p["key"] for p in lowered.entry["params"] if p["key"].endswith("::perm")]
    assert sorted(perms) == ["other_order.weight::perm", "q.weight::perm"]


@pytest.mark.parametrize("spec,k,why", [
    ("mxfp6", 64, "kernels.lowbit_minifloat: e3m2 codes are not read by the minifloat weight matmul kernel"),
    ("e2m1", 62, "kernels.lowbit_minifloat: 4-bit codes need an even group_size"),
])
def test_minifloat_weights_the_kernel_cannot_read_are_decoded_and_say_why(tmp_path, spec, k, why):
    torch.manual_seed(3)
    enc = quantize_rtn(torch.randn(24, k) * 0.1, parse_format(spec, group_size=31 if k == 62 else None))
    lowered = lower_run_compare(_one_linear(enc, k), tmp_path)
    (fb,) = lowered.fallbacks
    assert fb.where == "fc.weight" and fb.action.startswith(f"no TVM kernel for {enc.describe()}: decoded to float32")
    assert why in fb.action
    assert any(p["key"] == "fc.weight::decoded" and p["file"] == PARAMS_FILE for p in lowered.entry["params"])


def _kernel_module(name: str):
    return pytest.importorskip(f"nnforge.backends.tvm.kernels.{name}", reason=f"kernels/{name}.py not written yet")


@pytest.mark.parametrize("bits,zero_point,scale_dtype", [(8, False, torch.float32), (4, True, torch.float32),
                                                       (4, False, torch.float16), (8, True, torch.float16),
                                                       (3, True, torch.float16), (3, False, torch.float32)])
def test_intquant_linear_runs_on_the_lowbit_kernel(tmp_path, bits, zero_point, scale_dtype):
    """The kernel's arrays are made at load from the weight as the bundle stores it: nothing of
    the weight is written to tvm_params.safetensors (3-bit codes too, widened to nibbles there)."""
    _kernel_module("lowbit")
    torch.manual_seed(bits)
    enc = IntQuant.quantize(torch.randn(48, 64), bits, group_size=32, symmetric=not zero_point)
    enc = dataclasses.replace(enc, scale=enc.scale.to(scale_dtype))
    lowered = lower_run_compare(_one_linear(enc, 64), tmp_path)
    assert not lowered.fallbacks, lowered.fallbacks
    assert "nf_int_fc_weight" in lowered.entry["kernels"]["fc.weight"]["function"]
    read = {p["key"]: p["file"] for p in lowered.entry["params"] if p["key"].startswith("fc.weight")}
    assert read == {f"fc.weight::{f}": "weights.safetensors" for f in ["codes", "scale"] + ["zero_point"] * zero_point}


def test_act_order_intquant_permutes_the_activations(tmp_path):
    _kernel_module("lowbit")
    torch.manual_seed(3)
    base = IntQuant.quantize(torch.randn(16, 64), 8, group_size=32)
    perm = torch.randperm(64)
    enc = IntQuant(base.shape, 8, True, base.codes, base.scale, 32, None, perm)
    lowered = lower_run_compare(_one_linear(enc, 64), tmp_path)
    assert any(p["key"] == "fc.weight::perm" for p in lowered.entry["params"]) and not lowered.fallbacks


def test_int3_act_order_runs_on_the_int4_kernel_and_odd_widths_are_decoded(tmp_path):
    """w3-gptq's weights (uint3 with zero points, act-order) run on the int4 kernel; a 3-bit weight
    whose K is not a multiple of 8 cannot be widened eight codes at a time and is decoded, named."""
    _kernel_module("lowbit")
    torch.manual_seed(5)
    base = IntQuant.quantize(torch.randn(24, 64), 3, group_size=32, symmetric=False)
    enc = IntQuant(base.shape, 3, False, base.codes, base.scale, 32, base.zero_point, torch.randperm(64))
    lowered = lower_run_compare(_one_linear(enc, 64), tmp_path / "a")
    assert not lowered.fallbacks and "nf_int_fc_weight" in lowered.entry["kernels"]["fc.weight"]["function"]
    odd = IntQuant.quantize(torch.randn(8, 60), 3, group_size=30, symmetric=False)
    lowered = lower_run_compare(_one_linear(odd, 60), tmp_path / "b")
    assert [f.where for f in lowered.fallbacks] == ["fc.weight"]
    assert "k must be a multiple of 8, got k = 60" in lowered.fallbacks[0].action


def test_linears_on_one_input_run_as_one_stacked_lowbit_call(tmp_path):
    """Layers reading one input with weights of one format (a block's q/k/v, gate/up) run as one
    lowbit GEMM over their stacked weights, each output sliced off with its bias; weights with one
    act-order (GPTQ's layers of one input), int3 ones too, stack with x permuted once; a weight of
    another group size, one with another act-order, and an input read by one layer run alone."""
    _kernel_module("lowbit")
    torch.manual_seed(6)
    g = Graph("block")
    x = g.add_input("x", tensor("f32", "batch", "seq", 64))
    def int4(rows, cols, group_size=32, bits=4):
        return IntQuant.quantize(torch.randn(rows, cols), bits, group_size=group_size, symmetric=False)

    def ordered(enc, perm):
        return dataclasses.replace(enc, perm=perm.clone())
    encs = {"q": int4(48, 64), "k": int4(16, 64), "v": int4(16, 64), "g16": int4(8, 64, 16)}
    encs["perm"] = ordered(int4(8, 64), torch.randperm(64))
    shared, shared3 = torch.randperm(64), torch.randperm(64)
    encs.update({"pa": ordered(int4(24, 64), shared), "pb": ordered(int4(8, 64), shared),
                 "ta": ordered(int4(16, 64, bits=3), shared3), "tb": ordered(int4(8, 64, bits=3), shared3)})
    outs = [g.op("linear", x, g.add_weight(f"{name}.weight", enc),
                 w(g, f"{name}.bias", torch.randn(enc.shape[0])) if name == "k" else None, name=name)
            for name, enc in encs.items()]
    alone = g.op("linear", outs[0], g.add_weight("o.weight", int4(8, 48, 16)), None, name="o")
    g.set_outputs(outs + [alone])
    lowered = lower_run_compare(g, tmp_path)
    kernels = lowered.entry["kernels"]
    assert kernels["q.weight"]["stacked_with"] == ["k.weight", "v.weight"]
    assert kernels["q.weight"]["function"] == kernels["v.weight"]["function"]
    assert all("stacked_with" not in kernels[f"{name}.weight"] for name in ("g16", "perm", "o"))
    assert kernels["pa.weight"]["stacked_with"] == ["pb.weight"] and kernels["ta.weight"]["stacked_with"] == ["tb.weight"]
    read = {p["key"] for p in lowered.entry["params"] if p["file"] == "tvm_params.safetensors"}
    assert not any(key.startswith(("q.weight", "k.weight", "v.weight")) for key in read)   # made at load


def test_block_sparse_linear_runs_on_the_bsr_kernel(tmp_path):
    _kernel_module("bsr")
    torch.manual_seed(4)
    wt = torch.randn(32, 64)
    keep = (torch.rand(8, 1, 64, 1) < 0.3).expand(8, 4, 64, 1).reshape(32, 64)      # 4x1 blocks
    lowered = lower_run_compare(_one_linear(Sparse.from_mask(wt, keep, "block4x1"), 64), tmp_path)
    assert not lowered.fallbacks, lowered.fallbacks
    assert "nf_sparse_fc_weight" in lowered.entry["kernels"]["fc.weight"]["function"]


def test_fp32_blocks_with_a_row_scale_are_decoded_not_run_without_it(tmp_path):
    """kernels.bsr reads the blocks alone: a row_scale on fp32 blocks would be lost there, so the
    capability table refuses them and the decoded weight (scaled) runs instead."""
    torch.manual_seed(8)
    keep = (torch.rand(8, 1, 64, 1) < 0.3).expand(8, 4, 64, 1).reshape(32, 64)
    enc = dataclasses.replace(Sparse.from_mask(torch.randn(32, 64), keep, "block4x1"), row_scale=torch.rand(32) + 0.5)
    lowered = lower_run_compare(_one_linear(enc, 64), tmp_path)
    (fb,) = lowered.fallbacks
    assert fb.where == "fc.weight" and "row_scale, which the kernel does not apply" in fb.action


def _int8_block_codes(n: int, k: int, seed: int) -> Sparse:
    """A 4x1 block-sparse weight of int8 codes with one scale per output row (Sparse.row_scale)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), generator=gen).float()
    keep = (torch.rand(n // 4, 1, k, 1, generator=gen) < 0.3).expand(n // 4, 4, k, 1).reshape(n, k)
    row_scale = torch.rand(n, generator=gen) * 0.01 + 0.001

    def as_codes(v):
        return IntQuant.from_codes(v.reshape(len(v), -1).to(torch.int64), torch.ones(1, 1), bits=8, signed=True,
                                   shape=tuple(v.shape), group_size=4)
    return Sparse.from_mask(codes, keep, "block4x1", as_codes, row_scale=row_scale)


@pytest.mark.parametrize("fmt,zero_point", [("int8", 3), ("uint8", 131)])
def test_int8_block_codes_after_an_int8_activation_run_the_u8s8_kernel(tmp_path, fmt, zero_point):
    _kernel_module("bsr")
    g = Graph("lin8")
    x = g.add_input("x", tensor("f32", "batch", "seq", 64))
    q = g.op("fake_quant", x, format=dtype(fmt), scale=0.02, zero_point=zero_point)
    g.set_outputs([g.op("linear", q, g.add_weight("fc.weight", _int8_block_codes(32, 64, 6)),
                        w(g, "fc.bias", torch.randn(32)), name="fc")])
    lowered = lower_run_compare(g, tmp_path)
    assert not lowered.fallbacks, lowered.fallbacks
    assert lowered.entry["kernels"]["fc.weight"]["kernel"] == "bsr_int8"


def test_int8_block_codes_after_a_float_activation_widen_with_a_fallback(tmp_path):
    _kernel_module("bsr")
    lowered = lower_run_compare(_one_linear(_int8_block_codes(32, 64, 7), 64), tmp_path)
    (fb,) = lowered.fallbacks
    assert fb.where == "fc.weight" and "widened to fp32 blocks" in fb.action and "quantize_activations" in fb.action
    assert "nf_sparse_fc_weight" in lowered.entry["kernels"]["fc.weight"]["function"]


def test_variants_without_a_kernel_fall_back_and_say_why(tmp_path):
    torch.manual_seed(5)
    wt = torch.randn(16, 64)
    keep = wt.abs().reshape(16, 16, 4).argsort(-1).argsort(-1).reshape(16, 64) >= 2
    g = _one_linear(Sparse.from_mask(wt, keep, "2:4"), 64)
    i2 = IntQuant.quantize(torch.randn(16, 64), 2, group_size=32)
    x = g.inputs[0]
    g.set_outputs(g.outputs + [g.op("linear", x, g.add_weight("q2.weight", i2), None, name="q2")])
    lowered = lower_run_compare(g, tmp_path)
    why = {f.where: f.action for f in lowered.fallbacks}
    assert set(why) == {"fc.weight", "q2.weight"}
    assert "2:4 sparse" in why["fc.weight"] and "kernels.bsr: 2:4 is not a block (R x C) pattern" in why["fc.weight"]
    assert why["q2.weight"].startswith("no TVM kernel for i2 g32 sym")
    assert "kernels.lowbit: 2-bit codes are not supported" in why["q2.weight"]

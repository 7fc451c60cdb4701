"""The tvm backend's capability table is what its lowering does: for every layer op and a
representative set of weight encodings (and the int8 block codes the u8 x s8 kernel reads), a row
takes the weight exactly when lowering reports no fallback for it, the row's kernel is the one
built, and a fallback gives the table's reason; ``nnforge targets --explain`` lists every row.
Lowering to Relax builds the kernels but compiles nothing, so each case is quick."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.backends.capability_cases import SHAPES, cases, encodings, explained, layer_graph

pytest.importorskip("tvm")

from nnforge.backends.base import get_backend                       # noqa: E402
from nnforge.backends.tvm import TvmBackend, resolve_target          # noqa: E402
from nnforge.backends.tvm.capabilities import CAPABILITIES, KV_CACHE, Kernel  # noqa: E402
from nnforge.backends.tvm.lower import lower_graph                   # noqa: E402
from nnforge.cli import explain_target                               # noqa: E402
from nnforge.ir import Graph, IntQuant, Sparse, dtype, tensor        # noqa: E402
from nnforge.targets import get_target                               # noqa: E402

CPU = get_target("cpu")
# what each kernel module writes as its notes' "kernel"
NOTED = {"lowbit": "int_weight_matmul", "lowbit_minifloat": "minifloat_weight_matmul", "bsr": "bsr_fp32",
         "bsr_int8": "bsr_int8"}


def int8_block_codes(n: int = 16, k: int = 64, seed: int = 0) -> Sparse:
    """1x4 block-sparse int8 codes under one scale, with a scale per output row."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), generator=gen).float()
    keep = (torch.rand(n, k // 4, 1, generator=gen) < 0.4).expand(n, k // 4, 4).reshape(n, k)

    def as_codes(v):
        return IntQuant.from_codes(v.reshape(len(v), -1).to(torch.int64), torch.ones(1, 1), bits=8, signed=True,
                                   shape=tuple(v.shape), group_size=4)
    return Sparse.from_mask(codes, keep, "block1x4", as_codes, row_scale=torch.rand(n, generator=gen) * 0.01 + 1e-3)


def after_int8_activation(enc) -> Graph:
    """A linear whose input is a static int8 ``fake_quant`` (what the u8 x s8 BSR kernel reads)."""
    g = Graph("quantised_linear")
    x = g.add_input("x", tensor("f32", "batch", enc.shape[1]))
    q = g.op("fake_quant", x, format=dtype("int8"), scale=0.02, zero_point=0)
    g.set_outputs([g.op("linear", q, g.add_weight("layer.weight", enc), None, name="layer")])
    return g


def _fp16(enc):
    return dataclasses.replace(enc, out_dtype=dtype("f16"))


def fp16_linear(enc) -> Graph:
    g = Graph("half_linear")
    x = g.add_input("x", tensor("f16", "batch", enc.shape[1]))
    g.set_outputs([g.op("linear", x, g.add_weight("layer.weight", enc), None, name="layer")])
    return g


def _extra_cases():
    linear = encodings(SHAPES["linear"])
    return [("linear", "int8-blocks-after-int8", after_int8_activation(int8_block_codes())),
            ("linear", "int4-g16-fp16", fp16_linear(_fp16(linear["int4-g16"]))),
            ("linear", "dense-fp16", fp16_linear(dataclasses.replace(linear["dense"], data=linear["dense"].data.half()))),
            ("linear", "block1x4-row-scale", layer_graph("linear", dataclasses.replace(
                linear["sparse-block1x4"], row_scale=torch.ones(SHAPES["linear"][0]))))]


CASES = cases() + _extra_cases()


def _lowered(graph: Graph):
    return lower_graph(graph, CPU, resolve_target(CPU.options["llvm_target"]))


@pytest.mark.parametrize("op, label, graph", CASES, ids=[f"{op}-{label}" for op, label, _ in CASES])
def test_table_agrees_with_lowering(op, label, graph):
    weight = graph.weights["layer.weight"]
    cap, why = CAPABILITIES.find(op, weight.encoding, CPU)
    low = _lowered(graph)
    mine = [f for f in low.fallbacks if f.where == weight.name]
    assert (cap is not None) == (not mine), (cap, why, mine)
    if cap is None:
        assert why and all(why in f.action for f in mine), (why, mine)
    elif isinstance(cap.accepts, Kernel):
        assert low.kernels[weight.name]["kernel"] == NOTED[cap.accepts.module]


def test_every_row_is_reached_and_some_weights_are_refused():
    # (the KV-cache rows are reached in test_kv_cache_kernels.py)
    found = [CAPABILITIES.find(op, g.weights["layer.weight"].encoding, CPU)[0] for op, _, g in CASES]
    assert {id(r) for r in CAPABILITIES if r not in KV_CACHE} <= {id(r) for r in found} and None in found


def test_the_reasons_name_the_kernel_and_what_it_lacks():
    linear = encodings(SHAPES["linear"])
    reasons = {label: CAPABILITIES.find("linear", linear[label], CPU)[1] for label in ("sparse-2:4", "mxfp6")}
    assert "kernels.bsr: 2:4 is not a block (R x C) pattern" in reasons["sparse-2:4"]
    assert reasons["mxfp6"] == "kernels.lowbit_minifloat: e3m2 codes are not read by the minifloat weight matmul " \
                               "kernel (it reads e2m1, e4m3, e5m2)"
    assert all(CAPABILITIES.find("linear", linear[label], CPU)[0].accepts.module == "lowbit_minifloat"
               for label in ("e4m3", "e5m2-g32", "e2m1", "nvfp4"))
    embedding = encodings(SHAPES["embedding"])
    assert CAPABILITIES.find("embedding", embedding["nvfp4"], CPU)[0].accepts.builder == "minifloat_gather_rows"
    assert CAPABILITIES.find("embedding", embedding["mxfp6"], CPU)[1].startswith(
        "kernels.lowbit_minifloat: e3m2 codes are not read")
    odd = IntQuant.quantize(torch.randn(8, 63), 4)
    assert "4-bit codes need an even k" in CAPABILITIES.find("linear", odd, CPU)[1]
    three = IntQuant.quantize(torch.randn(8, 60), 3)
    assert CAPABILITIES.find("linear", three, CPU)[1].startswith(
        "kernels.lowbit: 3-bit codes are widened to 4 bits eight at a time (three bytes), so k must be a multiple of 8")
    assert CAPABILITIES.find("linear", linear["int3"], CPU)[0] is not None
    assert "kernels.lowbit: the kernels compute in float32, not float16" == \
        CAPABILITIES.find("linear", _fp16(linear["int4-g16"]), CPU)[1]


def test_int8_block_codes_without_an_int8_activation_widen_to_the_fp32_kernel():
    """The bsr_int8 row takes the codes; with a float activation the lowering widens them to fp32
    blocks for kernels.bsr, the fallback that row's prose states."""
    enc = int8_block_codes()
    cap, _ = CAPABILITIES.find("linear", enc, CPU)
    assert cap.accepts.module == "bsr_int8" and "without one: codes widened to fp32 blocks" in cap.how
    low = _lowered(layer_graph("linear", enc))
    (fb,) = low.fallbacks
    assert "widened to fp32 blocks" in fb.action and "static int8 activation" in fb.action
    assert low.kernels["layer.weight"]["kernel"] == "bsr_fp32"


def test_every_cpu_target_gets_the_same_rows_and_other_targets_none():
    """The kernels read the CPU's ISA from its LLVM string and refuse none; a target with no LLVM
    string gets no kernel."""
    enc = encodings(SHAPES["linear"])["int4-g16"]
    for name in ("cpu", "xeon-spr", "epyc"):
        assert CAPABILITIES.find("linear", enc, get_target(name))[0].accepts.module == "lowbit"
    cap, why = CAPABILITIES.find("linear", enc, get_target("onnx"))
    assert cap is None and why == "kernels.lowbit: target 'onnx' has no options.llvm_target (the tvm kernels are " \
                                  "compiled by LLVM)"


@pytest.mark.parametrize("target", ["cpu", "xeon-spr"])
def test_backend_declares_the_table_and_explain_lists_every_row(target):
    assert get_backend("tvm").capabilities is CAPABILITIES is TvmBackend.capabilities
    assert not hasattr(TvmBackend, "native")
    lines = explain_target(target)
    assert [r for r in CAPABILITIES if not explained(lines, r)] == []

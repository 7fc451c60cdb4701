"""The HLS templates (nnforge/hls/*.h) and the C++ that codegen writes compile without a single
g++ warning under -Wall -Wextra -Werror, for every supported parameter set.

A few graphs hold the parameter sets as separate layers (int2..int8 codes with per-channel and
group scales, symmetric and not; N:M 2:4 / 1:4 / 2:8 with int or minifloat kept values; dense and
fp32 weights (int16 codes, accumulators past 64 bits); LUT-decoded minifloats e2m1 / e2m3 / e3m2 /
e4m3; activations, norms, softmax, element-wise and index ops; int / bool values; the routing ops of
mixture-of-experts layers; constant buffers
(IR full, weights read as values); convolutions (1-D, 2-D, depthwise, dense, int4, minifloat and
2:4 weights), max pooling and batch norm); four option sets vary the activation format (9, 16, 24 and 32
bits), two MACs per DSP (pack2) on and off, the dataflow form and the scale width; one more project
has ports no kernel reads, one is the tiny Llama's decode step with kv8 caches (rope, the kv8 write
and attention over kv_mem), and tests/hls/test_attention.py's harness brings in the templates no IR op
reaches yet (decode attention, RMS norm). Each project is one translation unit (the top function,
the C-simulation entry and the testbench) compiled with
-fsyntax-only (which still instantiates every template the project uses) both in the host form and
with -DNF_AP_MAC (the ap_int inner products synthesis sees instead of the host's int64 sums). The
compiles run concurrently, one per core; the matrix unit's instantiations are most of their time.

hls4ml's ap_types headers are third-party: they come in with -isystem so their warnings do not
count. Two warnings are turned off because they flag HLS idioms, not defects: -Wunknown-pragmas
(``#pragma HLS ...`` means nothing to g++) and -Wunused-label (loop labels name the loops in Vitis
HLS reports and directives; no ``goto`` ever uses them).
"""
from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from nnforge.backends.hls import csim, render, tb_inputs
from nnforge.backends.hls.project import HEADER_DIR, HlsOptions, build_plan
from nnforge.hls import HEADERS
from nnforge.ir import Dense, Graph, tensor
from nnforge.ir.encodings import IntQuant
from nnforge.ir.sparse import Sparse
from tests.hls.test_attention import _harness as attention_harness
from tests.hls.test_kernels import mx, nm_mask, per_channel

WARN_FLAGS = ["-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-Wno-unused-label"]
ROWS, K, N = 2, 64, 16


def linears(g: Graph, x, formats: str) -> list:
    """One linear per weight format (``formats`` "all"; "pack2": the int formats, which two MACs per
    DSP take, and a few; "few": a representative few); the odd ones have N - 1 rows, so that
    pack2's second lane runs past the last row."""
    full = formats == "all"
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.1
    w_odd = torch.randn(N - 1, K) * 0.1
    outs = []

    def lin(name, enc, bias=False, n=N):
        b = g.add_weight(f"{name}.b", Dense(torch.randn(n) * 0.1)) if bias else None
        outs.append(g.op("linear", x, g.add_weight(f"{name}.w", enc), b, name=name))

    every_int = formats in ("all", "pack2")
    groups = {2: None, 3: 64, 4: 16, 5: 32, 6: None, 7: 8, 8: 32} if every_int else {2: None, 4: 16, 8: 32}
    for bits, group in groups.items():
        lin(f"int{bits}_g{group or 'ch'}", IntQuant.quantize(w, bits, group_size=group), bias=bits % 2 == 0)
        if every_int and bits in (3, 4, 8) or bits == 4:
            lin(f"int{bits}_asym_odd", IntQuant.quantize(w_odd, bits, group_size=64, symmetric=False), n=N - 1)
    lin("int8_tensor_odd_bias", IntQuant.quantize(w_odd, 8, per_tensor=True), bias=True, n=N - 1)
    lin("fp32_dense", Dense(w), bias=True)                                  # int16 codes per channel
    nm = ((2, 4, 4), (2, 4, 8), (1, 4, 8), (1, 4, 2), (2, 8, 4), (2, 8, 8)) if full else ((2, 4, 4), (2, 8, 8))
    for n, m, bits in nm:
        enc = Sparse.from_mask(w, nm_mask(w, n, m), f"{n}:{m}", lambda v, b=bits: IntQuant.quantize(v, b, group_size=8))
        lin(f"sparse{n}{m}_int{bits}", enc)
    lin("sparse24_mxfp4", Sparse.from_mask(w, nm_mask(w, 2, 4), "2:4", lambda v: mx(v, "e2m1", 16)))
    if full:
        lin("sparse24_fp32", Sparse.from_mask(w, nm_mask(w, 2, 4), "2:4"))
        lin("sparse28_mxfp6", Sparse.from_mask(w, nm_mask(w, 2, 8), "2:8", lambda v: mx(v, "e3m2", 16)))
        lin("fp8_e5m2_fallback", per_channel(w, "e5m2"))                  # too wide for a LUT: int16 codes
    for f in ("e2m1", "e2m3", "e3m2") if full else ("e2m1",):
        lin(f"mx_{f}", mx(w, f))
    lin("fp8_e4m3_channel", per_channel(w, "e4m3"), bias=True)
    return outs


def convs(g: Graph, x) -> list:
    """The convolution unit with dense, int4 group, minifloat and 2:4 weights, 1-D, 2-D, strided,
    padded, dilated and depthwise; max pooling, pad and batch norm (x seen as a [1, 4, 4, 4] image)."""
    torch.manual_seed(1)
    img = g.op("reshape", g.op("slice", x, axis=0, start=0, end=1, name="x0"), shape=[1, 4, 4, 4], name="img")
    seq = g.op("reshape", x, shape=[1, 8, 16], name="seq")
    w = torch.randn(6, 4, 3, 3) * 0.1
    encs = {"dense": Dense(w), "int4_g12": IntQuant.quantize(w, 4, group_size=12),
            "e4m3": _conv_view(per_channel(w.reshape(6, -1), "e4m3"), w.shape),
            "sparse24": Sparse.from_mask(w, nm_mask(w.reshape(6, -1), 2, 4).reshape(w.shape), "2:4")}
    outs = [g.op("conv", img, g.add_weight(f"conv_{k}.w", e), g.add_weight(f"conv_{k}.b", Dense(torch.randn(6))),
                 stride=[2, 1], padding=[1, 0, 1, 1], dilation=[1, 1], groups=1, name=f"conv_{k}")
            for k, e in encs.items()]
    outs += [
        g.op("conv", img, g.add_weight("dw.w", Dense(torch.randn(8, 1, 3, 3))), None, stride=[1, 1],
             padding=[2, 2, 2, 2], dilation=[2, 2], groups=4, name="conv_depthwise"),
        g.op("conv", seq, g.add_weight("c1d.w", Dense(torch.randn(4, 8, 3))), None, stride=[2], padding=[1, 1],
             dilation=[1], groups=1, name="conv1d"),
        g.op("max_pool", img, kernel=[3, 3], stride=[2, 2], padding=[1, 1, 1, 1], dilation=[1, 1], ceil_mode=False,
             name="max_pool"),
        g.op("pad", img, pads=[0, 1, 0, 2, 0, 0, 1, 0], value=-2.0, name="pad"),
        g.op("batch_norm", img, *[g.add_weight(f"bn.{k}", Dense(torch.rand(4) + 0.5)) for k in ("m", "v", "w", "b")],
             eps=1e-5, name="batch_norm"),
    ]
    return outs


def _conv_view(enc, shape):
    from dataclasses import replace
    return replace(enc, shape=tuple(shape))


def warnings_graph(name: str, formats: str, wide_sums: bool, ints: bool) -> Graph:
    """Every kernel once or more (``formats``: which weight formats, see :func:`linears`);
    ``wide_sums``: the activation x activation matmul and the norms (2 * act_width + log2(n) <= 62
    bits); ``ints``: int / bool values (not in the dataflow form)."""
    g = Graph(name)
    x = g.add_input("x", tensor("f32", ROWS, K))
    y = g.add_input("y", tensor("f32", ROWS, K))
    outs = linears(g, x, formats)
    if formats in ("all", "pack2"):
        outs += convs(g, x)
    outs += [
        g.op("gelu", x, name="gelu"), g.op("gelu", y, name="gelu_tanh", approximate="tanh"),
        g.op("silu", x, name="silu"), g.op("relu", x, name="relu"), g.op("softmax", y, name="softmax", axis=-1),
        g.op("add", x, y, name="add"), g.op("sub", x, y, name="sub"), g.op("mul", x, y, name="mul"),
        g.op("div", x, y, name="div"),
        g.op("add", x, g.add_weight("pos", Dense(torch.randn(K))), name="add_const_bcast"),
        g.op("mul", g.add_weight("gain", Dense(torch.randn(ROWS, 1))), x, name="mul_const_left"),
        g.op("div", x, g.add_weight("three", Dense(torch.tensor(3.0))), name="div_const"),
        g.op("slice", x, name="slice", axis=1, start=3, end=40, step=2),
        g.op("expand", g.op("slice", y, name="col0", axis=1, start=0, end=1), name="expand", shape=[2, ROWS, K]),
        g.op("clamp", x, name="clamp", min=-0.5, max=0.75), g.op("clamp", y, name="clamp_lo", min=-1.0),
        g.op("reshape", g.op("relu", y, name="relu_y"), name="reshape", shape=[ROWS * K]),
        g.op("reshape", x, name="reshape_out", shape=[K, ROWS]),
        g.op("relu", g.op("reshape", y, name="y_flat", shape=[ROWS * K]), name="relu_flat"),   # an alias
        g.op("add", x, g.op("full", name="full_act", shape=[ROWS, K], value=-1.25, dtype="float32"), name="add_full"),
        g.op("permute", g.add_weight("const_act", Dense(torch.randn(K, ROWS))), name="const_t", perm=[1, 0]),
    ]
    if wide_sums:
        outs += [
            g.op("matmul", x, g.op("permute", y, name="yt", perm=[1, 0]), name="matmul_act"),
            g.op("matmul", x, g.add_weight("wkn", Dense(torch.randn(K, 8) * 0.1)), name="matmul_const"),
            g.op("layer_norm", x, g.add_weight("ln.w", Dense(torch.rand(K) + 0.5)),
                 g.add_weight("ln.b", Dense(torch.randn(K) * 0.1)), name="layer_norm", axis=-1, eps=1e-5),
            g.op("layer_norm", y, name="layer_norm_plain", axis=-1, eps=1e-12),
        ]
    if ints:
        ids = g.add_input("ids", tensor("i64", ROWS, 6))
        mask = g.add_input("mask", tensor("i64", ROWS, 6))
        xs = g.op("slice", x, name="x6", axis=1, start=0, end=6)
        fmin = g.add_weight("fmin", Dense(torch.tensor(torch.finfo(torch.float32).min)))
        mb = g.op("cast", mask, dtype="bool", name="cast_int_bool")
        big = g.op("ge", ids, g.add_weight("k3", Dense(torch.tensor(3, dtype=torch.int64))), name="ge_int_const")
        filled = g.op("where", mb, xs, fmin, name="where_fill_min")
        outs += [
            g.op("embedding", ids, g.add_weight("table", Dense(torch.randn(16, 8))), name="embedding"), mb, big,
            filled, g.op("cast", mask, dtype="f32", name="cast_int_float"),
            g.op("cast", big, dtype="f32", name="cast_bool_float"), g.op("and", mb, big, name="and"),
            g.op("or", mb, big, name="or"), g.op("not", mb, name="not"), g.op("eq", filled, fmin, name="eq"),
            g.op("lt", xs, g.op("relu", xs, name="relu6"), name="lt"),
            g.op("where", mb, g.add_weight("zero", Dense(torch.tensor(0.0))), fmin, name="where_const_const"),
            g.op("reduce_any", g.op("not", big, name="not_big"), axes=[-1], keepdim=True, name="reduce_any"),
            g.op("reduce_sum", xs, axes=[1], keepdim=False, name="reduce_sum_act"),
            g.op("reduce_sum", mask, axes=[0, 1], keepdim=False, name="reduce_sum_int"),
            g.op("index", mb, g.add_weight("rows", Dense(torch.tensor([[1], [0]]))),
                 g.add_weight("cols", Dense(torch.tensor([[0, -1, 2]]))), name="index_bool"),
            g.op("gather_elements", xs, g.add_weight("perm", Dense(torch.tensor([[5, 4, 3, 2, 1, 0], [0] * 6]))),
                 axis=1, name="gather_elements"),
            g.op("sqrt", xs, name="sqrt"), g.op("permute", ids, name="ids_t", perm=[1, 0]),
            g.op("cast", g.op("full", name="full_int", shape=[ROWS, 6], value=7, dtype="int64"), dtype="f32",
                 name="cast_full_int"),
            g.op("where", g.op("full", name="full_bool", shape=[ROWS, 6], value=True, dtype="bool"), xs, fmin,
                 name="where_full_bool"),
            g.op("embedding", g.add_weight("pos_ids", Dense(torch.tensor([[0, 2, 1], [1, 1, 0]]))),
                 g.add_weight("pos_table", Dense(torch.randn(3, 4))), name="embedding_const_ids"),
            g.op("permute", g.add_weight("const_bool", Dense(torch.rand(3, 2) > 0.5)), name="const_bool_t",
                 perm=[1, 0]),
        ]
        outs += routing(g, xs, ids)
    g.set_outputs(outs)
    return g


def routing(g: Graph, xs, ids) -> list:
    """The routing ops of a mixture-of-experts layer on [ROWS, 6] scores and ids."""
    top = g.op("topk_indices", xs, k=2, axis=1, largest=True, name="topk_act")
    flat = g.op("reshape", ids, shape=[ROWS * 6], name="ids_flat6")
    order = g.op("topk_indices", flat, k=ROWS * 6, axis=0, largest=False, name="argsort_int")
    rows = g.op("minimum", flat, g.add_weight("last", Dense(torch.tensor(ROWS - 1))), name="minimum_int")
    return [
        g.op("gather_elements", xs, top, axis=1, name="gather_computed_act"),
        g.op("gather_elements", flat, order, axis=0, name="gather_computed_int"),
        g.op("cumsum", ids, axis=1, name="cumsum_int"), g.op("cumsum", xs, axis=0, name="cumsum_act"),
        g.op("cast", g.op("floor", g.op("div", flat, g.add_weight("k2i", Dense(torch.tensor(3)))), name="floor"),
             dtype="i64", name="trunc"),
        g.op("maximum", xs, g.op("relu", xs, name="relu_max"), name="maximum_act"),
        g.op("index", xs, rows, name="take_rows"),
        g.op("index_put", g.add_weight("zeros_i", Dense(torch.zeros(ROWS * 6, dtype=torch.int64))),
             g.add_weight("arange_i", Dense(torch.arange(ROWS * 6))), order, accumulate=False, name="scatter_int"),
        g.op("index_put", xs, g.add_weight("bump", Dense(torch.ones(6))), rows, accumulate=True, name="scatter_add"),
        g.op("matmul", g.op("reshape", xs, shape=[1, ROWS, 6], name="xs3"),
             g.add_weight("experts", Dense(torch.randn(3, 6, 5))), name="matmul_stacked"),
    ]


def ports_graph(name: str) -> Graph:
    """Ports no kernel reads: no weights at all (wmem unread) and an input nothing uses; an int input
    copied to an output; an output that is also read by a later layer."""
    g = Graph(name)
    x = g.add_input("x", tensor("f32", ROWS, K))
    g.add_input("unused", tensor("f32", 3))
    ids = g.add_input("ids", tensor("i64", ROWS, 4))
    r = g.op("relu", x, name="relu")
    g.set_outputs([r, g.op("clamp", r, name="clamp", max=1.0), g.op("reshape", ids, name="ids_flat", shape=[8])])
    return g


# name: (options, graph). act24: the defaults (30-bit scales push the wide layers past 64-bit sums);
# act9: two MACs per DSP for every int format, the dataflow form; act16: pack2 for int2..int4 only,
# 12-bit scales, int8 codes for float weights; act32: the widest activations (no 64-bit sums of their
# products: no matmul, no norms). (chain only sets HLS pragmas, which g++ ignores.) act24 holds every
# weight format; the others fewer, since the matrix unit's instantiations are most of the compile time.
PARAMETER_SETS = {
    "act24_scale30": (HlsOptions(scale_bits=30), dict(formats="all", wide_sums=True, ints=True)),
    "act9_pack2_dataflow": (HlsOptions(act_width=9, act_int=4, lut_step_log2=-5, dataflow=True),
                            dict(formats="pack2", wide_sums=True, ints=False)),
    "act16_pack2_int4": (HlsOptions(act_width=16, act_int=6, lut_step_log2=-8, chain=1, scale_bits=12,
                                           dense_weight_bits=8), dict(formats="few", wide_sums=True, ints=False)),
    "act32": (HlsOptions(act_width=32, act_int=12, exp_frac=30, chain=8, scale_bits=31),
                     dict(formats="few", wide_sums=False, ints=True)),
    "unread_ports": (HlsOptions(), "ports"),
    "attention_rms_harness": (None, "attention"),
    "decoder_kv8": (HlsOptions(), "decoder_kv8"),
}
DEFINES = {"host_mac": [], "ap_mac": ["-DNF_AP_MAC"]}
# (parameter set, define set): NF_AP_MAC changes only the matrix unit's inner products (nf_matvec.h),
# which the ports and attention sets do not use
JOBS = [(key, d) for key, (_, spec) in PARAMETER_SETS.items() for d in DEFINES
        if isinstance(spec, dict) or spec == "decoder_kv8" or d == "host_mac"]


def decoder_graph():
    """The tiny Llama's one-token step with kv8 caches, at fixed sizes: rope, nf::kv8_write and
    nf::kv8_attention with the cache in kv_mem."""
    from nnforge.backends.hls import static_graph
    from nnforge.frontend.decoders.importer import import_decoder
    from nnforge.passes.base import PassContext
    from nnforge.passes.kvcache import EncodeKVCache
    from tests.frontend.decoders.families import tiny_model
    graph = EncodeKVCache(encoding="kv8").run(import_decoder(tiny_model("llama"), max_len=16).graph, PassContext())
    return static_graph(graph, None, {v.name: [1, *v.shape[1:]] if v.name.startswith("cache") else [1, 1]
                                      for v in graph.inputs})[0]


def _project(key: str, root: Path):
    """Write the whole project of parameter set ``key`` under ``root``; return (plan, unity source)."""
    opts, spec = PARAMETER_SETS[key]
    unity = root / "hls" / "unity.cpp"          # one translation unit: ap_types are parsed once
    if spec == "attention":
        files = {f"hls/src/nf/{h}": (HEADER_DIR / h).read_bytes() for h in HEADERS}
        files["hls/src/att.cpp"] = attention_harness().encode()
        files["hls/unity.cpp"] = b'#include "src/att.cpp"\n'
        plan = None
    else:
        graph = ports_graph(f"warn_{key}") if spec == "ports" else decoder_graph() if spec == "decoder_kv8" else \
            warnings_graph(f"warn_{key}", **spec)
        plan = build_plan(graph, opts)
        files = render.render(plan, tb_inputs(plan))
        files["hls/unity.cpp"] = "".join(f'#include "{f}"\n' for f in (f"src/{plan.name}.cpp", "src/host.cpp",
                                                                       "tb/tb.cpp")).encode()
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return plan, unity


def _compile(unity: Path, defines: list[str]) -> tuple[int, str, float]:
    src = unity.parent / "src"
    cmd = [csim.compiler(), "-std=c++14", "-fsyntax-only", *WARN_FLAGS, *defines, f"-I{src}", f"-I{src / 'nf'}",
           "-isystem", str(csim.ap_types_dir()), str(unity)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode, r.stderr, time.perf_counter() - t


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(parameter set, define set): (plan, returncode, stderr, seconds)}, compiled concurrently."""
    root = tmp_path_factory.mktemp("hls-warnings")
    projects = {key: _project(key, root / key) for key in PARAMETER_SETS}
    with ThreadPoolExecutor(max_workers=max(1, min(len(JOBS), os.cpu_count() or 1))) as pool:
        results = pool.map(lambda job: _compile(projects[job[0]][1], DEFINES[job[1]]), JOBS)
        return {job: (projects[job[0]][0], *res) for job, res in zip(JOBS, results)}


@pytest.mark.slow  # compiles every template under -Wall -Werror for each parameter set
@pytest.mark.parametrize("key,defines", JOBS, ids=[f"{k}-{d}" for k, d in JOBS])
def test_templates_and_generated_code_compile_without_warnings(compiled, key, defines):
    plan, rc, err, _ = compiled[key, defines]
    assert rc == 0 and not err.strip(), f"{key} ({defines}):\n{err[-6000:]}"


@pytest.mark.slow  # it reads the compiles of the test above
def test_parameter_sets_cover_the_kernel_variants(compiled):
    """The compiles above instantiate what the module docstring claims."""
    plans = {key: compiled[key, "host_mac"][0] for key, (_, spec) in PARAMETER_SETS.items() if spec != "attention"}
    edge = render.top_cpp(plans.pop("unread_ports"))
    assert "(void)in_unused;" in edge and "(void)wmem;" in edge and "(void)in_x;" not in edge
    mats = [l for p in plans.values() for l in p.layers if getattr(l, "kernel", "") == "matmat"]
    assert {l.w.w_bits for l in mats if l.w.lut is None} >= {2, 3, 4, 5, 6, 7, 8, 16}
    assert {(l.w.sp_n, l.w.sp_m) for l in mats} >= {(1, 1), (2, 4), (1, 4), (2, 8)}
    assert {l.w.lut is not None for l in mats} == {True, False}
    assert {l.pack2 for l in mats} == {True, False}
    assert {l.exact64 for l in mats} == {True, False}               # accumulators within and past 64 bits
    assert {l.w.group for l in mats if l.w.lut is None and l.w.sp_m == 1} >= {8, 16, 32, 64}
    assert any(l.w.scales.shape[0] == 1 for l in mats) and any(l.w.scales.shape[0] > 1 for l in mats)
    assert {p.opts.dataflow for p in plans.values()} == {True, False}
    assert {p.opts.act_width for p in plans.values()} == {9, 16, 24, 32}
    pack2_16 = {l.node for l in plans["act16_pack2_int4"].layers if getattr(l, "pack2", False)}
    assert {"int2_gch", "int4_g16"} <= pack2_16 and "int8_g32" not in pack2_16
    kinds = {type(l).__name__ for p in plans.values() for l in p.layers}
    assert kinds >= {"MatMat", "Matmul", "Lut", "Relu", "Clamp", "Softmax", "Norm", "Binary", "Strided", "Copy",
                     "Alias", "Fanout2", "Embedding", "Ewise", "Reduce", "Sqrt", "Gather", "Fill", "Const", "Conv",
                     "MaxPool", "Pad", "TopK", "Cumsum", "Floor", "TakeRows", "GatherAxis", "ScatterRows",
                     "Rope", "Kv8Write", "Kv8Attention"}
    conv_units = [l for p in plans.values() for l in p.layers if type(l).__name__ == "Conv"]
    assert {l.w.lut is not None for l in conv_units} == {True, False} and {l.w.sp_m for l in conv_units} == {1, 4}
    consts = {l.ctype for p in plans.values() for l in p.layers if type(l).__name__ in ("Fill", "Const")}
    assert consts == {"act_t", "int_t", "bool_t"}

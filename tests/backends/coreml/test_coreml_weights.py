"""Round trips of every weight encoding through a saved Core ML package: the constexpr ops read
back from disk decode (with weights.decode_op, and with coremltools' own value inference as a
second oracle) to enc.decode(torch.float16) bit for bit."""
import math
import os

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from nnforge.backends.coreml.weights import CoreMLWeightError, decode_op, emit_weight, mil_name  # noqa: E402
from nnforge.ir.encodings import Dense, IntQuant, MiniFloat  # noqa: E402
from nnforge.ir.palette import Palettized  # noqa: E402
from nnforge.ir.sparse import Sparse  # noqa: E402
from nnforge.passes.quantize.formats import parse_format, quantize_rtn  # noqa: E402


def _save_and_load(encs: dict, tmp_path):
    """One program, one linear per weight (act-order inputs gathered), saved and read back:
    returns {name: (decoded fp16 array, op types of the chain, note, perm)} and the package path."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from nnforge.backends.coreml.verify import load_program
    cols = {n: math.prod(e.shape[1:]) for n, e in encs.items()}
    notes = {}
    spec = mb.TensorSpec((2, max(cols.values())), dtype=types.fp16)

    @mb.program(input_specs=[spec], opset_version=ct.target.iOS18)
    def prog(x_all):
        outs = []
        for n, e in encs.items():
            x = mb.slice_by_size(x=x_all, begin=[0, 0], size=[2, cols[n]])
            w, note, perm = emit_weight(e, n)
            notes[n] = (note, perm)
            if perm is not None:
                x = mb.gather(x=x, indices=perm, axis=-1)
            outs.append(mb.linear(x=x, weight=w) if len(e.shape) == 2 else mb.reduce_sum(x=w))
        return tuple(outs)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       skip_model_load=True, compute_precision=ct.precision.FLOAT16)
    path = str(tmp_path / "m.mlpackage")
    model.save(path)
    loaded = load_program(path)
    ops = {op.outputs[0].name: op for op in loaded.functions["main"].operations}
    out = {}
    for n in encs:
        op = ops[n]
        chain, todo = [], [op]
        while todo:
            o = todo.pop()
            chain.append(o.op_type)
            todo += [v.op for v in o.inputs.values() if v.op is not None and v.op.op_type != "const"]
        ref = op.materialized_val_inference() if op.op_type.startswith("constexpr_") else op.outputs[0].val
        ref = np.asarray(ref[1] if isinstance(ref, tuple) else ref)
        out[n] = (decode_op(op), ref, chain, *notes[n])
    return out, path


def _expect(enc, perm=None):
    w = enc.decode(torch.float16)
    rows = w.shape[0]
    if perm is not None:
        w = w.reshape(rows, -1)[:, torch.as_tensor(perm, dtype=torch.int64)]
    if isinstance(enc, Dense):
        w = w.clamp(-65504, 65504)          # emit_weight clamps out-of-range dense values (noted)
    return w.numpy()


def _same(a, b):
    a, b = np.asarray(a, np.float16), np.asarray(b, np.float16)
    assert a.shape == b.shape
    # Bit for bit, except that -0 and +0 count as equal (zero fill of dropped sparse entries).
    assert np.array_equal((a + np.float16(0)).view(np.uint16), (b + np.float16(0)).view(np.uint16))


def _check(encs, tmp_path, chains=None):
    got, path = _save_and_load(encs, tmp_path)
    for n, enc in encs.items():
        dec, ref, chain, note, perm = got[n]
        _same(dec, _expect(enc, perm))
        _same(ref, dec)                     # coremltools' reference decode (value inference) agrees
        if chains and n in chains:
            assert chain[0] == chains[n][0] and set(chain) == set(chains[n]), (n, chain, note)
    return got, path


def _w(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_intquant_mappings(tmp_path):
    w = _w(16, 256)      # wide rows: 3-bit per-row LUTs (3 + 256/256 bits) beat int4 (4 bits)
    encs = {
        "int8_channel": IntQuant.quantize(w, 8, scale_dtype=torch.float16),
        "int4_g16_sym": IntQuant.quantize(w, 4, group_size=16, scale_dtype=torch.float16),
        "uint4_g16_zp": IntQuant.quantize(w, 4, group_size=16, symmetric=False, scale_dtype=torch.float16),
        "int3_channel": IntQuant.quantize(w, 3, scale_dtype=torch.float16),
        "int4_fp32_scales": IntQuant.quantize(w, 4),                 # non-fp16 scales: per-block LUT
        "uint6_g32": IntQuant.quantize(w, 6, group_size=32, symmetric=False, scale_dtype=torch.float16),
    }
    got, _ = _check(encs, tmp_path, {
        "int8_channel": ["constexpr_blockwise_shift_scale"], "int4_g16_sym": ["constexpr_blockwise_shift_scale"],
        "uint4_g16_zp": ["constexpr_blockwise_shift_scale"], "int3_channel": ["constexpr_lut_to_dense"],
        "int4_fp32_scales": ["constexpr_lut_to_dense"], "uint6_g32": ["constexpr_blockwise_shift_scale"]})
    assert got["int8_channel"][3] is None and got["int4_g16_sym"][3] is None
    assert "uint3" in got["int3_channel"][3] and "not fp16" in got["int4_fp32_scales"][3]
    assert "widened to uint8" in got["uint6_g32"][3]


def test_intquant_act_order_returns_perm(tmp_path):
    w = _w(8, 32)
    base = IntQuant.quantize(w, 4, group_size=8, scale_dtype=torch.float16)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    enc = IntQuant(base.shape, 4, True, base.codes, base.scale, 8, None, perm)
    got, _ = _check({"act_order": enc}, tmp_path)
    dec, _, _, note, p = got["act_order"]
    assert np.array_equal(p, perm.numpy()) and p.dtype == np.int32
    # The stored-order weight with gathered inputs computes the same layer.
    x = torch.randn(3, 32)
    y_ir = x @ enc.decode(torch.float32).T
    y_ml = x[:, p] @ torch.from_numpy(dec.astype(np.float32)).T
    torch.testing.assert_close(y_ml, y_ir.to(torch.float16).float(), atol=2e-2, rtol=1e-2)


def test_conv_weight_blocks_along_flattened_columns(tmp_path):
    w = _w(8, 4, 3, 3)                                              # groups of 18 = 2 input channels
    enc = IntQuant.quantize(w, 4, group_size=18, scale_dtype=torch.float16)
    _check({"conv_w": enc}, tmp_path, {"conv_w": ["constexpr_blockwise_shift_scale"]})


def test_palettized(tmp_path):
    idx4 = torch.randint(0, 16, (16, 32), generator=torch.Generator().manual_seed(2))
    encs = {
        "pal4_tensor": Palettized.from_indices(idx4, torch.randn(1, 16).half(), bits=4, shape=(16, 32)),
        "pal4_rows4": Palettized.from_indices(idx4, torch.randn(4, 16), bits=4, shape=(16, 32), group_size=4),
        "pal2": Palettized.from_indices(idx4 % 4, torch.randn(1, 4).half(), bits=2, shape=(16, 32)),
        "pal5": Palettized.from_indices(idx4 * 2, torch.randn(2, 32).half(), bits=5, shape=(16, 32), group_size=8),
    }
    got, _ = _check(encs, tmp_path, {n: ["constexpr_lut_to_dense"] for n in encs})
    assert got["pal4_tensor"][3] is None and "uint6" in got["pal5"][3]


def test_minifloat(tmp_path):
    w = _w(16, 64) * 0.05
    encs = {
        "e4m3_channel": quantize_rtn(w, parse_format("e4m3", scale_dtype="float16")),
        "mxfp4": quantize_rtn(w, parse_format("mxfp4")),
        "nvfp4": quantize_rtn(w, parse_format("nvfp4")),
        "e4m3_fp32_channel": quantize_rtn(w, parse_format("e4m3")),
    }
    assert all(isinstance(e, MiniFloat) for e in encs.values())
    encs["e4m3_wide"] = quantize_rtn(_w(4, 2048) * 0.05, parse_format("e4m3", scale_dtype="float16"))
    got, _ = _check(encs, tmp_path, {"mxfp4": ["constexpr_blockwise_shift_scale"],
                                     "e4m3_wide": ["constexpr_lut_to_dense"]})
    assert "int8 multiples of 0.5" in got["mxfp4"][3]
    assert "dense fp16" in got["nvfp4"][3] and "dense fp16" in got["e4m3_channel"][3]   # LUTs would outweigh fp16


def _mask24(w):
    rows, cols = w.shape
    return (w.abs().reshape(rows, -1, 4).argsort(-1).argsort(-1) >= 2).reshape(rows, cols)


def test_sparse(tmp_path):
    w = _w(16, 64)
    keep = _mask24(w)
    fmt = parse_format("uint4", group_size=16, scale_dtype="float16")
    unstr = w.abs() > 1.0
    encs = {
        "sp24_dense": Sparse.from_mask(w, keep, "2:4"),
        "sp24_uint4": Sparse.from_mask(w, keep, "2:4", lambda v: quantize_rtn(v, fmt)),
        "sp24_pal": Sparse.from_mask(w, keep, "2:4", lambda v: Palettized.from_indices(
            torch.randint(0, 16, v.shape), torch.randn(4, 16).half(), bits=4, shape=v.shape, group_size=4)),
        "unstr_pal": Sparse.from_mask(w, unstr, "unstructured", lambda v: Palettized.from_indices(
            torch.randint(0, 8, v.shape), torch.randn(1, 8).half(), bits=3, shape=v.shape)),
        "block4x1": Sparse.from_mask(w, (w.reshape(4, 4, 64).abs().sum(1) > 3).repeat_interleave(4, 0), "block4x1"),
        "sp24_rowscale": Sparse.from_mask(w, keep, "2:4", row_scale=torch.rand(16) + 0.5),
    }
    got, _ = _check(encs, tmp_path, {
        "sp24_dense": ["constexpr_sparse_to_dense"],
        "sp24_uint4": ["constexpr_sparse_to_dense", "constexpr_sparse_blockwise_shift_scale"],
        "sp24_pal": ["constexpr_sparse_to_dense", "constexpr_lut_to_sparse"],
        "unstr_pal": ["constexpr_sparse_to_dense", "constexpr_lut_to_sparse"],
        "block4x1": ["constexpr_sparse_to_dense"]})
    assert got["sp24_dense"][3] is None and "row_scale" in got["sp24_rowscale"][3]


def test_sparsegpt_24_int4(tmp_path):
    from nnforge.passes.prune.sparsity import sparsegpt_prune
    w = _w(16, 64)
    x = _w(128, 64, seed=3)
    enc, _ = sparsegpt_prune(w, x.T @ x, "2:4", fmt=parse_format("int4", group_size=16, scale_dtype="float16"))
    got, _ = _check({"sgpt": enc}, tmp_path,
                    {"sgpt": ["constexpr_sparse_to_dense", "constexpr_sparse_blockwise_shift_scale"]})


def test_dense_and_clamp(tmp_path):
    w = _w(8, 16)
    w[0, 0] = 1e6
    got, _ = _check({"dense": Dense(w[1:]), "big": Dense(w)}, tmp_path)
    assert got["dense"][3] is None and "clamped" in got["big"][3]
    assert got["big"][0][0, 0] == np.float16(65504)


def test_package_size_reflects_compression(tmp_path):
    w = _w(256, 256)
    idx = torch.randint(0, 16, (256, 256), generator=torch.Generator().manual_seed(4))
    sizes = {}
    for n, e in {"fp16": Dense(w), "pal4": Palettized.from_indices(idx, torch.randn(1, 16).half(), bits=4,
                                                                     shape=(256, 256))}.items():
        d = tmp_path / n
        d.mkdir()
        _, path = _save_and_load({"w": e}, d)
        sizes[n] = os.path.getsize(os.path.join(path, "Data", "com.apple.CoreML", "weights", "weight.bin"))
    assert sizes["pal4"] < sizes["fp16"] * 0.3, sizes


def test_mil_name():
    used = set()
    assert mil_name("layer.0.weight", used) == "layer_0_weight"
    assert mil_name("layer/0-weight", used) == "layer_0_weight_1"          # collision after mapping
    assert mil_name("layer.0.weight", used) == "layer_0_weight_2"
    assert mil_name("0conv", used) == "_0conv"
    assert mil_name("fp16", used) == "fp16_" and mil_name("program", used) == "program_"
    assert mil_name("", used) == "_"
    assert mil_name("ünï", set()) == "_n_"
    again = set()
    assert [mil_name(n, again) for n in ("a.b", "a_b", "a-b")] == ["a_b", "a_b_1", "a_b_2"]


def test_errors():
    with pytest.raises(CoreMLWeightError, match="not a MIL identifier"):
        emit_weight(Dense(torch.zeros(2, 2)), "bad.name")

    class FakeOp:
        op_type, name, inputs, outputs = "conv", "c0", {}, []
    with pytest.raises(CoreMLWeightError, match="cannot decode op type 'conv'"):
        decode_op(FakeOp())


def test_ragged_groups_and_unstructured_int(tmp_path):
    w = _w(8, 40)
    # 40 columns in groups of 16 (last group 8 wide): Core ML blocks of gcd(16, 40) = 8, scales repeated.
    ragged = IntQuant.from_codes(torch.randint(-8, 8, (8, 40)), torch.rand(8, 3).half() + 0.1, bits=4, signed=True,
                                 shape=(8, 40), group_size=16)
    unstr = Sparse.from_mask(w, w.abs() > 0.8, "unstructured",
                             lambda v: IntQuant.quantize(v, 8, per_tensor=True, scale_dtype=torch.float16))
    got, _ = _check({"ragged": ragged, "unstr_int8": unstr}, tmp_path, {
        "ragged": ["constexpr_blockwise_shift_scale"],
        "unstr_int8": ["constexpr_sparse_to_dense", "constexpr_sparse_blockwise_shift_scale"]})

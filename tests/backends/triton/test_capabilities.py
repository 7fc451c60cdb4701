"""The triton backend's capability table is what its lowering does: for encodings of every row and
some no row takes, ``CAPABILITIES.find`` says native exactly when lowering packed the weight for
the row's kernel module (no fallback), and ``nnforge targets --explain`` prints every row."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported, anywhere

import dataclasses                        # noqa: E402

import pytest                             # noqa: E402
import torch                              # noqa: E402

from tests import conftest                # noqa: E402

pytest.importorskip("triton")

from nnforge.backends.base import get_backend                                      # noqa: E402
from nnforge.backends.triton import TritonBackend                                  # noqa: E402
from nnforge.backends.triton.capabilities import CAPABILITIES, Kernel              # noqa: E402
from nnforge.backends.triton.kernels import lut, minifloat                          # noqa: E402
from nnforge.backends.triton.launcher import MATMUL_LIKE                           # noqa: E402
from nnforge.cli import explain_target                                             # noqa: E402
from nnforge.ir import Dense, Graph, IntQuant, LowRank, Palettized, Sparse, tensor  # noqa: E402
from nnforge.passes.quantize.formats import parse_format, quantize_rtn             # noqa: E402
from nnforge.targets import get_target                                             # noqa: E402

N, K = 32, 64


def _w(seed: int, n: int = N, k: int = K) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _pal(bits: int) -> Palettized:
    g = torch.Generator().manual_seed(bits)
    return Palettized.from_indices(torch.randint(0, 1 << bits, (N, K), generator=g),
                                   torch.randn(1, 1 << bits, generator=g).half(), bits=bits, shape=(N, K))


def _two_four(w: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros_like(w, dtype=torch.bool).reshape(N, -1, 4)
    keep.scatter_(2, w.abs().reshape(N, -1, 4).topk(2, dim=2).indices, True)
    return keep.reshape(N, K)


def linear_encodings() -> dict[str, object]:
    """A linear weight per case: each row's kind, taken and refused."""
    w = _w(0)
    act_order = dataclasses.replace(IntQuant.quantize(w, 4, group_size=32, symmetric=False), perm=torch.randperm(K))
    return {
        "int4_g32": IntQuant.quantize(w, 4, group_size=32), "int8": IntQuant.quantize(w, 8),
        "int4_act_order": act_order,
        "int3": IntQuant.quantize(w, 3), "int4_g8": IntQuant.quantize(w, 4, group_size=8),
        "e4m3": quantize_rtn(w, parse_format("e4m3")), "mxfp4": quantize_rtn(w, parse_format("mxfp4")),
        "nvfp4": quantize_rtn(w, parse_format("nvfp4")),
        "pal4": _pal(4), "pal7": _pal(7),
        "sp24_int4": Sparse.from_mask(w, _two_four(w), "2:4", lambda v: IntQuant.quantize(v, 4)),
        "sp24_float": Sparse.from_mask(w, _two_four(w), "2:4"),
        "sp24_int8": Sparse.from_mask(w, _two_four(w), "2:4", lambda v: IntQuant.quantize(v, 8)),
        "unstructured": Sparse.from_mask(w, w.abs() > 1, "unstructured"),
        "lowrank": LowRank(shape=(N, K), a=Dense(torch.randn(4, K)), b=Dense(torch.randn(N, 4))),
        "dense": Dense(w),
    }


def graph() -> tuple[Graph, dict[str, tuple[str, object]]]:
    """One linear per linear case, and a matmul, an embedding and a conv each with a dense weight and an
    int8 one. Returns the graph and weight name -> (op, encoding)."""
    g = Graph("capabilities")
    x = g.add_input("x", tensor("f32", "batch", K))
    ids = g.add_input("ids", tensor("i64", "batch"))
    img = g.add_input("img", tensor("f32", 1, 4, 8, 8))
    weights, outs = {}, []
    for case, enc in linear_encodings().items():
        outs.append(g.op("linear", x, g.add_weight(f"{case}.weight", enc), None, name=case))
        weights[f"{case}.weight"] = ("linear", enc)
    for kind, enc in (("dense", Dense(_w(1, K, N))), ("int8", IntQuant.quantize(_w(1, K, N), 8))):
        outs.append(g.op("matmul", x, g.add_weight(f"mm_{kind}.weight", enc), name=f"mm_{kind}"))
        weights[f"mm_{kind}.weight"] = ("matmul", enc)
    for kind, enc in (("dense", Dense(_w(2, 16, K))), ("int8", IntQuant.quantize(_w(2, 16, K), 8))):
        outs.append(g.op("embedding", ids, g.add_weight(f"emb_{kind}.weight", enc), name=f"emb_{kind}"))
        weights[f"emb_{kind}.weight"] = ("embedding", enc)
    for kind, enc in (("dense", Dense(torch.randn(8, 4, 3, 3))), ("int8", IntQuant.quantize(torch.randn(8, 4, 3, 3), 8))):
        outs.append(g.op("conv", img, g.add_weight(f"conv_{kind}.weight", enc), None, stride=[1, 1],
                         padding=[1, 1, 1, 1], dilation=[1, 1]))
        weights[f"conv_{kind}.weight"] = ("conv", enc)
    g.set_outputs(outs)
    return g, weights


@pytest.mark.parametrize("target", ["h100", "a100"])
def test_find_agrees_with_lowering(tmp_path, target):
    g, weights = graph()
    lowered = conftest.lower_into(TritonBackend(), g, target, tmp_path)
    fallbacks = {f.where: f for f in lowered.fallbacks}
    native = set()
    for wname, (op, enc) in weights.items():
        cap, why = CAPABILITIES.find(op, enc, get_target(target))
        assert (cap is not None) == (wname not in fallbacks), (wname, why)
        if cap is None:
            assert why and why in fallbacks[wname].action, (wname, why, fallbacks[wname].action)
            continue
        native.add(wname)
        if enc.kind == "dense":
            assert wname not in lowered.entry["linears"]            # torch reads it as stored
        else:
            assert lowered.entry["linears"][wname]["module"] == cap.accepts.module
    assert native == {f"{c}.weight" for c in ("int4_g32", "int8", "int4_act_order", "e4m3", "mxfp4", "nvfp4", "pal4",
                                                "sp24_int4", "sp24_float", "dense")} | \
        {f"{op}_dense.weight" for op in ("mm", "emb", "conv")}
    assert "intweight: 3-bit codes" in fallbacks["int3.weight"].action
    assert "no native matmul for int weights" in fallbacks["mm_int8.weight"].action


def test_every_row_of_an_encoded_kind_names_a_kernel_module():
    """Lowering packs through the row's kernel module and the launcher calls kernels for linears
    only; dense rows are the launcher's matmul-like ops, run by torch."""
    for row in CAPABILITIES:
        if row.encoding == "dense":
            assert row.op in MATMUL_LIKE and row.accepts is None
        else:
            assert row.op == "linear" and isinstance(row.accepts, Kernel), row
            assert row.how.startswith(f"kernels.{row.accepts.module}:")
    assert {r.op for r in CAPABILITIES if r.encoding == "dense"} == set(MATMUL_LIKE)


def test_rows_say_what_their_kernels_take():
    """The prose of a row names the formats its module's supports() takes."""
    rows = {r.encoding: r.how for r in CAPABILITIES if r.op == "linear"}
    assert all(f in rows["minifloat"] for f in [*minifloat.ELEMENTS, *minifloat.SCALE_FORMATS])
    assert lut.BITS == (1, 2, 3, 4, 5, 6, 8) and "1..6- or 8-bit indices" in rows["palettized"]


def test_fp8_tensor_cores_come_from_the_architecture():
    """The minifloat row takes an e4m3 weight on both GPUs; only the fp8 x fp8 path reads the
    architecture's fp8 tensor cores (h100 has them, a100 not)."""
    enc = quantize_rtn(_w(3), parse_format("e4m3"))
    for name in ("h100", "a100"):
        cap, _ = CAPABILITIES.find("linear", enc, get_target(name))
        assert cap is not None and cap.accepts.module == "minifloat"
    assert minifloat.supports(enc, get_target("h100"), activations="e4m3") is None
    assert "fp8 tensor cores" in minifloat.supports(enc, get_target("a100"), activations="e4m3")


def test_a_target_of_another_backend_is_refused():
    cap, why = CAPABILITIES.find("linear", IntQuant.quantize(_w(4), 4), get_target("cpu"))
    assert cap is None and "intweight: target 'cpu' is not a Triton GPU target" in why


@pytest.mark.parametrize("target", ["h100", "a100"])
def test_explain_lists_every_row(target):
    text = "\n".join(explain_target(target))
    assert get_backend("triton").capabilities is CAPABILITIES
    for line in CAPABILITIES.describe():
        assert line in text

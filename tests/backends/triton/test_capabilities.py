"""The triton backend's capability table is what its lowering does: for each layer op and the
shared representative encodings (tests/backends/capability_cases.py), ``CAPABILITIES.find`` takes
the weight exactly when lowering reports no fallback for it, an encoded one then packed for the
row's kernel module; ``nnforge targets --explain`` lists every row."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported, anywhere

import pytest                             # noqa: E402
import torch                              # noqa: E402

from tests import conftest                # noqa: E402
from tests.backends.capability_cases import cases, explained  # noqa: E402

pytest.importorskip("triton")

from nnforge.backends.base import get_backend                                      # noqa: E402
from nnforge.backends.triton import TritonBackend                                  # noqa: E402
from nnforge.backends.triton.capabilities import CAPABILITIES, Kernel              # noqa: E402
from nnforge.backends.triton.kernels import hadamard, lut, minifloat                # noqa: E402
from nnforge.backends.triton.launcher import MATMUL_LIKE                           # noqa: E402
from nnforge.cli import explain_target                                             # noqa: E402
from nnforge.ir import Graph, IntQuant, tensor                                     # noqa: E402
from nnforge.passes.quantize.formats import parse_format, quantize_rtn             # noqa: E402
from nnforge.targets import get_target                                             # noqa: E402

N, K = 32, 64
# every shared case on h100; the linear ones on a100 too (a chip without fp8 tensor cores)
CASES = [("h100", *c) for c in cases()] + [("a100", *c) for c in cases() if c[0] == "linear"]


def _w(seed: int, n: int = N, k: int = K) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("target, op, label, graph", CASES, ids=[f"{t}-{op}-{label}" for t, op, label, _ in CASES])
def test_table_agrees_with_lowering(tmp_path, target, op, label, graph):
    """A row takes the weight exactly when lowering reports no fallback for it; an encoded one then
    runs in the row's kernel module, a dense one is read by torch as stored."""
    weight = graph.weights["layer.weight"]
    cap, why = CAPABILITIES.find(op, weight.encoding, get_target(target))
    lowered = conftest.lower_into(TritonBackend(), graph, target, tmp_path)
    mine = [f for f in lowered.fallbacks if f.where == weight.name]
    assert (cap is not None) == (not mine), (cap, why, mine)
    assert all(why in f.action for f in mine), (why, mine)
    module = lowered.entry["linears"].get(weight.name, {}).get("module")
    assert module == (cap.accepts.module if cap is not None and cap.encoding != "dense" else None)


CACHE_OPS = ("kv_cache_write", "kv_cache_read")
# ops that read no weight: their "dense" row is the float activation (test_hadamard.py lowers them)
WEIGHTLESS = {"hadamard": "kernels.hadamard"}


def test_every_row_is_covered():
    """The cases reach every weight row, and kinds no row takes; the cache rows are the encodings
    the decoder steps run (backends/triton/decoder.py), one write and one read row each; each
    weightless op has one dense row naming its kernel module."""
    from nnforge.backends.triton.decoder import IN_PLACE
    reached = {id(CAPABILITIES.find(op, g.weights["layer.weight"].encoding, get_target(t))[0])
               for t, op, _, g in CASES}
    assert {id(r) for r in CAPABILITIES if r.op not in (*CACHE_OPS, *WEIGHTLESS)} | {id(None)} <= reached
    for op in CACHE_OPS:
        assert sorted(r.encoding for r in CAPABILITIES if r.op == op) == sorted(IN_PLACE)
    for op, module in WEIGHTLESS.items():
        assert [(r.encoding, r.how.split(":")[0], r.accepts) for r in CAPABILITIES if r.op == op] == \
            [("dense", module, None)]


def test_a_tied_weight_packed_for_its_linear_is_decoded_for_its_embedding(tmp_path):
    """One int4 weight read by a linear (a kernel row takes it) and by an embedding (no row): packed
    for the one, decoded for the other, with the table's reason."""
    g = Graph("tied")
    x, ids = g.add_input("x", tensor("f32", "batch", K)), g.add_input("ids", tensor("i64", "batch"))
    w = g.add_weight("tied.weight", IntQuant.quantize(_w(0), 4))
    g.set_outputs([g.op("linear", x, w, None, name="head"), g.op("embedding", ids, w, name="embed")])
    lowered = conftest.lower_into(TritonBackend(), g, "h100", tmp_path)
    assert lowered.entry["linears"]["tied.weight"]["module"] == "intweight"
    [f] = lowered.fallbacks
    assert "node embed" in f.what and "no native embedding for int weights" in f.action


def test_every_row_of_an_encoded_kind_names_a_kernel_module():
    """Lowering packs through the row's kernel module and the launcher calls kernels for linears
    and the weightless ops only; the other dense rows are the launcher's matmul-like ops, run by
    torch."""
    for row in CAPABILITIES:
        if row.op in (*CACHE_OPS, *WEIGHTLESS):     # no weight module packs these
            continue
        if row.encoding == "dense":
            assert row.op in MATMUL_LIKE and row.accepts is None
        else:
            assert row.op == "linear" and isinstance(row.accepts, Kernel), row
            assert row.how.startswith(f"kernels.{row.accepts.module}:")
    assert {r.op for r in CAPABILITIES if r.encoding == "dense"} == {*MATMUL_LIKE, *WEIGHTLESS}


def test_rows_say_what_their_kernels_take():
    """The prose of a row names the formats its module's supports() takes."""
    rows = {r.encoding: r.how for r in CAPABILITIES if r.op == "linear"}
    assert all(f in rows["minifloat"] for f in [*minifloat.ELEMENTS, *minifloat.SCALE_FORMATS])
    assert lut.BITS == (1, 2, 3, 4, 5, 6, 8) and "1..6- or 8-bit indices" in rows["palettized"]
    [had] = [r.how for r in CAPABILITIES if r.op == "hadamard"]
    assert f"up to {hadamard.MAX_BLOCK_ELEMENTS} values" in had


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
def test_backend_declares_the_table_and_explain_lists_every_row(target):
    assert TritonBackend.capabilities is CAPABILITIES and not hasattr(TritonBackend, "native")
    assert get_backend("triton").capabilities is CAPABILITIES
    lines = explain_target(target)
    assert [r for r in CAPABILITIES if not explained(lines, r)] == []

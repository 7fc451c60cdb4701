"""The ``hadamard`` kernel under Triton's CPU interpreter against the op's reference
(``nnforge.ir.hadamard.hadamard_transform`` in fp32), compiled ahead of time for sm_80 and sm_90,
and end to end: a graph with a ``hadamard`` compiled for ``h100`` runs it in the kernel.

Tolerance: one rounding of the output dtype relative to each value (the interpreter truncates
fp32 to bf16 where a GPU rounds to nearest, a whole bf16 step at most), plus fp32 rounding
against the largest |reference| for the Paley product, which the reference sums in its own order.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported, anywhere

import pytest                             # noqa: E402
import torch                              # noqa: E402

from tests import conftest                # noqa: E402

pytest.importorskip("triton")

from nnforge.backends.base import BackendError                             # noqa: E402
from nnforge.backends.triton import TritonBackend                          # noqa: E402
from nnforge.backends.triton.kernels import Build, KernelError, compile_many  # noqa: E402
from nnforge.backends.triton.kernels import hadamard as hk                 # noqa: E402
from nnforge.ir import Dense, Graph, run_graph, tensor                     # noqa: E402
from nnforge.ir.hadamard import hadamard_transform                         # noqa: E402

from .aot import ARCHS, MAIN, SHARED_LIMIT                                 # noqa: E402

# (block, width): powers of two, Paley blocks of 12 and 20 times 32, and blocks narrower than the row
CASES = [(16, 16), (24, 24), (64, 64), (384, 384), (640, 640), (2048, 2048), (32, 128)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(got: torch.Tensor, x: torch.Tensor, block: int) -> None:
    ref = hadamard_transform(x.float(), block)
    assert got.dtype == x.dtype and got.shape == x.shape
    atol = 16 * torch.finfo(torch.float32).eps * float(ref.abs().max())
    torch.testing.assert_close(got.float(), ref, rtol=torch.finfo(x.dtype).eps, atol=atol)


@pytest.mark.parametrize("block, width", CASES, ids=[f"b{b}-n{n}" for b, n in CASES])
@pytest.mark.parametrize("lead", [(3,), (2, 3)], ids=["2d", "3d"])
def test_matches_reference(block, width, lead):
    g = torch.Generator().manual_seed(block + width)
    for dt in DTYPES:
        x = torch.randn(*lead, width, generator=g).to(dt)
        _check(hk.hadamard(x, block), x, block)


def test_power_of_two_blocks_are_the_references_own_sums():
    """The butterflies add in the reference's order, so without a Paley factor fp32 is bit for bit."""
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    assert torch.equal(hk.hadamard(x, 64), hadamard_transform(x, 64))


def test_tiles_of_rows_with_a_partial_last_one(monkeypatch):
    """Several programs along the rows (the last one masked) and two blocks a row; rows further
    apart than their width are read where they lie. A block of 640 (m = 20 padded to 32) takes
    1024 values a row."""
    monkeypatch.setattr(hk, "INTERP_TILE_ELEMENTS", 2 * 32 * 32)
    assert hk.rows_per_program(640, 7) == 2
    x = torch.randn(7, 4 * 640, generator=torch.Generator().manual_seed(2))[:, 2 * 640:]
    _check(hk.hadamard(x, 640), x, 640)


def test_supports_names_the_reason():
    assert hk.supports(640, "h100") is None and hk.supports(2048, "a100") is None
    assert "not a Triton GPU target" in hk.supports(64, "cpu")
    assert "no Hadamard matrix of size 28" in hk.supports(28, "h100")
    assert f"over the {hk.MAX_BLOCK_ELEMENTS}" in hk.supports(12 * 4096, "h100")


def test_kernel_errors():
    with pytest.raises(KernelError, match="float32, float16 or bfloat16"):
        hk.hadamard(torch.ones(2, 16, dtype=torch.int32), 16)
    with pytest.raises(KernelError, match="does not divide"):
        hk.hadamard(torch.ones(2, 48), 32)
    with pytest.raises(KernelError, match="no Hadamard matrix of size 28"):
        hk.hadamard(torch.ones(2, 28), 28)
    assert hk.hadamard(torch.ones(0, 16), 16).shape == (0, 16)


# --- ahead of time, for the a100 and h100 architectures: the reshapes, splits and joins of the
# butterflies are a valid GPU kernel, with and without a Paley factor, in each activation dtype -----
SIGNATURE = {"x_ptr": "*fp32", "h_ptr": "*fp32", "y_ptr": "*fp32", "R": "i32", "M": "i32", "blocks": "i32",
             "stride_x": "i32", "stride_y": "i32", "scale": "fp32"}
AOT = [("fp16", 640, 1), ("bf16", 2048, 1), ("fp32", 16, 64)]


def test_aot_compiles():
    builds, labels = [], []
    for arch in (a for a in ARCHS if a.name in MAIN):
        for dt, block, rows in AOT:
            c = hk.constexprs(block, rows)
            sig = dict(SIGNATURE, x_ptr=f"*{dt}", y_ptr=f"*{dt}", **dict.fromkeys(c, "constexpr"))
            builds.append(Build(hk._hadamard_kernel, sig, c, arch.sm, 4, 1, ("stride_x", "stride_y")))
            labels.append((arch.sm, dt, block))
    for (sm, dt, block), k in zip(labels, compile_many(builds)):
        assert not isinstance(k, Exception), (sm, dt, block, k)
        assert k.cubin and k.shared <= SHARED_LIMIT[sm], (sm, dt, block, k.shared)


# --- end to end ------------------------------------------------------------------------------------
D = 128


def _graph(block: int, width: int = D) -> Graph:
    g = Graph("rotated")
    x = g.add_input("x", tensor("f32", "batch", "seq", width))
    w = Dense(torch.randn(16, width, generator=torch.Generator().manual_seed(3)))
    r = g.op("hadamard", x, block=block, name="rotate")
    g.set_outputs([g.op("linear", r, g.add_weight("down.weight", w), None, name="down")])
    return g


def test_compiled_graph_runs_the_kernel(tmp_path, monkeypatch):
    """hadamard then a linear, lowered for h100 and run in the interpreter: the kernel takes the
    node, and the output is the reference interpreter's (the linear on fp16 operands)."""
    g = _graph(32)
    lowered = conftest.lower_into(TritonBackend(), g, "h100", tmp_path)
    assert lowered.entry["hadamards"] == ["rotate"] and lowered.fallbacks == []
    assert "hadamard" in lowered.entry["kernels"] and "kernels/hadamard.py" in lowered.files
    calls = []
    kernel = hk.hadamard
    monkeypatch.setattr(hk, "hadamard", lambda x, block: calls.append(block) or kernel(x, block))
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(4))
    got, ref = TritonBackend().load(tmp_path, lowered.entry, "cpu")(x), run_graph(g, [x])[0]
    assert calls == [32]
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2)
    cos = torch.nn.functional.cosine_similarity(got.reshape(-1), ref.reshape(-1), dim=0)
    assert float(cos) >= 0.9999


def test_a_block_the_kernel_cannot_hold_is_a_reported_fallback(tmp_path):
    g = _graph(12 * 4096, 12 * 4096)
    lowered = conftest.lower_into(TritonBackend(), g, "a100", tmp_path)
    [f] = lowered.fallbacks
    assert lowered.entry["hadamards"] == [] and f.where == "rotate"
    assert "reference kernel" in f.action and f"over the {hk.MAX_BLOCK_ELEMENTS}" in f.action


def test_an_entry_naming_another_op_is_refused(tmp_path):
    g = _graph(32)
    lowered = conftest.lower_into(TritonBackend(), g, "h100", tmp_path)
    with pytest.raises(BackendError, match=r"down \(linear\) as a hadamard.*recompile"):
        TritonBackend().load(tmp_path, dict(lowered.entry, hadamards=["down"]), "cpu")

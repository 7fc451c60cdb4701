"""The csr Triton kernel (``Sparse`` in 1x1 blocks, float values) under the CPU interpreter, against
``x.float() @ enc.decode().T``, compiled ahead of time for sm_80 and sm_90, and end to end: SpQR's
outlier linears (quantize_gptq with ``outliers``) compiled for ``h100`` run in it, not decoded.

Tolerance: products and sums are fp32 and y is rounded once to x's dtype, so the error is within
two of x's epsilons of |y| (the interpreter may truncate to bf16 where a GPU rounds) plus fp32
rounding of the sum of |x| * |w|, which the reference adds in another order."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported, anywhere

import pytest                             # noqa: E402
import torch                              # noqa: E402

from tests import conftest                # noqa: E402

pytest.importorskip("triton")

import nnforge as nf                                                         # noqa: E402
from nnforge.backends.triton import TritonBackend                            # noqa: E402
from nnforge.backends.triton.capabilities import CAPABILITIES                # noqa: E402
from nnforge.backends.triton.kernels import Build, KernelError, PackedWeight, compile_many  # noqa: E402
from nnforge.backends.triton.kernels import csr                              # noqa: E402
from nnforge.ir import Dense, Graph, IntQuant, Sparse, run_graph, tensor     # noqa: E402
from nnforge.targets import get_target                                       # noqa: E402

from .aot import ARCHS, MAIN, SHARED_LIMIT                                   # noqa: E402


def _sparse(n: int, k: int, density: float, seed: int, dtype=torch.float32, *, empty_rows=(), full_row=None):
    """A random CSR weight: ``density`` of [n, k] kept, the rows in ``empty_rows`` keeping nothing
    and ``full_row`` keeping every value (many chunks of the kernel's loop)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 3
    keep = torch.rand(n, k, generator=g) < density
    keep[list(empty_rows)] = False
    if full_row is not None:
        keep[full_row] = True
    return Sparse.from_mask(w, keep, "block1x1", lambda v: Dense(v.to(dtype)))


def _check(y: torch.Tensor, x: torch.Tensor, enc: Sparse, bias=None) -> None:
    w = enc.decode().float()
    ref = x.float() @ w.T + (0 if bias is None else bias.float())
    eps = torch.finfo(x.dtype).eps
    bound = 2 * eps * ref.abs() + 8 * torch.finfo(torch.float32).eps * (x.float().abs() @ w.abs().T) + 1e-6
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


# (M, N, K, density, x dtype, value dtype, bias): decode, a few tokens, a prefill tile and one tile
# more; 0.5% to 5% kept
CASES = [(1, 640, 64, 0.05, torch.float16, torch.float32, False),
         (1, 64, 640, 0.005, torch.float32, torch.float32, True),
         (7, 96, 640, 0.01, torch.float16, torch.float16, True),
         (7, 64, 320, 0.05, torch.float32, torch.float16, False),
         (64, 64, 256, 0.02, torch.float16, torch.float32, False),
         (70, 48, 128, 0.05, torch.bfloat16, torch.bfloat16, True)]


@pytest.mark.parametrize("m, n, k, density, xdt, vdt, has_bias", CASES,
                         ids=[f"m{c[0]}-n{c[1]}-k{c[2]}-d{c[3]}-{str(c[4])[6:]}-{str(c[5])[6:]}" for c in CASES])
def test_matches_decode(m, n, k, density, xdt, vdt, has_bias):
    enc = _sparse(n, k, density, seed=m + n + k, dtype=vdt, empty_rows=(0, 5, n - 1), full_row=3)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(xdt)
    bias = torch.randn(n, generator=g).to(xdt) if has_bias else None
    y = csr.matmul(x, csr.pack(enc, "h100"), bias)
    _check(y, x, enc, bias)
    if bias is None:                           # rows that keep nothing are exactly zero
        assert y[:, [0, 5, n - 1]].abs().max() == 0


def test_leading_dims_strides_and_no_rows():
    enc = _sparse(32, 64, 0.05, seed=1)
    pw = csr.pack(enc, "a100")
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(2)).half()[..., ::2]
    y = csr.matmul(x, pw)
    assert y.shape == (2, 3, 32)
    _check(y.reshape(6, 32), x.reshape(6, 64), enc)
    assert csr.matmul(x[:0], pw).shape == (0, 3, 32)


def test_a_weight_with_nothing_kept():
    enc = _sparse(16, 32, 0.0, seed=3)
    pw = csr.pack(enc, "h100")
    assert pw.meta["nnz"] == 0
    bias = torch.randn(16).half()
    x = torch.randn(4, 32).half()
    assert torch.equal(csr.matmul(x, pw, bias), bias.expand(4, 16))


def test_pack_layout_is_the_documented_one():
    enc = _sparse(24, 48, 0.1, seed=4, dtype=torch.float16)
    pw = csr.pack(enc, "h100")
    assert (pw.format, pw.n, pw.k) == ("csr", 24, 48)
    t = pw.tensors
    assert t["values"].dtype == torch.float16 and t["col"].dtype == t["row_ptr"].dtype == torch.int32
    dense = torch.zeros(24, 48, dtype=torch.float16)
    for r in range(24):
        lo, hi = int(t["row_ptr"][r]), int(t["row_ptr"][r + 1])
        dense[r, t["col"][lo:hi].long()] = t["values"][lo:hi]
    assert torch.equal(dense, enc.decode())
    rebuilt = PackedWeight(pw.format, pw.n, pw.k, {k: v.clone() for k, v in t.items()}, dict(pw.meta))
    x = torch.randn(3, 48).half()
    assert torch.equal(csr.matmul(x, rebuilt), csr.matmul(x, pw))


def _w(n=16, k=32):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("enc, target, why", [
    (lambda: Sparse.from_mask(_w(), _w().abs() > 1, "block1x1"), "cpu", "not a Triton GPU target"),
    (lambda: Sparse.from_mask(_w(), (_w().reshape(16, 8, 4).abs().sum(-1) > 3).repeat_interleave(4, 1),
                              "block1x4"), "h100", "pattern block1x4: csr runs block1x1"),
    (lambda: Sparse.from_mask(_w(), _w().abs() > 1, "block1x1", row_scale=torch.ones(16)), "h100", "row_scale"),
    (lambda: Sparse.from_mask(_w(), _w().abs() > 1, "block1x1", lambda v: IntQuant.quantize(v, 8)), "h100",
     "csr runs float32, float16 or bfloat16 (Dense)"),
    (lambda: IntQuant.quantize(_w(), 4), "h100", "csr kernels take Sparse encodings"),
], ids=["cpu-target", "block1x4", "row-scale", "int8-values", "not-sparse"])
def test_unsupported_reasons(enc, target, why):
    got = csr.supports(enc(), target)
    assert got is not None and why in got, got
    with pytest.raises(KernelError, match="csr cannot pack"):
        csr.pack(enc(), target)


def test_the_capability_table_sends_csr_here_and_2_4_to_sparse24():
    target = get_target("h100")
    cap, _ = CAPABILITIES.find("linear", _sparse(16, 32, 0.05, seed=6), target)
    assert cap.accepts.module == "csr"
    keep = torch.tensor([True, True, False, False]).repeat(16, 8)
    cap, _ = CAPABILITIES.find("linear", Sparse.from_mask(_w(), keep, "2:4"), target)
    assert cap.accepts.module == "sparse24"


def test_matmul_errors():
    pw = csr.pack(_sparse(16, 32, 0.1, seed=7), "h100")
    x = torch.randn(2, 32).half()
    with pytest.raises(KernelError, match="x must be float16 or bfloat16 or float32, got torch.int32"):
        csr.matmul(x.int(), pw)
    with pytest.raises(KernelError, match="K=32"):
        csr.matmul(torch.randn(2, 16).half(), pw)
    bad = PackedWeight(pw.format, pw.n, pw.k, dict(pw.tensors, col=pw.tensors["col"].long()), pw.meta)
    with pytest.raises(KernelError, match="'col' is torch.int64"):
        csr.matmul(x, bad)
    with pytest.raises(KernelError, match="format 'csr'"):
        csr.matmul(x, PackedWeight("sparse24", pw.n, pw.k, pw.tensors, pw.meta))


# --- ahead of time, for the a100 and h100 architectures ------------------------------------------
AOT = [("fp16", "fp32", 1), ("bf16", "bf16", 64), ("fp32", "fp16", 8)]


def test_aot_compiles():
    builds, labels = [], []
    for arch in (a for a in ARCHS if a.name in MAIN):
        for xdt, vdt, bm in AOT:
            consts = dict(BM=bm, BNZ=csr.BLOCK_NZ, HAS_BIAS=True)
            builds.append(Build(csr.csr_kernel, csr.signature(xdt, vdt), consts, arch.sm, 4, 1,
                                ("stride_xm", "stride_ym")))
            labels.append((arch.sm, xdt, vdt, bm))
    for label, k in zip(labels, compile_many(builds)):
        assert not isinstance(k, Exception), (label, k)
        assert k.cubin and k.shared <= SHARED_LIMIT[label[0]], (label, k.shared)


# --- end to end ----------------------------------------------------------------------------------
D, FF = 64, 128


def test_a_graph_with_a_csr_linear_runs_the_kernel(tmp_path, monkeypatch):
    """An int4 linear plus a parallel CSR linear on the same input, added: both packed, no
    fallback, and the runner's output is the reference interpreter's."""
    g = Graph("outliers")
    x = g.add_input("x", tensor("f32", "batch", D))
    w = _w(FF, D)
    q = g.add_weight("fc.weight", IntQuant.quantize(w, 4, group_size=32))
    s = g.add_weight("fc.outliers.weight", _sparse(FF, D, 0.02, seed=8))
    y = g.op("add", g.op("linear", x, q, None, name="fc"), g.op("linear", x, s, None, name="fc.outliers"),
             name="fc.outliers_add")
    g.set_outputs([y])
    lowered = conftest.lower_into(TritonBackend(), g, "h100", tmp_path)
    assert lowered.fallbacks == []
    assert lowered.entry["linears"]["fc.outliers.weight"]["module"] == "csr"
    assert "csr" in lowered.entry["kernels"]
    calls = []
    kernel = csr.matmul
    monkeypatch.setattr(csr, "matmul", lambda *a: calls.append(a[1].n) or kernel(*a))
    xs = torch.randn(5, D, generator=torch.Generator().manual_seed(9))
    got, ref = TritonBackend().load(tmp_path, lowered.entry, "cpu")(xs), run_graph(g, [xs])[0]
    assert calls == [FF]
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2)


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(D, FF), torch.nn.Linear(FF, D), torch.nn.Linear(D, D)

    def forward(self, x):
        return self.fc3(torch.nn.functional.gelu(self.fc2(torch.nn.functional.gelu(self.fc1(x)))))


def test_gptq_outliers_compile_to_the_kernel(tmp_path):
    """quantize_gptq with outliers, compiled for h100: the outlier linears are packed for the csr
    kernel, none is a fallback, and the bundle runs like the interpreter on its graph."""
    g = torch.Generator().manual_seed(10)
    calib = [(torch.randn(16, D, generator=g),) for _ in range(4)]
    recipe = [{"pass": "quantize_gptq", "format": "uint4", "group_size": 32, "outliers": 0.02}]
    bundle = nf.compile(Mlp().eval(), "h100", recipe, example_inputs=calib[0], calibration=calib,
                        out=tmp_path / "mlp")
    graph = bundle.graph()
    outliers = [n.inputs[1].name for n in graph.nodes if n.op == "linear" and isinstance(n.inputs[1].encoding, Sparse)]
    assert len(outliers) == 2                               # fc1 and fc2; fc3's output is the graph's
    entry = bundle.manifest["backend"]["entry"]
    assert all(entry["linears"][w]["module"] == "csr" for w in outliers)
    fallbacks = bundle.manifest["fallbacks"]
    assert not {f["where"] for f in fallbacks} & set(outliers), fallbacks
    x = torch.randn(3, D, generator=g)
    got = TritonBackend().load(bundle.path, entry, "cpu")(x)
    torch.testing.assert_close(got, run_graph(graph, [x])[0], rtol=0, atol=2e-2)

"""The triton backend against the reference interpreter, on the CPU in Triton's interpreter.

A one-layer transformer block (hidden 64, seq <= 8) is compiled for ``h100`` and ``a100`` with
several recipes, loaded with ``device="cpu"`` under ``TRITON_INTERPRET=1`` and compared with
``Interpreter(bundle.graph())``. The interpreter counts as the targets' "cuda" requirement, so
``nf.compile`` runs (and records) its numerics check here and ``nf.load`` / ``nf.verify`` work; the
fp8-w8a8 preset takes the fp8 x fp8 path on h100 only; every encoded linear of these recipes must
reach its kernel module on both targets. Also: the reported fallback of a weight no kernel takes, the packed
path end to end through a stand-in kernel module written here (so it runs whichever real
modules exist), the kernel-source checks at load, the device rules, input errors, no half-written
bundle on a lowering error, and the shape-keyed cache behind CUDA graphs (with a fake capture;
the capture itself needs a GPU).

Tolerances: the launcher runs linears and matmuls on fp16 operands with fp32 accumulation and
everything else in fp32, so outputs are held to the compile-time numerics check's cosine
(>= 0.9999, ``nnforge.numerics.BACKEND_TOLERANCE``) and a max abs error of 2e-2 on these
layer-normed outputs (fp16 keeps 11 bits: ~5e-4 relative per rounding, a few dozen roundings deep).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported, anywhere

import importlib                          # noqa: E402
import importlib.util                     # noqa: E402
import json                               # noqa: E402
import sys                                # noqa: E402
from pathlib import Path                  # noqa: E402

import numpy as np                        # noqa: E402
import pytest                             # noqa: E402
import torch                              # noqa: E402

from tests import conftest                # noqa: E402

pytest.importorskip("triton")

import nnforge as nf                                                         # noqa: E402
from nnforge.backends.base import BackendError, Capability, get_backend     # noqa: E402
from nnforge.backends.triton import TritonBackend                           # noqa: E402
from nnforge.backends.triton.capabilities import CAPABILITIES, Kernel       # noqa: E402
from nnforge.backends.triton import lower as lower_mod                      # noqa: E402
from nnforge.backends.triton.launcher import Launcher, ShapeCache           # noqa: E402
from nnforge.ir import Interpreter                                          # noqa: E402
from nnforge.numerics import BACKEND_TOLERANCE                              # noqa: E402

COS_MIN = BACKEND_TOLERANCE["cosine_min"]
MAX_ABS = 2e-2
# fp8-w8a8, largest error relative to max|reference|: test_minifloat's 3e-3 per fp16 GEMM, plus the
# activations that fp16 upstream moves across an E4M3 rounding boundary (one E4M3 step, 2^-4 of
# that element, either way): 1e-2 over the block's four linears.
FP8_TOL = 1e-2
D, FF, SEQ = 64, 128, 8


class Block(torch.nn.Module):
    """Single-head self-attention and a GELU MLP, each with a residual and a layer norm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.proj = torch.nn.Linear(D, D)
        self.up = torch.nn.Linear(D, FF)
        self.down = torch.nn.Linear(FF, D)
        self.ln1, self.ln2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / 8.0, dim=-1)
        h = self.ln1(x + self.proj(att @ v))
        return self.ln2(h + self.down(torch.nn.functional.gelu(self.up(h))))


def _x(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, seq, D, generator=torch.Generator().manual_seed(seed))


def _kernel(name: str):
    """A kernel module: all of them ship with nnforge, so one that fails to import fails the test."""
    return importlib.import_module(f"nnforge.backends.triton.kernels.{name}")


def compile_block(tmp_path: Path, target: str, recipe, model=None):
    from torch.export import Dim
    model = model or Block().eval()
    calib = [(_x(2, SEQ, 100 + i),) for i in range(4)]
    return nf.compile(model, target, recipe, example_inputs=(_x(2, SEQ, 0),), calibration=calib,
                      dynamic_shapes=({0: Dim("batch", max=16), 1: Dim("seq", max=SEQ)},),
                      out=tmp_path / f"{target}-{recipe}")


def load(bundle, device="cpu"):
    return get_backend("triton").load(bundle.path, bundle.manifest["backend"]["entry"], device)


def assert_close(got, ref: torch.Tensor, what: str):
    got = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, got.dtype)
    cos = float(torch.nn.functional.cosine_similarity(got.double().reshape(-1), ref.double().reshape(-1), dim=0))
    err = float((got - ref).abs().max())
    assert cos >= COS_MIN and err <= MAX_ABS, f"{what}: cosine {cos:.6f}, max abs error {err:.3g}"


# recipe -> the kernel module that should take its linear weights (None: dense, no kernel)
RECIPES = {"fp32": None, "w8": "intweight", "w4-rtn": "intweight", "w4-gptq": "intweight", "fp8": "minifloat",
           "nvfp4": "minifloat", "mxfp4": "minifloat", "palettize-4": "lut", "sparse24": "sparse24",
           "sparse24-w4": "sparse24"}


# a100 differs from h100 in its capability rows (no FP8 tensor cores) and tile choices: the default run
# takes it with an FP8 and an integer recipe, the rest under -m slow
A100_DEFAULT = ("fp8", "w4-gptq")


@pytest.mark.parametrize("recipe, target", [
    *[(r, "h100") for r in RECIPES],
    *[pytest.param(r, "a100", marks=() if r in A100_DEFAULT else pytest.mark.slow) for r in RECIPES]],
    ids=lambda x: x)
def test_compiled_block_matches_interpreter(tmp_path, target, recipe):
    module_name = RECIPES[recipe]
    bundle = compile_block(tmp_path, target, recipe)
    m, entry = bundle.manifest, bundle.manifest["backend"]["entry"]
    # the interpreter meets the targets' "cuda" requirement: the compile-time check ran, and passed
    assert m["numerics"]["runtime_checked"] is True and "backend_vs_reference" in m["numerics"], m["numerics"]
    encoded = {layer["weight"] for layer in m["compression"]["layers"] if not layer["encoding"].startswith("dense")}
    fallen = {f["where"] for f in m["fallbacks"]}
    assert set(entry["linears"]) | fallen == encoded and not set(entry["linears"]) & fallen
    if module_name is not None:
        _kernel(module_name)
        assert set(entry["linears"]) == encoded, m["fallbacks"]
        assert {s["module"] for s in entry["linears"].values()} == {module_name}, m["fallbacks"]
    for spec in entry["linears"].values():
        src = entry["kernels"][spec["module"]]
        assert src["file"] in m["files"] and m["files"][src["file"]]["sha256"] == src["sha256"]
    assert ("triton_weights.safetensors" in m["files"]) == bool(entry["linears"])
    runner = nf.load(bundle.path)          # the CPU, under the interpreter
    graph = bundle.graph()
    for batch, seq in ((1, 1), (2, SEQ), (3, 5)):
        x = _x(batch, seq, batch * 10 + seq)
        ref = Interpreter(graph).run(x)[0]
        got = runner(x)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert_close(got, ref, f"{recipe} on {target} at batch {batch} seq {seq}")
    report = nf.verify(bundle.path)
    assert report["passed"] and isinstance(report["runtime_vs_expected"], dict), report


@pytest.mark.parametrize("target", ["h100", "a100"])
def test_fp8_w8a8_runs_fp8_x_fp8_on_h100_only(tmp_path, target, monkeypatch):
    """fp8-w8a8 (e4m3 weights per channel, e4m3 activations with a static scale): on h100 every
    linear behind an E4M3 fake_quant is marked at lowering and runs matmul_fp8act on the fake_quant's
    input; a100 has no fp8 MMA and keeps the weight-only kernel. Both match the reference within
    the backend's tolerance (the fp8 operands are exactly the fake_quant's values, so what is left
    is fp16 rounding and E4M3 boundary flips: FP8_TOL)."""
    mk = _kernel("minifloat")
    bundle = compile_block(tmp_path, target, "fp8-w8a8")
    entry = bundle.manifest["backend"]["entry"]
    assert bundle.manifest["numerics"]["runtime_checked"] is True
    fp8 = entry["fp8_linears"]
    if target == "h100":
        assert {r["weight"] for r in fp8.values()} == set(entry["linears"]) == {
            "qkv.weight", "proj.weight", "up.weight", "down.weight"}
        graph = bundle.graph()
        assert all(graph.node(r["quant"]).op == "fake_quant" for r in fp8.values())
    else:
        assert fp8 == {}
    calls = []
    real = mk.matmul_fp8act
    monkeypatch.setattr(mk, "matmul_fp8act", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    runner = nf.load(bundle.path)
    x = _x(2, 5, 11)
    ref = Interpreter(bundle.graph()).run(x)[0]
    got = runner(x)
    cos = float(torch.nn.functional.cosine_similarity(got.double().reshape(-1), ref.double().reshape(-1), dim=0))
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert cos >= COS_MIN and rel <= FP8_TOL, (target, cos, rel)
    assert len(calls) == (len(fp8) if target == "h100" else 0)


def test_weight_no_kernel_takes_is_a_reported_fallback(tmp_path):
    bundle = compile_block(tmp_path, "h100", "w3-gptq")
    fallbacks = {f["where"]: f for f in bundle.manifest["fallbacks"]}
    assert set(fallbacks) == {"qkv.weight", "proj.weight", "up.weight", "down.weight"}
    f = fallbacks["up.weight"]
    assert "u3" in f["what"] and "up" in f["what"] and "decoded" in f["action"]
    assert "intweight: 3-bit codes" in f["action"], f["action"]         # the int row's reason
    assert bundle.manifest["backend"]["entry"]["linears"] == {}
    x = _x(1, 4, 3)
    assert_close(load(bundle)(x), Interpreter(bundle.graph()).run(x)[0], "w3-gptq fallback")


def test_act_order_weight_lowered_outside_a_bundle(tmp_path):
    """An int4 act-order (GPTQ) weight built by hand, lowered straight into a directory: the
    launcher hands x in original column order to the kernel, which applies the permutation."""
    import dataclasses
    from nnforge.ir import Graph, IntQuant, tensor
    from nnforge.targets import get_target
    gen = torch.Generator().manual_seed(0)
    w, perm = torch.randn(32, D, generator=gen), torch.randperm(D, generator=gen)
    enc = dataclasses.replace(IntQuant.quantize(w[:, perm], 4, group_size=32, symmetric=False), perm=perm)
    g = Graph("actorder")
    x = g.add_input("x", tensor("f32", "batch", D))
    g.set_outputs([g.op("linear", x, g.add_weight("fc.weight", enc), None, name="fc")])
    backend = TritonBackend()
    lowered = conftest.lower_into(backend, g, "h100", tmp_path)
    assert lowered.fallbacks == [] and lowered.entry["linears"]["fc.weight"]["module"] == "intweight"
    assert "triton_weights.safetensors" in set(lowered.files)
    xs = torch.randn(3, D, generator=gen)
    assert_close(backend.load(tmp_path, lowered.entry, "cpu")(xs), Interpreter(g).run(xs)[0], "act-order int4")


def test_bfloat16_compute_option(tmp_path):
    import dataclasses
    from nnforge.ir import Dense, Graph, IntQuant, tensor
    from nnforge.targets import get_target
    gen = torch.Generator().manual_seed(1)
    g = Graph("bf16")
    x = g.add_input("x", tensor("f32", "batch", D))
    h = g.op("linear", x, g.add_weight("a.weight", IntQuant.quantize(torch.randn(D, D, generator=gen), 8)), None)
    g.set_outputs([g.op("linear", g.op("relu", h), g.add_weight("b.weight", Dense(torch.randn(16, D, generator=gen))))])
    h100 = get_target("h100")
    bf16 = dataclasses.replace(h100, options={**h100.options, "compute_dtype": "bfloat16"})
    (tmp_path / "ok").mkdir()
    lowered = conftest.lower_into(TritonBackend(), g, bf16, tmp_path / "ok")
    assert lowered.entry["compute_dtype"] == "bfloat16"
    assert set(lowered.entry["linears"]) == {"a.weight"}
    xs = torch.randn(2, D, generator=gen)
    got, ref = TritonBackend().load(tmp_path / "ok", lowered.entry, "cpu")(xs), Interpreter(g).run(xs)[0]
    cos = float(torch.nn.functional.cosine_similarity(got.reshape(-1), ref.reshape(-1), dim=0))
    assert got.dtype == torch.float32 and cos >= 0.999, cos         # bf16 keeps 8 bits, fp16 11
    bad = dataclasses.replace(h100, options={**h100.options, "compute_dtype": "float8"})
    with pytest.raises(BackendError, match="target h100 .*compute_dtype must be one of float16, bfloat16"):
        conftest.lower_into(TritonBackend(), g, bad, tmp_path / "bad")


# --- the packed path through a stand-in kernel module --------------------------------------------
FAKE_SOURCE = '''"""Stand-in kernel for the backend tests: int8 IntQuant weights, stored decoded in fp16."""
import torch
from nnforge.backends.triton.kernels import PackedWeight
from nnforge.ir import IntQuant

FORMAT = "fake-w8"
CALLS = []


def supports(enc, target):
    return None if isinstance(enc, IntQuant) and enc.bits == 8 else "fake runs 8-bit IntQuant only"


def pack(enc, target):
    w = enc.decode(torch.float32)
    if PACK_FAILS:
        raise ValueError("pack exploded")
    return PackedWeight(FORMAT, w.shape[0], w.shape[1], {"w": w.half(), "s": torch.ones(1)}, {"target": target})


def matmul(x, w, bias=None):
    assert x.dtype == torch.float16 and x.dim() == 2 and w.tensors["w"].dtype == torch.float16
    CALLS.append((tuple(x.shape), w.n, w.k))
    y = (x.float() @ w.tensors["w"].float().T).to(x.dtype)
    return y if bias is None else y + bias


PACK_FAILS = False
'''


@pytest.fixture
def fake_kernel(tmp_path, monkeypatch):
    """A kernel module ``fake`` in the kernel package, whose row comes first in the capability table."""
    path = tmp_path / "fake_kernel" / "fake.py"
    path.parent.mkdir()
    path.write_text(FAKE_SOURCE)
    name = f"{lower_mod.KERNEL_PACKAGE}.fake"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(CAPABILITIES, "rows", [Capability("linear", "int", "fake", Kernel("fake"))] + CAPABILITIES.rows)
    return module


def test_packed_weights_run_through_the_kernel_module(tmp_path, fake_kernel):
    bundle = compile_block(tmp_path, "a100", "w8")
    entry = bundle.manifest["backend"]["entry"]
    assert set(entry["linears"]) == {"qkv.weight", "proj.weight", "up.weight", "down.weight"}
    spec = entry["linears"]["up.weight"]
    assert spec == {"module": "fake", "format": "fake-w8", "n": FF, "k": D, "meta": {"target": "a100"},
                    "tensors": {"w": "up.weight.w", "s": "up.weight.s"}}
    assert set(entry["kernels"]) == {"__init__", "common", "fake"} and bundle.manifest["fallbacks"] == []
    assert (bundle.path / "kernels" / "fake.py").read_text() == FAKE_SOURCE
    from safetensors import safe_open
    with safe_open(str(bundle.path / "triton_weights.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(k for s in entry["linears"].values() for k in s["tensors"].values())
    runner = load(bundle)
    x = _x(2, 5, 7)
    fake_kernel.CALLS.clear()
    got = runner(x.numpy())                 # numpy in, numpy out
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert_close(torch.from_numpy(got), Interpreter(bundle.graph()).run(x)[0], "fake kernel")
    assert sorted(fake_kernel.CALLS) == sorted([((10, D), 3 * D, D), ((10, D), D, D), ((10, D), FF, D),
                                                ((10, FF), D, FF)])


def test_load_refuses_a_changed_kernel_source(tmp_path, fake_kernel):
    bundle = compile_block(tmp_path, "h100", "w8")
    entry = bundle.manifest["backend"]["entry"]
    src = bundle.path / "kernels" / "fake.py"
    src.write_text(FAKE_SOURCE + "# edited\n")
    with pytest.raises(BackendError, match=r"kernels/fake\.py: sha256 differs"):
        get_backend("triton").load(bundle.path, entry, "cpu")
    # a bundle consistent in itself but built by another kernel source than the installed one
    import hashlib
    other = json.loads(json.dumps(entry))
    other["kernels"]["fake"]["sha256"] = hashlib.sha256(src.read_bytes()).hexdigest()
    with pytest.raises(BackendError, match="different .*fake than the one installed.*recompile"):
        get_backend("triton").load(bundle.path, other, "cpu")


def test_failed_lowering_leaves_no_bundle(tmp_path, fake_kernel, monkeypatch):
    monkeypatch.setattr(fake_kernel, "PACK_FAILS", True)
    with pytest.raises(BackendError, match=r"weight qkv\.weight .* pack\(\) failed: ValueError: pack exploded"):
        compile_block(tmp_path, "h100", "w8")
    assert list(tmp_path.iterdir()) == [tmp_path / "fake_kernel"]      # neither the bundle nor its temp dir


# --- devices and inputs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory):
    return compile_block(tmp_path_factory.mktemp("fp32"), "h100", "fp32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_or_the_interpreter_load_says_what_is_needed(fp32_bundle, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(Exception, match="CUDA GPU.*TRITON_INTERPRET=1") as err:      # both ways named
        nf.load(fp32_bundle.path)
    assert "interpreter" in str(err.value) or "CPU" in str(err.value), err.value
    for device in (None, "cpu"):
        with pytest.raises(BackendError, match="needs a CUDA GPU.*TRITON_INTERPRET=1"):
            load(fp32_bundle, device)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendError, match="no CUDA GPU is visible"):
        load(fp32_bundle, "cuda")
    with pytest.raises(BackendError, match="runs on"):
        load(fp32_bundle, "mps")
    assert load(fp32_bundle, None).device.type == "cpu"       # None -> the CPU, under the interpreter


def test_bad_inputs_are_backend_errors_naming_the_input(fp32_bundle):
    runner = load(fp32_bundle)
    assert runner.input_names == ["x"] and [i.dims for i in runner.inputs] == [("batch", "seq", D)]
    with pytest.raises(BackendError, match="missing input"):
        runner({"y": _x(1, 2, 0)})
    with pytest.raises(BackendError, match="input x: expected rank 3"):
        runner(torch.zeros(2, D))
    with pytest.raises(BackendError, match="input x: dim 2 must be 64"):
        runner(torch.zeros(1, 2, D + 1))
    with pytest.raises(BackendError, match="input x: expected float32, got int64"):
        runner(torch.zeros(1, 2, D, dtype=torch.int64))
    with pytest.raises(BackendError, match="takes 1 inputs"):
        runner(_x(1, 2, 0), _x(1, 2, 0))
    with pytest.raises(BackendError, match="input x: expected dtype float32"):      # run_torch checks too
        runner.run_torch(_x(1, 2, 0).double())


def test_entry_and_registry(fp32_bundle):
    backend = get_backend("triton")
    assert isinstance(backend, TritonBackend) and backend.capabilities is CAPABILITIES
    m = fp32_bundle.manifest
    entry = m["backend"]["entry"]
    assert entry["graph"] == "graph.json" and entry["weights"] == "weights.safetensors" and entry["packed"] is None
    assert entry["compute_dtype"] == "float16" and entry["compute_capability"] == "9.0" and entry["cuda_graphs"]
    assert entry["inputs"] == [{"name": "x", "dtype": "float32", "dims": ["batch", "seq", D]}]
    assert m["backend"]["files"] == [] and m["toolchain"]["triton"]     # dense weights are read in place
    assert load(fp32_bundle).launcher.graphs is None                  # no CUDA graphs off CUDA


# --- CUDA graphs: the shape-keyed cache (capture itself needs a GPU) ----------------------------------
def test_shape_cache_captures_once_per_signature_and_replays():
    captured, eager = [], []

    def capture(inputs):
        captured.append(ShapeCache.key(inputs))
        if inputs[0].shape[1] == 3:
            raise RuntimeError("operation not permitted when stream is capturing")
        return lambda new: ["replay", new[0].shape]

    cache = ShapeCache(lambda inputs: eager.append(inputs[0].shape) or ["eager"], capture, max_entries=2,
                       capture_after=1)
    a, b, c = torch.zeros(1, 1, 4), torch.zeros(1, 2, 4), torch.zeros(1, 3, 4)
    assert cache([a]) == ["replay", a.shape] and cache([a]) == ["replay", a.shape]
    assert cache([b])[0] == "replay" and len(captured) == 2
    assert cache([c]) == ["eager"] and cache([c]) == ["eager"] and len(captured) == 3   # not retried
    assert "stream is capturing" in cache.failed[ShapeCache.key([c])]
    cache([a])                                                    # a becomes the most recent
    cache([a.half()])                                             # dtype is part of the key; evicts b
    assert ShapeCache.key([b]) not in cache.entries and len(cache.entries) == 2
    cache([b])
    assert len(captured) == 5 and eager == [c.shape, c.shape]


def test_shape_cache_captures_a_signature_only_once_it_repeats():
    captured = []
    cache = ShapeCache(lambda inputs: ["eager"], lambda inputs: captured.append(1) or (lambda new: ["replay"]))
    for seq in range(1, 6):          # a growing decode: every shape new, nothing worth capturing
        assert cache([torch.zeros(1, seq)]) == ["eager"]
    assert captured == [] and cache([torch.zeros(1, 3)]) == ["replay"] and cache([torch.zeros(1, 3)]) == ["replay"]
    assert captured == [1]


def test_launcher_sends_only_batch_one_calls_to_the_graph_cache(fp32_bundle):
    launcher: Launcher = load(fp32_bundle).launcher
    seen = []
    launcher.graphs = ShapeCache(launcher._eager, lambda inputs: seen.append(inputs[0].shape) or launcher._eager,
                                 capture_after=1)
    x1, x2 = _x(1, 4, 0), _x(2, 4, 0)
    ref = Interpreter(fp32_bundle.graph()).run(x1)[0]
    assert_close(launcher([x1])[0], ref, "batch 1 through the cache")
    launcher([x2])
    launcher([x1])
    assert seen == [x1.shape]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")
def test_cuda_graph_replay_matches_eager(fp32_bundle):
    runner = load(fp32_bundle, "cuda")
    x = _x(1, 4, 0).cuda()
    want = runner.launcher._eager([x])[0]
    for _ in range(3):               # eager, then captured on the second sight and replayed
        assert torch.equal(runner.run_torch(x)[0], want)
    assert len(runner.launcher.graphs.entries) == 1 and not runner.launcher.graphs.failed

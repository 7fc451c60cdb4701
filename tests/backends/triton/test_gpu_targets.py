"""A GPU target added as one TOML file, with no code: ``fixtures/l40s.toml`` (Ada, sm_89, fp8 tensor
cores) and ``fixtures/rtx3090.toml`` (Ampere GA102, sm_86, none), reached through
NNFORGE_TARGETS_PATH, compile bundles that run under Triton's interpreter and match the reference;
what the kernels do for them (tiles, SM count, the fp8 path) follows their TOML and their
architecture file, never their name. Also: the GPU view of a device, and the errors of files that
lack what the kernels read.

Tolerances are test_triton_backend's (it holds the same block to the same checks)."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported, anywhere

import dataclasses                        # noqa: E402
from pathlib import Path                  # noqa: E402

import pytest                             # noqa: E402
import torch                              # noqa: E402

from tests import conftest                # noqa: E402

pytest.importorskip("triton")

import nnforge as nf                                                        # noqa: E402
from nnforge.backends.base import BackendError                             # noqa: E402
from nnforge.backends.triton import TritonBackend                          # noqa: E402
from nnforge.backends.triton.kernels import KernelError                    # noqa: E402
from nnforge.backends.triton.kernels import intweight as iw, minifloat as mk, sparse24 as s24  # noqa: E402
from nnforge.backends.triton.kernels.common import (INTERP_GPU, TileConfig, device_gpu, gpu_target,  # noqa: E402
                                                    runtime_target)
from nnforge.ir import Interpreter                                         # noqa: E402
from nnforge.targets import PATH_ENV, get_target                           # noqa: E402
from nnforge.targets.architectures import arch_for_capability, parse_arch  # noqa: E402

from .test_triton_backend import COS_MIN, FP8_TOL, _x, assert_close, compile_block  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixture_targets(monkeypatch):
    monkeypatch.setenv(PATH_ENV, str(FIXTURES))


def test_fixture_targets_are_found_and_read_from_their_files(fixture_targets):
    l40s, rtx = get_target("l40s"), get_target("rtx3090")
    assert l40s.path == str(FIXTURES / "l40s.toml") and l40s.can_run()[0]       # the interpreter counts as cuda
    for t, arch, sms, fp8 in ((l40s, "sm_89", 142, True), (rtx, "sm_86", 82, False)):
        gpu = gpu_target(t.name)
        assert (gpu.name, gpu.arch.name, gpu.sms, gpu.native_fp8) == (t.name, arch, sms, fp8)
        assert iw.config_for(t.name, 4) == TileConfig(*gpu.arch.tiles["intweight"]["decode"][0])
        assert s24.candidates_for(t.name, 64) == tuple(TileConfig(*r) for r in gpu.arch.tiles["sparse24"]["gemm"])


def test_without_the_path_the_fixtures_are_unknown():
    with pytest.raises(Exception, match="unknown target 'l40s'"):
        get_target("l40s")


def test_the_fp8_path_follows_the_architecture_file(fixture_targets):
    from nnforge.passes.quantize.formats import parse_format, quantize_rtn
    enc = quantize_rtn(torch.randn(64, 128), parse_format("e4m3"))
    assert mk.supports(enc, "l40s", activations="e4m3") is None
    why = mk.supports(enc, "rtx3090", activations="e4m3")
    assert "rtx3090 (sm_86" in why and "lacks" in why and "sm_89" in why, why
    # a target is only its data: the same TOML under another name gets the same answers
    renamed = dataclasses.replace(get_target("rtx3090"), name="anything")
    assert mk.supports(enc, renamed, activations="e4m3") == why.replace("rtx3090 (", "anything (")


@pytest.mark.parametrize("recipe, module", [("fp8", "minifloat"), ("w4-gptq", "intweight")])
def test_l40s_bundle_runs_and_matches_the_reference(tmp_path, fixture_targets, recipe, module):
    bundle = compile_block(tmp_path, "l40s", recipe)
    m, entry = bundle.manifest, bundle.manifest["backend"]["entry"]
    assert m["target"]["name"] == "l40s" and entry["compute_capability"] == "8.9"
    assert m["numerics"]["runtime_checked"] is True and m["fallbacks"] == []
    assert set(entry["linears"]) == {"qkv.weight", "proj.weight", "up.weight", "down.weight"}
    assert {s["module"] for s in entry["linears"].values()} == {module}
    assert {s["meta"]["target"] for s in entry["linears"].values()} == {"l40s"}
    runner = nf.load(bundle.path)
    graph = bundle.graph()
    for batch, seq in ((1, 1), (3, 5)):
        x = _x(batch, seq, batch * 10 + seq)
        assert_close(runner(x), Interpreter(graph).run(x)[0], f"{recipe} on l40s at batch {batch} seq {seq}")
    assert nf.verify(bundle.path)["passed"]


@pytest.mark.parametrize("target, fp8", [("l40s", True), ("rtx3090", False)])
def test_fp8_w8a8_takes_fp8_tensor_cores_only_where_the_toml_has_them(tmp_path, fixture_targets, monkeypatch,
                                                                      target, fp8):
    bundle = compile_block(tmp_path, target, "fp8-w8a8")
    entry = bundle.manifest["backend"]["entry"]
    assert set(entry["linears"]) == {"qkv.weight", "proj.weight", "up.weight", "down.weight"}
    assert ({r["weight"] for r in entry["fp8_linears"].values()} == set(entry["linears"])) if fp8 else \
        entry["fp8_linears"] == {}
    calls = []
    real = mk.matmul_fp8act
    monkeypatch.setattr(mk, "matmul_fp8act", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x = _x(2, 5, 11)
    got, ref = nf.load(bundle.path)(x), Interpreter(bundle.graph()).run(x)[0]
    cos = float(torch.nn.functional.cosine_similarity(got.double().reshape(-1), ref.double().reshape(-1), dim=0))
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert cos >= COS_MIN and rel <= FP8_TOL, (target, cos, rel)
    assert len(calls) == (4 if fp8 else 0)


# --- the GPU view of a device (no GPU needed: its properties are given) ------------------------------
def test_a_device_gets_its_own_sm_count_and_its_architecture_tiles():
    ada = device_gpu("NVIDIA L40S", (8, 9), 142)
    assert (ada.name, ada.sms, ada.arch.name, ada.native_fp8) == ("NVIDIA L40S", 142, "sm_89", True)
    orin = device_gpu("Orin", (8, 7), 16)                 # no sm_87 file: the newest older architecture
    assert orin.arch.name == "sm_86" and not orin.native_fp8
    with pytest.raises(KernelError, match=r"T4: compute capability 7\.5 is older than every GPU architecture"):
        device_gpu("T4", (7, 5), 40)


def test_the_interpreter_is_a_gpu_without_an_architecture():
    assert runtime_target(torch.zeros(1)) is INTERP_GPU and INTERP_GPU.interpreter and not INTERP_GPU.native_fp8
    assert gpu_target("interp") is INTERP_GPU


# --- files that lack what the kernels read ------------------------------------------------------------
def test_an_architecture_file_without_a_kernel_family_is_an_error_naming_it(tmp_path, monkeypatch):
    gpu_dir = tmp_path / "gpu"
    gpu_dir.mkdir()
    text = (Path(arch_for_capability((8, 9)).path)).read_text()
    (gpu_dir / "sm_89.toml").write_text(text)           # the same capability twice: refused
    monkeypatch.setenv(PATH_ENV, str(tmp_path))
    with pytest.raises(Exception, match="compute capability 8.9 is already described"):
        get_target("h100")
    (gpu_dir / "sm_89.toml").unlink()
    cut = text.replace("compute_capability = \"8.9\"", "compute_capability = \"7.5\"").replace('"sm_89"', '"sm_75"')
    cut = cut[:cut.index("[tiles.lut]")] + "[tiles.lutt]\ndecode = [[16, 64, 128, 4, 4]]\n"
    (gpu_dir / "sm_75.toml").write_text(cut)
    arch = parse_arch(gpu_dir / "sm_75.toml")
    with pytest.raises(KernelError, match=r"sm_75.toml: .*\[tiles.lut\] has no decode.*\[tiles.lutt\] is not a kernel"):
        device_gpu("T4", (7, 5), 40)
    assert arch.name == "sm_75"


def test_lowering_refuses_a_gpu_target_without_an_sm_count(tmp_path, fixture_targets):
    from nnforge.ir import Graph, IntQuant, tensor
    g = Graph("one")
    x = g.add_input("x", tensor("f32", "batch", 64))
    g.set_outputs([g.op("linear", x, g.add_weight("fc.weight", IntQuant.quantize(torch.randn(32, 64), 8)), None)])
    l40s = get_target("l40s")
    no_sms = dataclasses.replace(l40s, compute={k: v for k, v in l40s.compute.items() if k != "sms"})
    with pytest.raises(BackendError, match=r"target l40s: .*l40s.toml: target l40s states no \[compute\] sms"):
        conftest.lower_into(TritonBackend(), g, no_sms, tmp_path)

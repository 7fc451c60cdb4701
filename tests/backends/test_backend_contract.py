"""Adding a backend is its folder and one registration line: tests/backends/toy is a backend that
nnforge does not ship, registered here in one line, with a target file on NNFORGE_TARGETS_PATH; a
model compiles for it through the same pipeline, loads, runs and verifies like any bundle, and
``nnforge targets --explain`` reads its capability table."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nnforge as nf
from nnforge.backends.base import BACKENDS, _LOADED, register_backend
from nnforge.cli import explain_target
from nnforge.targets import PATH_ENV

from tests.conftest import tiny_mlp

TOY = Path(__file__).parent / "toy"


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setenv(PATH_ENV, str(TOY / "targets"))
    register_backend("toy", "tests.backends.toy:ToyBackend")          # the one registration line
    yield
    BACKENDS.pop("toy", None)
    _LOADED.pop("toy", None)


def test_a_backend_outside_nnforge_compiles_runs_and_verifies(toy, tmp_path):
    x = torch.randn(4, 16)
    calib = [(torch.randn(8, 16),) for _ in range(4)]
    bundle = nf.compile(tiny_mlp(), "toy", example_inputs=(x,), calibration=calib, out=tmp_path / "b",
                        dynamic_shapes=({0: torch.export.Dim("batch")},), batch_sizes=())
    m = bundle.manifest
    assert m["backend"]["name"] == "toy" and m["numerics"]["runtime_checked"]
    assert m["numerics"]["backend_vs_reference"]["cosine_min"] > 0.9999
    assert sorted(m["backend"]["files"]) == ["toy/program.json", "toy/weights.npz"]
    with torch.no_grad():
        torch.testing.assert_close(nf.load(bundle.path)(x), tiny_mlp()(x), rtol=1e-4, atol=1e-5)
    assert nf.verify(bundle.path)["passed"]


def test_explain_reads_the_backends_capability_table(toy):
    text = "\n".join(explain_target("toy"))
    assert "backend: toy; runs here: yes" in text and "linear  dense       numpy matmul in float32" in text


def test_an_unregistered_backend_is_named_with_the_known_ones(monkeypatch):
    monkeypatch.setenv(PATH_ENV, str(TOY / "targets"))
    with pytest.raises(nf.NnforgeError, match="unknown backend 'toy'; known: coreml, hls, mlir, onnx, triton, tvm"):
        nf.compile(tiny_mlp(), "toy", example_inputs=(torch.randn(2, 16),))


# --- encoded KV caches: refused by every backend whose capability table lacks them ------------------
@pytest.fixture(scope="module")
def kv8_llama():
    from nnforge.frontend.decoders import build, load_causal_lm, spec_from_config
    from nnforge.passes import PassContext, PassManager
    from nnforge.passes.kvcache import EncodeKVCache
    from tests.frontend.decoders.families import tiny_model
    loaded = load_causal_lm(tiny_model("llama"))
    graph = build(spec_from_config(loaded.config, max_len=16), loaded.weights, 16)
    return PassManager([EncodeKVCache(encoding="kv8", exclude=["cache.1.*"])]).run(graph, PassContext())


@pytest.mark.parametrize("backend,target", [("coreml", "apple-a17")])
def test_a_backend_without_kv8_refuses_an_encoded_kv_cache_naming_the_layer_and_encoding(kv8_llama, backend, target):
    from nnforge.backends.base import BackendError, get_backend
    from nnforge.targets import get_target
    with pytest.raises(BackendError) as e:
        get_backend(backend).check_cache_encodings(kv8_llama, get_target(target))
    msg = str(e.value)
    assert f"the {backend} backend cannot run the encoded KV cache of 2 cache(s)" in msg
    assert "cache.0.k of layer model.layers.0.self_attn (kv8: " in msg and "cache.0.v of layer" in msg
    assert "cache.1" not in msg and "without the KV-cache encoding" in msg


@pytest.mark.parametrize("backend,target", [("onnx", "onnx"), ("tvm", "cpu"), ("triton", "h100"), ("mlir", "mlir"),
                                            ("hls", "alveo-u280"), ("hls", "versal-vhk158")])
def test_the_backends_that_run_encoded_caches_take_them(kv8_llama, backend, target):
    from nnforge.backends.base import get_backend
    from nnforge.targets import get_target
    get_backend(backend).check_cache_encodings(kv8_llama, get_target(target))


def test_a_backend_whose_table_has_the_rows_takes_the_cache(kv8_llama):
    from nnforge.backends.base import Capabilities, Capability, get_backend
    from nnforge.targets import get_target

    class Runs(type(get_backend("onnx"))):
        capabilities = Capabilities([Capability("kv_cache_write", "kv8", "int8 codes in place"),
                                     Capability("kv_cache_read", "kv8", "fused into attention",
                                                accepts=lambda enc, target: None if enc.role == "k" else "keys only")])
    with pytest.raises(Exception, match="cache.0.v of layer model.layers.0.self_attn \\(kv8: keys only\\)") as e:
        Runs().check_cache_encodings(kv8_llama, get_target("onnx"))
    assert "cache.0.k " not in str(e.value)

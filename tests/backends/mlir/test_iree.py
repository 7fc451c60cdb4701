"""The mlir backend's module compiled by IREE (nnforge/backends/mlir/iree.py): a decoder bundle's
``prefill`` and ``decode`` functions, w4-gptq weights as integer codes and a kv8 cache as int8 codes
and float16 scales, run in IREE's runtime on this CPU and generate the reference interpreter's
greedy tokens; devices it cannot run are refused by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nnforge as nf
from nnforge.backends.base import BackendError
from nnforge.generation import DecoderRunner, generate
from nnforge.ir import Interpreter
from tests.frontend.decoders.families import llama_directory

MAX_LEN = 24


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    pytest.importorskip("torch_mlir")
    tmp = tmp_path_factory.mktemp("iree")
    root = llama_directory(tmp)
    return nf.compile(root / "model", "mlir", "w4-gptq+kv8", calibration=root / "calib.txt", out=tmp / "b",
                      max_len=MAX_LEN)


def test_iree_runs_the_decoder_module_and_generates_the_interpreters_tokens(bundle, tmp_path, monkeypatch):
    pytest.importorskip("iree.compiler")
    monkeypatch.setenv("NNFORGE_IREE_CACHE", str(tmp_path / "cache"))
    m, graph = bundle.manifest, bundle.graph()
    sig = m["signature"]
    reference = DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), m["decoder"], [i["name"] for i in sig["inputs"]],
                              [o["name"] for o in sig["outputs"]])
    prompt = torch.tensor([1, 17, 42, 99, 5, 23])
    want = generate(reference.decoder(resident=False), prompt, 16, stop_tokens=[]).tokens
    lm = nf.load(bundle.path, device="iree")
    assert type(lm.runner).__name__ == "IreeRunner"
    assert lm.generate(prompt, 16, stop_tokens=[]).tokens == want and len(set(want)) > 2
    # one call through numpy: the logits near the interpreter's, the kv8 state as it declares it
    feeds = [np.array([[1, 17, 42, 9]]), np.arange(4)[None]] + \
        [np.zeros((1, *v.shape[1:]), v.dtype.name) for v in graph.inputs[2:]]
    got = lm.runner(*feeds)
    ref = Interpreter(graph).run(*[torch.as_tensor(x) for x in feeds])
    assert np.abs(np.asarray(got[0]) - ref[0].numpy()).max() < 1e-3
    assert [np.asarray(g).dtype.name for g in got[1:]] == [v.dtype.name for v in graph.outputs[1:]]
    assert {"int8", "float16"} <= {v.dtype.name for v in graph.outputs[1:]}
    assert list((tmp_path / "cache").glob("*.vmfb"))            # compiled once, then read from the cache


@pytest.mark.parametrize("device", ["iree:cuda", "gpu"])
def test_a_device_the_mlir_backend_cannot_run_is_refused_by_name(bundle, device):
    with pytest.raises(BackendError, match=rf"device '{device}'"):
        nf.load(bundle.path, device=device)

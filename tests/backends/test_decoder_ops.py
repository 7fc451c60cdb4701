"""Every backend takes the decoder ops (rms_norm, rope, cache_update, attention): through its own
rules, or written out in primitive ops by its prepare passes (Backend.lowers / decompositions).
An attention block over a cache, lowered and run, against the interpreter on prefill and decode."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is imported, anywhere

import pytest
import torch

from nnforge.backends.base import BUILTIN, get_backend
from nnforge.ir import run_graph
from nnforge.passes.decompose import decomposable
from tests import conftest
from tests.passes.graphs import decoder_block, decoder_inputs

RUNS_HERE = {"onnx": "onnx", "tvm": "cpu", "mlir": "mlir", "triton": "h100"}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_the_decoder_ops_a_backend_lacks_are_decomposed(name):
    backend = get_backend(name)
    decomposed = {op for c in backend.decompositions() for op in c["ops"]}
    if backend.lowers is None:                       # takes every op as it comes (run below)
        assert decomposed == set()
    else:
        assert decomposed == decomposable() - set(backend.lowers)


@pytest.mark.parametrize("name", sorted(RUNS_HERE))
def test_decoder_block_runs_like_the_interpreter(tmp_path, name):
    if name == "mlir":
        pytest.importorskip("torch_mlir")
    graph = decoder_block(window=6, softcap=20.0)
    prefill, decode = decoder_inputs(5, 0), decoder_inputs(1, 9, seed=1)
    backend = get_backend(name)
    shapes = {v.name: list(t.shape) for v, t in zip(graph.inputs, prefill)}
    lowered = conftest.lower_into(backend, graph, RUNS_HERE[name], tmp_path, shapes=shapes)
    assert not lowered.fallbacks
    runner = backend.load(tmp_path, lowered.entry)
    for inputs in ([prefill] if name == "mlir" else [prefill, decode]):   # (mlir's module has fixed sizes)
        for got, want in zip(runner(*inputs), run_graph(graph, inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_coreml_converts_the_decoder_block(tmp_path):
    pytest.importorskip("coremltools")
    graph = decoder_block()
    shapes = {v.name: list(t.shape) for v, t in zip(graph.inputs, decoder_inputs(5, 0))}
    lowered = conftest.lower_into(get_backend("coreml"), graph, "apple-a17", tmp_path, shapes=shapes)
    assert {"matmul", "softmax"} <= {op for ops in lowered.entry["verify"]["op_map"].values() for op in ops}


def test_hls_names_the_decoder_nodes_it_cannot_build(tmp_path):
    graph = decoder_block()
    shapes = {v.name: list(t.shape) for v, t in zip(graph.inputs, decoder_inputs(5, 0))}
    with pytest.raises(Exception, match=r"the hls backend has no lowering for op\(s\) .*cos.*\(nodes rms_norm\."):
        conftest.lower_into(get_backend("hls"), graph, "alveo-u280", tmp_path, shapes=shapes)

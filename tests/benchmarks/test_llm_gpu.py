"""benchmarks/llm_gpu.py: it refuses to time without a GPU, and its pieces run on a tiny decoder
compiled for h100 under Triton's interpreter (the rates they give there mean nothing; that they
are rates of the bundle's own steps, and the ideal follows the bytes, is what is checked)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported, anywhere

import pytest                             # noqa: E402
import torch                              # noqa: E402

import nnforge as nf                      # noqa: E402
from tests.frontend.decoders.families import tiny_model   # noqa: E402

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "llm_gpu.py"
sys.path.insert(0, str(_PATH.parent))
_spec = importlib.util.spec_from_file_location("bench_llm_gpu", _PATH)
llm_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llm_gpu)


def test_it_refuses_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert llm_gpu.main([]) == 2
    assert "no CUDA GPU visible: nothing to time" in capsys.readouterr().err


@pytest.mark.slow  # a decoder compiled and stepped in Triton's interpreter
def test_its_pieces_on_a_tiny_decoder_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    bundle = nf.compile(tiny_model("llama"), "h100", "kv8", out=tmp_path / "b", max_len=16)
    decoder = bundle.load().decoder()
    assert llm_gpu.decode_rate(decoder, [5, 6, 7], batch=2, steps=2) > 0
    assert decoder.tokens_held == 3 + 1 + 2
    m = bundle.manifest
    one, four = (llm_gpu.ideal_rate(m, b, 8, 3350.0) for b in (1, 4))
    assert 1 < four / one < 4          # the weights are read once a step, each row's cache once more
    assert llm_gpu.gpu_target("NVIDIA H100 80GB HBM3") == "h100" and llm_gpu.gpu_target("Tesla T4") is None

"""The triton backend's ``dynamic_quant`` against the interpreter on
tests/backends/dynamic_quant_cases.py's graph, bit for bit: every quantiser there is a graph output,
so none fuses into kernels/intact.py and each runs as the op's reference kernel on the fp32
activation; and intact's quantiser on the same inputs, for the per-token int8/int4 cases it takes.
The linear after one takes fp16 operands here: test_intact's 2e-3 of its largest output."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported, anywhere

import pytest                             # noqa: E402
import torch                              # noqa: E402

from tests import conftest                # noqa: E402
from tests.backends.dynamic_quant_cases import CASES, SIZES, check, dynamic_quant_graph, inputs  # noqa: E402

pytest.importorskip("triton")

from nnforge.backends.triton import TritonBackend                          # noqa: E402
from nnforge.backends.triton.kernels import intact                         # noqa: E402
from nnforge.ir.actquant import act_quantize                               # noqa: E402


def test_dynamic_quant_matches_the_interpreter(tmp_path):
    g = dynamic_quant_graph()
    backend = TritonBackend()
    lowered = conftest.lower_into(backend, g, "h100", tmp_path)
    assert lowered.entry["act_linears"] == {} and not lowered.fallbacks
    check(g, backend.load(tmp_path, lowered.entry, "cpu"), linear_rtol=2e-3)


def test_the_kernel_quantiser_on_the_per_token_int_cases():
    g = dynamic_quant_graph()
    cases = [(i, attrs) for i, (_, _, _, _, attrs) in enumerate(CASES)
             if attrs["format"] in intact.ACT_BITS and not attrs.get("group")]
    assert {CASES[i][0] for i, _ in cases} == {"i8", "i4", "h8"}
    for seed, env in enumerate(SIZES):
        xs = inputs(g, env, seed)
        for i, attrs in cases:
            x, clip = xs[i], attrs.get("clip", 1.0)
            a = intact.quantize(x, intact.ACT_BITS[attrs["format"]], clip)
            want = act_quantize(x, attrs["format"], 0, clip)
            assert torch.equal(a.codes * a.scale[..., None], want), (CASES[i][0], env)

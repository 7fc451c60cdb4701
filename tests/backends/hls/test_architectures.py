"""Issue 21's architectures on the FPGA target: tiny random-init configs (tests/architectures.py)
compiled for alveo-u280 with ``w8`` build, verify, match the fp32 reference within the bundle's
tolerance, and their C-simulation equals the bit-accurate emulation on fresh inputs.

Causal LMs are wrapped in ``Logits`` so that they trace as one stateless graph."""
from __future__ import annotations

import numpy as np
import pytest

import nnforge as nf
from tests.architectures import ARCHITECTURES, Logits


@pytest.fixture
def hls_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NNFORGE_HLS_CACHE", str(tmp_path / "hls-cache"))


def _compile(name: str, out):
    arch = ARCHITECTURES[name]
    model = arch.build()
    if arch.kind == "decoder":
        model = Logits(model)
    x = arch.inputs(batch=1, size=arch.sizes[0], seed=0)
    return nf.compile(model, "alveo-u280", "w8", example_inputs=x, input_names=list(arch.input_names),
                      out=out, progress=False), arch


@pytest.mark.parametrize("name", [pytest.param("llama", marks=pytest.mark.slow), "gpt2"])
def test_language_models_build_verify_and_simulate_bit_exactly(name, tmp_path, hls_cache):
    bundle, arch = _compile(name, tmp_path / name)
    num = bundle.manifest["numerics"]
    assert num["backend_vs_reference"]["cosine_min"] >= num["tolerance"]["cosine_min"]
    nf.verify(bundle.path)
    runner = nf.load(bundle.path)
    xs = [t.numpy() for t in arch.inputs(batch=1, size=arch.sizes[0], seed=3)]
    got, emulated = runner.run_numpy(xs), runner.emulate(xs)
    assert all(np.array_equal(a, b) for a, b in zip(got, emulated))
    kinds = {type(layer).__name__ for layer in runner.plan.layers}
    assert {"Norm", "Lut"} <= kinds                    # the norms and the activation are one template each
    if name == "llama":                                # rotate_half: slice + neg + concat
        assert {"Neg", "Concat"} <= kinds and not {"PowInt", "Rsqrt"} & kinds

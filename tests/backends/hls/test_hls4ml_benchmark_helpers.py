"""The pure helpers of benchmarks/hls4ml_compare.py: fidelity figures, and hls4ml's documented
multiplier rule read from a converted (not compiled: no g++) hls4ml model."""
from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "hls4ml_compare.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("hls4ml_compare", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fidelity(bench):
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    f = bench.fidelity(ref, ref)
    assert f["cosine_min"] == pytest.approx(1.0) and f["max_abs_error"] == 0 and f["argmax_agreement"] == 1
    f = bench.fidelity(ref, np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 1.5]]))
    assert f["cosine_min"] == pytest.approx(0.0) and f["max_abs_error"] == 1.0 and f["argmax_agreement"] == 0.5
    assert bench.inputs(16).shape == (bench.N_INPUTS, 16)
    assert np.array_equal(bench.inputs(16), bench.inputs(16))          # seeded: the same for both sides


def test_hls4ml_multipliers_rule(bench, tmp_path):
    hls4ml = pytest.importorskip("hls4ml")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight[0, :4] = 0.0                                    # 4 zeros: n_zeros / RF fewer multipliers
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = hls4ml.utils.config_from_pytorch_model(model, (8,), backend="Vitis", default_precision="ap_fixed<24,8>")
        cfg["Model"]["ReuseFactor"] = 2
        hm = hls4ml.converters.convert_from_pytorch_model(model, hls_config=cfg, output_dir=str(tmp_path / "h"),
                                                          backend="Vitis", io_type="io_parallel")
    rows = bench.hls4ml_multipliers(hm, "dsp48e2")
    assert [(r["n_in"], r["n_out"], r["reuse_factor"], r["n_zeros"]) for r in rows] == [(8, 4, 2, 4), (4, 2, 2, 0)]
    assert [r["multipliers"] for r in rows] == [32 // 2 - 4 // 2, 8 // 2]
    assert [r["dsp_upper_bound"] for r in rows] == [2 * 14, 2 * 4]         # 24 x 24: two DSP48E2 each
    assert rows[0]["onchip_weight_bits"] == 32 * 24

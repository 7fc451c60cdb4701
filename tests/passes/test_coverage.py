"""Calibration too small for a pass's Hessians: the warning naming the layers and their rows per
input column, damping raised (and recorded) for a singular Hessian, and the layer named when no
damping helps; for GPTQ, SparseGPT and EoRA alike."""
from __future__ import annotations

import pytest
import torch

from nnforge.passes import PassContext, PassManager
from nnforge.passes.base import PassError
from nnforge.passes.lowrank.eora import QuantizeEoRA
from nnforge.passes.prune.sparsity import PruneSparseGPT, sparsegpt_prune
from nnforge.passes.quantize.coverage import MIN_TOKENS_PER_COLUMN, CalibrationCoverage
from nnforge.passes.quantize.formats import parse_format
from nnforge.passes.quantize.gptq import DAMP_CAP, QuantizeGPTQ, damping_steps, gptq_quantize

from tests.passes.graphs import inputs, mlp_graph

# every pass that estimates Hessians from calibration data, on the tiny MLP (fc1: 16 columns, fc2: 32)
PASSES = {"gptq": lambda **kw: QuantizeGPTQ(format="uint4", group_size=16, **kw),
          "sparsegpt": lambda **kw: PruneSparseGPT(pattern="2:4", **kw),
          "eora": lambda **kw: QuantizeEoRA(format="uint4", group_size=16, rank=2, **kw)}


def batches(rows: int, per_batch: int = 8, scale: float = 1.0) -> list[tuple]:
    return [(inputs(min(per_batch, rows - s), seed=s) * scale,) for s in range(0, rows, per_batch)]


def run(p, calibration):
    pm = PassManager([p])
    pm.run(mlp_graph(), PassContext(calibration=calibration))
    return pm.records[0]


@pytest.mark.parametrize("which", sorted(PASSES))
def test_too_few_tokens_per_column_warns_with_the_ratio(which):
    record = run(PASSES[which](), batches(24))            # fc1: 24 / 16 = 1.5, fc2: 24 / 32 = 0.75
    assert record.figures["too_few_tokens_per_column"] == {"fc2": 0.75, "fc1": 1.5}
    (warning,) = record.warnings
    name = PASSES[which]().name
    assert warning.startswith(f"{name}: the calibration set gives 2 of 2 layers fewer than "
                              f"{MIN_TOKENS_PER_COLUMN} calibration tokens per input column")
    assert "fc2 (24 rows / 32 columns = 0.75), fc1 (24 rows / 16 columns = 1.5)" in warning
    assert f"fc2 needs {MIN_TOKENS_PER_COLUMN * 32} rows, it saw 24" in warning
    assert "a singular Hessian" in warning


@pytest.mark.parametrize("which", sorted(PASSES))
def test_enough_calibration_gives_no_warning(which):
    record = run(PASSES[which](), batches(MIN_TOKENS_PER_COLUMN * 32, per_batch=64))
    assert record.warnings == [] and "too_few_tokens_per_column" not in record.figures


def test_only_layers_below_the_minimum_are_named():
    cover = CalibrationCoverage()
    cover.note("wide", rows=64, cols=32)
    cover.note("narrow", rows=640, cols=32)
    ctx = PassContext(current="quantize_gptq")
    cover.report(ctx, "quantize_gptq")
    assert ctx.figures["quantize_gptq"]["too_few_tokens_per_column"] == {"wide": 2.0}
    assert "1 of 2 layers" in ctx.warnings["quantize_gptq"][0] and "narrow" not in ctx.warnings["quantize_gptq"][0]
    assert "singular" not in ctx.warnings["quantize_gptq"][0]


def test_damping_steps_rise_tenfold_to_the_cap():
    assert damping_steps(0.01) == pytest.approx([0.01, 0.1, 1.0])
    assert damping_steps(0.0) == pytest.approx([0.0, 0.001, 0.01, 0.1, 1.0])
    assert damping_steps(0.5) == pytest.approx([0.5, DAMP_CAP])


@pytest.mark.parametrize("which", sorted(PASSES))
def test_singular_hessian_compiles_with_damping_raised_and_recorded(which):
    # 4 calibration rows for 16 and 32 input columns: rank-4 Hessians, singular without damping
    record = run(PASSES[which](damp=0.0), batches(4))
    assert record.figures["damp_raised"] == {"fc1": 0.001, "fc2": 0.001}
    assert any(w.startswith(f"{PASSES[which]().name}: the Hessians of 2 layer(s) were not positive definite "
                            "with damp=0, so their damping was raised: fc1 (0.001), fc2 (0.001)")
               for w in record.warnings)


def test_the_damping_used_is_returned():
    W, X = torch.randn(8, 32), torch.randn(4, 32)
    H = 2 * X.T @ X / 4
    _, figs = gptq_quantize(W, H, parse_format("int4", group_size=16), damp=0.0)
    assert figs["damp"] == 0.001
    _, figs = sparsegpt_prune(W, H, "2:4", damp=0.0)
    assert figs["damp"] == 0.001
    _, figs = gptq_quantize(W, H, parse_format("int4", group_size=16), damp=0.01)
    assert figs["damp"] == 0.01


def test_a_hessian_no_damping_rescues_names_the_layer_and_the_dampings_tried():
    W, H = torch.randn(8, 32), -torch.eye(32)       # negative curvature: no calibration set gives it
    with pytest.raises(PassError, match="gptq: layer blocks.0.mlp.up: the Hessian of a 8x32 weight is not positive "
                                        "definite with damping 0.01, 0.1, 1 .* exclude the layer"):
        gptq_quantize(W, H, parse_format("int4", group_size=16), layer="blocks.0.mlp.up")
    with pytest.raises(PassError, match="sparsegpt: layer blocks.0.mlp.up: the Hessian .* with damping 0.01, 0.1, 1"):
        sparsegpt_prune(W, H, "2:4", layer="blocks.0.mlp.up")


@pytest.mark.parametrize("which", sorted(PASSES))
def test_overflowing_calibration_inputs_name_the_layer(which):
    # finite inputs whose squares overflow float32: a non-finite Hessian, which no damping rescues
    with pytest.raises(PassError, match="layer fc1: the Hessian of a (32x16|16x32) weight has non-finite entries"):
        run(PASSES[which](), batches(64, scale=1e25))


def test_asvd_raises_and_records_the_damping_of_a_singular_covariance():
    from nnforge.passes.lowrank.svd import LowRankASVD
    record = run(LowRankASVD(rank=2, damp=0.0), batches(4))
    assert record.figures["damp_raised"] == {"fc1": 0.001, "fc2": 0.001}
    assert record.warnings[0].startswith("lowrank_asvd: the Hessians of 2 layer(s) were not positive definite")

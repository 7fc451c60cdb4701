"""nf.verify recomputes what a manifest claims (nnforge.claims): a hand-edited recipe, pass list,
compression figure or recorded fidelity fails verification naming the field."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.export import Dim

import nnforge as nf
from nnforge.bundle import MANIFEST, BundleError, file_table


@pytest.fixture(scope="module")
def w8_bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    out = tmp_path_factory.mktemp("claims") / "b"
    calib = [(torch.randn(16, 32, generator=torch.Generator().manual_seed(s)),) for s in range(8)]
    return nf.compile(model, "onnx", "w8", example_inputs=(torch.randn(4, 32),), calibration=calib,
                      dynamic_shapes=({0: Dim("batch")},), out=out, batch_sizes=()).path


def edited(src, tmp_path, edit):
    """A copy of the bundle whose manifest was edited by hand (its file table stays valid)."""
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST).read_text())
    edit(m)
    m["files"] = file_table(dst)
    (dst / MANIFEST).write_text(json.dumps(m, indent=1))
    return dst


def test_untouched_bundle_verifies(w8_bundle):
    report = nf.verify(w8_bundle)
    assert report["claims"].startswith("recomputed and confirmed")
    assert report["signature"].startswith("unsigned")
    assert report["fidelity_vs_fp32"]["rows"] == 16


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["recipe"].update(name="fp32", passes=[]), "recipe: 'fp32' runs no pass, but graph.json holds 2"),
    (lambda m: m["recipe"].update(name="w4-rtn"), "recipe.passes: preset w4-rtn runs"),
    (lambda m: m["recipe"]["passes"][0].update(format="int4"), "recipe.passes: preset w8 runs"),
    (lambda m: m["passes"].pop(), "passes: the pass records end with"),
    (lambda m: m["numerics"]["fidelity_vs_fp32"].update(cosine_mean=0.9999),
     "numerics.fidelity_vs_fp32.cosine_mean: the manifest says 0.9999, the held-out inputs give"),
    (lambda m: m["numerics"]["fidelity_vs_fp32"].update(sqnr_db=60.0), "numerics.fidelity_vs_fp32.sqnr_db"),
    (lambda m: m["numerics"]["held_out"].update(rows=256), "numerics.held_out.rows: the manifest says 256"),
    (lambda m: m["compression"]["layers"][1].update(encoding="u4 g128 asym"),
     "compression.layers[1] (v_2).encoding: the manifest says 'u4 g128 asym'"),
    (lambda m: m["compression"].update(compressed_bits_per_weight=3.0), "compression.compressed_bits_per_weight"),
    (lambda m: m["compression"].update(ratio=9.0), "compression.ratio: the manifest says 9.0"),
    (lambda m: m["signature"]["inputs"][0].update(shape=[1, 32]), "signature: the manifest says"),
], ids=["recipe-name", "other-preset", "preset-options", "pass-records", "fidelity", "sqnr", "held-out-rows",
        "layer-encoding", "bits", "ratio", "signature"])
def test_edited_manifest_fails_naming_the_field(w8_bundle, tmp_path, edit, field):
    with pytest.raises(BundleError, match="its manifest disagrees with its files: .*" + _escape(field)):
        nf.verify(edited(w8_bundle, tmp_path, edit))


def _escape(text: str) -> str:
    import re
    return re.escape(text)


def test_an_exact_sqnr_claim_holds_against_a_recomputation_at_rounding_level():
    """'inf' (bit-identical) and a recomputation whose sums ran in another order (another CPU's
    kernels) are both float32 rounding; a real drop in SQNR still disagrees."""
    from nnforge.claims import _close
    assert _close(float("inf"), 139.8, db=True) and _close(125.0, float("inf"), db=True)
    assert _close("inf", 139.8, db=True) and not _close("inf", 90.0, db=True)      # as json_safe writes it
    assert not _close(float("inf"), 90.0, db=True)
    assert not _close(60.0, 61.0, db=True) and _close(60.0, 60.02, db=True)

"""Honest fidelity figures (nnforge.heldout): data-driven passes need calibration from the user,
fidelity is measured on inputs no pass saw and predicts what a user measures on fresh inputs, and
non-finite values are refused at the door."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.export import Dim

import nnforge as nf
from nnforge.cli import main
from nnforge.frontend.errors import FrontendError
from nnforge.numerics import compare, fidelity
from nnforge.passes import PassError


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(),
                               torch.nn.Linear(256, 16)).eval()


BATCH = ({0: Dim("batch")},)


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def onnx_mlp(tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "mlp.onnx"
    torch.onnx.export(mlp(), (rows(2, 0),), str(path), dynamo=True, dynamic_shapes=BATCH, input_names=["x"],
                      output_names=["y"], verbose=False)
    return path


def fresh_fidelity(bundle, model, n: int = 256) -> dict:
    x = rows(n, 99)
    with torch.no_grad():
        want = model(x)
    return fidelity([[torch.as_tensor(nf.load(bundle.path)(x))]], [[want]])


# --- calibration must come from the user -------------------------------------------------------
def test_gptq_without_calibration_names_the_pass(tmp_path):
    with pytest.raises(PassError, match="recipe w4-gptq runs quantize_gptq, which needs calibration data, and none "
                                        "was given.*nnforge does not make calibration data up"):
        nf.compile(mlp(), "onnx", "w4-gptq", example_inputs=(rows(4, 0),), out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_cli_gptq_without_calibration_exits_2_naming_the_pass(capsys, onnx_mlp, tmp_path):
    """The CLI used to calibrate GPTQ on the one random example it made up, and report its
    fidelity on that same example."""
    rc = main(["compile", str(onnx_mlp), "--target", "onnx", "--recipe", "w4-gptq", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "quantize_gptq, which needs calibration data" in err and "--calibration FILE" in err


def test_cli_calibration_file_fidelity_is_held_out_and_holds_on_fresh_inputs(capsys, onnx_mlp, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rows(512, 1).numpy())
    out = tmp_path / "b"
    rc = main(["compile", str(onnx_mlp), "--target", "onnx", "--recipe", "w4-gptq", "--out", str(out),
               "--calibration", str(calib)])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    m = json.loads((out / "manifest.json").read_text())
    held, fid = m["numerics"]["held_out"], m["numerics"]["fidelity_vs_fp32"]
    assert held["source"].startswith("calibration batches") and "held out" in held["source"]
    assert held["rows"] == fid["rows"] == 64 and held["batches"] == 2
    assert m["calibration"]["rows"] == 512 and m["calibration"]["used_by_passes"]["rows"] == 448
    assert "on 64 held-out rows in 2 batch(es)" in stdout
    fresh = fresh_fidelity(nf.Bundle.open(out), mlp())
    margin = fid["fresh_inputs_margin"] + fresh["fresh_inputs_margin"]
    assert abs(fresh["cosine_mean"] - fid["cosine_mean"]) <= margin, (fresh, fid)


def test_check_inputs_that_repeat_calibration_rows_are_refused(tmp_path):
    calib = [(rows(16, s),) for s in range(4)]
    check = (torch.cat([rows(8, 50), calib[2][0][:3]]),)
    with pytest.raises(PassError, match="3 of the 11 check_inputs rows are also calibration rows"):
        nf.compile(mlp(), "onnx", "w4-gptq", example_inputs=(rows(4, 0),), calibration=calib, check_inputs=check,
                   dynamic_shapes=BATCH, out=tmp_path / "b")


def test_user_check_inputs_are_what_fidelity_is_measured_on(tmp_path):
    calib = [(rows(16, s),) for s in range(4)]
    check = [(rows(8, 50),), (rows(5, 51),)]
    b = nf.compile(mlp(), "onnx", "w4-gptq", example_inputs=(rows(4, 0),), calibration=calib, check_inputs=check,
                   dynamic_shapes=BATCH, out=tmp_path / "b", batch_sizes=())
    held = b.manifest["numerics"]["held_out"]
    assert held == {"source": "check_inputs= (from the user)", "batches": 2, "rows": 13}
    assert b.manifest["calibration"]["used_by_passes"] == {"batches": 4, "rows": 64}
    assert [[list(t.shape) for t in x] for x, _ in b.held_out()] == [[[8, 64]], [[5, 64]]]


def test_one_calibration_batch_gives_up_its_last_rows(tmp_path):
    b = nf.compile(mlp(), "onnx", "w4-gptq", example_inputs=(rows(4, 0),), calibration=[(rows(64, 1),)],
                   dynamic_shapes=BATCH, out=tmp_path / "b", batch_sizes=())
    assert b.manifest["numerics"]["held_out"] == {
        "source": "the last 8 of the 64 calibration rows, held out (the passes saw the others)", "batches": 1,
        "rows": 8}


def test_nothing_to_hold_out_is_an_error(tmp_path):
    with pytest.raises(PassError, match="calibration is a single batch with no rows to spare.*check_inputs="):
        nf.compile(mlp(), "onnx", "w4-gptq", example_inputs=(rows(2, 0),), calibration=[(rows(1, 1),)],
                   dynamic_shapes=BATCH, out=tmp_path / "b")


def test_fixed_batch_takes_calibration_of_another_batch_size(tmp_path):
    """The batch axis is free in data: rows are regrouped into the model's fixed batch (here 4)."""
    calib = [(rows(8, s),) for s in range(6)]
    b = nf.compile(mlp(), "onnx", "w4-gptq", example_inputs=(rows(4, 0),), calibration=calib, out=tmp_path / "b",
                   batch_sizes=(), dynamic_shapes="static")
    assert b.manifest["signature"]["inputs"][0]["shape"] == [4, 64]
    assert b.manifest["calibration"] == {"source": "calibration= (from the user)", "batches": 6, "rows": 48,
                                         "used_by_passes": {"batches": 11, "rows": 44}}


@pytest.mark.parametrize("shapes, takes", [("static", r"\[4, 64\] \(only the batch axis may differ\)"),
                                           (None, r"\['batch', 64\]")])
def test_calibration_of_another_feature_size_says_so_in_plain_words(tmp_path, shapes, takes):
    with pytest.raises(PassError, match=r"calibration batch 1, input x: shape \[8, 32\], but the model takes "
                                        + takes):
        nf.compile(mlp(), "onnx", "w4-gptq", example_inputs=(rows(4, 0),), input_names=["x"], dynamic_shapes=shapes,
                   calibration=[(rows(8, 1),), (torch.randn(8, 32),)], out=tmp_path / "b")


# --- non-finite values ----------------------------------------------------------------------------
def test_nan_weights_are_refused_naming_the_tensor(tmp_path):
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 5] = float("nan")
        model[2].weight[7, 1] = float("inf")
    with pytest.raises(FrontendError, match=r"weight .*2.weight holds 1 NaN and 1 inf of 65536 values; pass "
                                            r"allow_nonfinite=True"):
        nf.compile(model, "onnx", example_inputs=(rows(4, 0),), out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_nan_calibration_is_refused_naming_batch_and_input(tmp_path):
    bad = rows(16, 2)
    bad[3, 3] = float("nan")
    with pytest.raises(PassError, match="calibration batch 1, input x holds 1 NaN of 1024 values"):
        nf.compile(mlp(), "onnx", "w4-gptq", example_inputs=(rows(4, 0),), input_names=["x"],
                   calibration=[(rows(16, 1),), (bad,)], dynamic_shapes=BATCH, out=tmp_path / "b")


def test_a_tensor_shared_by_batches_is_checked_once_and_named_where_it_first_appears(monkeypatch):
    from nnforge import heldout
    from nnforge.frontend.model_files import import_model
    graph = import_model(mlp(), (rows(4, 0),), input_names=["x"], dynamic_shapes=BATCH)[0]
    shared = rows(8, 1)
    checked = []
    real = heldout.nonfinite
    monkeypatch.setattr(heldout, "nonfinite", lambda named: real(checked.append(n) or (n, x) for n, x in named))
    heldout._refuse_nonfinite(graph, (rows(4, 0),), [(shared,), (shared,), (rows(8, 2),)], None)
    assert [n for n in checked if not n.startswith("weight")] == ["example input x", "calibration batch 0, input x",
                                                                  "calibration batch 2, input x"]
    shared[0, 0] = float("nan")
    with pytest.raises(PassError, match="calibration batch 0, input x holds 1 NaN of 512 values"):
        heldout._refuse_nonfinite(graph, (rows(4, 0),), [(shared,), (shared,)], None)


def test_nan_outputs_are_refused_and_never_score_as_a_match(tmp_path):
    class Log(torch.nn.Module):
        def forward(self, x):
            return torch.log(x)
    x = torch.tensor([[1.0, -1.0, 2.0]])
    with pytest.raises(FrontendError, match=r"model .* computes non-finite values on held-out batch 0: output .* "
                                            r"holds 1 NaN of 3 values"):
        nf.compile(Log(), "onnx", example_inputs=(x,), out=tmp_path / "b")
    b = nf.compile(Log(), "onnx", example_inputs=(x,), out=tmp_path / "b", allow_nonfinite=True, batch_sizes=())
    assert b.manifest["numerics"]["allow_nonfinite"] is True
    assert b.manifest["numerics"]["fidelity_vs_fp32"]["cosine_min"] == -1.0     # NaN is not a match
    assert nf.verify(b.path)["passed"]


def test_compare_never_counts_nan_as_a_match():
    nan = torch.tensor([[float("nan"), 1.0]])
    assert compare([nan], [nan])["cosine_min"] == -1.0
    assert compare([nan], [nan], nan_equal=True)["cosine_min"] == 1.0
    inf = torch.tensor([[float("inf"), 1.0]])
    assert compare([inf], [inf])["cosine_min"] == 1.0


class Masked(torch.nn.Module):
    """A layer followed by a constant mask, as attention masks are: -inf there is meant."""

    def __init__(self, fill: float):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("mask", torch.tensor([0.0, fill, 0.0, 0.0]))

    def forward(self, x):
        return torch.softmax(self.fc(x) + self.mask, -1)


def test_infinite_mask_constants_are_allowed_but_nan_constants_are_not(tmp_path):
    x = torch.randn(2, 4)
    b = nf.compile(Masked(float("-inf")), "onnx", example_inputs=(x,), out=tmp_path / "inf", batch_sizes=())
    assert b.manifest["numerics"]["fidelity_vs_fp32"]["cosine_min"] == 1.0
    with pytest.raises(FrontendError, match=r"constant .* holds 1 NaN of 4 values; pass allow_nonfinite=True"):
        nf.compile(Masked(float("nan")), "onnx", example_inputs=(x,), out=tmp_path / "nan")


def _cache_graphs():
    """A float-cache decoder (fp32) and the same with its layer-0 caches encoded kv8."""
    from nnforge.frontend.decoders import build, load_causal_lm, spec_from_config
    from nnforge.passes import PassContext, PassManager
    from nnforge.passes.kvcache import EncodeKVCache
    from tests.frontend.decoders.families import tiny_model
    loaded = load_causal_lm(tiny_model("llama"))
    fp32 = build(spec_from_config(loaded.config, max_len=16), loaded.weights, 16)
    encoded = PassManager([EncodeKVCache(encoding="kv8", layers=["cache.0.*"])]).run(fp32, PassContext())
    return fp32, encoded


def test_check_batches_follow_an_encoded_caches_state():
    """A check batch of the fp32 graph (zero caches) becomes the encoded graph's: ids, positions and
    the float caches left carried over, the encoded state empty in its stored dtypes; the outputs
    compared are those both graphs have."""
    from nnforge.heldout import inputs_for, shared_outputs
    fp32, encoded = _cache_graphs()
    ids = torch.tensor([[5, 6, 7]] * 2)
    batch = (ids, torch.arange(3).repeat(2, 1), *[torch.zeros(2, *v.shape[1:]) for v in fp32.inputs[2:]])
    got = inputs_for(encoded, fp32, batch)
    assert [tuple(t.shape) for t in got[2:]] == [(2, *v.shape[1:]) for v in encoded.inputs[2:]]
    assert [t.dtype for t in got[2:6]] == [torch.int8, torch.float16, torch.int8, torch.float16]
    assert got[0] is ids and all(not t.any() for t in got[2:])
    assert inputs_for(fp32, fp32, batch) == batch
    names = [encoded.outputs[i].name for i, _ in shared_outputs(encoded, fp32)]
    assert names == ["logits", "cache.1.k.next", "cache.1.v.next"]
    full = list(batch)
    full[2] = torch.ones_like(full[2])
    with pytest.raises(PassError, match="check input cache.0.k holds a non-empty cache.*cache.0.k.codes"):
        inputs_for(encoded, fp32, tuple(full))


def test_an_input_that_starts_as_a_copy_of_another_is_fed_that_copy():
    """Token reduction's slots: a check batch of the fp32 graph has no slots; a sequence that lost no
    token writes slot == position, so slots get the positions (graph.meta["input_copies"])."""
    from nnforge.heldout import inputs_for
    from nnforge.ir import Graph, tensor
    like = Graph("fp32")
    like.add_input("positions", tensor("int64", "batch", "seq"))
    g = Graph("reduced")
    g.add_input("positions", tensor("int64", "batch", "seq"))
    g.add_input("slots", tensor("int64", "batch", "seq"))
    g.meta["input_copies"] = {"slots": "positions"}
    positions = torch.arange(5).reshape(1, 5)
    fed = inputs_for(g, like, (positions,))
    assert fed[0] is positions and torch.equal(fed[1], positions)

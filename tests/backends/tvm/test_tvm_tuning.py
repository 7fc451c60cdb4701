"""Per-shape schedule choice of the tvm backend (tuning.py): every candidate config of each template
computes the same product, tune = true measures and records, tuning_records reuses without
measuring, records of another machine are ignored and said so, and the option errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

import nnforge as nf                                             # noqa: E402
from nnforge.backends.base import BackendError                   # noqa: E402
from nnforge.backends.tvm import lower as lower_module          # noqa: E402
from nnforge.backends.tvm.kernels import KernelError            # noqa: E402
from nnforge.backends.tvm.kernels.bsr import bsr_matmul, config_space as bsr_space, dense_from_bsr, llvm_target  # noqa: E402
from nnforge.backends.tvm.kernels.dense import config_space, dense_matmul, vector_lanes  # noqa: E402
from nnforge.backends.tvm.tuning import TUNING_FILE              # noqa: E402
from nnforge.ir import run_graph                                 # noqa: E402
from nnforge.targets import get_target                           # noqa: E402

from .test_bsr_kernels import NATIVE, random_bsr, runner         # noqa: E402


def dense_panels(w: np.ndarray, nb: int) -> np.ndarray:
    n, k = w.shape
    blocks = -(-n // nb)
    padded = np.zeros((blocks * nb, k), np.float32)
    padded[:n] = w
    return np.ascontiguousarray(padded.reshape(blocks, nb, k).transpose(0, 2, 1))


@pytest.mark.parametrize("config", config_space(vector_lanes(NATIVE), llvm_target(NATIVE).registers),
                         ids=lambda c: f"mr{c['mr']}v{c['vectors']}")
def test_every_dense_config_computes_the_product(config):
    n, k = 50, 37                 # a ragged last panel for every panel width
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    kern = dense_matmul("fc", n, k, NATIVE, config)
    nb = config["vectors"] * vector_lanes(NATIVE)
    assert kern.notes["tile"] == f"{config['mr']}x{nb}"
    run = runner(dataclasses.replace(kern, func=kern.func.with_attr("global_symbol", kern.name)))
    for m in (1, config["mr"] + 1, 2 * config["rows_per_task"] + 5):
        x = rng.standard_normal((m, k)).astype(np.float32)
        np.testing.assert_allclose(run(x, [dense_panels(w, nb), b]), x @ w.T + b, rtol=1e-4, atol=1e-4,
                                   err_msg=f"m={m}")


# one block shape in the default run; the others under -m slow
@pytest.mark.parametrize("r,c", [(4, 1), pytest.param(1, 4, marks=pytest.mark.slow),
                                 pytest.param(16, 1, marks=pytest.mark.slow)])
def test_every_bsr_config_computes_the_product(r, c):
    n, k = 64, 96
    row_ptr, cols, blocks = random_bsr(n, k, r, c, 0.3)
    key, space = bsr_space(n=n, k=k, blocks=blocks, target=NATIVE)
    assert key.startswith(f"{n}x{k} block{r}x{c} d") and len(space) > 1
    w = dense_from_bsr(row_ptr, cols, blocks, n, k)
    rng = np.random.default_rng(1)
    for config in space:
        run = runner(bsr_matmul("fc", row_ptr, cols, blocks, n, k, NATIVE, config=config))
        for m in (1, 5, 37):
            x = rng.standard_normal((m, k)).astype(np.float32)
            np.testing.assert_allclose(run(x), x @ w.T, rtol=1e-4, atol=1e-4, err_msg=f"{config} m={m}")


def test_configs_that_do_not_apply_are_refused():
    row_ptr, cols, blocks = random_bsr(16, 16, 4, 1, 0.5)
    with pytest.raises(KernelError, match="tok_tile=2 does not apply to 4x1 blocks"):
        bsr_matmul("fc", row_ptr, cols, blocks, 16, 16, NATIVE, config={"tok_tile": 2})
    with pytest.raises(KernelError, match="rows_per_task a multiple of mr"):
        dense_matmul("fc", 16, 16, NATIVE, {"mr": 4, "vectors": 1, "rows_per_task": 6})


# --- through nf.compile -----------------------------------------------------------------------
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval()


def compile_cpu(tmp_path: Path, name: str, recipe=None, **options):
    model, x = mlp(), torch.randn(6, 32)
    bundle = nf.compile(model, get_target("cpu").with_options(**options), recipe, example_inputs=(x,),
                        out=tmp_path / name)
    got = nf.load(bundle.path)(x)
    np.testing.assert_allclose(np.asarray(got), run_graph(bundle.graph(), [x])[0].numpy(), rtol=1e-4, atol=1e-5)
    return bundle, json.loads((bundle.path / TUNING_FILE).read_text())


def test_tune_measures_every_candidate_and_records_the_choice(tmp_path):
    bundle, tuning = compile_cpu(tmp_path, "tuned", tune=True, tune_rows=[16])
    assert tuning["tune"] and tuning["rows"] == [16]
    records = {r["key"]: r for r in tuning["records"]}
    assert set(records) == {"96x32", "32x96"}
    for r in records.values():
        assert r["source"] == "measured" and r["candidates"][0]["config"] == r["default"]
        timed = {json.dumps(c["config"], sort_keys=True): c["ms"]["16"] for c in r["candidates"] if "ms" in c}
        best = min(timed, key=timed.get)
        chosen = json.dumps(r["chosen"], sort_keys=True)
        # the fastest, unless it beat the default by less than the margin
        assert chosen == best or (r["chosen"] == r["default"] and
                                  timed[best] >= timed[chosen] * (1 - tuning["margin"]))
    kernels = bundle.manifest["backend"]["entry"]["kernels"]
    lanes = vector_lanes(NATIVE)
    for weight, key in (("v_0.weight", "96x32"), ("v_2.weight", "32x96")):
        chosen = records[key]["chosen"]
        assert kernels[weight]["tile"] == f"{chosen['mr']}x{chosen['vectors'] * lanes}"
    assert bundle.manifest["backend"]["entry"]["tuning"]["choices"]["measured"] == 2
    assert TUNING_FILE in bundle.manifest["files"]


def records_file(tmp_path: Path, chosen: dict, **change) -> Path:
    """A tvm_tuning.json for this machine choosing ``chosen`` for the MLP's two dense shapes."""
    from nnforge.backends.tvm import resolve_target
    from nnforge.backends.tvm.tuning import VERSION, _threads
    data = {"version": VERSION, "mcpu": str(resolve_target(NATIVE).attrs["mcpu"]), "threads": _threads(),
            "records": [{"kernel": "dense", "key": key, "chosen": chosen, "source": "measured"}
                        for key in ("96x32", "32x96")], **change}
    path = tmp_path / "records.json"
    path.write_text(json.dumps(data))
    return path


def test_records_are_reused_without_measuring(tmp_path, monkeypatch):
    forced = {"mr": 3, "vectors": 3, "rows_per_task": 240}      # not the default: reuse shows in the library

    def no_measuring(*a, **k):
        raise AssertionError("tuning_records must not measure")
    monkeypatch.setattr(lower_module, "time_kernel", no_measuring)
    bundle, reused = compile_cpu(tmp_path, "second", tuning_records=str(records_file(tmp_path, forced)))
    assert {r["source"] for r in reused["records"]} == {"records"}
    assert all(r["chosen"] == forced for r in reused["records"])
    tile = f"3x{3 * vector_lanes(NATIVE)}"
    assert {k["tile"] for k in bundle.manifest["backend"]["entry"]["kernels"].values()} == {tile}


def test_records_of_another_cpu_are_ignored_and_said_so(tmp_path):
    path = records_file(tmp_path, {"mr": 3, "vectors": 3, "rows_per_task": 240}, mcpu="some-other-cpu")
    _, reused = compile_cpu(tmp_path, "second", tuning_records=str(path))
    assert {r["source"] for r in reused["records"]} == {"default"}
    assert "some-other-cpu" in reused["ignored"][0]


@pytest.mark.slow  # tunes a whole model; the tuning tests above cover the choice
def test_block_sparse_layers_share_a_choice_per_shape_and_density(tmp_path):
    recipe = [{"pass": "prune_magnitude", "pattern": "block4x1", "sparsity": 0.75}]
    bundle, tuning = compile_cpu(tmp_path, "sparse", recipe, tune=True, tune_rows=[16])
    bsr = [r for r in tuning["records"] if r["kernel"] == "bsr_matmul"]
    assert {r["key"] for r in bsr} == {"96x32 block4x1 d0.25", "32x96 block4x1 d0.25"}
    assert all(r["source"] == "measured" and len(r["candidates"]) > 1 for r in bsr)


def test_option_errors(tmp_path):
    with pytest.raises(BackendError, match="unknown tuning option.*tune_trials.*known: tune, tune_rows"):
        compile_cpu(tmp_path, "bad", tune_trials=64)
    with pytest.raises(BackendError, match="tune_rows must be a list of positive row counts"):
        compile_cpu(tmp_path, "bad", tune=True, tune_rows=[0])
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(BackendError, match="junk.json: not a readable tvm_tuning.json"):
        compile_cpu(tmp_path, "bad", tuning_records=str(tmp_path / "junk.json"))
    assert not (tmp_path / "bad").exists()


def test_tuning_a_target_this_machine_cannot_run_is_refused(tmp_path):
    target = get_target("xeon-spr")
    if target.runs_here:
        pytest.skip("this machine runs xeon-spr bundles")
    with pytest.raises(BackendError, match="tune = true measures kernels on this machine.*tuning_records"):
        nf.compile(mlp(), target.with_options(tune=True), example_inputs=(torch.randn(2, 32),),
                   out=tmp_path / "spr")

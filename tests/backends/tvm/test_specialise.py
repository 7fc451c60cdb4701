"""The decode-step copy of ``main`` (specialise.py): a cpu decoder bundle carries it, one-token
steps at batch 1 run it and give what ``main`` gives on the same inputs, other shapes run ``main``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nnforge as nf
from nnforge.backends.tvm.specialise import Specialised
from tests.frontend.decoders.families import tiny_model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return nf.compile(tiny_model("llama"), "cpu", "w4-rtn", out=tmp_path_factory.mktemp("spec") / "b", max_len=40)


@pytest.fixture(scope="module")
def lm(bundle):
    return bundle.load()


def test_a_decoder_bundle_has_a_step_function_that_one_token_steps_run(bundle, lm):
    entry = bundle.manifest["backend"]["entry"]
    assert entry["specialised"] == [{"function": "main_step0", "symbols": {"batch": 1, "seq": 1}}]
    runner = lm.runner
    dec = lm.decoder()
    dec.prefill(torch.tensor([[1, 17, 42, 99, 5]]))
    assert runner.last_function == "main"
    dec.step(torch.tensor([7]))
    assert runner.last_function == "main_step0"
    two = lm.decoder()
    two.prefill(torch.tensor([[1, 17], [42, 99]]))
    two.step(torch.tensor([7, 8]))
    assert runner.last_function == "main"          # batch 2 is not the step's shape


def test_the_step_function_gives_mains_outputs(lm):
    runner = lm.runner
    rng = np.random.default_rng(0)
    caches = [rng.standard_normal([1, *i.dims[1:]]).astype(np.float32)
              for i in runner.inputs[2:]]
    inputs = [np.array([[7]], np.int64), np.array([[11]], np.int64), *caches]
    fast = runner.run_numpy(inputs)
    assert runner.last_function == "main_step0"
    general = runner.specialised(False).run_numpy(inputs)
    assert runner.last_function == "main"
    runner.specialised(True)
    for a, b in zip(fast, general):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_first_copy_whose_symbols_match_runs():
    s = Specialised([{"function": "f0", "symbols": {"batch": 1, "seq": 1}},
                     {"function": "f1", "symbols": {"seq": 1}}],
                    [["batch", "seq"], ["batch", 4, "seq"]])
    assert s.function_for([[1, 1], [1, 4, 1]]) == "f0"
    assert s.function_for([[3, 1], [3, 4, 1]]) == "f1"
    assert s.function_for([[1, 5], [1, 4, 5]]) == "main"
    assert Specialised([], [["batch"]]).function_for([[1]]) == "main"


def test_a_graph_without_the_symbols_gets_no_copy():
    from tvm import relax, tirx
    from nnforge.backends.tvm.specialise import add_specialised
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tirx.Var("n", "int64"), 4], "float32"))
    with bb.function("main", params=[x]):
        bb.emit_func_output(x)
    mod = bb.get()
    assert add_specialised(mod, [{"batch": 1, "seq": 1}]) == []
    assert add_specialised(mod, [{"n": 2}, {"n": 2}]) == [{"function": "main_step0", "symbols": {"n": 2}}]
    assert sorted(gv.name_hint for gv in mod.get_global_vars()) == ["main", "main_step0"]
    assert [int(d) for d in mod["main_step0"].params[0].ty.shape] == [2, 4]

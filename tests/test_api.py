"""The public API: nf.compile from each kind of model and with each kind of recipe, the errors of
bad arguments (clear, early, nothing written), and nf.targets()."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.export import Dim

import nnforge as nf
from nnforge.backends.base import BackendError, available_backends
from nnforge.frontend.errors import FrontendError
from nnforge.passes import PassError
from nnforge.targets import Target, TargetError

from tests.conftest import tiny_mlp

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
X_NEW = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
DYN = ({0: Dim("batch")},)


def cosine(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double().flatten(), torch.as_tensor(np.asarray(b)).double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def torch_out(x=X_NEW):
    with torch.no_grad():
        return tiny_mlp()(x)


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory) -> Path:
    """The tiny MLP exported by torch.onnx (dynamo) with a symbolic batch."""
    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    torch.onnx.export(tiny_mlp(), (X,), str(path), dynamo=True, dynamic_shapes=DYN,
                      input_names=["x"], output_names=["y"], verbose=False)
    assert path.is_file()
    return path


def test_compile_from_module(tmp_path):
    b = nf.compile(tiny_mlp(), "onnx", example_inputs=(X,), dynamic_shapes=DYN, out=tmp_path / "m")
    assert isinstance(b, nf.Bundle) and b.path == tmp_path / "m"
    assert b.manifest["model"]["source"] == "torch"
    got = b.load()(X_NEW)
    assert isinstance(got, torch.Tensor) and got.shape == (9, 8)
    torch.testing.assert_close(got, torch_out(), rtol=1e-4, atol=1e-5)


def test_compile_from_exported_program(tmp_path):
    ep = torch.export.export(tiny_mlp(), (X,), dynamic_shapes=DYN)
    b = nf.compile(ep, "onnx", example_inputs=(X,), out=tmp_path / "ep", input_names=["features"],
                   output_names=["scores"], name="mlp_ep")
    m = b.manifest
    assert m["model"]["source"] == "torch.export" and m["model"]["name"] == "mlp_ep"
    assert [i["name"] for i in m["signature"]["inputs"]] == ["features"]
    assert [o["name"] for o in m["signature"]["outputs"]] == ["scores"]
    batch, features = m["signature"]["inputs"][0]["shape"]
    assert isinstance(batch, str) and features == 16          # the batch stays symbolic
    runner = nf.load(b.path)
    assert runner.input_names == ["features"]
    np.testing.assert_allclose(runner(X_NEW.numpy()), torch_out().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runner({"features": X_NEW.numpy()}), torch_out().numpy(), rtol=1e-4, atol=1e-5)


def test_compile_from_exported_program_keeps_dim_names(tmp_path):
    ep = torch.export.export(tiny_mlp(), (X,), dynamic_shapes=DYN)
    b = nf.compile(ep, "onnx", example_inputs=(X,), dynamic_shapes=DYN, out=tmp_path / "ep")
    assert b.manifest["signature"]["inputs"][0]["shape"] == ["batch", 16]


def test_compile_from_onnx_file(tmp_path, mlp_onnx):
    b = nf.compile(mlp_onnx, "onnx", example_inputs=(X,), out=tmp_path / "o")
    assert b.manifest["model"]["source"] == "onnx"
    assert b.manifest["signature"]["inputs"][0]["shape"][1] == 16
    np.testing.assert_allclose(nf.load(b.path)(X_NEW.numpy()), torch_out().numpy(), rtol=1e-4, atol=1e-5)
    # a str path works as well as a Path
    b2 = nf.compile(str(mlp_onnx), "onnx", "w8", example_inputs=(X,), out=tmp_path / "o8")
    assert cosine(nf.load(b2.path)(X_NEW.numpy()), torch_out()) > 0.999
    assert nf.verify(b2.path)["passed"]


def test_compile_default_out_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    b = nf.compile(tiny_mlp(), "onnx", example_inputs=(X,))
    assert b.path == Path("bundles") / "sequential-onnx"
    assert (tmp_path / "bundles" / "sequential-onnx" / "manifest.json").is_file()


def test_compile_accepts_a_target_object_and_check_inputs(tmp_path):
    tgt = next(t for t in nf.targets() if t.name == "onnx")
    b = nf.compile(tiny_mlp(), tgt, example_inputs=X, dynamic_shapes=DYN, check_inputs=(X_NEW,), out=tmp_path / "t")
    assert b.manifest["numerics"]["inputs"] == [[9, 16]]
    assert b.manifest["target"]["name"] == "onnx"


# --- recipes ---------------------------------------------------------------------------------
TOML_RECIPE = """
description = "int4 first layer, int8 second"
[[passes]]
pass = "quantize_rtn"
bits = 4
group_size = 8
exclude = ["*2*"]

[[passes]]
pass = "quantize_rtn"
bits = 8
symmetric = false
"""


@pytest.mark.parametrize("recipe", [None, "fp32", "w8", "w4-rtn", "toml", "list"])
def test_recipes(tmp_path, recipe):
    if recipe == "toml":
        path = tmp_path / "mixed.toml"
        path.write_text(TOML_RECIPE)
        arg, name = path, "mixed"
    elif recipe == "list":
        arg, name = [{"pass": "quantize_rtn", "bits": 6, "group_size": 8}], "custom"
    else:
        arg, name = recipe, recipe or "fp32"
    b = nf.compile(tiny_mlp(), "onnx", arg, example_inputs=(X,), dynamic_shapes=DYN, out=tmp_path / "b")
    m = b.manifest
    assert m["recipe"]["name"] == name
    encodings = [layer["encoding"] for layer in m["compression"]["layers"]]
    expected = {
        None: ["dense f32", "dense f32"], "fp32": ["dense f32", "dense f32"],
        "w8": ["i8 per-channel sym", "i8 per-channel sym"],
        "w4-rtn": ["u4 per-channel asym", "u4 per-channel asym"],   # narrower than a group of 128: one group
        "toml": ["i4 g8 sym", "u8 per-channel asym"],
        "list": ["i6 g8 sym", "i6 g8 sym"],
    }[recipe]
    assert encodings == expected
    passes = [p["pass"] for p in m["recipe"]["passes"]]
    assert passes == {None: [], "fp32": [], "w8": ["quantize_rtn"], "w4-rtn": ["quantize_rtn"],
                      "toml": ["quantize_rtn", "quantize_rtn"], "list": ["quantize_rtn"]}[recipe]
    if recipe in (None, "fp32"):
        assert m["compression"]["ratio"] == 1.0
    else:
        assert m["compression"]["bytes_after"] < m["compression"]["bytes_before"]
    got = nf.load(b.path)(X_NEW)
    assert cosine(got, torch_out()) > (0.99999 if recipe in (None, "fp32") else 0.98)
    assert m["numerics"]["backend_vs_reference"]["cosine_min"] >= 0.9999
    if recipe == "w4-rtn":
        assert nf.verify(b.path)["passed"]


# --- errors ----------------------------------------------------------------------------------------
def _expect(tmp_path, exc, match, *args, **kw):
    kw.setdefault("example_inputs", (X,))
    out = tmp_path / "never"
    with pytest.raises(exc, match=match):
        nf.compile(*args, out=out, **kw)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unknown_target(tmp_path):
    with pytest.raises(TargetError) as ei:
        nf.compile(tiny_mlp(), "tpu-v9000", example_inputs=(X,), out=tmp_path / "never")
    assert "tpu-v9000" in str(ei.value) and "onnx" in str(ei.value)     # lists the known targets
    assert not (tmp_path / "never").exists()


def test_target_whose_backend_is_not_available(tmp_path):
    tgt = Target("faraway", "a target of a backend this build lacks", "nosuch-backend", "cpu", ())
    with pytest.raises(BackendError, match="nosuch-backend"):
        nf.compile(tiny_mlp(), tgt, example_inputs=(X,), out=tmp_path / "never")
    assert list(tmp_path.iterdir()) == []
    for t in nf.targets():                 # every listed target whose backend is missing says so early
        if t.backend not in available_backends():
            with pytest.raises(BackendError, match=t.backend):
                nf.compile(tiny_mlp(), t, example_inputs=(X,), out=tmp_path / "never")
    assert list(tmp_path.iterdir()) == []


def test_unknown_recipe(tmp_path):
    _expect(tmp_path, PassError, r"unknown recipe 'w3-magic'.*w8", tiny_mlp(), "onnx", "w3-magic")


def test_recipe_with_unknown_option(tmp_path):
    _expect(tmp_path, PassError, r"bitz", tiny_mlp(), "onnx", [{"pass": "quantize_rtn", "bitz": 4}])


def test_recipe_with_bad_option_value(tmp_path):
    _expect(tmp_path, PassError, r"bits", tiny_mlp(), "onnx", [{"pass": "quantize_rtn", "bits": 12}])


def test_recipe_with_unknown_pass(tmp_path):
    _expect(tmp_path, PassError, r"unknown pass 'prune_magic'", tiny_mlp(), "onnx", [{"pass": "prune_magic"}])


def test_recipe_entry_without_pass_key(tmp_path):
    _expect(tmp_path, PassError, r"'pass'", tiny_mlp(), "onnx", [{"bits": 4}])


def test_toml_recipe_errors(tmp_path):
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text('descripton = "typo"\n')
    _expect(tmp_path, PassError, r"bad_key.toml.*descripton", tiny_mlp(), "onnx", bad_key)
    bad_opt = tmp_path / "bad_opt.toml"
    bad_opt.write_text('[[passes]]\npass = "quantize_rtn"\ngroupsize = 32\n')
    _expect(tmp_path, PassError, r"groupsize", tiny_mlp(), "onnx", bad_opt)
    not_toml = tmp_path / "broken.toml"
    not_toml.write_text("[[passes]\n")
    _expect(tmp_path, PassError, r"broken.toml.*not valid TOML", tiny_mlp(), "onnx", not_toml)
    _expect(tmp_path, PassError, r"missing.toml", tiny_mlp(), "onnx", tmp_path / "missing.toml")


def test_recipe_of_the_wrong_type(tmp_path):
    _expect(tmp_path, PassError, r"recipe", tiny_mlp(), "onnx", 42)


def test_empty_calibration_list(tmp_path):
    _expect(tmp_path, PassError, r"calibration is empty", tiny_mlp(), "onnx", "w8", calibration=[])


def test_recipe_that_needs_calibration(tmp_path, monkeypatch):
    """A calibrated pass without calibration data: a clear error naming the pass, nothing written;
    with calibration it runs and sees the batches."""
    from dataclasses import dataclass
    from nnforge.passes import PASSES, Pass

    seen = []

    @dataclass
    class NeedsData(Pass):
        name = "needs_data"
        needs_calibration = True

        def run(self, graph, ctx):
            seen.append(len(ctx.calibration))
            return graph

    monkeypatch.setitem(PASSES, "needs_data", NeedsData)
    _expect(tmp_path, PassError, r"needs_data.*calibration", tiny_mlp(), "onnx", [{"pass": "needs_data"}])
    rows = torch.randn(8, X.shape[1])
    b = nf.compile(tiny_mlp(), "onnx", [{"pass": "needs_data"}], example_inputs=(X,), dynamic_shapes="static",
                   calibration=(x.unsqueeze(0) for x in rows), out=tmp_path / "ok")       # a generator of batches
    # the model's batch axis is fixed at 4: the 8 rows become 2 batches, 1 held out for the checks
    assert seen == [1] and b.manifest["recipe"]["passes"] == [{"pass": "needs_data"}]
    assert b.manifest["numerics"]["held_out"]["rows"] == 4


@pytest.mark.parametrize("model", [{"weights": 1}, 3.5, None], ids=["dict", "float", "none"])
def test_model_of_the_wrong_type(tmp_path, model):
    _expect(tmp_path, FrontendError, r"cannot compile a .*torch.nn.Module", model, "onnx")


def test_model_path_that_is_not_onnx(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"not a model")
    _expect(tmp_path, FrontendError, r"model.pt.*\.onnx", p, "onnx")


def test_missing_onnx_file(tmp_path):
    with pytest.raises((FrontendError, FileNotFoundError), match="nope.onnx"):
        nf.compile(tmp_path / "nope.onnx", "onnx", example_inputs=(X,), out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_corrupt_onnx_file(tmp_path):
    p = tmp_path / "corrupt.onnx"
    p.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(FrontendError, match="corrupt.onnx"):
        nf.compile(p, "onnx", example_inputs=(X,), out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_verify_and_load_of_a_missing_bundle(tmp_path):
    with pytest.raises(nf.BundleError):
        nf.verify(tmp_path / "nothing")
    with pytest.raises(nf.BundleError):
        nf.load(tmp_path / "nothing")


# --- targets -------------------------------------------------------------------------------------
def test_targets():
    ts = nf.targets()
    assert ts and all(isinstance(t, Target) for t in ts)
    names = [t.name for t in ts]
    assert len(names) == len(set(names)) and "onnx" in names
    for t in ts:
        ok, why = t.can_run()
        assert isinstance(ok, bool) and isinstance(why, str) and why
        assert t.runs_here == ok
        if not ok:
            assert why.startswith("needs ")
    onnx_t = ts[names.index("onnx")]
    assert onnx_t.can_run() == (True, "ok")
    assert onnx_t.backend == "onnx" and onnx_t.kind == "portable"
    assert "int8" in onnx_t.native_formats


class _Cumprod(torch.nn.Module):
    def forward(self, x):
        return torch.cumprod(x, 1) * 2


def _cumprod(cx, node):                       # exp(cumsum(log x)): for the positive inputs of this test
    x = cx.emit("log", cx.value(node.args[0]), name=f"{node.name}_log")
    return cx.emit("exp", cx.emit("cumsum", x, axis=node.args[1], name=f"{node.name}_sum"))


def test_compile_takes_converters_by_op_name(tmp_path):
    x = torch.rand(3, 5) + 0.5
    with pytest.raises(FrontendError) as info:
        nf.compile(_Cumprod(), "onnx", example_inputs=(x,), out=tmp_path / "refused")
    assert ("Add a converter for each: nf.compile(..., converters={'aten.cumprod.default': fn}) with "
            "fn(cx, node) returning the IR value") in str(info.value)
    assert not (tmp_path / "refused").exists()
    bundle = nf.compile(_Cumprod(), "onnx", example_inputs=(x,), out=tmp_path / "b",
                        converters={"aten.cumprod.default": _cumprod})
    fresh = torch.rand(3, 5) + 0.5
    torch.testing.assert_close(nf.load(bundle.path)(fresh), _Cumprod()(fresh), rtol=1e-5, atol=1e-5)

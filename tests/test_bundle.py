"""The bundle format: the manifest, loading, verification, and every way a bundle can be damaged
or made unsafe (each must fail with a BundleError naming the file); writing is all-or-nothing."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.export import Dim

import nnforge as nf
from nnforge import Bundle, BundleError
from nnforge.backends.base import BackendError
from nnforge.backends.onnx import OnnxBackend, OnnxRunner
from nnforge.bundle import FORMAT, FORMAT_VERSION, sha256_file
from nnforge.targets import REQUIREMENTS, list_targets

from tests.conftest import tiny_mlp

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
DYN = ({0: Dim("batch")},)


def compile_mlp(out, recipe=None, **kw):
    return nf.compile(tiny_mlp(), "onnx", recipe, example_inputs=(X,), dynamic_shapes=DYN, out=out, **kw)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A bundle of the tiny MLP, compiled once; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("pristine") / "mlp"
    compile_mlp(out)
    return out


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(pristine, dst, symlinks=True)
    return dst


def siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# --- the manifest ----------------------------------------------------------------------------
def test_manifest_fields(pristine):
    m = json.loads((pristine / "manifest.json").read_text())
    assert m["format"] == FORMAT == "nnforge.bundle" and m["format_version"] == FORMAT_VERSION
    assert m["nnforge_version"] == nf.__version__
    assert m["toolchain"]["torch"] == torch.__version__
    assert {"python", "onnx", "onnxruntime", "platform"} <= set(m["toolchain"])
    assert m["target"]["name"] == "onnx" and m["target"]["backend"] == "onnx"
    assert m["backend"]["name"] == "onnx" and m["backend"]["entry"]["model"] == "model.onnx"
    assert m["recipe"] == {"name": "fp32", "passes": []}
    assert m["model"]["source"] == "torch"
    assert m["model"]["frontend_check"]["cosine_min"] >= 0.99999
    # signature: names, dtypes, symbolic batch
    assert [(i["dtype"], i["shape"]) for i in m["signature"]["inputs"]] == [("float32", ["batch", 16])]
    assert all(isinstance(v["name"], str) and v["name"] for v in m["signature"]["inputs"] + m["signature"]["outputs"])
    assert [(o["dtype"], o["shape"]) for o in m["signature"]["outputs"]] == [("float32", ["batch", 8])]
    # every file but the manifest, with its sha256 and size
    on_disk = sorted(p.relative_to(pristine).as_posix() for p in pristine.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert sorted(m["files"]) == on_disk
    assert {"graph.json", "weights.safetensors", "model.onnx", "reference/inputs.safetensors",
            "reference/expected.safetensors", "reference/fp32.safetensors"} <= set(m["files"])
    for rel, info in m["files"].items():
        assert info["sha256"] == sha256_file(pristine / rel)
        assert info["size"] == (pristine / rel).stat().st_size
    # compression: fp32 -> fp32, the exact parameter bytes
    c = m["compression"]
    params = 4 * sum(p.numel() for p in tiny_mlp().parameters())
    assert c["bytes_before"] == c["bytes_after"] == params
    assert c["ratio"] == 1.0 and c["layer_bits_per_weight"] == 32.0
    assert [(layer["op"], layer["shape"], layer["encoding"]) for layer in c["layers"]] == \
        [("linear", [32, 16], "dense f32"), ("linear", [8, 32], "dense f32")]
    # numerics: measured against the fp32 reference, with the tolerance held to
    n = m["numerics"]
    assert n["tolerance"]["cosine_min"] >= 0.9999
    assert n["runtime_checked"] is True
    assert n["backend_vs_reference"]["cosine_min"] >= n["tolerance"]["cosine_min"]
    assert n["fidelity_vs_fp32"]["cosine_min"] >= 0.99999
    assert n["inputs"] == [[4, 16]]
    assert m["fallbacks"] == []
    assert {"frontend_s", "passes_s", "lower_s", "total_s"} <= set(m["timings"])
    assert all(isinstance(v, (int, float)) and v >= 0 for v in m["timings"].values())
    assert m["timings"]["total_s"] >= m["timings"]["lower_s"]


def test_bundle_object(pristine):
    b = Bundle.open(pristine)
    assert b.path == pristine and b.target == "onnx"
    assert b.size_bytes == sum(f["size"] for f in b.manifest["files"].values())
    assert b.deploy_bytes == (pristine / "model.onnx").stat().st_size + (pristine / "weights.safetensors").stat().st_size
    g = b.graph()
    assert [v.name for v in g.inputs] == [i["name"] for i in b.manifest["signature"]["inputs"]]
    ins, expected, fp32 = b.reference()
    assert torch.equal(ins[0], X) and len(expected) == len(fp32) == 1
    with torch.no_grad():
        torch.testing.assert_close(expected[0], tiny_mlp()(X), rtol=1e-5, atol=1e-6)


# --- running and verifying -------------------------------------------------------------------
def test_load_numpy_in_numpy_out_torch_in_torch_out(pristine):
    runner = nf.load(pristine)
    model = tiny_mlp()
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))      # another batch size
    with torch.no_grad():
        want = model(x)
    out_np = runner(x.numpy())
    assert isinstance(out_np, np.ndarray) and out_np.shape == (7, 8) and out_np.dtype == np.float32
    out_t = runner(x)
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (7, 8)
    torch.testing.assert_close(out_t, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out_np, want.numpy(), rtol=1e-4, atol=1e-5)
    assert Bundle.open(pristine).load() is not None


def test_runner_float64_numpy_input(pristine):
    """np.random.randn gives float64; the runner must either cast it to the signature's float32 or
    refuse it with a BackendError naming the input — not leak a raw ONNX Runtime exception.
    BUG: it currently raises onnxruntime's InvalidArgument."""
    runner = nf.load(pristine)
    x = np.random.default_rng(0).standard_normal((3, 16))
    assert x.dtype == np.float64
    try:
        out = runner(x)
    except BackendError as e:
        assert runner.input_names[0] in str(e)
    else:
        with torch.no_grad():
            want = tiny_mlp()(torch.from_numpy(x).float())
        np.testing.assert_allclose(out, want.numpy(), rtol=1e-4, atol=1e-5)


def test_runner_wrong_shape_is_a_backend_error(pristine):
    """BUG: a wrongly shaped input leaks onnxruntime's InvalidArgument instead of a BackendError."""
    runner = nf.load(pristine)
    with pytest.raises(BackendError):
        runner(np.zeros((3, 5), np.float32))


def test_verify_passes(pristine):
    report = nf.verify(pristine)
    assert report["passed"] is True and report["integrity"] == "ok"
    assert report["files"] == len(json.loads((pristine / "manifest.json").read_text())["files"])
    assert report["target"] == "onnx"
    assert report["interpreter_vs_expected"]["cosine_min"] >= 0.9999
    assert isinstance(report["runtime_vs_expected"], dict)
    assert report["runtime_vs_expected"]["cosine_min"] >= 0.9999


# --- tampering: each case names the file -------------------------------------------------------
def _flip_byte(path: Path, at: int | None = None):
    data = bytearray(path.read_bytes())
    i = len(data) - 3 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(root: Path, fn):
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


def _outside(tmp_path: Path, src: Path) -> Path:
    dst = tmp_path / "outside" / src.name
    dst.parent.mkdir(exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return dst


def t_changed_weights(root, tmp):
    _flip_byte(root / "weights.safetensors")
    return "weights.safetensors"


def t_truncated_model(root, tmp):
    p = root / "model.onnx"
    p.write_bytes(p.read_bytes()[:-10])
    return "model.onnx"


def t_deleted_reference(root, tmp):
    (root / "reference" / "expected.safetensors").unlink()
    return "reference/expected.safetensors"


def t_extra_file(root, tmp):
    (root / "notes.txt").write_text("hello")
    return "notes.txt"


def t_extra_file_in_subdir(root, tmp):
    (root / "reference" / "more.safetensors").write_bytes(b"x")
    return "reference/more.safetensors"


def t_escape(root, tmp):
    _edit_manifest(root, lambda m: m["files"].__setitem__("../escape", {"sha256": "0" * 64, "size": 1}))
    return "../escape"


def t_nested_escape(root, tmp):
    _edit_manifest(root, lambda m: m["files"].__setitem__("reference/../../escape", {"sha256": "0" * 64, "size": 1}))
    return "reference/../../escape"


def t_absolute(root, tmp):
    target = tmp / "abs.bin"
    target.write_bytes(b"abc")
    _edit_manifest(root, lambda m: m["files"].__setitem__(str(target), {"sha256": sha256_file(target), "size": 3}))
    return str(target)


def t_symlink_replacing_file(root, tmp):
    """An identical copy outside the bundle, linked in place of a recorded file: hashes match."""
    p = root / "weights.safetensors"
    outside = _outside(tmp, p)
    p.unlink()
    p.symlink_to(outside)
    return "weights.safetensors"


def t_symlink_replacing_dir(root, tmp):
    d = root / "reference"
    outside = _outside(tmp, d)
    shutil.rmtree(d)
    d.symlink_to(outside, target_is_directory=True)
    return "reference"


def t_new_symlink(root, tmp):
    (root / "link.bin").symlink_to(Path("/etc/hostname"))
    return "link.bin"


def t_changed_graph(root, tmp):
    p = root / "graph.json"
    p.write_text(p.read_text().replace('"linear"', '"matmul"', 1))
    return "graph.json"


TAMPER = [t_changed_weights, t_truncated_model, t_deleted_reference, t_extra_file, t_extra_file_in_subdir,
          t_escape, t_nested_escape, t_absolute, t_symlink_replacing_file, t_symlink_replacing_dir,
          t_new_symlink, t_changed_graph]


@pytest.mark.parametrize("tamper", TAMPER, ids=[t.__name__[2:] for t in TAMPER])
@pytest.mark.parametrize("action", ["verify", "load", "open"])
def test_tampered_bundle_is_refused_naming_the_file(bundle, tmp_path, tamper, action):
    name = tamper(bundle, tmp_path)
    call = {"verify": nf.verify, "load": nf.load, "open": Bundle.open}[action]
    with pytest.raises(BundleError) as ei:
        call(bundle)
    assert name in str(ei.value), str(ei.value)


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_manifest_entry_pointing_outside_the_bundle_is_refused(bundle, tmp_path, where):
    """BUG: Bundle.load checks backend.files with safe_join but not backend.entry, and the onnx
    backend opens entry["model"] as given: an edited manifest (which no hash covers) makes the runner
    load a model from outside the bundle."""
    evil = tmp_path / "evil"
    shutil.copytree(bundle, evil)
    model = "../evil/model.onnx" if where == "relative" else str(evil / "model.onnx")
    _edit_manifest(bundle, lambda m: m["backend"]["entry"].__setitem__("model", model))
    with pytest.raises(BundleError, match="model.onnx"):
        nf.load(bundle)


def test_external_data_outside_the_bundle_is_refused_with_a_bundle_error(bundle, tmp_path):
    """A consistently hashed bundle whose model.onnx reads its weights from outside the bundle.
    ONNX Runtime refuses it, but its exception leaks out unwrapped (the CLI would print a traceback).
    BUG: expected a BundleError/BackendError naming the file."""
    import onnx
    from nnforge.bundle import file_table
    shutil.copy2(bundle / "weights.safetensors", tmp_path / "outside.bin")
    model = onnx.load(os.fspath(bundle / "model.onnx"), load_external_data=False)
    changed = 0
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value, changed = "../outside.bin", changed + 1
    assert changed
    onnx.save(model, os.fspath(bundle / "model.onnx"))
    _edit_manifest(bundle, lambda m: m.__setitem__("files", file_table(bundle)))
    with pytest.raises((BundleError, BackendError), match="outside.bin"):
        nf.load(bundle)


def test_several_problems_are_all_named(bundle, tmp_path):
    t_changed_weights(bundle, tmp_path)
    t_deleted_reference(bundle, tmp_path)
    t_extra_file(bundle, tmp_path)
    with pytest.raises(BundleError) as ei:
        nf.verify(bundle)
    msg = str(ei.value)
    assert "changed file weights.safetensors" in msg
    assert "missing file reference/expected.safetensors" in msg
    assert "extra file notes.txt" in msg


@pytest.mark.parametrize("case", ["missing", "not_json", "wrong_format", "wrong_version", "no_files"])
def test_bad_manifest(bundle, case):
    mp = bundle / "manifest.json"
    if case == "missing":
        mp.unlink()
    elif case == "not_json":
        mp.write_text("{not json")
    elif case == "wrong_format":
        _edit_manifest(bundle, lambda m: m.__setitem__("format", "something.else"))
    elif case == "wrong_version":
        _edit_manifest(bundle, lambda m: m.__setitem__("format_version", 999))
    else:
        _edit_manifest(bundle, lambda m: m.pop("files"))
    for call in (nf.verify, nf.load):
        with pytest.raises(BundleError, match="manifest"):
            call(bundle)


def test_not_a_directory(tmp_path):
    with pytest.raises(BundleError, match="not a bundle directory"):
        nf.load(tmp_path / "nothing-here")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(BundleError, match="file.txt"):
        nf.verify(f)


def test_changed_expected_outputs_fail_numerics(bundle):
    """Consistent file table, but reference outputs that the graph no longer reproduces."""
    from nnforge.bundle import file_table, save_tensors
    save_tensors(bundle / "reference" / "expected.safetensors", {"output0": torch.randn(4, 8)})
    _edit_manifest(bundle, lambda m: m.__setitem__("files", file_table(bundle)))
    with pytest.raises(BundleError, match="expected outputs"):
        nf.verify(bundle)


# --- writing: never half-written -----------------------------------------------------------------
def test_refuses_to_overwrite_a_non_bundle_directory(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(BundleError, match="precious"):
        compile_mlp(out)
    assert siblings(out) == ["thesis.tex"] and (out / "thesis.tex").read_text() == "do not delete"
    assert siblings(tmp_path) == ["precious"]


def test_refuses_to_overwrite_a_directory_with_a_foreign_manifest(tmp_path):
    """BUG: any directory holding a file named manifest.json (a web app, say) is taken for a bundle
    and replaced — its other files deleted. Only an nnforge manifest should allow replacement."""
    out = tmp_path / "webapp"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my app", "start_url": "/"}')
    (out / "index.html").write_text("<html></html>")
    with pytest.raises(BundleError, match="webapp"):
        compile_mlp(out)
    assert sorted(siblings(out)) == ["index.html", "manifest.json"]


def test_refuses_to_write_over_a_file_or_symlink(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(BundleError, match="afile"):
        compile_mlp(f)
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(BundleError, match="symbolic link"):
        compile_mlp(link)
    assert f.read_text() == "x" and siblings(real) == []
    assert siblings(tmp_path) == ["afile", "link", "real"]


def test_empty_existing_directory_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    b = compile_mlp(out)
    assert b.path == out and (out / "manifest.json").is_file()
    assert siblings(tmp_path) == ["empty"]


def _fail_lowering(monkeypatch):
    def boom(self, graph, target, ctx):
        ctx.files.write_bytes("model.onnx", b"partial")       # something was written already
        raise BackendError("injected lowering failure")
    monkeypatch.setattr(OnnxBackend, "lower", boom)


def test_failed_lowering_leaves_nothing_behind(tmp_path, monkeypatch):
    _fail_lowering(monkeypatch)
    parent = tmp_path / "bundles"
    with pytest.raises(BackendError, match="injected"):
        compile_mlp(parent / "mlp")
    assert not (parent / "mlp").exists()
    left = siblings(parent) if parent.exists() else []
    assert not [n for n in left if "tmp" in n], left
    assert left == []


def test_failed_runtime_check_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(OnnxRunner, "run_numpy", lambda self, inputs: [np.zeros((4, 8), np.float32) + 1])
    with pytest.raises(BackendError, match="disagrees"):
        compile_mlp(tmp_path / "mlp")
    assert siblings(tmp_path) == []


def test_recompile_replaces_the_old_bundle(tmp_path, monkeypatch):
    out = tmp_path / "mlp"
    first = compile_mlp(out)
    assert first.manifest["recipe"]["name"] == "fp32"
    (out / "stale.txt").write_text("from an old bundle")      # must not survive the replacement
    second = compile_mlp(out, recipe="w8")
    assert second.path == out and second.manifest["recipe"]["name"] == "w8"
    assert not (out / "stale.txt").exists()
    assert siblings(tmp_path) == ["mlp"], "no temporary or old sibling may remain"
    assert nf.verify(out)["passed"]
    assert second.manifest["compression"]["bytes_after"] < first.manifest["compression"]["bytes_after"]
    # a failing recompile leaves the previous bundle untouched
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _fail_lowering(monkeypatch)
    with pytest.raises(BackendError):
        compile_mlp(out, recipe="w4-rtn")
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert siblings(tmp_path) == ["mlp"]
    monkeypatch.undo()
    assert nf.verify(out)["passed"]


# --- targets that cannot run here ---------------------------------------------------------------
def test_bundle_for_a_target_that_cannot_run_here(bundle, monkeypatch):
    elsewhere = [t for t in list_targets() if not t.can_run()[0]]
    if elsewhere:
        name = elsewhere[0].name
        _edit_manifest(bundle, lambda m: m["target"].__setitem__("name", name))
    else:       # only runnable targets are installed: make onnxruntime look absent
        name = "onnx"
        monkeypatch.setitem(REQUIREMENTS, "onnxruntime", lambda: (False, "python package onnxruntime"))
    with pytest.raises(BundleError) as ei:
        nf.load(bundle)
    assert name in str(ei.value) and "cannot run" in str(ei.value)
    # verify still checks files and the graph, and says why the runtime check was skipped
    report = nf.verify(bundle)
    assert report["passed"] and isinstance(report["runtime_vs_expected"], str)
    assert "skipped" in report["runtime_vs_expected"]


def test_unknown_target_in_manifest(bundle):
    _edit_manifest(bundle, lambda m: m["target"].__setitem__("name", "no-such-target"))
    with pytest.raises((BundleError, ValueError), match="no-such-target"):
        nf.load(bundle)


def test_compile_for_unrunnable_target_skips_runtime_check(tmp_path, monkeypatch):
    monkeypatch.setitem(REQUIREMENTS, "onnxruntime", lambda: (False, "python package onnxruntime"))
    b = compile_mlp(tmp_path / "mlp")
    n = b.manifest["numerics"]
    assert n["runtime_checked"] is False and "onnxruntime" in n["runtime_skipped_because"]
    assert "backend_vs_reference" not in n
    monkeypatch.undo()
    assert nf.verify(b.path)["passed"]

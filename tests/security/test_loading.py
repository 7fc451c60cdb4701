"""Hostile model files: nothing in a checkpoint runs unless ``trust_code=True`` says so, and ONNX
external data is checked (location, links, size, dims x dtype) before anything is read.

Each refusal is a FrontendError naming the file or tensor; every pickle payload here would write a
canary file when unpickled (a positive control shows it does), and the canary must not exist."""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import nnforge as nf
from nnforge.frontend import FrontendError
from nnforge.frontend import onnx_import
from nnforge.frontend.onnx_import import from_onnx
from nnforge.frontend import load_state_dict

from tests.conftest import tiny_mlp

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


class Payload:
    """Unpickling this runs Python code that creates ``canary``."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return exec, (f"open({self.canary!r}, 'w').write('pwned')",)


def _compile(model, out, **kw):
    return nf.compile(model, "onnx", example_inputs=(X,), out=out, **kw)


# --- torch checkpoints ----------------------------------------------------------------------------
def _write_payload(path: Path, fmt: str, canary: Path) -> None:
    state = {**tiny_mlp().state_dict(), "evil": Payload(canary)}
    if fmt == "zip":            # torch.save's default format
        torch.save(state, path)
    elif fmt == "legacy":       # torch.save's old non-zip format
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:                       # a bare pickle
        path.write_bytes(pickle.dumps(state))


def test_the_payload_is_real(tmp_path):
    """Positive control: plain unpickling of the same bytes does create the canary."""
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(Payload(canary)))
    assert canary.read_text() == "pwned"


@pytest.mark.parametrize("fmt,suffix", [("zip", ".pt"), ("legacy", ".pth"), ("pickle", ".pkl"), ("zip", ".bin")])
def test_pickle_payload_is_refused_and_runs_nothing(tmp_path, fmt, suffix):
    canary = tmp_path / "canary"
    ckpt = tmp_path / f"model{suffix}"
    _write_payload(ckpt, fmt, canary)
    with pytest.raises(FrontendError, match="refusing to unpickle") as ei:
        _compile(ckpt, tmp_path / "out")
    msg = str(ei.value)
    assert str(ckpt) in msg and "exec" in msg and "trust_code=True" in msg, msg
    with pytest.raises(FrontendError, match="refusing to unpickle"):
        load_state_dict(ckpt)
    assert not canary.exists(), "the pickle payload ran"
    assert not (tmp_path / "out").exists()


def test_state_dict_checkpoint_is_weights_not_a_model(tmp_path):
    m = tiny_mlp()
    for path in (tmp_path / "w.pt", tmp_path / "w.safetensors"):
        if path.suffix == ".pt":
            torch.save(m.state_dict(), path)
        else:
            from safetensors.torch import save_file
            save_file(m.state_dict(), os.fspath(path))
        for trust in (False, True):
            with pytest.raises(FrontendError, match=r"holds weights only \(\w+ of 4 tensors\)") as ei:
                _compile(path, tmp_path / "out", trust_code=trust)
        assert str(path) in str(ei.value) and "load_state_dict" in str(ei.value)
        # the documented way: load the weights safely into the module, compile the module
        fresh = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
        fresh.load_state_dict(load_state_dict(path))
        assert torch.equal(fresh(X), m(X))
    assert not (tmp_path / "out").exists()


def test_pickled_module_needs_trust_code(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(tiny_mlp(), path)
    with pytest.raises(FrontendError, match="refusing to unpickle.*torch.nn.modules"):
        _compile(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    b = _compile(path, tmp_path / "out", trust_code=True)
    assert b.manifest["model"]["source"] == "torch" and b.manifest["model"]["name"] == "full"
    assert b.manifest["model"]["frontend_check"]["cosine_min"] > 0.9999
    assert np.allclose(nf.load(b.path)(X.numpy()), tiny_mlp()(X).detach().numpy(), atol=1e-5)


def test_torchscript_is_refused_without_trust_code(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(tiny_mlp(), (X,)), path)
    with pytest.raises(FrontendError, match="refusing a TorchScript archive") as ei:
        _compile(path, tmp_path / "out")
    assert str(path) in str(ei.value) and "trust_code=True" in str(ei.value)
    assert not (tmp_path / "out").exists()
    b = _compile(path, tmp_path / "out", trust_code=True)
    assert b.manifest["model"]["source"] == "torchscript"
    assert b.manifest["model"]["frontend_check"]["cosine_min"] > 0.9999
    assert np.allclose(nf.load(b.path)(X.numpy()), tiny_mlp()(X).detach().numpy(), atol=1e-5)


def test_torch_export_archive_needs_trust_code(tmp_path):
    path = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(tiny_mlp(), (X,)), path)
    with pytest.raises(FrontendError, match="refusing a torch.export archive"):
        _compile(path, tmp_path / "out")
    b = _compile(path, tmp_path / "out", trust_code=True)
    assert b.manifest["model"]["source"] == "torch.export"


@pytest.mark.parametrize("trust", [False, True])
def test_garbage_checkpoint_is_not_readable(tmp_path, trust):
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a checkpoint at all")
    match = "cannot load this pickle file" if trust else r"not a readable torch checkpoint .*; nnforge reads .onnx"
    with pytest.raises(FrontendError, match=match):
        _compile(path, tmp_path / "out", trust_code=trust)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["model.h5", "model.keras", "model.joblib", "model"])
def test_other_model_files_are_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"whatever")
    with pytest.raises(FrontendError, match="not a model file nnforge reads") as ei:
        _compile(path, tmp_path / "out", trust_code=True)
    assert str(path) in str(ei.value) and ".onnx" in str(ei.value)


# --- ONNX external data -----------------------------------------------------------------------------
X_VI = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])
Y_VI = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])
DATA = np.arange(6, dtype=np.float32) * 0.5


def _model(tmp_path: Path, entries: list[tuple[str, str]], dims=(6,), dtype=TensorProto.FLOAT,
           name: str = "secret_w") -> Path:
    t = TensorProto()
    t.name, t.data_type = name, dtype
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in entries:
        e = t.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph([helper.make_node("Add", ["x", name], ["y"])], "g", [X_VI], [Y_VI], [t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    d = tmp_path / "model_dir"
    d.mkdir(exist_ok=True)
    path = d / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _ext(location: str, offset: int = 0, length: int | None = 24) -> list[tuple[str, str]]:
    return [("location", location), ("offset", str(offset))] + ([("length", str(length))] if length is not None else [])


@pytest.fixture
def opened(monkeypatch):
    """Every path nnforge's ONNX reader opens with os.open (only external data is read that way)."""
    seen = []
    real = os.open

    def spy(path, *a, **kw):
        seen.append(Path(path).name)
        return real(path, *a, **kw)
    monkeypatch.setattr(onnx_import.os, "open", spy)
    return seen


@pytest.mark.parametrize("kind", ["parent", "nested_parent", "absolute", "symlink", "symlink_dir"])
def test_external_location_is_refused_before_any_read(tmp_path, kind, opened):
    outside = tmp_path / "x.bin"
    outside.write_bytes(DATA.tobytes())
    loc = {"parent": "../x.bin", "nested_parent": "sub/../../x.bin", "absolute": str(outside),
           "symlink": "link.bin", "symlink_dir": "sub/x.bin"}[kind]
    path = _model(tmp_path, _ext(loc))
    if kind == "symlink":
        os.symlink(outside, path.parent / "link.bin")
    elif kind == "symlink_dir":
        os.symlink(tmp_path, path.parent / "sub")
    with pytest.raises(FrontendError, match="tensor secret_w: refusing external data") as ei:
        from_onnx(path)
    assert loc in str(ei.value)
    assert opened == [], "the file was opened before the location was refused"


def test_external_hardlink_is_refused(tmp_path):
    outside = tmp_path / "x.bin"
    outside.write_bytes(DATA.tobytes())
    path = _model(tmp_path, _ext("w.bin"))
    os.link(outside, path.parent / "w.bin")
    with pytest.raises(FrontendError, match="tensor secret_w: refusing external data 'w.bin': the file has hard links"):
        from_onnx(path)


def test_external_fifo_is_refused_without_blocking(tmp_path):
    path = _model(tmp_path, _ext("w.bin"))
    os.mkfifo(path.parent / "w.bin")
    with pytest.raises(FrontendError, match="not a regular file"):
        from_onnx(path)


@pytest.mark.parametrize("offset,length,size,match", [
    (8, 24, 24, r"range \[8, 32\) exceeds w.bin \(24 bytes\)"),
    (100, None, 24, r"range \[100, 124\) exceeds"),
    (2 ** 70, 24, 24, r"exceeds w.bin"),                       # larger than any file offset
    (-8, 24, 24, "not non-negative integers"),
    ("0x10", 24, 40, "not non-negative integers"),
    (0, 20, 24, r"length is 20 bytes, \[6\] of its type needs 24"),
    (0, 2 ** 64, 24, "needs 24"),
])
def test_external_offset_and_length_are_checked_against_the_file(tmp_path, offset, length, size, match):
    entries = [("location", "w.bin"), ("offset", str(offset))] + ([("length", str(length))] if length is not None else [])
    path = _model(tmp_path, entries)
    (path.parent / "w.bin").write_bytes(b"\x01" * size)
    with pytest.raises(FrontendError, match=match) as ei:
        from_onnx(path)
    assert "secret_w" in str(ei.value)


def test_missing_external_file(tmp_path):
    path = _model(tmp_path, _ext("absent.bin"))
    with pytest.raises(FrontendError, match="tensor secret_w: external data file .*absent.bin does not exist"):
        from_onnx(path)


def test_unknown_external_key_is_ignored_with_a_warning(tmp_path):
    path = _model(tmp_path, _ext("w.bin", offset=8) + [("basepath", "/etc"), ("checksum", "abc")])
    (path.parent / "w.bin").write_bytes(b"\x00" * 8 + DATA.tobytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = from_onnx(path)
    msgs = [str(w.message) for w in caught]
    assert any("secret_w" in m and "unknown external-data key 'basepath'" in m for m in msgs), msgs
    assert not any("checksum" in m for m in msgs)
    assert torch.equal(g.weights["secret_w"].encoding.decode(), torch.from_numpy(DATA))


@pytest.mark.parametrize("dims,dtype,match", [
    ([2 ** 62, 2 ** 62], TensorProto.FLOAT, "more than nnforge reads"),       # 2^126 elements: would overflow int64
    ([2 ** 40, 1024], TensorProto.INT4, "more than nnforge reads"),
    ([-1, 6], TensorProto.FLOAT, "negative dimension"),
    ([-2, -3], TensorProto.INT4, "negative dimension"),                     # product 6: looks plausible
])
def test_tensor_size_is_checked_before_reading_or_allocating(tmp_path, dims, dtype, match, opened):
    path = _model(tmp_path, _ext("w.bin", length=None), dims=dims, dtype=dtype)
    (path.parent / "w.bin").write_bytes(DATA.tobytes())
    with pytest.raises(FrontendError, match=match) as ei:
        from_onnx(path)
    assert "secret_w" in str(ei.value)
    assert opened == []


def test_raw_data_size_with_overflowing_dims_is_refused(tmp_path):
    t = helper.make_tensor("big_w", TensorProto.FLOAT, [6], DATA.tolist())
    del t.float_data[:]
    t.raw_data = DATA.tobytes()
    del t.dims[:]
    t.dims.extend([2 ** 31, 2 ** 31, 2 ** 31])           # 2^93 floats in 24 bytes
    graph = helper.make_graph([helper.make_node("Add", ["x", "big_w"], ["y"])], "g", [X_VI], [Y_VI], [t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(FrontendError, match="tensor big_w: .* more than nnforge reads"):
        from_onnx(path)


def test_external_data_error_reaches_the_user_through_compile(tmp_path):
    path = _model(tmp_path, _ext("../x.bin"))
    with pytest.raises(FrontendError, match="tensor secret_w: refusing external data location '../x.bin'"):
        nf.compile(os.fspath(path), "onnx", example_inputs=(torch.randn(2, 6),), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()

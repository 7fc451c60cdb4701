"""NNFORGE_TARGETS_PATH: target files and folders of them join the built-in targets without code,
read as the variable stands at each lookup; a name defined twice, or an entry that is neither a
folder nor a .toml file, is a TargetError naming the files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from nnforge.targets import PATH_ENV, TargetError, get_target, list_targets

TARGET = """\
name = "{name}"
description = "a test target"
backend = "onnx"
kind = "portable"
requires = ["onnxruntime"]

[formats]
native = ["fp32"]
"""


def write(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{name}.toml"
    p.write_text(TARGET.format(name=name))
    return p


def test_folders_and_files_on_the_path_add_targets(tmp_path, monkeypatch):
    builtin = [t.name for t in list_targets()]
    write(tmp_path / "dir", "extra-one")
    single = write(tmp_path / "loose", "extra-two")
    write(tmp_path / "loose", "not-listed")          # only the file named on the path is read
    monkeypatch.setenv(PATH_ENV, os.pathsep.join([str(tmp_path / "dir"), "", str(single)]))
    assert [t.name for t in list_targets()] == builtin + ["extra-one", "extra-two"]
    t = get_target("extra-two")
    assert t.path == str(single) and t.backend == "onnx"
    with pytest.raises(TargetError, match="unknown target 'not-listed'"):
        get_target("not-listed")
    monkeypatch.delenv(PATH_ENV)
    assert [t.name for t in list_targets()] == builtin          # read again when the variable changes


def test_a_name_defined_twice_is_refused(tmp_path, monkeypatch):
    first, second = write(tmp_path / "a", "twin"), write(tmp_path / "b", "twin")
    monkeypatch.setenv(PATH_ENV, os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    with pytest.raises(TargetError, match=f"{second}: target 'twin' is already defined by {first}"):
        list_targets()
    monkeypatch.setenv(PATH_ENV, str(write(tmp_path / "c", "h100")))
    with pytest.raises(TargetError, match="target 'h100' is already defined by .*nnforge/targets/h100.toml"):
        get_target("h100")


@pytest.mark.parametrize("entry", ["missing-folder", "notes.txt"])
def test_an_entry_that_is_not_a_target_is_refused(tmp_path, monkeypatch, entry):
    (tmp_path / "notes.txt").write_text("hello")
    monkeypatch.setenv(PATH_ENV, str(tmp_path / entry))
    with pytest.raises(TargetError, match=f"{PATH_ENV} lists .*{entry}.* neither a folder nor a .toml target file"):
        list_targets()

"""Target files: every TOML in nnforge/targets parses with the schema's keys and kinds, FPGA targets
carry their resource numbers, and malformed files are refused with a TargetError naming the file."""
from __future__ import annotations

import math
import tomllib
from pathlib import Path

import importlib

import pytest

from nnforge.targets import KINDS, REQUIREMENTS, Target, TargetError, _parse, get_target, list_targets

# (``nnforge.targets`` the attribute is the API function; the module is reached by its import path)
TARGET_DIR = Path(importlib.import_module("nnforge.targets").__file__).parent
TOMLS = sorted(TARGET_DIR.glob("*.toml"))
# Targets the design document names (DESIGN.md, "The public API").
DESIGN_TARGETS = ["onnx", "cpu", "xeon-spr", "h100", "a100", "apple-a17", "alveo-u280", "versal-vhk158"]


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_there_are_target_files():
    assert (TARGET_DIR / "onnx.toml") in TOMLS


@pytest.mark.parametrize("path", TOMLS, ids=[p.stem for p in TOMLS])
def test_every_target_file_parses(path):
    raw = tomllib.loads(path.read_text())
    t = _parse(path)
    assert isinstance(t, Target)
    assert t.name == path.stem == raw["name"]
    assert t.path == str(path)
    for key in ("name", "description", "backend", "kind"):
        assert isinstance(raw[key], str) and raw[key].strip(), key
    assert t.kind in KINDS
    assert isinstance(raw.get("requires", []), list)
    assert all(r in REQUIREMENTS for r in t.requires)
    assert len(set(t.requires)) == len(t.requires)
    for sec in ("memory", "compute", "formats", "fpga", "options"):
        assert isinstance(getattr(t, sec), dict)
    for sec in ("memory", "compute"):
        for key, value in getattr(t, sec).items():
            assert is_number(value) and value > 0, f"{path.name}: [{sec}] {key} = {value!r}"
    native = t.formats.get("native", [])
    assert isinstance(native, list) and native and all(isinstance(f, str) and f for f in native)
    assert len(set(native)) == len(native)
    assert t.native_formats == tuple(native)
    if t.kind != "fpga":
        assert not t.fpga, f"{path.name}: only fpga targets have an [fpga] table"
    ok, why = t.can_run()
    assert isinstance(ok, bool) and isinstance(why, str)
    d = t.to_dict()
    assert d["name"] == t.name and d["requires"] == list(t.requires) and d["formats"] == t.formats
    assert get_target(t.name) == t


@pytest.mark.parametrize("path", [p for p in TOMLS if tomllib.loads(p.read_text()).get("kind") == "fpga"],
                         ids=lambda p: p.stem)
def test_fpga_targets_have_resource_numbers(path):
    t = _parse(path)
    for key in ("dsp", "lut", "bram_36k"):
        assert is_number(t.fpga.get(key)) and t.fpga[key] > 0, f"{path.name}: [fpga] {key}"
        assert isinstance(t.fpga[key], int), f"{path.name}: [fpga] {key} counts resources, an integer"
    if "clock_mhz" in t.fpga:
        assert 10 <= t.fpga["clock_mhz"] <= 2000


def test_at_least_one_fpga_target():
    assert any(t.kind == "fpga" for t in list_targets())


def test_design_targets_exist():
    names = {t.name for t in list_targets()}
    assert set(DESIGN_TARGETS) <= names, sorted(set(DESIGN_TARGETS) - names)


def test_onnx_target_runs_here():
    t = get_target("onnx")
    assert t.backend == "onnx" and t.kind == "portable" and t.requires == ("onnxruntime",)
    assert t.can_run() == (True, "ok") and t.runs_here
    assert t.options.get("opset") == 21


def test_list_targets_matches_files():
    assert [t.name for t in list_targets()] == [p.stem for p in TOMLS]


def test_get_target_unknown_lists_known():
    with pytest.raises(TargetError) as ei:
        get_target("nope")
    msg = str(ei.value)
    assert "'nope'" in msg
    for p in TOMLS:
        assert p.stem in msg


def test_get_target_passes_target_objects_through():
    t = get_target("onnx")
    assert get_target(t) is t


# --- malformed target files ------------------------------------------------------------------------
GOOD = """\
name = "{name}"
description = "a test target"
backend = "onnx"
kind = "{kind}"
requires = {requires}
{extra}
[memory]
bandwidth_gbps = 100

[formats]
native = ["fp32"]
{tail}
"""
FPGA_TABLE = "\n[fpga]\ndsp = 10\nlut = 1000\nbram_36k = 5\n"


def write(tmp_path, stem="mytarget", *, name=None, kind="cpu", requires='["onnxruntime"]', extra="", tail="",
          text=None) -> Path:
    p = tmp_path / f"{stem}.toml"
    p.write_text(text if text is not None else
                 GOOD.format(name=name or stem, kind=kind, requires=requires, extra=extra, tail=tail))
    return p


def test_good_temp_file_parses(tmp_path):
    t = _parse(write(tmp_path))
    assert t.name == "mytarget" and t.memory == {"bandwidth_gbps": 100} and t.requires == ("onnxruntime",)
    f = _parse(write(tmp_path, "myfpga", kind="fpga", requires="[]", tail=FPGA_TABLE))
    assert f.fpga == {"dsp": 10, "lut": 1000, "bram_36k": 5}
    assert f.can_run() == (True, "ok")       # no requirements


BAD = {
    "unknown_key": (dict(extra='vendor = "acme"\n'), "vendor"),
    "name_differs": (dict(name="othername"), "othername"),
    "unknown_requirement": (dict(requires='["onnxruntime", "quantum-annealer"]'), "quantum-annealer"),
    "fpga_without_fpga_table": (dict(kind="fpga"), "[fpga]"),
    "fpga_with_empty_fpga_table": (dict(kind="fpga", tail="\n[fpga]\n"), "[fpga]"),
    "bad_kind": (dict(kind="tpu"), "tpu"),
    "section_not_a_table": (dict(extra='options = "fast"\n'), "options"),
    "not_toml": (dict(text="name = \n"), "cannot read"),
    "missing_backend": (dict(text='name = "mytarget"\ndescription = "x"\nkind = "cpu"\n'), "backend"),
    "non_string_kind": (dict(text='name = "mytarget"\ndescription = "x"\nbackend = "onnx"\nkind = 3\n'), "kind"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_target_file(tmp_path, case):
    kwargs, fragment = BAD[case]
    path = write(tmp_path, **kwargs)
    with pytest.raises(TargetError) as ei:
        _parse(path)
    msg = str(ei.value)
    assert str(path) in msg, msg          # names the file
    assert fragment in msg, msg


def test_missing_file(tmp_path):
    with pytest.raises(TargetError, match="gone.toml"):
        _parse(tmp_path / "gone.toml")


def test_can_run_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(REQUIREMENTS, "onnxruntime", lambda: (False, "python package onnxruntime"))
    ok, why = _parse(write(tmp_path)).can_run()
    assert not ok and why == "needs python package onnxruntime"

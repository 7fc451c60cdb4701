"""GPU architecture files (nnforge/targets/gpu/): each parses with the schema's keys, the GPU targets
name one by compute capability and agree with it on fp8, a device finds the file of its capability
(or the newest older one), and malformed files are refused with a TargetError naming the file."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from nnforge.targets import TargetError, _parse, get_target, list_targets
from nnforge.targets.architectures import (GPU_DIR, GpuArch, arch_for_capability, arch_of, gpu_archs, load_archs,
                                           parse_arch)

ARCH_DIR = Path(importlib.import_module("nnforge.targets").__file__).parent / GPU_DIR
ARCH_FILES = sorted(ARCH_DIR.glob("*.toml"))


@pytest.mark.parametrize("path", ARCH_FILES, ids=[p.stem for p in ARCH_FILES])
def test_every_architecture_file_parses(path):
    arch = parse_arch(path)
    assert isinstance(arch, GpuArch) and arch.name == path.stem == f"sm_{arch.sm}" and arch.path == str(path)
    assert arch.description and 48 <= arch.shared_memory_per_block_kb <= 256
    # PTX ISA: e4m3/e5m2 MMA from sm_89 on
    assert arch.fp8_tensor_cores == (arch.capability >= (8, 9))
    assert arch.tiles and all(rows for buckets in arch.tiles.values() for rows in buckets.values())


def test_the_shipped_architectures():
    assert [a.name for a in gpu_archs()] == ["sm_80", "sm_86", "sm_89", "sm_90"]


def test_gpu_targets_name_their_architecture():
    assert arch_of(get_target("h100")).name == "sm_90" and arch_of(get_target("a100")).name == "sm_80"
    for t in list_targets():
        if "compute_capability" in t.options:
            arch = arch_of(t)
            assert arch.fp8_tensor_cores == any(f.startswith("fp8") for f in t.native_formats), t.name


def test_a_device_finds_its_architecture_or_the_newest_older_one():
    assert arch_for_capability((8, 9)).name == "sm_89"
    assert arch_for_capability((8, 7)).name == "sm_86"          # no sm_87 file: sm_86 code runs there
    assert arch_for_capability((12, 0)).name == "sm_90"
    assert arch_for_capability((8, 7), exact=True) is None
    assert arch_for_capability((7, 5)) is None


# --- malformed architecture files ------------------------------------------------------------------
GOOD = """\
name = "{name}"
description = "a test architecture"
compute_capability = "{cap}"
shared_memory_per_block_kb = 99
fp8_tensor_cores = false
{extra}
[tiles.minifloat]
decode = {tiles}
"""


def write_arch(folder: Path, name="sm_75", cap="7.5", extra="", tiles="[[16, 64, 128, 4, 4]]", text=None) -> Path:
    (folder / GPU_DIR).mkdir(parents=True, exist_ok=True)
    p = folder / GPU_DIR / f"{name}.toml"
    p.write_text(text if text is not None else GOOD.format(name=name, cap=cap, extra=extra, tiles=tiles))
    return p


def test_good_architecture_file(tmp_path):
    arch = parse_arch(write_arch(tmp_path))
    assert arch.capability == (7, 5) and arch.sm == 75
    assert arch.tiles == {"minifloat": {"decode": ((16, 64, 128, 4, 4),)}}


BAD = {
    "unknown_key": (dict(extra='vendor = "acme"\n'), "unknown key(s) vendor"),
    "missing_key": (dict(text='name = "sm_75"\ncompute_capability = "7.5"\n'), "missing key(s)"),
    "name_not_capability": (dict(name="sm_75", cap="8.0"), "must be 'sm_80'"),
    "bad_capability": (dict(cap="eight"), "compute_capability must be"),
    "short_tile": (dict(tiles="[[16, 64, 128, 4]]"), "5 integers"),
    "odd_block": (dict(tiles="[[16, 48, 128, 4, 4]]"), "block_n = 48"),
    "tiny_block": (dict(tiles="[[8, 64, 128, 4, 4]]"), "block_m = 8 (tl.dot needs 16"),
    "no_stages": (dict(tiles="[[16, 64, 128, 4, 0]]"), "num_stages = 0"),
    "empty_bucket": (dict(tiles="[]"), "non-empty list"),
    "not_toml": (dict(text="name = \n"), "cannot read"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_architecture_file(tmp_path, case):
    kwargs, fragment = BAD[case]
    path = write_arch(tmp_path, **kwargs)
    with pytest.raises(TargetError) as ei:
        parse_arch(path)
    assert str(path) in str(ei.value) and fragment in str(ei.value), str(ei.value)


def test_one_capability_in_two_folders_is_refused(tmp_path):
    write_arch(tmp_path / "a")
    second = write_arch(tmp_path / "b")
    with pytest.raises(TargetError, match=f"{second}: compute capability 7.5 is already described by .*a/gpu/sm_75"):
        load_archs([tmp_path / "a", tmp_path / "b"])


# --- GPU targets against their architecture --------------------------------------------------------
GPU = """\
name = "{name}"
description = "a test GPU"
backend = "triton"
kind = "gpu"
requires = ["triton", "cuda"]

[compute]
sms = 10

[formats]
native = {native}

[options]
compute_capability = "{cap}"
"""


def write_gpu(folder: Path, name="mygpu", cap="8.6", native='["fp16", "int8"]') -> Path:
    p = folder / f"{name}.toml"
    p.write_text(GPU.format(name=name, cap=cap, native=native))
    return p


def test_a_gpu_target_of_a_known_architecture_parses(tmp_path):
    t = _parse(write_gpu(tmp_path))
    assert arch_of(t).name == "sm_86"


@pytest.mark.parametrize("cap, native, fragment", [
    ("7.5", '["fp16"]', r"compute capability 7.5 has no architecture file gpu/sm_75.toml \(known: sm_80, sm_86"),
    ("8.6", '["fp16", "fp8_e4m3"]', "lists fp8_e4m3, but sm_86 .* has no fp8 tensor cores"),
    ("8.9", '["fp16"]', "sm_89 .* has fp8 tensor cores, but \\[formats\\] native lists no fp8"),
    ("9", '["fp16"]', "compute_capability must be a string \"major.minor\""),
])
def test_a_gpu_target_that_disagrees_with_its_architecture_is_refused(tmp_path, cap, native, fragment):
    path = write_gpu(tmp_path, cap=cap, native=native)
    with pytest.raises(TargetError, match=fragment) as ei:
        _parse(path)
    assert str(path) in str(ei.value)


def test_a_new_architecture_is_two_files_through_the_path(tmp_path, monkeypatch):
    write_arch(tmp_path)
    product = write_gpu(tmp_path, name="t4", cap="7.5", native='["fp16"]')
    with pytest.raises(TargetError, match="no architecture file gpu/sm_75.toml"):
        _parse(product)
    monkeypatch.setenv("NNFORGE_TARGETS_PATH", str(tmp_path))
    assert arch_of(get_target("t4")).name == "sm_75" and arch_for_capability((7, 5)).name == "sm_75"
    assert [a.name for a in gpu_archs()][0] == "sm_75"

"""Hardware targets: one TOML file per target, holding its numbers; no code per target.

Schema (every key is checked; an unknown key is an error naming the file):

    name = "h100"                     # must equal the file name
    description = "..."
    backend = "triton"                # the backend that lowers for it
    kind = "gpu"                      # portable | cpu | gpu | mobile | fpga
    requires = ["cuda"]               # what must be present to *run* a bundle here (see requirement())
    [memory]   bandwidth_gbps, capacity_gb, ...          # numbers, each with its source in a comment
    [compute]  peak rates per format, e.g. fp16_tflops, int8_tops, cores, clock_ghz
    [formats]  native = ["fp16", "int8", ...]            # number formats the hardware runs natively
    [fpga]     dsp, lut, ff, bram_36k, uram, hbm_channels, clock_mhz   (FPGAs only)
    [options]  backend-specific settings (llvm target string, deployment target, ...)

A GPU target's ``options.compute_capability`` ("9.0") names its architecture file,
``gpu/sm_90.toml`` (:mod:`.architectures`): what all GPUs of that architecture share (tile sizes,
fp8 tensor cores, shared memory) lives there, so a new GPU of a known architecture is one file.

More targets: ``NNFORGE_TARGETS_PATH`` lists, separated by ``os.pathsep``, target files and folders
of them (each folder's ``*.toml``, and architecture files in its ``gpu/``); they join the built-in
ones, and a name or architecture defined twice is an error naming both files.

    >>> import nnforge as nf
    >>> [t.name for t in nf.targets()]
    $ NNFORGE_TARGETS_PATH=~/my-targets nnforge compile model.onnx --target l40s
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
import tomllib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from . import architectures
from .errors import TargetError

_DIR = Path(__file__).parent
PATH_ENV = "NNFORGE_TARGETS_PATH"
KINDS = ("portable", "cpu", "gpu", "mobile", "fpga")
_TOP_KEYS = {"name", "description", "backend", "kind", "requires", "memory", "compute", "formats", "fpga", "options"}
_SECTIONS = ("memory", "compute", "formats", "fpga", "options")




def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def host_cpu_flags() -> set[str] | None:
    """This CPU's flags from /proc/cpuinfo (None where there is no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _cpu_flags() -> set[str]:
    return host_cpu_flags() or set()


def _cuda() -> tuple[bool, str]:
    try:
        import torch
        if torch.cuda.is_available():
            return True, torch.cuda.get_device_name(0)
    except Exception:       # a broken CUDA install must not break `nnforge targets`
        pass
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # how CI runs GPU bundles: Triton's interpreter executes the kernels on torch CPU tensors
        return True, "no CUDA GPU: Triton's CPU interpreter stands in (TRITON_INTERPRET=1), slowly"
    return False, "a CUDA GPU (none visible; TRITON_INTERPRET=1 runs Triton bundles on the CPU, slowly)"


# Each requirement: a check returning (ok, detail).
REQUIREMENTS = {
    "onnxruntime": lambda: (_has_module("onnxruntime"), "python package onnxruntime"),
    "tvm": lambda: (_has_module("tvm"), "python package apache-tvm"),
    "triton": lambda: (_has_module("triton"), "python package triton"),
    "coremltools": lambda: (_has_module("coremltools"), "python package coremltools"),
    "hls4ml": lambda: (_has_module("hls4ml"), "python package hls4ml (ap_types headers)"),
    "torch-mlir": lambda: (_has_module("torch_mlir"), "python package torch-mlir (its reference JIT runs the module)"),
    "g++": lambda: (shutil.which("g++") is not None, "g++ on PATH"),
    "cuda": _cuda,
    "macos": lambda: (sys.platform == "darwin", "macOS (Core ML runtime)"),
    "x86_64": lambda: (platform.machine() in ("x86_64", "AMD64"), "an x86-64 CPU"),
    "avx512": lambda: ("avx512f" in _cpu_flags(), "a CPU with AVX-512"),
    "amx": lambda: ("amx_tile" in _cpu_flags(), "a CPU with AMX"),
    "amd-zen4": lambda: ("avx512f" in _cpu_flags() and "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
                         if Path("/proc/cpuinfo").exists() else False, "an AMD Zen 4 CPU"),
    "fpga-board": lambda: (False, "an FPGA board with its Xilinx runtime (C-simulation runs via g++ instead)"),
}


def requirement(name: str):
    """The check of requirement ``name``: one of :data:`REQUIREMENTS` (what a machine has), or
    ``python:MODULE[=DISTRIBUTION]`` for any Python package (a new backend's target file names its
    own package that way, with no change here); None for an unknown name."""
    if name in REQUIREMENTS:
        return REQUIREMENTS[name]
    if name.startswith("python:") and len(name) > len("python:"):
        module, _, dist = name[len("python:"):].partition("=")
        return lambda: (_has_module(module), f"python package {dist or module}")
    return None


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str
    kind: str
    requires: tuple[str, ...]
    memory: dict = field(default_factory=dict)
    compute: dict = field(default_factory=dict)
    formats: dict = field(default_factory=dict)
    fpga: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    path: str = ""

    def can_run(self) -> tuple[bool, str]:
        """Whether a bundle for this target runs on this machine, and why not if it does not."""
        missing = []
        for r in self.requires:
            ok, detail = requirement(r)()
            if not ok:
                missing.append(detail)
        return (not missing, "ok" if not missing else "needs " + ", ".join(missing))

    @property
    def runs_here(self) -> bool:
        return self.can_run()[0]

    @property
    def native_formats(self) -> tuple[str, ...]:
        return tuple(self.formats.get("native", ()))

    def with_options(self, **options) -> "Target":
        """This target with backend options added or replaced, e.g. the tvm backend's tuning:

        >>> nf.target("cpu").with_options(tune=True, tune_rows=[128])
        """
        return replace(self, options={**self.options, **options})

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "backend": self.backend, "kind": self.kind,
                "requires": list(self.requires), "memory": self.memory, "compute": self.compute,
                "formats": self.formats, "fpga": self.fpga, "options": self.options}


def _parse(path: Path, archs: dict | None = None) -> Target:
    """One target file, checked; ``archs`` (default: every known one) are the GPU architectures
    a GPU target's compute capability is checked against."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TargetError(f"{path}: cannot read target file: {e}") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise TargetError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    for key in ("name", "description", "backend", "kind"):
        if not isinstance(data.get(key), str):
            raise TargetError(f"{path}: missing or non-string '{key}'")
    if data["name"] != path.stem:
        raise TargetError(f"{path}: name {data['name']!r} differs from the file name {path.stem!r}")
    if data["kind"] not in KINDS:
        raise TargetError(f"{path}: kind {data['kind']!r} is not one of {', '.join(KINDS)}")
    requires = data.get("requires", [])
    bad = [r for r in requires if requirement(r) is None]
    if bad:
        raise TargetError(f"{path}: unknown requirement(s) {', '.join(bad)}; known: {', '.join(REQUIREMENTS)}, or "
                          "python:MODULE[=DISTRIBUTION] for a Python package")
    for sec in _SECTIONS:
        if not isinstance(data.get(sec, {}), dict):
            raise TargetError(f"{path}: [{sec}] must be a table")
    if data["kind"] == "fpga" and not data.get("fpga"):
        raise TargetError(f"{path}: an fpga target needs an [fpga] table (dsp, lut, bram_36k, ...)")
    target = Target(data["name"], data["description"], data["backend"], data["kind"], tuple(requires),
                    *(data.get(sec, {}) for sec in _SECTIONS), path=str(path))
    if "compute_capability" in target.options:
        architectures.check_gpu_target(target, archs)
    return target


@dataclass(frozen=True)
class _Registry:
    targets: dict            # name -> Target
    archs: dict              # (major, minor) -> GpuArch


def _extra_paths(value: str) -> tuple[list[Path], list[Path]]:
    """(folders, files) that ``NNFORGE_TARGETS_PATH`` lists."""
    dirs, files = [], []
    for entry in filter(None, value.split(os.pathsep)):
        p = Path(entry).expanduser()
        if p.is_dir():
            dirs.append(p)
        elif p.is_file() and p.suffix == ".toml":
            files.append(p)
        else:
            raise TargetError(f"{PATH_ENV} lists {entry!r}, which is neither a folder nor a .toml target file")
    return dirs, files


@lru_cache(maxsize=8)
def _load(extra: str) -> _Registry:
    dirs, files = _extra_paths(extra)
    archs = architectures.load_archs([_DIR, *dirs])
    targets: dict[str, Target] = {}
    for p in [*sorted(_DIR.glob("*.toml")), *(q for d in dirs for q in sorted(d.glob("*.toml"))), *files]:
        t = _parse(p, archs)
        if t.name in targets:
            raise TargetError(f"{p}: target {t.name!r} is already defined by {targets[t.name].path}; "
                              "give it another name (and file name)")
        targets[t.name] = t
    return _Registry(targets, archs)


def _registry() -> _Registry:
    """The built-in targets and architectures, with those of ``NNFORGE_TARGETS_PATH`` as it is now."""
    return _load(os.environ.get(PATH_ENV, ""))


architectures.catalogue = lambda: _registry().archs


def _all() -> dict[str, Target]:
    return _registry().targets


def get_target(name: str | Target) -> Target:
    if isinstance(name, Target):
        return name
    targets = _all()
    if name not in targets:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(targets)}")
    return targets[name]


def list_targets() -> list[Target]:
    return list(_all().values())

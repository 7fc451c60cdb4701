"""C-simulation: compile a generated HLS project with g++ against hls4ml's ap_types headers into a
shared library, and call its ``nf_run`` through ctypes (hls4ml's ``compile()`` route).

Builds are cached by the sha256 of every source byte and the compiler command, under
``$NNFORGE_HLS_CACHE`` (default ``~/.cache/nnforge/hls``); a build is written to a temporary
folder and renamed into place, so concurrent builds never see half a library.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..base import BackendError

# Every generated project instantiates the same templates with config structs of the same names
# (cfg_n_linear ...) but other contents; with default visibility a second library loaded into the
# process would bind to the first one's instantiations. Hidden visibility keeps each library's own
# code private; only nf_run (marked in host.cpp) is exported.
CXXFLAGS = ["-std=c++14", "-O1", "-fPIC", "-shared", "-w", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]


def ap_types_dir() -> Path:
    spec = importlib.util.find_spec("hls4ml")
    if spec is None or spec.origin is None:
        raise BackendError("C-simulation needs the ap_types headers that the hls4ml package ships: pip install hls4ml")
    d = Path(spec.origin).parent / "templates" / "vivado" / "ap_types"
    if not (d / "ap_fixed.h").exists():
        raise BackendError(f"hls4ml is installed without its ap_types headers ({d}/ap_fixed.h is missing)")
    return d


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        raise BackendError("C-simulation needs g++ on PATH (or $CXX)")
    return cxx


def cache_root() -> Path:
    return Path(os.environ.get("NNFORGE_HLS_CACHE") or Path.home() / ".cache" / "nnforge" / "hls")


def build(files: dict[str, bytes], top: str, project: str = "hls", defines: tuple[str, ...] = ()) -> Path:
    """The shared library for the project ``files`` ({relative path: bytes}); built once per content.
    ``defines``: preprocessor names, e.g. ``("NF_AP_MAC",)`` to sum inner products in ap_int as
    synthesis does instead of the host's int64 (see nf_types.h)."""
    cxx = compiler()
    inc = ap_types_dir()
    h = hashlib.sha256()
    for rel in sorted(files):
        if rel.startswith(f"{project}/src/"):
            h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    flags = [*CXXFLAGS, *(f"-D{d}" for d in defines)]
    h.update(" ".join([cxx, *flags, str(inc)]).encode())
    out = cache_root() / h.hexdigest()[:32]
    lib = out / "libnf_csim.so"
    if lib.exists():
        return lib
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=out.parent))
    try:
        for rel, data in files.items():
            if rel.startswith(f"{project}/src/"):
                p = tmp / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
        src = tmp / project / "src"
        cmd = [cxx, *flags, f"-I{src}", f"-I{src / 'nf'}", f"-I{inc}", str(src / f"{top}.cpp"),
               str(src / "host.cpp"), "-o", str(tmp / "libnf_csim.so")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BackendError(f"g++ failed to build the C-simulation of {top}:\n{r.stderr[-3000:]}")
        try:
            os.replace(tmp, out)
        except OSError:            # another process finished the same build first
            if not lib.exists():
                raise
        return lib
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class CSim:
    """A built C-simulation: ``run(inputs) -> outputs`` (float32 arrays in port order). A design
    with a KV cache (``kv_words`` > 0) takes its off-chip memory as an int32 array that ``run``
    updates in place, so the caller keeps the cache between calls."""

    def __init__(self, lib: Path, weights: bytes, in_sizes: list[int], out_sizes: list[int], kv_words: int = 0):
        self._lib = ctypes.CDLL(os.fspath(lib))
        self._run = self._lib.nf_run
        self._run.restype = ctypes.c_int
        self._run.argtypes = [ctypes.POINTER(ctypes.POINTER(ctypes.c_float)),
                              ctypes.POINTER(ctypes.POINTER(ctypes.c_float)), ctypes.c_char_p] + \
            ([ctypes.POINTER(ctypes.c_int32)] if kv_words else [])
        self._weights = bytes(weights)
        self.in_sizes, self.out_sizes, self.kv_words = in_sizes, out_sizes, kv_words

    def run(self, inputs: list[np.ndarray], kv: np.ndarray | None = None) -> list[np.ndarray]:
        xs = [np.ascontiguousarray(x, dtype=np.float32).reshape(-1) for x in inputs]
        for x, n in zip(xs, self.in_sizes):
            if x.size != n:
                raise BackendError(f"C-simulation input has {x.size} elements, expected {n}")
        ys = [np.empty(n, np.float32) for n in self.out_sizes]
        P = ctypes.POINTER(ctypes.c_float)
        ins = (P * max(1, len(xs)))(*[x.ctypes.data_as(P) for x in xs])
        outs = (P * max(1, len(ys)))(*[y.ctypes.data_as(P) for y in ys])
        extra = []
        if self.kv_words:
            if kv is None or kv.dtype != np.int32 or kv.size != self.kv_words or not kv.flags.c_contiguous:
                raise BackendError(f"C-simulation needs its KV-cache memory as {self.kv_words} contiguous int32 words")
            extra = [kv.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))]
        rc = self._run(ins, outs, self._weights, *extra)
        if rc != 0:
            raise BackendError(f"C-simulation returned {rc}")
        return ys

"""Triton weight kernels for the GPU backend: one module per stored weight format.

Contract every kernel module keeps (the backend's launcher and the benchmarks rely on it):

    FORMAT: str                                   # e.g. "w4a16", the key in the bundle's manifest
    supports(enc, target) -> str | None           # None when this module runs ``enc`` for ``target``
                                                  # (a Triton GPU target or its name); otherwise why not
    pack(enc, target) -> PackedWeight             # at compile time, on the CPU, from the IR encoding:
                                                  # the layout the kernel streams, as torch tensors
    matmul(x, w: PackedWeight, bias=None) -> y    # y[M, N] = x[M, K] @ W.T (+ bias), W = enc.decode();
                                                  # x fp16 or bf16 (y in x's dtype), fp32 accumulation

``PackedWeight.tensors`` go into the bundle's safetensors under ``<weight>.<field>``, ``meta`` into
the manifest (JSON-able), so ``PackedWeight(format, n, k, tensors, meta)`` rebuilt from them must
run unchanged: a load never re-packs.

Every kernel runs on the CPU under ``TRITON_INTERPRET=1`` (set before triton is imported) on
torch CPU tensors, which is how CI checks them, and is compiled ahead of time for every GPU
architecture nnforge has a file for in the tests (``compile_for`` / ``compile_many``, which work
in an interpreting process too), which checks what the interpreter cannot: that the kernel is a
valid GPU kernel for each architecture with every one of its candidate tile configs, specialised
as a real launch specialises it.

Nothing about a GPU is written here: the kernels see a :class:`.common.GpuTarget` built from the
target's TOML (``nnforge/targets/<name>.toml``) and its architecture file
(``nnforge/targets/gpu/sm_XY.toml``: tile candidates, fp8 tensor cores), or at run time from the
device (its SM count, and the architecture file of its compute capability). Tile configs are
autotuned per GPU: the architecture file lists the candidates per kernel family and M bucket
(the hand-picked default first); on a CUDA device the first call of a shape times them with
``triton.testing.do_bench`` on the real operands and the process keeps the fastest (in memory, not
on disk); under the interpreter, or with ``NNFORGE_TRITON_AUTOTUNE=0``, the default runs untimed.

What the modules share (tile config type, the GPU view, operand checks, split-K plumbing, the
autotuner) is in :mod:`.common`. :mod:`.intact` packs nothing either: it runs intweight's packed
weights on int8 activation codes (its ``supports``, ``quantize`` and ``matmul`` take them). :mod:`.attention` and :mod:`.hadamard` run ops that read no
weight: they keep none of the contract above but the interpreter rule, and pack nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ....errors import KernelError, NnforgeError  # noqa: F401  (KernelError: the one tvm's kernels raise too)


@dataclass
class PackedWeight:
    format: str
    n: int                      # output features (rows of W)
    k: int                      # input features (columns of W)
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def to(self, device) -> "PackedWeight":
        return PackedWeight(self.format, self.n, self.k, {k: v.to(device) for k, v in self.tensors.items()},
                            dict(self.meta))


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class CompileError(NnforgeError, RuntimeError):
    """Triton could not build a kernel for a GPU; the message is Triton's."""


@dataclass
class AotKernel:
    """An ahead-of-time build: what the tests read from it."""
    name: str
    capability: int
    ptx: str
    cubin: bytes
    shared: int                 # bytes of shared memory per program


@dataclass
class Build:
    """One ahead-of-time build of ``fn`` (a module-level ``@triton.jit`` kernel) for compute
    ``capability`` (80 for sm_80, 90 for sm_90: ``GpuArch.sm``). ``signature`` maps every
    argument to its Triton type ("*fp16", "i32", "constexpr", ...). Like a real launch, every
    pointer is taken as 16-byte aligned (torch allocations are) and the int arguments named in
    ``divisible`` as multiples of 16, which is what lets Triton vectorise loads and pipeline them
    with cp.async."""
    fn: object
    signature: dict[str, str]
    constexprs: dict
    capability: int
    num_warps: int = 4
    num_stages: int = 3
    divisible: tuple[str, ...] = ()


def compile_for(fn, signature: dict[str, str], constexprs: dict, capability: int, num_warps: int = 4,
                num_stages: int = 3, *, divisible: tuple[str, ...] = ()) -> AotKernel:
    """Compile ``fn`` ahead of time for an NVIDIA GPU without a GPU present (Triton's own ptxas
    builds the cubin); see :class:`Build`. Raises :class:`CompileError` with Triton's message.

    >>> k = compile_for(minifloat._fp8act_kernel, sig, consts, 90, 8, 3, divisible=("K", "stride_xm"))
    >>> "wgmma" in k.ptx, k.shared"""
    got = compile_many([Build(fn, signature, constexprs, capability, num_warps, num_stages, tuple(divisible))])[0]
    if isinstance(got, CompileError):
        raise got
    return got


def compile_many(builds: list[Build]) -> list[AotKernel | CompileError]:
    """Every build, in order: an :class:`AotKernel`, or the :class:`CompileError` it raised.

    Under ``TRITON_INTERPRET=1`` ``@triton.jit`` makes interpreter functions, and Triton patches
    ``triton.language`` for the interpreter for good, so nothing can be compiled in that process:
    the builds then run in child processes without the variable (one per CPU, up to four: each
    build is a single-threaded ptxas run, and the tests compile every autotuning candidate), which
    find each kernel again by its module and name."""
    if not interpreting():
        return [_build(b.fn, b) for b in builds]
    import base64
    import json
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    jobs = [dict(module=_module_of(b.fn), name=_name_in_module(b.fn), signature=b.signature,
                 constexprs=b.constexprs, capability=b.capability, num_warps=b.num_warps,
                 num_stages=b.num_stages, divisible=list(b.divisible)) for b in builds]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[3])          # the directory holding nnforge/
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    workers = max(1, min(len(jobs), os.cpu_count() or 1, 4))
    chunks = [jobs[i::workers] for i in range(workers)]          # interleaved: similar work per child

    def compile_chunk(chunk):
        run = subprocess.run([sys.executable, "-c", f"import {__name__} as k; k._child()"], input=json.dumps(chunk),
                             capture_output=True, text=True, env=env, timeout=1800)
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith("AOT ")]
        if run.returncode != 0 or not lines:
            raise CompileError(f"the compile process failed (exit {run.returncode}): {run.stderr[-3000:]}")
        return json.loads(lines[-1][4:])
    with ThreadPoolExecutor(workers) as pool:           # threads only wait on the child processes
        results = list(pool.map(compile_chunk, chunks))
    out = []
    for i in range(len(jobs)):
        r = results[i % workers][i // workers]
        out.append(CompileError(r["error"]) if "error" in r else
                   AotKernel(r["name"], r["capability"], r["ptx"], base64.b64decode(r["cubin"]), r["shared"]))
    return out


def _module_of(fn) -> str:
    return getattr(fn, "fn", fn).__module__


def _name_in_module(fn) -> str:
    """The module-level name of ``fn`` (a kernel jitted after its def keeps its def's name on
    ``.fn``, so look for the object itself first)."""
    import importlib
    module = importlib.import_module(_module_of(fn))
    for name, value in vars(module).items():
        if value is fn:
            return name
    return getattr(fn, "fn", fn).__qualname__


def _build(fn, b: Build) -> AotKernel | CompileError:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    fn = fn if isinstance(fn, JITFunction) else JITFunction(getattr(fn, "fn", fn))
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in b.signature.items()
             if t.startswith("*") or a in b.divisible}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=b.signature, constexprs=b.constexprs, attrs=attrs),
                           target=GPUTarget("cuda", b.capability, 32),
                           options={"num_warps": b.num_warps, "num_stages": b.num_stages})
    except Exception as e:              # noqa: BLE001 - a build that fails is a result to report
        return CompileError(f"{type(e).__name__}: {e}")
    return AotKernel(fn.__name__, b.capability, k.asm["ptx"], k.asm["cubin"], k.metadata.shared)


def _child() -> None:
    """The compile process: builds from stdin (JSON), results on stdout."""
    import base64
    import importlib
    import json
    import sys
    out = []
    for j in json.loads(sys.stdin.read()):
        fn = getattr(importlib.import_module(j.pop("module")), j.pop("name"))
        k = _build(fn, Build(fn, **{**j, "divisible": tuple(j["divisible"])}))
        out.append({"error": str(k)[-2000:]} if isinstance(k, CompileError) else
                   {"name": k.name, "capability": k.capability, "ptx": k.ptx, "shared": k.shared,
                    "cubin": base64.b64encode(k.cubin).decode()})
    print("AOT " + json.dumps(out))

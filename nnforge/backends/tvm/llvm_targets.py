"""LLVM target strings (as in targets/*.toml) -> tvm Targets; apart from the backend so its kernels can resolve targets."""
from __future__ import annotations

import shlex

from ..base import BackendError


def parse_llvm_target(text: str) -> dict:
    """TVM's dict form of an LLVM target string: ``"llvm -mcpu=znver4 -mattr=+avx2,+fma"`` ->
    ``{"kind": "llvm", "mcpu": "znver4", "mattr": ["+avx2", "+fma"]}``. Keys are checked against
    TVM's llvm target options; list options split on commas, ``-key`` alone means true."""
    import tvm_ffi
    words = shlex.split(text) if isinstance(text, str) else []
    if not words or words[0] != "llvm":
        raise BackendError(f"LLVM target {text!r} must start with 'llvm' (e.g. 'llvm -mcpu=native')")
    options = dict(tvm_ffi.get_global_func("target.ListTargetKindOptionsFromName")("llvm"))
    out: dict = {"kind": "llvm"}
    for word in words[1:]:
        key, eq, value = word.lstrip("-").partition("=")
        if not word.startswith("-") or key not in options or key in ("kind", "host", "keys", "tag"):
            raise BackendError(f"LLVM target {text!r}: unknown option {word!r}; known: "
                               + ", ".join(f"-{k}" for k in sorted(options) if k not in ("kind", "host", "keys", "tag")))
        kind = str(options[key])
        if kind.startswith("Array"):
            out[key] = [v for v in value.split(",") if v]
        elif kind == "int":
            try:
                out[key] = int(value)
            except ValueError:
                raise BackendError(f"LLVM target {text!r}: -{key} needs an integer, got {value!r}") from None
        elif kind == "bool":
            out[key] = (not eq) or value.lower() in ("1", "true")
        else:
            out[key] = value
    return out


def host_cpu() -> tuple[str, list[str]]:
    """(LLVM CPU name, explicit +/- feature list) of this host, as clang's -mcpu=native sees it.
    The features matter: a hypervisor may hide extensions the CPU model implies."""
    import tvm_ffi
    import tvm  # noqa: F401  (registers the LLVM codegen functions)
    name = str(tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUName")())
    features = dict(tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")())
    return name, [("+" if bool(on) else "-") + str(f) for f, on in sorted(features.items())]


def resolve_target(llvm_target):
    """A ``tvm.target.Target`` for an LLVM target string (or Target, returned as is)."""
    import tvm
    if isinstance(llvm_target, tvm.target.Target):
        return llvm_target
    import tvm_ffi
    from tvm.target import codegen
    spec = parse_llvm_target(llvm_target)
    if spec.get("mcpu") == "native":
        spec["mcpu"], features = host_cpu()
        spec["mattr"] = features + list(spec.get("mattr", []))
    triple = spec.get("mtriple") or codegen.llvm_get_system_triple()
    if "mcpu" in spec and not tvm_ffi.get_global_func("target.llvm_is_valid_cpu")(spec["mcpu"], triple):
        # TVM would accept it and LLVM quietly fall back to a generic CPU
        raise BackendError(f"LLVM target {llvm_target!r}: LLVM knows no CPU {spec['mcpu']!r} for {triple}; use "
                           "'native' or a name such as sapphirerapids, znver4, skylake-avx512")
    try:
        return tvm.target.Target(spec)
    except Exception as e:   # TVM raises its own error types from C++
        raise BackendError(f"TVM rejects LLVM target {llvm_target!r} ({spec}): {str(e).splitlines()[0]}") from None

"""What the triton backend runs natively: its capability table, read by its lowering and by
``nnforge targets --explain``.

Dense weights of the matmul-like ops run as stored through the op's reference kernel in torch;
an encoded ``linear`` weight runs in the kernel module of its row when that module's
``supports(enc, target)`` takes it (the row's ``accepts`` is a :class:`Kernel`, which asks it).
The ``hadamard`` row has no weight: its "dense" is the float activation it transforms, and the
lowering asks ``kernels.hadamard.supports(block, target)`` node by node.
Whether a GPU has a format (fp8 tensor cores, say) comes from the target's architecture file,
which the modules read. Any other encoded weight is decoded at load, a reported fallback.

    >>> cap, why = CAPABILITIES.find("linear", weight.encoding, get_target("h100"))
    >>> cap.accepts.module if cap else why
    'intweight'
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ..base import Capabilities, Capability
from .decoder import FUSED, IN_PLACE
from .launcher import MATMUL_LIKE

KERNEL_PACKAGE = "nnforge.backends.triton.kernels"


def kernel_module(name: str) -> tuple[ModuleType | None, str]:
    """(the kernel module ``name``, "") or (None, why it is unavailable). Only triton itself may be
    missing; a shipped module that fails to import is a bug, raised, never a silent loss of its
    kernels."""
    try:
        return importlib.import_module(f"{KERNEL_PACKAGE}.{name}"), ""
    except ModuleNotFoundError as e:
        if e.name not in ("triton", "triton.language"):
            raise
        return None, "the triton package is not installed"


@dataclass(frozen=True)
class Kernel:
    """A row's ``accepts``: the kernel module ``module`` runs the weight when its ``supports``
    says so; otherwise why not, prefixed with the module's name."""
    module: str

    def __call__(self, enc, target) -> str | None:
        module, missing = kernel_module(self.module)
        if module is None:
            return f"{self.module}: {missing}"
        try:
            why = module.supports(enc, target)
        except Exception as e:       # supports() is meant to answer, not raise; say what it did
            why = f"supports() raised {type(e).__name__}: {e}"
        return None if why is None else f"{self.module}: {why}"


CAPABILITIES = Capabilities([
    *[Capability(op, "dense", f"torch {op} (the op's reference kernel) on fp16 operands, or bf16 with the "
                              "target option compute_dtype") for op in MATMUL_LIKE],
    Capability("linear", "int", "kernels.intweight: weight-only GEMM on 4- or 8-bit codes, per-tensor, channel or "
                                "group scales in fp16 (groups a multiple of 16 dividing K), zero points, act-order "
                                "applied in the kernel; int8 x int8 on tensor cores (kernels.intact) behind a "
                                "per-token int8/int4 dynamic_quant, for groups a multiple of 32", Kernel("intweight")),
    Capability("linear", "minifloat", "kernels.minifloat: weight GEMM on e4m3, e5m2, e3m2, e2m3 or e2m1 codes with "
                                      "float32/float16/bfloat16, e8m0 (MX) or e4m3 scales; fp8 x fp8 on tensor cores "
                                      "behind a static E4M3 fake_quant where the architecture has them",
               Kernel("minifloat")),
    Capability("linear", "palettized", "kernels.lut: look-up-table GEMM on 1..6- or 8-bit indices, one table per "
                                       "tensor or per group of rows", Kernel("lut")),
    Capability("linear", "sparse", "kernels.sparse24: 2:4 sparse GEMM with int4 or float kept values",
               Kernel("sparse24")),
    Capability("linear", "sparse", "kernels.csr: CSR (block1x1) SpMM gathering x's columns per kept fp32, fp16 or "
                                   "bf16 value, fp32 accumulation (SpQR's outliers)", Kernel("csr")),
    Capability("hadamard", "dense", "kernels.hadamard: butterflies over the power-of-two factor in registers, "
                                    "the Paley factor as a dense product, fp32 inside; blocks of up to 16384 values "
                                    "with m padded to a power of two"),
    *[Capability("kv_cache_write", kind, "the encoding's rows of each token scattered into the state in place "
                                         "(backends/triton/decoder.py)") for kind in IN_PLACE],
    *[Capability("kv_cache_read", kind, f"kernels.attention reads the {codes} state in registers, no float "
                                        "cache is made") for kind, codes in FUSED.items()],
    *[Capability("kv_cache_read", kind, "the op's reference read (a float cache each step), feeding the attention "
                                        "kernel") for kind in IN_PLACE if kind not in FUSED],
])

__all__ = ["CAPABILITIES", "KERNEL_PACKAGE", "Kernel", "kernel_module"]

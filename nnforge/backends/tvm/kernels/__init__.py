"""Hand-written TensorIR kernels of the tvm backend, one module per family of weight encoding.

Relax has no sparse or weight-only-quantised op, so every encoded weight reaches one of these
kernels through ``relax.call_tir``. The contract every builder follows:

- it returns a :class:`Kernel`: a ``PrimFunc`` whose parameters are ``(x, *consts, y)``, with
  ``x`` float32 ``[m, K]`` (``m`` a symbolic int64 row count: batch x sequence, flattened by the
  lowering), ``y`` float32 ``[m, N]`` written by the kernel, and ``consts`` the weight arrays in
  the layout the kernel reads (numpy, in parameter order). Bias and activations stay in Relax.
- the builder refuses, with a :class:`KernelError` naming the weight, any encoding it cannot run
  as it is stored (the lowering then records a fallback or raises); it never densifies silently.
- the schedule is chosen from the shape and the LLVM target string (vector width, threads), so
  one builder serves ``cpu`` (this host), ``xeon-spr`` and ``epyc``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ....errors import KernelError  # noqa: F401  (the kernel error triton's kernels raise too)


@dataclass
class Kernel:
    name: str                 # a C-identifier-safe name for the PrimFunc in the module
    func: object              # tvm PrimFunc (x, *consts, y)
    consts: list[np.ndarray]  # the kernel's weight arrays, in parameter order
    n: int                    # output features (y's second dim)
    k: int                    # input features (x's second dim)
    notes: dict = field(default_factory=dict)   # schedule chosen, layout facts, for the manifest

"""What the modules that bring weights to kernels (weights.py, weights_minifloat.py) share: C-safe
names, numpy views of IR tensors, JSON-able kernel notes, and the act-order of stacked weights.
"""
from __future__ import annotations

import re

import numpy as np

from ...ir import Value
from ..base import BackendError


def c_name(text: str) -> str:
    """A C-identifier-safe function name."""
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def numpy_of(t) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        raise BackendError("bfloat16 tensors have no numpy form; the tvm backend takes fp32/fp16 graphs")
    return t.detach().cpu().contiguous().numpy()


def _jsonable(notes: dict) -> dict:
    return {str(k): v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in notes.items()}


def perm_key(enc) -> tuple | None:
    """A weight's act-order column order as a comparable key (None: columns in order). GPTQ gives
    the layers of one input one order (they share a Hessian), so they still stack: x is permuted
    once for all of them."""
    return None if getattr(enc, "perm", None) is None else tuple(int(i) for i in enc.perm)


def stacked_perm(lw, parts: list[Value]):
    """The ``main`` parameter of the act-order shared by the stacked weights ``parts``, or None."""
    perm = parts[0].encoding.perm
    return None if perm is None else lw.extra(parts[0].name, "perm", numpy_of(perm).astype(np.int64))


__all__ = ["c_name", "numpy_of", "perm_key", "stacked_perm"]

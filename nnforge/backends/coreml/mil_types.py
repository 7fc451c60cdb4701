"""The MIL type computing each IR dtype; apart from lower.py so the per-op rules in ops.py can use it."""
from __future__ import annotations

import numpy as np

from ...ir.dtypes import DType
from ..base import BackendError


def mil_dtype(dt: DType) -> str:
    """The MIL type computing an IR dtype: every float in fp16, every integer in int32."""
    if dt.name == "bool":
        return "bool"
    if dt.is_float:
        return "fp16"
    if dt.is_integer:
        return "int32"
    raise BackendError(f"core ml has no tensor type for {dt.name}")


NP_OF = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": np.bool_}

MODEL_DIR = "model.mlpackage"
IO_NP = {"fp32": np.float32, "fp16": np.float16, "int32": np.int32}     # the package's I/O dtypes


def np_name(dt) -> str:
    """The numpy dtype a runner hands over for an IR dtype (floats other than fp16 as float32)."""
    if dt.is_float:
        return "float16" if dt.name == "float16" else "float32"
    return "bool" if dt.name == "bool" else np.dtype(dt.name).name

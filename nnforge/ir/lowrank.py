"""The ``LowRank`` weight encoding: a weight stored as two factors, optionally on top of a base.

``W ≈ base + B @ A`` on the 2-D view of the weight (rows = output channels, columns = all other
axes): ``A`` is ``[rank, cols]``, ``B`` is ``[rows, rank]`` and ``base`` (EoRA: the quantised
weight whose error the factors compensate) has the weight's full shape. Each part is itself an
:class:`~nnforge.ir.encodings.Encoding`, so factors can be int8 (``IntQuant``) or minifloats and
the base any quantised form.

The low-rank passes (:mod:`nnforge.passes.lowrank`) turn a ``LowRank`` weight read by linear
layers into two linear nodes (plus a parallel base linear and an add for EoRA), so backends only
ever see plain matmuls; a ``LowRank`` weight stays in a graph only where its readers cannot be
split that way, and backends then decode it.

Serialised as the parts' tensors under prefixed names (``a.data``, ``b.codes``, ``base.scale``,
...) and their kinds and parameters nested in ``params()``.

    >>> enc = LowRank(shape=(8, 16), a=Dense(torch.randn(2, 16)), b=Dense(torch.randn(8, 2)))
    >>> enc.decode().shape
    torch.Size([8, 16])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .dtypes import DType
from .encodings import Encoding, EncodingError, encoding_from_parts, register_encoding, rows_cols

_PARTS = ("a", "b", "base")


@register_encoding
@dataclass(frozen=True, eq=False)
class LowRank(Encoding):
    """``base + B @ A`` (see the module docstring); ``base`` may be None."""
    kind: ClassVar[str] = "lowrank"
    shape: tuple[int, ...]
    a: Encoding                     # [rank, cols]
    b: Encoding                     # [rows, rank]
    base: Encoding | None = None    # the weight's shape

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        rows, cols = rows_cols(self.shape)
        for name in _PARTS:
            part = getattr(self, name)
            if part is not None and not isinstance(part, Encoding):
                raise EncodingError(f"LowRank {name} must be an Encoding, got {type(part).__name__}")
        if len(self.a.shape) != 2 or len(self.b.shape) != 2:
            raise EncodingError(f"LowRank factors must be 2-D: a {tuple(self.a.shape)}, b {tuple(self.b.shape)}")
        rank = self.a.shape[0]
        if rank < 1 or tuple(self.a.shape) != (rank, cols) or tuple(self.b.shape) != (rows, rank):
            raise EncodingError(f"LowRank of shape {self.shape} needs a [rank, {cols}] and b [{rows}, rank] with the "
                                f"same rank >= 1, got a {tuple(self.a.shape)} and b {tuple(self.b.shape)}")
        if self.base is not None and tuple(self.base.shape) != self.shape:
            raise EncodingError(f"LowRank base has shape {tuple(self.base.shape)}, the weight has {self.shape}")
        dtypes = {getattr(self, n).dtype for n in _PARTS if getattr(self, n) is not None}
        if len(dtypes) != 1 or not self.a.dtype.is_float:
            raise EncodingError(f"LowRank parts must decode to one float dtype, got "
                                f"{', '.join(sorted(d.name for d in dtypes))}")

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def dtype(self) -> DType:
        return self.a.dtype

    @property
    def factor_params(self) -> int:
        """Numbers the two factors hold: rank * (rows + cols)."""
        rows, cols = rows_cols(self.shape)
        return self.rank * (rows + cols)

    def decode(self, dtype=None):
        # The product is formed in fp32 at least: fp16 factors would round it once more.
        work = torch.float64 if dtype == torch.float64 else torch.float32
        w = self.b.decode(work) @ self.a.decode(work)
        w = w.reshape(self.shape)
        if self.base is not None:
            w = w + self.base.decode(work)
        return w.to(dtype or self.dtype.torch_dtype)

    def parts(self) -> dict[str, Encoding]:
        return {n: getattr(self, n) for n in _PARTS if getattr(self, n) is not None}

    def tensors(self):
        return {f"{name}.{field}": t for name, part in self.parts().items() for field, t in part.tensors().items()}

    def params(self):
        return {"shape": list(self.shape),
                **{name: {"kind": part.kind, "params": part.params()} for name, part in self.parts().items()}}

    @classmethod
    def from_parts(cls, params, tensors):
        unclaimed = set(tensors)
        parts = {}
        for name in _PARTS:
            if name not in params:
                continue
            entry = params[name]
            prefix = f"{name}."
            own = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
            unclaimed -= {prefix + k for k in own}
            parts[name] = encoding_from_parts(entry["kind"], entry["params"], own)
        if "a" not in parts or "b" not in parts:
            raise EncodingError("LowRank needs both factors a and b")
        if unclaimed:
            raise EncodingError(f"LowRank: tensors {sorted(unclaimed)} belong to no part (a., b., base.)")
        return cls(shape=tuple(params["shape"]), **parts)

    def describe(self):
        text = f"rank {self.rank} [{self.a.describe()} x {self.b.describe()}]"
        return f"{self.base.describe()} + {text}" if self.base is not None else f"low-rank {text}"

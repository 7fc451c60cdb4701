"""Tensor types: an element dtype and a shape of (possibly symbolic) dimensions."""
from __future__ import annotations

from dataclasses import dataclass

from . import symbolic as sym
from .dtypes import DType, dtype as _dtype
from .symbolic import Dim


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: tuple[Dim, ...]

    def __post_init__(self):
        object.__setattr__(self, "dtype", _dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(sym.simplify(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def numel(self) -> Dim:
        return sym.prod(self.shape)

    def concrete(self, env: dict[str, int]) -> tuple[int, ...]:
        return tuple(sym.evaluate(d, env) for d in self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dt) -> "TensorType":
        return TensorType(_dtype(dt), self.shape)

    def same_as(self, other: "TensorType") -> bool:
        return (self.dtype == other.dtype and self.rank == other.rank
                and all(sym.equal(a, b) for a, b in zip(self.shape, other.shape)))

    def __str__(self) -> str:
        return f"{self.dtype.short}[{', '.join(str(d) for d in self.shape)}]"


def tensor(dt, *shape: Dim) -> TensorType:
    """Shorthand: ``tensor("f32", "batch", 384)``."""
    return TensorType(_dtype(dt), tuple(shape))

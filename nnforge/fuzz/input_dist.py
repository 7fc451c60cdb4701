"""How fuzz graph inputs are drawn, and the batch symbol; apart from generator.py so proposers need not import it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

SYMBOL = "batch"        # the dimension symbol of a dynamic graph, bound by its first input


@dataclass
class InputDist:
    """How a graph input's values are drawn: floats uniform in [lo, hi), ints in [lo, hi), bools."""
    kind: str
    lo: float = 0.0
    hi: float = 1.0

    def sample(self, shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
        if self.kind == "float":
            return (torch.rand(shape, generator=gen, dtype=torch.float64) * (self.hi - self.lo) + self.lo).to(dtype)
        if self.kind == "int":
            return torch.randint(int(self.lo), int(self.hi), shape, generator=gen, dtype=dtype)
        return torch.rand(shape, generator=gen) < 0.5

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lo": self.lo, "hi": self.hi}

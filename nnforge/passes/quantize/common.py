"""What every weight quantiser shares: the format options, their checks, and which weights it
takes (each weight once, even when several nodes read it)."""
from __future__ import annotations

from dataclasses import dataclass

from ...ir import Dense, Graph, Node, Value
from ...ir.ops import WEIGHT_SLOT
from ...ir.encodings import rows_cols
from ..base import LayerSelection, PassError
from .formats import FormatError, WeightFormat, parse_format


@dataclass
class WeightQuantConfig(LayerSelection):
    """``format`` names the grid (see :mod:`.formats`); ``bits`` with ``symmetric`` is a shorthand
    for ``int<bits>`` / ``uint<bits>``. ``group_size`` None means one scale per output channel.
    A group size that does not divide a layer's input columns is an error naming the layer,
    unless ``ragged_groups`` lets that layer's last group be shorter (MX and NVFP4 blocks always
    may be, as their specs say). ``observer`` fits the scales: ``minmax`` spans each group's range,
    ``mse`` searches the clipped range with the least weight error (see :meth:`.formats.WeightFormat.fit`)."""
    format: str | None = None
    bits: int | None = None
    symmetric: bool = True
    group_size: int | None = None
    per_tensor: bool = False
    scale_dtype: str = "float32"
    ragged_groups: bool = False
    observer: str = "minmax"

    def __post_init__(self):
        super().__post_init__()
        if "matmul" in self.ops:
            raise PassError(f"{self.name}: matmul weights are [K, N], not [out, in]; quantise linear layers "
                            "(the cleanup passes turn matmul + add with a 2-D weight into linear)")
        if self.format is not None and self.bits is not None:
            raise PassError(f"{self.name}: give format or bits, not both")
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(self.bits, int)
                                      or not 2 <= self.bits <= 8):
            raise PassError(f"{self.name}: bits must be an integer in 2..8, got {self.bits!r}")
        spec = self.format or f"{'int' if self.symmetric else 'uint'}{self.bits or 8}"
        try:
            self.weight_format: WeightFormat = parse_format(spec, group_size=self.group_size,
                                                            per_tensor=self.per_tensor, scale_dtype=self.scale_dtype,
                                                            observer=self.observer)
        except FormatError as e:
            raise PassError(f"{self.name}: {e}") from None

    def targets(self, graph: Graph) -> list[tuple[Node, Value]]:
        """(first node, weight) for every selected float weight still dense, each weight once;
        checks group sizes against each layer's input columns."""
        seen, out = set(), []
        fmt = self.weight_format
        for node in self.select(graph):
            w = node.inputs[WEIGHT_SLOT]
            if w.name in seen or not isinstance(w.encoding, Dense) or not w.dtype.is_float:
                continue
            seen.add(w.name)
            _, cols = rows_cols(w.shape)
            gs = fmt.group_size
            if gs is not None and cols % gs and not (self.ragged_groups or fmt.fixed_blocks):
                raise PassError(f"{self.name}: layer {node.name} ({w.name}, {list(w.shape)}) has {cols} input columns, "
                                f"which group_size {gs} does not divide; choose a group size that divides it, "
                                f"exclude the layer (exclude=[\"{node.name}\"]), or set ragged_groups=true")
            out.append((node, w))
        return out

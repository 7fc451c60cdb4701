"""Weight formats: a number grid plus how its scales are chosen and stored.

A :class:`WeightFormat` is everything a quantiser needs to know about a target format: how to fit
scales to a group of weights (RTN's choice, and GPTQ's when it reaches a new group), the
nearest-point function of the grid (``snap``) and how to store the result as an encoding. RTN and
GPTQ are written once against this interface, so every format works with both.

Spellings accepted by :func:`parse_format`:

- ``int2`` .. ``int8``: symmetric integers (signed codes, no zero point); ``uint2`` .. ``uint8``:
  asymmetric (unsigned codes with an integer zero point).
- ``e4m3`` (``fp8``), ``e5m2``, ``e3m2`` (``fp6``), ``e2m3``, ``e2m1`` (``fp4``): OCP minifloats
  with float scales per tensor, channel or group.
- ``mxfp8``, ``mxfp8_e5m2``, ``mxfp6``, ``mxfp6_e2m3``, ``mxfp4``: OCP MX, blocks of 32 with a
  shared E8M0 exponent.
- ``nvfp4``: E2M1 in blocks of 16 with E4M3 block scales and one fp32 tensor scale.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ...errors import NnforgeError
from ...ir import IntQuant, MiniFloat, dtype
from ...ir import minifloat as mf
from ...ir.dtypes import DType
from ...ir.encodings import Encoding, rows_cols


class FormatError(NnforgeError, ValueError):
    """An unknown or inconsistent weight format."""


_MINI = {"e4m3": "e4m3", "fp8": "e4m3", "fp8_e4m3": "e4m3", "e5m2": "e5m2", "fp8_e5m2": "e5m2",
         "e3m2": "e3m2", "fp6": "e3m2", "fp6_e3m2": "e3m2", "e2m3": "e2m3", "fp6_e2m3": "e2m3",
         "e2m1": "e2m1", "fp4": "e2m1", "fp4_e2m1": "e2m1"}
_MX = {"mxfp8": "e4m3", "mxfp8_e4m3": "e4m3", "mxfp8_e5m2": "e5m2", "mxfp6": "e3m2", "mxfp6_e3m2": "e3m2",
       "mxfp6_e2m3": "e2m3", "mxfp4": "e2m1"}
MX_BLOCK = 32
NV_BLOCK = 16
TINY = torch.finfo(torch.float32).tiny
OBSERVERS = ("minmax", "mse")
MSE_SHRINKS = 80        # range factors 1.0 down to 0.21 in steps of 0.01
MSE_NORM = 2.4          # the error norm of GPTQ's reference search: between MSE and max-error


@dataclass(frozen=True)
class WeightFormat:
    name: str
    kind: str                       # "int" | "float"
    bits: int
    symmetric: bool = True          # int only: signed codes, else unsigned + zero point
    element: DType | None = None    # float only: the minifloat of the codes
    group_size: int | None = None   # None: one scale per output channel (or per tensor)
    per_tensor: bool = False
    scale_format: DType = dtype("float32")
    two_level: bool = False         # NVFP4: e4m3 block scales times an fp32 tensor scale
    observer: str = "minmax"        # how scales are fitted: see fit

    @property
    def fixed_blocks(self) -> bool:
        """MX and NVFP4 define their block size; such formats allow a shorter last block."""
        return self.scale_format.kind == "minifloat"

    @property
    def code_range(self) -> tuple[int, int]:
        if self.symmetric:
            q = (1 << (self.bits - 1)) - 1
            return -q - 1, q
        return 0, (1 << self.bits) - 1

    def bits_per_weight(self, cols: int) -> float:
        """Storage per weight, scales included (per-channel scales amortised over ``cols``)."""
        per_scale = self.scale_format.bits + (0 if self.symmetric or self.kind == "float" else 8)
        if self.per_tensor:
            return float(self.bits)
        return self.bits + per_scale / (self.group_size or cols)

    # --- fitting --------------------------------------------------------------------------------
    def global_scale(self, w: torch.Tensor) -> torch.Tensor | None:
        """NVFP4's tensor scale: maps the largest block scale onto E4M3's top value."""
        if not self.two_level:
            return None
        amax = w.detach().abs().max().to(torch.float32)
        return (amax / (self.element.max_value * dtype("e4m3").max_value)).clamp(min=TINY).reshape(())

    def fit(self, groups: torch.Tensor, global_scale: torch.Tensor | None = None):
        """Scales (and zero points) for weights ``groups`` [R, G, n]: returns float32 effective
        scales [R, G] (exactly representable in the stored scale format) and int zero points [R, G]
        or None. The ``minmax`` observer spans each group's range (RTN's choice); ``mse`` shrinks
        the range by the factor, out of 1.0, 0.99, ..., 0.21, whose grid leaves the least
        ``sum |w - q|^2.4`` per group (the search of GPTQ's reference code and llm-compressor's
        MSE observer): clipping a few large weights buys finer steps for all the others."""
        if self.observer == "mse":
            return self._fit_mse(groups, global_scale)
        return self._fit_range(groups, global_scale)

    def _fit_mse(self, groups: torch.Tensor, global_scale: torch.Tensor | None):
        x = groups.to(torch.float32)
        best_s, best_z = self._fit_range(x, global_scale)
        best = self._clip_error(x, best_s, best_z)
        for i in range(1, MSE_SHRINKS):
            s, z = self._fit_range(x * (1 - i / 100), global_scale)
            err = self._clip_error(x, s, z)
            better = err < best
            best = torch.where(better, err, best)
            best_s = torch.where(better, s, best_s)
            if z is not None:
                best_z = torch.where(better, z, best_z)
        return best_s, best_z

    def _clip_error(self, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
        q = self.snap(x, scale[..., None], None if zp is None else zp[..., None])
        return (q - x).abs().pow(MSE_NORM).sum(-1)

    def _fit_range(self, groups: torch.Tensor, global_scale: torch.Tensor | None):
        x = groups.to(torch.float32)
        if self.kind == "int":
            lo_code, hi_code = self.code_range
            if self.symmetric:
                scale = (x.abs().amax(-1) / hi_code).clamp(min=TINY)
                return self._store_scale(scale), None
            lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
            scale = self._store_scale(((hi - lo) / hi_code).clamp(min=TINY))
            zp = torch.round(-lo / scale).clamp(lo_code, hi_code)
            return scale, zp.to(torch.int64)
        amax = x.abs().amax(-1)
        sf = self.scale_format
        if sf.short == "e8m0":
            return mf.decode(mf.e8m0_exponent(amax, self.element), sf), None
        if sf.short == "e4m3":
            g = global_scale if global_scale is not None else torch.tensor(1.0)
            block = amax / self.element.max_value / g
            return (mf.round_to(block, sf).to(torch.float32) * g).clamp(min=0), None
        return self._store_scale((amax / self.element.max_value).clamp(min=TINY)), None

    def _store_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """Round float scales to their storage dtype (fp16 scales are what a backend reads)."""
        return scale.to(self.scale_format.torch_dtype).to(torch.float32).clamp(min=TINY)

    # --- the grid -------------------------------------------------------------------------------
    def snap(self, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest grid value to ``x`` for the given (broadcastable) scale and zero point."""
        if self.kind == "int":
            lo, hi = self.code_range
            z = 0 if zp is None else zp.to(x.dtype)
            return (torch.clamp(torch.round(x / scale) + z, lo, hi) - z) * scale
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = mf.round_to(x / safe, self.element).to(x.dtype) * safe
        return torch.where(scale > 0, q, torch.zeros_like(q))

    def codes(self, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None = None) -> torch.Tensor:
        """Code fields for ``x`` (int64): signed integers, or minifloat bit patterns."""
        if self.kind == "int":
            lo, hi = self.code_range
            z = 0 if zp is None else zp
            return torch.clamp(torch.round(x / scale) + z, lo, hi).to(torch.int64)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return mf.encode(torch.where(scale > 0, x / safe, torch.zeros_like(x)), self.element).to(torch.int64)

    # --- storing --------------------------------------------------------------------------------
    def encode(self, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, *, shape, group_size: int,
               perm: torch.Tensor | None = None, global_scale=None, out_dtype="float32") -> Encoding:
        """The encoding of ``w`` [rows, cols] (stored column order) on this grid, with effective
        scales ``scale`` [R, G] and zero points ``zp``."""
        rows, cols = rows_cols(tuple(shape))
        idx = torch.arange(cols) // group_size
        s, z = scale[:, idx], (None if zp is None else zp[:, idx])
        fields = self.codes(w.to(torch.float32), s, z)
        if self.kind == "int":
            stored = scale.to(self.scale_format.torch_dtype)
            return IntQuant.from_codes(fields, stored, bits=self.bits, signed=self.symmetric, shape=shape,
                                       group_size=group_size, zero_point=zp, perm=perm, out_dtype=out_dtype)
        sf = self.scale_format
        if sf.short == "e8m0":
            stored = mf.encode_e8m0(scale)
        elif sf.short == "e4m3":
            stored = mf.encode(scale / global_scale, sf)
        else:
            stored = scale.to(sf.torch_dtype)
        return MiniFloat.from_fields(fields, stored, fmt=self.element, shape=shape, group_size=group_size,
                                     scale_format=sf, global_scale=global_scale, perm=perm, out_dtype=out_dtype)

    def describe(self) -> str:
        if self.per_tensor:
            gran = "per-tensor"
        elif self.group_size is None:
            gran = "per-channel"
        else:
            gran = f"g{self.group_size}"
        return f"{self.name} {gran}"


def parse_format(spec: str, *, group_size: int | None = None, per_tensor: bool = False,
                 scale_dtype: str = "float32", observer: str = "minmax") -> WeightFormat:
    """A :class:`WeightFormat` from its name (see the module docstring), granularity and observer
    (``minmax`` or ``mse``, see :meth:`WeightFormat.fit`)."""
    if observer not in OBSERVERS:
        raise FormatError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}")
    return dataclasses.replace(_parse_format(spec, group_size, per_tensor, scale_dtype), observer=observer)


def _parse_format(spec: str, group_size: int | None, per_tensor: bool, scale_dtype: str) -> WeightFormat:
    if not isinstance(spec, str):
        raise FormatError(f"format must be a string such as 'int4', 'e4m3', 'mxfp4' or 'nvfp4', got {spec!r}")
    name = spec.strip().lower()
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise FormatError(f"group_size must be a positive integer or None, got {group_size!r}")
    if scale_dtype not in ("float32", "float16", "bfloat16"):
        raise FormatError(f"scale_dtype must be float32, float16 or bfloat16, got {scale_dtype!r}")
    if per_tensor and group_size is not None:
        raise FormatError("per_tensor and group_size exclude each other")
    for prefix, symmetric in (("int", True), ("uint", False)):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            bits = int(name[len(prefix):])
            if not 2 <= bits <= 8:
                raise FormatError(f"format {spec!r}: integer weights take 2..8 bits, got {bits}")
            return WeightFormat(name, "int", bits, symmetric, group_size=group_size, per_tensor=per_tensor,
                                scale_format=dtype(scale_dtype))
    if name in _MINI:
        el = dtype(_MINI[name])
        return WeightFormat(el.short, "float", el.bits, element=el, group_size=group_size, per_tensor=per_tensor,
                            scale_format=dtype(scale_dtype))
    if name in _MX or name == "nvfp4":
        block = MX_BLOCK if name in _MX else NV_BLOCK
        if per_tensor or group_size not in (None, block):
            raise FormatError(f"format {spec!r} has blocks of {block}; group_size cannot be changed")
        el = dtype(_MX.get(name, "e2m1"))
        if name == "nvfp4":
            return WeightFormat("nvfp4", "float", 4, element=el, group_size=NV_BLOCK, scale_format=dtype("e4m3"),
                                two_level=True)
        return WeightFormat(name, "float", el.bits, element=el, group_size=MX_BLOCK, scale_format=dtype("e8m0"))
    known = ["int2..int8", "uint2..uint8", *sorted(_MINI), *sorted(_MX), "nvfp4"]
    raise FormatError(f"unknown weight format {spec!r}; known: {', '.join(known)}")


def grouped(w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, int]:
    """``w`` as [R, G, n] groups for fitting (a short last group padded with zeros, which never
    raise a group's largest magnitude), and the group size along the columns."""
    rows, cols = rows_cols(tuple(w.shape))
    w2 = w.detach().to(torch.float32).reshape(rows, cols)
    if fmt.per_tensor:
        return w2.reshape(1, 1, -1), cols
    gs = min(fmt.group_size or cols, cols)         # a layer narrower than one group has a single group
    groups = math.ceil(cols / gs)
    if groups * gs != cols:
        w2 = torch.nn.functional.pad(w2, (0, groups * gs - cols))
    return w2.reshape(rows, groups, gs), gs


def quantize_rtn(w: torch.Tensor, fmt: WeightFormat, *, out_dtype="float32") -> Encoding:
    """Round-to-nearest: fit each group's scale to its weights, then snap every weight."""
    rows, cols = rows_cols(tuple(w.shape))
    g = fmt.global_scale(w)
    groups, gs = grouped(w, fmt)
    scale, zp = fmt.fit(groups, g)
    return fmt.encode(w.detach().to(torch.float32).reshape(rows, cols), scale, zp, shape=tuple(w.shape),
                      group_size=gs, global_scale=g, out_dtype=out_dtype)


__all__ = ["FormatError", "WeightFormat", "parse_format", "grouped", "quantize_rtn", "MX_BLOCK", "NV_BLOCK"]

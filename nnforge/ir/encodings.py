"""Weight encodings: how a weight tensor is stored.

Compression is a change of encoding, not a new operator: a pass replaces a ``Dense`` weight by an
encoded one, and every encoding can ``decode()`` to a dense float tensor, so the reference
interpreter runs any compressed graph. Encodings are immutable; each is serialised as a few named
tensors (stored in safetensors) plus JSON-able parameters, and registered by ``kind`` so a bundle
can be read back without executing anything from it.

Integer weights use a 2-D view: rows are the first axis (output channels of linear/conv,
the vocabulary of an embedding) and columns all other axes flattened, which is the reduction
axis of the layer. Scales are ``[R, G]`` with R = 1 (one scale for all rows) or R = rows, and
G = ceil(cols / group_size) groups along the columns, which covers per-tensor, per-channel and
per-group quantisation with one layout.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import NnforgeError
from ..registry import Registry
from . import packing
from .dtypes import DType, dtype as _dtype, float32

ENCODINGS: Registry[type["Encoding"]] = Registry("weight encoding", key="kind")
# Class decorator: a bundle names an encoding by its ``kind``, and is read back through ENCODINGS.
register_encoding = ENCODINGS.register()


class EncodingError(NnforgeError, ValueError):
    """An encoding's parts disagree with each other or with its declared shape."""


class Encoding(ABC):
    kind: ClassVar[str]
    shape: tuple[int, ...]

    @property
    @abstractmethod
    def dtype(self) -> DType:
        """The dtype ``decode()`` returns (the logical dtype of the weight)."""

    @abstractmethod
    def decode(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor this encoding stands for."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored parts, by field name."""

    def params(self) -> dict:
        """JSON-able parameters besides the tensors."""
        return {}

    @classmethod
    @abstractmethod
    def from_parts(cls, params: dict, tensors: dict[str, torch.Tensor]) -> "Encoding":
        """Rebuild from ``params()`` and ``tensors()``."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes this encoding occupies when stored."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    def describe(self) -> str:
        return self.kind


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def _check_grouping(name: str, shape, scale: torch.Tensor, group_size: int, perm) -> torch.Tensor | None:
    """Shared checks of the [1 or rows, groups] scale layout and the act-order permutation;
    returns the permutation as int64."""
    rows, cols = rows_cols(shape)
    if not 1 <= group_size <= cols:
        raise EncodingError(f"{name}: group_size {group_size} outside 1..{cols}")
    groups = -(-cols // group_size)
    if scale.dim() != 2 or scale.shape[0] not in (1, rows) or scale.shape[1] != groups:
        raise EncodingError(f"{name}: scale must be [1 or {rows}, {groups}], got {tuple(scale.shape)}")
    if perm is None:
        return None
    p = perm.to(torch.int64)
    if p.shape != (cols,) or not torch.equal(torch.sort(p).values, torch.arange(cols)):
        raise EncodingError(f"{name}: perm must be a permutation of range({cols})")
    return p


def _apply_groups(q: torch.Tensor, scale: torch.Tensor, group_size: int, perm) -> torch.Tensor:
    """q [rows, cols] (stored column order) times its group scales, back in original column order."""
    idx = torch.arange(q.shape[1]) // group_size
    w = q * scale.to(q.dtype)[:, idx]
    if perm is not None:
        out = torch.empty_like(w)
        out[:, perm] = w
        w = out
    return w


@register_encoding
@dataclass(frozen=True, eq=False)
class Dense(Encoding):
    """A plain tensor (fp32/fp16/bf16 weights, integer or boolean constants)."""
    kind: ClassVar[str] = "dense"
    data: torch.Tensor
    shape: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        if not isinstance(self.data, torch.Tensor):
            raise EncodingError(f"Dense needs a torch.Tensor, got {type(self.data).__name__}")
        object.__setattr__(self, "data", self.data.detach().contiguous())
        object.__setattr__(self, "shape", tuple(self.data.shape))

    @property
    def dtype(self) -> DType:
        return _dtype(self.data.dtype)

    def decode(self, dtype=None):
        return self.data if dtype is None or not self.data.is_floating_point() else self.data.to(dtype)

    def tensors(self):
        return {"data": self.data}

    @classmethod
    def from_parts(cls, params, tensors):
        return cls(tensors["data"])

    def describe(self):
        return f"dense {self.dtype.short}"


@register_encoding
@dataclass(frozen=True, eq=False)
class IntQuant(Encoding):
    """Integer codes with per-tensor / per-channel / per-group scales and optional zero points.

    ``decode`` gives ``(code - zero_point) * scale`` on the 2-D view. Signed codes are stored in
    offset binary (``code + 2**(bits-1)``, see packing.to_unsigned). With act-order (GPTQ), the
    columns are stored in the order ``perm``: stored column j holds original column ``perm[j]``,
    and groups are contiguous in stored order. Backends apply ``perm`` to the activations.
    """
    kind: ClassVar[str] = "int"
    shape: tuple[int, ...]
    bits: int
    signed: bool
    codes: torch.Tensor            # uint8 [rows, ceil(cols*bits/8)], packed (see packing.py)
    scale: torch.Tensor            # float [R, G]
    group_size: int
    zero_point: torch.Tensor | None = None   # int [R, G], in the code domain
    perm: torch.Tensor | None = None         # int64 [cols]
    out_dtype: DType = float32

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "out_dtype", _dtype(self.out_dtype))
        rows, cols = rows_cols(self.shape)
        if not 2 <= self.bits <= 8:
            raise EncodingError(f"IntQuant supports 2..8 bits, got {self.bits}")
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != (rows, packing.packed_cols(cols, self.bits)):
            raise EncodingError(f"IntQuant codes must be uint8 {(rows, packing.packed_cols(cols, self.bits))} for "
                                f"{self.bits}-bit codes of shape {self.shape}, got {self.codes.dtype} "
                                f"{tuple(self.codes.shape)}")
        perm = _check_grouping("IntQuant", self.shape, self.scale, self.group_size, self.perm)
        object.__setattr__(self, "perm", perm)
        if not self.scale.is_floating_point():
            raise EncodingError("IntQuant scale must be a float tensor")
        if self.zero_point is not None and tuple(self.zero_point.shape) != tuple(self.scale.shape):
            raise EncodingError(f"zero_point shape {tuple(self.zero_point.shape)} differs from scale "
                                f"shape {tuple(self.scale.shape)}")

    @property
    def dtype(self):
        return self.out_dtype

    @property
    def code_dtype(self) -> DType:
        return _dtype(f"{'int' if self.signed else 'uint'}{self.bits}")

    @property
    def granularity(self) -> str:
        rows, cols = rows_cols(self.shape)
        if self.scale.shape[1] > 1:
            return "group"
        return "channel" if self.scale.shape[0] == rows and rows > 1 else "tensor"

    def int_codes(self) -> torch.Tensor:
        """Codes as int64 [rows, cols] in stored (possibly permuted) column order."""
        rows, cols = rows_cols(self.shape)
        fields = packing.unpack_bits(self.codes, self.bits, cols)
        return packing.to_signed(fields, self.bits) if self.signed else fields

    def decode(self, dtype=None):
        rows, cols = rows_cols(self.shape)
        q = self.int_codes().to(torch.float64 if dtype == torch.float64 else torch.float32)
        if self.zero_point is not None:
            idx = torch.arange(cols) // self.group_size
            q = q - self.zero_point.to(q.dtype)[:, idx]
        w = _apply_groups(q, self.scale, self.group_size, self.perm)
        return w.reshape(self.shape).to(dtype or self.out_dtype.torch_dtype)

    def tensors(self):
        t = {"codes": self.codes, "scale": self.scale}
        if self.zero_point is not None:
            t["zero_point"] = self.zero_point
        if self.perm is not None:
            t["perm"] = self.perm
        return t

    def params(self):
        return {"shape": list(self.shape), "bits": self.bits, "signed": self.signed,
                "group_size": self.group_size, "out_dtype": self.out_dtype.name}

    @classmethod
    def from_parts(cls, params, tensors):
        return cls(shape=tuple(params["shape"]), bits=params["bits"], signed=params["signed"],
                   codes=tensors["codes"], scale=tensors["scale"], group_size=params["group_size"],
                   zero_point=tensors.get("zero_point"), perm=tensors.get("perm"),
                   out_dtype=params.get("out_dtype", "float32"))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, *, bits: int, signed: bool, shape,
                   group_size: int | None = None, zero_point=None, perm=None, out_dtype=float32) -> "IntQuant":
        """Build from unpacked integer codes [rows, cols] (stored column order)."""
        rows, cols = rows_cols(tuple(shape))
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise EncodingError(f"IntQuant supports 2..8 bits, got {bits!r}")
        if codes.numel() != rows * cols:
            raise EncodingError(f"IntQuant codes hold {codes.numel()} values; shape {tuple(shape)} needs "
                                f"[{rows}, {cols}]")
        lo, hi = _dtype(f"{'int' if signed else 'uint'}{bits}").int_range
        codes = codes.reshape(rows, cols).to(torch.int64)
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise EncodingError(f"codes outside [{lo}, {hi}] for {'signed' if signed else 'unsigned'} {bits}-bit")
        fields = packing.to_unsigned(codes, bits) if signed else codes
        zp_dtype = torch.int8 if signed else torch.uint8
        return cls(tuple(shape), bits, signed, packing.pack_bits(fields, bits), scale.reshape(scale.shape[0], -1),
                   group_size or cols, None if zero_point is None else zero_point.to(zp_dtype), perm, out_dtype)

    @classmethod
    def quantize(cls, w: torch.Tensor, bits: int, *, group_size: int | None = None, symmetric: bool = True,
                 per_tensor: bool = False, scale_dtype=torch.float32) -> "IntQuant":
        """Round-to-nearest quantisation of ``w`` (per channel, per group of ``group_size``
        columns, or per tensor). Symmetric grids use signed codes in [-(2^(b-1)-1), 2^(b-1)-1];
        asymmetric grids unsigned codes in [0, 2^b-1] with an integer zero point."""
        shape = tuple(w.shape)
        rows, cols = rows_cols(shape)
        gs = cols if group_size is None or per_tensor else int(group_size)
        if cols % gs:
            raise EncodingError(f"group_size {gs} does not divide the {cols} columns of a weight of shape {shape}")
        # One row of one group holding every element gives a single scale (and zero point).
        x = w.detach().to(torch.float32).reshape(1, 1, -1) if per_tensor else \
            w.detach().to(torch.float32).reshape(rows, -1, gs)
        if symmetric:
            qmax = (1 << (bits - 1)) - 1
            scale = (x.abs().amax(-1) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
            scale = scale.to(scale_dtype).to(torch.float32)
            q = torch.round(x / scale.unsqueeze(-1)).clamp(-qmax - 1, qmax)
            zp = None
        else:
            qmax = (1 << bits) - 1
            lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
            scale = ((hi - lo) / qmax).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype).to(torch.float32)
            zp = torch.round(-lo / scale).clamp(0, qmax)
            q = torch.round(x / scale.unsqueeze(-1) + zp.unsqueeze(-1)).clamp(0, qmax)
        return cls.from_codes(q.reshape(rows, cols), scale.to(scale_dtype), bits=bits,
                              signed=symmetric, shape=shape, group_size=gs, zero_point=zp)

    def describe(self):
        g = {"group": f"g{self.group_size}", "channel": "per-channel", "tensor": "per-tensor"}[self.granularity]
        extra = (" asym" if self.zero_point is not None else " sym") + (" act-order" if self.perm is not None else "")
        return f"{self.code_dtype.short} {g}{extra}"


@register_encoding
@dataclass(frozen=True, eq=False)
class MiniFloat(Encoding):
    """ExMy minifloat codes (OCP E4M3, E5M2, E3M2, E2M3, E2M1) with scales on the same
    [1 or rows, groups] layout as IntQuant.

    ``decode`` gives ``value(code) * scale * global_scale``. Scales are plain floats
    (``scale_format`` float32/float16/bfloat16: per tensor, channel or group), or codes of a
    minifloat scale format: E8M0 shared exponents for MX blocks of 32, or E4M3 block scales with an
    fp32 ``global_scale`` (NVFP4: blocks of 16). Codes are packed ``fmt.bits`` bits each, so FP4
    takes half a byte and FP6 three quarters. ``perm`` is the act-order column order, as in IntQuant.
    """
    kind: ClassVar[str] = "minifloat"
    shape: tuple[int, ...]
    fmt: DType
    codes: torch.Tensor            # uint8 [rows, ceil(cols*bits/8)], packed
    scale: torch.Tensor            # [R, G]: float values, or uint8 codes of scale_format
    group_size: int
    scale_format: DType = float32
    global_scale: torch.Tensor | None = None      # float32 0-d
    perm: torch.Tensor | None = None
    out_dtype: DType = float32

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        for f in ("fmt", "scale_format", "out_dtype"):
            object.__setattr__(self, f, _dtype(getattr(self, f)))
        rows, cols = rows_cols(self.shape)
        if self.fmt.kind != "minifloat" or not self.fmt.signed:
            raise EncodingError(f"MiniFloat element format must be a signed minifloat (e4m3, e5m2, e3m2, e2m3, "
                                f"e2m1), got {self.fmt.name}")
        want = (rows, packing.packed_cols(cols, self.fmt.bits))
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != want:
            raise EncodingError(f"MiniFloat codes must be uint8 {want} for {self.fmt.short} codes of shape "
                                f"{self.shape}, got {self.codes.dtype} {tuple(self.codes.shape)}")
        perm = _check_grouping("MiniFloat", self.shape, self.scale, self.group_size, self.perm)
        object.__setattr__(self, "perm", perm)
        sf = self.scale_format
        if sf.kind == "minifloat":
            if sf.short not in ("e8m0", "e4m3") or self.scale.dtype != torch.uint8:
                raise EncodingError(f"MiniFloat scales in {sf.name} must be uint8 codes of e8m0 or e4m3, "
                                    f"got {self.scale.dtype}")
        elif sf.kind != "float" or self.scale.dtype != sf.torch_dtype:
            raise EncodingError(f"MiniFloat scale_format {sf.name} disagrees with scale dtype {self.scale.dtype}")
        if self.global_scale is not None:
            g = self.global_scale
            if g.dim() != 0 or g.dtype != torch.float32:
                raise EncodingError("MiniFloat global_scale must be a float32 scalar")

    @property
    def dtype(self):
        return self.out_dtype

    @property
    def granularity(self) -> str:
        rows, _ = rows_cols(self.shape)
        if self.scale.shape[1] > 1:
            return "group"
        return "channel" if self.scale.shape[0] == rows and rows > 1 else "tensor"

    def fields(self) -> torch.Tensor:
        """Codes as int64 [rows, cols] in stored column order."""
        _, cols = rows_cols(self.shape)
        return packing.unpack_bits(self.codes, self.fmt.bits, cols)

    def scale_values(self, dtype=torch.float32) -> torch.Tensor:
        """The [R, G] scales as floats, the global scale folded in."""
        from . import minifloat
        s = minifloat.decode(self.scale, self.scale_format, torch.float64) if self.scale_format.kind == "minifloat" \
            else self.scale.to(torch.float64)
        if self.global_scale is not None:
            s = s * self.global_scale.to(torch.float64)
        return s.to(dtype)

    def decode(self, dtype=None):
        from . import minifloat
        work = torch.float64 if dtype == torch.float64 else torch.float32
        q = minifloat.decode(self.fields(), self.fmt, work)
        w = _apply_groups(q, self.scale_values(work), self.group_size, self.perm)
        return w.reshape(self.shape).to(dtype or self.out_dtype.torch_dtype)

    def tensors(self):
        t = {"codes": self.codes, "scale": self.scale}
        if self.global_scale is not None:
            t["global_scale"] = self.global_scale
        if self.perm is not None:
            t["perm"] = self.perm
        return t

    def params(self):
        return {"shape": list(self.shape), "format": self.fmt.name, "group_size": self.group_size,
                "scale_format": self.scale_format.name, "out_dtype": self.out_dtype.name}

    @classmethod
    def from_parts(cls, params, tensors):
        return cls(shape=tuple(params["shape"]), fmt=params["format"], codes=tensors["codes"], scale=tensors["scale"],
                   group_size=params["group_size"], scale_format=params.get("scale_format", "float32"),
                   global_scale=tensors.get("global_scale"), perm=tensors.get("perm"),
                   out_dtype=params.get("out_dtype", "float32"))

    @classmethod
    def from_fields(cls, fields: torch.Tensor, scale: torch.Tensor, *, fmt, shape, group_size: int | None = None,
                    scale_format=float32, global_scale=None, perm=None, out_dtype=float32) -> "MiniFloat":
        """Build from unpacked code fields [rows, cols] (stored column order)."""
        fmt = _dtype(fmt)
        rows, cols = rows_cols(tuple(shape))
        fields = fields.reshape(rows, cols).to(torch.int64)
        if fields.numel() and (int(fields.min()) < 0 or int(fields.max()) >= 1 << fmt.bits):
            raise EncodingError(f"{fmt.short} code fields must lie in [0, {1 << fmt.bits})")
        return cls(tuple(shape), fmt, packing.pack_bits(fields, fmt.bits), scale.reshape(scale.shape[0], -1),
                   group_size or cols, scale_format, global_scale, perm, out_dtype)

    def describe(self):
        sf = self.scale_format
        if sf.short == "e8m0":
            scales = f"block {self.group_size} e8m0 scales"
        elif sf.short == "e4m3":
            scales = f"block {self.group_size} e4m3 scales" + (" + fp32 tensor scale" if self.global_scale is not None
                                                                else "")
        else:
            scales = {"group": f"g{self.group_size}", "channel": "per-channel",
                      "tensor": "per-tensor"}[self.granularity]
        return f"{self.fmt.short} {scales}" + (" act-order" if self.perm is not None else "")


def encoding_from_parts(kind: str, params: dict, tensors: dict[str, torch.Tensor]) -> Encoding:
    return ENCODINGS.lookup(kind, EncodingError).from_parts(params, tensors)

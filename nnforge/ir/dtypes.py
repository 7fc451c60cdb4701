"""Element types of the IR: standard torch types, sub-byte integers and OCP minifloats.

Activations (values flowing between nodes) use the standard types. Sub-byte integers and
minifloats appear inside weight encodings, where they say how codes are stored; `torch_dtype`
is None for those that torch cannot hold as a tensor element.

    >>> from nnforge.ir.dtypes import dtype
    >>> dtype("float8_e4m3fn").max_value
    448.0
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class DType:
    name: str
    kind: str            # "float" | "int" | "uint" | "bool" | "minifloat"
    bits: int
    short: str           # used by the printer: f32, i64, e4m3 ...
    torch_name: str | None = None
    # Minifloat layout (kind == "minifloat"): sign bit (except E8M0), exponent, mantissa.
    exp_bits: int = 0
    man_bits: int = 0
    bias: int = 0
    has_inf: bool = False
    nan: str = "none"    # "ieee": all-ones exponent with mantissa != 0; "fn": only all-ones code; "none"
    signed: bool = True

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.torch_name) if self.torch_name else None

    @property
    def is_float(self) -> bool:
        return self.kind in ("float", "minifloat")

    @property
    def is_integer(self) -> bool:
        return self.kind in ("int", "uint")

    @cached_property
    def int_range(self) -> tuple[int, int]:
        if self.kind == "int":
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        if self.kind == "uint":
            return 0, (1 << self.bits) - 1
        raise TypeError(f"{self.name} is not an integer type")

    @cached_property
    def max_value(self) -> float:
        """Largest finite value of a minifloat format."""
        if self.kind != "minifloat":
            raise TypeError(f"{self.name} is not a minifloat")
        top_exp = (1 << self.exp_bits) - 1
        if self.has_inf or self.nan == "ieee":
            top_exp -= 1            # the all-ones exponent is reserved for inf/nan
            top_man = (1 << self.man_bits) - 1
        elif self.nan == "fn":
            top_man = (1 << self.man_bits) - 2 if self.man_bits else 0   # all-ones code is NaN
            if self.man_bits == 0:
                top_exp -= 1
        else:
            top_man = (1 << self.man_bits) - 1
        return 2.0 ** (top_exp - self.bias) * (1 + top_man / (1 << self.man_bits))

    def __str__(self) -> str:
        return self.name


def _mini(name, short, e, m, bias, *, has_inf=False, nan="none", signed=True, torch_name=None):
    bits = e + m + (1 if signed else 0)
    return DType(name, "minifloat", bits, short, torch_name, e, m, bias, has_inf, nan, signed)


_ALL = [
    DType("float64", "float", 64, "f64", "float64"),
    DType("float32", "float", 32, "f32", "float32"),
    DType("float16", "float", 16, "f16", "float16"),
    DType("bfloat16", "float", 16, "bf16", "bfloat16"),
    DType("int64", "int", 64, "i64", "int64"),
    DType("int32", "int", 32, "i32", "int32"),
    DType("int16", "int", 16, "i16", "int16"),
    DType("int8", "int", 8, "i8", "int8"),
    DType("uint8", "uint", 8, "u8", "uint8"),
    DType("bool", "bool", 1, "bool", "bool"),
    *[DType(f"int{b}", "int", b, f"i{b}") for b in range(2, 8)],
    *[DType(f"uint{b}", "uint", b, f"u{b}") for b in range(1, 8)],
    # OCP 8-bit floats (OFP8 spec): E4M3 "fn" has no infinities and one NaN mantissa, E5M2 is IEEE-like.
    _mini("float8_e4m3fn", "e4m3", 4, 3, 7, nan="fn", torch_name="float8_e4m3fn"),
    _mini("float8_e5m2", "e5m2", 5, 2, 15, has_inf=True, nan="ieee", torch_name="float8_e5m2"),
    # OCP MX formats: FP6 and FP4 have neither infinities nor NaN.
    _mini("float6_e3m2fn", "e3m2", 3, 2, 3),
    _mini("float6_e2m3fn", "e2m3", 2, 3, 1),
    _mini("float4_e2m1fn", "e2m1", 2, 1, 1),
    # MX shared scale: unsigned power of two, 0xFF is NaN.
    _mini("float8_e8m0fnu", "e8m0", 8, 0, 127, nan="fn", signed=False, torch_name="float8_e8m0fnu"),
]
DTYPES: dict[str, DType] = {d.name: d for d in _ALL}
_BY_SHORT = {d.short: d for d in _ALL}
_BY_TORCH = {d.torch_dtype: d for d in _ALL if d.torch_name}

float32 = DTYPES["float32"]
float64 = DTYPES["float64"]
float16 = DTYPES["float16"]
int64 = DTYPES["int64"]
int32 = DTYPES["int32"]
int8 = DTYPES["int8"]
uint8 = DTYPES["uint8"]
bool_ = DTYPES["bool"]


def dtype(spec: str | DType | torch.dtype) -> DType:
    """Look a dtype up by name ("float32"), short name ("f32"), or torch dtype."""
    if isinstance(spec, DType):
        return spec
    if isinstance(spec, torch.dtype):
        try:
            return _BY_TORCH[spec]
        except KeyError:
            raise TypeError(f"torch dtype {spec} has no nnforge equivalent") from None
    if isinstance(spec, str):
        found = DTYPES.get(spec) or _BY_SHORT.get(spec)
        if found is not None:
            return found
        raise TypeError(f"unknown dtype {spec!r}; known: {', '.join(DTYPES)}")
    raise TypeError(f"cannot interpret {spec!r} as a dtype")


def promote(a: DType, b: DType) -> DType:
    """Result type of a binary arithmetic op, following torch's rules for tensor-tensor ops."""
    return dtype(torch.promote_types(a.torch_dtype, b.torch_dtype))

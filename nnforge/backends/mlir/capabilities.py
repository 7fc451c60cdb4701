"""What the mlir backend runs natively: every layer weight is stored compressed in the module
(integer codes, indices, factors) and decoded by the module's own ops, the same way whatever layer
reads it, so each layer op has the same row per encoding kind. Read by the lowering
(:func:`.weights.weight_module`) and by ``nnforge targets --explain``; a weight no row accepts is
widened or decoded at export and reported as a Fallback.

    >>> cap, why = CAPABILITIES.find("linear", weight.encoding, target)
"""
from __future__ import annotations

from ...ir import WEIGHT_OPS
from ..base import Capabilities, Capability


def packs(bits: int) -> bool:
    """Fields of this width stay packed in the module's bytes (unpacked with shifts and a mask)."""
    return 8 % bits == 0


def _packed(bits: int, what: str) -> str | None:
    return None if packs(bits) else f"{bits}-bit {what} do not pack into bytes (1, 2, 4 or 8 bits)"


def int_codes(enc, target) -> str | None:
    return _packed(enc.bits, "codes")


def minifloat_codes(enc, target) -> str | None:
    return _packed(enc.fmt.bits, "codes")


def palette_indices(enc, target) -> str | None:
    return _packed(enc.bits, "indices")


def nm_pattern(enc) -> str | None:
    """Why the module has no sparse form for ``enc``'s pattern (it has one for N:M only)."""
    p = enc.pattern
    return None if p.kind == "nm" else f"the module has no sparse form for {p.name} (N:M only)"


def nm_sparse(enc, target) -> str | None:
    whys = [nm_pattern(enc)]
    if whys[0] is None:
        whys += [_packed(enc.pattern.index_bits, "in-group indices"), _part("values", enc.values, target)]
    return "; ".join(w for w in whys if w) or None


def factors(enc, target) -> str | None:
    return "; ".join(w for w in (_part(n, p, target) for n, p in enc.parts().items()) if w) or None


def _part(label: str, enc, target) -> str | None:
    """Why a part of a composite weight (N:M values, a low-rank factor) has no native form."""
    if enc.kind not in FORMS:
        return f"{label}: no in-module form for {enc.kind} weights"
    accepts = FORMS[enc.kind][1]
    why = accepts(enc, target) if accepts else None
    return f"{label}: {why}" if why else None


# kind -> (how the module holds and decodes it, why it cannot for a particular one)
FORMS = {
    "dense": ("float constant (fp16/bf16 kept in their type)", None),
    "int": ("int8 codes (8-bit) or packed bytes (1/2/4-bit) + shifts/masks, (q - zero) * scale", int_codes),
    "minifloat": ("int8 codes (FP8) or packed bytes (FP4) + gather from the format's value table", minifloat_codes),
    "palettized": ("index bytes (8-bit) or packed bytes (1/2/4-bit) + gather from the LUT", palette_indices),
    "sparse": ("N:M: kept values (own encoding) + packed in-group indices + select", nm_sparse),
    "lowrank": ("both factors (own encodings) + their product", factors),
}
# An encoded KV cache (docs/kv_cache.md) whose state is codes and scales per token: written and read
# by the module's own ops (linalg_kernels.kv_cache_write / kv_cache_read), kept in its stored dtypes
# between the decoder's calls.
CACHE_FORMS = {
    "kv8": ("int8 codes and float16 scales per token and group of channels, gathered into their slots",
            "int8 codes times their float16 scales"),
}
CAPABILITIES = Capabilities([Capability(op, kind, how, accepts)
                             for op in WEIGHT_OPS for kind, (how, accepts) in FORMS.items()]
                            + [Capability(op, kind, how) for kind, hows in CACHE_FORMS.items()
                               for op, how in zip(("kv_cache_write", "kv_cache_read"), hows)])

__all__ = ["CAPABILITIES", "packs", "nm_pattern"]

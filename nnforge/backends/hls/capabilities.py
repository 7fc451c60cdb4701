"""What the hls backend runs natively: its capability table, read by its lowering rules
(:mod:`.project`) and by ``nnforge targets --explain``.

The matrix unit (``nf::matmat``) streams a linear's weight as integer codes with group scales:
int codes as stored, minifloat codes through an integer decoding table, N:M sparse kept values
with their in-group indices, float weights quantised per output channel. A convolution's weight,
flattened to [out, in/groups * kernel], takes the same rows. A linear or conv weight no row takes
is decoded and stored like a float one (a reported fallback); an act-order int weight is an
error, as is an encoded matmul constant. A decoder's KV cache is float or kv8 (kept encoded in
off-chip memory, :mod:`.decoder_kv8`); other cache encodings are refused. Every FPGA target runs
the same templates, so no row reads the target (a runner rebuilds its design from the bundle's options).

    >>> cap, why = CAPABILITIES.find("linear", weight.encoding)
"""
from __future__ import annotations

from ...ir.encodings import Dense, IntQuant, MiniFloat
from ...ir.sparse import Sparse
from ..base import Capabilities, Capability
from .weights import LUT_MAX_BITS, minifloat_lut

ACT_ORDER = "act-order (permuted) int weights are not supported by the hls backend yet; quantise without act_order"


def int_codes(enc: IntQuant, target=None) -> str | None:
    return ACT_ORDER if enc.perm is not None else None


def minifloat_codes(enc: MiniFloat, target=None) -> str | None:
    if enc.perm is not None:
        return "act-order (permuted) minifloat codes have no decoder in the hls matrix unit"
    if minifloat_lut(enc) is None:
        return (f"{enc.fmt.name} codes in use are not finite or need integers wider than {LUT_MAX_BITS} bits: "
                "the matrix unit decodes minifloats through an integer table")
    return None


def float_data(enc: Dense, target=None) -> str | None:
    if enc.data.is_floating_point():
        return None
    return f"{enc.dtype.name} data (the matrix unit quantises float weights)"


# Kept values of an N:M weight, by class: the check of the row that takes them on their own.
VALUE_CHECKS = ((IntQuant, int_codes), (MiniFloat, minifloat_codes), (Dense, float_data))


def nm_sparse(enc: Sparse, target=None) -> str | None:
    if enc.pattern.kind != "nm":
        return f"pattern {enc.pattern.name}: the hls matrix unit runs N:M patterns"
    for cls, check in VALUE_CHECKS:
        if isinstance(enc.values, cls):
            return check(enc.values)
    return f"kept values as {enc.values.describe()}: the hls matrix unit has no decoder for them"


def refused(enc) -> bool:
    """Whether a linear weight no row takes is an error rather than a decoded fallback: act-order
    int codes, on their own or as an N:M weight's kept values (their order is a permutation the
    matrix unit does not apply, and decoding would hide that the recipe asked for it)."""
    inner = enc.values if isinstance(enc, Sparse) and enc.pattern.kind == "nm" else enc
    return isinstance(inner, IntQuant) and inner.perm is not None


CAPABILITIES = Capabilities([
    Capability("linear", "int", "matrix unit: the 2..8-bit codes as stored (zero points folded in: one more bit), "
                                "group scales as fixed-point mantissas; not act-order", int_codes),
    Capability("linear", "minifloat", "matrix unit: ExMy codes through a per-layer integer decoding table, their "
                                      f"scales as mantissas (formats whose values fit {LUT_MAX_BITS}-bit integers: "
                                      "not E5M2)", minifloat_codes),
    Capability("linear", "sparse", "matrix unit: N:M kept values (2:4, 1:4, ...) with in-group indices; int or "
                                   "minifloat codes as above, float values quantised to int<dense_weight_bits> "
                                   "(reported)", nm_sparse),
    Capability("linear", "dense", "matrix unit: float weights quantised to int<dense_weight_bits> per output "
                                  "channel (target option; reported)", float_data),
    Capability("conv", "int", "convolution unit (line buffer) on the matrix unit's rows: int codes as for a "
                              "linear, the weight flattened to [out, in/groups * kernel]", int_codes),
    Capability("conv", "minifloat", "convolution unit: ExMy codes through the integer decoding table, as for a "
                                    "linear", minifloat_codes),
    Capability("conv", "sparse", "convolution unit: N:M kept values of the flattened weight, as for a linear",
               nm_sparse),
    Capability("conv", "dense", "convolution unit: float weights quantised to int<dense_weight_bits> per output "
                                "channel (target option; reported)", float_data),
    Capability("matmul", "dense", "matrix unit on the constant operand's transpose, quantised like a dense linear "
                                  "(reported)"),
    Capability("embedding", "dense", "table rows in weight memory, in the activation fixed-point format"),
    Capability("kv_cache_write", "kv8", "nf::kv8_write: each new row quantised in the design (group max, float16 "
                                        "scale in integers, codes by a per-group reciprocal) into the cache in "
                                        "off-chip memory as stored: int8 codes 4 to a word, float16 scales 2 to a word"),
    Capability("kv_cache_read", "kv8", "nf::kv8_attention reads the codes and scales in off-chip memory, each value "
                                       "multiplied out to the activation format as it streams; only as attention's "
                                       "k and v, no float cache is made"),
])

__all__ = ["ACT_ORDER", "CAPABILITIES", "float_data", "int_codes", "minifloat_codes", "nm_sparse", "refused"]

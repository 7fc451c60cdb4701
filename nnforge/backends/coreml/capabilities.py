"""What the coreml backend runs natively: its capability table, read by its lowering
(:meth:`.lower.Lowering.weight`, once per layer weight) and by ``nnforge targets --explain``.

Every layer op (linear, matmul, conv, embedding) reads its weight as a const-like MIL value, so
each has the same rows: an fp16 const, or an iOS 18 constexpr op holding the encoding as it is
stored, which Core ML decodes exactly when the model loads. A weight no row takes is stored in the
smallest other exact form (codes widened, per-block LUTs of the decoded values, fp16 kept values,
a dense fp16 const; :func:`.weights.emit_weight`) and reported as a Fallback with the table's
reason. ``dynamic_quant`` has a row per activation format it computes (int8, int4); the others
are an error naming the node. The deployment target (iOS 18 / macOS 15 or later, checked before lowering) has every op
of the table.

    >>> cap, why = CAPABILITIES.find("linear", weight.encoding, get_target("apple-a17"))
"""
from __future__ import annotations

from ...ir import WEIGHT_OPS
from ..base import Capabilities, Capability
from . import weights as W

# The MIL op each layer op becomes (what reads the const-like weight).
LAYER_MIL = {"linear": "linear", "matmul": "matmul", "conv": "conv", "embedding": "gather"}


def _compact(plan, enc) -> str | None:
    """Why a constexpr form helps nobody: it is no smaller than the fp16 weight."""
    nbytes, fp16 = plan[0], enc.numel * 2
    return None if nbytes < fp16 else f"its constexpr form ({nbytes} bytes) is not smaller than fp16 ({fp16} bytes)"


def _form(enc) -> str | None:
    return "an empty or scalar weight has no constexpr form" if len(enc.shape) == 0 or enc.numel == 0 else None


def fp16_range(enc, target) -> str | None:
    """Why an fp16 const cannot hold a dense weight as it is: values beyond the fp16 range."""
    over = W.beyond_fp16(enc.data) if enc.data.is_floating_point() else 0
    return f"{over} value(s) beyond the fp16 range (+-{W.FP16_MAX:g})" if over else None


def shift_scale(enc, target) -> str | None:
    """Why constexpr_blockwise_shift_scale cannot hold ``enc``'s codes and scales as they are."""
    if enc.bits not in W.SHIFT_SCALE_BITS:
        return (f"{enc.bits}-bit codes (constexpr_blockwise_shift_scale holds "
                f"{' or '.join(map(str, W.SHIFT_SCALE_BITS))}-bit data)")
    why = _form(enc)
    if why is None:
        plan = W.shift_scale_plan(enc, "weight")
        why = "scales are not fp16 values" if plan is None else _compact(plan, enc)
    return why


def lut(enc, target) -> str | None:
    """Why constexpr_lut_to_dense cannot hold ``enc``'s indices and LUT as they are."""
    if enc.bits not in W.INDEX_BITS:
        return f"{enc.bits}-bit indices (Core ML LUT indices have {', '.join(map(str, W.INDEX_BITS))} bits)"
    return _form(enc) or _compact(W.lut_plan(enc, "weight"), enc)


def kept_fp16(enc, target) -> str | None:
    """Why constexpr_sparse_to_dense with fp16 kept values cannot hold ``enc`` as it is: its kept
    values are encoded themselves (those compositions are mapped, and reported) or row-scaled."""
    v = enc.values
    if v.kind != "dense" or enc.row_scale is not None:
        return (f"kept values {v.describe()}{' with a row_scale' if enc.row_scale is not None else ''} are not "
                "fp16 values")
    return _form(enc) or _compact(W.kept_fp16_plan(enc, "weight"), enc)


def in_column_order(enc, target) -> str | None:
    """Why a layer other than linear cannot read ``enc``: act-order columns, which only a linear
    absorbs (by gathering its input's columns)."""
    return "act-order columns, which only a linear layer absorbs" if enc.perm is not None else None


def _int(op: str):
    if op == "linear":
        return shift_scale
    return lambda enc, target: in_column_order(enc, target) or shift_scale(enc, target)


# Dynamic activation quantisation (the dynamic_quant op; no weight: the "encoding" is the activation
# format). Integer codes come from fp16 ops with torch's rounding; minifloat grids are refused.
MINIFLOAT_ACTIVATIONS = ("MIL has no FP8/FP4 type with run-time scales (quantize takes constant scales and "
                         "integer outputs) and no bit cast to read an exponent, so this backend does not round "
                         "to minifloat grids; quantise activations to int8 or int4")
DYNAMIC_QUANT = {fmt: Capability("dynamic_quant", fmt, f"reduce_max(abs) per token or group (clip applied), "
                                 f"real_div, round half to even from floor/select, clamp, mul: {fmt} codes in fp16")
                 for fmt in ("int8", "int4")}
CAPABILITIES = Capabilities([row for op in WEIGHT_OPS for mil in (LAYER_MIL[op],) for row in (
    Capability(op, "dense", f"const fp16 (fp32/bf16 cast) + {mil}", fp16_range),
    Capability(op, "int", "constexpr_blockwise_shift_scale: int4/uint4/int8/uint8 codes, fp16 block scales, "
                          f"zero points as offsets{' (act-order: x gathered)' if op == 'linear' else ''} + {mil}",
               _int(op)),
    Capability(op, "palettized", f"constexpr_lut_to_dense: 1/2/3/4/6/8-bit indices, fp16 LUT per tensor or group "
                                 f"+ {mil}", lut),
    Capability(op, "sparse", f"constexpr_sparse_to_dense: uint1 mask + fp16 kept values + {mil}", kept_fp16),
)] + list(DYNAMIC_QUANT.values()))

# The compute units each stored weight form is meant for (the manifest's weight_forms). Per-block
# scales or LUTs (blocks along a row's input columns) are reported to fall back off the Neural
# Engine or misbehave there (coremltools #2510, apple/coreai-models #279), which is why the apple
# targets' presets quantise per output channel (their preset_scales option).
ALL_UNITS = ["cpu", "gpu", "ane"]
OFF_ANE = "per-block scales or LUTs are reported to fall back off the Neural Engine or misbehave there " \
          "(coremltools #2510, apple/coreai-models #279)"


def weight_form(types_: list[str], blocked: bool) -> dict:
    """The form of a stored weight (its constexpr chain, outermost first, and whether its scales
    or LUTs come in blocks along the input columns) and the compute units it is meant for."""
    chain = [t for t in types_ if t != "const"] or ["const"]
    form = " of ".join(dict.fromkeys(chain)) + (" (per-block)" if blocked else "")
    return {"form": form, "compute_units": ["cpu", "gpu"] if blocked else ALL_UNITS,
            **({"why": OFF_ANE} if blocked else {})}


def weight_forms(checks) -> list[dict]:
    """The manifest's weight_forms: one row per stored form of the verified weights
    (``verify.WeightCheck``), with how many weights and bytes it holds and its compute units."""
    rows: dict[str, dict] = {}
    for w in checks:
        f = weight_form(w.op_types, w.blocked)
        row = rows.setdefault(f["form"], {**f, "weights": 0, "bytes": 0})
        row["weights"] += 1
        row["bytes"] += w.nbytes
    return sorted(rows.values(), key=lambda r: -r["bytes"])


__all__ = ["ALL_UNITS", "CAPABILITIES", "DYNAMIC_QUANT", "LAYER_MIL", "MINIFLOAT_ACTIVATIONS", "weight_form",
           "weight_forms"]

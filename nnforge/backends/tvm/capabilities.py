"""What the tvm backend runs natively: its capability table, read by its lowering
(:meth:`.lower.Lowering.native`, once per layer weight) and by ``nnforge targets --explain``.

Dense weights of every layer op run as stored. An encoded ``linear`` weight runs on the TensorIR
kernel its row names (the row's ``accepts`` is a :class:`Kernel`: the kernel module, its builder,
the checks the weight must pass, and how the weight becomes the builder's arguments). Any other
encoded weight is decoded to dense when lowered, a reported Fallback giving the table's reason.
The kernels take any LLVM CPU target: they read its vector width and dot-product instructions
from the target's ``options.llvm_target`` (schedules, never refusals).

    >>> cap, why = CAPABILITIES.find("linear", weight.encoding, get_target("cpu"))
    >>> cap.accepts.module if cap else why
    'lowbit'
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ...ir import Dense, IntQuant
from ..base import Capabilities, Capability
from .kernels.bsr_int8 import sums_problem
from .kernels.lowbit import layout_problem
from .kernels.lowbit_minifloat import format_problem
from .weights import bsr_args, int8_bsr_args, int_args, kernel_bits
from .weights_minifloat import minifloat_args


def llvm_problem(target) -> str | None:
    """Why ``target`` gets no kernels of this backend: it names no LLVM target string."""
    if target is None or isinstance(target.options.get("llvm_target"), str):
        return None
    return f"target {target.name!r} has no options.llvm_target (the tvm kernels are compiled by LLVM)"


def fp32_problem(enc) -> str | None:
    """The kernels read fp32 activations and write fp32 outputs; an fp16/bf16 layer runs on Relax."""
    return None if enc.dtype.name == "float32" else f"the kernels compute in float32, not {enc.dtype.name}"


def int_codes(enc) -> str | None:
    """Why kernels.lowbit cannot read ``enc``'s codes (widths, groups: the kernel's own check; 3-bit
    codes are read as 4-bit ones, see weights.kernel_bits)."""
    if len(enc.shape) != 2:
        return f"it takes [n, k] weights, not {len(enc.shape)}-D ones"
    if enc.bits == 3 and enc.shape[1] % 8:
        return f"3-bit codes are widened to 4 bits eight at a time (three bytes), so k must be a multiple of 8, " \
               f"got k = {enc.shape[1]}"
    return layout_problem(kernel_bits(enc), enc.group_size, *enc.shape)


def minifloat_codes(enc) -> str | None:
    """Why kernels.lowbit_minifloat cannot read ``enc``'s codes (formats, widths, groups: the
    kernel's own check). Its scales may be floats or E8M0 / E4M3 codes: they are decoded to float32
    when the bundle loads."""
    if len(enc.shape) != 2:
        return f"it takes [n, k] weights, not {len(enc.shape)}-D ones"
    return format_problem(enc.fmt.short, enc.group_size, *enc.shape)


def in_order(enc) -> str | None:
    """An embedding's table cannot take act-order columns (only a linear layer absorbs them)."""
    return None if getattr(enc, "perm", None) is None else "act-order columns, which only a linear layer absorbs"


def _blocks(enc) -> str | None:
    if enc.pattern.kind != "block" or len(enc.shape) != 2:
        return f"{enc.pattern.name} is not a block (R x C) pattern"
    return None


def fp32_blocks(enc) -> str | None:
    """Why kernels.bsr cannot run ``enc``: it reads BSR blocks of fp32 values, nothing else."""
    why = _blocks(enc)
    if why is None and not isinstance(enc.values, Dense):
        why = f"kept values are {enc.values.describe()}, not fp32 blocks"
    if why is None and enc.row_scale is not None:
        why = "the fp32 blocks carry a row_scale, which the kernel does not apply"
    return why


def int8_block_codes(enc) -> str | None:
    """Why kernels.bsr_int8 cannot run ``enc``: it reads signed 8-bit block codes under one scale,
    with one scale per output row (``Sparse.row_scale``, as ``prune_sparsegpt(format="int8")``
    makes them), and sums k products exactly in int32."""
    why = _blocks(enc)
    if why is not None:
        return why
    v = enc.values
    if (enc.row_scale is None or not isinstance(v, IntQuant) or v.bits != 8 or not v.signed
            or v.zero_point is not None or v.scale.numel() != 1 or v.perm is not None):
        return (f"kept values {v.describe()}{' with a row_scale' if enc.row_scale is not None else ''} are not "
                "signed int8 codes under one scale with a row_scale")
    return sums_problem(enc.shape[1])


@dataclass(frozen=True)
class Kernel:
    """A row's ``accepts``: ``builder`` of kernels/``module``.py runs the weight when ``check``
    finds nothing against it (and the target is an LLVM one); ``args`` turns the encoding into
    the builder's keyword arguments. Its reasons are prefixed with the module."""
    module: str
    builder: str
    check: Callable[[Any], str | None]
    args: Callable[[Any], dict]

    def __call__(self, enc, target) -> str | None:
        why = llvm_problem(target) or fp32_problem(enc) or self.check(enc)
        return None if why is None else f"kernels.{self.module}: {why}"


LOWBIT = Kernel("lowbit", "int_weight_matmul", int_codes, int_args)
LOWBIT_ROWS = Kernel("lowbit", "gather_rows", lambda enc: int_codes(enc) or in_order(enc), int_args)
MINIFLOAT = Kernel("lowbit_minifloat", "minifloat_weight_matmul", minifloat_codes, minifloat_args)
MINIFLOAT_ROWS = Kernel("lowbit_minifloat", "minifloat_gather_rows", lambda enc: minifloat_codes(enc) or in_order(enc),
                        minifloat_args)
BSR = Kernel("bsr", "bsr_matmul", fp32_blocks, bsr_args)
BSR_INT8 = Kernel("bsr_int8", "bsr_matmul_int8", int8_block_codes, int8_bsr_args)

def _llvm(enc, target) -> str | None:
    return llvm_problem(target)


KV_CACHE = [
    Capability("kv_cache_write", "kv8", "kernels.kvcache: int8 codes and float16 scales per token and group of "
               "channels written in place at each token's slot, rounded as the reference", _llvm),
    Capability("kv_cache_read", "kv8", "kernels.kvcache_attention: attention on the int8 codes, each group's scale "
               "taken out of its share of the q.k and p.v products (another reader: the codes dequantised)", _llvm),
    Capability("kv_cache_write", "kv-fp8", "kernels.kvcache: E4M3 codes (uint8 bit patterns) and float16 per-token "
               "scales written in place", _llvm),
    Capability("kv_cache_read", "kv-fp8", "kernels.kvcache_attention: attention on the E4M3 codes read as float16 "
               "patterns, each token's scale taken out of the products (another reader: dequantised)", _llvm),
    Capability("kv_cache_write", "kv4", "kernels.kvcache: KIVI, the groups and tokens a step completes quantised to "
               "packed 4-bit codes and float16 scales and minimums in place, the float window refilled; needs each "
               "row's positions consecutive, continuing its sequence", _llvm),
    Capability("kv_cache_read", "kv4", "kernels.kvcache_attention: KIVI attention on the packed nibbles, key scales "
               "and minimums folded into the query once a group, value ones into the softmax weights; recent tokens "
               "from the float window (another reader: dequantised)", _llvm),
    Capability("kv_cache_write", "kv-nvfp4", "kernels.kvcache: NVFP4 per token, packed E2M1 codes, E4M3 scales per "
               "block of 16 values and a float16 token scale written in place, rounded as the reference", _llvm),
    Capability("kv_cache_read", "kv-nvfp4", "kernels.kvcache_attention: attention on the packed E2M1 codes read as "
               "float16 patterns, each block's E4M3 scale out of its partial q.k sum and into the softmax weight, the "
               "token scale once a token (another reader: dequantised)", _llvm),
    Capability("kv_cache_write", "kv-gear4", "kernels.kvcache: GEAR on KIVI, each group a step completes: outliers "
               "taken out, kv4's codes, the error's low-rank factors by subspace iteration in ir/ordered.py's float32 "
               "order, in place; positions as kv4's", _llvm),
    Capability("kv_cache_read", "kv-gear4", "kernels.kvcache: codes, low-rank term and outliers dequantised, then "
               "the float attention kernel (no fused kernel)", _llvm),
    Capability("kv_cache_write", "kv-f16", "kernels.kvcache: float16 values (saturating, nearest even) written in "
               "place at each token's slot", _llvm),
    Capability("kv_cache_read", "kv-f16", "kernels.decoder: the float attention kernel on the float16 rows, widened "
               "in registers (another reader: widened)", _llvm),
]

CAPABILITIES = Capabilities([
    Capability("linear", "dense", "kernels.dense: scheduled GEMM on the fp32 weight packed into panels at load "
                                  "(fp16 layers: Relax linear)"),
    Capability("matmul", "dense", "kernels.dense: scheduled GEMM on an fp32 [K, N] weight packed into panels at "
                                  "load (other layouts: Relax matmul)"),
    Capability("conv", "dense", "Relax conv1d/conv2d/conv3d"),
    Capability("embedding", "dense", "Relax take (an out-of-range id reads the last row)"),
    Capability("embedding", "int", "kernels.lowbit rows: 8-, 4- or 3-bit codes (3-bit read as 4-bit) gathered "
                                   "from the layout the int GEMM reads and dequantised (a table tied to an LM head "
                                   "shares the head's arrays); columns in order", LOWBIT_ROWS),
    Capability("embedding", "minifloat", "kernels.lowbit_minifloat rows: FP4 / FP8 codes gathered from the layout "
                                         "the minifloat GEMM reads and decoded (a table tied to an LM head shares the "
                                         "head's arrays); columns in order", MINIFLOAT_ROWS),
    Capability("linear", "int", "kernels.lowbit: fp32 GEMM reading 8- or 4-bit codes (4-bit: even K and group "
                                "size; 3-bit codes widened to 4-bit when the bundle loads, K a multiple of 8) with "
                                "per-tensor, channel or group scales and zero points; act-order by permuting x; "
                                "behind a per-token int8/int4 dynamic_quant (groups of whole 32-bit dot lanes: 4 "
                                "columns at 8 bits, 8 at 4), kernels.intact: int8 codes x weight codes, int32 sums "
                                "per group (vpmaddubsw/vpmaddwd on AVX2, vpdpbusd with VNNI)",
               LOWBIT),
    Capability("linear", "minifloat", "kernels.lowbit_minifloat: the lowbit GEMM reading FP4 (e2m1: MXFP4, NVFP4; "
                                      "even K and group size; the VNNI dot GEMV through a vpshufb table) or FP8 (e4m3, "
                                      "e5m2: float paths) codes, with float scales per tensor, channel or group, or "
                                      "E8M0 / E4M3 block scales decoded to float32 when the bundle loads; act-order "
                                      "by permuting x", MINIFLOAT),
    Capability("linear", "sparse", "kernels.bsr: fp32 BSR SpMM on R x C blocks of fp32 values", BSR),
    Capability("linear", "sparse", "kernels.bsr_int8: u8 x s8 BSR SpMM on int8 block codes with row scales, x "
                                   "quantised in the kernel on the grid of the static int8 fake_quant before the "
                                   "layer (without one: codes widened to fp32 blocks for kernels.bsr, reported)",
               BSR_INT8),
    *KV_CACHE,
])

__all__ = ["CAPABILITIES", "KV_CACHE", "Kernel", "LOWBIT", "LOWBIT_ROWS", "MINIFLOAT", "MINIFLOAT_ROWS", "BSR",
           "BSR_INT8", "llvm_problem"]

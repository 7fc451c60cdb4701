"""The ops of an encoded KV cache (docs/kv_cache.md): ``kv_cache_write`` puts a step's keys or
values into the cache's state tensors, ``kv_cache_read`` gives back the float cache that attention
reads. Their attributes name the encoding (``ir/kvcache.py``), which does the work, so a
backend's capability rows name them by encoding too.
"""
from __future__ import annotations

from .. import symbolic as sym
from ..dtypes import float32, int32, int64
from ..kvcache import CACHE_ENCODINGS, ROLES, CacheEncodingError, cache_encoding
from ..types import TensorType
from .decoder import _activation, _positions, check_positions_in_cache
from .registry import Attr, defop

CACHE_OPS = ("kv_cache_write", "kv_cache_read")
OPTIONS = ("group", "residual", "rank", "outliers")       # every encoding's options, as optional attributes
_ATTRS = {"encoding": Attr("str", choices=tuple(CACHE_ENCODINGS)), "role": Attr("str", choices=ROLES),
          "max_len": Attr("int"), "head_dim": Attr("int"), "group": Attr("int", None), "residual": Attr("int", None),
          "rank": Attr("int", None), "outliers": Attr("int", None)}


def encoding_of(attrs: dict):
    """The :class:`~nnforge.ir.kvcache.CacheEncoding` a kv_cache_write / kv_cache_read node's attributes name."""
    return cache_encoding(attrs["encoding"], attrs["role"], **{k: attrs.get(k) for k in OPTIONS})


def _attrs_key(attrs: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in attrs.items() if k != "role"))


def attention_cache_reads(graph, node, kinds) -> tuple | None:
    """(the K read, the V read) whose state a backend's attention kernel can read in place of
    ``node``'s k and v: float32 attention over ``kv_cache_read`` outputs of one encoding whose kind
    is in ``kinds`` (same options, the attention's positions, neither a graph output); else None."""
    q, k, v, positions = node.inputs
    reads = [x.producer for x in (k, v)]
    if q.dtype.name != "float32" or any(r is None or r.op != "kv_cache_read" for r in reads):
        return None
    kr, vr = reads
    if encoding_of(kr.attrs).kind not in kinds:
        return None
    if (kr.attrs["role"], vr.attrs["role"]) != ("k", "v") or _attrs_key(kr.attrs) != _attrs_key(vr.attrs):
        return None
    if any(r.inputs[0] is not positions or r.output in graph.outputs for r in reads):
        return None
    return kr, vr


def _check_state(op: str, parts, batch, kv_heads, attrs) -> list[TensorType]:
    """The state's types as the encoding lays them out, checked against ``parts``."""
    enc = encoding_of(attrs)
    if attrs["max_len"] < 1 or attrs["head_dim"] < 1:
        raise ValueError(f"{op} max_len and head_dim must be positive, got {attrs['max_len']}, {attrs['head_dim']}")
    enc.check_head_dim(attrs["head_dim"], op)
    want = enc.parts(attrs["max_len"], attrs["head_dim"])
    if len(parts) != len(want):
        raise ValueError(f"{op}: a {enc.kind} {attrs['role']} cache has {len(want)} state tensors "
                         f"({', '.join(p.name for p in want)}), got {len(parts)}")
    out = []
    for p, t in zip(want, parts):
        expect = TensorType(p.dtype, (batch, kv_heads, p.rows, p.cols))
        if t.dtype != p.dtype or t.rank != 4 or not all(sym.equal(a, b) for a, b in zip(t.shape, expect.shape)):
            raise ValueError(f"{op}: state part {p.name} must be {expect}, got {t}")
        out.append(t)
    return out


def _write_infer(new, positions, *parts, **attrs):
    _activation(new, "kv_cache_write", "new", rank=4)
    _positions(positions, new.shape[0], new.shape[2], "kv_cache_write")
    if isinstance(new.shape[3], int) and new.shape[3] != attrs["head_dim"]:
        raise ValueError(f"kv_cache_write new {new} must have head_dim {attrs['head_dim']}")
    try:
        return _check_state("kv_cache_write", parts, new.shape[0], new.shape[1], attrs)
    except CacheEncodingError as e:
        raise ValueError(str(e)) from None


def _write_ref(ctx, new, positions, *parts, **attrs):
    check_positions_in_cache(positions, attrs["max_len"], "kv_cache_write")
    state = encoding_of(attrs).write(list(parts), new, positions.long())
    # float parts in the interpreter's compute type, as every float value there (their values are
    # those of the declared float16 / float32 storage)
    return [t.to(ctx.float_dtype) if t.is_floating_point() else t for t in state]


def _read_infer(positions, *parts, **attrs):
    if positions.dtype not in (int64, int32) or positions.rank != 2:
        raise TypeError(f"kv_cache_read positions must be int64 or int32 [batch, seq], got {positions}")
    first = parts[0]
    if first.rank != 4:
        raise ValueError(f"kv_cache_read state must be [batch, kv_heads, rows, cols], got {first}")
    if not sym.equal(positions.shape[0], first.shape[0]):
        raise ValueError(f"kv_cache_read positions {positions} and state {first} differ in batch")
    try:
        _check_state("kv_cache_read", parts, first.shape[0], first.shape[1], attrs)
    except CacheEncodingError as e:
        raise ValueError(str(e)) from None
    return TensorType(float32, (first.shape[0], first.shape[1], attrs["max_len"], attrs["head_dim"]))


def _read_ref(ctx, positions, *parts, **attrs):
    check_positions_in_cache(positions, attrs["max_len"], "kv_cache_read")
    out = encoding_of(attrs).read(list(parts), positions.long(), attrs["head_dim"])
    return out.to(ctx.float_dtype)


defop("kv_cache_write", ["new", "positions", "state*"], dict(_ATTRS), infer=_write_infer, ref=_write_ref,
      family="kvcache",
      doc="An encoded KV cache's state with new [b, kvh, s, d] written at positions [b, s]: the state "
          "tensors in, the new state out (one output per part, in the encoding's order).")
defop("kv_cache_read", ["positions", "state*"], dict(_ATTRS), infer=_read_infer, ref=_read_ref, family="kvcache",
      doc="The float cache [b, kvh, max_len, d] an encoded KV cache's state stands for after the step at "
          "positions [b, s] wrote it (zero past each row's last position): what attention reads.")

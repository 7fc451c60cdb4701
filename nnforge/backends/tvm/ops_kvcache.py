"""Lowering rules of the encoded KV-cache ops (docs/kv_cache.md) onto kernels/kvcache.py and
kernels/kvcache_attention.py.

``kv_cache_write`` updates the state tensors in place (``call_tir_inplace``), so between steps
the state a resident decoder holds is the encoded arrays themselves. An attention whose K and V
are ``kv_cache_read`` outputs of one encoding (the same positions) runs one kernel on the state;
such a read then emits nothing. Any other read is dequantised by its own kernel.
"""
from __future__ import annotations

from ...ir.ops.kvcache import attention_cache_reads, encoding_of
from . import threads
from .ops import _as, rule
from .weight_arrays import c_name


# the encodings whose state an attention kernel reads (kernels/kvcache_attention.py; kv-f16's float16
# rows: the float kernel); kv-gear4 has no fused kernel yet, so its reads are dequantised for the
# float attention kernel
FUSED = ("kv8", "kv-fp8", "kv4", "kv-nvfp4", "kv-f16")


def fused_reads(lw, node):
    """(the K read, the V read) an attention ``node`` reads the state of directly, or None."""
    return attention_cache_reads(lw.graph, node, FUSED)


def _state(lw, read):
    """The lowered state tensors a kv_cache_read reads (the write's outputs)."""
    return [lw.arg(v) for v in read.inputs[1:]]


@rule("kv_cache_write")
def _kv_cache_write(lw, node):
    from tvm.relax import op
    from .kernels.dense import vector_lanes
    from .kernels.kvcache import f16_write_func, kv4_write_func, nvfp4_write_func, per_token_write_func
    from .kernels.kvcache_gear import gear4_write_func
    new, positions, *state = node.inputs
    a = node.attrs
    enc = encoding_of(a)
    kvh, d, max_len = new.shape[1], a["head_dim"], a["max_len"]
    parts = []
    for v in state:
        x = lw.arg(v)
        if not lw.only_reader(v, node):     # another reader still needs the state as it was
            x = lw.emit(op.add(x, op.zeros_like(x)), f"{node.name}.{v.name}.copy")
        parts.append(x)
    if enc.kind == "kv4":
        # one kernel per cache: its assertion on the positions names the node
        name = c_name(f"nf_kv4_write_{node.name}")
        func = kv4_write_func(enc.role, kvh, max_len, d, enc.group, enc.residual, f"node {node.name}")
    elif enc.kind == "kv-gear4":
        name = c_name(f"nf_kv_gear4_write_{node.name}")
        func = gear4_write_func(enc.role, kvh, max_len, d, enc.group, enc.residual, enc.rank, enc.outliers,
                                f"node {node.name}")
    elif enc.kind == "kv-nvfp4":
        name = c_name(f"nf_kv_nvfp4_write_{kvh}x{max_len}x{d}")
        func = nvfp4_write_func(kvh, max_len, d, vector_lanes(lw.target))
    elif enc.kind == "kv-f16":
        name = c_name(f"nf_kv_f16_write_{kvh}x{max_len}x{d}")
        func = f16_write_func(kvh, max_len, d, vector_lanes(lw.target))
    else:
        group = enc.channels(d)
        name = c_name(f"nf_{enc.kind}_write_{kvh}x{max_len}x{d}_g{group}")
        func = per_token_write_func(enc.kind, kvh, max_len, d, vector_lanes(lw.target), group)
    x = lw.arg(new) if new.dtype.name == "float32" else lw.emit(op.astype(lw.arg(new), "float32"))
    return lw.relax.call_tir_inplace(lw.func(name, func), [x, _as(lw, positions, "int64"), *parts],
                                     list(range(2, 2 + len(parts))), [lw.ttype(v) for v in node.outputs])


@rule("kv_cache_read")
def _kv_cache_read(lw, node):
    from .kernels.kvcache import PER_TOKEN, read_func
    readers = lw.readers(node.output)
    if readers and node.output not in lw.graph.outputs and all(
            r.op == "attention" and fused_reads(lw, r) is not None for r in readers):
        return None             # the attention kernels read the state themselves
    a = node.attrs
    enc = encoding_of(a)
    kvh = node.inputs[1].shape[1]
    # kv8 / kv-fp8: the channels a scale covers, as the head dim sets them (the whole of a small head)
    extra = {"group": enc.channels(a["head_dim"])} if enc.kind in PER_TOKEN else enc.attrs()
    name = c_name(f"nf_{enc.kind}_read_{enc.role}_{kvh}x{a['max_len']}x{a['head_dim']}"
                  + "".join(f"_{k}{v}" for k, v in extra.items()))
    func = read_func(enc.kind, enc.role, kvh, a["max_len"], a["head_dim"], **extra)
    return lw.relax.call_tir(lw.func(name, func), [_as(lw, node.inputs[0], "int64"), *_state(lw, node)],
                             lw.ttype(node.output))


def fused_attention(lw, node):
    """The attention ``node`` on the encoded state its K and V reads stand for, or None (float K
    and V, or reads :func:`fused_reads` does not fuse)."""
    from .kernels.decoder import attention_func
    from .kernels.dense import vector_lanes
    from .kernels.kvcache_attention import kv4_attention_func, nvfp4_attention_func, per_token_attention_func
    reads = fused_reads(lw, node)
    if reads is None:
        return None
    kr, vr = reads
    q, _, _, positions = node.inputs
    _, h, _, d = q.shape
    enc = encoding_of(kr.attrs)
    kvh, max_len = kr.inputs[1].shape[1], kr.attrs["max_len"]
    a = node.attrs
    lanes = vector_lanes(lw.target)
    # the threads of this process's pool: few kv heads are cut into blocks of query heads to fill them
    most = threads.most()
    tail = f"w{a['window']}_c{a['softcap']:g}_s{a['scale']:.9g}"
    if enc.kind == "kv4":
        name = c_name(f"nf_kv4_attention_{h}x{kvh}x{max_len}x{d}_g{enc.group}_r{enc.residual}_{tail}")
        func = kv4_attention_func(h, kvh, max_len, d, enc.group, enc.residual, float(a["scale"]), int(a["window"]),
                                  float(a["softcap"]), lanes, most)
    elif enc.kind == "kv-nvfp4":
        name = c_name(f"nf_kv_nvfp4_attention_{h}x{kvh}x{max_len}x{d}_{tail}")
        func = nvfp4_attention_func(h, kvh, max_len, d, float(a["scale"]), int(a["window"]), float(a["softcap"]),
                                    most)
    elif enc.kind == "kv-f16":
        # the float kernel on the float16 rows: the same loops, each chunk widened as it is loaded
        name = c_name(f"nf_kv_f16_attention_{h}x{kvh}x{max_len}x{d}_{tail}")
        func = attention_func(h, kvh, max_len, d, float(a["scale"]), int(a["window"]), float(a["softcap"]), lanes,
                              most, cache_dtype="float16")
    else:
        group = enc.channels(d)
        name = c_name(f"nf_{enc.kind}_attention_{h}x{kvh}x{max_len}x{d}_g{group}_{tail}")
        func = per_token_attention_func(enc.kind, h, kvh, max_len, d, float(a["scale"]), int(a["window"]),
                                        float(a["softcap"]), lanes, most, group)
    args = [lw.arg(q), *_state(lw, kr), *_state(lw, vr), _as(lw, positions, "int64")]
    return lw.relax.call_tir(lw.func(name, func), args, lw.relax.TensorType(lw.shape(q.shape), "float32"))


__all__ = ["FUSED", "fused_attention", "fused_reads"]

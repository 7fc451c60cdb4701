"""Kernels the mlir backend's module runs in place of an op's reference kernel, where torch-mlir
lowers the reference's torch call to its ``tm_tensor`` dialect (sort, scatter, scan), which the
linalg-on-tensors, TOSA and StableHLO modules cannot hold: the same results from compares,
sums and gathers it lowers everywhere. They compute in O(n^2) (top-k, cumsum) and O(rows x
updates) (index_put) memory, like the one-hot forms of nnforge.passes.decompose.

An encoded KV cache's write and read (kv8: codes and scales per token, docs/kv_cache.md)
run here too: their reference kernels refuse out-of-cache positions by reading the positions'
values, which torch.export cannot trace, and scatter the step's rows. Here the encoding quantises
as the reference does and each slot gathers the row of the token written there; a position outside
the cache writes nothing, as the decompose pass's cache update (the decoder runner pads with one).

``hadamard`` runs in :class:`Hadamard`: two products with constant factors, not the reference's
butterfly stages, whose matrices export would trace (see the class).

``dynamic_quant``'s minifloat formats (E4M3, MX, NVFP4) find exponents with log2 corrected by
exact powers of two: the reference's ``torch.frexp`` has no torch-mlir lowering, and its E8M0
scales are decoded through a cached table that export would trace (as hadamard's matrices)."""
from __future__ import annotations

import torch

from ...ir import minifloat as mf
from ...ir.actquant import ACT_FORMATS, TINY, act_quantize, check
from ...ir.dtypes import dtype
from ...ir.ops.kvcache import encoding_of


def topk_indices(ctx, x, k, axis, largest):
    """Each element's place in the stable order is the count of elements before it (better, or
    equal at a lower index); the indices are read off the first k places."""
    k = ctx.dim(k)
    xs = x.movedim(axis, -1)
    n = xs.shape[-1]
    mine, other = xs.unsqueeze(-1), xs.unsqueeze(-2)                 # [..., i, 1] and [..., 1, j]
    beats = other > mine if largest else other < mine
    order = torch.arange(n, device=x.device)
    earlier = order.unsqueeze(0) < order.unsqueeze(1)                  # [i, j]: j comes before i
    place = (beats | ((other == mine) & earlier)).sum(-1)              # [..., i]
    at = place.unsqueeze(-2) == torch.arange(k, device=x.device).unsqueeze(-1)     # [..., place, i]
    return torch.where(at, order, torch.zeros_like(order)).sum(-1).movedim(-1, axis)


def index_put(ctx, x, values, *indices, accumulate):
    """x's indexed axes flattened to one of P rows; each of the N writes is a one-hot row of a
    [P, N] match, summed when accumulating, else the last write to a row wins."""
    used = len(indices)
    lead, rest = x.shape[:used], x.shape[used:]
    idx = torch.broadcast_tensors(*indices)
    flat = torch.zeros_like(idx[0], dtype=torch.int64)
    for i, size in zip(idx, lead):
        i = i.to(torch.int64)
        flat = flat * size + torch.where(i < 0, i + size, i)
    flat = flat.reshape(-1)
    rows, writes = x.reshape(-1, *rest), values.broadcast_to(*idx[0].shape, *rest).reshape(flat.shape[0], *rest)
    match = torch.arange(rows.shape[0], device=x.device).unsqueeze(1) == flat.unsqueeze(0)     # [P, N]
    spread = match.reshape(*match.shape, *[1] * len(rest))
    if accumulate:
        added = torch.where(spread, writes.unsqueeze(0), torch.zeros_like(writes).unsqueeze(0)).sum(1)
        return (rows + added.to(rows.dtype)).reshape(x.shape)
    order = torch.arange(flat.shape[0], device=x.device)
    last = torch.where(match, order, torch.full_like(order, -1)).amax(1)                     # [P]
    taken = torch.index_select(writes, 0, last.clamp(min=0))
    written = (last >= 0).reshape(-1, *[1] * len(rest))
    return torch.where(written, taken, rows).reshape(x.shape)


def cumsum(ctx, x, axis):
    """Element i is the sum of elements 0..i: a lower-triangular match summed."""
    xs = x.movedim(axis, -1)
    order = torch.arange(xs.shape[-1], device=x.device)
    upto = order.unsqueeze(0) <= order.unsqueeze(1)                    # [i, j]: j at or before i
    return torch.where(upto, xs.unsqueeze(-2), torch.zeros_like(xs).unsqueeze(-2)).sum(-1, dtype=x.dtype).movedim(-1, axis)


def write_slots(state, rows, positions):
    """``state`` [b, h, L, c] with ``rows`` [b, h, s, c] at the slots ``positions`` [b, s] (distinct
    within a row); a position outside 0..L-1 writes nothing."""
    b, h, slots, c = state.shape
    seq = rows.shape[2]
    hit = positions.unsqueeze(-1) == torch.arange(slots, device=state.device)          # [b, s, L]
    order = torch.arange(seq, device=state.device).reshape(1, seq, 1)
    token = torch.where(hit, order, torch.zeros_like(order)).sum(1)                     # [b, L]
    taken = torch.gather(rows.to(state.dtype), 2, token.reshape(b, 1, slots, 1).expand(b, h, slots, c))
    written = hit.any(1).reshape(b, 1, slots, 1)
    return torch.where(written, taken, state)


def kv_cache_write(ctx, new, positions, *parts, **attrs):
    """The step's codes and scales (the encoding's own quantisation) at their slots, each part in
    its stored dtype."""
    enc = encoding_of(attrs)
    stored = [p.dtype.torch_dtype for p in enc.parts(attrs["max_len"], attrs["head_dim"])]
    codes, scale = enc.quantize(new)
    return [write_slots(part.to(dt), rows, positions) for part, rows, dt in zip(parts, (codes, scale), stored)]


def kv_cache_read(ctx, positions, *parts, **attrs):
    return encoding_of(attrs).read(list(parts), positions, attrs["head_dim"]).to(ctx.float_dtype)


def _pow2(e):
    """2^e, exactly, for integral float32 ``e`` in [-127, 127]: 2^-127 doubled along e + 127's
    binary digits (torch.pow and exp2 round through libm; torch-mlir lowers no bit casts)."""
    n, p = e + 127, torch.full_like(e, 2.0 ** -127)
    for i in reversed(range(8)):
        take = n >= 2 ** i
        n = torch.where(take, n - 2 ** i, n)
        p = torch.where(take, p * 2.0 ** (2 ** i - 1) * 2.0, p)      # 2^128 is past float32
    return p


def _exponent(a):
    """floor(log2(a)) of float32 ``a`` >= 0, as an integral float32 clamped to [-127, 127]:
    log2 may miss by one next to a power of two, which the exact power corrects."""
    e = torch.floor(torch.log2(a)).clamp(-127, 127)
    p = _pow2(e)
    return torch.where(a < p, e - 1, torch.where(a >= 2 * p, e + 1, e)).clamp(-127, 127)


def round_to(x, fmt):
    """``minifloat.round_to(x, fmt)`` (nearest, ties to even, saturating) of float32 ``x``, in
    float32: the quantum of x's binade (the subnormals' below the format's smallest normal), a
    power of two, so the division and product are exact."""
    a = x.abs()
    quantum = _pow2(_exponent(a).clamp(min=mf.min_exponent(fmt)) - fmt.man_bits)
    r = (torch.round(a / quantum) * quantum).clamp(max=fmt.max_value)
    return torch.where(x < 0, -r, r)


def dynamic_quant(ctx, x, *, format, group, clip, global_scale):
    """``actquant.act_quantize``: the integer formats as the reference computes them, the
    minifloat ones through :func:`round_to` and exact powers of two, in the same float32 order."""
    kind, element, _, scale_kind = ACT_FORMATS[format]
    if kind == "int":
        return act_quantize(x, format, group, clip, global_scale)
    size = check(format, group, clip, global_scale, x.shape[-1], "dynamic_quant")
    el, e4m3 = dtype(element), dtype("e4m3")
    g = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // size, size)
    amax = g.abs().amax(-1, keepdim=True) * clip
    if scale_kind == "e8m0":
        scale = _pow2((_exponent(amax) - mf.max_exponent(el)).clamp(-127, 127))
    elif scale_kind == "e4m3":
        gs = global_scale or (g.abs().amax((-2, -1), keepdim=True) / (el.max_value * e4m3.max_value)).clamp(min=TINY)
        scale = round_to(amax / el.max_value / gs, e4m3) * gs
    else:
        scale = (amax / el.max_value).clamp(min=TINY)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = round_to(g / safe, el) * safe
    return torch.where(scale > 0, q, torch.zeros_like(q)).reshape(x.shape)


class Hadamard(torch.nn.Module):
    """The ``hadamard`` blocks of a graph as ``H_a^T X H_c`` on x viewed ``[groups, a, c]`` (the
    block's Kronecker factors, ``ir.hadamard.hadamard_split``), which torch-mlir lowers to matmuls
    with constant operands. The factors are fp32 buffers made here, not tensors made in
    ``forward``: torch.export would trace their construction, and ir.hadamard's caches would keep
    the fake tensors it traces with."""

    def __init__(self, blocks):
        super().__init__()
        from ...ir.hadamard import hadamard_matrix
        for block in sorted(set(blocks)):
            c, a = self.split(block)
            self._factor(f"h{c}", hadamard_matrix(c, dtype=torch.float32))
            if a > 1:          # H_a on the left, transposed: a Paley matrix is not symmetric
                self._factor(f"t{a}", hadamard_matrix(a, dtype=torch.float32).T)

    def _factor(self, name, h):
        if not hasattr(self, name):
            self.register_buffer(name, h.contiguous())

    @staticmethod
    def split(block: int) -> tuple[int, int]:
        from ...ir.hadamard import hadamard_split
        c = hadamard_split(block)
        return c, block // c

    def forward(self, x, block):
        c, a = self.split(block)
        y = x.to(torch.float32).reshape(-1, a, c) @ getattr(self, f"h{c}")
        if a > 1:
            y = getattr(self, f"t{a}") @ y
        return y.reshape(x.shape).to(x.dtype)


KERNELS = {"topk_indices": topk_indices, "index_put": index_put, "cumsum": cumsum,
           "kv_cache_write": kv_cache_write, "kv_cache_read": kv_cache_read, "dynamic_quant": dynamic_quant}
# ops whose kernel returns a list of outputs (one per state part), not one tensor
MULTI_OUTPUT = {"kv_cache_write"}

"""The parameters a weight's encoding leaves free, as tensors an optimiser can tune.

A compressed weight is fixed in its discrete choices (integer or minifloat codes, palette
indices, which values sparsity keeps) and free in its continuous ones: scales, LUT entries, kept
sparse values, low-rank factors, per-row scales; a block's 1-D weights (norm weights, biases) are
free too. Recovery (reconstruction, distillation) tunes exactly these, so a tuned weight is stored
in the encoding it had, at the same size, and every backend runs it as before.

:class:`Tunable` holds one weight's free tensors as zero-initialised deltas: a positive tensor
(a scale) is tuned as ``init * (1 + d)``, any other as ``init + rms(init) * d``, so one learning
rate moves every tensor by about the same relative amount. The forward pass rounds each tensor to
the dtype it is stored in (a float16 scale, a float16 LUT) with a straight-through gradient, so
what is tuned is what will be stored. Codes are never touched; scales stored as minifloat codes
(MX's E8M0 exponents, NVFP4's E4M3 block scales) stay as they are (NVFP4's fp32 tensor scale is
free).

With ``rounding``, an integer-coded weight (IntQuant) learns its rounding too: each code may move
one step up or down from its one-shot value, through a latent offset in [-1, 1] that is rounded in
the forward pass with a straight-through gradient (SignRound's parametrisation). Given the weight
before compression (``start``), the offset starts where that weight falls on the code grid, kept
inside the one-shot code's rounding interval: tuning begins at the one-shot codes (GPTQ's or
RTN's), and a code whose float value lay near a rounding boundary needs only a small push to
flip. Codes stay on the format's grid, so the encoding keeps its type and size.

    >>> t = Tunable(enc, top=True)
    >>> w = t.weight()              # the decoded weight, differentiable in t.deltas
    >>> enc2 = t.encoding()         # the same encoding with the tuned tensors stored
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from ...ir import Dense, IntQuant, MiniFloat
from ...ir.encodings import Encoding, _apply_groups
from ...ir.lowrank import LowRank
from ...ir.palette import Palettized
from ...ir.sparse import Sparse

# per encoding: its own float fields that are free, and the fields holding encodings (nested)
_OWN = {Dense: ("data",), IntQuant: ("scale",), MiniFloat: ("scale", "global_scale"), Palettized: ("lut",),
        Sparse: ("row_scale",), LowRank: ()}
_NESTED = {Sparse: ("values",), LowRank: ("a", "b", "base")}
_ROUNDED = (torch.float16, torch.bfloat16)
_INSIDE = 0.49        # a latent offset's start stays inside its code's rounding interval


def free_fields(enc: Encoding, top: bool = True) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """(path of field names from ``enc`` down, stored tensor) for each free float tensor. A dense
    weight of two or more dimensions at the top is not free: it was left uncompressed, and tuning
    it would be fine-tuning the layer, not recovering its encoding."""
    if isinstance(enc, Dense) and top and enc.data.dim() > 1:
        return []
    out = []
    for name in _OWN.get(type(enc), ()):
        t = getattr(enc, name)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out.append(((name,), t))
    for name in _NESTED.get(type(enc), ()):
        part = getattr(enc, name)
        if part is not None:
            out += [((name, *path), t) for path, t in free_fields(part, top=False)]
    return out


def _replaced(enc: Encoding, path: tuple[str, ...], value, validate: bool) -> Encoding:
    """``enc`` with the tensor at ``path`` replaced: checked by the encoding's constructor when
    ``validate``, else a shallow copy (a live tensor must keep its autograd history, which Dense's
    constructor detaches)."""
    head, rest = path[0], path[1:]
    if rest:
        value = _replaced(getattr(enc, head), rest, value, validate)
    if validate:
        return dataclasses.replace(enc, **{head: value})
    out = copy.copy(enc)
    object.__setattr__(out, head, value)
    return out


def _decoder(enc: Encoding, free: list[tuple[str, ...]]):
    """A function from the free tensors (in ``free``'s order) to the decoded float32 weight. The
    parts that never change are unpacked once: an IntQuant's centred codes, where a Sparse weight's
    kept values go; any other encoding decodes a shallow copy holding the live tensors."""
    if isinstance(enc, IntQuant) and free == [("scale",)]:
        q = enc.int_codes().to(torch.float32)
        return lambda xs: _int_weight(enc, q, xs[0])
    if isinstance(enc, Sparse) and all(p[0] in ("values", "row_scale") for p in free):
        numbered = Dense(torch.arange(1, enc.values.numel + 1, dtype=torch.float64).reshape(enc.values.shape))
        placed = dataclasses.replace(enc, values=numbered, row_scale=None).decode(torch.float64).reshape(-1)
        at = torch.nonzero(placed).reshape(-1)
        at = at[torch.argsort(placed[at])]                          # the flat position of each kept value
        vi = [i for i, p in enumerate(free) if p[0] == "values"]
        ri = free.index(("row_scale",)) if ("row_scale",) in free else None
        inner = [free[i][1:] for i in vi]
        values = _decoder(enc.values, inner) if inner else (lambda xs, v=enc.values.decode(torch.float32): v)
        fixed_rs = None if enc.row_scale is None or ri is not None else enc.row_scale.to(torch.float32)

        def sparse(xs):
            vals = values([xs[i] for i in vi]).reshape(-1)
            w = torch.zeros(enc.numel, dtype=torch.float32).index_put((at,), vals).reshape(enc.shape[0], -1)
            rs = xs[ri] if ri is not None else fixed_rs
            if rs is not None:
                w = w * rs[:, None]
            return w.reshape(enc.shape)
        return sparse

    def generic(xs):
        live = enc
        for path, x in zip(free, xs):
            live = _replaced(live, path, x, validate=False)
        return live.decode(torch.float32)
    return generic


def _int_weight(enc: IntQuant, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``enc``'s float32 weight from its codes (stored column order, as floats: fixed or live) and
    its scales (live while tuning)."""
    if enc.zero_point is not None:
        codes = codes - enc.zero_point.to(torch.float32)[:, torch.arange(codes.shape[1]) // enc.group_size]
    return _apply_groups(codes, scale, enc.group_size, enc.perm).reshape(enc.shape)


def _grid(enc: IntQuant) -> tuple[int, int]:
    """The codes an IntQuant's format uses: symmetric signed grids leave out -2^(b-1)."""
    half = 1 << (enc.bits - 1)
    return (1 - half, half - 1) if enc.signed else (0, (1 << enc.bits) - 1)


class _Rounding:
    """An IntQuant's codes as the one-shot codes plus a latent offset (see the module docstring)."""

    def __init__(self, enc: IntQuant, start: torch.Tensor | None = None):
        self.enc = enc
        self.codes = enc.int_codes().to(torch.float32)
        self.lo, self.hi = _grid(enc)
        offset = torch.zeros_like(self.codes)
        if start is not None and start.numel() == self.codes.numel():
            offset = (self._position(start) - self.codes).clamp(-_INSIDE, _INSIDE).nan_to_num(0.0)
        self.offset = offset.requires_grad_(True)

    def _position(self, w: torch.Tensor) -> torch.Tensor:
        """Where the float weight ``w`` falls on the code grid (stored column order)."""
        enc = self.enc
        w = w.detach().to(torch.float32).reshape(self.codes.shape)
        if enc.perm is not None:
            w = w[:, enc.perm]
        idx = torch.arange(w.shape[1]) // enc.group_size
        x = w / enc.scale.to(torch.float32)[:, idx]
        if enc.zero_point is not None:
            x = x + enc.zero_point.to(torch.float32)[:, idx]
        return x

    def __call__(self, live: bool) -> torch.Tensor:
        x = self.codes + self.offset.clamp(-1, 1)
        q = x.detach().round().clamp(self.lo, self.hi)
        return x + (q - x.detach()) if live else q

    def weight(self, scale: torch.Tensor) -> torch.Tensor:
        return _int_weight(self.enc, self(live=True), scale)

    def encoding(self, scale: torch.Tensor) -> IntQuant:
        enc = self.enc
        return IntQuant.from_codes(self(live=False).to(torch.int64), scale, bits=enc.bits, signed=enc.signed,
                                   shape=enc.shape, group_size=enc.group_size, zero_point=enc.zero_point,
                                   perm=enc.perm, out_dtype=enc.out_dtype)

    def moved(self) -> int:
        """Codes that differ from their one-shot value."""
        return int((self(live=False) != self.codes).sum())


class Tunable:
    """One weight's free tensors (see the module docstring); ``deltas`` are the parameters;
    ``start``: the weight before compression, where learned rounding starts from."""

    def __init__(self, enc: Encoding, top: bool = True, rounding: bool = False, start: torch.Tensor | None = None):
        self.enc = enc
        self.fields = free_fields(enc, top)
        self.deltas = [torch.zeros(t.shape, dtype=torch.float32, requires_grad=True) for _, t in self.fields]
        self.rounding = _Rounding(enc, start) if rounding and isinstance(enc, IntQuant) else None
        if self.rounding is not None:
            self.deltas.append(self.rounding.offset)
        self._base = []
        for _, t in self.fields:
            init = t.detach().to(torch.float32)
            positive = bool((init > 0).all()) if init.numel() else False
            spread = init.pow(2).mean().sqrt().clamp(min=1e-12) if init.numel() else torch.tensor(1.0)
            self._base.append((init, positive, spread))
        self._decode = _decoder(enc, [p for p, _ in self.fields])

    @property
    def size(self) -> int:
        """Free numbers this weight has (its codes too when their rounding is learned)."""
        return sum(t.numel() for _, t in self.fields) + (self.rounding.codes.numel() if self.rounding else 0)

    def _values(self, live: bool) -> list[torch.Tensor]:
        out = []
        for (_, stored), d, (init, positive, spread) in zip(self.fields, self.deltas, self._base):
            x = init * (1 + d) if positive else init + spread * d
            if positive:
                x = x.clamp(min=torch.finfo(torch.float32).tiny)
            if stored.dtype in _ROUNDED:
                rounded = x.detach().to(stored.dtype).to(torch.float32)
                x = x + (rounded - x.detach()) if live else rounded
            out.append(x if live else x.detach())
        return out

    def weight(self) -> torch.Tensor:
        """The decoded weight (float32) with the current deltas, differentiable in them."""
        if self.rounding is not None:
            return self.rounding.weight(self._values(live=True)[0])
        return self._decode(self._values(live=True))

    def encoding(self) -> Encoding:
        """The encoding with the tuned tensors stored in their dtypes (checked as any encoding)."""
        if self.rounding is not None:
            scale = self._values(live=False)[0].to(self.fields[0][1].dtype).contiguous()
            return self.rounding.encoding(scale)
        enc = self.enc
        for (path, stored), x in zip(self.fields, self._values(live=False)):
            enc = _replaced(enc, path, x.to(stored.dtype).contiguous(), validate=True)
        return enc


__all__ = ["Tunable", "free_fields"]

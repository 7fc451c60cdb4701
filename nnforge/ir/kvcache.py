"""KV-cache encodings: what a decoder's cache state holds and how tokens are written into it and
read back, bit-exactly (docs/kv_cache.md defines every rounding).

An encoding turns one float cache ``[batch, kv_heads, max_len, head_dim]`` into a few state
tensors (its :class:`Part` list, each ``[batch, kv_heads, rows, cols]``). ``write`` puts a step's
new keys or values at their positions and returns the new state; ``read`` gives back the float
cache the state stands for. The ``kv_cache_write`` / ``kv_cache_read`` ops (``ops/kvcache.py``)
call them, and backends name the encodings they run by :attr:`CacheEncoding.kind`.

    >>> enc = cache_encoding("kv4", "k", group=32, residual=128)
    >>> state = enc.zeros(batch=1, kv_heads=2, max_len=512, head_dim=64)
    >>> state = enc.write(state, new_keys, positions)          # new_keys [1, 2, s, 64]
    >>> keys = enc.read(state, positions, head_dim=64)         # [1, 2, 512, 64] float32
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import NnforgeError
from . import minifloat, packing
from .dtypes import DType, dtype as _dtype

FP16_MAX = 65504.0
ROLES = ("k", "v")


class CacheEncodingError(NnforgeError, ValueError):
    """A cache encoding's options, state or positions that it cannot take."""


@dataclass(frozen=True)
class Part:
    """One state tensor of an encoded cache: ``cache.{i}.{k|v}.{name}``, ``[batch, kv_heads, rows, cols]``."""
    name: str
    dtype: DType
    rows: int
    cols: int

    @property
    def bytes_per_row(self) -> int:
        return self.cols * self.dtype.torch_dtype.itemsize


def f16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float16, nearest even, saturating at the largest finite float16."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def _scatter_tokens(state: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``state`` [b, h, L, c] with ``rows`` [b, h, s, c] written at slot ``positions`` [b, s]."""
    index = positions[:, None, :, None].expand(rows.shape)
    return state.clone().scatter_(2, index, rows.to(state.dtype))


class CacheEncoding(ABC):
    kind: ClassVar[str]
    role: str

    @abstractmethod
    def parts(self, max_len: int, head_dim: int) -> list[Part]:
        """The state tensors, in the order the ops take them."""

    @abstractmethod
    def write(self, state: list[torch.Tensor], new: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """The state with ``new`` [b, h, s, d] written at ``positions`` [b, s] (int64, in range)."""

    @abstractmethod
    def read(self, state: list[torch.Tensor], positions: torch.Tensor, head_dim: int) -> torch.Tensor:
        """The float32 cache [b, h, L, d] the state stands for after the write of the step at
        ``positions``: zero past each row's last position."""

    def attrs(self) -> dict:
        """The op attributes besides ``encoding`` and ``role`` that rebuild this encoding."""
        return {}

    def describe(self) -> dict:
        return {"encoding": self.kind, **self.attrs()}

    def zeros(self, batch: int, kv_heads: int, max_len: int, head_dim: int) -> list[torch.Tensor]:
        """The state of an empty cache (what a new sequence starts from)."""
        return [torch.zeros(batch, kv_heads, p.rows, p.cols, dtype=p.dtype.torch_dtype)
                for p in self.parts(max_len, head_dim)]

    def state_bytes(self, kv_heads: int, max_len: int, head_dim: int) -> int:
        """Bytes of the whole state of one sequence."""
        return kv_heads * sum(p.rows * p.bytes_per_row for p in self.parts(max_len, head_dim))

    def check_head_dim(self, head_dim: int, where: str) -> None:
        """Refuse a head dim the layout cannot hold."""


# --- per-token encodings: kv8, kv-fp8 -------------------------------------------------------------
class _PerToken(CacheEncoding):
    """Each token's head_dim values share one float16 scale; codes and scale written at its slot."""

    code_dtype: ClassVar[str]
    top: ClassVar[float]          # the largest code magnitude: max|x| maps onto it

    def __init__(self, role: str):
        self.role = role

    def parts(self, max_len, head_dim):
        return [Part("codes", _dtype(self.code_dtype), max_len, head_dim), Part("scale", _dtype("float16"), max_len, 1)]

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x`` = values / scale (float32)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values of ``codes``."""

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, float16 scale [..., 1]) of float32 ``x`` [..., d]."""
        x = x.to(torch.float32)
        scale = f16(x.abs().amax(-1, keepdim=True) / self.top)
        s = scale.to(torch.float32)
        ratio = torch.where(s > 0, x / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(x))
        return self.encode(ratio), scale

    def write(self, state, new, positions):
        codes, scale = self.quantize(new)
        # the interpreter hands float state over in its compute type: the scale goes back as stored
        return [_scatter_tokens(state[0], codes, positions),
                _scatter_tokens(state[1].to(torch.float16), scale, positions)]

    def read(self, state, positions, head_dim):
        return self.decode(state[0]) * state[1].to(torch.float32)


class KV8(_PerToken):
    """int8 codes, symmetric, one float16 scale per token and head."""
    kind = "kv8"
    code_dtype = "int8"
    top = 127.0

    def encode(self, x):
        return torch.round(x).clamp(-127, 127).to(torch.int8)

    def decode(self, codes):
        return codes.to(torch.float32)


class KVFP8(_PerToken):
    """OCP E4M3 codes (uint8 bit patterns), one float16 scale per token and head."""
    kind = "kv-fp8"
    code_dtype = "uint8"
    top = 448.0
    FORMAT = _dtype("e4m3")

    def encode(self, x):
        return minifloat.encode(x, self.FORMAT).to(torch.uint8)

    def decode(self, codes):
        return minifloat.decode(codes, self.FORMAT, torch.float32)


# --- kv4: KIVI ----------------------------------------------------------------------------------
def quantize_asym4(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int64 in 0..15, float16 scale, float16 min) of float32 ``x`` over axis ``dim``
    (kept, size 1): ``code = clamp(round((x - m) / s), 0, 15)``, 0 where s is 0."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    m, scale = f16(lo), f16((hi - lo) / 15.0)
    s = scale.to(torch.float32)
    q = torch.round((x - m.to(torch.float32)) / torch.where(s > 0, s, torch.ones_like(s)))
    codes = torch.where(s > 0, q, torch.zeros_like(q)).clamp(0, 15).to(torch.int64)
    return codes, scale, m


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """int64 codes [..., d] -> uint8 [..., d/2], low nibble first (ir/packing.py's layout)."""
    lead = codes.shape[:-1]
    return packing.pack_bits(codes.reshape(-1, codes.shape[-1]), 4).reshape(*lead, -1)


def _unpack4(packed: torch.Tensor, d: int) -> torch.Tensor:
    lead = packed.shape[:-1]
    return packing.unpack_bits(packed.reshape(-1, packed.shape[-1]), 4, d).reshape(*lead, d)


class KV4(CacheEncoding):
    """KIVI: 4-bit asymmetric codes, keys per channel in groups of ``group`` tokens, values per
    token, the most recent tokens (``residual`` to ``residual + group - 1`` of them) in a float
    window until their group completes."""
    kind = "kv4"

    def __init__(self, role: str, group: int = 32, residual: int = 128):
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise CacheEncodingError(f"kv4 group must be a positive number of tokens, got {group!r}")
        if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
            raise CacheEncodingError(f"kv4 residual must be a number of tokens >= 0, got {residual!r}")
        self.role, self.group, self.residual = role, group, residual

    @property
    def window(self) -> int:
        return max(1, self.residual + self.group - 1)

    def attrs(self):
        return {"group": self.group, "residual": self.residual}

    def check_head_dim(self, head_dim, where):
        if head_dim % 2:
            raise CacheEncodingError(f"{where}: kv4 packs two 4-bit codes a byte along the head dim, which is "
                                     f"{head_dim} (odd); choose kv8 or kv-fp8 for this cache")

    def parts(self, max_len, head_dim):
        f16t, codes = _dtype("float16"), Part("codes", _dtype("uint8"), max_len, head_dim // 2)
        window = Part("window", _dtype("float32"), self.window, head_dim)
        if self.role == "k":
            groups = -(-max_len // self.group)
            return [codes, Part("scale", f16t, groups, head_dim), Part("min", f16t, groups, head_dim), window]
        return [codes, Part("scale", f16t, max_len, 1), Part("min", f16t, max_len, 1), window]

    def quantized(self, n: int) -> int:
        """How many of the first ``n`` tokens are held as codes: whole groups, leaving at least
        ``residual`` tokens in the window."""
        return self.group * (max(n - self.residual, 0) // self.group)

    @staticmethod
    def _span(positions: torch.Tensor, row: int) -> tuple[int, int]:
        """(first position, count) of a batch row's consecutive positions."""
        p = positions[row]
        p0, s = int(p[0]), p.numel()
        if not torch.equal(p, torch.arange(p0, p0 + s, dtype=p.dtype)):
            raise CacheEncodingError(f"kv4: batch row {row} has positions {p.tolist()[:8]}: a kv4 cache needs each "
                                     "step's positions consecutive, continuing the sequence (its window holds the "
                                     "most recent tokens); feed tokens in order, or use kv8 for this cache")
        return p0, s

    def write(self, state, new, positions):
        codes, scale, mn, window = (t.clone() for t in state)
        scale, mn = scale.to(torch.float16), mn.to(torch.float16)
        new = new.to(torch.float32)
        g, w = self.group, self.window
        for b in range(new.shape[0]):
            p0, s = self._span(positions, b)
            n = p0 + s
            q_old, q_new = self.quantized(p0), self.quantized(n)
            held = torch.arange(q_old, p0)                          # earlier tokens still in the window
            seq = torch.cat([window[b][:, held % w].to(torch.float32), new[b]], dim=1)   # positions q_old..n-1
            done = seq[:, : q_new - q_old]                          # tokens whose group completes now
            if done.shape[1]:
                if self.role == "k":
                    h, _, d = done.shape
                    c, sc, m = quantize_asym4(done.reshape(h, -1, g, d), dim=2)
                    scale[b, :, q_old // g: q_new // g] = sc[:, :, 0]
                    mn[b, :, q_old // g: q_new // g] = m[:, :, 0]
                    c = c.reshape(h, -1, d)
                else:
                    c, sc, m = quantize_asym4(done, dim=-1)
                    scale[b, :, q_old:q_new], mn[b, :, q_old:q_new] = sc, m
                codes[b, :, q_old:q_new] = _pack4(c)
            live = torch.arange(q_new, n)
            window[b].zero_()
            window[b][:, live % w] = seq[:, q_new - q_old:].to(window.dtype)
        return [codes, scale, mn, window]

    def read(self, state, positions, head_dim):
        codes, scale, mn, window = state
        b, h, max_len, _ = codes.shape
        out = torch.zeros(b, h, max_len, head_dim, dtype=torch.float32)
        values = _unpack4(codes, head_dim).to(torch.float32)
        if self.role == "k":
            rows = torch.arange(max_len) // self.group
            s, m = scale[:, :, rows].to(torch.float32), mn[:, :, rows].to(torch.float32)
        else:
            s, m = scale.to(torch.float32), mn.to(torch.float32)
        deq = values * s + m
        for row in range(b):
            n = int(positions[row].max()) + 1 if positions.shape[1] else 0
            q = self.quantized(n)
            out[row, :, :q] = deq[row, :, :q]
            live = torch.arange(q, n)
            out[row, :, q:n] = window[row][:, live % self.window].to(torch.float32)
        return out


CACHE_ENCODINGS: dict[str, type[CacheEncoding]] = {c.kind: c for c in (KV8, KVFP8, KV4)}


def cache_encoding(kind: str, role: str, **attrs) -> CacheEncoding:
    """The encoding ``kind`` for a K (``role`` "k") or V cache, with its options (kv4: group, residual)."""
    if kind not in CACHE_ENCODINGS:
        raise CacheEncodingError(f"unknown KV-cache encoding {kind!r}; known: {', '.join(CACHE_ENCODINGS)}")
    if role not in ROLES:
        raise CacheEncodingError(f"a cache's role is 'k' or 'v', got {role!r}")
    cls = CACHE_ENCODINGS[kind]
    options = {k: v for k, v in attrs.items() if v is not None}
    if cls is not KV4 and options:
        raise CacheEncodingError(f"{kind} takes no option(s) {', '.join(sorted(options))} (only kv4 takes group and "
                                 "residual)")
    return cls(role, **options)


def float_bytes_per_token(kv_heads: int, head_dim: int, itemsize: int = 4) -> int:
    """Bytes a float cache of ``itemsize``-byte elements holds per token and layer side (K or V)."""
    return kv_heads * head_dim * itemsize


__all__ = ["CacheEncoding", "CacheEncodingError", "Part", "KV8", "KVFP8", "KV4", "CACHE_ENCODINGS", "cache_encoding",
           "quantize_asym4", "float_bytes_per_token", "f16"]

"""KV-cache encodings: what a decoder's cache state holds and how tokens are written into it and
read back, bit-exactly (docs/kv_cache.md defines every rounding).

An encoding turns one float cache ``[batch, kv_heads, max_len, head_dim]`` into a few state
tensors (its :class:`Part` list, each ``[batch, kv_heads, rows, cols]``). ``write`` puts a step's
new keys or values at their positions and returns the new state; ``read`` gives back the float
cache the state stands for. The ``kv_cache_write`` / ``kv_cache_read`` ops (``ops/kvcache.py``)
call them, and backends name the encodings they run by :attr:`CacheEncoding.kind`.

    >>> enc = cache_encoding("kv4", "k", group=64, residual=64)
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
from .ordered import low_rank, low_rank_term, top_magnitudes
from .dtypes import DType, dtype as _dtype

FP16_MAX = 65504.0
ROLES = ("k", "v")


class CacheEncodingError(NnforgeError, ValueError):
    """A cache encoding's options, state or positions that it cannot take."""


@dataclass(frozen=True)
class Part:
    """One state tensor of an encoded cache: ``cache.{i}.{k|v}.{name}``, ``[batch, kv_heads, rows, cols]``;
    ``fixed`` for one whose rows do not grow with the cache's length (kv4's window of recent tokens)."""
    name: str
    dtype: DType
    rows: int
    cols: int
    fixed: bool = False

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
    options: ClassVar[tuple[str, ...]] = ()       # the keyword options cache_encoding passes on
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

    def token_rows(self, new: torch.Tensor) -> list[torch.Tensor] | None:
        """Each state part's rows for the tokens of ``new`` [b, h, s, d] as stored, for an encoding
        that writes every token on its own at its slot (so a backend may scatter them into its state
        in place); None for one whose write also reads the state (kv4's groups and window)."""
        return None

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

    def compared_state(self, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """The state as a backend's is checked against the reference's (numerics.ENCODED_STATE_TOLERANCE):
        its parts, or what they stand for where the parts are not fixed by the keys to the last bits."""
        return state


# --- per-token encodings: kv8, kv-fp8 -------------------------------------------------------------
class _PerToken(CacheEncoding):
    """Each token's values share float16 scales, one per group of consecutive channels (kv-fp8: one
    group, the whole head); codes and scales written at its slot."""

    code_dtype: ClassVar[str]
    top: ClassVar[float]          # the largest code magnitude: a group's max|x| maps onto it

    def __init__(self, role: str):
        self.role = role

    def channels(self, head_dim: int) -> int:
        """Channels that share one scale."""
        return head_dim

    def parts(self, max_len, head_dim):
        return [Part("codes", _dtype(self.code_dtype), max_len, head_dim),
                Part("scale", _dtype("float16"), max_len, head_dim // self.channels(head_dim))]

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x`` = values / scale (float32)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 values of ``codes``."""

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [..., d], float16 scales [..., d / channels]) of float32 ``x`` [..., d]."""
        x = x.to(torch.float32)
        d = x.shape[-1]
        groups = x.reshape(*x.shape[:-1], d // self.channels(d), -1)
        scale = f16(groups.abs().amax(-1, keepdim=True) / self.top)
        s = scale.to(torch.float32)
        ratio = torch.where(s > 0, groups / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(groups))
        return self.encode(ratio).reshape(x.shape), scale[..., 0]

    def token_rows(self, new):
        return list(self.quantize(new))

    def write(self, state, new, positions):
        codes, scale = self.token_rows(new)
        # the interpreter hands float state over in its compute type: the scale goes back as stored
        return [_scatter_tokens(state[0], codes, positions),
                _scatter_tokens(state[1].to(torch.float16), scale, positions)]

    def read(self, state, positions, head_dim):
        values = self.decode(state[0])
        scale = state[1].to(torch.float32)
        groups = values.reshape(*values.shape[:-1], scale.shape[-1], -1) * scale[..., None]
        return groups.reshape(values.shape)


class KV8(_PerToken):
    """int8 codes, symmetric, one float16 scale per token and group of ``group`` consecutive channels
    (the whole head where it has fewer)."""
    kind = "kv8"
    options = ("group",)
    code_dtype = "int8"
    top = 127.0

    # a scale per group of channels rather than per head: a few outlier channels of the keys would
    # set one scale for the whole head and flatten the other channels' codes; each further group
    # costs one float16 per token
    def __init__(self, role: str, group: int = 64):
        _check_count(self.kind, "group", group, 1, "channels")
        super().__init__(role)
        self.group = group

    def attrs(self):
        return {"group": self.group}

    def channels(self, head_dim):
        return min(self.group, head_dim)

    def check_head_dim(self, head_dim, where):
        if head_dim % self.channels(head_dim):
            fits = max(g for g in range(1, self.group + 1) if head_dim % g == 0)
            raise CacheEncodingError(f"{where}: kv8 scales groups of {self.group} channels, and the head dim "
                                     f"{head_dim} is not a multiple of {self.group}; give the kv_cache pass "
                                     f"group_size={fits} (or another divisor of {head_dim})")

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


# --- kv-f16: the float cache in float16 -----------------------------------------------------------
class KVF16(CacheEncoding):
    """The float cache held in float16, as ExecuTorch's and ONNX Runtime GenAI's decoders keep it:
    each value ``f16(x)`` at its token's slot, read back widened to float32. No scale: float16's
    own exponent is the range, and what it costs is the rounding of each value to 11 bits."""
    kind = "kv-f16"

    def __init__(self, role: str):
        self.role = role

    def parts(self, max_len, head_dim):
        return [Part("values", _dtype("float16"), max_len, head_dim)]

    def token_rows(self, new):
        return [f16(new.to(torch.float32))]

    def write(self, state, new, positions):
        # the interpreter hands float state over in its compute type: it goes back as stored
        return [_scatter_tokens(state[0].to(torch.float16), *self.token_rows(new), positions)]

    def read(self, state, positions, head_dim):
        return state[0].to(torch.float32)


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
    options = ("group", "residual")

    # G = 64, R = 64 rather than the KIVI paper's 32 and 128: a key group's float16 scale and minimum
    # then add half a bit per key value instead of one, which brings a token to 0.27x of float16
    # (docs/kv_cache.md), and the window is smaller
    def __init__(self, role: str, group: int = 64, residual: int = 64):
        _check_count(self.kind, "group", group, 1, "tokens")
        _check_count(self.kind, "residual", residual, 0, "tokens")
        self.role, self.group, self.residual = role, group, residual

    @property
    def window(self) -> int:
        return max(1, self.residual + self.group - 1)

    def attrs(self):
        return {"group": self.group, "residual": self.residual}

    def check_head_dim(self, head_dim, where):
        if head_dim % 2:
            raise CacheEncodingError(f"{where}: {self.kind} packs two 4-bit codes a byte along the head dim, which is "
                                     f"{head_dim} (odd); choose kv8 or kv-fp8 for this cache")

    def parts(self, max_len, head_dim):
        f16t, codes = _dtype("float16"), Part("codes", _dtype("uint8"), max_len, head_dim // 2)
        window = Part("window", _dtype("float32"), self.window, head_dim, fixed=True)
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
            raise CacheEncodingError(f"kv4: batch row {row} has positions {p.tolist()[:8]}: a kv4 or kv-gear4 cache "
                                     "needs each step's positions consecutive, continuing the sequence (its window "
                                     "holds the most recent tokens); feed tokens in order, or use kv8 for this cache")
        return p0, s

    def write(self, state, new, positions):
        # the interpreter hands float state over in its compute type: each part goes back as stored
        d = new.shape[-1]
        state = [t.to(p.dtype.torch_dtype) for t, p in zip(state, self.parts(state[0].shape[2], d))]
        window = state[3]
        new = new.to(torch.float32)
        w = self.window
        for b in range(new.shape[0]):
            p0, s = self._span(positions, b)
            n = p0 + s
            q_old, q_new = self.quantized(p0), self.quantized(n)
            held = torch.arange(q_old, p0)                          # earlier tokens still in the window
            seq = torch.cat([window[b][:, held % w].to(torch.float32), new[b]], dim=1)   # positions q_old..n-1
            done = seq[:, : q_new - q_old]                          # tokens whose group completes now
            if done.shape[1]:
                self.encode_tokens(state, b, done, q_old, q_new)
            live = torch.arange(q_new, n)
            window[b].zero_()
            window[b][:, live % w] = seq[:, q_new - q_old:].to(window.dtype)
        return state

    def encode_tokens(self, state: list[torch.Tensor], b: int, done: torch.Tensor, q_old: int,
                      q_new: int) -> torch.Tensor:
        """Quantise batch row ``b``'s tokens ``q_old .. q_new - 1`` (float32 [h, n, d], whole
        groups) into ``state`` in place; their dequantised values (float32 [h, n, d])."""
        codes, scale, mn = state[:3]
        g = self.group
        if self.role == "k":
            h, _, d = done.shape
            c, sc, m = quantize_asym4(done.reshape(h, -1, g, d), dim=2)
            scale[b, :, q_old // g: q_new // g] = sc[:, :, 0]
            mn[b, :, q_old // g: q_new // g] = m[:, :, 0]
            deq = (c.to(torch.float32) * sc.to(torch.float32) + m.to(torch.float32)).reshape(h, -1, d)
            c = c.reshape(h, -1, d)
        else:
            c, sc, m = quantize_asym4(done, dim=-1)
            scale[b, :, q_old:q_new], mn[b, :, q_old:q_new] = sc, m
            deq = c.to(torch.float32) * sc.to(torch.float32) + m.to(torch.float32)
        codes[b, :, q_old:q_new] = _pack4(c)
        return deq

    def dequantized(self, state: list[torch.Tensor], head_dim: int) -> torch.Tensor:
        """The float32 values [b, h, max_len, d] the codes stand for at every slot (meaningful at
        the quantised ones)."""
        codes, scale, mn = state[:3]
        values = _unpack4(codes, head_dim).to(torch.float32)
        if self.role == "k":
            rows = torch.arange(codes.shape[2]) // self.group
            s, m = scale[:, :, rows].to(torch.float32), mn[:, :, rows].to(torch.float32)
        else:
            s, m = scale.to(torch.float32), mn.to(torch.float32)
        return values * s + m

    def read(self, state, positions, head_dim):
        window = state[3]
        b, h, max_len, _ = state[0].shape
        out = torch.zeros(b, h, max_len, head_dim, dtype=torch.float32)
        deq = self.dequantized(state, head_dim)
        for row in range(b):
            n = int(positions[row].max()) + 1 if positions.shape[1] else 0
            q = self.quantized(n)
            out[row, :, :q] = deq[row, :, :q]
            live = torch.arange(q, n)
            out[row, :, q:n] = window[row][:, live % self.window].to(torch.float32)
        return out


# --- kv-gear4: GEAR on KIVI ---------------------------------------------------------------------
class KVGear4(KV4):
    """GEAR on KIVI: kv4's codes, groups and window, and per completed group of G tokens (G x d,
    per head) each token's ``outliers`` largest-magnitude values kept aside in float16, and a
    rank-``rank`` approximation A @ B of the rest's quantisation error (A per token, B per group)."""
    kind = "kv-gear4"
    options = ("group", "residual", "rank", "outliers")
    ITERATIONS = 4

    def __init__(self, role: str, group: int = 64, residual: int = 64, rank: int = 2, outliers: int = 2):
        super().__init__(role, group, residual)
        _check_count(self.kind, "rank", rank, 1, "factors")
        _check_count(self.kind, "outliers", outliers, 1, "values per token")
        self.rank, self.outliers = rank, outliers

    def attrs(self):
        return {**super().attrs(), "rank": self.rank, "outliers": self.outliers}

    def check_head_dim(self, head_dim, where):
        super().check_head_dim(head_dim, where)
        if self.outliers >= head_dim:
            raise CacheEncodingError(f"{where}: kv-gear4 keeps {self.outliers} outliers of each token's {head_dim} "
                                     "values aside, which leaves none to quantise; choose fewer outliers")
        if head_dim > 1 << 15:
            raise CacheEncodingError(f"{where}: kv-gear4 stores outlier indices as int16, and the head dim is "
                                     f"{head_dim}")

    def parts(self, max_len, head_dim):
        f16t = _dtype("float16")
        index = _dtype("uint8" if head_dim <= 256 else "int16")
        return [*super().parts(max_len, head_dim),
                Part("outlier", f16t, max_len, self.outliers), Part("outlier_index", index, max_len, self.outliers),
                Part("a", f16t, max_len, self.rank), Part("b", f16t, -(-max_len // self.group) * self.rank, head_dim)]

    def encode_tokens(self, state, b, done, q_old, q_new):
        h, n, d = done.shape
        g, r = self.group, self.rank
        index = top_magnitudes(done, self.outliers)
        zero = torch.zeros(h, n, self.outliers)
        kept = done.scatter(-1, index, zero)
        deq = super().encode_tokens(state, b, kept, q_old, q_new)
        error = (kept - deq).scatter(-1, index, zero)            # the outliers are stored as they are
        a, bf = low_rank(error.reshape(h, n // g, g, d), r, self.ITERATIONS)
        outlier, outlier_index, fa, fb = state[4:]
        outlier[b, :, q_old:q_new] = f16(done.gather(-1, index))
        outlier_index[b, :, q_old:q_new] = index.to(outlier_index.dtype)
        fa[b, :, q_old:q_new] = f16(a.reshape(h, n, r))
        fb[b, :, q_old // g * r: q_new // g * r] = f16(bf.reshape(h, -1, d))
        return deq

    def low_rank_values(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        """A @ B [b, h, max_len, d] of each token: its row of A times its group's B (float32)."""
        b, h, max_len, r = fa.shape
        groups, d = fb.shape[2] // r, fb.shape[3]
        per_token = fb.to(torch.float32).reshape(b, h, groups, 1, r, d).expand(-1, -1, -1, self.group, -1, -1)
        per_token = per_token.reshape(b, h, groups * self.group, r, d)[:, :, :max_len]
        return low_rank_term(fa.to(torch.float32)[..., None, :], per_token)[..., 0, :]

    def dequantized(self, state, head_dim):
        outlier, outlier_index, fa, fb = state[4:]
        values = super().dequantized(state, head_dim) + self.low_rank_values(fa, fb)
        return values.scatter(-1, outlier_index.to(torch.int64), outlier.to(torch.float32))

    def compared_state(self, state):
        # The factors are not fixed by the keys to the last bits: a code that flips on a rounding
        # boundary moves its group's error by a whole step, and close singular values let a
        # last-bit change turn the factors within their plane. What the group stands for (codes,
        # outliers and A @ B together) moves by about the flip itself, so A and B are held through
        # the dequantised values, beside the codes' share of equal elements.
        state = [torch.as_tensor(t) for t in state]
        return [*state[:-2], self.dequantized(state, state[0].shape[-1] * 2)]


# --- kv-nvfp4 --------------------------------------------------------------------------------------
class KVNVFP4(CacheEncoding):
    """NVFP4 per token: E2M1 codes two a byte, an E4M3 scale per block of 16 head_dim values, and a
    float16 second-level scale per token and head (NVFP4's calibrated per-tensor scale has no
    calibration to come from in a cache)."""
    kind = "kv-nvfp4"
    BLOCK = 16
    CODE = _dtype("e2m1")
    SCALE = _dtype("e4m3")
    TOP = 6.0          # the largest E2M1 value
    SCALE_TOP = 448.0  # the largest E4M3 value

    def __init__(self, role: str):
        self.role = role

    def check_head_dim(self, head_dim, where):
        if head_dim % self.BLOCK:
            raise CacheEncodingError(f"{where}: kv-nvfp4 scales blocks of {self.BLOCK} head_dim values, and the "
                                     f"head dim is {head_dim}; choose kv8 or kv-fp8 for this cache")

    def parts(self, max_len, head_dim):
        return [Part("codes", _dtype("uint8"), max_len, head_dim // 2),
                Part("block_scale", _dtype("uint8"), max_len, head_dim // self.BLOCK),
                Part("scale", _dtype("float16"), max_len, 1)]

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E2M1 codes int64 [..., d], E4M3 block scale codes uint8 [..., d/16], float16 scale
        [..., 1]) of float32 ``x`` [..., d]."""
        x = x.to(torch.float32)
        scale = f16(x.abs().amax(-1, keepdim=True) / (self.SCALE_TOP * self.TOP))
        s2 = scale.to(torch.float32)
        blocks = x.reshape(*x.shape[:-1], -1, self.BLOCK)
        wanted = blocks.abs().amax(-1) / self.TOP / torch.where(s2 > 0, s2, torch.ones_like(s2))
        block_scale = minifloat.encode(torch.where(s2 > 0, wanted, torch.zeros_like(wanted)), self.SCALE)
        step = (self.block_values(block_scale) * s2)[..., None]
        ratio = torch.where(step > 0, blocks / torch.where(step > 0, step, torch.ones_like(step)),
                            torch.zeros_like(blocks))
        codes = minifloat.encode(ratio, self.CODE).to(torch.int64).reshape(x.shape)
        return codes, block_scale, scale

    def block_values(self, block_scale: torch.Tensor) -> torch.Tensor:
        return minifloat.decode(block_scale, self.SCALE, torch.float32)

    def token_rows(self, new):
        codes, block_scale, scale = self.quantize(new)
        return [_pack4(codes), block_scale, scale]

    def write(self, state, new, positions):
        codes, block_scale, scale = self.token_rows(new)
        return [_scatter_tokens(state[0], codes, positions),
                _scatter_tokens(state[1], block_scale, positions),
                _scatter_tokens(state[2].to(torch.float16), scale, positions)]

    def read(self, state, positions, head_dim):
        codes, block_scale, scale = state
        values = minifloat.decode(_unpack4(codes, head_dim), self.CODE, torch.float32)
        step = self.block_values(block_scale) * scale.to(torch.float32)
        blocks = values.reshape(*values.shape[:-1], -1, self.BLOCK) * step[..., None]
        return blocks.reshape(values.shape)


CACHE_ENCODINGS: dict[str, type[CacheEncoding]] = {c.kind: c for c in (KV8, KVFP8, KV4, KVNVFP4, KVGear4, KVF16)}


def _check_count(kind: str, name: str, value, least: int, unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise CacheEncodingError(f"{kind} {name} must be a {'positive' if least else 'non-negative'} number of "
                                 f"{unit}, got {value!r}")


def cache_encoding(kind: str, role: str, **attrs) -> CacheEncoding:
    """The encoding ``kind`` for a K (``role`` "k") or V cache, with its options (kv8: group, in
    channels; kv4: group, in tokens, residual; kv-gear4: those and rank, outliers); options given as
    None take the defaults."""
    if kind not in CACHE_ENCODINGS:
        raise CacheEncodingError(f"unknown KV-cache encoding {kind!r}; known: {', '.join(CACHE_ENCODINGS)}")
    if role not in ROLES:
        raise CacheEncodingError(f"a cache's role is 'k' or 'v', got {role!r}")
    cls = CACHE_ENCODINGS[kind]
    options = {k: v for k, v in attrs.items() if v is not None}
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        takes = f"it takes {', '.join(cls.options)}" if cls.options else "it takes none"
        raise CacheEncodingError(f"{kind} takes no option(s) {', '.join(unknown)} ({takes})")
    return cls(role, **options)


def float_bytes_per_token(kv_heads: int, head_dim: int, itemsize: int = 4) -> int:
    """Bytes a float cache of ``itemsize``-byte elements holds per token and layer side (K or V)."""
    return kv_heads * head_dim * itemsize


__all__ = ["CacheEncoding", "CacheEncodingError", "Part", "KV8", "KVFP8", "KVF16", "KV4", "KVNVFP4", "KVGear4",
           "CACHE_ENCODINGS", "cache_encoding", "quantize_asym4", "float_bytes_per_token", "f16"]

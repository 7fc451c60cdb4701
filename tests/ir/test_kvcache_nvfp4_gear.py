"""kv-nvfp4 and kv-gear4 against independent numpy implementations of the rules in
docs/kv_cache.md (ml_dtypes for E2M1 and E4M3): NVFP4 codes and both scales bit for bit; GEAR's
outliers, codes and low-rank factors over a prefill and decode steps across groups, bit for bit;
the state's size and GEAR's error against kv4 on keys with outlier channels."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from nnforge.ir.kvcache import CacheEncodingError, cache_encoding, float_bytes_per_token
from nnforge.ir.ordered import tree_sum
from tests.ir.test_kvcache import np_f16, oracle_asym4

B, H, L, D = 2, 2, 48, 32


def realistic_keys(n=L, seed=0, outlier_channels=(3, 17)):
    """Keys as real K caches have them: most channels small, a few large in every token."""
    x = torch.randn(B, H, n, D, generator=torch.Generator().manual_seed(seed))
    x[..., list(outlier_channels)] *= 25.0
    return x


def keys(n=L, seed=0):
    """Realistic keys with the cases rounding must get right."""
    x = realistic_keys(L, seed)
    x[0, 0, 3] = 0.0                                       # a token of zeros
    x[1, 1, 5] = 1e7                                       # float16 scales saturate
    x[1, 0, 6, :16] = 1e-6                                 # a block whose E4M3 scale rounds to 0
    return x[:, :, :n].contiguous()


# --- kv-nvfp4 ------------------------------------------------------------------------------------
def oracle_nvfp4(x):
    """(E2M1 codes, E4M3 block scale codes, float16 scale) of float32 x [..., d]."""
    s2 = np_f16(np.abs(x).max(-1, keepdims=True) / np.float32(448 * 6)).astype(np.float32)
    blocks = x.reshape(*x.shape[:-1], -1, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        wanted = np.where(s2 > 0, np.abs(blocks).max(-1) / np.float32(6) / s2, 0).astype(np.float32)
    bs = np.clip(wanted, 0, 448).astype(ml_dtypes.float8_e4m3fn)
    step = (bs.astype(np.float32) * s2)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(step > 0, blocks / step, 0).astype(np.float32)
    codes = ratio.astype(ml_dtypes.float4_e2m1fn).view(np.uint8).reshape(x.shape)
    return codes, bs.view(np.uint8), s2.astype(np.float16)


def test_nvfp4_codes_and_scales_match_numpy_bit_for_bit():
    x = keys()
    enc = cache_encoding("kv-nvfp4", "v")
    pos = torch.arange(L).repeat(B, 1)
    packed, block_scale, scale = enc.write(enc.zeros(B, H, L, D), x, pos)
    codes, want_bs, want_scale = oracle_nvfp4(x.numpy())
    assert packed.dtype == block_scale.dtype == torch.uint8 and scale.dtype == torch.float16
    np.testing.assert_array_equal(packed.numpy(), codes[..., 0::2] | codes[..., 1::2] << 4)     # low nibble first
    np.testing.assert_array_equal(block_scale.numpy(), want_bs)
    np.testing.assert_array_equal(scale.numpy().view(np.uint16), want_scale.view(np.uint16))
    values = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32).reshape(B, H, L, -1, 16)
    step = want_bs.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * want_scale.astype(np.float32)
    np.testing.assert_array_equal(enc.read([packed, block_scale, scale], pos, D).numpy(),
                                  (values * step[..., None]).reshape(B, H, L, D))
    assert (block_scale[1, 0, 6, 0] == 0) and not enc.read([packed, block_scale, scale], pos, D)[1, 0, 6, :16].any()


def test_nvfp4_writes_only_their_slots():
    x = keys(3)
    enc = cache_encoding("kv-nvfp4", "k")
    pos = torch.tensor([[7, 2, 40], [0, 1, 2]])
    state = enc.write(enc.zeros(B, H, L, D), x, pos)
    written = torch.zeros(B, L, dtype=torch.bool)
    written[0, [7, 2, 40]] = written[1, [0, 1, 2]] = True
    for part in state:
        assert not part[~written[:, None].expand(B, H, L)].any()


def test_nvfp4_refuses_a_head_dim_that_is_not_whole_blocks():
    with pytest.raises(CacheEncodingError, match="cache.0.k: kv-nvfp4 scales blocks of 16 .* head dim is 24"):
        cache_encoding("kv-nvfp4", "k").check_head_dim(24, "cache.0.k")


# --- kv-gear4 ------------------------------------------------------------------------------------
def np_tree_sum(x):
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    x = np.concatenate([x, np.zeros((*x.shape[:-1], width - n), np.float32)], axis=-1)
    while x.shape[-1] > 1:
        x = x[..., : x.shape[-1] // 2] + x[..., x.shape[-1] // 2:]
    return x[..., 0]


def np_gram_schmidt(x):
    cols = []
    for j in range(x.shape[1]):
        v = x[:, j]
        for q in cols:
            v = v - np_tree_sum(q * v) * q
        norm = np.sqrt(np_tree_sum(v * v))
        cols.append(v / norm if norm > 0 else np.zeros_like(v))
    return np.stack(cols, axis=1).astype(np.float32)


def np_gear_group(x, role, rank, outliers, iterations=4):
    """The float values [G, d] a kv-gear4 group of tokens x [G, d] is read back as."""
    index = np.argsort(-np.abs(x), axis=-1, kind="stable")[:, :outliers]
    kept = x.copy()
    np.put_along_axis(kept, index, 0.0, axis=-1)
    deq = oracle_asym4(kept, axis=0 if role == "k" else -1)
    e = kept - deq
    np.put_along_axis(e, index, 0.0, axis=-1)
    d = x.shape[1]
    v = np.array([[(-1.0) ** bin(i & j).count("1") for j in range(rank)] for i in range(d)], np.float32)
    for _ in range(iterations):
        u = np_gram_schmidt(np_tree_sum(e[:, None, :] * v.T[None]))            # [G, r]
        v = np_gram_schmidt(np_tree_sum(e.T[:, None, :] * u.T[None]))          # [d, r]
    a = np_f16(np_tree_sum(e[:, None, :] * v.T[None])).astype(np.float32)
    b = np_f16(v.T).astype(np.float32)
    term = a[:, 0:1] * b[0:1]
    for j in range(1, rank):
        term = term + a[:, j:j + 1] * b[j:j + 1]
    out = deq + term
    np.put_along_axis(out, index, np_f16(np.take_along_axis(x, index, -1)).astype(np.float32), axis=-1)
    return out


def oracle_gear_cache(seq, n, role, group, residual, rank, outliers):
    q = group * (max(n - residual, 0) // group)
    out = np.zeros((seq.shape[0], L, seq.shape[2]), np.float32)
    for h in range(seq.shape[0]):
        for g0 in range(0, q, group):
            out[h, g0:g0 + group] = np_gear_group(seq[h, g0:g0 + group], role, rank, outliers)
    out[:, q:n] = seq[:, q:n]
    return out


@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("group,residual,rank,outliers", [(4, 3, 2, 2), (8, 0, 3, 1)])
def test_gear_prefill_then_decode_matches_the_history_oracle(role, group, residual, rank, outliers):
    x = keys()
    enc = cache_encoding("kv-gear4", role, group=group, residual=residual, rank=rank, outliers=outliers)
    state = enc.zeros(B, H, L, D)
    for a, b in [(0, 21)] + [(p, p + 1) for p in range(21, 35)]:
        pos = torch.arange(a, b).repeat(B, 1)
        state = enc.write(state, x[:, :, a:b], pos)
        got = enc.read(state, pos, D).numpy()
        for row in range(B):
            np.testing.assert_array_equal(got[row], oracle_gear_cache(x[row].numpy(), b, role, group, residual, rank,
                                                                      outliers), err_msg=f"after {b} tokens")


@pytest.mark.parametrize("role", ["k", "v"])
def test_gear_state_does_not_depend_on_how_tokens_were_cut(role):
    x = keys()
    enc = cache_encoding("kv-gear4", role, group=4, residual=6)
    whole = enc.write(enc.zeros(B, H, L, D), x[:, :, :37], torch.arange(37).repeat(B, 1))
    cut = enc.zeros(B, H, L, D)
    for a, b in [(0, 5), (5, 6), (6, 19), (19, 20), (20, 21), (21, 37)]:
        cut = enc.write(cut, x[:, :, a:b], torch.arange(a, b).repeat(B, 1))
    for w, c in zip(whole, cut):
        assert w.dtype == c.dtype and torch.equal(w, c)


def test_tree_sum_adds_halves_in_float32_not_left_to_right():
    x = torch.tensor([1e8, 1.0, -1e8, 1.0])               # left to right: 1e8 + 1 is 1e8 in float32, the sum 1
    assert tree_sum(x).item() == 2.0                       # (1e8 + -1e8) + (1 + 1)
    padded = torch.tensor([1e8, 1.0, -1e8, 1.0, 3.0])      # halves of 8: 1e8 + 3 rounds to 1e8
    assert tree_sum(padded).item() == 2.0


def test_gear_state_is_under_a_third_of_a_float16_cache_at_head_dim_256():
    """Defaults (groups of 64 tokens, rank 2, 2 outliers): codes, group scales and minimums,
    outliers, A and B, and the float32 window spread over a long cache."""
    max_len, d = 32768, 256
    float16 = float_bytes_per_token(1, d, itemsize=2)
    for role in "kv":
        enc = cache_encoding("kv-gear4", role)
        assert enc.group == 64
        per_token = enc.state_bytes(1, max_len, d) / max_len
        assert per_token < 0.35 * float16, f"{role}: {per_token} bytes a token"


@pytest.mark.parametrize("role", ["k", "v"])
def test_gear_reconstructs_keys_with_outlier_channels_better_than_kv4(role):
    x = realistic_keys(32, seed=3)
    errors = {}
    for kind in ("kv4", "kv-gear4"):
        enc = cache_encoding(kind, role, group=8, residual=0)
        pos = torch.arange(32).repeat(B, 1)
        got = enc.read(enc.write(enc.zeros(B, H, L, D), x, pos), pos, D)[:, :, :32]
        errors[kind] = float(((got - x) ** 2).sum() / (x ** 2).sum())
    assert errors["kv-gear4"] < 0.5 * errors["kv4"], errors


def test_gear_options_and_head_dims_are_checked():
    with pytest.raises(CacheEncodingError, match="kv-gear4 rank must be a positive number of factors, got 0"):
        cache_encoding("kv-gear4", "k", rank=0)
    with pytest.raises(CacheEncodingError, match="kv-gear4 outliers must be a positive number"):
        cache_encoding("kv-gear4", "k", outliers=-1)
    with pytest.raises(CacheEncodingError, match="kv4 takes no option\\(s\\) rank \\(it takes group, residual\\)"):
        cache_encoding("kv4", "k", rank=2)
    with pytest.raises(CacheEncodingError, match="cache.1.v: kv-gear4 keeps 8 outliers of each token's 8 values"):
        cache_encoding("kv-gear4", "v", outliers=8).check_head_dim(8, "cache.1.v")
    with pytest.raises(CacheEncodingError, match="cache.1.v: kv-gear4 packs .* 7 \\(odd\\)"):
        cache_encoding("kv-gear4", "v").check_head_dim(7, "cache.1.v")
    with pytest.raises(CacheEncodingError, match="cache.1.v: kv-gear4 stores outlier indices as int16, and the head "
                                                 "dim is 32770"):
        cache_encoding("kv-gear4", "v").check_head_dim(32770, "cache.1.v")
    assert [p.dtype.name for p in cache_encoding("kv-gear4", "k").parts(64, 512)][-3] == "int16"


def test_a_backends_last_bit_differences_pass_the_check_through_the_dequantised_values():
    """Keys a backend computed in its own order: a code flips on a rounding boundary, and the
    group's factors move with it beyond the float tolerance, while the values the state stands for
    (what the runtime check compares in their place) do not."""
    from nnforge.numerics import ENCODED_STATE_TOLERANCE, compare, within
    torch.manual_seed(0)
    x = torch.randn(1, 2, 1024, 64)
    x[..., [3, 17]] *= 25.0
    backend = x * (1 + 2e-7 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    enc = cache_encoding("kv-gear4", "k")
    pos = torch.arange(1024)[None]
    want, got = (enc.write(enc.zeros(1, 2, 1024, 64), keys, pos) for keys in (x, backend))
    raw = compare(got, want)
    assert raw["exact_match"] < 1 and not within(raw, ENCODED_STATE_TOLERANCE)
    compared = enc.compared_state(got)
    assert len(compared) == len(got) - 1 and torch.equal(compared[-1], enc.dequantized(got, 64))
    assert within(compare(compared, enc.compared_state(want)), ENCODED_STATE_TOLERANCE)

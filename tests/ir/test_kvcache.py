"""KV-cache encodings against independent numpy implementations of the rules in docs/kv_cache.md
(ml_dtypes for E4M3): codes and scales bit for bit, the kv4 window over prompts longer than the
residual and the group, then decode steps, and a state that does not depend on how tokens were
cut into steps."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from nnforge.ir.kvcache import CacheEncodingError, cache_encoding

B, H, L, D = 2, 2, 48, 8


def np_f16(x):
    return np.clip(x, -65504, 65504).astype(np.float16)


def oracle_kv8(x, group):
    """(codes, scales [..., d / group]) of float32 x [..., d]: per group of ``group`` channels
    s = f16(max|x| / 127), code = clamp(rint(x / s))."""
    g = x.reshape(*x.shape[:-1], -1, group)
    s = np_f16(np.abs(g).max(-1, keepdims=True) / np.float32(127))
    s32 = s.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.rint(g / s32), 0)
    return np.clip(q, -127, 127).astype(np.int8).reshape(x.shape), s[..., 0]


def oracle_fp8(x):
    s = np_f16(np.abs(x).max(-1, keepdims=True) / np.float32(448))
    s32 = s.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(s32 > 0, (x / s32).astype(np.float32), 0).astype(np.float32)
    codes = np.clip(r, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return codes, s


def kv8_decoded(codes, scale):
    """float32 values of kv8 ``codes`` [..., d] and their per-group ``scale`` [..., d / group]."""
    groups = codes.astype(np.float32).reshape(*scale.shape, -1) * scale.astype(np.float32)[..., None]
    return groups.reshape(codes.shape)


def oracle_asym4(x, axis):
    """Fake-quantised float32 x over ``axis``: m = f16(min), s = f16((max - min) / 15)."""
    lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
    m, s = np_f16(lo).astype(np.float32), np_f16((hi - lo) / np.float32(15)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint((x - m) / s), 0)
    q = np.clip(q, 0, 15).astype(np.float32)
    return (q * s).astype(np.float32) + m


def oracle_kv4_cache(seq, n, role, group, residual):
    """The float cache [h, L, d] a kv4 cache of one sequence stands for after its first n tokens
    ``seq`` [h, >= n, d], computed from the whole history (no window, no state)."""
    q = group * (max(n - residual, 0) // group)
    out = np.zeros((seq.shape[0], L, seq.shape[2]), np.float32)
    if q:
        done = seq[:, :q]
        if role == "k":
            h, _, d = done.shape
            out[:, :q] = oracle_asym4(done.reshape(h, q // group, group, d), axis=2).reshape(h, q, d)
        else:
            out[:, :q] = oracle_asym4(done, axis=-1)
    out[:, q:n] = seq[:, q:n]
    return out


def tokens(n=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, L, D, generator=g) * torch.linspace(0.01, 30, D)   # outlier channels
    x[0, 0, 3] = 0.0                                                          # a token of zeros
    x[1, 1, 5] = 1e7                                                          # its kv8 scale saturates float16
    return x[:, :, :n].contiguous()


@pytest.mark.parametrize("kind,options,group", [("kv8", {}, D), ("kv8", {"group": 2}, 2), ("kv8", {"group": 4}, 4),
                                                ("kv-fp8", {}, D)])
def test_per_token_codes_and_scales_match_numpy_bit_for_bit(kind, options, group):
    # the default kv8 group (64 channels) is more than D: one group of the whole head
    x = tokens()
    enc = cache_encoding(kind, "k", **options)
    pos = torch.arange(L).repeat(B, 1)
    codes, scale = enc.write(enc.zeros(B, H, L, D), x, pos)
    assert codes.dtype == (torch.int8 if kind == "kv8" else torch.uint8) and scale.dtype == torch.float16
    assert scale.shape == (B, H, L, D // group)
    got = enc.read([codes, scale], pos, D)
    if kind == "kv8":
        want_codes, want_scale = oracle_kv8(x.numpy(), group)
        decoded = kv8_decoded(want_codes, want_scale)
    else:
        want_codes, want_scale = oracle_fp8(x.numpy())
        decoded = want_codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * want_scale.astype(np.float32)
    np.testing.assert_array_equal(codes.numpy(), want_codes)
    np.testing.assert_array_equal(scale.numpy().reshape(want_scale.shape).view(np.uint16), want_scale.view(np.uint16))
    np.testing.assert_array_equal(got.numpy(), decoded)


def test_kv8_groups_keep_an_outlier_channel_from_flattening_the_others():
    # channel 0 is 1000 times the rest: with one scale per head the other channels round to a code
    # of at most 1; with groups of 4 channels the second group has a scale of its own
    x = torch.full((1, 1, 1, D), 0.5)
    x[..., 0] = 500.0
    x[..., 5] = -0.25
    head = cache_encoding("kv8", "k", group=D)
    grouped = cache_encoding("kv8", "k", group=4)
    (hc, hs), (gc, gs) = head.quantize(x), grouped.quantize(x)
    assert hs.shape[-1] == 1 and gs.shape[-1] == 2
    assert gs[..., 0] == hs[..., 0] and gs[..., 1] < gs[..., 0]
    assert hc.flatten()[4:].abs().max() <= 1
    assert gc.flatten()[4:].tolist() == [127, -64, 127, 127]
    pos = torch.zeros(1, 1, dtype=torch.int64)
    err = [(enc.read(enc.write(enc.zeros(1, 1, 1, D), x, pos), pos, D) - x)[..., 4:].abs().max()
           for enc in (head, grouped)]
    assert err[1] < err[0] / 100


def test_kv8_head_dim_below_the_group_takes_one_group():
    enc = cache_encoding("kv8", "v", group=64)
    assert [(p.name, p.rows, p.cols) for p in enc.parts(16, 8)] == [("codes", 16, 8), ("scale", 16, 1)]
    enc.check_head_dim(8, "cache.0.v")
    codes, scale = enc.quantize(tokens())
    want_codes, want_scale = oracle_kv8(tokens().numpy(), D)
    np.testing.assert_array_equal(codes.numpy(), want_codes)
    np.testing.assert_array_equal(scale.numpy().view(np.uint16), want_scale.view(np.uint16))


def test_kv8_refuses_a_head_dim_not_a_multiple_of_the_group():
    enc = cache_encoding("kv8", "k", group=64)
    enc.check_head_dim(128, "cache.0.k")
    with pytest.raises(CacheEncodingError, match=r"cache\.3\.k \(node n\): kv8 scales groups of 64 channels, and "
                                                 r"the head dim 80 is not a multiple of 64; give the kv_cache pass "
                                                 r"group_size=40"):
        enc.check_head_dim(80, "cache.3.k (node n)")


def test_kv8_rounds_half_to_even():
    # max|x| = 127 gives scale 1: 2.5 -> 2, 3.5 -> 4, -0.5 -> 0
    x = torch.tensor([127.0, 2.5, 3.5, -0.5, 0, 0, 0, 0]).reshape(1, 1, 1, D)
    codes, _ = cache_encoding("kv8", "v").quantize(x)
    assert codes.flatten()[:4].tolist() == [127, 2, 4, 0]


def test_per_token_writes_only_their_slots():
    x = tokens(3)
    enc = cache_encoding("kv8", "v")
    pos = torch.tensor([[7, 2, 40], [0, 1, 2]])
    codes, scale = enc.write(enc.zeros(B, H, L, D), x, pos)
    written = torch.zeros(B, L, dtype=torch.bool)
    written[0, [7, 2, 40]] = written[1, [0, 1, 2]] = True
    assert not codes[~written[:, None].expand(B, H, L)].any() and not scale[~written[:, None].expand(B, H, L)].any()


def test_kv_f16_holds_each_value_rounded_to_float16_and_reads_it_widened():
    x = tokens()
    enc = cache_encoding("kv-f16", "v")
    pos = torch.arange(L).repeat(B, 1)
    (values,) = enc.write(enc.zeros(B, H, L, D), x, pos)
    assert values.dtype == torch.float16
    want = np_f16(x.numpy())
    np.testing.assert_array_equal(values.numpy().view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(enc.read([values], pos, D).numpy(), want.astype(np.float32))
    # handed back in the interpreter's compute type, the next write keeps the stored values
    (again,) = enc.write([values.to(torch.float32)], x[:, :, :1], pos[:, :1])
    assert again.dtype == torch.float16 and torch.equal(again, values)


def test_kv_f16_rounds_to_nearest_even_and_saturates():
    tiny = 2.0 ** -24                       # float16's smallest subnormal
    x = torch.tensor([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, tiny / 2, 3 * tiny / 2, 1e7, -1e9, float("inf"), -0.0])
    enc = cache_encoding("kv-f16", "k")
    (values,) = enc.write(enc.zeros(1, 1, 1, D), x.reshape(1, 1, 1, D), torch.zeros(1, 1, dtype=torch.long))
    got = values.flatten()
    assert got.tolist() == [1.0, 1 + 2.0 ** -9, 0.0, 2 * tiny, 65504.0, -65504.0, 65504.0, 0.0]
    assert torch.signbit(got[-1])


def test_kv_f16_writes_only_their_slots_and_holds_two_bytes_a_value():
    enc = cache_encoding("kv-f16", "k")
    pos = torch.tensor([[7, 2, 40], [0, 1, 2]])
    (values,) = enc.write(enc.zeros(B, H, L, D), tokens(3) + 1, pos)
    written = torch.zeros(B, L, dtype=torch.bool)
    written[0, [7, 2, 40]] = written[1, [0, 1, 2]] = True
    assert not values[~written[:, None].expand(B, H, L)].any() and values[written[:, None].expand(B, H, L)].all()
    assert [(p.name, p.dtype.name, p.rows, p.cols) for p in enc.parts(512, 64)] == [("values", "float16", 512, 64)]
    assert enc.state_bytes(2, 512, 64) == 2 * 512 * 64 * 2
    with pytest.raises(CacheEncodingError, match="kv-f16 takes no option"):
        cache_encoding("kv-f16", "k", group=4)


@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("group,residual", [(4, 8), (8, 4), (4, 0), (1, 3)])
def test_kv4_prefill_then_decode_matches_the_history_oracle(role, group, residual):
    """A prompt longer than R + G, then single tokens across several group boundaries."""
    x = tokens()
    enc = cache_encoding("kv4", role, group=group, residual=residual)
    state = enc.zeros(B, H, L, D)
    prompt = 21
    steps = [(0, prompt)] + [(p, p + 1) for p in range(prompt, prompt + 14)]
    for a, b in steps:
        pos = torch.arange(a, b).repeat(B, 1)
        state = enc.write(state, x[:, :, a:b], pos)
        got = enc.read(state, pos, D).numpy()
        for row in range(B):
            np.testing.assert_array_equal(got[row], oracle_kv4_cache(x[row].numpy(), b, role, group, residual))


@pytest.mark.parametrize("role", ["k", "v"])
def test_kv4_state_does_not_depend_on_how_tokens_were_cut(role):
    x = tokens()
    enc = cache_encoding("kv4", role, group=4, residual=6)
    whole = enc.write(enc.zeros(B, H, L, D), x[:, :, :37], torch.arange(37).repeat(B, 1))
    cut = enc.zeros(B, H, L, D)
    for a, b in [(0, 5), (5, 6), (6, 19), (19, 20), (20, 21), (21, 37)]:
        cut = enc.write(cut, x[:, :, a:b], torch.arange(a, b).repeat(B, 1))
    for w, c in zip(whole, cut):
        assert w.dtype == c.dtype and torch.equal(w, c)


def test_kv4_state_layout_and_bytes():
    k, v = (cache_encoding("kv4", r, group=32, residual=128) for r in "kv")
    assert [(p.name, p.dtype.name, p.rows, p.cols) for p in k.parts(512, 64)] == [
        ("codes", "uint8", 512, 32), ("scale", "float16", 16, 64), ("min", "float16", 16, 64),
        ("window", "float32", 159, 64)]
    assert [(p.name, p.rows, p.cols) for p in v.parts(512, 64)][1:3] == [("scale", 512, 1), ("min", 512, 1)]
    assert k.state_bytes(2, 512, 64) == 2 * (512 * 32 + 2 * 16 * 64 * 2 + 159 * 64 * 4)
    assert cache_encoding("kv8", "k").state_bytes(2, 512, 64) == 2 * 512 * (64 + 2)
    assert cache_encoding("kv8", "k", group=16).state_bytes(2, 512, 64) == 2 * 512 * (64 + 4 * 2)
    assert cache_encoding("kv8", "k").state_bytes(1, 512, 256) == 512 * (256 + 256 // 64 * 2)


def test_kv4_refuses_positions_that_do_not_continue_the_sequence():
    enc = cache_encoding("kv4", "k", group=4, residual=4)
    with pytest.raises(CacheEncodingError, match="batch row 1 has positions .*consecutive"):
        enc.write(enc.zeros(B, H, L, D), tokens(3), torch.tensor([[0, 1, 2], [0, 2, 1]]))


def test_encoding_options_are_checked():
    with pytest.raises(CacheEncodingError, match="unknown KV-cache encoding 'kv3'"):
        cache_encoding("kv3", "k")
    with pytest.raises(CacheEncodingError, match="kv-fp8 takes no option"):
        cache_encoding("kv-fp8", "k", group=4)
    with pytest.raises(CacheEncodingError, match="kv8 group must be a positive number of channels"):
        cache_encoding("kv8", "k", group=0)
    with pytest.raises(CacheEncodingError, match="group must be a positive"):
        cache_encoding("kv4", "k", group=0)
    with pytest.raises(CacheEncodingError, match="odd"):
        cache_encoding("kv4", "v").check_head_dim(7, "cache.0.v")

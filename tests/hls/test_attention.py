"""nf_attention.h: batch-1 decode steps (nf::kv_write then nf::attention) with the KV cache in
off-chip memory, step by step, against their emulation (bit for bit, cache included) and against
fp32 causal attention; and nf_norm.h
in RMS mode (no IR op maps to it yet), built into the same harness."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnforge.backends.hls import csim
from nnforge.backends.hls import emulate as E
from nnforge.backends.hls.layers import lut_table, struct
from nnforge.backends.hls.project import HEADER_DIR

H, D, L, T = 2, 16, 32, 12          # heads, head dim, cache length, decode steps
ACT = E.Fixed(24, 8)
SCALE_SHIFT = 16
SCALE_M = int(math.floor(2 ** SCALE_SHIFT / math.sqrt(D) + 0.5))
STEP_LOG2, E_FRAC = -6, 20
RMS_EPS = 1e-6
RMS_EPS_RAW = max(1, int(math.floor(RMS_EPS * 2.0 ** (2 * ACT.frac) + 0.5)))
GAMMA = np.linspace(0.5, 1.5, D)
GAMMA_RAW = E.from_float(GAMMA, ACT)


def _table():
    return lut_table(torch.exp, -16.0, 0.0, STEP_LOG2, E_FRAC)


def _harness() -> str:
    t = _table()
    cfg = struct("cfg_att", "decode attention", [
        ("unsigned", "n_batch", 1), ("unsigned", "n_heads", H), ("unsigned", "kv_heads", H), ("unsigned", "n_rows", 1),
        ("unsigned", "head_dim", D), ("unsigned", "max_len", L), ("unsigned", "window", 0),
        ("unsigned long", "k_off", 0), ("unsigned long", "v_off", H * L * D),
        ("long", "scale_m", SCALE_M), ("unsigned", "scale_shift", SCALE_SHIFT),
        ("long", "lut_lo", -16 * 2 ** ACT.frac), ("unsigned", "step_shift", ACT.frac + STEP_LOG2),
        ("unsigned", "lut_n", len(t) - 1), ("unsigned", "e_frac", E_FRAC)])
    n = H * D
    cache = {kind: struct(f"cfg_{kind}", f"{kind} cache write", [
        ("unsigned", "n_batch", 1), ("unsigned", "kv_heads", H), ("unsigned", "n_rows", 1), ("unsigned", "head_dim", D),
        ("unsigned", "max_len", L), ("unsigned long", "off", off)]) for kind, off in (("k", 0), ("v", H * L * D))}
    norm = struct("cfg_rms", "rms norm", [("unsigned", "n_rows", T * H), ("unsigned", "n", D), ("bool", "rms", True),
                                          ("long", "eps_raw", RMS_EPS_RAW), ("bool", "has_gamma", True),
                                          ("bool", "has_beta", False), ("unsigned long", "gamma_off", 0),
                                          ("unsigned long", "beta_off", 0)])
    return f"""#include "nf/nf_attention.h"
#include "nf/nf_norm.h"
typedef {ACT.cpp()} act_t;
{cfg}
{cache["k"]}
{cache["v"]}
{norm}
static const int tbl[{len(t)}] = {{{",".join(map(str, t))}}};
static int kv_mem[{2 * H * L * D}];   // stands in for HBM
extern "C" __attribute__((visibility("default"))) int nf_run(const float *const *ins, float *const *outs, const unsigned char *wmem) {{
    act_t q[{n}], k[{n}], v[{n}], o[{n}];
    nf::int_t pos[1];
    for (unsigned t = 0; t < {T}; t++) {{
        for (unsigned e = 0; e < {n}; e++) {{
            q[e] = nf::from_float<act_t>(ins[0][t * {n} + e]);
            k[e] = nf::from_float<act_t>(ins[1][t * {n} + e]);
            v[e] = nf::from_float<act_t>(ins[2][t * {n} + e]);
        }}
        pos[0] = t;
        nf::kv_write<act_t, cfg_k>(k, pos, kv_mem);
        nf::kv_write<act_t, cfg_v>(v, pos, kv_mem);
        nf::attention<act_t, act_t, cfg_att>(q, kv_mem, pos, o, tbl);
        for (unsigned e = 0; e < {n}; e++) outs[0][t * {n} + e] = nf::to_float(o[e]);
    }}
    for (unsigned e = 0; e < {2 * H * L * D}; e++) outs[1][e] = (float)kv_mem[e];
    static act_t x[{T * n}], y[{T * n}];
    for (unsigned e = 0; e < {T * n}; e++) x[e] = nf::from_float<act_t>(ins[0][e]);
    nf::layer_norm<act_t, act_t, cfg_rms>(x, y, wmem);
    for (unsigned e = 0; e < {T * n}; e++) outs[2][e] = nf::to_float(y[e]);
    return 0;
}}
"""


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NNFORGE_HLS_CACHE", str(tmp_path_factory.mktemp("hls-cache")))
    files = {f"hls/src/nf/{h}": (HEADER_DIR / h).read_bytes() for h in ("nf_types.h", "nf_index.h", "nf_attention.h",
                                                                           "nf_norm.h")}
    files["hls/src/att.cpp"] = _harness().encode()
    files["hls/src/host.cpp"] = b""
    gamma = GAMMA_RAW.astype("<i4").tobytes() + b"\0" * 4
    yield csim.CSim(csim.build(files, "att"), gamma, [T * H * D] * 3, [T * H * D, 2 * H * L * D, T * H * D])
    mp.undo()


def _emulate(q, k, v):
    cache = np.zeros((2, 1, H, L, D), np.int64)
    outs = []
    for t in range(T):
        raw = [E.from_float(a[t].reshape(1, H, 1, D), ACT) for a in (q, k, v)]
        pos = np.array([[t]])
        E.kv_write(raw[1], pos, cache[0])
        E.kv_write(raw[2], pos, cache[1])
        outs.append(E.attention(raw[0], pos, cache[0], cache[1], 0, _table(), -16 * 2 ** ACT.frac, ACT.frac + STEP_LOG2,
                                SCALE_M, SCALE_SHIFT, ACT, ACT).reshape(H, D))
    return E.to_float(np.stack(outs), ACT), cache.reshape(2, H, L, D)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_decode_steps_bit_exact_and_close_to_fp32(sim, scale):
    rng = np.random.default_rng(int(scale))
    q, k, v = [(rng.standard_normal((T, H, D)) * scale).astype(np.float32) for _ in range(3)]
    out, cache, _ = sim.run([q, k, v])
    want, want_cache = _emulate(q, k, v)
    assert np.array_equal(out.reshape(T, H, D), want)
    assert np.array_equal(cache.reshape(2, H, L, D).astype(np.int64), want_cache)    # the off-chip cache
    # fp32 causal attention: step t attends to keys 0..t
    qt, kt, vt = (torch.from_numpy(a).permute(1, 0, 2) for a in (q, k, v))       # [H, T, D]
    s = qt @ kt.transpose(1, 2) / math.sqrt(D)
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    ref = (torch.softmax(s, -1) @ vt).permute(1, 0, 2).numpy()
    assert np.abs(out.reshape(T, H, D) - ref).max() < 2e-3 * scale


def test_rms_norm_bit_exact_and_close_to_fp32(sim):
    rng = np.random.default_rng(7)
    q, k, v = [(rng.standard_normal((T, H, D)) * 3).astype(np.float32) for _ in range(3)]
    _, _, got = sim.run([q, k, v])
    x = q.reshape(T * H, D)
    want = E.to_float(E.layer_norm(E.from_float(x, ACT), GAMMA_RAW, None, RMS_EPS_RAW, True, ACT, ACT), ACT)
    assert np.array_equal(got.reshape(T * H, D), want)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + RMS_EPS) * GAMMA
    assert np.abs(got.reshape(T * H, D) - ref).max() < 2e-4

"""The kv8 KV-cache encoding on the hls backend (nnforge/backends/hls/decoder_kv8.py, nf_kv8.h): the
kernels' integer arithmetic against the reference encoding (nnforge/ir/kvcache.py), a w4-gptq+kv8
bundle of the tiny Llama generating as the interpreter through the bit-accurate emulation with its
cache state as the reference's, and the encodings the backend refuses. The C-simulation of the same
bundle against the emulation is in test_decoder.py (slow)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import nnforge as nf
from nnforge.backends.base import BackendError, get_backend
from nnforge.backends.hls import emulate as E
from nnforge.backends.hls import static_graph
from nnforge.backends.hls.decoder_kv8 import Kv8Write
from nnforge.backends.hls.project import HlsOptions, build_plan
from nnforge.backends.hls.resources import estimate
from nnforge.frontend.decoders.importer import import_decoder
from nnforge.generation import DecoderRunner, generate
from nnforge.ir import Interpreter
from nnforge.ir.kvcache import KV8
from nnforge.passes.base import PassContext
from nnforge.passes.kvcache import EncodeKVCache
from nnforge.targets import get_target
from tests.frontend.decoders.families import tiny_model, tiny_tokenizer

MAX_LEN = 32
PROMPT = torch.tensor([3, 99, 12, 45, 7, 88, 20])
FMT = E.Fixed(24, 8)


def _rows(seed: int = 0) -> np.ndarray:
    """Raw rows [4, 2, 8, 32] at FMT: groups from saturating to a few LSBs (subnormal float16
    scales), an all-zero group and single-value groups."""
    rng = np.random.default_rng(seed)
    mags = 2.0 ** rng.integers(-15, 8, size=(4, 2, 8, 2, 1))
    x = rng.standard_normal((4, 2, 8, 2, 16)) * mags
    x[0, 0, 0, 0] = 0.0
    x[0, 0, 1, 1, 1:] = 0.0
    return E.from_float(x.reshape(4, 2, 8, 32), FMT)


def test_kv8_write_is_the_reference_encoding_of_the_designs_values():
    """nf::kv8_write's integer scale (leading one, one division by 127) and codes (a reciprocal per
    group, a rounding shift) give the reference's f16(max|x| / 127) and round(x / scale) of the same
    fixed-point values, and nf::kv8_value the float cache the reference reads, rounded to the format."""
    x = _rows()
    codes, bits = E.kv8_quantize(x, 16, FMT.frac)
    ref_codes, ref_scale = KV8("k", group=16).quantize(torch.from_numpy(E.to_float(x, FMT)))
    assert np.array_equal(bits.view(np.float16), ref_scale.numpy())
    assert ((bits & 0x7C00 == 0) & (bits != 0)).any() and (bits == 0).sum() == 1     # subnormal scales met
    # a tie the two roundings break apart (x / scale exactly k + 1/2) is the only place they differ
    assert np.array_equal(codes, ref_codes.numpy())
    read = KV8("k", group=16).read([ref_codes, ref_scale], None, 32)
    assert np.array_equal(E.kv8_values(codes, bits, FMT), E.from_float(read.numpy(), FMT))


@pytest.fixture(scope="module")
def kv8_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kv8")
    tiny_model("llama").save_pretrained(tmp / "model")
    tiny_tokenizer().save_pretrained(tmp / "model")
    r = random.Random(0)
    calibration = " ".join(f"w{r.randrange(4, 128)}" for _ in range(1200))
    return nf.compile(tmp / "model", "alveo-u280", "w4-gptq+kv8", out=tmp / "b", max_len=MAX_LEN,
                      calibration=calibration)


def test_a_w4_gptq_kv8_bundle_generates_as_the_interpreter(kv8_bundle):
    """16 greedy tokens of the bundle's design (bit-accurate emulation, the C-simulation's numbers)
    are the interpreter's on the bundle's graph; the cache is int8 codes and float16 scales in the
    kv memory, a quarter of the float cache's words and a scale's half word per token and group."""
    bundle = kv8_bundle
    lm, graph = bundle.load(), bundle.graph()
    names = [v.name for v in graph.inputs], [v.name for v in graph.outputs]
    reference = DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), bundle.manifest["decoder"], *names)
    emulated = DecoderRunner(lambda *xs: lm.runner.emulate([np.asarray(x) for x in xs]), bundle.manifest["decoder"],
                             *names)
    want = generate(reference.decoder(resident=False), PROMPT, 16, stop_tokens=[]).tokens
    assert generate(emulated.decoder(resident=False), PROMPT, 16, stop_tokens=[]).tokens == want
    assert len(set(want)) > 2
    plan = lm.runner.plan
    assert plan.kv_words == 2 * 2 * (2 * MAX_LEN * 16 // 4 + 2 * MAX_LEN // 2)     # layers x (k, v) x (codes + scales)
    assert bundle.manifest["numerics"]["runtime_checked"]
    est = estimate(plan)
    assert not est["unrated"] and all(r["dsp"] >= 16 for r in est["layers"] if r["kind"] == "Kv8Attention")
    # the accelerator model's KV traffic and HBM are the encoded state's bytes: per token and layer,
    # K and V of 2 kv heads, 16 one-byte codes and one float16 scale each
    notes = json.loads((bundle.path / "fpga" / "simulation.json").read_text())["notes"]
    assert "KV cache as encoded in the graph: 72 bytes per token and layer (K and V)" in notes


def test_the_emulated_kv8_state_is_the_references(kv8_bundle):
    """After an 8-token prefill, the kv8 state the design wrote against the interpreter's. Each
    kv_cache_write's state is exactly the reference encoding of the design's own keys and values;
    against the interpreter's keys and values the state is "nearly" equal: the first layer's differ
    from them by the activation format's rounding only, so its codes are equal but for a value on a
    rounding boundary (one apart) and its scales a float16 ulp apart at most; the second layer's
    inputs carry the first layer's fixed-point (and w4 matrix unit) rounding, so its codes may be
    one apart more often and its scales a few ulps (under 1%) apart. Slots not written stay zero."""
    bundle = kv8_bundle
    lm, graph = bundle.load(), bundle.graph()
    n = 8
    feeds = [np.array([[1, 17, 42, 9, 77, 5, 33, 100]]), np.arange(n)[None]] + \
        [np.zeros((1, *v.shape[1:]), v.dtype.name) for v in graph.inputs[2:]]
    got = lm.runner.emulate(feeds)
    want = Interpreter(graph).run(*[torch.as_tensor(x) for x in feeds])
    for v, g, w in list(zip(graph.outputs, got, want))[1:]:
        g, w = np.asarray(g).astype(np.float32), w.numpy().astype(np.float32)
        assert not g[:, :, n:].any() and not w[:, :, n:].any()
        g, w = g[:, :, :n], w[:, :, :n]
        first = v.name.startswith("cache.0.")
        if v.name.endswith("codes.next"):
            assert np.abs(g - w).max() <= 1 and (g == w).mean() >= (0.99 if first else 0.9), v.name
        elif first:
            assert (np.abs(g - w) <= np.spacing(w.astype(np.float16)).astype(np.float32)).all(), v.name
        else:
            assert (np.abs(g - w) <= 0.01 * np.abs(w)).all(), v.name
    plan = lm.runner.plan_for({v.name: list(np.shape(x)) for v, x in zip(graph.inputs, feeds)})[1]
    env = plan.emulate_env([feeds[0], feeds[1]], _loaded(plan, graph, feeds))
    for layer in (x for x in plan.layers if isinstance(x, Kv8Write)):
        new = torch.from_numpy(E.to_float(env[layer.inputs[0]], plan.opts.act).reshape(layer.shape))
        codes, scale = KV8("k", group=layer.group).quantize(new)
        (c_off, c_shape), (s_off, s_shape) = layer.regions
        kv = env["kv_mem"]
        state = E.unpack_words(kv[c_off:], np.int8, int(np.prod(c_shape))).reshape(c_shape)
        scales = E.unpack_words(kv[s_off:], np.float16, int(np.prod(s_shape))).reshape(s_shape)
        assert np.array_equal(state[:, :, :8], codes.numpy()) and np.array_equal(scales[:, :, :8], scale.numpy())


def _loaded(plan, graph, feeds):
    kv = np.zeros(plan.kv_words, np.int64)
    for (inp, _), x in zip(plan.state, feeds[2:]):
        plan.load_state(kv, inp, x)
    return kv


@pytest.mark.parametrize("encoding, options", [("kv4", {"group_size": 16, "residual": 16}), ("kv-fp8", {})])
def test_other_cache_encodings_are_refused_naming_the_node(encoding, options):
    """Before a bundle is written (the capability table, as nf.compile checks it), and by the
    lowering itself."""
    graph = import_decoder(tiny_model("llama"), max_len=MAX_LEN).graph
    graph = EncodeKVCache(encoding=encoding, **options).run(graph, PassContext())
    with pytest.raises(BackendError, match=rf"cache\.0\.k of layer model\.layers\.0\.self_attn \({encoding}: the hls "
                                           rf"capability table has no kv_cache_write row for {encoding}\)"):
        get_backend("hls").check_cache_encodings(graph, get_target("versal-vhk158"))
    static, _ = static_graph(graph, None, {v.name: [1, *v.shape[1:]] if v.name.startswith("cache") else [1, 1]
                                           for v in graph.inputs})
    with pytest.raises(BackendError, match=rf"node model\.layers\.0\.self_attn\.k_cache\.write \(kv_cache_write\): the "
                                           rf"{encoding} KV-cache encoding is not supported by the hls backend"):
        build_plan(static, HlsOptions())

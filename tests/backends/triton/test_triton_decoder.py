"""Decoders on the triton backend, on the CPU in Triton's interpreter: the decode-attention kernel
against the ``attention`` op's reference kernel over caches in their stored encodings, and a
tiny random-init Llama compiled for ``h100`` whose greedy tokens equal the reference
interpreter's, its cache resident on the device in its encoding and written in place."""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported, anywhere

import random                             # noqa: E402

import pytest                             # noqa: E402
import torch                              # noqa: E402

pytest.importorskip("triton")

import nnforge as nf                                                        # noqa: E402
from nnforge.backends.base import BackendError                             # noqa: E402
from nnforge.backends.triton.kernels import KernelError                    # noqa: E402
from nnforge.backends.triton.kernels.attention import CacheView, attention  # noqa: E402
from nnforge.ir.kvcache import cache_encoding                              # noqa: E402
from nnforge.ir.ops import RunContext, get_op                              # noqa: E402

B, H, KVH, D, L = 2, 4, 2, 16, 24
# (encoding, options, how the kernel reads its codes); None: the float32 cache itself
CACHES = [(None, {}, "float"), ("kv-f16", {}, "float"), ("kv8", {"group": 8}, "int8"), ("kv-fp8", {}, "e4m3")]


def _reference(q, k, v, positions, **attrs):
    return get_op("attention").run(RunContext(env={}, float_dtype=torch.float32), [q, k, v, positions], attrs)[0]


def _cache(kind, options, codes, x):
    """(the kernel's view of ``x`` written into a cache of encoding ``kind``, the float cache the
    reference reads from that state)."""
    if kind is None:
        return CacheView(x), x
    enc = cache_encoding(kind, "k", **options)
    state = enc.write(enc.zeros(B, KVH, L, D), x, torch.arange(L).expand(B, L))
    group = enc.channels(D) if hasattr(enc, "channels") else None
    return CacheView(state[0], state[1] if len(state) > 1 else None, codes, group), enc.read(state, None, D)


@pytest.mark.parametrize("kind,options,codes", CACHES, ids=[c[0] or "float32" for c in CACHES])
@pytest.mark.parametrize("seq,window,softcap", [(1, 0, 0.0), (5, 6, 20.0), (1, 4, 0.0)],
                         ids=["decode", "prefill-window-softcap", "decode-window"])
def test_decode_attention_reads_the_stored_cache_as_the_reference_does(kind, options, codes, seq, window, softcap):
    g = torch.Generator().manual_seed(seq + window)
    q = torch.randn(B, H, seq, D, generator=g)
    (kv, k), (vv, v) = (_cache(kind, options, codes, torch.randn(B, KVH, L, D, generator=g)) for _ in "kv")
    positions = torch.stack([torch.arange(seq) + 3, torch.arange(seq) + L - seq])
    attrs = dict(scale=D ** -0.5, window=window, softcap=softcap)
    got = attention(q, kv, vv, positions, **attrs)
    torch.testing.assert_close(got, _reference(q, k, v, positions, **attrs), rtol=1e-5, atol=1e-5)


def test_decode_attention_names_the_cache_it_cannot_read():
    q = torch.randn(1, H, 1, D)
    codes = torch.zeros(1, KVH, L, D, dtype=torch.int8)
    with pytest.raises(KernelError, match=r"k cache of int8 codes needs a scale \[1, 2, 24, 2\] \(one per token and "
                                          r"group of 8 channels\), got None"):
        attention(q, CacheView(codes, None, "int8", 8), CacheView(torch.zeros(1, KVH, L, D)),
                  torch.zeros(1, 1, dtype=torch.int64), scale=1.0)
    with pytest.raises(KernelError, match=r"v cache of e4m3 codes must hold torch.uint8, got torch.int8"):
        attention(q, CacheView(torch.zeros(1, KVH, L, D)), CacheView(codes, codes, "e4m3"),
                  torch.zeros(1, 1, dtype=torch.int64), scale=1.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random-init Llama (a seed whose greedy tokens vary) with a tokenizer, and calibration text."""
    from tests.frontend.decoders.families import tiny_model, tiny_tokenizer
    root = tmp_path_factory.mktemp("llm")
    tiny_model("llama", seed=2).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    r = random.Random(0)
    (root / "calib.txt").write_text(" ".join(f"w{r.randrange(4, 128)}" for _ in range(600)))
    return root


PROMPT = torch.tensor([5, 17, 9, 33, 4, 60])


@pytest.mark.parametrize("recipe", ["w4-gptq+kv8", pytest.param("w4-gptq", marks=pytest.mark.slow)])
def test_a_quantised_llama_generates_like_the_interpreter(model_dir, tmp_path, recipe):
    """16 greedy tokens on h100 equal the reference interpreter's on the same graph; the linears
    run in the int4 kernel, attention in the decode-attention kernel on the cache as stored (no
    kv_cache_read runs), and the resident cache stays in its stored dtypes, written in place."""
    from nnforge.generation import DecoderRunner, generate
    from nnforge.ir import Interpreter
    bundle = nf.compile(model_dir / "model", "h100", recipe, calibration=model_dir / "calib.txt",
                        out=tmp_path / "b", max_len=32)
    m = bundle.manifest
    linears = m["backend"]["entry"]["linears"]
    assert linears and {spec["module"] for spec in linears.values()} == {"intweight"}
    sig = m["signature"]
    graph = bundle.graph()
    reference = DecoderRunner(lambda *xs: Interpreter(graph).run(*xs), m["decoder"], [i["name"] for i in sig["inputs"]],
                              [o["name"] for o in sig["outputs"]])
    want = generate(reference.decoder(resident=False), PROMPT, 16, stop_tokens=[])
    lm = bundle.load()
    decoder = lm.decoder()
    got = generate(decoder, PROMPT, 16, stop_tokens=[])
    assert got.tokens == want.tokens and len(set(want.tokens)) > 1
    plan = lm.runner.launcher.plan
    steps = {node.op: fn for node, fn, *_ in plan.steps}
    assert "kv_cache_read" not in steps and steps["attention"].__qualname__.startswith("attention_step")
    declared = {i["name"]: i["dtype"] for i in sig["inputs"]}
    held = decoder._resident.state
    assert sorted(held) == sorted(s["input"] for s in m["decoder"]["state"])
    assert all(str(t.dtype).removeprefix("torch.") == declared[name] for name, t in held.items())
    before = {name: t.data_ptr() for name, t in held.items()}
    decoder.step(torch.tensor([[got.tokens[-1]]]))
    assert {name: t.data_ptr() for name, t in decoder._resident.state.items()} == before      # written in place
    # a fork puts the state back on the device: its copies step as the numpy-carried decoder's do
    plain = lm.decoder(resident=False)
    plain.prefill(PROMPT[None])
    decoder.prefill(PROMPT[None])
    plain.fork(2)
    decoder.fork(2)
    torch.testing.assert_close(decoder.step(torch.tensor([5, 9])), plain.step(torch.tensor([5, 9])), rtol=0, atol=0)


def test_positions_outside_the_cache_are_refused_naming_the_write(model_dir, tmp_path):
    bundle = nf.compile(model_dir / "model", "h100", "kv8", out=tmp_path / "b", max_len=16)
    decoder = bundle.load().decoder()
    decoder.reset(1)
    resident = decoder._resident
    before = {name: t.clone() for name, t in resident.state.items()}
    with pytest.raises(BackendError, match=r"model\.layers\.0\.self_attn\.\S+ \(kv_cache_write\): position 16 "
                                           r"\(batch row 0, token 0\) is outside the cache's 16 slots"):
        resident.run([[5]], [[16]])
    assert all(torch.equal(resident.state[name], t) for name, t in before.items())      # nothing written

"""The decoder ops (rms_norm, rope, cache_update, attention) against transformers' own functions and
hand-built masks, their shape rules with symbolic batch/seq/max_len, their errors, and a small
decoder layer through the interpreter, the serialiser and the verifier."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.cache_utils import StaticLayer
from transformers.models.cohere import modeling_cohere as cohere
from transformers.models.gemma import modeling_gemma as gemma
from transformers.models.gemma2 import modeling_gemma2 as gemma2
from transformers.models.gptj import modeling_gptj as gptj
from transformers.models.llama import modeling_llama as llama
from transformers.models.phi3 import modeling_phi3 as phi3

from nnforge.ir import Dense, Graph, GraphError, Interpreter, InterpreterError, load_graph, save_graph, tensor, verify
from nnforge.ir.ops import RunContext, get_op
from nnforge.ir.ops import decoder as decoder_ops


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(op, *inputs, float_dtype=torch.float32, **attrs):
    """One op's reference kernel, after its schema and shape rule accepted the inputs."""
    opdef = get_op(op)
    attrs = opdef.check_attrs(attrs, f"test {op}")
    types = [None if t is None else tensor(str(t.dtype).removeprefix("torch."), *t.shape) for t in inputs]
    out_type = opdef.infer_types(types, attrs, f"test {op}")[0]
    args = [t.to(float_dtype) if t is not None and t.is_floating_point() else t for t in inputs]
    out = opdef.run(RunContext(float_dtype=float_dtype), args, attrs)[0]
    assert tuple(out.shape) == out_type.shape and out.dtype == float_dtype
    return out


# --- rms_norm -------------------------------------------------------------------------------------
def test_rms_norm_is_llama_rms_norm():
    x, w = randn(2, 5, 16) * 3, randn(16, seed=1)
    ref = llama.LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(w)
        want = ref(x)
    assert torch.equal(run("rms_norm", x, w, eps=1e-5), want)


def test_rms_norm_with_offset_is_gemma_rms_norm():
    x, w = randn(3, 16) * 2, randn(16, seed=1) * 0.1
    for cls in (gemma.GemmaRMSNorm, gemma2.Gemma2RMSNorm):
        ref = cls(16, eps=1e-6)
        with torch.no_grad():
            ref.weight.copy_(w)
            want = ref(x)
        assert torch.equal(run("rms_norm", x, w, eps=1e-6, offset=1.0), want), cls.__name__


def test_rms_norm_without_weight_and_in_float64():
    x = randn(4, 7, seed=3)
    want = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(run("rms_norm", x, eps=1e-6, float_dtype=torch.float64), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(run("rms_norm", x, eps=1e-6), want.float())


# --- rope -----------------------------------------------------------------------------------------
def _positions(batch, seq, start=0):
    """Per-row positions: row b starts at start + b (rows of one batch need not be aligned)."""
    return torch.arange(seq)[None] + start + torch.arange(batch)[:, None]


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32},
])
def test_rope_half_is_llama_apply_rotary_pos_emb(rope_parameters):
    """inv_freq and attention_scaling as transformers computes them for each rope type; the op
    then gives the same bits as LlamaRotaryEmbedding + apply_rotary_pos_emb."""
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, rope_parameters=rope_parameters)
    emb = llama.LlamaRotaryEmbedding(cfg)
    q, k = randn(2, 4, 6, 16), randn(2, 2, 6, 16, seed=1)
    pos = _positions(2, 6, start=90)
    cos, sin = emb(q, pos)
    want_q, want_k = llama.apply_rotary_pos_emb(q, k, cos, sin)
    for x, want in ((q, want_q), (k, want_k)):
        got = run("rope", x, pos, emb.inv_freq, scale=float(emb.attention_scaling))
        assert torch.equal(got, want), rope_parameters["rope_type"]


def test_rope_partial_rotary_is_phi3():
    cfg = Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5,
                     max_position_embeddings=64)
    emb = phi3.Phi3RotaryEmbedding(cfg)
    q = randn(1, 4, 5, 16)
    pos = _positions(1, 5, start=3)
    cos, sin = emb(q, pos)
    want, _ = phi3.apply_rotary_pos_emb(q, q, cos, sin)
    got = run("rope", q, pos, emb.inv_freq, rotary_dim=8)
    assert torch.equal(got, want)
    assert torch.equal(got[..., 8:], q[..., 8:])


def test_rope_interleaved_is_cohere_and_gptj():
    head_dim = 12
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    x = randn(2, 3, 4, head_dim)
    pos = _positions(2, 4, start=5)
    emb = cohere.CohereRotaryEmbedding.__new__(cohere.CohereRotaryEmbedding)
    torch.nn.Module.__init__(emb)
    emb.inv_freq, emb.attention_scaling, emb.config = inv_freq, 1.0, SimpleNamespace(rope_parameters={})
    emb.rope_type = "default"
    cos, sin = emb(x, pos)
    want, _ = cohere.apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.equal(run("rope", x, pos, inv_freq, style="interleaved"), want)

    # GPT-J: interleaved pairs over the first rotary_dim dims, [batch, seq, heads, dim] layout.
    rotary_dim = 8
    table = gptj.create_sinusoidal_positions(32, rotary_dim)
    sin, cos = torch.split(table[pos], rotary_dim // 2, dim=-1)
    xs = x.transpose(1, 2)
    want = torch.cat([gptj.apply_rotary_pos_emb(xs[..., :rotary_dim], sin, cos), xs[..., rotary_dim:]], -1)
    gptj_inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    got = run("rope", x, pos, gptj_inv, style="interleaved", rotary_dim=rotary_dim)
    assert torch.equal(got, want.transpose(1, 2))


# --- cache_update ---------------------------------------------------------------------------------
def test_cache_update_is_static_cache_index_copy():
    """Prefill then decode steps, each written as transformers' StaticLayer writes them."""
    layer = StaticLayer(max_cache_len=10)
    cache_k = torch.zeros(2, 3, 10, 4)
    cache_v = torch.zeros(2, 3, 10, 4)
    start = 0
    for step, s in enumerate((4, 1, 1, 3)):
        k, v = randn(2, 3, s, 4, seed=step), randn(2, 3, s, 4, seed=10 + step)
        want_k, want_v = layer.update(k, v)
        pos = torch.arange(start, start + s).expand(2, s)
        cache_k = run("cache_update", cache_k, k, pos)
        cache_v = run("cache_update", cache_v, v, pos)
        assert torch.equal(cache_k, want_k) and torch.equal(cache_v, want_v), step
        start += s


def test_cache_update_rows_write_their_own_slots():
    cache, new = randn(2, 2, 6, 3), randn(2, 2, 2, 3, seed=1)
    pos = torch.tensor([[4, 1], [0, 5]])
    want = cache.clone()
    for b in range(2):
        for j in range(2):
            want[b, :, pos[b, j]] = new[b, :, j]
    got = run("cache_update", cache, new, pos)
    assert torch.equal(got, want)
    assert not torch.equal(got, cache), "the input cache is left as it was"


@pytest.mark.parametrize("pos, message", [
    ([[0, 6]], "position 6 \\(batch row 0, token 1\\) is outside the cache's 6 slots 0..5"),
    ([[-1, 2]], "position -1 \\(batch row 0, token 0\\) is outside"),
    ([[2, 2]], "batch row 0 writes slot 2 twice"),
])
def test_cache_update_refuses_bad_positions(pos, message):
    with pytest.raises(ValueError, match=message):
        run("cache_update", randn(1, 1, 6, 2), randn(1, 1, 2, 2), torch.tensor(pos))


# --- attention ------------------------------------------------------------------------------------
def _hf_mask(pos, max_len, window=0):
    """An additive mask as transformers builds one: 0 where a query sees a slot, the dtype's min
    elsewhere; built by hand, one (query, slot) pair at a time."""
    b, s = pos.shape
    mask = torch.full((b, 1, s, max_len), torch.finfo(torch.float32).min)
    for i in range(b):
        for j in range(s):
            for t in range(max_len):
                p = int(pos[i, j])
                if t <= p and (window == 0 or p - t < window):
                    mask[i, 0, j, t] = 0.0
    return mask


def _hf_attention(forward, q, k, v, pos, scale, window=0, softcap=None):
    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False, head_dim=q.shape[-1])
    kwargs = {"softcap": softcap} if softcap is not None else {}
    out, _ = forward(module, q, k, v, _hf_mask(pos, k.shape[2], window), scaling=scale, **kwargs)
    return out.transpose(1, 2)          # transformers returns [b, s, h, d]


@pytest.mark.parametrize("heads, kv_heads, window", [(4, 4, 0), (6, 2, 0), (4, 1, 3), (4, 2, 1)])
def test_attention_is_llama_eager_attention(heads, kv_heads, window):
    """Prefill of 5 tokens at per-row offsets into a cache of 12, and a one-token decode step."""
    k, v = randn(2, kv_heads, 12, 8, seed=1), randn(2, kv_heads, 12, 8, seed=2)
    for s, start in ((5, 0), (5, 4), (1, 9)):
        q = randn(2, heads, s, 8, seed=s + start)
        pos = _positions(2, s, start=start)
        want = _hf_attention(llama.eager_attention_forward, q, k, v, pos, 8 ** -0.5, window)
        got = run("attention", q, k, v, pos, scale=8 ** -0.5, window=window)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_attention_softcap_is_gemma2():
    q, k, v = randn(1, 4, 3, 8) * 4, randn(1, 2, 7, 8, seed=1) * 4, randn(1, 2, 7, 8, seed=2)
    pos = torch.tensor([[2, 3, 4]])
    for window in (0, 2):
        want = _hf_attention(gemma2.eager_attention_forward, q, k, v, pos, 0.25, window, softcap=50.0)
        got = run("attention", q, k, v, pos, scale=0.25, window=window, softcap=50.0)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    capped = run("attention", q, k, v, pos, scale=0.25, softcap=1.0)
    assert not torch.allclose(capped, run("attention", q, k, v, pos, scale=0.25))


def test_attention_in_query_blocks_equals_one_block(monkeypatch):
    """A long prompt is computed a block of queries at a time; the blocks change nothing."""
    q, k, v = randn(2, 4, 9, 8), randn(2, 2, 16, 8, seed=1), randn(2, 2, 16, 8, seed=2)
    pos = _positions(2, 9, start=3)
    whole = run("attention", q, k, v, pos, scale=0.3, window=4)
    monkeypatch.setattr(decoder_ops, "SCORE_BLOCK", 2 * 4 * 16 * 2)       # two queries per block
    torch.testing.assert_close(run("attention", q, k, v, pos, scale=0.3, window=4), whole, rtol=1e-6, atol=1e-7)


def test_attention_in_float64():
    """The float64 interpreter keeps float64 through the softmax (transformers would drop to float32)."""
    q, k, v = randn(1, 2, 3, 4).double(), randn(1, 1, 5, 4, seed=1).double(), randn(1, 1, 5, 4, seed=2).double()
    pos = torch.tensor([[1, 2, 4]])
    scores = q @ llama.repeat_kv(k, 2).transpose(2, 3) * 0.5 + _hf_mask(pos, 5).double()
    want = torch.softmax(scores, -1) @ llama.repeat_kv(v, 2)
    got = run("attention", q, k, v, pos, scale=0.5, float_dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_no_tokens_read_and_write_nothing():
    cache, none = randn(2, 1, 4, 3), torch.zeros(2, 0, dtype=torch.int64)
    assert torch.equal(run("cache_update", cache, randn(2, 1, 0, 3), none), cache)
    assert run("attention", randn(2, 2, 0, 3), cache, cache, none, scale=0.5).shape == (2, 2, 0, 3)
    assert run("rope", randn(2, 2, 0, 4), none, torch.ones(2)).shape == (2, 2, 0, 4)


def test_attention_refuses_positions_past_the_cache():
    with pytest.raises(ValueError, match="position 5 \\(batch row 0, token 1\\) is outside the cache's 5 slots"):
        run("attention", randn(1, 2, 2, 4), randn(1, 1, 5, 4), randn(1, 1, 5, 4), torch.tensor([[4, 5]]), scale=0.5)


# --- shape rules with symbols ---------------------------------------------------------------------
def _node(op, specs, attrs=None, name="n"):
    g = Graph("g")
    vals = [None if spec is None else g.add_input(f"in{i}", tensor(*spec)) for i, spec in enumerate(specs)]
    node = g.add_node(op, vals, attrs or {}, name=name)
    return node.outputs[0]


def test_shape_rules_with_symbolic_batch_seq_and_max_len():
    x = ("f32", "batch", 8, "seq", 16)
    pos = ("i64", "batch", "seq")
    cache = ("f32", "batch", 2, "max_len", 16)
    assert str(_node("rope", [x, pos, ("f32", 8)]).type) == "f32[batch, 8, seq, 16]"
    assert str(_node("rope", [x, pos, ("f32", 4)], {"rotary_dim": 8}).type) == "f32[batch, 8, seq, 16]"
    new = ("f32", "batch", 2, "seq", 16)
    assert str(_node("cache_update", [cache, new, pos]).type) == "f32[batch, 2, max_len, 16]"
    assert str(_node("attention", [x, cache, cache, pos], {"scale": 0.25}).type) == "f32[batch, 8, seq, 16]"
    assert str(_node("rms_norm", [("f32", "batch", "seq", 64), ("f32", 64)], {"eps": 1e-6}).type) \
        == "f32[batch, seq, 64]"
    # heads as symbols: the multiple cannot be checked, and is not refused
    sym_heads = ("f32", "batch", "h", "seq", 16)
    assert str(_node("attention", [sym_heads, cache, cache, pos], {"scale": 0.25}).type) == "f32[batch, h, seq, 16]"
    # a symbolic head dim with a whole-dim rotation: inv_freq must be [head_dim // 2] in the same symbol
    sym_dim = ("f32", 1, 2, "seq", "2*half")
    assert str(_node("rope", [sym_dim, ("i64", 1, "seq"), ("f32", "half")]).type) == "f32[1, 2, seq, 2*half]"


@pytest.mark.parametrize("op, specs, attrs, message", [
    ("rms_norm", [("f32", 2, 8), ("f32", 4)], {"eps": 1e-6}, "rms_norm weight f32\\[4\\] must be \\[8\\]"),
    ("rms_norm", [("i64", 2, 8)], {"eps": 1e-6}, "rms_norm input must be a float tensor"),
    ("rms_norm", [("f32", 2, 8)], {"eps": 0.0}, "rms_norm eps must be a positive finite number, got 0.0"),
    ("rms_norm", [("f32", 2, 8)], {"eps": -1e-6}, "eps must be a positive finite number"),
    ("rms_norm", [("f32", 2, 8)], {"eps": float("nan")}, "eps must be a positive finite number"),
    ("rms_norm", [("f32", 2, 8)], {"eps": 1e-6, "offset": 1.0}, "rms_norm offset 1.0 needs a weight"),
    ("rms_norm", [("f32", 2, 8), ("f32", 8)], {"eps": 1e-6, "offset": float("inf")},
     "rms_norm offset must be a finite number, got inf"),
    ("rope", [("f32", 1, 2, 3, 8), ("i64", 1, 3), ("f32", 3)], {},
     "inv_freq f32\\[3\\] must hold one frequency per rotated pair \\(8 rotated dims: \\[4\\]\\)"),
    ("rope", [("f32", 1, 2, 3, 8), ("i64", 1, 4), ("f32", 4)], {}, "rope positions i64\\[1, 4\\] must be \\[1, 3\\]"),
    ("rope", [("f32", 1, 2, 3, 8), ("f32", 1, 3), ("f32", 4)], {}, "rope positions must be int64 or int32"),
    ("rope", [("f32", 2, 3, 8), ("i64", 2, 3), ("f32", 4)], {}, "rope input must have rank 4"),
    ("rope", [("f32", 1, 2, 3, 8), ("i64", 1, 3), ("f32", 2)], {"rotary_dim": 5}, "rotary_dim must be even"),
    ("rope", [("f32", 1, 2, 3, 8), ("i64", 1, 3), ("f32", 5)], {"rotary_dim": 10}, "at most the head dim 8"),
    ("rope", [("f32", 1, 2, 3, 7), ("i64", 1, 3), ("f32", 3)], {}, "must be even and at most the head dim 7"),
    ("rope", [("f32", 1, 2, 3, 8), ("i64", 1, 3), ("f32", 4)], {"scale": 0.0}, "rope scale must be a positive"),
    ("rope", [("f32", 1, 2, 3, 8), ("i64", 1, 3), ("f32", 4), ("f32", 3)], {"switch_at": 2},
     "inv_freq_long f32\\[3\\] must have inv_freq's shape f32\\[4\\]"),
    ("rope", [("f32", 1, 2, 3, 8), ("i64", 1, 3), ("f32", 4), ("f32", 4)], {},
     "with inv_freq_long needs switch_at >= 1"),
    ("cache_update", [("f32", 1, 2, 4, 8), ("f32", 1, 2, 5, 8), ("i64", 1, 5)], {},
     "writes 5 tokens into a cache of 4 slots"),
    ("cache_update", [("f32", 1, 2, 4, 8), ("f32", 1, 1, 1, 8), ("i64", 1, 1)], {}, "differ on axis 1"),
    ("cache_update", [("f32", 1, 2, 4, 8), ("f16", 1, 2, 1, 8), ("i64", 1, 1)], {}, "inputs must share one dtype"),
    ("cache_update", [("f32", "b", 2, 4, 8), ("f32", "b", 2, 1, 8), ("i64", 1, 1)], {},
     "positions i64\\[1, 1\\] must be \\[b, 1\\]"),
    ("attention", [("f32", 1, 6, 3, 8), ("f32", 1, 4, 5, 8), ("f32", 1, 4, 5, 8), ("i64", 1, 3)], {"scale": 0.5},
     "q has 6 heads, not a multiple of the 4 kv heads"),
    ("attention", [("f32", 1, 4, 3, 8), ("f32", 1, 2, 5, 8), ("f32", 1, 2, 6, 8), ("i64", 1, 3)], {"scale": 0.5},
     "must have one shape"),
    ("attention", [("f32", 1, 4, 3, 8), ("f32", 1, 2, 5, 4), ("f32", 1, 2, 5, 4), ("i64", 1, 3)], {"scale": 0.5},
     "differ on axis 3"),
    ("attention", [("f32", 1, 4, 3, 8), ("f32", 1, 2, 5, 8), ("f32", 1, 2, 5, 8), ("i64", 1, 3)],
     {"scale": 0.5, "window": -1}, "attention window must be >= 0"),
    ("attention", [("f32", 1, 4, 3, 8), ("f32", 1, 2, 5, 8), ("f32", 1, 2, 5, 8), ("i64", 1, 3)],
     {"scale": 0.5, "softcap": -2.0}, "softcap must be a non-negative finite number"),
    ("attention", [("f32", 1, 4, 3, 8), ("f32", 1, 2, 5, 8), ("f32", 1, 2, 5, 8), ("i64", 1, 3)],
     {"scale": float("inf")}, "attention scale must be a positive finite number"),
])
def test_shape_and_attribute_errors_name_the_node(op, specs, attrs, message):
    with pytest.raises(GraphError, match=f"node bad \\({op}\\): .*{message}"):
        _node(op, specs, attrs, name="bad")


@pytest.mark.parametrize("op, specs, attrs, message", [
    ("rope", [("f32", 1, 2, 3, 8), ("i64", 1, 3), ("f32", 4)], {"style": "neox"},
     "attribute style must be one of half, interleaved, got 'neox'"),
    ("rope", [("f32", 1, 2, 3, 8), ("i64", 1, 3), ("f32", 4)], {"rotary_dim": 4.0},
     "attribute rotary_dim must be of kind int"),
    ("attention", [("f32", 1, 4, 3, 8), ("f32", 1, 2, 5, 8), ("f32", 1, 2, 5, 8), ("i64", 1, 3)], {},
     "missing required attribute scale"),
    ("attention", [("f32", 1, 4, 3, 8), ("f32", 1, 2, 5, 8), ("f32", 1, 2, 5, 8), ("i64", 1, 3)],
     {"scale": 0.5, "window": 2.5}, "attribute window must be of kind int"),
    ("rms_norm", [("f32", 2, 8)], {}, "missing required attribute eps"),
])
def test_schema_errors_name_the_node(op, specs, attrs, message):
    with pytest.raises(GraphError, match=f"node bad \\({op}\\):? {message}"):
        _node(op, specs, attrs, name="bad")


# --- a decoder layer through the interpreter, the serialiser and the verifier ----------------------
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MAX_LEN = 32, 4, 2, 8, 16


def _layer_graph(window=0, softcap=0.0) -> Graph:
    """One attention block of a decoder in decoder form: x, positions and the layer's cache in; the
    block's output and the next cache out."""
    g = Graph("block")
    x = g.add_input("x", tensor("f32", "batch", "seq", HIDDEN))
    pos = g.add_input("positions", tensor("i64", "batch", "seq"))
    cache = {kv: g.add_input(f"cache.0.{kv}", tensor("f32", "batch", KV_HEADS, MAX_LEN, HEAD_DIM)) for kv in "kv"}

    def w(name, *shape, seed):
        return g.add_weight(name, Dense(randn(*shape, seed=seed) / shape[-1] ** 0.5))

    inv_freq = g.add_weight("rotary.inv_freq",
                            Dense(1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)))
    h = g.op("rms_norm", x, g.add_weight("input_layernorm.weight", Dense(randn(HIDDEN, seed=9) * 0.1 + 1)),
             eps=1e-6, name="input_layernorm")

    def heads(name, n, seed):
        y = g.op("linear", h, w(f"self_attn.{name}.weight", n * HEAD_DIM, HIDDEN, seed=seed), name=f"self_attn.{name}")
        y = g.op("reshape", y, shape=["batch", "seq", n, HEAD_DIM], name=f"{name}.split")
        return g.op("permute", y, perm=[0, 2, 1, 3], name=f"{name}.heads")

    q = g.op("rope", heads("q_proj", HEADS, 1), pos, inv_freq, name="q.rope")
    k = g.op("rope", heads("k_proj", KV_HEADS, 2), pos, inv_freq, name="k.rope")
    v = heads("v_proj", KV_HEADS, 3)
    k_next = g.op("cache_update", cache["k"], k, pos, name="cache.0.k.update")
    v_next = g.op("cache_update", cache["v"], v, pos, name="cache.0.v.update")
    a = g.op("attention", q, k_next, v_next, pos, scale=HEAD_DIM ** -0.5, window=window, softcap=softcap,
             name="self_attn.attention")
    a = g.op("reshape", g.op("permute", a, perm=[0, 2, 1, 3], name="a.tokens"), shape=["batch", "seq", HIDDEN],
             name="a.merge")
    out = g.op("linear", a, w("self_attn.o_proj.weight", HIDDEN, HIDDEN, seed=4), name="self_attn.o_proj")
    g.set_outputs([out, k_next, v_next])
    g.name_outputs(["y", "cache.0.k.next", "cache.0.v.next"])
    return g


@pytest.mark.parametrize("window, softcap", [(0, 0.0), (3, 20.0)])
def test_prefill_then_decode_equals_one_prefill(window, softcap):
    """The block run on 7 tokens at once, and on 4 then 1, 1, 1 with the cache carried between
    calls, gives the same outputs and the same final cache (rows at different positions)."""
    g = _layer_graph(window, softcap)
    verify(g)
    interp = Interpreter(g)
    x = randn(2, 7, HIDDEN, seed=20)
    pos = _positions(2, 7, start=2)
    empty = torch.zeros(2, KV_HEADS, MAX_LEN, HEAD_DIM)
    y_all, k_all, v_all = interp.run(x, pos, empty, empty)
    k, v, ys = empty, empty, []
    for a, b in ((0, 4), (4, 5), (5, 6), (6, 7)):
        y, k, v = interp.run(x[:, a:b], pos[:, a:b], k, v)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_all, rtol=1e-5, atol=1e-6)
    # the keys and values come from projections of 4, 1, 1, 1 rows or of 7: on a CPU whose matmul
    # kernels sum in another order by shape, they differ in the last bits
    torch.testing.assert_close(k, k_all, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, v_all, rtol=1e-5, atol=1e-6)
    assert k_all[:, :, :2].abs().sum() == 0 and k_all[0, :, 2:9].abs().sum() > 0


def test_block_survives_serialisation_and_verifies(tmp_path):
    g = _layer_graph(window=4, softcap=30.0)
    save_graph(g, tmp_path / "g.json", tmp_path / "g.safetensors")
    g2 = load_graph(tmp_path / "g.json", tmp_path / "g.safetensors")
    verify(g2)
    assert str(g2) == str(g)
    node = g2.node("self_attn.attention")
    assert node.attrs == {"scale": HEAD_DIM ** -0.5, "window": 4, "softcap": 30.0}
    assert g2.node("q.rope").attrs == {"scale": 1.0, "style": "half", "rotary_dim": 0, "switch_at": 0}
    x, pos = randn(1, 3, HIDDEN), _positions(1, 3)
    cache = torch.zeros(1, KV_HEADS, MAX_LEN, HEAD_DIM)
    for a, b in zip(Interpreter(g).run(x, pos, cache, cache), Interpreter(g2).run(x, pos, cache, cache)):
        assert torch.equal(a, b)


def test_interpreter_names_the_node_when_the_cache_is_full():
    g = _layer_graph()
    cache = torch.zeros(1, KV_HEADS, MAX_LEN, HEAD_DIM)
    with pytest.raises(InterpreterError, match="node cache.0.k.update \\(cache_update\\) failed: .*position 16 "
                                               "\\(batch row 0, token 1\\) is outside the cache's 16 slots"):
        Interpreter(g).run(randn(1, 2, HIDDEN), torch.tensor([[15, 16]]), cache, cache)


def test_block_in_float64_interpreter():
    g = _layer_graph(window=2)
    x, pos = randn(2, 3, HIDDEN), _positions(2, 3)
    cache = torch.zeros(2, KV_HEADS, MAX_LEN, HEAD_DIM)
    y64 = Interpreter(g, torch.float64).run(x, pos, cache, cache)[0]
    y32 = Interpreter(g).run(x, pos, cache, cache)[0]
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y32, y64.float(), rtol=1e-5, atol=1e-6)

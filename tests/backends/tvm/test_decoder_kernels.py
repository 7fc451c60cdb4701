"""The tvm backend's own kernels for the decoder ops (kernels/decoder.py) against the interpreter:
attention over the visible slots only and the cache written in place, at prefill and decode, with
grouped-query heads, sliding windows, softcapping, rows at different positions and a head size that
fills whole vectors; rope in both pair styles, partial rotation and the long table; rms_norm with and
without a weight."""
from __future__ import annotations

import pytest
import torch

from nnforge.backends.base import BackendError, get_backend
from nnforge.ir import Dense, Graph, run_graph, tensor
from nnforge.passes.base import PassContext
from nnforge.passes.decompose import DecomposeOps
from tests import conftest

B, H, KVH, L, D = 2, 4, 2, 24, 32


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def block(*, window=0, softcap=0.0, keep_cache=False) -> Graph:
    g = Graph("attn")
    q = g.add_input("q", tensor("f32", "batch", H, "seq", D))
    kv = g.add_input("kv", tensor("f32", "batch", KVH, "seq", D))
    pos = g.add_input("positions", tensor("i64", "batch", "seq"))
    cache = g.add_input("cache", tensor("f32", "batch", KVH, L, D))
    new = g.op("cache_update", cache, kv, pos)
    out = g.op("attention", q, new, new, pos, scale=D ** -0.5, window=window, softcap=softcap)
    # keep_cache: the old cache is read after the update too, so it must not be written in place
    g.set_outputs([out, new] + ([g.op("mul", cache, cache)] if keep_cache else []))
    return g


def inputs(seq, start, seed=0):
    positions = torch.arange(start, start + seq).repeat(B, 1)
    positions[1] += 3
    cache = torch.zeros(B, KVH, L, D)
    cache[:, :, :start + 3] = _randn(B, KVH, start + 3, D, seed=seed + 2)
    return [_randn(B, H, seq, D, seed=seed), _randn(B, KVH, seq, D, seed=seed + 1), positions, cache]


@pytest.mark.parametrize("window,softcap,keep_cache,threads", [(0, 0.0, False, 1), (5, 0.0, False, 8),
                                                               (0, 30.0, True, 2), (7, 12.0, False, 1)])
def test_decoder_kernels_match_the_interpreter(tmp_path, monkeypatch, window, softcap, keep_cache, threads):
    """threads: the pool the attention kernel is built for; 4 query heads on 2 kv heads run as
    whole groups of 2 for 1 or 2 threads, in blocks of 1 for 8 (kvcache_attention.head_block)."""
    from nnforge.backends.tvm import threads as pool
    monkeypatch.setattr(pool, "most", lambda: threads)
    graph = block(window=window, softcap=softcap, keep_cache=keep_cache)
    prefill, decode, late = inputs(9, 0), inputs(1, 13, seed=1), inputs(3, L - 6, seed=2)
    backend = get_backend("tvm")
    lowered = conftest.lower_into(backend, graph, "cpu", tmp_path,
                                  shapes={v.name: list(t.shape) for v, t in zip(graph.inputs, prefill)})
    assert not lowered.fallbacks
    library = (tmp_path / "model.so").read_bytes()
    assert b"nf_attention" in library and b"nf_cache_update" in library
    runner = backend.load(tmp_path, lowered.entry)
    with pytest.raises(BackendError, match=r"the library has no input or output \['tokens', 'logits'"):
        runner.resident([("cache", "cache.next")], ("tokens", "positions"), "logits")
    for case in (prefill, decode, late):
        given = [t.clone() for t in case]
        for got, want in zip(runner(*case), run_graph(graph, case)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(case, given):               # the caller's arrays are never written into
            assert torch.equal(a, b)


def rope_norm_block(style: str, rotary: int, long: bool) -> Graph:
    g = Graph("rope_norm")
    x = g.add_input("x", tensor("f32", "batch", 3, "seq", 16))
    pos = g.add_input("positions", tensor("i32", "batch", "seq"))
    freqs = [g.add_weight(f"inv_freq{i}", Dense(base / 10000 ** (torch.arange(0, rotary, 2).float() / rotary)))
             for i, base in enumerate((1.0, 0.25)[:1 + long])]
    y = g.op("rope", x, pos, *freqs, style=style, rotary_dim=0 if rotary == 16 else rotary, scale=1.5,
             switch_at=10 if long else 0)
    weighted = g.op("rms_norm", y, g.add_weight("norm.weight", Dense(_randn(16, seed=4))), eps=1e-6, offset=1.0)
    g.set_outputs([y, weighted, g.op("rms_norm", x, eps=1e-5)])
    return g


@pytest.mark.parametrize("style,rotary,long", [("half", 16, False), ("half", 8, True), ("interleaved", 16, True),
                                               ("interleaved", 8, False)])
def test_rope_and_rms_norm_kernels_match_the_interpreter(tmp_path, style, rotary, long):
    graph = rope_norm_block(style, rotary, long)
    backend = get_backend("tvm")
    lowered = conftest.lower_into(backend, graph, "cpu", tmp_path, shapes={"x": [2, 3, 5, 16], "positions": [2, 5]})
    assert not lowered.fallbacks
    library = (tmp_path / "model.so").read_bytes()
    assert b"nf_rope" in library and b"nf_rms_norm" in library
    runner = backend.load(tmp_path, lowered.entry)
    # prefill, a decode step, and a call past switch_at (positions up to 12: the long table)
    for seq, start in ((5, 0), (1, 6), (4, 7)):
        x = _randn(2, 3, seq, 16, seed=seq)
        positions = torch.arange(start, start + seq, dtype=torch.int32).repeat(2, 1)
        positions[1] += 2
        for got, want in zip(runner(x, positions), run_graph(graph, [x, positions])):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decoder_ops_of_other_dtypes_are_written_out_for_tvm():
    configs = get_backend("tvm").prepare(None, {})
    keep = [c for c in configs if c.get("keep_dtypes")]
    assert keep == [{"pass": "decompose", "ops": ["attention", "cache_update", "rms_norm", "rope"],
                     "keep_dtypes": ["float32"]}]
    graph = block()
    DecomposeOps(ops=["attention", "cache_update"], keep_dtypes=["float32"]).run(graph, PassContext())
    assert {"attention", "cache_update"} <= {n.op for n in graph.nodes}
    DecomposeOps(ops=["attention", "cache_update"]).run(graph, PassContext())
    assert not {"attention", "cache_update"} & {n.op for n in graph.nodes}


@pytest.mark.parametrize("spec,group", [("int8", None), ("int4", 16), ("uint4", 32), ("mxfp4", None),
                                        ("nvfp4", None), ("e4m3", None), ("e5m2", 32)])
def test_an_embedding_tied_to_the_head_reads_the_heads_arrays(tmp_path, spec, group):
    """A token embedding whose table is an LM head's int8/int4 or FP4/FP8 weight: rows gathered from
    the head kernel's own arrays (no decoded float table, no fallback), equal to the interpreter."""
    from nnforge.passes.quantize.formats import parse_format, quantize_rtn
    vocab, hidden = 70, 64
    table = quantize_rtn(_randn(vocab, hidden, seed=4) * 0.1, parse_format(spec, group_size=group))
    g = Graph("tied")
    ids = g.add_input("ids", tensor("i64", "batch", "seq"))
    w = g.add_weight("embed.weight", table)
    x = g.op("embedding", ids, w, name="embed")
    g.set_outputs([x, g.op("linear", x, w, None, name="lm_head")])
    backend = get_backend("tvm")
    lowered = conftest.lower_into(backend, g, "cpu", tmp_path)
    assert not lowered.fallbacks
    params = lowered.entry["params"]
    assert not any(p.get("decode") or "decoded" in p["key"] for p in params)
    assert sum("embed.weight" in p["key"] for p in params) == len(table.tensors())
    runner = backend.load(tmp_path, lowered.entry)
    for batch in (torch.tensor([[0, 5, 69, 33]]), torch.tensor([[7], [1]])):
        for got, want in zip(runner(batch), run_graph(g, [batch])):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,group", [("int8", None), ("mxfp8", None)])
def test_an_int32_token_id_gathers_the_same_rows(tmp_path, spec, group):
    """Token ids of int32 (an ONNX model's, a fuzzer's) index the gather kernels, which take int64."""
    from nnforge.passes.quantize.formats import parse_format, quantize_rtn
    table = quantize_rtn(_randn(6, 32, seed=5), parse_format(spec, group_size=group))
    g = Graph("ids32")
    ids = g.add_input("ids", tensor("i32", 3))
    g.set_outputs([g.op("embedding", ids, g.add_weight("emb.weight", table), name="emb")])
    backend = get_backend("tvm")
    lowered = conftest.lower_into(backend, g, "cpu", tmp_path)
    assert not lowered.fallbacks
    batch = torch.tensor([5, 0, 2], dtype=torch.int32)
    torch.testing.assert_close(backend.load(tmp_path, lowered.entry)(batch), run_graph(g, [batch])[0])

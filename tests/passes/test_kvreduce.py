"""The kv_reduce pass on a tiny Llama: cache writes and attention's mask read the new ``slots``
input, rotary embeddings keep reading ``positions``, each attention's queries become an output,
and budgets the graph cannot take are refused by name."""
from __future__ import annotations

import pytest

from nnforge.frontend.decoders import build, load_causal_lm, spec_from_config
from nnforge.passes import PassContext, PassError, PassManager, resolve_recipe
from nnforge.passes.kvcache import EncodeKVCache
from nnforge.passes.kvreduce import ReduceKVCache, reduction_record
from tests.frontend.decoders.families import tiny_model

MAX_LEN = 32


def graph_of(name: str):
    loaded = load_causal_lm(tiny_model(name))
    return build(spec_from_config(loaded.config, max_len=MAX_LEN), loaded.weights, MAX_LEN)


@pytest.fixture(scope="module")
def llama():
    return graph_of("llama")


def test_slots_feed_cache_writes_and_masks_while_rope_keeps_positions(llama):
    p = ReduceKVCache(method="evict", budget=8)
    g = PassManager([p]).run(llama, PassContext())
    names = [v.name for v in g.inputs]
    assert names[-1] == "slots" and names[:-1] == [v.name for v in llama.inputs]
    assert [v.name for v in g.outputs] == [v.name for v in llama.outputs] + ["attention.0.q", "attention.1.q"]
    reads = {n.op: {v.name for v in n.inputs if v.name in ("slots", "positions")} for n in g.nodes
             if n.op in ("cache_update", "attention", "rope")}
    assert reads == {"cache_update": {"slots"}, "attention": {"slots"}, "rope": {"positions"}}
    assert all(n.inputs[0].name.startswith("attention.") for n in g.nodes if n.op == "attention")
    record = reduction_record(g, [p])
    assert record["budget"] == 8 and record["recent"] == 4 and record["max_positions"] is None
    assert record["score"] == "peak"
    assert [(x["k"], x["v"], x["q"]) for x in record["layers"]] == [
        ("cache.0.k", "cache.0.v", "attention.0.q"), ("cache.1.k", "cache.1.v", "attention.1.q")]


def test_a_byte_budget_is_converted_with_the_state_bytes_per_token(llama):
    per_token = 2 * 2 * 2 * 16 * 4               # layers x (K, V) x kv heads x head dim x float32
    g = PassManager([ReduceKVCache(budget_bytes=10 * per_token + 5)]).run(llama, PassContext())
    assert reduction_record(g, [ReduceKVCache(budget_bytes=10 * per_token + 5)])["budget"] == 10


@pytest.mark.parametrize("options,message", [
    (dict(budget=MAX_LEN), "leaves no room for new tokens"),
    (dict(budget=8, recent=8), "must be below the budget"),
    (dict(budget=1), "at least 2"),
    (dict(), "exactly one"),
    (dict(budget=8, budget_bytes=100), "exactly one"),
    (dict(budget=8, method="drop"), "unknown method"),
    (dict(budget=8, threshold=2.0), "in \\[-1, 1\\]"),
    (dict(budget=8, score="mean"), "unknown score 'mean'; choose from peak, sum"),
    (dict(budget_bytes=600), "holds 1 token"),
])
def test_bad_budgets_are_refused(llama, options, message):
    with pytest.raises(PassError, match=message):
        PassManager([ReduceKVCache(**options)]).run(llama, PassContext())


def test_a_budget_below_a_sliding_window_is_refused_naming_the_layer():
    with pytest.raises(PassError, match="layer 0 attends over a sliding window of 16 tokens"):
        PassManager([ReduceKVCache(budget=8)]).run(graph_of("mistral"), PassContext())


def test_an_encoded_cache_is_refused_either_way(llama):
    with pytest.raises(PassError, match="encoded KV cache"):
        PassManager([EncodeKVCache(encoding="kv8"), ReduceKVCache(budget=8)]).run(llama, PassContext())
    with pytest.raises(PassError, match="token reduction"):
        PassManager([ReduceKVCache(budget=8), EncodeKVCache(encoding="kv8")]).run(llama, PassContext())


def test_presets_name_the_budget_and_go_after_weight_presets():
    _, passes = resolve_recipe("kv-evict-256")
    assert [(p.name, p.method, p.budget) for p in passes] == [("kv_reduce", "evict", 256)]
    _, passes = resolve_recipe("w8+kv-merge-64")
    assert [p.name for p in passes][-1] == "kv_reduce" and passes[-1].method == "merge"
    with pytest.raises(PassError, match="goes after the weight presets"):
        resolve_recipe("kv-evict-64+w8")

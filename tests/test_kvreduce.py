"""Token reduction in the runner (nnforge/kvreduce.py) on a tiny Llama run by the reference
interpreter through a DecoderRunner, as Bundle.load gives it: a budget that holds the sequence
changes nothing, a small one holds the cache within it while generation runs past max_len,
eviction keeps the recent window with the rotation each key was written with, and merging
merges identical keys into exactly that key."""
from __future__ import annotations

import math

import pytest
import torch

from nnforge.frontend.decoders import build, load_causal_lm, spec_from_config
from nnforge.generation import Decoder, DecoderRunner, GenerationError
from nnforge.ir import Interpreter
from nnforge.kvreduce import CacheReducer, Reduction, ReductionError, attention_mass
from nnforge.passes import PassContext, PassManager
from nnforge.passes.kvreduce import ReduceKVCache, reduction_record
from tests.frontend.decoders.families import tiny_model

MAX_LEN = 24


@pytest.fixture(scope="module")
def loaded():
    return load_causal_lm(tiny_model("llama"))


def graph_of(loaded, max_len: int = MAX_LEN):
    return build(spec_from_config(loaded.config, max_len=max_len), loaded.weights, max_len)


def runner_of(graph, passes=()) -> DecoderRunner:
    """What Bundle.load returns for the graph: the backend's runner (here the interpreter) in a
    DecoderRunner over the manifest's decoder section."""
    if passes:
        graph = PassManager(list(passes)).run(graph, PassContext())
    interp, inputs = Interpreter(graph), {v.name: v for v in graph.inputs}
    section = {"max_len": graph.inputs[2].shape[2],
               "state": [{"input": i, "output": o, "shape": list(inputs[i].shape), "dtype": inputs[i].dtype.name}
                         for i, o in graph.state_pairs()]}
    record = reduction_record(graph, passes)
    if record:
        section["kv_reduce"] = record
    return DecoderRunner(lambda *xs: interp.run(*xs), section, list(inputs), [v.name for v in graph.outputs])


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 120, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["evict", "merge"])
def test_a_budget_that_holds_the_sequence_changes_nothing(loaded, method):
    g, tokens = graph_of(loaded), ids(16)
    # a step's tokens fit beside a full budget: the reduced decoder runs the prompt 4 at a time
    plain = runner_of(g).decoder(resident=False, prefill_chunk=4)
    reduced = runner_of(g, [ReduceKVCache(method=method, budget=MAX_LEN - 4)]).decoder()
    want = torch.cat([plain.prefill(tokens[:, :12]), plain.extend(tokens[:, 12:])], dim=1)
    got = torch.cat([reduced.prefill(tokens[:, :12]), reduced.extend(tokens[:, 12:])], dim=1)
    assert torch.equal(got, want) and reduced.tokens_held == 16


@pytest.mark.parametrize("method", ["evict", "merge"])
def test_a_small_budget_holds_the_cache_within_it_past_max_len(loaded, method):
    budget = 6
    d = runner_of(graph_of(loaded), [ReduceKVCache(method=method, budget=budget, recent=2)]).decoder()
    logits = d.prefill(ids(10))
    for _ in range(2 * MAX_LEN):
        logits = d.step(logits[:, -1].argmax(-1))[:, None]
        assert d.tokens_held <= budget and torch.isfinite(logits).all()
        for name, cache in d.cache.items():
            assert not cache[:, :, budget:].any(), f"{name} holds tokens past the budget"
    assert d.position == 10 + 2 * MAX_LEN > MAX_LEN


def test_bundle_runner_generates_past_max_len_with_a_budget(loaded):
    lm = runner_of(graph_of(loaded), [ReduceKVCache(method="evict", budget=8)])
    result = lm.generate(ids(12)[0], MAX_LEN)
    assert len(result.tokens) == MAX_LEN
    with pytest.raises(GenerationError, match="max_len 24"):
        runner_of(graph_of(loaded)).generate(ids(12)[0], MAX_LEN)


def test_eviction_keeps_the_recent_window_with_its_rotation(loaded):
    """A first layer's keys depend only on each token and its position, so they can be checked
    against a run without reduction: the recent window is the last tokens', in order, and every
    kept key is one that run wrote (its rotation unchanged)."""
    budget, recent, tokens = 8, 3, ids(30, seed=1)
    d = runner_of(graph_of(loaded), [ReduceKVCache(method="evict", budget=budget, recent=recent)]).decoder()
    d.prefill(tokens[:, :10])
    for j in range(10, 30):
        d.extend(tokens[:, j:j + 1])
    full = runner_of(graph_of(loaded, 32)).decoder(resident=False)
    full.prefill(tokens[:, :10])              # cut into steps as above: the same products, bit for bit
    for j in range(10, 30):
        full.extend(tokens[:, j:j + 1])
    kept, every = d.cache["cache.0.k"][0], full.cache["cache.0.k"][0][:, :30]
    assert torch.equal(kept[:, budget - recent:budget], every[:, 30 - recent:])
    for head in range(kept.shape[0]):
        for row in kept[head, :budget]:
            assert (every[head] == row).all(-1).any()


def reduction(method: str, budget: int = 3, recent: int = 1, threshold: float = 0.9, score: str = "sum") -> Reduction:
    layer = {"layer": 0, "k": "cache.0.k", "v": "cache.0.v", "q": "attention.0.q", "scale": 1.0, "softcap": 0.0,
             "window": 0}
    return Reduction(method=method, budget=budget, recent=recent, threshold=threshold, layers=(layer,), score=score)


@pytest.mark.parametrize("score, kept", [("peak", [0, 2, 3]), ("sum", [0, 1, 3])])
def test_eviction_ranks_older_tokens_by_their_peak_or_their_summed_attention(score, kept):
    """Three tokens attended evenly by the queries that see them, then one query that gives
    token 2 a weight of 0.56: token 1 keeps the larger sum (0.5 + 1/3 + 0.15), token 2 the larger
    peak, and a budget of 3 (one recent) keeps one of them."""
    keys = torch.eye(4)[None, None]
    cache = {"cache.0.k": keys, "cache.0.v": keys.clone()}
    reducer = CacheReducer(reduction("evict", budget=3, recent=1, score=score))
    cache = reducer.after_step(cache, {"attention.0.q": torch.zeros(1, 1, 3, 4)}, torch.arange(3)[None])
    c = math.log(0.56 * 3 / 0.44)                        # softmax weight 0.56 on slot 2, 0.44 / 3 elsewhere
    q = torch.tensor([0.0, 0.0, c, 0.0]).reshape(1, 1, 1, 4)
    out = reducer.after_step(cache, {"attention.0.q": q}, torch.tensor([[3]]))
    assert torch.equal(out["cache.0.k"][0, 0, :3], torch.eye(4)[kept])
    peaks = {0: 1.0, 1: 0.5, 2: 0.56}                     # the statistics move with their tokens
    assert reducer.stats["cache.0.k"]["peak"][0, 0, :2].tolist() == pytest.approx([peaks[t] for t in kept[:2]])


def test_merging_merges_identical_keys_into_exactly_that_key():
    a, b = torch.tensor([0.3, -1.7, 2.9, 0.1]), torch.tensor([1.0, 0.5, -0.25, 4.0])
    keys = torch.stack([a, a, b, -b, a])[None, None]                     # [1, 1, 5, 4]
    values = torch.arange(20.0).reshape(1, 1, 5, 4)
    cache = {"cache.0.k": torch.cat([keys, torch.zeros(1, 1, 3, 4)], 2),
             "cache.0.v": torch.cat([values, torch.zeros(1, 1, 3, 4)], 2)}
    reducer = CacheReducer(reduction("merge", budget=4))
    q = torch.zeros(1, 1, 5, 4)                           # query j spreads its attention over slots 0..j
    out = reducer.after_step(cache, {"attention.0.q": q}, torch.arange(5)[None])
    k, v = out["cache.0.k"][0, 0], out["cache.0.v"][0, 0]
    assert torch.equal(k[:4], torch.stack([a, b, -b, a])) and not k[4:].any()
    m0, m1 = sum(1 / j for j in range(1, 6)), sum(1 / j for j in range(2, 6))
    assert torch.allclose(v[0], (m0 * values[0, 0, 0] + m1 * values[0, 0, 1]) / (m0 + m1))
    assert torch.equal(v[1:4], values[0, 0, 2:])
    assert reducer.stats["cache.0.k"]["tokens"][0, 0, :4].tolist() == [2, 1, 1, 1] and reducer.count == 4


def test_merging_below_the_threshold_evicts_the_least_attended_instead():
    keys = torch.eye(4)[None, None]                                  # no two alike
    cache = {"cache.0.k": keys, "cache.0.v": keys.clone()}
    reducer = CacheReducer(reduction("merge", budget=3, recent=1))
    cache = reducer.after_step(cache, {"attention.0.q": torch.zeros(1, 1, 3, 4)}, torch.arange(3)[None])
    # the fourth token looks at slot 2 only: slot 1 is left with the least attention
    q = torch.tensor([0.0, 0.0, 30.0, 0.0]).reshape(1, 1, 1, 4)
    out = reducer.after_step(cache, {"attention.0.q": q}, torch.tensor([[3]]))
    assert torch.equal(out["cache.0.k"][0, 0, :3], torch.eye(4)[[0, 2, 3]])


def test_attention_mass_sums_each_query_over_the_slots_it_sees():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)
    mass = attention_mass(q, k, torch.tensor([[5, 6, 7]]), 8, {"scale": 0.3, "softcap": 0.0, "window": 2})
    assert mass.shape == (1, 2, 8) and torch.allclose(mass.sum(), torch.tensor(4.0 * 3))
    assert not mass[..., :4].any()                 # out of every query's window of 2


def test_a_reduction_refuses_a_resident_cache_a_recompute_and_an_incomplete_section():
    r = reduction("evict")
    with pytest.raises(GenerationError, match="resident=False"):
        Decoder(lambda x: x, [], lambda b: [b], 8, resident=object(), reduction=r)
    with pytest.raises(GenerationError, match="recompute_at"):
        Decoder(lambda x: x, [], lambda b: [b], 8, recompute_at=4, reduction=r)
    with pytest.raises(ReductionError, match="kv-evict"):
        Reduction.from_section({"method": "evict", "budget": 8})
    with pytest.raises(ReductionError, match="1 <= recent < budget"):
        Reduction.from_section({"method": "evict", "budget": 8, "recent": 8, "threshold": 0.5, "layers": []})
    with pytest.raises(ReductionError, match="score 'mean': give one of peak, sum"):
        Reduction.from_section({"method": "evict", "budget": 8, "recent": 4, "threshold": 0.5, "layers": [],
                                "score": "mean"})
    # a bundle compiled before the score was recorded goes on ranking by accumulated attention
    assert Reduction.from_section({"method": "evict", "budget": 8, "recent": 4, "threshold": 0.5,
                                   "layers": []}).score == "sum"

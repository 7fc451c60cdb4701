"""The kv_cache pass on a tiny Llama: the float caches become encoded state chosen per cache, the
rest of the signature stays, and the graph generates on the reference interpreter (prefill, then
decode steps) close to the float cache's logits."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from nnforge.frontend.decoders import build, load_causal_lm, spec_from_config
from nnforge.generation import Decoder
from nnforge.ir import GraphError, Interpreter
from nnforge.passes import Pass, PassContext, PassError, PassManager
from nnforge.passes.kvcache import EncodeKVCache
from tests.frontend.decoders.families import VOCAB, tiny_model

MAX_LEN = 32


@pytest.fixture(scope="module")
def llama():
    loaded = load_causal_lm(tiny_model("llama"))
    return build(spec_from_config(loaded.config, max_len=MAX_LEN), loaded.weights, MAX_LEN)


def encoded(graph, **options):
    pm = PassManager([EncodeKVCache(**options)])
    return pm.run(graph, PassContext()), pm.records[0]


def decoder(graph) -> Decoder:
    interp, names = Interpreter(graph), [v.name for v in graph.outputs]
    state = {v.name: v for v in graph.inputs}
    pairs = graph.state_pairs()
    return Decoder(lambda inputs: dict(zip(names, interp.run(inputs))), pairs,
                   {i: list(state[i].shape) for i, _ in pairs}, MAX_LEN,
                   dtypes={i: state[i].dtype.torch_dtype for i, _ in pairs})


def run(graph, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits of a prefill of ``prompt`` then ``steps`` greedy decode steps, stacked [1, n, vocab]."""
    d = decoder(graph)
    out = [d.prefill(prompt[None])]
    for _ in range(steps):
        out.append(d.step(out[-1][:, -1].argmax(-1))[:, None])
    return torch.cat(out, dim=1)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_caches_become_encoded_state_and_the_rest_of_the_signature_stays(llama):
    g, record = encoded(llama, encoding="kv4", group_size=4, residual=4)
    assert [v.name for v in g.inputs][:6] == ["input_ids", "positions", "cache.0.k.codes", "cache.0.k.scale",
                                              "cache.0.k.min", "cache.0.k.window"]
    assert g.outputs[0].name == "logits" and len(g.state_pairs()) == 4 * 4
    assert {n.op for n in g.nodes} >= {"kv_cache_write", "kv_cache_read"} and "cache_update" not in {
        n.op for n in g.nodes}
    assert record.figures == {"caches": 4, "encodings": {"kv4 k": 2, "kv4 v": 2}}


def test_gear_takes_its_options_and_its_state_has_the_factors(llama):
    g, record = encoded(llama, encoding="kv-gear4", group_size=4, residual=4, rank=3, outliers=1)
    assert [v.name for v in g.inputs][2:10] == [f"cache.0.k.{p}" for p in ("codes", "scale", "min", "window", "outlier",
                                                                           "outlier_index", "a", "b")]
    write = next(n for n in g.nodes if n.op == "kv_cache_write")
    assert (write.attrs["group"], write.attrs["residual"], write.attrs["rank"], write.attrs["outliers"]) == (4, 4, 3, 1)
    assert record.figures["encodings"] == {"kv-gear4 k": 2, "kv-gear4 v": 2}


@pytest.mark.parametrize("options,message", [
    (dict(encoding="kv-nvfp4"), "kv-nvfp4 scales blocks of 16 head_dim values, and the head dim is 24"),
    (dict(encoding="kv8", group_size=16), "kv8 scales groups of 16 channels, and the head dim 24 is not a multiple "
                                          "of 16; give the kv_cache pass group_size=12"),
])
def test_a_head_dim_an_encoding_cannot_hold_is_refused_naming_the_cache(options, message):
    loaded = load_causal_lm(tiny_model("mistral", head_dim=24))
    graph = build(spec_from_config(loaded.config, max_len=MAX_LEN), loaded.weights, MAX_LEN)
    with pytest.raises(PassError, match="kv_cache: cache cache.0.k \\(node model.layers.0.self_attn.k_cache\\): "
                                        + message):
        encoded(graph, **options)


def test_group_size_sets_kv8s_channels_per_scale(llama):
    # the tiny Llama's head dim is 16: the default group (64) takes the whole head, 4 makes 4 scales
    for options, scales in ((dict(), 1), (dict(group_size=4), 4)):
        g, _ = encoded(llama, encoding="kv8", **options)
        write = next(n for n in g.nodes if n.op == "kv_cache_write")
        assert write.attrs["group"] == options.get("group_size", 64)
        assert next(v for v in g.inputs if v.name == "cache.0.k.scale").shape[-1] == scales


def test_layers_and_exclude_select_caches(llama):
    g, _ = encoded(llama, encoding="kv8", exclude=["model.layers.0.*"])
    names = [v.name for v in g.inputs]
    assert "cache.0.k" in names and "cache.0.v" in names and "cache.1.k.codes" in names
    g, _ = encoded(llama, encoding="kv8", layers=["cache.1.v"])
    assert [i for i, _ in g.state_pairs()] == ["cache.0.k", "cache.0.v", "cache.1.k", "cache.1.v.codes",
                                               "cache.1.v.scale"]


@pytest.mark.parametrize("options,message", [
    (dict(layers=["cache.9.*"]), "layers pattern 'cache.9.\\*' matches no KV cache .* model.layers.0.self_attn.k_cache "
                                 "\\(cache.0.k\\)"),
    (dict(exclude=["*"]), "selects no KV cache"),
    (dict(encoding="kv3"), "unknown encoding 'kv3'; choose from kv8, kv-fp8, kv4"),
    (dict(encoding="kv-fp8", group_size=8), "kv-fp8 takes no option"),
    (dict(encoding="kv8", group_size=0), "kv8 group must be a positive number of channels"),
    (dict(encoding="kv-gear4", rank=0), "kv-gear4 rank must be a positive number"),
])
def test_bad_options_name_what_to_fix(llama, options, message):
    with pytest.raises(PassError, match=message):
        encoded(llama, **{"encoding": "kv8", **options})


def test_a_graph_without_a_kv_cache_is_refused():
    from tests.passes.graphs import mlp_graph
    with pytest.raises(PassError, match="has no KV cache.*decoder LMs only"):
        encoded(mlp_graph(), encoding="kv8")


def test_kv8_generates_close_to_the_float_cache(llama):
    prompt = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(0))
    want = run(llama, prompt, 6)
    for group in (64, 4):
        got = run(encoded(llama, encoding="kv8", group_size=group)[0], prompt, 6)
        assert got.shape == (1, 18, VOCAB)
        assert cosine(got, want) > 0.9999


@pytest.mark.parametrize("encoding,options,floor", [("kv-fp8", {}, 0.999),
                                                    ("kv4", dict(group_size=4, residual=4), 0.99),
                                                    ("kv-nvfp4", {}, 0.99),
                                                    ("kv-gear4", dict(group_size=4, residual=4), 0.99),
                                                    ("kv-f16", {}, 0.9999)])
def test_prompts_longer_than_the_window_then_decode_steps(llama, encoding, options, floor):
    prompt = torch.randint(0, VOCAB, (13,), generator=torch.Generator().manual_seed(1))
    g = encoded(llama, encoding=encoding, **options)[0]
    d = decoder(g)
    d.prefill(prompt[None])
    for t in range(7):                       # across two more kv4 groups
        d.step(torch.tensor([t]))
    cache = d.cache
    assert {str(cache[i].dtype) for i in cache} <= {"torch.int8", "torch.uint8", "torch.float16", "torch.float32"}
    assert cosine(run(g, prompt, 7), run(llama, prompt, 7)) > floor


def test_the_pass_manager_holds_a_state_pass_to_the_rest_of_the_signature(llama):
    @dataclasses.dataclass
    class RenamesIds(Pass):
        name = "renames_ids"
        rewrites_state = True

        def run(self, graph, ctx):
            graph.rename(graph.inputs[0], "tokens")
            return graph

    with pytest.raises(GraphError, match="pass renames_ids changed inputs or outputs that are not the graph's state"):
        PassManager([RenamesIds()]).run(llama, PassContext())


def test_the_runtime_check_compares_gear_factors_through_the_dequantised_values(llama):
    from nnforge.ir.kvcache import cache_encoding
    from nnforge.passes.kvcache import compared_outputs
    g, _ = encoded(llama, encoding="kv-gear4", group_size=4, residual=4, layers=["cache.1.k"])
    d = decoder(g)
    names = [v.name for v in g.outputs]
    d.prefill(torch.randint(0, VOCAB, (13,), generator=torch.Generator().manual_seed(2))[None])
    outputs = [torch.ones(1)] * len(names)
    for i, name in enumerate(names):
        if name.startswith("cache.1.k."):
            outputs[i] = d.cache[name.removesuffix(".next")]
    compared = compared_outputs(g, outputs)
    at = names.index("cache.1.k.a.next")
    assert len(compared) == len(names) - 1 and names[at + 1] == "cache.1.k.b.next"
    enc = cache_encoding("kv-gear4", "k", group=4, residual=4)
    state = [d.cache[n.removesuffix(".next")] for n in names if n.startswith("cache.1.k.")]
    assert torch.equal(compared[at], enc.dequantized(state, 16)) and compared[at][..., :12, :].abs().sum() > 0

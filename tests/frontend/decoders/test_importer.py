"""The manifest's decoder section follows the compiled graph: its state (names, shapes, dtypes) and
its KV cache's encodings and real bytes per token."""
from __future__ import annotations

import pytest

from nnforge.frontend.decoders.importer import import_decoder
from nnforge.passes import PassContext, PassManager
from nnforge.passes.kvcache import EncodeKVCache
from nnforge.passes.kvreduce import ReduceKVCache, reduction_record
from tests.frontend.decoders.families import tiny_model

MAX_LEN = 16
FLOAT32 = 2 * 2 * 16 * 4 * 2        # layers x (K, V) x kv_heads 2 x head_dim 16 x 4 bytes


@pytest.fixture(scope="module")
def llama():
    return import_decoder(tiny_model("llama"), max_len=MAX_LEN)


def test_a_float_cache_is_recorded_as_float32(llama):
    kv = llama.manifest_section()["kv_cache"]
    assert kv["caches"]["cache.0.k"] == {"node": "model.layers.0.self_attn.k_cache", "encoding": "float32"}
    assert kv["bytes_per_token"] == kv["float32_bytes_per_token"] == kv["bytes_per_token_past_fixed"] == FLOAT32
    assert kv["fixed_bytes"] == 0


def test_encoded_caches_record_encoding_state_and_bytes_per_token(llama):
    graph = PassManager([EncodeKVCache(encoding="kv8", exclude=["cache.1.*"])]).run(llama.graph, PassContext())
    section = llama.manifest_section(graph)
    state = {s["input"]: s for s in section["state"]}
    assert state["cache.0.k.codes"] == {"input": "cache.0.k.codes", "output": "cache.0.k.codes.next",
                                        "shape": ["batch", 2, MAX_LEN, 16], "dtype": "int8"}
    assert state["cache.0.v.scale"]["dtype"] == "float16" and state["cache.1.k"]["dtype"] == "float32"
    kv = section["kv_cache"]
    assert kv["caches"]["cache.0.v"] == {"node": "model.layers.0.self_attn.v_cache", "encoding": "kv8", "group": 64}
    assert kv["caches"]["cache.1.v"]["encoding"] == "float32"
    assert kv["bytes_per_token"] == 2 * 2 * (16 + 2) + FLOAT32 / 2 and kv["float32_bytes_per_token"] == FLOAT32


def test_kv8_bytes_count_a_scale_per_group_of_channels(llama):
    graph = PassManager([EncodeKVCache(encoding="kv8", group_size=4)]).run(llama.graph, PassContext())
    kv = llama.manifest_section(graph)["kv_cache"]
    assert kv["caches"]["cache.1.k"]["group"] == 4
    # layers x (K, V) x kv_heads x (16 int8 codes + 16 / 4 float16 scales)
    assert kv["bytes_per_token"] == kv["bytes_per_token_past_fixed"] == 2 * 2 * 2 * (16 + 16 // 4 * 2)


def test_kv4_bytes_count_scales_and_the_window(llama):
    graph = PassManager([EncodeKVCache(encoding="kv4", group_size=4, residual=4)]).run(llama.graph, PassContext())
    kv = llama.manifest_section(graph)["kv_cache"]
    assert kv["caches"]["cache.1.k"] == {"node": "model.layers.1.self_attn.k_cache", "encoding": "kv4",
                                         "group": 4, "residual": 4}
    k = 2 * (MAX_LEN * 8 + 2 * 4 * 16 * 2 + 7 * 16 * 4)       # codes, scale and min per group, window
    v = 2 * (MAX_LEN * 8 + 2 * MAX_LEN * 2 + 7 * 16 * 4)
    assert kv["bytes_per_token"] == 2 * (k + v) / MAX_LEN
    window = 2 * 2 * 2 * 7 * 16 * 4                           # layers, K and V, kv heads, window rows x head dim
    assert kv["fixed_bytes"] == window
    assert kv["bytes_per_token_past_fixed"] == (2 * (k + v) - window) / MAX_LEN


def test_token_reduction_settings_are_recorded_for_the_runner(llama):
    p = ReduceKVCache(method="merge", budget=8, recent=2)
    graph = PassManager([p]).run(llama.graph, PassContext())
    section = llama.manifest_section(graph, reduction_record(graph, [p]))
    assert {k: section["kv_reduce"][k] for k in ("method", "budget", "recent", "slots")} == {
        "method": "merge", "budget": 8, "recent": 2, "slots": "slots"}
    assert "kv_reduce" not in llama.manifest_section()

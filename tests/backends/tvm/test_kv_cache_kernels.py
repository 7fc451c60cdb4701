"""The tvm backend runs the encoded KV caches (kv8, kv-fp8, kv4, kv-nvfp4, kv-gear4, kv-f16) natively
(kernels/kvcache.py, kvcache_attention.py; kv-f16's attention: the float kernel on float16 rows):
the state written in place equal to the reference interpreter's bit for bit (kv-gear4's low-rank
factors included), attention on the stored codes close to the interpreter's attention on the
dequantised cache, step by step across kv4's group boundaries, with grouped-query heads, a sliding
window and softcapping; an encoded K beside a float V read through the dequantising kernel."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from nnforge.backends.base import BackendError, get_backend  # noqa: E402
from nnforge.backends.tvm.capabilities import CAPABILITIES, KV_CACHE  # noqa: E402
from nnforge.backends.tvm.kernels.kvcache_attention import head_block  # noqa: E402
from nnforge.backends.tvm.ops_kvcache import FUSED  # noqa: E402
from nnforge.ir import Graph, Interpreter, tensor  # noqa: E402
from nnforge.ir.kvcache import CACHE_ENCODINGS, cache_encoding  # noqa: E402
from nnforge.targets import get_target  # noqa: E402
from tests import conftest  # noqa: E402
from tests.backends.onnx.test_kv_cache_encodings import ENCODINGS as ALL_ENCODINGS  # noqa: E402
from tests.backends.onnx.test_kv_cache_encodings import HEAD_DIM, cache_graph, hard_values  # noqa: E402

CPU_KINDS = ("kv8", "kv-fp8", "kv4", "kv-nvfp4", "kv-gear4", "kv-f16")
# kv8 in groups of 8 channels besides 4: whole vectors of 8 lanes a group
ENCODINGS = [(kind, options) for kind, options in ALL_ENCODINGS if kind in CPU_KINDS] + [("kv8", {"group": 8})]

B, H, KVH, L, D = 2, 4, 2, 24, 16       # D: kv-nvfp4's block
STEPS = [7, 1, 1, 4, 1, 6, 1]          # past several kv4 groups and the window


def attention_graph(kind: str, window: int = 0, softcap: float = 0.0, heads: int = H, **options) -> Graph:
    """New keys and values written into encoded K and V caches, attention on their reads."""
    g = Graph("kv_attention")
    q = g.add_input("q", tensor("f32", "batch", heads, "seq", D))
    pos = g.add_input("positions", tensor("i64", "batch", "seq"))
    reads, outputs = [], []
    for role in "kv":
        new = g.add_input(f"{role}", tensor("f32", "batch", KVH, "seq", D))
        enc = cache_encoding(kind, role, **options)
        attrs = {"encoding": kind, "role": role, "max_len": L, "head_dim": D, **enc.attrs()}
        state = [g.add_input(f"cache.{role}.{p.name}", tensor(p.dtype, "batch", KVH, p.rows, p.cols))
                 for p in enc.parts(L, D)]
        write = g.add_node("kv_cache_write", [new, pos, *state], attrs, name=f"layer.{role}_cache.write",
                           output_names=[f"{v.name}.next" for v in state])
        reads.append(g.op("kv_cache_read", pos, *write.outputs, **attrs, name=f"layer.{role}_cache.read"))
        outputs += write.outputs
    g.set_outputs([g.op("attention", q, *reads, pos, scale=D ** -0.5, window=window, softcap=softcap,
                        name="layer.attn"), *outputs])
    return g


def _lower(graph, path, seq=7):
    backend = get_backend("tvm")
    shapes = {v.name: [B if d == "batch" else seq if d == "seq" else d for d in v.shape] for v in graph.inputs}
    lowered = conftest.lower_into(backend, graph, "cpu", path, shapes=shapes)
    assert not lowered.fallbacks
    return backend.load(path, lowered.entry), (path / "model.so").read_bytes()


def _check_state(step, names, got, want):
    for name, a, w in zip(names, got, want):
        w = w.to(torch.as_tensor(a).dtype)
        assert torch.equal(torch.as_tensor(a), w), f"step {step}: {name} differs"


@pytest.mark.parametrize("role", ["k", "v"])
@pytest.mark.parametrize("kind, options", ENCODINGS, ids=lambda x: x if isinstance(x, str) else str(x))
def test_the_written_state_equals_the_interpreters_bit_for_bit(tmp_path, kind, options, role):
    """kv_cache_write in place, and a read that is a graph output (so not fused: the dequantising
    kernel), on the values rounding must get right (zeros, -0.0, saturating scales, ties)."""
    graph = cache_graph(kind, role, **options)
    enc = cache_encoding(kind, role, **options)
    runner, library = _lower(graph, tmp_path)
    assert f"nf_{kind.replace('-', '_')}_read".encode() in library
    interpreter = Interpreter(graph)
    state = [t.numpy() for t in enc.zeros(2, 2, 24, HEAD_DIM)]
    start = 0
    for step, seq in enumerate(STEPS):
        x = hard_values(2, seq, seed=step)
        positions = torch.arange(start, start + seq).repeat(2, 1)
        got = runner(x.numpy(), positions.numpy(), *state)
        want = interpreter.run(x, positions, *[torch.from_numpy(s) for s in state])
        _check_state(step, [p.name for p in enc.parts(24, HEAD_DIM)], got[1:], want[1:])
        torch.testing.assert_close(torch.as_tensor(got[0]), want[0], rtol=1e-6, atol=0)
        state = list(got[1:])
        start += seq


# Every encoding with a window, a softcap and 8 threads over 16 heads; the plain form (no window, one
# thread, the graph's heads) for kv8 and kv4 in the default run and for the rest under -m slow.
PLAIN, WINDOWED = (0, 0.0, H, 1), (5, 20.0, 16, 8)
ATTENTION_CASES = [pytest.param(kind, options, *config, id=f"{kind}-{options}-{config[0]}-{config[1]}-{config[2]}-"
                                f"{config[3]}", marks=pytest.mark.slow if config == PLAIN and kind not in ("kv8", "kv4")
                                else ())
                   for config in (PLAIN, WINDOWED) for kind, options in ENCODINGS]


@pytest.mark.parametrize("kind, options, window, softcap, heads, threads", ATTENTION_CASES)
def test_attention_reads_the_stored_encoding(tmp_path, monkeypatch, kind, options, window, softcap, heads, threads):
    """One kernel reads the codes (no dequantised cache is made; kv-gear4, which has no fused
    kernel: its reads dequantised for the float kernel), prefill then decode steps, the state fed
    back from the runner's outputs; 4 heads on 2 kv heads in whole groups of 2, 16 in blocks of 2
    (for 8 threads: kvcache_attention.head_block)."""
    from nnforge.backends.tvm import threads as pool
    monkeypatch.setattr(pool, "most", lambda: threads)
    graph = attention_graph(kind, window, softcap, heads, **options)
    runner, library = _lower(graph, tmp_path)
    if kind in FUSED:
        assert f"nf_{kind.replace('-', '_')}_attention".encode() in library
        assert b"_read_" not in library and b"nf_attention" not in library
    else:
        assert f"nf_{kind.replace('-', '_')}_read".encode() in library and b"nf_attention" in library
    interpreter = Interpreter(graph)
    names = [v.name for v in graph.outputs[1:]]
    state = [torch.zeros(B, *v.shape[1:], dtype=v.dtype.torch_dtype).numpy()
             for v in graph.inputs if v.name.startswith("cache.")]
    start = 0
    for step, seq in enumerate(STEPS):
        gen = torch.Generator().manual_seed(step)
        q, k, v = (torch.randn(B, n, seq, D, generator=gen) for n in (heads, KVH, KVH))
        positions = torch.arange(start, start + seq).repeat(B, 1)
        k_state, v_state = state[:len(state) // 2], state[len(state) // 2:]
        got = runner(q.numpy(), positions.numpy(), k.numpy(), *k_state, v.numpy(), *v_state)
        want = interpreter.run(q, positions, k, *map(torch.from_numpy, k_state), v, *map(torch.from_numpy, v_state))
        torch.testing.assert_close(torch.as_tensor(got[0]), want[0], rtol=1e-4, atol=1e-5)
        _check_state(step, names, got[1:], want[1:])
        state = list(got[1:])
        start += seq


def test_an_encoded_k_beside_a_float_v_is_dequantised_for_the_float_kernel(tmp_path):
    """kv4 keys, a float V cache updated in place: the K read runs the dequantising kernel and
    attention the float kernel, equal to the interpreter over the steps."""
    g = Graph("k_only")
    q = g.add_input("q", tensor("f32", "batch", H, "seq", D))
    pos = g.add_input("positions", tensor("i64", "batch", "seq"))
    k = g.add_input("k", tensor("f32", "batch", KVH, "seq", D))
    enc = cache_encoding("kv4", "k", group=4, residual=3)
    attrs = {"encoding": "kv4", "role": "k", "max_len": L, "head_dim": D, **enc.attrs()}
    state = [g.add_input(f"cache.k.{p.name}", tensor(p.dtype, "batch", KVH, p.rows, p.cols)) for p in enc.parts(L, D)]
    write = g.add_node("kv_cache_write", [k, pos, *state], attrs, name="layer.k_cache.write",
                       output_names=[f"{v.name}.next" for v in state])
    v = g.add_input("v", tensor("f32", "batch", KVH, "seq", D))
    v_cache = g.op("cache_update", g.add_input("cache.v", tensor("f32", "batch", KVH, L, D)), v, pos)
    read = g.op("kv_cache_read", pos, *write.outputs, **attrs, name="layer.k_cache.read")
    g.set_outputs([g.op("attention", q, read, v_cache, pos, scale=D ** -0.5, name="layer.attn"), *write.outputs,
                   v_cache])
    runner, library = _lower(g, tmp_path)
    assert b"nf_kv4_read" in library and b"nf_attention" in library and b"nf_kv4_attention" not in library
    interpreter = Interpreter(g)
    state = [torch.zeros(B, *x.shape[1:], dtype=x.dtype.torch_dtype).numpy() for x in g.inputs
             if x.name.startswith("cache.")]
    start = 0
    for step, seq in enumerate(STEPS[:4]):
        gen = torch.Generator().manual_seed(step)
        qs, ks, vs = (torch.randn(B, n, seq, D, generator=gen) for n in (H, KVH, KVH))
        positions = torch.arange(start, start + seq).repeat(B, 1)
        got = runner(qs.numpy(), positions.numpy(), ks.numpy(), *state[:4], vs.numpy(), state[4])
        want = interpreter.run(qs, positions, ks, *map(torch.from_numpy, state[:4]), vs, torch.from_numpy(state[4]))
        torch.testing.assert_close(torch.as_tensor(got[0]), want[0], rtol=1e-5, atol=1e-5)
        _check_state(step, [x.name for x in g.outputs[1:5]], got[1:5], want[1:5])
        state = list(got[1:])
        start += seq


def test_query_heads_run_in_blocks_that_fill_the_threads():
    assert head_block(32, 8, 2) == (4, 1)           # kv heads enough: each group whole
    assert head_block(8, 1, 2) == (4, 2)            # one kv head on 2 threads: 2 blocks of 4
    assert head_block(8, 1, 16) == (1, 8)           # at most a block per query head
    assert head_block(16, 2, 8) == (2, 4) and head_block(14, 2, 2) == (7, 1) and head_block(14, 2, 4) == (1, 7)


@pytest.mark.parametrize("kind", ["kv4", "kv-gear4"])
def test_a_kv4_write_refuses_positions_that_skip(tmp_path, kind):
    graph = cache_graph(kind, "k", group=4, residual=3)
    runner, _ = _lower(graph, tmp_path)
    state = [t.numpy() for t in cache_encoding(kind, "k", group=4, residual=3).zeros(2, 2, 24, HEAD_DIM)]
    x = hard_values(2, 2, seed=0).numpy()
    with pytest.raises(BackendError, match=rf"node layer.k_cache.write: a {kind} cache needs each row's positions "
                                           r"consecutive, continuing the sequence, and within its 24 slots"):
        runner(x, torch.tensor([[0, 2], [0, 1]]).numpy(), *state)


def test_every_encoding_has_its_rows_and_others_are_refused_by_name(monkeypatch):
    from nnforge.ir import kvcache
    assert {(r.op, r.encoding) for r in KV_CACHE} == {(op, kind) for op in ("kv_cache_write", "kv_cache_read")
                                                      for kind in CPU_KINDS}
    assert set(CPU_KINDS) == set(CACHE_ENCODINGS)
    for kind, options in ENCODINGS:
        for op in ("kv_cache_write", "kv_cache_read"):
            assert CAPABILITIES.find(op, cache_encoding(kind, "v", **options), get_target("cpu"))[0] in KV_CACHE
    # an encoding the table has no row for (one added to the IR after these kernels) is refused by name

    class Other(kvcache.KV8):
        kind = "kv-other"
    monkeypatch.setitem(kvcache.CACHE_ENCODINGS, "kv-other", Other)
    graph = attention_graph("kv8")
    for n in graph.nodes:
        if n.op in ("kv_cache_write", "kv_cache_read"):
            n.attrs["encoding"] = "kv-other"
    with pytest.raises(BackendError) as e:
        get_backend("tvm").check_cache_encodings(graph, get_target("cpu"))
    assert "the tvm backend cannot run the encoded KV cache of 2 cache(s) on cpu" in str(e.value)
    assert "cache.k of layer layer (kv-other: the tvm capability table has no kv_cache_write row for kv-other)" \
        in str(e.value)

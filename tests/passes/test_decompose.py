"""The primitive forms of the decoder ops against the ops' reference kernels (the interpreter), on
every attribute branch: GQA, sliding window, softcap, partial and interleaved rotary, longrope's
two tables, Gemma's offset norm, prefill and decode positions."""
from __future__ import annotations

import pytest
import torch

from nnforge.ir import run_graph, verify
from nnforge.passes import PassContext, PassError
from nnforge.passes.decompose import DecomposeOps, decomposable
from tests.passes.graphs import H, KVH, decoder_block as block, decoder_inputs as inputs

CASES = {
    "llama": {},
    "mha": {"group": 1},
    "window": {"window": 3},
    "softcap": {"softcap": 5.0},
    "interleaved": {"style": "interleaved"},
    "partial": {"rotary_dim": 4},
    "partial_interleaved": {"rotary_dim": 4, "style": "interleaved"},
    "gemma_norm": {"offset": 1.0},
    "longrope": {"switch_at": 8},          # prefill (positions < 8) on the short table, decode on the long one
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seq,start", [(5, 0), (1, 9)], ids=["prefill", "decode"])
def test_primitive_forms_compute_the_reference(case, seq, start):
    graph = block(**CASES[case])
    want = run_graph(graph, inputs(seq, start, CASES[case].get("group", H // KVH)))
    ctx = PassContext()
    ctx.current = "decompose"
    flat = DecomposeOps()(graph.copy(), ctx)
    verify(flat)
    assert not {n.op for n in flat.nodes} & decomposable()
    assert ctx.figures["decompose"]["decomposed"] == {"rms_norm": 1, "rope": 2, "cache_update": 1, "attention": 1}
    assert flat.signature() == graph.signature()
    got = run_graph(flat, inputs(seq, start, CASES[case].get("group", H // KVH)))
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)        # the cache write is exact
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_it_applies_only_where_the_ops_are():
    from tests.passes.graphs import mlp_graph
    assert DecomposeOps().applies(block()) and not DecomposeOps(ops=["rope"]).applies(mlp_graph())


def test_only_the_named_ops_are_rewritten():
    flat = DecomposeOps(ops=["attention"])(block())
    assert {"rms_norm", "rope", "cache_update"} <= {n.op for n in flat.nodes}
    assert "attention" not in {n.op for n in flat.nodes}


def test_every_decoder_op_has_a_form():
    from nnforge.backends.base import decoder_ops
    assert decomposable() == decoder_ops() == {"rms_norm", "rope", "cache_update", "attention"}


def test_an_op_without_a_form_is_refused_by_name():
    with pytest.raises(PassError, match=r"decompose: no primitive form for op\(s\) linear; ops with one: "
                                        r"attention, cache_update, rms_norm, rope"):
        DecomposeOps(ops=["linear", "rope"])

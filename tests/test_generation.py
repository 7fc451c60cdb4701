"""Generation and perplexity over a real decoder-form graph on the reference interpreter, against
transformers: greedy tokens equal model.generate, perplexity equals the Hugging Face sliding-window
recipe on model(ids, labels=...).loss; sampling, stop tokens, streaming and every refusal."""
from __future__ import annotations

import math

import pytest
import torch

from nnforge.frontend.decoders import (
    build,
    cache_shape,
    load_causal_lm,
    spec_from_config,
    state_pairs,
)
from nnforge.generation import (
    Decoder,
    DecoderState,
    GenerationError,
    filter_top_k,
    filter_top_p,
    generate,
    next_token,
    perplexity,
)
from nnforge.ir import Interpreter
from tests.frontend.decoders.families import VOCAB, tiny_model, tiny_tokenizer

MAX_LEN = 32
PROMPT = [1, 17, 42, 99, 5]


def interpreter_step(graph, as_numpy: bool = False):
    """The graph on the interpreter as a by-name step callable."""
    interp, names = Interpreter(graph), [v.name for v in graph.outputs]

    def step(inputs):
        outs = interp.run(inputs)
        return {n: (o.numpy() if as_numpy else o) for n, o in zip(names, outs)}
    return step


class Built:
    def __init__(self, name: str):
        self.model = tiny_model(name)
        loaded = load_causal_lm(self.model)
        self.spec = spec_from_config(loaded.config, max_len=MAX_LEN)
        self.graph = build(self.spec, loaded.weights, MAX_LEN)

    def decoder(self, **kwargs) -> Decoder:
        step = interpreter_step(self.graph, kwargs.pop("as_numpy", False))
        return Decoder(step, state_pairs(self.spec), lambda b: cache_shape(self.spec, MAX_LEN, b), MAX_LEN, **kwargs)


@pytest.fixture(scope="module")
def llama():
    return Built("llama")


@pytest.fixture(scope="module")
def gemma3():
    return Built("gemma3")


def _ids(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


# --- greedy against transformers --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_greedy_tokens_equal_transformers_generate(name, request):
    built = request.getfixturevalue(name)
    with torch.no_grad():
        want = built.model.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
    result = generate(built.decoder(), PROMPT, 20)
    assert result.tokens == want[0, len(PROMPT):].tolist()
    assert result.prompt_tokens == len(PROMPT) and result.decode_steps == 19 and not result.stopped
    assert result.prefill_s > 0 and result.decode_s > 0
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0


def test_a_numpy_step_and_a_chunked_prefill_give_the_same_tokens(llama):
    want = generate(llama.decoder(), PROMPT, 6).tokens
    assert generate(llama.decoder(as_numpy=True), PROMPT, 6).tokens == want
    assert generate(llama.decoder(prefill_chunk=2), PROMPT, 6).tokens == want


def test_chunked_prefill_continues_the_positions(llama):
    ids = _ids(20)[None]
    whole = llama.decoder().prefill(ids)
    chunked = llama.decoder(prefill_chunk=6)
    torch.testing.assert_close(chunked.prefill(ids), whole, rtol=1e-5, atol=1e-5)
    assert chunked.position == 20
    last = chunked.prefill(ids, all_logits=False)
    assert last.shape == (1, 1, VOCAB)
    torch.testing.assert_close(last, whole[:, -1:], rtol=1e-5, atol=1e-5)


def test_a_forked_sequence_continues_as_each_of_its_copies_would_alone(llama):
    """Two prompts forked into three copies each: every copy, fed its own tokens, gives the logits
    of a decoder that ran its prompt and those tokens alone."""
    prompts = torch.stack([_ids(7, seed=1), _ids(7, seed=2)])
    forked = llama.decoder()
    forked.prefill(prompts)
    forked.fork(3)
    assert (forked.batch, forked.position) == (6, 7)
    tokens = torch.tensor([5, 9, 13, 17, 21, 25])
    got = forked.step(tokens)
    for row in range(6):
        alone = llama.decoder()
        alone.prefill(prompts[row // 3][None])
        torch.testing.assert_close(got[row], alone.step(tokens[row:row + 1])[0], rtol=1e-5, atol=1e-5)
    # a snapshot restored later continues as if nothing ran in between
    prefilled = llama.decoder()
    prefilled.prefill(prompts)
    saved = prefilled.snapshot()
    first = prefilled.step(tokens[::3])
    prefilled.step(tokens[1::3])
    prefilled.restore(saved, copies=3)
    assert (prefilled.batch, prefilled.position) == (6, 7)
    torch.testing.assert_close(prefilled.step(tokens), got, rtol=0, atol=0)
    prefilled.restore(saved)
    torch.testing.assert_close(prefilled.step(tokens[::3]), first, rtol=0, atol=0)
    with pytest.raises(GenerationError, match="copies 0: give at least one copy"):
        forked.fork(0)
    with pytest.raises(GenerationError, match=r"the snapshot holds the state \['x'\], not this decoder's "):
        forked.restore(DecoderState({"x": torch.zeros(1)}, 3, torch.zeros(1, 0)))
    with pytest.raises(GenerationError, match=r"no sequences to fork yet: call prefill\(ids\) first"):
        llama.decoder().fork(2)


def test_the_call_that_passes_recompute_at_runs_the_whole_sequence_again():
    """Phi-3's longrope: once a call takes the sequence past the original context, every token so
    far runs again in that call (as transformers' generate recomputes its cache), chunked prefill
    included; the logits returned are the new tokens' only."""
    calls = []

    def step(inputs):
        ids, positions = inputs["input_ids"], inputs["positions"]
        calls.append(positions[0].tolist())
        logits = (ids[..., None] + positions[..., None] * 1000).float().expand(*ids.shape, 3)
        return {"logits": logits, "c.next": inputs["c"] + ids.shape[1]}
    dec = Decoder(step, [("c", "c.next")], lambda b: [b, 1], 16, recompute_at=4, prefill_chunk=3)
    out = dec.prefill(torch.tensor([[10, 11, 12, 13, 14]]))
    assert calls == [[0, 1, 2], [0, 1, 2, 3, 4]]                 # the second chunk crossed: all again
    assert out[0, :, 0].tolist() == [10, 1011, 2012, 3013, 4014] and dec.position == 5
    dec.step(torch.tensor([15]))
    assert calls[-1] == [5] and dec.cache["c"].tolist() == [[6]]
    calls.clear()
    plain = Decoder(step, [("c", "c.next")], lambda b: [b, 1], 16, recompute_at=4)
    plain.prefill(torch.tensor([[10, 11, 12]]))
    plain.step(torch.tensor([13]))
    logits = plain.step(torch.tensor([14]))                       # position 4: the fifth token
    assert calls == [[0, 1, 2], [3], [0, 1, 2, 3, 4]] and logits[0, 0] == 4014
    plain.step(torch.tensor([15]))
    assert calls[-1] == [5]


def test_cache_shapes_by_name_with_a_symbolic_batch(llama):
    shapes = {v.name: list(v.shape) for v in llama.graph.inputs if v.name.startswith("cache.")}
    assert shapes["cache.0.k"][0] == "batch"
    decoder = Decoder(interpreter_step(llama.graph), state_pairs(llama.spec), shapes, MAX_LEN)
    ids = _ids(8)[None].repeat(2, 1)
    logits = decoder.prefill(ids)
    assert logits.shape == (2, 8, VOCAB) and decoder.cache["cache.1.v"].shape[0] == 2
    step = decoder.step(torch.tensor([7, 9]))
    assert step.shape == (2, VOCAB) and decoder.position == 9


# --- perplexity against the Hugging Face recipe ------------------------------------------------------
def hf_perplexity(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """huggingface.co/docs/transformers/perplexity, as written there."""
    seq_len, nll_sum, n_tokens, prev_end = ids.shape[0], 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + window, seq_len)
        trg_len = end - prev_end
        input_ids = ids[None, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("name, n, window, stride", [("llama", 30, 32, 32), ("llama", 30, 16, 6),
                                                     ("llama", 29, 12, 12), ("gemma3", 30, 20, 7)])
def test_perplexity_equals_the_sliding_window_recipe(name, n, window, stride, request):
    built = request.getfixturevalue(name)
    ids = _ids(n)
    want, scored = hf_perplexity(built.model, ids, window, stride)
    got = perplexity(built.decoder(), ids, window=window, stride=stride)
    assert got.tokens == scored
    assert got.perplexity == pytest.approx(want, rel=1e-5)
    assert got.nll == pytest.approx(math.log(want), rel=1e-5)


def test_perplexity_defaults_to_one_window_of_the_cache_and_takes_text(llama):
    tok = tiny_tokenizer()
    text = " ".join(f"w{i}" for i in _ids(32).tolist())
    got = perplexity(llama.decoder(prefill_chunk=5), text, tokenizer=tok)
    want, scored = hf_perplexity(llama.model, torch.tensor(tok.encode(text)), MAX_LEN, MAX_LEN)
    assert (got.tokens, got.windows) == (scored, 1) == (31, 1)
    assert got.perplexity == pytest.approx(want, rel=1e-5)


# --- sampling ----------------------------------------------------------------------------------------
def test_sampling_is_reproducible_by_seed_and_differs_across_seeds(llama):
    decoder = llama.decoder()
    draws = [generate(decoder, PROMPT, 10, temperature=1.5, top_k=40, top_p=0.95, seed=seed).tokens
             for seed in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2]


def test_top_k_one_is_greedy(llama):
    decoder = llama.decoder()
    greedy = generate(decoder, PROMPT, 10).tokens
    assert generate(decoder, PROMPT, 10, temperature=0.7, top_k=1, seed=5).tokens == greedy


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])               # sorted: 0.5, 0.3, 0.15, 0.05
    scores = probs.log()
    kept = {p: torch.isfinite(filter_top_p(scores, p)).nonzero().flatten().tolist()
            for p in (0.3, 0.7, 0.85, 0.97, 1.0)}
    assert kept == {0.3: [1], 0.7: [1, 3], 0.85: [0, 1, 3], 0.97: [0, 1, 2, 3], 1.0: [0, 1, 2, 3]}
    kept_values = filter_top_p(scores, 0.7)
    assert torch.equal(kept_values[[1, 3]], scores[[1, 3]])
    batch = filter_top_p(torch.stack([scores, scores.flip(0)]), 0.7)          # row by row
    assert torch.isfinite(batch).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_top_k_keeps_the_k_largest_and_their_ties():
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.5])
    assert torch.isfinite(filter_top_k(scores, 1)).tolist() == [False, True, False, True, False]
    assert torch.isfinite(filter_top_k(scores, 3)).tolist() == [False, True, True, True, False]
    assert torch.equal(filter_top_k(scores, 0), scores) and torch.equal(filter_top_k(scores, 9), scores)


def test_greedy_takes_the_first_maximum():
    assert next_token(torch.tensor([0.0, 2.0, 1.0, 2.0])) == 1


# --- stopping and streaming --------------------------------------------------------------------------
def test_a_stop_token_ends_generation_and_is_kept(llama):
    decoder = llama.decoder()
    greedy = generate(decoder, PROMPT, 12).tokens
    at = next(i for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i])
    result = generate(decoder, PROMPT, 12, stop_tokens=[greedy[at], 127 if greedy[at] != 127 else 126])
    assert result.tokens == greedy[:at + 1] and result.stopped
    assert generate(decoder, PROMPT, 12, stop_tokens=greedy[0]).tokens == greedy[:1]


def test_streaming_hears_every_token_in_order_and_the_pieces_make_the_text(llama):
    tok = tiny_tokenizer()
    heard = []
    result = generate(llama.decoder(), "w17 w42 w99 w5", 10, tokenizer=tok, on_token=lambda t, s: heard.append((t, s)))
    assert [t for t, _ in heard] == result.tokens and len(result.tokens) == 10
    assert "".join(s for _, s in heard) == result.text == tok.decode(result.tokens, skip_special_tokens=True)
    assert result.text
    silent = []
    generate(llama.decoder(), PROMPT, 3, on_token=lambda t, s: silent.append(s))
    assert silent == [None] * 3


class ScriptedStep:
    """A step whose logits pick the given tokens in turn, one per position after the prompt's last."""

    def __init__(self, script: list[int], prompt_len: int, vocab: int = 8):
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab

    def __call__(self, inputs):
        positions = inputs["positions"]
        logits = torch.zeros(*positions.shape, self.vocab)
        for j, pos in enumerate(positions[0].tolist()):
            k = pos - self.prompt_len + 1
            if 0 <= k < len(self.script):
                logits[:, j, self.script[k]] = 1.0
        return {"logits": logits, "cache.0.k.next": inputs["cache.0.k"]}


class ByteTokenizer:
    """Each token is one byte of UTF-8 text, so a character can take several tokens."""

    def decode(self, tokens, skip_special_tokens=True):
        return bytes(tokens).decode("utf-8", errors="replace")


def test_a_character_over_several_tokens_streams_whole():
    script = list("aé€!".encode())                        # 1 + 2 + 3 + 1 bytes
    decoder = Decoder(ScriptedStep(script, prompt_len=1, vocab=256), [("cache.0.k", "cache.0.k.next")],
                      lambda b: [b, 1, 16, 2], 16)
    pieces = []
    result = generate(decoder, [0], len(script), tokenizer=ByteTokenizer(), on_token=lambda t, s: pieces.append(s))
    assert result.tokens == script and result.text == "aé€!"
    assert pieces == ["a", "", "é", "", "", "€", "!"]
    cut = []                                               # the last token gives what it has, unfinished or not
    generate(decoder, [0], 2, tokenizer=ByteTokenizer(), on_token=lambda t, s: cut.append(s))
    assert cut == ["a", "\ufffd"]


# --- refusals ----------------------------------------------------------------------------------------
def test_a_generation_past_the_cache_names_prompt_new_tokens_and_max_len(llama):
    decoder = llama.decoder()
    with pytest.raises(GenerationError, match=r"a prompt of 30 tokens and 5 new tokens need 34 cache positions, "
                                              r"but the decoder was compiled with max_len 32: compile it with "
                                              r"max_len >= 34"):
        generate(decoder, _ids(30), 5)
    assert len(generate(decoder, _ids(30), 3).tokens) == 3              # 32 positions: fits
    with pytest.raises(GenerationError, match=r"33 tokens at position 0 need 33 cache positions, .*max_len 32: "
                                              r"compile it with a larger max_len"):
        decoder.prefill(_ids(33))
    decoder.prefill(_ids(32))
    with pytest.raises(GenerationError, match=r"1 tokens at position 32 need 33 cache positions"):
        decoder.step(torch.tensor([5]))


def test_prompt_errors(llama):
    decoder = llama.decoder()
    with pytest.raises(GenerationError, match="the prompt is empty: give at least one token"):
        generate(decoder, [], 3)
    with pytest.raises(GenerationError, match="the prompt is empty"):
        decoder.prefill(torch.zeros(1, 0, dtype=torch.int64))
    with pytest.raises(GenerationError, match=r"shape \(2, 5\): this runs one sequence at a time \(batch 1\)"):
        generate(decoder, torch.tensor([PROMPT, PROMPT]), 3)
    with pytest.raises(GenerationError, match="a text prompt needs a tokenizer"):
        generate(decoder, "w5 w6", 3)
    with pytest.raises(GenerationError, match="max_new_tokens 0: ask for at least one"):
        generate(decoder, PROMPT, 0)


@pytest.mark.parametrize("setting, message", [
    ({"temperature": -1.0}, "temperature -1.0: give 0 for greedy"),
    ({"temperature": math.inf}, "temperature inf"),
    ({"top_k": -2}, "top_k -2: give 0 to keep every token"),
    ({"top_p": 0.0}, r"top_p 0.0: give a probability mass in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p 1.5"),
])
def test_sampling_settings_are_checked(llama, setting, message):
    with pytest.raises(GenerationError, match=message):
        generate(llama.decoder(), PROMPT, 3, **setting)


@pytest.mark.parametrize("n, setting, message", [
    (20, {"window": 40}, r"window 40 is longer than the decoder's cache \(max_len 32\): give window <= 32"),
    (20, {"window": 1}, "window 1: .* give at least 2"),
    (20, {"window": 16, "stride": 0}, r"stride 0: give 1 <= stride <= window \(16\)"),
    (20, {"window": 16, "stride": 17}, "stride 17"),
    (1, {}, "1 token.*: perplexity scores each token after the first, so give at least 2"),
])
def test_perplexity_settings_are_checked(llama, n, setting, message):
    with pytest.raises(GenerationError, match=message):
        perplexity(llama.decoder(), _ids(n), **setting)


def test_decoder_errors(llama):
    pairs = state_pairs(llama.spec)
    with pytest.raises(GenerationError, match=r"cache_shape gives no shape for the cache inputs \['cache.0.v', "
                                              r"'cache.1.k', 'cache.1.v'\]: give one per input of state_pairs"):
        Decoder(interpreter_step(llama.graph), pairs, {"cache.0.k": ["batch", 2, 32, 16]}, MAX_LEN)
    with pytest.raises(GenerationError, match="prefill_chunk 0: give a positive number"):
        llama.decoder(prefill_chunk=0)
    decoder = llama.decoder()
    with pytest.raises(GenerationError, match=r"no cache yet: call prefill\(ids\) or reset\(batch\) first"):
        decoder.step(torch.tensor([5]))
    decoder.reset(2)
    with pytest.raises(GenerationError, match=r"shape \(1, 1\) for a cache of 2 sequences"):
        decoder.step(torch.tensor([5]))
    lossy = Decoder(lambda inputs: {"logits": torch.zeros(1, 1, VOCAB)}, pairs,
                    lambda b: cache_shape(llama.spec, MAX_LEN, b), MAX_LEN)
    with pytest.raises(GenerationError, match=r"the step function returned no \['cache.0.k.next', .*\(it returned "
                                              r"\['logits'\]\): it must return the decoder graph's outputs by name"):
        lossy.prefill([5])

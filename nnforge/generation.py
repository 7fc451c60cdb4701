"""Text generation and perplexity over a decoder's step function, wherever that step runs.

A causal LM compiles to one graph in decoder form (see ``frontend/decoders/builder.py``): token ids,
their positions and the KV cache in; logits and the updated cache out. :class:`Decoder` carries the
cache and the position between calls of any by-name step callable (the reference interpreter, an
ONNX Runtime session, a TVM VM); :func:`generate` and :func:`perplexity` only ever call a Decoder.

    >>> decoder = Decoder(step, state_pairs(spec), lambda batch: cache_shape(spec, 512, batch), max_len=512)
    >>> result = generate(decoder, "Once upon a time", 32, tokenizer=tok, on_token=lambda t, s: print(s, end=""))
    >>> result.text, result.decode_tokens_per_s
    >>> perplexity(decoder, tok.encode(text), window=512, stride=256).perplexity
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import NnforgeError
from .frontend.decoders.builder import INPUT_IDS, LOGITS, POSITIONS
from .ir.dtypes import dtype as dtype_of

StepFn = Callable[[dict[str, Any]], Mapping[str, Any]]


class GenerationError(NnforgeError, ValueError):
    """A prompt, a setting or a step function that generation or perplexity cannot take; the message
    says which and what to do."""


@dataclass(frozen=True)
class DecoderState:
    """A :class:`Decoder`'s state at one point (:meth:`Decoder.snapshot`): each state input's value
    (batch axis first), the position, the tokens fed (for ``recompute_at``), and with token
    reduction the reducer's slot count and statistics."""
    cache: dict
    position: int
    fed: torch.Tensor
    stats: tuple | None = None


class Decoder:
    """A decoder-form step function with its KV cache and position carried between calls.

    ``step`` takes the graph's inputs by name (``input_ids``, ``positions`` and every cache input of
    ``state_pairs``) and returns its outputs by name, as numpy arrays or torch tensors.
    ``cache_shape`` gives a cache input's shape: a function of the batch size (the same for every
    cache input), or a mapping from cache input name to its shape with the batch axis first (what
    that axis holds, a number or a symbol, is replaced by the batch size); ``dtypes`` gives the
    torch dtype of state inputs that are not ``dtype`` (an encoded KV cache's codes and scales,
    docs/kv_cache.md). ``prefill_chunk`` runs a
    long prompt that many tokens at a time, so no step scores the whole prompt at once.
    ``resident`` (a backend runner's :meth:`~nnforge.backends.base.Runner.resident`) keeps the
    cache in the runtime's memory instead, and ``step`` is then not called. ``recompute_at``
    (the manifest's ``decoder.recompute_at``; 0: never): when a call first takes the sequence past
    that many positions, the whole sequence so far runs again in that one call. A longrope model
    (Phi-3) switches to its long rotary factors once a call reaches past its original context, and
    transformers then recomputes the cache so that every key has them; so does this.
    ``reduction`` (the manifest's ``decoder.kv_reduce``, :class:`~nnforge.kvreduce.Reduction`):
    each step writes the next free cache slot (the graph's ``slots`` input) and the cache is
    reduced to the budget between steps (docs/kv_cache.md), so a sequence may run past
    ``max_len`` positions; the cache then goes through this process every step, never resident.

        >>> decoder.prefill(torch.tensor([[1, 17, 42]]))[:, -1]      # logits after the prompt
        >>> decoder.step(torch.tensor([99]))                         # logits after one more token
    """

    def __init__(self, step: StepFn, state_pairs: Sequence[tuple[str, str]],
                 cache_shape: Callable[[int], Sequence[int]] | Mapping[str, Sequence], max_len: int, *,
                 prefill_chunk: int | None = None, dtype: torch.dtype = torch.float32, resident=None,
                 recompute_at: int = 0, dtypes: Mapping[str, torch.dtype] | None = None, reduction=None):
        if max_len < 1:
            raise GenerationError(f"max_len {max_len}: a decoder's cache holds at least one position")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk {prefill_chunk}: give a positive number of tokens, or None "
                                  "for the whole prompt in one step")
        self.state_pairs = [tuple(pair) for pair in state_pairs]
        if isinstance(cache_shape, Mapping):
            missing = [inp for inp, _ in self.state_pairs if inp not in cache_shape]
            if missing:
                raise GenerationError(f"cache_shape gives no shape for the cache inputs {missing}: give one per "
                                      "input of state_pairs, batch axis first")
        self._step, self._cache_shape, self._resident = step, cache_shape, resident
        self.max_len, self.prefill_chunk, self.dtype = max_len, prefill_chunk, dtype
        self.dtypes = dict(dtypes or {})
        self.recompute_at = int(recompute_at)
        self.reducer = None
        if reduction is not None:
            if self.recompute_at:
                raise GenerationError("token reduction cannot recompute the cache past recompute_at (longrope): the "
                                      "evicted tokens are gone; compile this model without kv-evict/kv-merge")
            if resident is not None:
                raise GenerationError("token reduction changes the cache between steps: run it with resident=False")
            from .kvreduce import CacheReducer
            self.reducer = CacheReducer(reduction)
        self._cache: dict[str, torch.Tensor] | None = None
        self._fed = torch.zeros(0, 0, dtype=torch.int64)    # the tokens the cache holds, for recompute_at
        self.batch, self.position = 0, 0

    @property
    def cache(self) -> dict[str, torch.Tensor] | None:
        """The state inputs' current values by name (None before the first prefill or reset)."""
        if self._resident is None or not self.batch:
            return self._cache
        return {inp: torch.from_numpy(self._resident.read(inp)) for inp, _ in self.state_pairs}

    @property
    def capacity(self) -> int:
        """How many positions a sequence may reach: the cache's max_len, or with token reduction
        the model's learned positions (no limit for rotary ones)."""
        if self.reducer is None:
            return self.max_len
        return self.reducer.reduction.max_positions or 2 ** 62

    @property
    def tokens_held(self) -> int:
        """The cache slots in use: the position, or with token reduction at most the budget."""
        return self.reducer.count if self.reducer is not None else self.position

    def shape_of(self, cache_input: str, batch: int) -> list[int]:
        if isinstance(self._cache_shape, Mapping):
            return [batch, *self._cache_shape[cache_input][1:]]
        return list(self._cache_shape(batch))

    def reset(self, batch: int = 1) -> None:
        """A fresh, all-zero cache for ``batch`` sequences, at position 0."""
        if batch < 1:
            raise GenerationError(f"batch {batch}: give at least one sequence")
        if self._resident is not None:
            self._resident.reset({inp: self.shape_of(inp, batch) for inp, _ in self.state_pairs})
        else:
            self._cache = {inp: torch.zeros(self.shape_of(inp, batch), dtype=self.dtypes.get(inp, self.dtype))
                           for inp, _ in self.state_pairs}
        self._fed = torch.zeros(batch, 0, dtype=torch.int64)
        self.batch, self.position = batch, 0
        if self.reducer is not None:
            self.reducer.reset()

    def snapshot(self) -> DecoderState:
        """What the decoder holds now (every sequence's cache, the position), to :meth:`restore`
        later: a prompt prefilled once and continued many times (one system prompt, many requests)."""
        if not self.batch:
            raise GenerationError("the decoder has no sequences to snapshot yet: call prefill(ids) first")
        stats = None
        if self.reducer is not None:
            stats = (self.reducer.count, {k: {s: v.clone() for s, v in st.items()}
                                          for k, st in self.reducer.stats.items()})
        return DecoderState({inp: value.clone() for inp, value in self.cache.items()}, self.position,
                            self._fed.clone(), stats)

    def restore(self, state: DecoderState, copies: int = 1) -> None:
        """Continue from ``state`` (a :meth:`snapshot`), each of its sequences as ``copies``
        sequences: batch b becomes b x copies, the copies of sequence i at rows i*copies to
        i*copies+copies-1, each with the cache it had (several sampled continuations of one
        prompt). The cache is written back into the runtime's memory where the backend keeps it."""
        if copies < 1:
            raise GenerationError(f"copies {copies}: give at least one copy of each sequence")
        if sorted(state.cache) != sorted(inp for inp, _ in self.state_pairs):
            raise GenerationError(f"the snapshot holds the state {sorted(state.cache)}, not this decoder's "
                                  f"{sorted(inp for inp, _ in self.state_pairs)}: restore a snapshot of the same bundle")
        if (state.stats is None) != (self.reducer is None):
            raise GenerationError("the snapshot was taken with" + (" no" if state.stats is None else "") +
                                  " token reduction and this decoder runs" + (" none" if self.reducer is None else
                                                                               " one") + ": restore it into a decoder "
                                  "of the same bundle")
        tiled = {inp: value.repeat_interleave(copies, dim=0) for inp, value in state.cache.items()}
        if self._resident is not None:
            self._resident.write({inp: value.numpy() for inp, value in tiled.items()})
        else:
            self._cache = tiled
        if self.reducer is not None:        # each copy keeps its slots' attention statistics
            self.reducer.count = state.stats[0]
            self.reducer.stats = {k: {s: v.repeat_interleave(copies, dim=0) for s, v in st.items()}
                                  for k, st in state.stats[1].items()}
        self._fed = state.fed.repeat_interleave(copies, dim=0)
        self.batch = next(iter(tiled.values())).shape[0]
        self.position = state.position

    def fork(self, copies: int) -> None:
        """Continue each sequence as ``copies`` sequences from where it stands: :meth:`restore` of
        a :meth:`snapshot` taken now."""
        if copies < 1:
            raise GenerationError(f"copies {copies}: give at least one copy of each sequence")
        if not self.batch:
            raise GenerationError("the decoder has no sequences to fork yet: call prefill(ids) first")
        self.restore(self.snapshot(), copies)

    def prefill(self, ids, *, all_logits: bool = True) -> torch.Tensor:
        """Start new sequences from their prompts ``ids`` ([batch, n], or [n] for one) and return the
        logits [batch, n, vocab] of every prompt position (of the last one only, [batch, 1, vocab],
        when ``all_logits`` is false)."""
        ids = _as_ids(ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[-1] == 0:
            raise GenerationError("the prompt is empty: give at least one token (a BOS token, if the model has one)")
        self.reset(ids.shape[0])
        return self.extend(ids, all_logits=all_logits)

    def step(self, token_ids) -> torch.Tensor:
        """Feed one token per sequence (``token_ids`` [batch]) and return the next logits [batch, vocab]."""
        ids = _as_ids(token_ids).reshape(-1, 1)
        return self.extend(ids)[:, -1]

    def extend(self, ids, *, all_logits: bool = True) -> torch.Tensor:
        """Feed ``ids`` [batch, n] at the next n positions of the current sequences."""
        ids = _as_ids(ids)
        if not self.batch:
            raise GenerationError("the decoder has no cache yet: call prefill(ids) or reset(batch) first")
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise GenerationError(f"token ids of shape {tuple(ids.shape)} for a cache of {self.batch} sequences: "
                                  f"give [{self.batch}, tokens], or prefill a new batch")
        n = ids.shape[1]
        if n == 0:
            raise GenerationError("no tokens to feed: give at least one")
        if self.position + n > self.capacity:
            what = (f"the decoder was compiled with max_len {self.max_len}" if self.reducer is None else
                    f"the model has learned positions for {self.capacity} tokens")
            raise GenerationError(f"{n} tokens at position {self.position} need {self.position + n} cache positions, "
                                  f"but {what}: compile it with a larger max_len, or give fewer tokens")
        chunk = self.prefill_chunk or n
        if self.reducer is not None:      # a step's tokens fit beside a full budget
            chunk = min(chunk, self.max_len - self.reducer.reduction.budget)
        logits = []
        for start in range(0, n, chunk):
            part = ids[:, start:start + chunk]
            out = self._feed(part)
            logits.append(out if all_logits else out[:, -1:])
        return torch.cat(logits, dim=1) if all_logits else logits[-1]

    def _feed(self, part: torch.Tensor) -> torch.Tensor:
        """Logits of ``part`` at the next positions: run on its own, or with every token before it
        when it takes the sequence past ``recompute_at`` (see the class doc)."""
        before, n = self.position, part.shape[1]
        if self.recompute_at and 0 < before <= self.recompute_at < before + n:
            everything = torch.cat([self._fed, part], dim=1)
            self.reset(self.batch)
            out = self._run(everything)[:, -n:]
        else:
            out = self._run(part)
        if self.recompute_at:
            self._fed = torch.cat([self._fed, part], dim=1)
        return out

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        positions = torch.arange(self.position, self.position + n, dtype=torch.int64).repeat(self.batch, 1)
        if self._resident is not None:
            logits = self._resident.run(ids.contiguous().numpy(), positions.numpy())
            self.position += n
            return torch.from_numpy(logits)
        inputs = {INPUT_IDS: ids.contiguous(), POSITIONS: positions, **self._cache}
        if self.reducer is not None:
            slots = torch.arange(self.reducer.count, self.reducer.count + n, dtype=torch.int64).repeat(self.batch, 1)
            inputs[self.reducer.reduction.slots] = slots
        out = self._step(inputs)
        wanted = [LOGITS] + [o for _, o in self.state_pairs]
        missing = [name for name in wanted if name not in out]
        if missing:
            raise GenerationError(f"the step function returned no {missing} (it returned {sorted(out)}): it must "
                                  "return the decoder graph's outputs by name")
        # a state input of its own dtype (an encoded cache's float16 scales) goes back as declared:
        # the interpreter hands float values over in its compute type
        self._cache = {inp: torch.as_tensor(out[o]) if inp not in self.dtypes else
                       torch.as_tensor(out[o]).to(self.dtypes[inp]) for inp, o in self.state_pairs}
        if self.reducer is not None:
            self._cache = self.reducer.after_step(self._cache, out, slots)
        self.position += n
        return torch.as_tensor(out[LOGITS])


def _as_ids(ids) -> torch.Tensor:
    if isinstance(ids, int):
        ids = [ids]
    return torch.as_tensor(ids).to(torch.int64)


# --- sampling --------------------------------------------------------------------------------------
def filter_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``scores`` with every entry below the k-th largest set to -inf (ties with it are kept, as
    transformers' TopKLogitsWarper keeps them); k = 0 keeps all."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def filter_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """``scores`` with every entry outside the nucleus set to -inf: the nucleus is the smallest set of
    most probable tokens whose probabilities sum to at least ``p``, never empty. p = 1 keeps all."""
    if p >= 1.0:
        return scores
    probs, order = torch.sort(torch.softmax(scores, dim=-1), dim=-1, descending=True, stable=True)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p                # the first token has none before it: always kept
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> int:
    """The next token from one position's logits [vocab]: argmax (the first on ties) when
    ``temperature`` is 0, else a draw after temperature, top-k and top-p, in transformers' order."""
    if temperature == 0:
        return int(torch.argmax(logits))
    scores = filter_top_p(filter_top_k(logits.float() / temperature, top_k), top_p)
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise GenerationError(f"temperature {temperature}: give 0 for greedy decoding or a positive number")
    if top_k < 0:
        raise GenerationError(f"top_k {top_k}: give 0 to keep every token, or a positive count")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p {top_p}: give a probability mass in (0, 1]; 1 keeps every token")


# --- generation ------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    """The new tokens (a stop token that ended them included), their text when a tokenizer was given,
    and how long the step calls took: the prompt's prefill, and the decode steps (one per new token
    after the first, which the prefill's logits give)."""
    tokens: list[int]
    text: str | None
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    stopped: bool                     # by a stop token, rather than by max_new_tokens

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else None


class _TextStream:
    """The text each new token adds: the whole new sequence decoded again, less what was given, so a
    character spread over several tokens comes out whole. An unfinished character (decoded as
    U+FFFD) waits for the next token, unless the token is the last."""

    def __init__(self, tokenizer):
        self.tokenizer, self.given = tokenizer, 0

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def piece(self, tokens: list[int], last: bool) -> str:
        text = self.text(tokens)
        if text.endswith("\ufffd") and not last:
            return ""
        piece, self.given = text[self.given:], len(text)
        return piece


def _prompt_ids(prompt, tokenizer) -> torch.Tensor:
    """The prompt as a 1-D int64 tensor: a string through the tokenizer, else token ids ([n] or [1, n])."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise GenerationError("a text prompt needs a tokenizer: pass tokenizer=, or give token ids")
        prompt = tokenizer.encode(prompt)
    ids = _as_ids(prompt)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise GenerationError(f"token ids of shape {tuple(ids.shape)}: this runs one sequence at a time (batch 1); "
                              "give [tokens] or [1, tokens], and call it once per sequence")
    return ids


def generate(decoder: Decoder, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop_tokens: Iterable[int] | int = (),
             on_token: Callable[[int, str | None], Any] | None = None, tokenizer=None) -> GenerationResult:
    """Up to ``max_new_tokens`` tokens after ``prompt`` (text, with ``tokenizer``, or token ids of one
    sequence): greedy when ``temperature`` is 0, else sampled from a generator seeded by ``seed``
    (the same seed draws the same tokens). Stops after a token of ``stop_tokens``, which is kept.
    ``on_token(token, piece)`` hears each token as it comes, with the text it adds (None without a
    tokenizer).

        >>> generate(decoder, [1, 17, 42], 8, stop_tokens=[2]).tokens
    """
    _check_sampling(temperature, top_k, top_p)
    ids = _prompt_ids(prompt, tokenizer)
    n = ids.shape[0]
    if n == 0:
        raise GenerationError("the prompt is empty: give at least one token (a BOS token, if the model has one)")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens {max_new_tokens}: ask for at least one new token")
    needed = n + max_new_tokens - 1                  # the last new token is never fed back
    if needed > decoder.capacity:
        what = (f"the decoder was compiled with max_len {decoder.max_len}" if decoder.reducer is None else
                f"the model has learned positions for {decoder.capacity} tokens")
        raise GenerationError(f"a prompt of {n} tokens and {max_new_tokens} new tokens need {needed} cache positions, "
                              f"but {what}: compile it with max_len >= {needed}, or shorten the prompt or "
                              "max_new_tokens")
    stops = {stop_tokens} if isinstance(stop_tokens, int) else {int(t) for t in stop_tokens}
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    stream = _TextStream(tokenizer) if tokenizer is not None else None

    t0 = time.perf_counter()
    logits = decoder.prefill(ids[None], all_logits=False)[0, -1]
    prefill_s = time.perf_counter() - t0
    tokens: list[int] = []
    decode_s, stopped = 0.0, False
    while True:
        token = next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        tokens.append(token)
        stopped = token in stops
        last = stopped or len(tokens) == max_new_tokens
        if on_token is not None:
            on_token(token, stream.piece(tokens, last) if stream else None)
        if last:
            break
        t0 = time.perf_counter()
        logits = decoder.step(torch.tensor([token]))[0]
        decode_s += time.perf_counter() - t0
    return GenerationResult(tokens=tokens, text=stream.text(tokens) if stream else None, prompt_tokens=n,
                            prefill_s=prefill_s, decode_s=decode_s, decode_steps=len(tokens) - 1, stopped=stopped)


# --- perplexity ------------------------------------------------------------------------------------
@dataclass
class PerplexityResult:
    perplexity: float                 # exp(nll)
    nll: float                        # mean negative log-likelihood per scored token, in nats
    tokens: int                       # tokens scored
    windows: int


def perplexity(decoder: Decoder, ids, *, window: int | None = None, stride: int | None = None,
               tokenizer=None) -> PerplexityResult:
    """Perplexity of one sequence (token ids, or text with ``tokenizer``) by Hugging Face's sliding
    window: windows of at most ``window`` tokens (default: the cache) start every ``stride`` tokens
    (default: ``window``), each scored from a fresh cache on the tokens the previous window did not
    score (the first window on all but its first token), so a token is scored with up to
    ``window - stride`` tokens of context before it. Log-probabilities are taken in float64.

        >>> perplexity(decoder, ids, window=512, stride=256).perplexity
    """
    ids = _prompt_ids(ids, tokenizer)
    window = decoder.max_len if window is None else window
    stride = window if stride is None else stride
    if window > decoder.max_len:
        raise GenerationError(f"window {window} is longer than the decoder's cache (max_len {decoder.max_len}): "
                              f"give window <= {decoder.max_len}, or compile with a larger max_len")
    if window < 2:
        raise GenerationError(f"window {window}: a window scores tokens after its first, so give at least 2")
    if not 1 <= stride <= window:
        raise GenerationError(f"stride {stride}: give 1 <= stride <= window ({window})")
    n = ids.shape[0]
    if n < 2:
        raise GenerationError(f"{n} token(s): perplexity scores each token after the first, so give at least 2")
    nll, scored, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        chunk = ids[begin:end]
        first = max(1, chunk.shape[0] - (end - prev_end))      # the tokens no earlier window scored
        logits = decoder.prefill(chunk[None])[0, first - 1:-1].to(torch.float64)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, chunk[first:, None])
        nll -= float(logp.sum())
        scored += chunk.shape[0] - first
        windows += 1
        prev_end = end
        if end == n:
            break
    mean = nll / scored
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=scored, windows=windows)


# --- a decoder bundle's runner ---------------------------------------------------------------------
class DecoderRunner:
    """A decoder bundle's runner: called as the backend's runner is (the graph's inputs in order,
    its outputs back), and with :meth:`generate` and :meth:`perplexity` over a :class:`Decoder`
    that carries the cache between its calls. ``section`` is the manifest's ``decoder`` section;
    the stop tokens default to its generation settings.

        >>> lm = nf.load("bundles/llama-onnx")
        >>> lm.generate("The river", 32, on_token=lambda t, s: print(s, end="")).decode_tokens_per_s
    """

    def __init__(self, runner, section: dict, input_names: Sequence[str], output_names: Sequence[str],
                 tokenizer=None):
        self.runner, self.section, self.tokenizer = runner, section, tokenizer
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.max_len = int(section["max_len"])

    def __call__(self, *inputs):
        return self.runner(*inputs)

    def __getattr__(self, name):                  # the backend runner's own attributes (dispatch, values...)
        return getattr(self.runner, name)

    def _step(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        outs = self.runner(*[inputs[n] for n in self.input_names])
        return dict(zip(self.output_names, outs if isinstance(outs, (list, tuple)) else [outs]))

    def decoder(self, *, prefill_chunk: int | None = None, resident: bool = True) -> Decoder:
        """A fresh :class:`Decoder` over this bundle (its own cache), kept in the runtime's memory
        between steps where the backend can (``resident``; False: through numpy every call)."""
        state = self.section["state"]
        pairs = [(s["input"], s["output"]) for s in state]
        reduction = None
        if self.section.get("kv_reduce"):             # the runner reduces the cache: never resident
            from .kvreduce import Reduction
            reduction, resident = Reduction.from_section(self.section["kv_reduce"]), False
        keep = getattr(self.runner, "resident", None) if resident else None
        dtypes = {s["input"]: dtype_of(s["dtype"]).torch_dtype for s in state if "dtype" in s}
        return Decoder(self._step, pairs, {s["input"]: s["shape"] for s in state}, self.max_len, dtypes=dtypes,
                       prefill_chunk=prefill_chunk, recompute_at=int(self.section.get("recompute_at", 0)),
                       resident=keep(pairs, (INPUT_IDS, POSITIONS), LOGITS) if keep else None, reduction=reduction)

    def generate(self, prompt, max_new_tokens: int = 64, *, stop_tokens=None, prefill_chunk: int | None = None,
                 **sampling) -> GenerationResult:
        """:func:`generate` on this bundle: ``prompt`` is text (the bundle's tokenizer) or token ids;
        ``sampling``: temperature, top_k, top_p, seed, on_token."""
        stops = self.section.get("generation", {}).get("stop_token_ids", []) if stop_tokens is None else stop_tokens
        return generate(self.decoder(prefill_chunk=prefill_chunk), prompt, max_new_tokens, stop_tokens=stops,
                        tokenizer=self.tokenizer, **sampling)

    def perplexity(self, text, *, window: int | None = None, stride: int | None = None,
                   prefill_chunk: int | None = None) -> PerplexityResult:
        """:func:`perplexity` of ``text`` (or token ids) on this bundle."""
        return perplexity(self.decoder(prefill_chunk=prefill_chunk), text, window=window, stride=stride,
                          tokenizer=self.tokenizer)


__all__ = ["Decoder", "DecoderRunner", "DecoderState", "GenerationError", "GenerationResult", "PerplexityResult", "filter_top_k", "filter_top_p",
           "generate", "next_token", "perplexity"]

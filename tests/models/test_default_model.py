"""The embedded default model (all-MiniLM-L6-v2 + mean pooling) and its sentence data, and the
acceptance check: the fp32 onnx bundle reproduces the torch embeddings (cosine >= 0.99999, same
nearest neighbours) on 128 held-out sentences; the w8 bundle is >= 1.5x smaller and close."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

import nnforge as nf
from nnforge.models import default as dm
from nnforge.models import (docstring_sentences, encode, evaluate_embeddings, load_default_model, sentence_splits,
                            sentences)

N_EVAL = 128
INPUT_NAMES = ["input_ids", "attention_mask"]


# --- sentences ---------------------------------------------------------------------------------
def test_sentences_are_many_distinct_ascii_sentences():
    s = sentences()
    assert isinstance(s, tuple) and len(s) >= 500
    assert len(set(s)) == len(s)
    for t in s:
        assert t.isascii() and t == t.strip() and t[0].isupper() and t.endswith(".")
        assert 6 <= len(t.split()) <= 40


def test_sentences_are_deterministic():
    first = sentences()
    dm.sentences.cache_clear()
    assert dm.sentences() == first
    # another interpreter with another hash seed: the same sentences in the same order
    code = ("import hashlib; from nnforge.models import sentences; "
            "print(hashlib.sha256('\\n'.join(sentences()).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == hashlib.sha256("\n".join(first).encode()).hexdigest()


def test_splits_are_disjoint_and_cover_the_sentences():
    calib, evals = sentence_splits()
    assert len(calib) == 480 and len(evals) >= N_EVAL
    assert not set(calib) & set(evals)
    assert calib + evals == list(sentences())
    assert sentence_splits() == (calib, evals)
    c2, e2 = sentence_splits(100)
    assert len(c2) == 100 and not set(c2) & set(e2) and c2 == calib[:100]


# --- evaluate_embeddings ----------------------------------------------------------------------------
def test_docstring_sentences_are_more_sentences_none_of_the_evaluation_ones():
    more = docstring_sentences(60)
    assert len(more) == len(set(more)) == 60
    assert not set(more) & set(sentences())          # the evaluation sentences never leak into training text
    assert all(6 <= len(s.split()) <= 40 and s.endswith(".") and s.isascii() for s in more)
    docstring_sentences.cache_clear()
    assert docstring_sentences(60) == more           # deterministic
    assert docstring_sentences(0) == ()


def test_evaluate_embeddings_identical():
    ref = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    f = evaluate_embeddings(ref, ref.clone())
    assert f.cosine_mean == pytest.approx(1.0, abs=1e-12) and f.cosine_min == pytest.approx(1.0, abs=1e-12)
    assert f.nn_agreement == 1.0 and f.query_agreement == 1.0 and f.n == 20
    assert f.to_dict() == {"cosine_mean": f.cosine_mean, "cosine_min": f.cosine_min, "nn_agreement": 1.0,
                           "query_agreement": 1.0, "sentences": 20}


def test_query_agreement_searches_the_reference_corpus():
    # candidate = reference with sentence 0 replaced by a copy of sentence 1's embedding: with both
    # sides compressed, 0 and 1 become each other's nearest neighbours; searched against the fp32
    # corpus, only query 0 can go astray
    ref = torch.nn.functional.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    cand = ref.clone()
    cand[0] = ref[1]
    f = evaluate_embeddings(ref, cand)
    nn = (ref @ ref.T).fill_diagonal_(-2).argmax(-1)
    want_query = float(((cand @ ref.T).fill_diagonal_(-2).argmax(-1) == nn).double().mean())
    assert f.query_agreement == pytest.approx(want_query)
    assert f.query_agreement >= 11 / 12 and f.nn_agreement < 1.0
    # scale does not matter (embeddings are normalised first)
    assert evaluate_embeddings(ref, 3.0 * ref).cosine_min == pytest.approx(1.0, abs=1e-12)


def test_evaluate_embeddings_detects_disagreement():
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(30, 16, generator=gen)
    neg = evaluate_embeddings(ref, -ref)
    assert neg.cosine_mean == pytest.approx(-1.0, abs=1e-12)
    shuffled = evaluate_embeddings(ref, ref[torch.randperm(30, generator=gen)])
    assert shuffled.cosine_mean < 0.5 and shuffled.nn_agreement < 0.5
    noisy = evaluate_embeddings(ref, ref + 0.05 * torch.randn(30, 16, generator=gen))
    assert 0.99 < noisy.cosine_mean < 1.0 and noisy.cosine_min <= noisy.cosine_mean


# --- the model ------------------------------------------------------------------------------------
def test_default_model_embeddings(default_model, default_inputs):
    model, tok = default_model
    ids, mask = default_inputs
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[0] == 6
    with torch.no_grad():
        emb = model(ids, mask)
    assert emb.shape == (6, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(6), rtol=0, atol=1e-5)
    # padding does not change a sentence's embedding (mean pooling is masked)
    with torch.no_grad():
        alone = model(*encode(tok, [sentence_splits()[1][0]]))
    torch.testing.assert_close(alone[0], emb[0], rtol=1e-4, atol=1e-5)
    assert load_default_model() is load_default_model()        # loaded once


# --- the acceptance check ------------------------------------------------------------------------
def _compile(model, tok, recipe, out):
    calib, _ = sentence_splits()
    return nf.compile(model, "onnx", recipe, example_inputs=encode(tok, calib[:4]),
                      dynamic_shapes=dm.dynamic_shapes(), input_names=INPUT_NAMES, output_names=["embeddings"],
                      name="minilm", out=out)


@pytest.fixture(scope="module")
def eval_batch(default_model):
    model, tok = default_model
    _, evals = sentence_splits()
    ids, mask = encode(tok, evals[:N_EVAL])
    with torch.no_grad():
        ref = model(ids, mask)
    return ids, mask, ref


@pytest.fixture(scope="module")
def fp32_bundle(default_model, tmp_path_factory):
    model, tok = default_model
    return _compile(model, tok, None, tmp_path_factory.mktemp("minilm") / "fp32")


@pytest.fixture(scope="module")
def w8_bundle(default_model, tmp_path_factory):
    model, tok = default_model
    return _compile(model, tok, "w8", tmp_path_factory.mktemp("minilm") / "w8")


def test_fp32_bundle_reproduces_torch(fp32_bundle, eval_batch):
    ids, mask, ref = eval_batch
    assert ids.shape[0] == N_EVAL and ids.shape[1] > 4      # another batch and length than the example
    m = fp32_bundle.manifest
    assert [i["name"] for i in m["signature"]["inputs"]] == INPUT_NAMES
    assert [o["name"] for o in m["signature"]["outputs"]] == ["embeddings"]
    assert [i["shape"] for i in m["signature"]["inputs"]] == [["batch", "seq"], ["batch", "seq"]]
    assert m["signature"]["outputs"][0]["shape"] == ["batch", 384]
    assert m["fallbacks"] == [] and m["numerics"]["runtime_checked"] is True
    runner = nf.load(fp32_bundle.path)
    got = runner(ids, mask)
    assert isinstance(got, torch.Tensor) and got.shape == (N_EVAL, 384)
    fid = evaluate_embeddings(ref, got)
    assert fid.n == N_EVAL
    assert fid.cosine_mean >= 0.99999, fid
    assert fid.cosine_min >= 0.99999, fid
    assert fid.nn_agreement == 1.0, fid
    # numpy in, numpy out
    got_np = runner(ids[:8].numpy(), mask[:8].numpy())
    assert evaluate_embeddings(ref[:8], torch.from_numpy(got_np)).cosine_min >= 0.99999


def test_fp32_bundle_verifies(fp32_bundle):
    report = nf.verify(fp32_bundle.path)
    assert report["passed"] and report["runtime_vs_expected"]["cosine_min"] >= 0.9999


def test_w8_bundle_is_smaller_and_close(fp32_bundle, w8_bundle, eval_batch):
    ids, mask, ref = eval_batch
    c = w8_bundle.manifest["compression"]
    assert c["bytes_before"] == fp32_bundle.manifest["compression"]["bytes_after"]
    assert c["bytes_before"] / c["bytes_after"] >= 1.5, c["ratio"]
    assert c["ratio"] >= 1.5
    assert all(layer["encoding"].startswith("i8") for layer in c["layers"] if layer["op"] == "linear")
    # the files on disk shrink too (weights are stored as int8 codes, not decoded copies)
    fp32_w = fp32_bundle.manifest["files"]["weights.safetensors"]["size"]
    w8_w = w8_bundle.manifest["files"]["weights.safetensors"]["size"]
    assert fp32_w / w8_w >= 1.5
    assert fp32_bundle.deploy_bytes / w8_bundle.deploy_bytes >= 1.5
    got = nf.load(w8_bundle.path)(ids, mask)
    fid = evaluate_embeddings(ref, got)
    assert fid.cosine_mean >= 0.99, fid
    assert fid.nn_agreement >= 0.95, fid
    assert fid.cosine_mean < 0.999999          # it really is quantised

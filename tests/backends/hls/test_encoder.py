"""Whole encoders through the hls backend: token ids and an attention mask in (int inputs), the
mask logic, embeddings, mean pooling and L2 normalisation lowered to templates; the C-simulation
must equal the bit-accurate emulation exactly and the fp32 model within tolerance.

The default model (all-MiniLM-L6-v2, sparse24-w4) is marked slow; a two-layer BERT of the same
structure runs in the default suite."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nnforge as nf

# ap_fixed<24, 8> activations, int16 dense weights: cosine to the fp32 model of the small encoder.
TOL_COS = 0.9999


def _cos(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _check(bundle, inputs):
    runner = nf.load(bundle.path)
    xs = [x.numpy() for x in inputs]
    got = runner.run_numpy(xs)[0]
    assert np.array_equal(got.reshape(-1), runner.emulate(xs)[0].reshape(-1))
    return got


@pytest.fixture
def hls_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NNFORGE_HLS_CACHE", str(tmp_path / "hls-cache"))


@pytest.mark.slow  # gpt2 on hls (test_architectures) covers attention in the default run
def test_small_encoder_with_mask_matches_emulation_and_fp32(tmp_path, hls_cache):
    transformers = pytest.importorskip("transformers")
    from nnforge.models.default import DefaultModel
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    model = DefaultModel(transformers.BertModel(cfg)).eval()
    ids = torch.randint(1, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 5:] = 0                                  # padding: masked keys, mean over real tokens only
    b = nf.compile(model, "alveo-u280", example_inputs=(ids, mask), input_names=["input_ids", "attention_mask"],
                   output_names=["embeddings"], name="tiny_bert", out=tmp_path / "tiny", progress=False)
    got = _check(b, (ids, mask))
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    assert _cos(got, ref).min() >= TOL_COS, _cos(got, ref)


@pytest.mark.slow
def test_default_model_sparse24_w4(tmp_path, hls_cache):
    """all-MiniLM-L6-v2 with sparse24-w4, exported with free batch and seq: the bundle's design is
    specialised to the check inputs ([2, 16]); it compiles, runs in C-simulation, equals the
    emulation bit for bit and the compressed graph's fp32 reference within the bundle's tolerance;
    another size ([3, 11]) builds its own design, also bit-exact; the simulation report is in the bundle."""
    from nnforge.models import default as dm
    model, tok = dm.load_default_model()           # in the default install: a missing package is a failure
    calib, evals = dm.sentence_splits()

    def enc(texts):
        e = tok(list(texts), padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        return e["input_ids"].to(torch.int64), e["attention_mask"].to(torch.int64)

    b = nf.compile(model, "alveo-u280", "sparse24-w4", example_inputs=enc(evals[:2]),
                   calibration=[enc(calib[i:i + 2]) for i in range(0, 8, 2)],
                   input_names=["input_ids", "attention_mask"], output_names=["embeddings"], name="minilm",
                   dynamic_shapes=dm.dynamic_shapes(), out=tmp_path / "minilm", progress=False)
    num = b.manifest["numerics"]
    assert num["backend_vs_reference"]["cosine_min"] >= num["tolerance"]["cosine_min"]
    assert b.manifest["backend"]["entry"]["dims"] == {"batch": 2, "seq": 16}
    _check(b, enc(evals[10:12]))
    e = tok(list(evals[20:23]), padding="max_length", truncation=True, max_length=11, return_tensors="pt")
    _check(b, (e["input_ids"], e["attention_mask"]))

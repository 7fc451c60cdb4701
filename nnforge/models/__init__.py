"""Models that ship with nnforge: the embedded default model (all-MiniLM-L6-v2 with mean pooling)
with its sentence data set, and small zoo models for structure tests. Nothing is downloaded."""
from .default import (DefaultModel, docstring_sentences, encode, evaluate_embeddings, load_default_model,
                      sentence_splits, sentences)
from .zoo import ZOO, zoo_model

__all__ = ["DefaultModel", "docstring_sentences", "encode", "evaluate_embeddings", "load_default_model", "sentence_splits", "sentences",
           "ZOO", "zoo_model"]

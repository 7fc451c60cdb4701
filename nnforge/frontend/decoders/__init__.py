"""Decoder LLMs: reading a causal LM (loader), what the builder needs to know about it (spec), and
its decoder-form graph with the KV cache as state (builder)."""
from .builder import build, cache_shape, state_pairs
from .loader import LoadedCausalLM, load_causal_lm
from .spec import DecoderSpec, LayerSpec, RopeSpec, WeightNames, spec_from_config

__all__ = ["build", "cache_shape", "state_pairs", "LoadedCausalLM", "load_causal_lm", "DecoderSpec", "LayerSpec", "RopeSpec", "WeightNames",
           "spec_from_config"]

"""Decoder LLMs: reading a causal LM (loader), what the builder needs to know about it (spec)."""
from .loader import LoadedCausalLM, load_causal_lm
from .spec import DecoderSpec, LayerSpec, RopeSpec, WeightNames, spec_from_config

__all__ = ["LoadedCausalLM", "load_causal_lm", "DecoderSpec", "LayerSpec", "RopeSpec", "WeightNames",
           "spec_from_config"]

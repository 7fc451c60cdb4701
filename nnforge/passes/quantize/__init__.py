"""Quantisation passes: weight formats, round-to-nearest, GPTQ."""
from .formats import FormatError, WeightFormat, parse_format
from .gptq import QuantizeGPTQ, gptq_quantize
from .rtn import QuantizeRTN

__all__ = ["FormatError", "WeightFormat", "parse_format", "QuantizeGPTQ", "gptq_quantize", "QuantizeRTN"]

"""Quantisation passes: weight formats, round-to-nearest, GPTQ, AWQ, activation quantisation, SmoothQuant."""
from .activations import QuantizeActivations, SmoothQuant
from .awq import AWQ
from .formats import FormatError, WeightFormat, parse_format
from .gptq import QuantizeGPTQ, gptq_quantize
from .mixed import MixedPrecision, knapsack
from .rtn import QuantizeRTN

__all__ = ["AWQ", "FormatError", "WeightFormat", "parse_format", "QuantizeActivations", "SmoothQuant", "QuantizeGPTQ",
           "gptq_quantize", "MixedPrecision", "knapsack", "QuantizeRTN"]

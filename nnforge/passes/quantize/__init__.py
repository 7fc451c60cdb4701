"""Quantisation passes."""
from .rtn import QuantizeRTN

__all__ = ["QuantizeRTN"]

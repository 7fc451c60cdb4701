"""Low-rank passes: truncated SVD, activation-aware (whitened) SVD, and low-rank compensation of a
quantised layer's error (EoRA)."""
from .eora import QuantizeEoRA
from .svd import LowRankASVD, LowRankSVD, split_lowrank

__all__ = ["LowRankSVD", "LowRankASVD", "QuantizeEoRA", "split_lowrank"]

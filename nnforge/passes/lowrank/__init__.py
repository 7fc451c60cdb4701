"""Low-rank passes: truncated SVD, activation-aware (whitened) SVD, and low-rank compensation of a
quantised layer's error (EoRA)."""

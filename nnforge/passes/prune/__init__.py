"""Pruning passes: N:M and block sparsity (magnitude, SparseGPT), and structured pruning that
shrinks the graph (attention heads, MLP channels, blocks)."""

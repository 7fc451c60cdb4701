"""Pruning passes: N:M and block sparsity (magnitude, SparseGPT), and structured pruning that
shrinks the graph (attention heads, MLP channels, blocks)."""
from .sparsity import *  # noqa: F401,F403
from .slicegpt import *  # noqa: F401,F403
from .structured import *  # noqa: F401,F403

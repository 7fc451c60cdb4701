"""Graphs shared by the pass tests, built from real (seeded torch-initialised) weights."""
from __future__ import annotations

import torch

from nnforge.ir import Dense, Graph, tensor
from tests.conftest import tiny_mlp


def mlp_graph(model=None) -> Graph:
    """conftest.tiny_mlp as IR: x[batch, 16] -> fc1 (16->32) -> gelu -> fc2 (32->8)."""
    model = model or tiny_mlp()
    fc1, fc2 = model[0], model[2]
    g = Graph("mlp")
    x = g.add_input("x", tensor("f32", "batch", 16))
    w1 = g.add_weight("fc1.weight", Dense(fc1.weight.detach().clone()))
    b1 = g.add_weight("fc1.bias", Dense(fc1.bias.detach().clone()))
    w2 = g.add_weight("fc2.weight", Dense(fc2.weight.detach().clone()))
    b2 = g.add_weight("fc2.bias", Dense(fc2.bias.detach().clone()))
    h = g.op("linear", x, w1, b1, name="fc1")
    a = g.op("gelu", h, name="act")
    g.set_outputs([g.op("linear", a, w2, b2, name="fc2")])
    return g


def inputs(n: int = 6, seed: int = 0, features: int = 16) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed))


def weight_bytes(g: Graph) -> int:
    return sum(v.encoding.nbytes for v in g.weights.values())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(-1).double(), b.reshape(-1).double(), dim=0))

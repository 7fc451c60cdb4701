"""The small encoder the backend tests compile end to end: every kind of op a sentence encoder
has (embedding, masked attention, GELU MLP, layer norm, masked mean pooling) at toy sizes."""
from __future__ import annotations

import torch


class TinyEncoder(torch.nn.Module):
    """Embedding, masked single-head attention, GELU MLP, layer norm, masked mean pooling."""

    def __init__(self, width: int = 16, vocab: int = 50):
        super().__init__()
        torch.manual_seed(0)
        self.scale = float(width) ** 0.5
        self.emb = torch.nn.Embedding(vocab, width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, ids, mask):
        h = self.emb(ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / self.scale
        scores = scores.masked_fill(mask[:, None, :] == 0, float("-inf"))
        h = self.norm(h + torch.softmax(scores, -1) @ v)
        h = self.norm(h + self.mlp(h))
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def encoder_inputs(batch: int, seq: int, seed: int, vocab: int = 50):
    """(ids, mask) with the first sequence half padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, seq // 2:] = 0
    return ids, mask

"""A backend's capability table against what its lowering did: one small graph per layer op
(linear, matmul, conv, embedding) and a representative set of weight encodings for it, some of
which a backend runs natively and some it must widen or decode (odd code widths, act-order,
FP4/FP6 codes, palettes, N:M, 1:8, block and 1x1 (CSR) sparsity, low-rank factors)."""
from __future__ import annotations

import dataclasses

import torch

from nnforge.ir import Dense, Graph, LowRank, Palettized, Sparse, tensor
from nnforge.ir.encodings import rows_cols
from nnforge.passes.quantize.formats import parse_format, quantize_rtn

COLS = 64                                           # every weight's 2-D view has 64 columns
SHAPES = {"linear": (16, COLS), "matmul": (COLS, 16), "conv": (8, 4, 4, 4), "embedding": (50, COLS)}


def rtn(w: torch.Tensor, spec: str, group_size: int | None = None):
    return quantize_rtn(w, parse_format(spec, group_size=group_size))


def _nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = rows_cols(tuple(w.shape))
    groups = w.reshape(rows, cols // m, m).abs()
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(w.shape)


def _block_mask(w: torch.Tensor) -> torch.Tensor:
    rows, cols = rows_cols(tuple(w.shape))
    blocks = torch.arange(rows * cols // 4).reshape(rows, cols // 4) % 2 == 0
    return blocks.repeat_interleave(4, dim=1).reshape(w.shape)


def _palette(shape, bits: int, gen: torch.Generator) -> Palettized:
    rows, cols = rows_cols(shape)
    indices = torch.randint(0, 1 << bits, (rows, cols), generator=gen)
    return Palettized.from_indices(indices, torch.randn(1, 1 << bits, generator=gen), bits=bits, shape=shape)


def encodings(shape, seed: int = 0) -> dict[str, object]:
    """Label -> an encoding of a random weight of ``shape``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.1
    rows, cols = rows_cols(tuple(shape))
    rank = 4
    int3 = rtn(w, "int3")
    return {
        "dense": Dense(w),
        "int8": rtn(w, "int8"),
        "uint4": rtn(w, "uint4"),
        "int4-g16": rtn(w, "int4", 16),
        "int4-g8": rtn(w, "int4", 8),
        "int3": int3,
        "int8-act-order": dataclasses.replace(rtn(w, "int8"), perm=torch.randperm(cols, generator=gen)),
        "int3-act-order": dataclasses.replace(int3, perm=torch.randperm(cols, generator=gen)),
        "e4m3": rtn(w, "e4m3"),
        "e5m2-g32": rtn(w, "e5m2", 32),
        "e2m1": rtn(w, "e2m1"),
        "mxfp6": rtn(w, "mxfp6"),
        "nvfp4": rtn(w, "nvfp4"),
        "palette-2": _palette(tuple(shape), 2, gen),
        "palette-3": _palette(tuple(shape), 3, gen),
        "sparse-2:4": Sparse.from_mask(w, _nm_mask(w, 2, 4), "2:4"),
        "sparse-2:4-int4": Sparse.from_mask(w, _nm_mask(w, 2, 4), "2:4", lambda v: rtn(v, "int4", 16)),
        "sparse-2:4-int3": Sparse.from_mask(w, _nm_mask(w, 2, 4), "2:4", lambda v: rtn(v, "int3")),
        "sparse-1:8": Sparse.from_mask(w, _nm_mask(w, 1, 8), "1:8"),
        "sparse-block1x4": Sparse.from_mask(w, _block_mask(w), "block1x4"),
        # CSR with a few values kept, as SpQR's outliers beside a quantised layer
        "sparse-block1x1": Sparse.from_mask(w, w.abs() > 0.2, "block1x1"),
        "lowrank": LowRank(tuple(shape), Dense(torch.randn(rank, cols, generator=gen)),
                           Dense(torch.randn(rows, rank, generator=gen))),
        "lowrank-int3": LowRank(tuple(shape), rtn(torch.randn(rank, cols, generator=gen), "int3"),
                                Dense(torch.randn(rows, rank, generator=gen))),
    }


def layer_graph(op: str, enc) -> Graph:
    """One ``op`` layer whose weight (``layer.weight``) has encoding ``enc``."""
    g = Graph(f"one_{op}")
    w = g.add_weight("layer.weight", enc)
    if op == "linear":
        x = g.add_input("x", tensor("f32", "batch", enc.shape[1]))
        y = g.op("linear", x, w, None, name="layer")
    elif op == "matmul":
        x = g.add_input("x", tensor("f32", "batch", enc.shape[0]))
        y = g.op("matmul", x, w, name="layer")
    elif op == "conv":
        x = g.add_input("x", tensor("f32", "batch", enc.shape[1], 6, 6))
        y = g.op("conv", x, w, None, stride=[1, 1], padding=[0, 0, 0, 0], dilation=[1, 1], groups=1, name="layer")
    else:
        g.meta["vocab"] = enc.shape[0]
        ids = g.add_input("ids", tensor("i64", "batch", 3))
        y = g.op("embedding", ids, w, name="layer")
    g.set_outputs([y])
    return g


def cases():
    """(op, label, graph) for every layer op and every encoding."""
    return [(op, label, layer_graph(op, enc)) for op, shape in SHAPES.items()
            for label, enc in encodings(shape).items()]


def explained(lines: list[str], row) -> bool:
    """``nnforge targets --explain`` lists ``row`` (its op, encoding kind and how)."""
    return any(line.split()[:2] == [row.op, row.encoding] and line.rstrip().endswith(row.how) for line in lines)

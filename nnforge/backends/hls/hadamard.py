"""The ``hadamard`` op for the hls backend: ``H_a^T X H_c`` on x viewed ``[groups, a, c]`` (the
block's Kronecker factors, ``ir.hadamard.hadamard_split``) as two fixed-weight products on the
matrix unit (``nf::matmat``), each factor a dense weight, with permutes (``nf::permute``) that put
the small factor's axis last for the second product and back after it.

    >>> LOWERINGS["hadamard"](plan, node, "n_rotate")     # [MatMat, Strided, MatMat, Strided]
"""
from __future__ import annotations

import math

import torch

from ...ir.encodings import Dense
from ...ir.hadamard import hadamard_matrix, hadamard_split
from . import layers as L
from .project import LOWERINGS
from .weights import mat_weights



def _product(plan, node, name: str, size: int, src: str, dst: str, rows: int) -> L.MatMat:
    """rows of ``src`` times ``hadamard_matrix(size)``: the matrix unit computes x W^T, so W is the
    factor's transpose (a Paley factor is not symmetric)."""
    w = Dense(hadamard_matrix(size, dtype=torch.float32).T.contiguous())
    # entries +-1/sqrt(size): every code is the largest, so only the row scale is rounded (to a
    # fixed-point mantissa, as every layer's); nothing of a user's weight to report
    mw = mat_weights(w, f"node {node.name} (hadamard factor {size})", plan.opts.dense_weight_bits, [])
    return L.MatMat(name, node.name, [src], dst, w=mw, rows=rows, scale_bits=plan.opts.scale_bits,
                    chain=plan.opts.chain)


@LOWERINGS.register("hadamard")
def _hadamard(plan, node, name):
    x, out = node.inputs[0], node.output
    block = node.attrs["block"]
    c = hadamard_split(block)
    a, n = block // c, math.prod(x.shape)
    if a == 1:
        return [_product(plan, node, name, c, x.name, out.name, n // c)]
    groups, tag = n // block, name[2:]
    right = plan.temp(f"{out.name}.right", f"t_{tag}_right", (groups, a, c))
    cols = plan.temp(f"{out.name}.cols", f"t_{tag}_cols", (groups, c, a))
    left = plan.temp(f"{out.name}.left", f"t_{tag}_left", (groups, c, a))
    return [_product(plan, node, f"{name}_right", c, x.name, right, n // c),
            L.Strided(f"{name}_cols", node.name, [right], cols, out_shape=(groups, c, a), strides=(block, 1, c),
                      offset=0, what=f"[groups, {a}, {c}] -> [groups, {c}, {a}]"),
            _product(plan, node, f"{name}_left", a, cols, left, n // a),
            L.Strided(f"{name}_back", node.name, [left], out.name, out_shape=(groups, a, c), strides=(block, 1, a),
                      offset=0, what=f"[groups, {c}, {a}] -> [groups, {a}, {c}]")]

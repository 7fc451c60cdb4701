"""The mlir module's own kernels (for ops torch-mlir lowers to tm_tensor) equal the reference
kernels, ties, negative indices and repeated writes included."""
from __future__ import annotations

import pytest
import torch

from nnforge.backends.mlir.linalg_kernels import KERNELS
from nnforge.ir.ops import RunContext, get_op

CTX = RunContext()
GEN = torch.Generator().manual_seed(0)
TIES = torch.tensor([[2, 0, 3, 0, 2, 1, 3, 0], [1, 1, 1, 1, 0, 0, 0, 0]])

CASES = {
    "topk_indices": [((torch.randn(3, 7, generator=GEN),), {"k": 3, "axis": 1, "largest": True}),
                     ((torch.randn(5, 2, 4, generator=GEN),), {"k": 5, "axis": 0, "largest": False}),
                     ((TIES,), {"k": 8, "axis": -1, "largest": False}),
                     ((TIES.float(),), {"k": 4, "axis": 1, "largest": True})],
    "index_put": [((torch.randn(5, 3, generator=GEN), torch.randn(6, 3, generator=GEN), torch.tensor([4, 1, 4, 0, -1, 1])),
                   {"accumulate": True}),
                  ((torch.randn(5, 3, generator=GEN), torch.randn(3, 3, generator=GEN), torch.tensor([2, -5, 3])),
                   {"accumulate": False}),
                  ((torch.zeros(3, 4, dtype=torch.int64), torch.tensor(7), torch.tensor([0, 2, 0]), torch.tensor([3, 1, 3])),
                   {"accumulate": True}),
                  ((torch.empty(6, dtype=torch.int64), torch.arange(6), torch.tensor([3, 0, 5, 1, 4, 2])),
                   {"accumulate": False})],
    "cumsum": [((torch.randn(2, 6, generator=GEN),), {"axis": 1}), ((torch.randint(0, 5, (4, 3), generator=GEN),), {"axis": 0})],
    # rows from 1e-38 to 1e30 (E8M0 scales at both ends, subnormal elements) and an all-zero row
    "dynamic_quant": [((torch.randn(4, 64, generator=GEN) * torch.tensor([[1e-38], [1e-3], [1e30], [0.0]]),),
                       {"format": fmt, "group": 0, "clip": 1.0, "global_scale": gs})
                      for fmt, gs in (("e4m3", 0.0), ("mxfp8", 0.0), ("mxfp4", 0.0), ("nvfp4", 0.0), ("nvfp4", 0.5),
                                      ("int4", 0.0))],
}


@pytest.mark.parametrize("op, inputs, attrs", [(op, i, a) for op, cases in CASES.items() for i, a in cases],
                         ids=[f"{op}-{n}" for op, cases in CASES.items() for n in range(len(cases))])
def test_kernel_equals_the_reference(op, inputs, attrs):
    want = get_op(op).run(CTX, list(inputs), attrs)[0]
    got = KERNELS[op](CTX, *inputs, **attrs)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if op == "dynamic_quant":
        assert torch.equal(got, want)

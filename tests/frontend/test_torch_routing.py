"""The routing converters beyond what tests/frontend/test_torch_ops.py runs on every backend: torch's
own grouped matmul (bfloat16 only), and the routing calls nnforge refuses, each naming its node."""
from __future__ import annotations

import pytest
import torch

from nnforge.frontend import from_torch
from nnforge.frontend.errors import UnsupportedOpsError
from nnforge.ir import run_graph


class GroupedByCounts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0)).bfloat16())

    def forward(self, x, ids):
        offs = torch.cumsum(torch.histc(ids.float(), bins=3, min=0, max=2), 0, dtype=torch.int32)
        return torch._grouped_mm(x, self.w, offs=offs)


def test_torch_grouped_mm_runs_each_row_through_its_experts_weight():
    gen = torch.Generator().manual_seed(1)
    model = GroupedByCounts().eval()
    x, ids = torch.randn(6, 8, generator=gen).bfloat16(), torch.tensor([2, 0, 0, 1, 2, 2])
    graph = from_torch(model, (x, ids))
    x2, ids2 = torch.randn(6, 8, generator=gen).bfloat16(), torch.tensor([1, 1, 1, 0, 2, 1])
    with torch.no_grad():
        want = model(x2, ids2)
    # rows 0 (expert 0), 1-4 (expert 1), 5 (expert 2); the interpreter computes in float32, torch
    # rounds its result to bfloat16 once
    torch.testing.assert_close(run_graph(graph, [x2, ids2])[0], want.float(), rtol=1e-2, atol=1e-2)


def _write_around_a_whole_axis(x):
    y = x.clone()
    y[torch.tensor([0]), :, torch.tensor([1])] = 1.0
    return y


class Fn(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


@pytest.mark.parametrize("f, message", [
    (lambda x: torch.histc(x, bins=4), (r"aten.histc.default at node histc .*: histc with min == max takes its "
                                        r"range from the data; give the range explicitly")),
    (_write_around_a_whole_axis,
     r"aten.index_put.default at node index_put .*None \(whole\) dimensions between its index tensors"),
], ids=["histc-without-range", "index_put-gap"])
def test_routing_calls_nnforge_cannot_convert_name_their_node(f, message):
    with pytest.raises(UnsupportedOpsError, match=message):
        from_torch(Fn(f), (torch.randn(3, 4, 5),))

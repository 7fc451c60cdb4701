"""The coreml backend's ``dynamic_quant`` (reduce_max of abs, real_div, half-to-even rounding from
floor and select, clamp, mul, in the program's fp16): the saved MIL program, evaluated in numpy
(mil_numpy, each op rounded to fp16), against the interpreter on the int8/int4 cases of
tests/backends/dynamic_quant_cases.py. A row of halves whose scale is exactly 1 (its amax the
grid's top, clip 1) is equal bit for bit, ties to even included; elsewhere fp16 scales and quotients may move a code next
to a rounding boundary by one step. Minifloat formats are an error naming the node."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import conftest
from tests.backends import dynamic_quant_cases as C

pytest.importorskip("coremltools")

from nnforge.backends.base import BackendError                     # noqa: E402
from nnforge.backends.coreml import MODEL_DIR, CoremlBackend       # noqa: E402
from nnforge.backends.coreml.mil_numpy import ProgramEvaluator     # noqa: E402
from nnforge.backends.coreml.verify import load_program            # noqa: E402
from nnforge.ir import Graph, run_graph, tensor                    # noqa: E402

INT_CASES = [c for c in C.CASES if c[4]["format"] in ("int8", "int4")]
TOP = {"int8": 127, "int4": 7}
# of a group's largest magnitude: one code step (a code moved across a rounding boundary by fp16's
# scale or quotient), plus an fp16 unit of the value
STEP_SLACK, FP16_UNIT = 1.02, 2.0 ** -10
# codes that may move: int8 quotients past 64 hold a code to 1/16 in fp16, so about one in sixteen of
# those lies within fp16 rounding of a half
MOVED_SHARE = 0.1
# halves under a scale of exactly 1 (the shared ties rows hold -127.5 / -7.5, past the top)
HALVES = {"int8": [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 4.5, 126.5, -126.5, 0.0, 63.5, -64.5, 1.0, -1.0],
          "int4": [7.0, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -0.5, -1.5, -2.5, -6.5, -3.5, 0.25, 0.75, 0.0]}


def int_graph() -> Graph:
    g = Graph("dynamic_quant")
    g.set_outputs([g.op("dynamic_quant", g.add_input(name, tensor(dt, *lead, width)), name=f"{name}.quant", **attrs)
                   for name, dt, lead, width, attrs in INT_CASES])
    return g


def inputs(g: Graph, env: dict, seed: int) -> list[torch.Tensor]:
    """The shared cases' inputs of the int cases (the shared helper draws them in CASES order)."""
    full = C.inputs(C.dynamic_quant_graph(), env, seed)
    names = [c[0] for c in C.CASES]
    out = []
    for name, _, _, width, attrs in INT_CASES:
        x = full[names.index(name)].clone()
        x.view(-1, width)[1] = torch.tensor(HALVES[attrs["format"]]).repeat(width // 16)
        out.append(x)
    return out


def test_program_matches_the_interpreter(tmp_path):
    g = int_graph()
    lowered = conftest.lower_into(CoremlBackend(), g, "apple-a17", tmp_path)
    evaluator = ProgramEvaluator(load_program(tmp_path / MODEL_DIR))
    for i, env in enumerate(C.SIZES):
        xs = inputs(g, env, seed=i)
        got = evaluator.run("main", {s["mil_name"]: x.numpy() for s, x in zip(lowered.entry["inputs"], xs)}, {})
        for (name, _, _, width, attrs), x, spec, ref in zip(INT_CASES, xs, lowered.entry["outputs"], run_graph(g, xs)):
            out = torch.from_numpy(got[spec["mil_name"]].astype(np.float32)).reshape(-1, width)
            want = ref.float().reshape(-1, width)
            if attrs.get("clip", 1.0) == 1.0:       # the halves: scale 1, every value exact in fp16
                assert torch.equal(out[1], want[1]), (name, out[1], want[1])
            size = attrs.get("group") or width
            amax = x.float().reshape(-1, size).abs().amax(-1, keepdim=True)
            err = (out - want).reshape(-1, size).abs()
            assert (err <= (STEP_SLACK / TOP[attrs["format"]] + FP16_UNIT) * amax).all(), f"{name} at {env}"
            moved = (err > FP16_UNIT * amax).float().mean()
            assert moved <= MOVED_SHARE, f"{name} at {env}: {float(moved):.1%} of codes moved"


@pytest.mark.parametrize("fmt", ["e4m3", "mxfp8", "mxfp4", "nvfp4"])
def test_minifloat_formats_are_refused_naming_the_node(tmp_path, fmt):
    g = Graph("act")
    g.set_outputs([g.op("dynamic_quant", g.add_input("x", tensor("f32", "batch", 64)), name="act", format=fmt)])
    with pytest.raises(BackendError, match=rf"dynamic_quant \(node act\): {fmt} activations \(MIL has no FP8/FP4"):
        conftest.lower_into(CoremlBackend(), g, "apple-a17", tmp_path)

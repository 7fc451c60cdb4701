"""The coreml backend's ``hadamard`` (reshape and matmuls with the block's Kronecker factors as fp16
constants): the saved MIL program, evaluated in numpy (mil_numpy, each op rounded to fp16 as Core
ML computes), against the interpreter on tests/backends/hadamard_cases.py's graph."""
from __future__ import annotations

import numpy as np
import pytest

from tests import conftest
from tests.backends.hadamard_cases import CASES, SIZES, hadamard_graph, inputs

pytest.importorskip("coremltools")

from nnforge.backends.coreml import MODEL_DIR, CoremlBackend       # noqa: E402
from nnforge.backends.coreml.mil_numpy import ProgramEvaluator     # noqa: E402
from nnforge.ir.hadamard import ONE_PRODUCT                # noqa: E402
from nnforge.backends.coreml.verify import load_program            # noqa: E402
from nnforge.ir import run_graph                                   # noqa: E402

# of the largest reference value: every op of the program rounds to fp16 (one unit in the last
# place is 2^-11 of a value), over a cast, two products and a linear
FP16_RTOL = 4e-3


def test_hadamard_program_matches_the_interpreter(tmp_path):
    g = hadamard_graph()
    lowered = conftest.lower_into(CoremlBackend(), g, "apple-a17", tmp_path)
    assert lowered.entry["mil_ops"]["matmul"] == sum(1 if b <= ONE_PRODUCT else 2 for *_, b in CASES)
    prog = load_program(tmp_path / MODEL_DIR)
    # each block's factors, never its whole matrix
    factors = [op.outputs[0].val for op in prog.functions["main"].operations
               if op.op_type == "const" and "rotate_h" in op.outputs[0].name]
    assert factors and max(f.shape[0] for f in factors) == 64 and all(f.dtype == np.float16 for f in factors)
    evaluator = ProgramEvaluator(prog)
    for i, env in enumerate(SIZES):
        xs = inputs(g, env, seed=i)
        got = evaluator.run("main", {s["mil_name"]: x.numpy() for s, x in zip(lowered.entry["inputs"], xs)}, {})
        for v, spec, ref in zip(g.outputs, lowered.entry["outputs"], run_graph(g, xs)):
            out = got[spec["mil_name"]].astype(np.float64)
            want = ref.double().numpy()
            assert out.shape == want.shape, (v.name, out.shape)
            tol = FP16_RTOL * max(1.0, float(np.abs(want).max()))
            assert np.abs(out - want).max() <= tol, f"{v.name} at {env}"

"""A fixed-seed slice of the differential fuzzer (``make fuzz`` runs it for longer): random graphs
from the op registry, a random compression pipeline each, lowered and run by onnx and tvm (when
installed) and compared with the reference interpreter. Every finding fails the test, with the
directory of its reduced repro in the message."""
from __future__ import annotations

import importlib.util

from nnforge.fuzz.runner import Fuzzer

GRAPHS = 8             # the default run's share; make fuzz runs for longer
BACKENDS = ["onnx"] + (["tvm"] if importlib.util.find_spec("tvm") else [])


def test_fixed_seed_slice(tmp_path):
    fuzzer = Fuzzer(seed=0, backends=BACKENDS, out=tmp_path, pipelines=1, reduce_s=20, bundle_p=0.2, log=None)
    stats = fuzzer.run(graphs=GRAPHS)
    assert stats.graphs == GRAPHS
    assert stats.pipelines_run >= GRAPHS // 2, stats.summary()          # most pipelines apply
    assert stats.passed >= stats.backend_runs // 2, stats.summary()
    assert stats.open_findings == 0, stats.summary()

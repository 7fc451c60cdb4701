"""Differential fuzzing (NNSmith-style): random valid graphs from the op registry's schemas, run
through random compression pipelines and every backend that runs here, each compared with the
reference interpreter on the compressed graph.

    >>> from nnforge.fuzz import GraphGenerator, fuzz
    >>> case = GraphGenerator(seed=1).generate()
    >>> stats = fuzz(graphs=20, seed=0, backends=["onnx", "tvm"], out="build/fuzz-findings")

``python -m nnforge.fuzz --minutes 10`` (``make fuzz``) runs it from the command line; modules:
generator (graphs), proposals/layers (how a node is proposed), stability (when a difference is
not a bug), pipelines, oracle (run a backend, judge it), reduce (shrink a failure), findings
(write and replay them), runner (the loop).
"""
from .generator import Case, GraphGenerator, InputDist
from .runner import Fuzzer, Stats, fuzz

__all__ = ["Case", "GraphGenerator", "InputDist", "Fuzzer", "Stats", "fuzz"]

"""A backend that lives outside nnforge, to show what adding one takes: this folder and one
registration line (``register_backend("toy", "tests.backends.toy:ToyBackend")``), plus a target
file on ``NNFORGE_TARGETS_PATH`` (targets/toy.toml). It runs linear layers with dense weights and
relu/gelu/add in numpy: ``lower`` writes the program and its weights through ``ctx.files``,
``load`` reads them back; everything else (calibration, held-out data, the reference check, the
manifest, verify) is the pipeline's, unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nnforge.backends.base import (Artifact, Backend, BackendError, Capabilities, Capability, InputSpec, LowerContext,
                                   Runner)
from nnforge.bundle.format import safe_join

PROGRAM, WEIGHTS = "toy/program.json", "toy/weights.npz"
UNARY = {"relu": lambda x: np.maximum(x, 0.0),
         "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(__import__("math").erf)(x / np.sqrt(2.0)))}
CAPABILITIES = Capabilities([Capability("linear", "dense", "numpy matmul in float32")])


class ToyBackend(Backend):
    name = "toy"
    capabilities = CAPABILITIES

    def lower(self, graph, target, ctx: LowerContext) -> Artifact:
        steps, arrays = [], {}
        for node in graph.nodes:
            names = [None if v is None else v.name for v in node.inputs]
            if node.op == "linear":
                cap, why = CAPABILITIES.find("linear", node.inputs[1].encoding, target)
                if cap is None:
                    raise BackendError(f"toy backend: node {node.name}: {why}")
                for v in node.inputs[1:]:
                    if v is not None:
                        arrays[v.name] = v.encoding.decode().numpy().astype(np.float32)
            elif node.op not in UNARY and node.op != "add":
                raise BackendError(f"toy backend has no lowering for op {node.op} (node {node.name})")
            steps.append({"op": node.op, "inputs": names, "output": node.output.name})
        program = {"inputs": [{"name": v.name, "dims": list(v.shape)} for v in graph.inputs],
                   "outputs": [v.name for v in graph.outputs], "steps": steps}
        ctx.files.write_bytes(PROGRAM, json.dumps(program, indent=1).encode())
        np.savez(ctx.files.path(WEIGHTS), **arrays)
        return Artifact(files=[PROGRAM, WEIGHTS], entry={"program": PROGRAM, "weights": WEIGHTS})

    def load(self, bundle_dir, entry: dict, device=None) -> Runner:
        return ToyRunner(Path(bundle_dir), entry)

    def times_here(self, target):
        return False, "the toy backend is a test of the backend contract, not a runtime to time"


class ToyRunner(Runner):
    def __init__(self, root: Path, entry: dict):
        self.program = json.loads(safe_join(root, entry["program"]).read_text())
        with np.load(safe_join(root, entry["weights"]), allow_pickle=False) as z:
            self.arrays = {k: z[k] for k in z.files}
        self.inputs = [InputSpec(i["name"], np.float32, tuple(i["dims"])) for i in self.program["inputs"]]
        self.output_names = list(self.program["outputs"])

    def run_numpy(self, inputs: list) -> list:
        env = dict(zip(self.input_names, inputs))
        env.update(self.arrays)
        for step in self.program["steps"]:
            args = [None if n is None else env[n] for n in step["inputs"]]
            if step["op"] == "linear":
                y = args[0] @ args[1].T + (args[2] if len(args) > 2 and args[2] is not None else 0.0)
            elif step["op"] == "add":
                y = args[0] + args[1]
            else:
                y = UNARY[step["op"]](args[0])
            env[step["output"]] = y.astype(np.float32)
        return [env[n] for n in self.output_names]

"""The hls backend: IR -> a Vitis HLS C++ project (FPGA targets alveo-u280, versal-vhk158), run here
by C-simulation (g++ against hls4ml's ap_types headers, called through ctypes).

``lower`` writes the project under ``hls/`` in the bundle (see :mod:`.render`); ``load`` regenerates
the sources from the bundle's graph and weights with the recorded options, refuses a bundle whose
sources differ from them (so only code nnforge generated is ever compiled), builds (cached) and
returns a runner. Numbers: fixed point as chosen in :class:`.project.HlsOptions`; the C-simulation
equals :meth:`.project.Plan.emulate` bit for bit.

    >>> bundle = nf.compile(model, target="alveo-u280", example_inputs=(x,))
    >>> nf.load(bundle.path)(x)          # C-simulation of the generated project
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np

from ...ir import Graph
from ...targets import Target
from ..base import Backend, BackendError, InputSpec, Lowered, Runner
from . import csim, logic, render  # noqa: F401  (logic registers its lowering rules)
from .project import PROJECT, HlsOptions, Plan, build_plan

TB_SEED = 0


class HlsRunner(Runner):
    def __init__(self, plan: Plan, sim: csim.CSim):
        self.plan, self.sim = plan, sim
        dt = {"act": np.float32, "int": np.int64, "bool": np.bool_}
        self.inputs = [InputSpec(v, dt[plan.kinds[v]], plan.shapes[v]) for v in plan.inputs]
        self.output_names = list(plan.outputs)

    def run_numpy(self, inputs: list) -> list:
        outs = self.sim.run(inputs)
        return [y.reshape(self.plan.shapes[v]) for y, v in zip(outs, self.plan.outputs)]


def tb_inputs(plan: Plan) -> list[np.ndarray]:
    """The testbench's recorded inputs: seeded standard normal samples in the input shapes (int
    inputs: integers 0..15, bool inputs: 0 or 1)."""
    rng = np.random.default_rng(TB_SEED)
    hi = {"int": 16, "bool": 2}
    return [rng.standard_normal(plan.shapes[v]).astype(np.float32) if plan.kinds[v] == "act" else
            rng.integers(0, hi[plan.kinds[v]], plan.shapes[v]).astype(np.float32) for v in plan.inputs]


class HlsBackend(Backend):
    name = "hls"
    native = {
        ("linear", "int"): "matrix unit: int2..int8 codes (zero points folded, +1 bit), per-group scale mantissas",
        ("linear", "sparse"): "matrix unit: N:M (2:4, 1:4, ...) kept values + in-group indices, int or float values",
        ("linear", "dense"): "matrix unit: float weights as int<dense_weight_bits> per output channel (reported)",
        ("matmul", "dense"): "matrix unit (constant operand) or activation x activation matmul",
        ("embedding", "dense"): "table lookup in weight memory (int32 raw rows in the activation format)",
    }

    def lower(self, graph: Graph, target: Target, out_dir: Path) -> Lowered:
        opts = HlsOptions.from_target(target)
        plan = build_plan(graph, opts)
        files = render.render(plan, tb_inputs(plan))
        for rel, data in files.items():
            p = Path(out_dir) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        entry = {"project": PROJECT, "top": plan.name, "options": opts.to_dict(),
                 "onchip_activation_bytes": plan.onchip_bytes, "weight_memory_bytes": len(plan.mem.image()),
                 "sources": {rel: hashlib.sha256(data).hexdigest() for rel, data in render.sources(plan).items()}}
        return Lowered(files=sorted(files), entry=entry, fallbacks=plan.fallbacks, toolchain=self.toolchain())

    def load(self, bundle_dir: Path, entry: dict, device: str | None = None) -> Runner:
        if device not in (None, "cpu", "csim"):
            raise BackendError(f"the hls backend runs bundles by C-simulation on the CPU; device {device!r} is not "
                               f"supported (a board run needs the Xilinx runtime)")
        from ...bundle import GRAPH_FILE, WEIGHTS_FILE, safe_join
        from ...ir.serialize import load_graph
        bundle_dir = Path(bundle_dir)
        if not isinstance(entry, dict) or not isinstance(entry.get("options"), dict):
            raise BackendError(f"{bundle_dir}: hls backend entry is missing its options")
        graph = load_graph(safe_join(bundle_dir, GRAPH_FILE), safe_join(bundle_dir, WEIGHTS_FILE))
        plan = build_plan(graph, HlsOptions.from_dict(entry["options"], f"{bundle_dir} manifest"))
        srcs = render.sources(plan)
        for rel, data in srcs.items():
            path = safe_join(bundle_dir, rel)
            if not path.is_file() or path.read_bytes() != data:
                raise BackendError(f"{bundle_dir}: {rel} differs from the project nnforge generates from the bundle's "
                                   f"graph; the bundle was edited or made by another nnforge version: recompile it")
        lib = csim.build(srcs, plan.name, PROJECT)
        sim = csim.CSim(lib, srcs[f"{PROJECT}/weights.bin"], [plan.sizes[plan.ids[v]] for v in plan.inputs],
                        [plan.sizes[plan.ids[v]] for v in plan.outputs])
        return HlsRunner(plan, sim)

    def toolchain(self) -> dict[str, str]:
        out = {}
        try:
            import hls4ml
            out["hls4ml"] = hls4ml.__version__
        except Exception:
            pass
        try:
            out["g++"] = subprocess.run([csim.compiler(), "-dumpfullversion"], capture_output=True,
                                        text=True).stdout.strip()
        except Exception:
            pass
        return out

"""The hls backend: IR -> a Vitis HLS C++ project (FPGA targets alveo-u280, versal-vhk158), run here
by C-simulation (g++ against hls4ml's ap_types headers, called through ctypes).

``lower`` writes the project under ``hls/`` in the bundle (see :mod:`.render`); ``load`` regenerates
the sources from the bundle's graph and weights with the recorded options, refuses a bundle whose
sources differ from them (so only code nnforge generated is ever compiled), builds (cached) and
returns a runner. Numbers: fixed point as chosen in :class:`.project.HlsOptions`; the C-simulation
equals :meth:`.project.Plan.emulate` bit for bit.

Hardware has fixed sizes: a graph with dimension symbols (batch, seq) is specialised before
lowering, with the sizes from the target option ``dims`` (``nf.target("alveo-u280").with_options(
dims={"seq": 128})``) and, for symbols it leaves open, from the bundle's check inputs; the sizes are
recorded in the manifest entry. Called with other sizes, the runner generates and builds the design
for those sizes from the bundle's graph (cached per size), as re-running HLS for a new shape would.

    >>> bundle = nf.compile(model, target="alveo-u280", example_inputs=(x,))
    >>> nf.load(bundle.path)(x)          # C-simulation of the generated project
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np

from ...ir import Graph, GraphError, bind_symbols
from ...ir.simplify import static_form
from ...targets import Target
from ..base import Artifact, Backend, BackendError, InputSpec, LowerContext, ResidentState, Runner
from . import emulate as E
from . import conv, csim, decoder, decoder_kv8, hadamard, logic, pointwise, ranges, render, resources, routing  # noqa: F401  (conv, decoder, decoder_kv8, hadamard, logic, pointwise, routing register lowering rules)
from .capabilities import CAPABILITIES
from .project import LOWERINGS, PROJECT, HlsOptions, Plan, build_plan, kv_layout, kv_words, pack_state, unpack_state

TB_SEED = 0


def static_graph(graph: Graph, dims: dict | None, shapes: dict | None = None,
                 residual_scale: float | None = None) -> tuple[Graph, dict]:
    """``graph`` with its dimension symbols fixed (see the module docstring) and the sizes used: the
    same static form the ``specialize_shapes`` pass gives at compile time (nnforge.ir.simplify), so
    a runner building a design for new sizes generates what a compile for them would; with
    ``residual_scale``, the stream scaled as the compile's activation fit chose (ranges.py)."""
    try:
        env = bind_symbols(graph, dims, shapes)
        static = static_form(graph, env)
    except GraphError as e:
        raise BackendError(f"the hls backend generates fixed-size hardware and needs every dimension fixed: {e} "
                           f"(give sizes with the target option dims, e.g. with_options(dims={{'seq': 128}}))") from None
    return (static if residual_scale is None else ranges.scale_residual(static, residual_scale)), env


def make_sim(plan: Plan, srcs: dict, defines: tuple[str, ...] = ()) -> csim.CSim:
    """The C-simulation of ``plan`` from its rendered sources (``defines``: see csim.build)."""
    lib = csim.build(srcs, plan.name, PROJECT, defines=defines)
    return csim.CSim(lib, srcs[f"{PROJECT}/weights.bin"], [plan.sizes[plan.ids[v]] for v in plan.inputs],
                     [plan.sizes[plan.ids[v]] for v in plan.outputs], kv_words=plan.kv_words)


DTYPES = {"act": np.float32, "int": np.int64, "bool": np.bool_}


class HlsRunner(Runner):
    """Runs the bundle's design; inputs of other sizes get a design generated for their sizes (its
    C-simulation built on first use: :meth:`emulate` needs none). A
    decoder's KV cache is the design's off-chip memory: a call through numpy loads the caches given
    into it and reads them back as the ``.next`` outputs; :meth:`resident` keeps it between steps."""

    def __init__(self, graph: Graph, opts: HlsOptions, env: dict, plan: Plan, sim: csim.CSim | None,
                 residual_scale: float | None = None):
        self.graph, self.opts, self.plan, self.sim = graph, opts, plan, sim
        self.residual_scale = residual_scale
        self.dims = dict(env)
        self._plans = {tuple(sorted(env.items())): plan}
        self._sims = {tuple(sorted(env.items())): sim} if sim is not None else {}
        self.inputs = [InputSpec(v.name, DTYPES[plan.kinds[v.name]], tuple(v.shape)) for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]

    def plan_for(self, shapes: dict) -> tuple[tuple, Plan]:
        """The design's key and plan for the input sizes ``shapes`` ({input: shape})."""
        static, env = static_graph(self.graph, None, shapes, self.residual_scale)
        key = tuple(sorted(env.items()))
        if key not in self._plans:
            self._plans[key] = build_plan(static, self.opts)
        return key, self._plans[key]

    def design_for(self, shapes: dict) -> tuple[Plan, csim.CSim]:
        """The plan and C-simulation for the input sizes ``shapes`` (built on first use)."""
        key, plan = self.plan_for(shapes)
        if key not in self._sims:
            self._sims[key] = make_sim(plan, render.sources(plan))
        return plan, self._sims[key]

    def design(self, inputs: list) -> tuple[Plan, csim.CSim]:
        """The plan and C-simulation for the sizes of ``inputs`` (built on first use)."""
        return self.design_for({v.name: list(np.shape(x)) for v, x in zip(self.graph.inputs, inputs)})

    def _call(self, inputs: list, emulated: bool) -> list:
        shapes = {v.name: list(np.shape(x)) for v, x in zip(self.graph.inputs, inputs)}
        plan, sim = (self.plan_for(shapes)[1], None) if emulated else self.design_for(shapes)
        given = dict(zip(self.input_names, inputs))
        check_positions(plan, given)
        ports = [given[v] for v in plan.inputs]
        kv = np.zeros(plan.kv_words, np.int64 if emulated else np.int32)
        for inp, _ in plan.state:
            plan.load_state(kv, inp, given[inp])
        outs = plan.emulate(ports, kv) if emulated else sim.run(ports, kv if plan.kv_words else None)
        # the C-simulation writes every output as floats; int and bool outputs get their own dtype back
        got = {v: y.reshape(plan.shapes[v]).astype(DTYPES[plan.kinds[v]], copy=False) for y, v in zip(outs, plan.outputs)}
        got.update({out: plan.read_state(kv, inp) for inp, out in plan.state})
        return [got[v] for v in self.output_names]

    def run_numpy(self, inputs: list) -> list:
        return self._call(inputs, emulated=False)

    def emulate(self, inputs: list) -> list:
        """The bit-accurate Python emulation of the design for these inputs (what run_numpy returns)."""
        return self._call(inputs, emulated=True)

    def resident(self, state_pairs, tokens, logits):
        if not self.plan.state or set(self.plan.inputs) != set(tokens) or logits not in self.plan.outputs:
            return None
        return ResidentKv(self, tokens, logits)

    def values(self, inputs: list, wanted: list) -> tuple[dict, dict]:
        """Every activation the design computes (the ``wanted`` IR values it has), from the
        bit-accurate emulation of its layers; the emulated outputs are checked against the
        C-simulation's."""
        feeds = [np.ascontiguousarray(np.asarray(t)) for t in inputs]
        plan = self.plan_for({v.name: list(np.shape(x)) for v, x in zip(self.graph.inputs, feeds)})[1]
        given = dict(zip(self.input_names, feeds))
        kv = np.zeros(plan.kv_words, np.int64)
        for inp, _ in plan.state:
            plan.load_state(kv, inp, given[inp])
        names = {v.name for v in wanted}
        act, env, values = plan.opts.act, plan.emulate_env([given[v] for v in plan.inputs], kv), {}
        for layer in plan.layers:
            if plan.kinds.get(layer.output, "act") == "act" and (not names or layer.output in names):
                values[layer.output] = E.to_float(env[layer.output], act).reshape(plan.shapes[layer.output])
        csim = self.run_numpy(self.check_inputs(feeds))
        emulated = self.emulate(feeds)
        exact = all(np.array_equal(np.asarray(e), np.asarray(c).reshape(np.shape(e))) for e, c in zip(emulated, csim))
        return values, {"exposed": len(values), "how": "bit-accurate emulation of the design's layers (equal to its "
                        "C-simulation bit for bit)", "emulation_equals_csim": exact}


def check_positions(plan: Plan, given: dict) -> None:
    """A decoder's positions must be slots of its cache: the design would read its last slot for a
    later one (and write none), so the runner refuses them before anything runs."""
    from .decoder import KvWrite
    from .decoder_kv8 import Kv8Write
    for layer in plan.layers:
        if isinstance(layer, (KvWrite, Kv8Write)):
            pos = np.asarray(given[layer.inputs[1]])
            if pos.size and (pos.min() < 0 or pos.max() >= layer.max_len):
                raise BackendError(f"input {layer.inputs[1]}: positions {int(pos.min())}..{int(pos.max())} are outside "
                                   f"the KV cache of {layer.max_len} slots written by node {layer.node}")


class ResidentKv(ResidentState):
    """The decoder's KV cache kept in the design's off-chip memory (an int32 array the C-simulation
    reads and writes in place) between prefill and decode calls: only the logits come back."""

    def __init__(self, runner: HlsRunner, tokens: tuple[str, str], logits: str):
        self.runner, self.tokens, self.logits = runner, tokens, logits
        self.shapes: dict = {}
        self.kv = np.zeros(0, np.int32)

    def reset(self, shapes: dict) -> None:
        # the regions in the graph's state order, as project._kv_state lays them out
        self.shapes = {inp: list(shapes[inp]) for inp, _ in self.runner.graph.state_pairs()}
        self.regions, n = kv_layout(self.runner.plan.kv_forms, self.shapes)
        self.kv = np.zeros(n, np.int32)

    def _words(self, name: str) -> np.ndarray:
        off, shape = self.regions[name]
        return self.kv[off:off + kv_words(self.runner.plan.kv_forms.get(name, "act"), int(np.prod(shape)))]

    def run(self, token_ids, positions):
        given = {self.tokens[0]: np.asarray(token_ids), self.tokens[1]: np.asarray(positions)}
        plan, sim = self.runner.design_for({**{k: list(np.shape(v)) for k, v in given.items()}, **self.shapes})
        check_positions(plan, given)
        outs = sim.run([given[v] for v in plan.inputs], self.kv)
        return outs[plan.outputs.index(self.logits)].reshape(plan.shapes[self.logits])

    def read(self, name: str):
        return unpack_state(self.runner.plan.kv_forms.get(name, "act"), self._words(name), self.shapes[name],
                            self.runner.opts.act)

    def write(self, values: dict) -> None:
        self.reset({inp: list(np.shape(values[inp])) for inp, _ in self.runner.graph.state_pairs()})
        for inp in self.shapes:          # the values held before were as the design stores them: exact
            self._words(inp)[...] = pack_state(self.runner.plan.kv_forms.get(inp, "act"), values[inp],
                                               self.runner.opts.act)


def tb_inputs(plan: Plan) -> list[np.ndarray]:
    """The testbench's recorded inputs: seeded standard normal samples in the input shapes (int
    inputs: integers 0..15, bool inputs: 0 or 1)."""
    rng = np.random.default_rng(TB_SEED)
    hi = {"int": 16, "bool": 2}
    return [rng.standard_normal(plan.shapes[v]).astype(np.float32) if plan.kinds[v] == "act" else
            rng.integers(0, hi[plan.kinds[v]], plan.shapes[v]).astype(np.float32) for v in plan.inputs]


REPORT_DIR = "fpga"


DECODE_PROMPT, DECODE_TOKENS = 128, 512     # a decoder's simulated inference, within its max_len


def simulation_report(graph: Graph, target: Target, plan: Plan) -> dict[str, bytes]:
    """The accelerator simulation of this graph on the target (nnforge.fpga): its table, JSON summary
    and plots, as bundle files. An encoder's inference is a prefill of the tokens the linears see
    (the rows of the weight-matrix layers), generating nothing; a decoder's (a graph with a KV cache
    as state) is a prefill of DECODE_PROMPT tokens, then DECODE_TOKENS decode steps, both cut to fit
    its max_len, so the summary carries prefill and decode tokens/s. A graph the simulator cannot
    model gets a JSON file saying why, not a failed compile."""
    from ... import fpga
    from .layers import MatMat
    caches = [v for v in graph.inputs if v.name in dict(graph.state_pairs()) and len(v.shape) == 4]
    if caches and any(n.op == "attention" for n in graph.nodes):
        max_len = int(caches[0].shape[2])
        rows = max(1, min(DECODE_PROMPT, max_len // 2))
        generate = max(1, min(DECODE_TOKENS, max_len - rows))
    else:
        rows = max([layer.rows for layer in plan.layers if isinstance(layer, MatMat)] + [1])
        generate = 0
    try:
        r = fpga.simulate(graph, target.name, prompt=rows, generate=generate)
    except fpga.SimulatorError as e:
        return {f"{REPORT_DIR}/simulation.json": json.dumps({"skipped": str(e)}, indent=1).encode()}
    summary = {**r.summary(), "notes": list(r.notes), "parameters": str(r.params.path)}
    if not generate:
        summary.update(tokens_per_inference=rows, inferences_per_s=1.0 / r.prefill_s if r.prefill_s else None)
    return {f"{REPORT_DIR}/simulation.json": json.dumps(summary, indent=1).encode(),
            f"{REPORT_DIR}/simulation.txt": (fpga.format_table(r) + "\n").encode(),
            **{f"{REPORT_DIR}/{name}": data for name, data in fpga.plot_files(r).items()}}


class HlsBackend(Backend):
    name = "hls"
    capabilities = CAPABILITIES
    lowers = LOWERINGS

    def times_here(self, target: Target) -> tuple[bool, str]:
        return False, ("a C-simulation's run time says nothing about the FPGA: fpga/simulation.txt holds the "
                       "accelerator model's latency estimate")

    def prepare(self, target: Target, shapes: dict) -> list:
        """Hardware has fixed sizes: every dimension symbol is fixed before lowering, from the target
        option ``dims`` first and the check inputs' ``shapes`` for the rest."""
        dims = target.options.get("dims")
        if dims is not None and not isinstance(dims, dict):
            raise BackendError(f"target {target.name}: option dims must be a table of symbol = size, got {dims!r}")
        return self.decompositions() + [{"pass": "specialize_shapes", "dims": dims, "shapes": shapes}]

    def lower(self, graph: Graph, target: Target, ctx: LowerContext) -> Artifact:
        opts = HlsOptions.from_target(target)
        if any(not isinstance(d, int) for v in graph.inputs for d in v.shape):
            raise BackendError(f"the hls backend generates fixed-size hardware: graph {graph.name} still has "
                               f"dimension symbols ({', '.join(str(list(v.shape)) for v in graph.inputs)}); lower it "
                               "after its prepare passes")
        static, opts, activation_fit = ranges.fit(graph, opts, ctx.reference)
        env = dict(ctx.symbols)
        plan = build_plan(static, opts)
        files = render.render(plan, tb_inputs(plan))
        files.update(simulation_report(static, target, plan))
        est = resources.estimate(plan, device=getattr(target, "fpga", None) or None)
        files[f"{REPORT_DIR}/resources.json"] = json.dumps(est, indent=1).encode()
        files[f"{REPORT_DIR}/resources.txt"] = (resources.format_estimate(est) + "\n").encode()
        for rel, data in files.items():
            ctx.files.write_bytes(rel, data)
        entry = {"project": PROJECT, "top": plan.name, "options": opts.to_dict(), "dims": env,
                 "onchip_activation_bytes": plan.onchip_bytes,
                 "resource_estimate": {k: est["total"][k] for k in ("dsp", "bram36", "lut", "ff")}, "weight_memory_bytes": len(plan.mem.image()),
                 "sources": {rel: hashlib.sha256(data).hexdigest() for rel, data in render.sources(plan).items()}}
        if activation_fit is not None:
            entry["activation_fit"] = activation_fit
        sim = json.loads(files[f"{REPORT_DIR}/simulation.json"])
        if "skipped" not in sim:      # the accelerator model's estimate (nnforge.fpga), not a measurement
            entry["simulation"] = {"estimated_by": "nnforge.fpga simulator", **{k: sim[k] for k in (
                "prompt", "generate", "prefill_tokens_per_s", "decode_tokens_per_s", "resources")}}
        return Artifact(files=sorted(files), entry=entry, fallbacks=plan.fallbacks, toolchain=self.toolchain())

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
        opts = HlsOptions.from_dict(entry["options"], f"{bundle_dir} manifest")
        dims = entry.get("dims", {})
        if not isinstance(dims, dict):
            raise BackendError(f"{bundle_dir}: hls backend entry dims must be a table, got {dims!r}")
        scale = (entry.get("activation_fit") or {}).get("residual_scale")
        static, env = static_graph(graph, dims, residual_scale=scale)
        plan = build_plan(static, opts)
        srcs = render.sources(plan)
        for rel, data in srcs.items():
            path = safe_join(bundle_dir, rel)
            if not path.is_file() or path.read_bytes() != data:
                raise BackendError(f"{bundle_dir}: {rel} differs from the project nnforge generates from the bundle's "
                                   f"graph; the bundle was edited or made by another nnforge version: recompile it")
        return HlsRunner(graph, opts, env, plan, make_sim(plan, srcs), residual_scale=scale)

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

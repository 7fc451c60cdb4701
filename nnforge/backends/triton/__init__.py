"""The triton backend: encoded linear weights and the ``hadamard`` op run by the Triton kernels of
:mod:`.kernels`, the rest of the graph by torch, on one NVIDIA GPU (targets ``h100`` and ``a100``).

Files it adds to a bundle (the graph itself is the bundle's ``graph.json`` + ``weights.safetensors``,
read in place, so dense weights are stored once):

- ``triton_weights.safetensors``: each kernel-run weight in its kernel's layout, under
  ``<weight>.<field>``; the manifest entry keeps each one's module, format, shape and meta.
- ``kernels/<module>.py``: the source of every kernel module used (and of the kernel package's
  ``__init__`` and ``common``, and of any module one borrows from), with its sha256 in the entry.
  They are a record, never imported: a load runs the installed nnforge's kernels and refuses a
  bundle whose recorded sources differ from them (built by another nnforge: recompile), since
  packed layouts are only defined by that source.

Which weights run in a kernel is the capability table's answer (:mod:`.capabilities`, one row per
op and encoding kind). Weights no row takes (3-bit codes, a ``matmul`` operand, an embedding
table...) are decoded at load and run by torch; each is a :class:`~nnforge.backends.base.Fallback`
in the manifest naming the weight and the table's reason. Lowering needs no GPU; running needs CUDA, or
``TRITON_INTERPRET=1`` (set before triton is imported) to run on the CPU in Triton's interpreter,
slowly, which is how CI runs these bundles (the targets' "cuda" requirement counts the interpreter, so
``nf.load``, ``nf.verify`` and the compile-time numerics check all run there).

Target options it reads: ``compute_dtype`` ("float16", the default, or "bfloat16": the operand type
of linears and matmuls) and ``cuda_graphs`` (default true; ``NNFORGE_CUDA_GRAPHS=0`` turns them off
at load).

    >>> artifact = TritonBackend().lower(graph, get_target("h100"), ctx)
    >>> runner = TritonBackend().load(bundle_dir, artifact.entry)      # CUDA, or TRITON_INTERPRET=1
    >>> y = runner(x)
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import torch

from ...ir import Graph, symbolic as sym
from ...targets import Target
from ..base import Artifact, Backend, BackendError, InputSpec, LowerContext, ResidentState, Runner, RuntimeSpec
from .capabilities import CAPABILITIES
from .kernels import interpreting
from .lower import KERNEL_PACKAGE, PACKED_FILE, lower_graph, module_source, sha256_of

COMPUTE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None) -> torch.device:
    """The device to run on: CUDA when present (``None``), or the CPU under Triton's interpreter."""
    cuda = torch.cuda.is_available()
    if device is None:
        device = "cuda" if cuda else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BackendError(f"the triton backend runs on 'cuda' (or 'cpu' with TRITON_INTERPRET=1), not {device!r}") \
            from None
    if dev.type == "cuda" and not cuda:
        raise BackendError(f"device {device!r}: no CUDA GPU is visible; the triton backend needs one "
                           "(or TRITON_INTERPRET=1 and device 'cpu' to run in Triton's CPU interpreter, slowly)")
    if dev.type == "cpu" and not interpreting():
        raise BackendError("the triton backend needs a CUDA GPU" + ("" if cuda else ", and none is visible") +
                           "; set TRITON_INTERPRET=1 before triton is imported to run on the CPU in Triton's "
                           "interpreter (slow; this is how CI runs these bundles)")
    if dev.type not in ("cuda", "cpu"):
        raise BackendError(f"the triton backend runs on 'cuda' or 'cpu', not {device!r}")
    return dev


def check_kernel_sources(bundle_dir: Path, kernels: dict) -> dict:
    """The installed kernel modules, after checking that each bundled source is unchanged and is
    the source installed here (a packed layout means what its own source says, nothing else)."""
    from ...bundle import safe_join
    modules = {}
    for name, info in kernels.items():
        rel, digest = info["file"], info["sha256"]
        path = safe_join(bundle_dir, rel)
        if not path.is_file():
            raise BackendError(f"{path}: kernel source {name} recorded by the bundle is missing")
        if sha256_of(path) != digest:
            raise BackendError(f"{path}: sha256 differs from the {digest} recorded when the bundle was built")
        qualified = KERNEL_PACKAGE if name == "__init__" else f"{KERNEL_PACKAGE}.{name}"
        try:
            module = importlib.import_module(qualified)
        except Exception as e:
            raise BackendError(f"{path}: the bundle needs kernel module {qualified}, which this nnforge cannot "
                               f"import ({type(e).__name__}: {e})") from None
        installed = sha256_of(module_source(module))
        if installed != digest:
            raise BackendError(f"{path}: the bundle was built with a different {qualified} than the one installed "
                               f"(sha256 {digest[:12]}... vs {installed[:12]}...): built by another nnforge version; "
                               "recompile the model with this one")
        fmt = getattr(module, "FORMAT", None)
        if info.get("format") != fmt:
            raise BackendError(f"{path}: kernel module {qualified} has FORMAT {fmt!r}, the bundle says "
                               f"{info.get('format')!r}")
        modules[name] = module
    return modules


def read_packed(bundle_dir: Path, entry: dict, modules: dict, device: torch.device) -> dict[str, tuple]:
    """weight name -> (kernel module, PackedWeight on ``device``) as the entry describes them."""
    linears = entry.get("linears") or {}
    if not linears:
        return {}
    from safetensors import SafetensorError, safe_open
    from ...bundle import safe_join
    from .kernels import PackedWeight
    path = safe_join(bundle_dir, entry.get("packed") or PACKED_FILE)
    out = {}
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            keys = set(f.keys())
            for wname, spec in linears.items():
                tensors = {}
                for field, key in spec["tensors"].items():
                    if key not in keys:
                        raise BackendError(f"{path}: weight {wname} needs tensor {key!r}, which is missing")
                    tensors[field] = f.get_tensor(key)
                if spec["module"] not in modules:
                    raise BackendError(f"{path}: weight {wname} names kernel module {spec['module']!r}, "
                                       "whose source the bundle does not record")
                pw = PackedWeight(spec["format"], int(spec["n"]), int(spec["k"]), tensors, dict(spec.get("meta") or {}))
                out[wname] = (modules[spec["module"]], pw.to(device))
    except (OSError, SafetensorError) as e:
        raise BackendError(f"{path}: cannot read the packed weights: {e}") from None
    return out


def dense_weights(graph: Graph, packed: dict, compute_dtype: torch.dtype, device: torch.device) -> dict:
    """Every weight the plan reads as a tensor, decoded once. One only matmul-like ops read is
    kept in the compute dtype (half the memory); any other stays fp32, as the interpreter has it."""
    from .launcher import MATMUL_LIKE, to_compute
    users: dict[str, set[str]] = {}
    for node in graph.nodes:
        for k, v in enumerate(node.inputs):
            if v is not None and v.is_weight and not (node.op == "linear" and k == 1 and v.name in packed):
                users.setdefault(v.name, set()).add(node.op)
    for v in graph.outputs:
        if v.is_weight:
            users.setdefault(v.name, set()).add("output")
    out = {}
    for name, ops in users.items():
        enc = graph.weights[name].encoding
        try:
            t = enc.decode(torch.float32 if enc.dtype.is_float else None)
        except Exception as e:
            raise BackendError(f"weight {name} ({enc.describe()}) failed to decode: {e}") from e
        out[name] = (to_compute(t, compute_dtype) if ops <= set(MATMUL_LIKE) else t).to(device)
    return out


def _dims(shape) -> tuple:
    return tuple(d if isinstance(d, int) or sym.is_symbol(d) else None for d in shape)


class TritonRunner(Runner):
    """A bundle's graph as a :class:`~.launcher.Plan` on ``device``. ``cuda_graphs`` (default:
    the entry's, off when ``NNFORGE_CUDA_GRAPHS=0``) replays batch-1 calls from CUDA graphs."""

    def __init__(self, bundle_dir: Path, entry: dict, device: torch.device, cuda_graphs: bool | None = None):
        from ...bundle import safe_join
        from ...ir import GraphError, load_graph
        from .launcher import Launcher, Plan
        try:
            graph_rel, weights_rel = entry["graph"], entry["weights"]
            kernels, cdt = dict(entry["kernels"]), COMPUTE_DTYPES[entry["compute_dtype"]]
        except (KeyError, TypeError) as e:
            raise BackendError(f"{bundle_dir}: triton backend entry is missing or malformed ({e!r})") from None
        modules = check_kernel_sources(bundle_dir, kernels)
        try:
            graph = load_graph(safe_join(bundle_dir, graph_rel), safe_join(bundle_dir, weights_rel))
        except GraphError as e:
            raise BackendError(f"{bundle_dir}: cannot read the graph: {e}") from None
        packed = read_packed(bundle_dir, entry, modules, device)
        self.device = device
        self.inputs = [InputSpec(v.name, np.dtype(v.dtype.name), _dims(v.shape)) for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        if entry.get("act_linears") and "intact" not in modules:
            raise BackendError(f"{bundle_dir}: the entry lists int8 x int8 linears but records no intact kernel "
                               "source; recompile")
        plan = Plan(graph, dense_weights(graph, packed, cdt, device), packed, cdt, entry.get("fp8_linears"),
                    entry.get("hadamards") or (), entry.get("act_linears"))
        if cuda_graphs is None:
            cuda_graphs = bool(entry.get("cuda_graphs", True)) and os.environ.get("NNFORGE_CUDA_GRAPHS", "1") != "0"
        self.launcher = Launcher(plan, device, cuda_graphs)

    def run_torch(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run on torch tensors in the graph's dtypes; outputs stay on the device."""
        return self.launcher(list(inputs))

    def run_numpy(self, inputs: list) -> list:
        outs = self.launcher([torch.from_numpy(x) for x in inputs])
        return [(o.float() if o.dtype == torch.bfloat16 else o).cpu().numpy() for o in outs]

    def resident(self, state_pairs, tokens, logits):
        return Resident(self, state_pairs, tokens, logits)


class Resident(ResidentState):
    """A decoder's KV cache held on the device between steps, in its stored dtypes (an encoded
    cache's codes and scales). The plan writes caches in place (:mod:`.decoder`), so a step hands
    each state tensor in and gets the same tensor back; only the logits leave the device. On CUDA
    (and with the runner's CUDA graphs on) a one-token step of each batch size is captured once,
    the state tensors inside the graph as themselves, and replayed; ``reset`` zeroes the state
    where it lies so that those captures stay valid."""

    def __init__(self, runner: TritonRunner, state_pairs, tokens, logits):
        from .launcher import ShapeCache, capture_cuda_graph
        names, outs = runner.input_names, runner.output_names
        missing = [n for n in [*tokens, *(i for i, _ in state_pairs)] if n not in names] + \
            [n for n in [logits, *(o for _, o in state_pairs)] if n not in outs]
        if missing:
            raise BackendError(f"the bundle's graph has no input or output {missing} of the decoder's state")
        self.runner, self.pairs, self.tokens = runner, list(state_pairs), tokens
        self.logits = outs.index(logits)
        self.outputs = {i: outs.index(o) for i, o in self.pairs}
        self.state: dict[str, torch.Tensor] = {}
        launcher = runner.launcher
        slots = [names.index(i) for i, _ in self.pairs]
        self.graphs = None
        if launcher.graphs is not None and set(slots) <= set(launcher.plan.written_inputs):
            self.graphs = ShapeCache(launcher._eager, lambda xs: capture_cuda_graph(
                launcher._eager, xs, keep=set(slots), returns={self.logits}))

    def _dtypes(self) -> dict:
        return {spec.name: torch.from_numpy(np.zeros(0, spec.dtype)).dtype for spec in self.runner.inputs}

    def reset(self, shapes):
        dtypes = self._dtypes()
        if self.state and all(list(self.state[i].shape) == list(shapes[i]) for i, _ in self.pairs):
            for t in self.state.values():
                t.zero_()
            return
        self.state = {i: torch.zeros(shapes[i], dtype=dtypes[i], device=self.runner.device) for i, _ in self.pairs}
        if self.graphs is not None:        # captured on the old tensors
            self.graphs.entries.clear()

    def run(self, token_ids, positions):
        given = {self.tokens[0]: torch.from_numpy(np.asarray(token_ids, np.int64)),
                 self.tokens[1]: torch.from_numpy(np.asarray(positions, np.int64))}
        launcher = self.runner.launcher
        inputs = launcher.own_inputs([given[n] if n in given else self.state[n] for n in self.runner.input_names],
                                     copy=False)
        one_token = np.asarray(token_ids).shape[1] == 1
        outs = self.graphs(inputs) if self.graphs is not None and one_token else launcher._eager(inputs)
        self.state = {i: outs[k] for i, k in self.outputs.items()}
        return outs[self.logits].float().cpu().numpy()

    def read(self, name):
        return self.state[name].cpu().numpy()

    def write(self, values):
        dtypes = self._dtypes()
        self.state = {i: torch.from_numpy(np.ascontiguousarray(values[i])).to(self.runner.device, dtypes[i]).clone()
                      for i, _ in self.pairs}
        if self.graphs is not None:        # captured on the old tensors
            self.graphs.entries.clear()


class TritonBackend(Backend):
    name = "triton"
    runtime = RuntimeSpec("triton", "triton", 2)       # kernel sources follow the language of a major.minor
    capabilities = CAPABILITIES

    def lower(self, graph: Graph, target: Target, ctx: LowerContext) -> Artifact:
        return lower_graph(graph, target, ctx.files, self.toolchain())

    def load(self, bundle_dir: Path, entry: dict, device: str | None = None) -> Runner:
        return TritonRunner(Path(bundle_dir), entry, resolve_device(device))

    def times_here(self, target: Target) -> tuple[bool, str]:
        if interpreting() or not torch.cuda.is_available():
            return False, ("Triton runs in its CPU interpreter here (TRITON_INTERPRET=1), whose times say nothing "
                           "about a GPU; benchmarks/gpu_gemm.py measures the kernels on one")
        return True, f"Triton kernels run on {torch.cuda.get_device_name()}"

    def toolchain(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return {"triton": version("triton")}
        except PackageNotFoundError:
            return {}


__all__ = ["TritonBackend", "TritonRunner", "Resident", "resolve_device", "check_kernel_sources", "interpreting"]

"""The coreml backend: IR -> a MIL program (iOS 18 / macOS 15 opset) -> ``model.mlpackage``, run by
Core ML on Apple devices (CPU, GPU, Neural Engine).

The program computes in fp16; weights stay compressed as Core ML constexpr ops where Core ML can
hold their encoding (``weights.emit_weight``), and every mapping or widening is a reported
:class:`Fallback`. Symbolic dims of the graph inputs become flexible ranges of the model's inputs
(``RangeDim``, upper bound from the target's ``dim_bounds`` / ``max_dim`` options, default 512).
Names Core ML does not accept are renamed with ``weights.mil_name``; each rename is in the entry
and reported. After saving, ``verify.verify_package`` re-reads the package (weights bit-exact
against the graph's encodings, the op graph) and its report goes into the entry.

Core ML predictions need macOS: ``lower`` works anywhere coremltools installs, ``load`` only on
macOS (the apple targets require it, so ``nf.load`` refuses earlier elsewhere).
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from ...ir import Graph
from ...targets import Target
from ..base import Artifact, Backend, BackendError, Fallback, InputSpec, LowerContext, Runner, RuntimeSpec
from .mil_types import IO_NP as _IO_NP, MODEL_DIR, np_name as _np_name
from .capabilities import CAPABILITIES

DEFAULT_MAX_DIM = 512           # upper bound of a flexible dim when the target gives none


def _bounds(target: Target, symbol: str) -> tuple[int, int]:
    """(lower, upper) of a flexible dim: ``options.dim_bounds[symbol]``, else 1..``options.max_dim``."""
    opts = target.options
    given = (opts.get("dim_bounds") or {}).get(symbol)
    if given is not None:
        if (not isinstance(given, (list, tuple)) or len(given) != 2 or not all(isinstance(g, int) for g in given)
                or not 1 <= given[0] <= given[1]):
            raise BackendError(f"target {target.name}: dim_bounds.{symbol} must be [lower, upper] with "
                               f"1 <= lower <= upper, got {given!r}")
        return int(given[0]), int(given[1])
    upper = opts.get("max_dim", DEFAULT_MAX_DIM)
    if not isinstance(upper, int) or upper < 1:
        raise BackendError(f"target {target.name}: max_dim must be a positive integer, got {upper!r}")
    return 1, upper


def _deployment(target: Target):
    import coremltools as ct
    name = target.options.get("deployment_target", "iOS18")
    found = getattr(ct.target, str(name), None)
    if found is None or found < ct.target.iOS18:
        raise BackendError(f"target {target.name}: deployment_target {name!r} is not one this backend builds for "
                           "(iOS18 / macOS15 or later: the compressed-weight ops are iOS 18 opset)")
    return name, found


def _summary(graph: Graph) -> str:
    kinds = Counter(v.encoding.describe() for v in graph.weights.values())
    return ", ".join(f"{n} x {k}" for k, n in kinds.most_common(6))


class CoremlRunner(Runner):
    """Core ML predictions of a saved package (macOS only): inputs by their mapped names, outputs
    back in graph order with the graph's dtypes (int64 and bool restored from int32)."""

    def __init__(self, path: Path, entry: dict, device: str | None):
        import coremltools as ct
        units = {None: ct.ComputeUnit.ALL, "all": ct.ComputeUnit.ALL, "cpu": ct.ComputeUnit.CPU_ONLY,
                 "gpu": ct.ComputeUnit.CPU_AND_GPU, "ane": ct.ComputeUnit.CPU_AND_NE}
        if device not in units:
            raise BackendError(f"the coreml backend runs on devices {', '.join(k for k in units if k)}; "
                               f"got {device!r}")
        try:
            self.model = ct.models.MLModel(str(path), compute_units=units[device])
        except Exception as e:
            raise BackendError(f"{path}: Core ML cannot load it: {str(e).splitlines()[0]}") from None
        self.entry = entry
        self.inputs = [InputSpec(i["name"], np.dtype(i["dtype"]), tuple(i["dims"])) for i in entry["inputs"]]
        self.output_names = [o["name"] for o in entry["outputs"]]

    def run_numpy(self, inputs: list) -> list:
        feed = {}
        for spec, x in zip(self.entry["inputs"], inputs):
            want = _IO_NP[spec["io_dtype"]]
            if np.dtype(want).kind == "i" and x.dtype != want and x.size and (x.max() > 2**31 - 1 or x.min() < -2**31):
                raise BackendError(f"input {spec['name']}: values beyond int32, which Core ML takes")
            feed[spec["mil_name"]] = x.astype(want)     # int64 ids -> int32, bool -> int32 (stated casts)
        try:
            got = self.model.predict(feed)
        except Exception as e:
            raise BackendError(f"Core ML failed on inputs {', '.join(f'{k} {list(v.shape)}' for k, v in feed.items())}: "
                               f"{str(e).splitlines()[0]}") from None
        return [np.asarray(got[o["mil_name"]]).astype(o["dtype"]) for o in self.entry["outputs"]]


class CoremlBackend(Backend):
    name = "coreml"
    runtime = RuntimeSpec("coremltools", "coremltools", 1)     # Core ML reads older packages within a major
    capabilities = CAPABILITIES

    @property
    def lowers(self):
        from .ops import LOWERINGS             # (imported when asked: the rules import coremltools lazily)
        return LOWERINGS

    def prepare(self, target: Target, shapes: dict[str, list[int]]) -> list[dict]:
        """The decompositions, and with the target's ``residual_scale`` option the residual stream
        scaled by it (passes/residual_scale.py): the program computes in fp16."""
        scale = target.options.get("residual_scale")
        return self.decompositions() + ([{"pass": "scale_residual", "factor": scale}] if scale is not None else [])

    def lower(self, graph: Graph, target: Target, ctx: LowerContext) -> Artifact:
        """Write ``model.mlpackage`` for ``graph``. Example:

        >>> CoremlBackend().lower(graph, get_target("apple-a17"), ctx)
        """
        import coremltools as ct
        from .lower import build_program, input_type, op_signature, output_type
        deploy_name, deploy = _deployment(target)
        from .decoder import is_decoder, lower_decoder
        if is_decoder(graph, ctx):
            return lower_decoder(self, graph, target, ctx, deploy_name, deploy)
        prog, lw = build_program(graph, deploy, target)
        symbols: dict[str, list[int]] = {}
        specs, entry_inputs = [], []
        for v in graph.inputs:
            mil = lw.name_of_input(v)
            dims = []
            for d in v.shape:
                if isinstance(d, int):
                    dims.append(d)
                else:
                    lo, hi = symbols.setdefault(d, list(_bounds(target, d)))
                    dims.append(ct.RangeDim(lower_bound=lo, upper_bound=hi, default=lo))
            io_dtype = input_type(v)
            specs.append(ct.TensorType(name=mil, shape=ct.Shape(dims), dtype=_IO_NP[io_dtype]))
            entry_inputs.append({"name": v.name, "mil_name": mil, "dtype": _np_name(v.dtype),
                                 "io_dtype": io_dtype, "dims": list(v.shape)})
        try:
            # coremltools draws a progress bar per pass pipeline on stderr, unasked: a compile's own
            # progress (nf.compile(progress=True)) is the only one a user should see
            with contextlib.redirect_stderr(io.StringIO()):
                model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=deploy, inputs=specs,
                                   compute_precision=ct.precision.FLOAT16,
                                   skip_model_load=sys.platform != "darwin")    # no Core ML runtime elsewhere
        except Exception as e:
            raise BackendError(f"core ml backend: coremltools could not convert the program of graph {graph.name}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        entry_outputs = [{"name": v.name, "mil_name": lw.name_of_output(i), "dtype": _np_name(v.dtype),
                          "io_dtype": output_type(v)} for i, v in enumerate(graph.outputs)]
        self._describe(model, graph, target, ctx.recipe, entry_inputs, entry_outputs, symbols)
        path = ctx.files.path(MODEL_DIR)
        model.save(str(path))
        files = sorted(f"{MODEL_DIR}/{p.relative_to(path).as_posix()}" for p in path.rglob("*") if p.is_file())
        mil_ops = Counter(t for types in lw.op_map.values() for t in types)
        entry = {"model": MODEL_DIR, "deployment_target": deploy_name, "compute_precision": "float16",
                 "inputs": entry_inputs, "outputs": entry_outputs, "flexible_dims": symbols,
                 "renamed": {k: v for k, v in lw.renamed.items() if v}, "weights": lw.weight_names,
                 "mil_ops": dict(sorted(mil_ops.items()))}
        entry["verify"] = self._verify(path, graph, op_signature(graph, lw), lw.weight_names, set(lw.perms),
                                       lw.plain)
        entry["weight_forms"] = entry["verify"].pop("weight_forms")
        return Artifact(files=files, entry=entry, fallbacks=lw.fallbacks, toolchain=self.toolchain())

    @staticmethod
    def _describe(model, graph: Graph, target: Target, recipe: str, inputs: list, outputs: list,
                  symbols: dict) -> None:
        """Metadata a person reads in Xcode, and nnforge's own keys (user_defined_metadata)."""
        from ...version import __version__
        model.author = "nnforge"
        model.version = __version__
        model.license = ""
        model.short_description = (f"{graph.name} compiled by nnforge {__version__} for {target.name}, recipe "
                                   f"{recipe} (weights: {_summary(graph) or 'none'})")
        for spec in inputs:
            model.input_description[spec["mil_name"]] = (f"graph input {spec['name']}: {spec['dtype']} "
                                                         f"{spec['dims']} (fed as {spec['io_dtype']})")
        for spec in outputs:
            model.output_description[spec["mil_name"]] = (f"graph output {spec['name']}: {spec['dtype']} "
                                                          f"(returned as {spec['io_dtype']})")
        meta = model.user_defined_metadata
        meta["nnforge.version"] = __version__
        meta["nnforge.graph"] = graph.name
        meta["nnforge.target"] = target.name
        meta["nnforge.recipe"] = str(recipe)
        meta["nnforge.flexible_dims"] = json.dumps(symbols)
        meta["nnforge.inputs"] = json.dumps({s["name"]: s["mil_name"] for s in inputs})
        meta["nnforge.outputs"] = json.dumps({s["name"]: s["mil_name"] for s in outputs})

    @staticmethod
    def _verify(path: Path, graph: Graph, op_map: dict, names: dict, permuted: set, plain: set,
                functions: dict | None = None) -> dict:
        """verify.verify_package on the saved package: weights bit-exact (``permuted``: those kept
        in stored column order; ``plain``: those stored as plain consts, which coremltools may
        fold away), op order by ``op_map`` (``functions``: per function of a multifunction
        package, each checked on its own)."""
        import dataclasses
        from . import verify
        try:
            report = verify.verify_package(path, graph, op_map, names=names, permuted=permuted, plain=plain,
                                           functions=functions)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"core ml backend: checking the saved {MODEL_DIR} of graph {graph.name} failed: "
                               f"{type(e).__name__}: {e}") from e
        out = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(report)
        from .capabilities import weight_forms
        out["weight_forms"] = weight_forms(report.weights)     # lifted into the entry by lower
        out["op_map"] = {k: list(v) for k, v in sorted(op_map.items())}
        return json.loads(json.dumps(out, default=str))       # the manifest is JSON

    def load(self, bundle_dir: Path, entry: dict, device: str | None = None) -> Runner:
        if sys.platform != "darwin":
            raise BackendError("Core ML predictions need macOS (the Core ML runtime); this machine is "
                               f"{sys.platform}: the bundle's model.mlpackage runs on an Apple device or Mac")
        from ...bundle import safe_join
        if not isinstance(entry, dict) or not isinstance(entry.get("inputs"), list) or \
                not isinstance(entry.get("outputs"), list):
            raise BackendError("coreml backend entry is missing or malformed (needs model, inputs, outputs)")
        if entry.get("stateful"):
            from .stateful import load_stateful
            return load_stateful(safe_join(Path(bundle_dir), entry.get("model")), entry, device)
        return CoremlRunner(safe_join(Path(bundle_dir), entry.get("model")), entry, device)

    def toolchain(self) -> dict[str, str]:
        import coremltools
        return {"coremltools": coremltools.__version__}


__all__ = ["CoremlBackend", "CoremlRunner", "MODEL_DIR", "Fallback"]

"""The steps behind ``nnforge.compile``: import, check the import, compress, lower, check numerics,
write the bundle. ``api.py`` only wires these together."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .bundle import (FORMAT, FORMAT_VERSION, GRAPH_FILE, REF_EXPECTED, REF_FP32, REF_INPUTS, WEIGHTS_FILE,
                     BundleWriter, save_tensors, write_manifest)
from .backends.base import Backend, BackendError
from .frontend.errors import FrontendError
from .ir import Graph, Interpreter, WEIGHT_OPS, save_graph
from .numerics import BACKEND_TOLERANCE, FP32_TOLERANCE, compare, json_safe, within, within_rounding
from .targets import Target


def as_tuple(inputs) -> tuple:
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs)
    return (inputs,)


def import_model(model, example_inputs, *, dynamic_shapes=None, input_names=None, output_names=None,
                 name=None) -> tuple[Graph, str]:
    """(IR graph, source kind) for a torch module, an ExportedProgram, an .onnx path or a Graph."""
    if isinstance(model, Graph):
        return model, "ir"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.suffix.lower() != ".onnx":
            raise FrontendError(f"{path}: only .onnx files are read as models (pass a torch module otherwise)")
        from .frontend.onnx_import import from_onnx
        return from_onnx(path, name=name, output_names=output_names), "onnx"
    if isinstance(model, torch.export.ExportedProgram):
        from .frontend import from_exported_program
        return from_exported_program(model, name=name or "model", input_names=input_names,
                                     output_names=output_names, dynamic_shapes=dynamic_shapes), "torch.export"
    if isinstance(model, torch.nn.Module):
        from .frontend import from_torch
        return from_torch(model, as_tuple(example_inputs), dynamic_shapes=dynamic_shapes, input_names=input_names,
                          output_names=output_names, name=name), "torch"
    raise FrontendError(f"cannot compile a {type(model).__name__}: pass a torch.nn.Module, an ExportedProgram "
                        "or the path of an .onnx file")


def check_import(model, graph: Graph, inputs: tuple) -> dict:
    """The imported graph on the reference interpreter against the torch model itself."""
    if not isinstance(model, torch.nn.Module):
        return {}
    with torch.no_grad():
        want = model(*inputs)
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    got = Interpreter(graph).run(*inputs)
    metrics = compare(got, want)
    if not within(metrics, FP32_TOLERANCE):
        raise FrontendError(f"{graph.name}: the imported graph disagrees with the torch model "
                            f"(cosine {metrics['cosine_min']:.6f} < {FP32_TOLERANCE['cosine_min']}); "
                            "this is an nnforge frontend bug, please report it")
    return json_safe(metrics)


def compression_report(original: Graph, compressed: Graph) -> dict:
    """Bytes before/after and per-layer encodings of the weights of weight-carrying ops."""
    layers = []
    for n in compressed.nodes:
        if n.op not in WEIGHT_OPS or len(n.inputs) < 2 or n.inputs[1] is None or not n.inputs[1].is_weight:
            continue
        w = n.inputs[1]
        enc = w.encoding
        layers.append({"layer": n.name, "op": n.op, "weight": w.name, "shape": list(w.shape),
                       "encoding": enc.describe(), "bits_per_weight": round(enc.bits_per_weight, 4),
                       "bytes": enc.nbytes})
    before = sum(v.encoding.nbytes for v in original.weights.values())
    after = sum(v.encoding.nbytes for v in compressed.weights.values())
    layer_params = sum(torch.Size(layer["shape"]).numel() for layer in layers)
    layer_bytes = sum(layer["bytes"] for layer in layers)
    return {"bytes_before": before, "bytes_after": after, "ratio": round(before / max(after, 1), 4),
            "layer_bits_per_weight": round(8 * layer_bytes / max(layer_params, 1), 4), "layers": layers}


def write_bundle(out: Path, *, graph: Graph, original: Graph, source: str, target: Target, backend: Backend,
                 recipe_name: str, passes, records, check_inputs: tuple, import_check: dict,
                 timings: dict, started: float) -> None:
    t0 = time.perf_counter()
    fp32 = Interpreter(original).run(*check_inputs)
    expected = Interpreter(graph).run(*check_inputs)
    fidelity = json_safe(compare(expected, fp32))
    timings["reference_s"] = time.perf_counter() - t0
    graph.meta["recipe"] = recipe_name       # backends that label their artifacts (Core ML metadata) read it
    # backends that build fixed-size designs (hls) take the sizes the bundle is checked with
    graph.meta["example_shapes"] = {v.name: list(torch.as_tensor(x).shape) for v, x in zip(graph.inputs, check_inputs)}
    with BundleWriter(out) as tmp:
        t0 = time.perf_counter()
        save_graph(graph, tmp / GRAPH_FILE, tmp / WEIGHTS_FILE)
        lowered = backend.lower(graph, target, tmp)
        timings["lower_s"] = time.perf_counter() - t0
        save_tensors(tmp / REF_INPUTS, {f"input{i}": torch.as_tensor(x) for i, x in enumerate(check_inputs)})
        save_tensors(tmp / REF_EXPECTED, {f"output{i}": t for i, t in enumerate(expected)})
        save_tensors(tmp / REF_FP32, {f"output{i}": t for i, t in enumerate(fp32)})
        runs, why = target.can_run()
        numerics = {"inputs": [list(torch.as_tensor(x).shape) for x in check_inputs],
                    "reference": "nnforge reference interpreter (fp32)",
                    "fidelity_vs_fp32": fidelity, "tolerance": BACKEND_TOLERANCE}
        if runs:
            t0 = time.perf_counter()
            runner = backend.load(tmp, lowered.entry)
            got = runner(*[torch.as_tensor(x) for x in check_inputs])
            got = list(got) if isinstance(got, tuple) else [got]
            metrics = compare(got, expected)
            timings["runtime_check_s"] = time.perf_counter() - t0
            rounds = any(n.op == "fake_quant" for n in graph.nodes)
            if rounds and not within(metrics, BACKEND_TOLERANCE):
                vs_fp32 = compare(got, fp32)
                ok, allowed = within_rounding(vs_fp32, fidelity)
                numerics["backend_vs_fp32"] = json_safe(vs_fp32)
                numerics["check"] = (f"activations are rounded at run time: backend vs fp32 cosine "
                                     f"{vs_fp32['cosine_min']:.6f} must be >= {allowed:.6f} (the reference's "
                                     f"{fidelity['cosine_min']:.6f}, see nnforge.numerics)")
                if not ok:
                    raise BackendError(f"{backend.name} backend output drifts from fp32 further than rounding explains "
                                       f"for {graph.name} on {target.name}: cosine vs fp32 "
                                       f"{vs_fp32['cosine_min']:.6f} < {allowed:.6f} (reference interpreter: "
                                       f"{fidelity['cosine_min']:.6f})")
            elif not within(metrics, BACKEND_TOLERANCE):
                raise BackendError(f"{backend.name} backend output disagrees with the reference interpreter for "
                                   f"{graph.name} on {target.name}: cosine {metrics['cosine_min']:.6f} < "
                                   f"{BACKEND_TOLERANCE['cosine_min']}, max abs error {metrics['max_abs_error']:.3g}")
            numerics["backend_vs_reference"] = json_safe(metrics)
            numerics["runtime_checked"] = True
        else:
            numerics["runtime_checked"] = False
            numerics["runtime_skipped_because"] = why
        timings["total_s"] = time.perf_counter() - started
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "nnforge_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"name": graph.name, "source": source, "frontend_check": import_check},
            "target": target.to_dict(),
            "backend": {"name": backend.name, "entry": lowered.entry, "files": lowered.files,
                        "toolchain": lowered.toolchain},
            "toolchain": {"python": platform.python_version(), "torch": torch.__version__,
                          "platform": f"{sys.platform}-{platform.machine()}", **lowered.toolchain},
            "recipe": {"name": recipe_name, "passes": [{"pass": p.name, **_jsonable(p.options())} for p in passes]},
            "signature": {"inputs": [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)}
                                     for v in graph.inputs],
                          "outputs": [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)}
                                      for v in graph.outputs]},
            "compression": compression_report(original, graph),
            "numerics": numerics,
            "fallbacks": [f.to_dict() for f in lowered.fallbacks],
            "passes": [r.to_dict() for r in records],
            "timings": {k: round(v, 4) for k, v in timings.items()},
        }
        write_manifest(tmp, manifest)


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else str(v)) for k, v in d.items()}

"""The steps behind ``nnforge.compile``: import, check the import, compress, lower, check numerics,
write the bundle. ``api.py`` only wires these together."""
from __future__ import annotations

import math
import os
import platform
import re
import sys
import time
import zipfile
from pathlib import Path

import torch

from . import __version__
from .bundle import (FORMAT, FORMAT_VERSION, GRAPH_FILE, REF_EXPECTED, REF_FP32, REF_HELD_OUT, REF_INPUTS, WEIGHTS_FILE,
                     BundleWriter, save_tensors, write_manifest)
from .backends.base import Backend, BackendError
from .frontend.errors import FrontendError
from .ir import Graph, Interpreter, WEIGHT_OPS, sanitize_name, save_graph
from .ir.encodings import Dense
from .speed import speed_shapes
from .numerics import BACKEND_TOLERANCE, FP32_TOLERANCE, compare, fidelity, json_safe, within, within_rounding
from .targets import Target


def as_tuple(inputs) -> tuple:
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs)
    return (inputs,)


# Model files nnforge reads, by suffix. Torch files are told apart by content: a TorchScript
# archive (code/ inside the zip), a pickle of an nn.Module, or weights only (a state dict).
TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".jit", ".torchscript"}
MODEL_FILES = ".onnx (ONNX), .pt2 (torch.export.save; trust_code=True), .pt/.pth/.bin/.ckpt/.pkl/.jit " \
              "(TorchScript or a pickled nn.Module; trust_code=True)"


def import_model(model, example_inputs, *, dynamic_shapes=None, input_names=None, output_names=None,
                 name=None, trust_code: bool = False) -> tuple[Graph, str]:
    """(IR graph, source kind) for a torch module, an ExportedProgram, a Graph, or a model file.

    A model file is an .onnx file, or with ``trust_code=True`` a file whose loading runs code: a
    TorchScript archive, a pickled nn.Module or a torch.export .pt2 archive. Without it these are
    refused before anything in them is unpickled or run (see :func:`read_torch_file`)."""
    if isinstance(model, Graph):
        return model, "ir"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.suffix.lower() == ".onnx":
            from .frontend.onnx_import import from_onnx
            return from_onnx(path, name=name, output_names=output_names), "onnx"
        loaded, source = read_torch_file(path, trust_code=trust_code)
        program = _script_to_export(loaded, example_inputs, path) if source == "torchscript" else loaded
        graph, _ = import_model(program, example_inputs, dynamic_shapes=dynamic_shapes, input_names=input_names,
                                output_names=output_names, name=name or sanitize_name(path.stem))
        if isinstance(loaded, torch.nn.Module):
            graph.meta["frontend_check"] = check_import(loaded, graph, as_tuple(example_inputs))
        return graph, source
    if isinstance(model, torch.export.ExportedProgram):
        from .frontend import from_exported_program
        return from_exported_program(model, name=name or "model", input_names=input_names,
                                     output_names=output_names, dynamic_shapes=dynamic_shapes), "torch.export"
    if isinstance(model, torch.nn.Module):
        from .frontend import from_torch
        return from_torch(model, as_tuple(example_inputs), dynamic_shapes=dynamic_shapes, input_names=input_names,
                          output_names=output_names, name=name), "torch"
    raise FrontendError(f"cannot compile a {type(model).__name__}: pass a torch.nn.Module, an ExportedProgram "
                        "or the path of a model file: " + MODEL_FILES)


def _torch_archive_kind(path: Path) -> str:
    """'torchscript', 'pt2' or 'pickle' (a torch.save zip or a plain pickle), from the zip's names."""
    if not zipfile.is_zipfile(path):
        return "pickle"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise FrontendError(f"{path}: not a readable torch file: {e}") from None
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("archive_format") or n.endswith("serialized_exported_program.json") for n in names):
        return "pt2"
    return "pickle"


def load_state_dict(path: str | os.PathLike) -> dict:
    """The tensors of a weights file, read without running code: safetensors, or a torch
    checkpoint through ``torch.load(weights_only=True)`` (a pickle that needs anything but tensors
    and plain containers is refused, naming what it asked for).

        >>> module.load_state_dict(load_state_dict("model.safetensors"))
    """
    path = Path(path)
    if not path.is_file():
        raise FrontendError(f"{path}: no such weights file")
    if path.suffix.lower() == ".safetensors":
        from .bundle import BundleError, load_tensors
        try:
            return load_tensors(path)
        except BundleError as e:
            raise FrontendError(str(e)) from None
    if _torch_archive_kind(path) != "pickle":
        raise FrontendError(f"{path}: not a weights file (it holds a program); see nnforge.pipeline.import_model")
    import pickle
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        wanted = _unsafe_globals(path, e)
        if not wanted:          # not a pickle at all, or one torch's reader does not parse
            reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
            raise FrontendError(f"{path}: not a readable torch checkpoint ({reason}); nnforge reads "
                                f"{MODEL_FILES}") from None
        raise FrontendError(f"{path}: refusing to unpickle: loading it calls {', '.join(wanted)}, which could run "
                            "code; nnforge reads torch checkpoints only with torch.load(weights_only=True) or "
                            "safetensors. If you trust this file, pass trust_code=True") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise FrontendError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                            f"nnforge reads {MODEL_FILES}") from None


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """What a refused pickle asks for, found without running it: torch's scan of a torch.save zip,
    the global named in torch's error, or the opcodes of a bare pickle."""
    try:
        from torch.serialization import get_unsafe_globals_in_checkpoint
        named = get_unsafe_globals_in_checkpoint(os.fspath(path))
    except Exception:           # not a torch.save zip
        named = re.findall(r"GLOBAL ([\w.]+)", str(error))
    if named:
        return sorted(set(named))
    # a bare pickle: read its opcodes (pickletools never executes them)
    import pickletools
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except Exception:
        allowed = set()
    names, strings = set(), []
    with open(path, "rb") as f:
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    names.add(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:
            pass
    return sorted(names - allowed)


def read_torch_file(path: Path, *, trust_code: bool = False):
    """(model, source) for a torch model file. TorchScript archives, .pt2 archives and pickled
    modules run code when loaded: refused unless ``trust_code=True``. A file of weights only is
    read safely (:func:`load_state_dict`) and refused as a model: weights need their module."""
    suffix = path.suffix.lower()
    if suffix not in TORCH_SUFFIXES | {".pt2", ".safetensors"}:
        raise FrontendError(f"{path}: not a model file nnforge reads; it reads {MODEL_FILES}")
    if not path.is_file():
        raise FrontendError(f"{path}: no such model file")
    kind = "safetensors" if suffix == ".safetensors" else "pt2" if suffix == ".pt2" else _torch_archive_kind(path)
    if kind in ("torchscript", "pt2") and not trust_code:
        what = "a TorchScript archive: it holds code that runs" if kind == "torchscript" else \
            "a torch.export archive: torch.export.load unpickles it"
        raise FrontendError(f"{path}: refusing {what} when it is loaded. If you trust this file, pass "
                            "trust_code=True; otherwise export the model to ONNX")
    if kind == "safetensors" or (kind == "pickle" and not trust_code):
        obj = load_state_dict(path)
    else:
        try:
            if kind == "torchscript":
                return torch.jit.load(os.fspath(path), map_location="cpu"), "torchscript"
            if kind == "pt2":
                return torch.export.load(os.fspath(path)), "torch.export"
            obj = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
        except Exception as e:
            raise FrontendError(f"{path}: cannot load this {kind} file: {type(e).__name__}: {str(e)[:300]}") from None
        if isinstance(obj, (torch.nn.Module, torch.export.ExportedProgram)):
            return obj, "torch"
    n = sum(isinstance(v, torch.Tensor) for v in obj.values()) if isinstance(obj, dict) else 0
    raise FrontendError(f"{path}: holds weights only ({type(obj).__name__} of {n} tensors), not a model: build "
                        "the module, call module.load_state_dict(nnforge.pipeline.load_state_dict(path)) "
                        "and compile the module")


def _script_to_export(module, example_inputs, path: Path):
    """A TorchScript module as an ExportedProgram (torch's TorchScript converter)."""
    from torch._export.converter import TS2EPConverter
    try:
        return TS2EPConverter(module, as_tuple(example_inputs)).convert()
    except Exception as e:
        raise FrontendError(f"{path}: torch cannot convert this TorchScript module to an ExportedProgram: "
                            f"{type(e).__name__}: {str(e)[:300]}; export the model to ONNX instead") from None


def check_import(model, graph: Graph, inputs: tuple) -> dict:
    """The imported graph on the reference interpreter against the torch model itself."""
    if not isinstance(model, torch.nn.Module):
        return {}
    with torch.no_grad():
        want = model(*inputs)
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    got = Interpreter(graph).run(*inputs)
    metrics = compare(got, want, nan_equal=True)        # reproducing the model's own NaN is right here
    if not within(metrics, FP32_TOLERANCE):
        raise FrontendError(f"{graph.name}: the imported graph disagrees with the torch model "
                            f"(cosine {metrics['cosine_min']:.6f} < {FP32_TOLERANCE['cosine_min']}); "
                            "this is an nnforge frontend bug, please report it")
    return json_safe(metrics)


def compression_report(original: Graph, compressed: Graph, layer_outputs: dict | None = None) -> dict:
    """:func:`graph_compression` of ``compressed`` with the bytes before, and per weight layer the
    weight's SQNR against its fp32 original (where the layer kept its shape) and, from
    ``layer_outputs`` (:func:`layer_fidelity`), its output's agreement with the fp32 model on
    held-out inputs."""
    report = graph_compression(compressed)
    for row in report["layers"]:
        before = original.weights.get(row["weight"])
        if row["compressed"] and before is not None and list(before.shape) == row["shape"]:
            row["weight_sqnr_db"] = _round_db(_weight_sqnr(before.encoding, compressed.weights[row["weight"]].encoding))
        if layer_outputs and row["layer"] in layer_outputs:
            row.update(layer_outputs[row["layer"]])
    before = sum(v.encoding.nbytes for v in original.weights.values())
    return {"bytes_before": before, "ratio": round(before / max(report["bytes_after"], 1), 4), **report}


def graph_compression(graph: Graph) -> dict:
    """What a compressed graph alone says about its compression: bytes, bits per weight for the
    whole model and for its compressed layers apart, and each weight layer's encoding (``nf.verify``
    recomputes this from a bundle's graph and compares it with the manifest)."""
    layers = []
    for n in graph.nodes:
        if n.op not in WEIGHT_OPS or len(n.inputs) < 2 or n.inputs[1] is None or not n.inputs[1].is_weight:
            continue
        w = n.inputs[1]
        enc = w.encoding
        layers.append({"layer": n.name, "op": n.op, "weight": w.name, "shape": list(w.shape),
                       "encoding": enc.describe(), "bits_per_weight": round(enc.bits_per_weight, 4),
                       "bytes": enc.nbytes, "compressed": not isinstance(enc, Dense)})
    stored = [v for v in graph.weights.values() if v.dtype.is_float or not isinstance(v.encoding, Dense)]
    params = sum(_numel(v.shape) for v in stored)
    layer_params = sum(_numel(layer["shape"]) for layer in layers)
    packed = [layer for layer in layers if layer["compressed"]]
    packed_params = sum(_numel(layer["shape"]) for layer in packed)
    return {"bytes_after": sum(v.encoding.nbytes for v in graph.weights.values()),
            "model_bits_per_weight": round(8 * sum(v.encoding.nbytes for v in stored) / max(params, 1), 4),
            "layer_bits_per_weight": round(8 * sum(layer["bytes"] for layer in layers) / max(layer_params, 1), 4),
            "compressed_layers": len(packed), "weight_layers": len(layers),
            "compressed_bits_per_weight": round(8 * sum(layer["bytes"] for layer in packed) / packed_params, 4)
            if packed_params else None,
            "layers": layers}


def _numel(shape) -> int:
    return int(torch.Size([int(d) for d in shape]).numel())


def _round_db(x: float):
    return "inf" if math.isinf(x) else round(x, 2)


def _weight_sqnr(before, after) -> float:
    w = before.decode(torch.float64) if before.dtype.is_float else before.decode()
    d = after.decode(torch.float64).reshape(w.shape)
    noise = float(((d - w.double()) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(float((w.double() ** 2).sum()), 1e-300) / noise)


def layer_fidelity(original: Graph, compressed: Graph, inputs: tuple) -> tuple[list, list, dict]:
    """(fp32 outputs, compressed outputs, per weight layer of the compressed graph: its output's
    SQNR and cosine against the same layer of the fp32 graph) on one batch. Layers that a pass
    renamed or reshaped (low-rank pairs, pruned channels) have no counterpart and are left out."""
    kept: dict[str, torch.Tensor] = {}
    wanted = {n.name for n in compressed.nodes if n.op in WEIGHT_OPS}

    def keep(node, outs):
        if node.name in wanted and outs and isinstance(outs[0], torch.Tensor) and outs[0].is_floating_point():
            kept[node.name] = outs[0]
    fp32 = Interpreter(original).run(*inputs, capture=keep)
    per_layer: dict[str, dict] = {}

    def score(node, outs):
        ref = kept.pop(node.name, None)
        if ref is None or not outs or tuple(outs[0].shape) != tuple(ref.shape):
            return
        m = compare([outs[0]], [ref])
        per_layer[node.name] = {"output_sqnr_db": _round_db(m["sqnr_db"]), "output_cosine_min": round(m["cosine_min"], 6)}
    expected = Interpreter(compressed).run(*inputs, capture=score)
    return fp32, expected, per_layer


def write_bundle(out: Path, *, graph: Graph, original: Graph, source: str, target: Target, backend: Backend,
                 recipe_name: str, passes, records, check: list[tuple], import_check: dict,
                 timings: dict, started: float, batch_sizes: tuple = (), peer=None, data_report: dict | None = None,
                 allow_nonfinite: bool = False) -> None:
    """Lower ``graph``, check it against the reference, and write the bundle at ``out`` (atomically).

    ``check`` holds the held-out batches (nnforge.heldout): the fidelity against fp32 is measured
    on all of them, the runtime check and the bundle's reference files use the first (the others
    go to reference/held_out.safetensors, so that ``nf.verify`` recomputes the recorded figures).
    With ``batch_sizes`` and a target whose runtime's speed means something here, the manifest
    gets speed records (nnforge.speed): the bundle against ``original`` dense on the same backend
    and against ``peer`` (``(label, function of the input list)``: the torch model), per batch size."""
    t0 = time.perf_counter()
    check = [tuple(b) for b in check]
    check_inputs = check[0]
    fp32_0, expected, per_layer = layer_fidelity(original, graph, check_inputs)
    fp32_runs, expected_runs = [fp32_0], [expected]
    if len(check) > 1:
        run_fp32, run_graph = Interpreter(original), Interpreter(graph)
        for b in check[1:]:
            fp32_runs.append(run_fp32.run(*b))
            expected_runs.append(run_graph.run(*b))
    if not allow_nonfinite:
        from .heldout import refuse_nonfinite_outputs
        refuse_nonfinite_outputs(original, fp32_runs, "held-out")
    fp32 = fp32_0
    fid = json_safe(fidelity(expected_runs, fp32_runs))
    timings["reference_s"] = time.perf_counter() - t0
    graph.meta["recipe"] = recipe_name       # backends that label their artifacts (Core ML metadata) read it
    # backends that build fixed-size designs (hls) take the sizes the bundle is checked with
    graph.meta["example_shapes"] = {v.name: list(torch.as_tensor(x).shape) for v, x in zip(graph.inputs, check_inputs)}
    timed, not_timed = backend.times_here(target) if batch_sizes else (False, "no batch sizes named")
    if timed:       # backends that pick kernels per shape (tvm's dispatch) measure at these
        graph.meta["speed_shapes"] = speed_shapes(graph, check_inputs, batch_sizes)
    with BundleWriter(out) as tmp:
        t0 = time.perf_counter()
        save_graph(graph, tmp / GRAPH_FILE, tmp / WEIGHTS_FILE)
        # before lowering: a backend that measures its kernels in the model (tvm's dispatch) runs these
        save_tensors(tmp / REF_INPUTS, {v.name: torch.as_tensor(x) for v, x in zip(graph.inputs, check_inputs)})
        save_tensors(tmp / REF_EXPECTED, {f"output{i}": t for i, t in enumerate(expected)})
        save_tensors(tmp / REF_FP32, {f"output{i}": t for i, t in enumerate(fp32)})
        if len(check) > 1:
            save_tensors(tmp / REF_HELD_OUT, held_out_tensors(check[1:], fp32_runs[1:]))
        lowered = backend.lower(graph, target, tmp)
        timings["lower_s"] = time.perf_counter() - t0
        runs, why = target.can_run()
        numerics = {"inputs": [list(torch.as_tensor(x).shape) for x in check_inputs],
                    "held_out": (data_report or {}).get("held_out", {"source": "check inputs given to write_bundle",
                                                                     "batches": len(check)}),
                    "reference": "nnforge reference interpreter (fp32)",
                    "fidelity_vs_fp32": fid, "tolerance": BACKEND_TOLERANCE}
        if allow_nonfinite:
            numerics["allow_nonfinite"] = True
        fidelity_0 = compare(expected, fp32)
        if runs:
            t0 = time.perf_counter()
            runner = backend.load(tmp, lowered.entry)
            got = runner(*[torch.as_tensor(x) for x in check_inputs])
            got = list(got) if isinstance(got, tuple) else [got]
            metrics = compare(got, expected, nan_equal=allow_nonfinite)
            timings["runtime_check_s"] = time.perf_counter() - t0
            rounds = any(n.op == "fake_quant" for n in graph.nodes)
            if rounds and not within(metrics, BACKEND_TOLERANCE):
                vs_fp32 = compare(got, fp32)
                ok, allowed = within_rounding(vs_fp32, fidelity_0)
                numerics["backend_vs_fp32"] = json_safe(vs_fp32)
                numerics["check"] = (f"activations are rounded at run time: backend vs fp32 cosine "
                                     f"{vs_fp32['cosine_min']:.6f} must be >= {allowed:.6f} (the reference's "
                                     f"{fidelity_0['cosine_min']:.6f}, see nnforge.numerics)")
                if not ok:
                    raise BackendError(f"{backend.name} backend output drifts from fp32 further than rounding explains "
                                       f"for {graph.name} on {target.name}: cosine vs fp32 "
                                       f"{vs_fp32['cosine_min']:.6f} < {allowed:.6f} (reference interpreter: "
                                       f"{fidelity_0['cosine_min']:.6f})")
            elif not within(metrics, BACKEND_TOLERANCE):
                raise BackendError(f"{backend.name} backend output disagrees with the reference interpreter for "
                                   f"{graph.name} on {target.name}: cosine {metrics['cosine_min']:.6f} < "
                                   f"{BACKEND_TOLERANCE['cosine_min']}, max abs error {metrics['max_abs_error']:.3g}")
            numerics["backend_vs_reference"] = json_safe(metrics)
            numerics["runtime_checked"] = True
            if timed:
                t0 = time.perf_counter()
                speed = speed_records(runner, lowered, graph, original, target, backend, check_inputs, batch_sizes,
                                      peer)
                timings["speed_s"] = time.perf_counter() - t0
        else:
            numerics["runtime_checked"] = False
            numerics["runtime_skipped_because"] = why
        if not timed or not runs:
            speed = {"measured": False, "why": not_timed if not timed else why}
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
            "recipe": recipe_record(recipe_name, passes),
            "calibration": (data_report or {}).get("calibration"),
            "signature": {"inputs": [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)}
                                     for v in graph.inputs],
                          "outputs": [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)}
                                      for v in graph.outputs]},
            "compression": compression_report(original, graph, per_layer),
            "numerics": numerics,
            "speed": speed,
            "fallbacks": [f.to_dict() for f in lowered.fallbacks],
            "passes": [r.to_dict() for r in records],
            "timings": {k: round(v, 4) for k, v in timings.items()},
        }
        write_manifest(tmp, manifest)


def held_out_tensors(batches: list[tuple], fp32_runs: list[list]) -> dict[str, torch.Tensor]:
    """The held-out batches after the first, with their fp32 outputs, keyed ``{b}/input{i}`` and
    ``{b}/fp32{i}`` (b counts from 1, as in the manifest)."""
    out = {}
    for b, (ins, outs) in enumerate(zip(batches, fp32_runs), start=1):
        out.update({f"{b}/input{i}": torch.as_tensor(x) for i, x in enumerate(ins)})
        out.update({f"{b}/fp32{i}": t for i, t in enumerate(outs)})
    return out


def speed_records(runner, lowered, graph: Graph, original: Graph, target: Target, backend: Backend,
                  check_inputs: tuple, batch_sizes: tuple, peer) -> dict:
    """The manifest's ``speed`` section: the bundle against its dense form on the same backend and
    against ``peer`` per batch size, with the backend's per-shape dispatch where it has one."""
    from . import speed
    dense_label = f"dense on {backend.name}"
    runners = {speed.BUNDLE: _bundle_call(runner, "auto")}
    dispatch = lowered.entry.get("dispatch") if isinstance(lowered.entry, dict) else None
    if dispatch and dispatch.get("dispatched"):
        runners[speed.COMPRESSED_ONLY] = _bundle_call(runner, "compressed")
    runners[dense_label] = _bundle_call(dense_runner(original, target, backend), None)
    if peer is not None:
        label, fn = peer
        runners[label] = fn
    records = speed.measure(runners, graph, check_inputs, batch_sizes)
    if hasattr(runner, "dispatch"):
        runner.dispatch("auto")
    out = {"measured": True, "batch_sizes": list(batch_sizes), "machine": speed.machine(),
           "dense_baseline": f"the imported graph after the cleanup passes only, lowered by {backend.name} for "
                             f"{target.name}", "records": records, "verdicts": speed.verdicts(records, dense_label)}
    if hasattr(runner, "threads"):          # a runtime that sizes its thread pool by the load says how it ran
        out["bundle_threads"] = runner.threads
    if dispatch is None:
        out["dispatch"] = f"the {backend.name} backend has no per-shape dispatch: its runtime picks its own kernels"
    elif not dispatch.get("enabled"):
        out["dispatch"] = f"off: {dispatch.get('why_not')}"
    else:
        out["dispatch"] = (f"{dispatch['dispatched']} of {len(dispatch['layers'])} compressed layers dispatch to the "
                           "dense kernel at some shape (backend.entry.dispatch says which and why)")
    return out


def speed_peer(model, source: str):
    """(label, function of the input list) timing ``model`` itself: torch eager for a module or
    an ExportedProgram, ONNX Runtime for an .onnx file; None for an IR graph or a TorchScript file."""
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if isinstance(model, torch.nn.Module):
        def eager(xs):
            with torch.no_grad():
                return model(*xs)
        from .speed import TORCH
        return TORCH, eager
    if source == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(os.fspath(model), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return "onnxruntime (source model)", lambda xs: session.run(None, {n: x.numpy() for n, x in zip(names, xs)})
    return None


def _bundle_call(runner, mode: str | None):
    def call(xs):
        if mode is not None and hasattr(runner, "dispatch"):
            runner.dispatch(mode)
        return runner(*xs)
    return call


_DENSE: dict = {}       # one dense baseline runner, kept across compiles of the same model and target


def dense_runner(original: Graph, target: Target, backend: Backend):
    """A runner of ``original`` after the cleanup passes, lowered by ``backend`` for ``target``:
    the speed records' dense baseline. The last one is kept, so compiling one model with several
    recipes (the demo) lowers it once."""
    import hashlib
    import json
    import tempfile
    from .ir import graph_to_dict
    from .passes import PassContext, PassManager, cleanup_passes
    doc, tensors = graph_to_dict(original)
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode())
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    key = (h.hexdigest(), backend.name, json.dumps(target.to_dict(), sort_keys=True, default=str))
    if key not in _DENSE:
        dense = PassManager(cleanup_passes()).run(original, PassContext(target=target))
        dense.meta.pop("speed_shapes", None)
        with tempfile.TemporaryDirectory(prefix="nnforge-dense-") as tmp:
            tmp = Path(tmp)
            save_graph(dense, tmp / GRAPH_FILE, tmp / WEIGHTS_FILE)
            lowered = backend.lower(dense, target, tmp)
            made = backend.load(tmp, lowered.entry)
        _DENSE.clear()
        _DENSE[key] = made
    return _DENSE[key]


def recipe_record(name: str, passes) -> dict:
    """The manifest's ``recipe``: its name and each pass with its options, as JSON reads them back."""
    import json
    return json.loads(json.dumps({"name": name, "passes": [{"pass": p.name, **_jsonable(p.options())} for p in passes]},
                                 default=str))


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else str(v)) for k, v in d.items()}

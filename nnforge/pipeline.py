"""The one way a model becomes a bundle (``nnforge.compile``), stage by stage:

1. resolve the target, its backend and the recipe; claim the output directory;
2. import the model into the IR (``nnforge.frontend``) and check the import against the model;
3. decide the data: calibration for the passes, held-out batches for every figure (``nnforge.heldout``);
4. run the cleanup passes and the recipe's compression passes (``nnforge.passes``);
5. run the reference interpreter on the held-out batches: fp32 and compressed outputs, fidelity;
6. write the graph, weights and reference files, run the passes the backend asks for
   (``Backend.prepare``), lower (``Backend.lower`` with a :class:`LowerContext`), load the result
   and check it against the reference; time it where it runs natively (``nnforge.speed``);
7. write the manifest and move the finished bundle into place (``nnforge.bundle.format``).

:func:`build` is stages 5-7 for a graph already compressed (the fuzzer uses it too) and
:func:`lower_into` is stage 6's lowering alone. ``api.py`` only wraps :func:`compile`.
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from .version import __version__
from .backends.base import Artifact, Backend, BackendError, LowerContext, get_backend
from .bundle.format import (FORMAT, FORMAT_VERSION, GRAPH_FILE, REF_EXPECTED, REF_FP32, REF_HELD_OUT, REF_INPUTS,
                            TOKENIZER_DIR, WEIGHTS_FILE, ArtifactWriter, BundleWriter, claim_out, held_out_tensors,
                            save_tensors, tail_trimmed, write_manifest)
from .bundle.store import Bundle
from .figures import compression_report, layer_fidelity
from .frontend import FrontendError, as_tuple, check_import, import_model
from .frontend.decoders.builder import HEAD_LAYER
from .frontend.decoders.importer import describe_text, import_decoder, is_causal_lm, is_text, stateless_lm
from .heldout import (calibration_batches, inputs_for, refuse_nonfinite_outputs, require_calibration,
                      shared_outputs, split)
from .ir import Graph, Interpreter, save_graph
from .numerics import (BACKEND_TOLERANCE, ENCODED_STATE_TOLERANCE, Fidelity, compare, json_safe, rounds_at_run_time,
                       within, within_rounding)
from .passes import PassContext, PassManager, cleanup_passes, resolve_recipe
from .passes.kvcache import compared_outputs
from .passes.kvreduce import reduction_record
from .passes.recipes import recipe_record, with_head_format
from .speed import check_batch_sizes, default_batch_sizes, speed_shapes
from .timing import machine, peak_rss_bytes, reset_peak_rss
from .targets import Target, get_target


def compile(model, target: str | Target, recipe=None, *, example_inputs=None, calibration=None, out=None,
            check_inputs=None, dynamic_shapes=None, input_names=None, output_names=None,
            name: str | None = None, progress: bool = False, trust_code: bool = False,
            batch_sizes=None, allow_nonfinite: bool = False, calibration_source: str | None = None,
            max_len: int | None = None, head: str = "w8", converters: dict | None = None) -> Bundle:
    """Stages 1-7 (module docstring); the arguments are ``nnforge.compile``'s."""
    timings: dict[str, float] = {}
    memory: dict[str, int | None] = {}
    since = "this compile started" if reset_peak_rss() else "the process started"
    start = time.perf_counter()
    tgt = get_target(target)
    backend = get_backend(tgt.backend)
    recipe_name, passes = resolve_recipe(recipe, tgt.options.get("pass_defaults"), tgt.options.get("preset_scales"))
    decoding = is_causal_lm(model)
    if decoding and isinstance(model, torch.nn.Module):
        wrapped = stateless_lm(model, example_inputs)
        if wrapped is not None:             # a family with no decoder builder: its logits as a graph
            name, model, decoding = name or type(model).__name__, wrapped, False
    if decoding:                # timed in tokens/s by generation (nnforge generate, benchmarks/llm.py)
        batch_sizes = ()
        require_calibration(passes, None if calibration is None else [calibration], recipe_name)
    else:
        batch_sizes = default_batch_sizes() if batch_sizes is None else check_batch_sizes(batch_sizes)
        calibration = calibration_batches(calibration)
        require_calibration(passes, calibration, recipe_name)
        if example_inputs is None:
            raise FrontendError("example_inputs is required (a tuple of input tensors) for a model that is not a "
                                "causal LM; a causal LM (transformers model, model directory, .gguf) takes none")
    example = as_tuple(example_inputs) if example_inputs is not None else ()
    decoder = None
    with ExitStack() as claims:
        if out is not None:         # checked and locked before any work
            claims.enter_context(claim_out(out))
        bar = tqdm(total=3, desc="import", unit="stage", leave=False,
                   disable=None if progress else True)      # None: shown on a terminal only
        try:
            t0 = time.perf_counter()
            if decoding:
                decoder = import_decoder(model, max_len=max_len, name=name, trust_code=trust_code)
                graph, source = decoder.graph, decoder.source
                passes = with_head_format(passes, head, HEAD_LAYER, tgt.options.get("pass_defaults"))
                decoder.head = head if any(not p.rewrites_state for p in passes) else "fp32"
                example = decoder.example()
                if is_text(calibration):
                    calibration_source = calibration_source or f"text: {describe_text(calibration)}"
                    calibration = decoder.text_batches(calibration)
                calibration = calibration_batches(calibration)
                if is_text(check_inputs):
                    check_inputs = decoder.text_batches(check_inputs)
            else:
                graph, source = import_model(model, example, dynamic_shapes=dynamic_shapes, input_names=input_names,
                                             output_names=output_names, name=name, trust_code=trust_code,
                                             converters=converters)
            out_dir = Path(out) if out is not None else Path("bundles") / f"{graph.name.lower()}-{tgt.name}"
            claims.enter_context(claim_out(out_dir))
            data = split(graph, passes, example, calibration=calibration, check_inputs=check_inputs,
                         calibration_source=calibration_source, allow_nonfinite=allow_nonfinite)
            if decoding:
                import_check = decoder.check_import(data.check[0])
            else:
                import_check = check_import(model, graph, example) or graph.meta.pop("frontend_check", {})
            timings["frontend_s"] = time.perf_counter() - t0
            memory["after_import"] = _peak_so_far(memory)
            bar.update()
            bar.set_description(f"compress ({recipe_name})")
            t0 = time.perf_counter()
            pm = PassManager(cleanup_passes() + passes)
            compressed = pm.run(graph, PassContext(calibration=data.calibration, target=tgt, progress=progress))
            backend.check_cache_encodings(compressed, tgt)      # before the reference runs and the bundle
            timings["passes_s"] = time.perf_counter() - t0
            memory["after_passes"] = _peak_so_far(memory)
            bar.update()
            bar.set_description(f"lower for {tgt.name} and check")
            manifest = build(out_dir, graph=compressed, original=graph, source=source, target=tgt, backend=backend,
                             recipe_name=recipe_name, passes=passes, records=pm.records, check=data.check,
                             data_report=data.report, allow_nonfinite=allow_nonfinite, import_check=import_check,
                             timings=timings, started=start, batch_sizes=batch_sizes,
                             peer=speed_peer(model, source) if batch_sizes else None, decoder=decoder,
                             memory=memory, memory_since=since)
            bar.update()
        finally:
            bar.close()             # cleared before any error is printed
        return Bundle(out_dir, manifest)


def _peak_so_far(memory: dict) -> int | None:
    """The peak resident memory now, never below a stage recorded before it: Linux stores VmHWM's
    high-water mark only at some events (a reading folds in the RSS of that moment), so memory
    freed by other paths can make a later reading come out a little lower."""
    now = peak_rss_bytes()
    return None if now is None else max([now, *(v for v in memory.values() if v is not None)])


def prepare(graph: Graph, backend: Backend, target: Target, shapes: dict) -> tuple[Graph, dict]:
    """``graph`` after the passes ``backend`` asks for before lowering, and the dimension sizes
    they fixed (each such pass records them as its ``symbols`` figure)."""
    configs = backend.prepare(target, shapes)
    _, passes = resolve_recipe(list(configs)) if configs else ("", [])
    passes = [p for p in passes if p.applies(graph)]
    if not passes:
        return graph, {}
    pm = PassManager(passes)
    prepared = pm.run(graph, PassContext(target=target))
    symbols: dict = {}
    for r in pm.records:
        symbols.update(r.figures.get("symbols") or {})
    return prepared, symbols


def lower_into(root: Path, graph: Graph, target: Target, backend: Backend, *, recipe: str, shapes: dict,
               speed: list | None = None, reference: list | None = None, steps: list | None = None,
               expected: list | None = None) -> Artifact:
    """Write ``graph`` and its weights into ``root`` (the bundle format: a backend may read weights
    in place), run the backend's prepare passes and lower the result for ``target``."""
    backend.check_cache_encodings(graph, target)
    save_graph(graph, root / GRAPH_FILE, root / WEIGHTS_FILE)
    prepared, symbols = prepare(graph, backend, target, shapes)
    ctx = LowerContext(recipe=recipe, files=ArtifactWriter(root), shapes=shapes, speed_shapes=list(speed or []),
                       reference=reference, expected=expected, symbols=symbols, steps=list(steps or []))
    return backend.lower(prepared, target, ctx)


def build(out: Path, *, graph: Graph, original: Graph, source: str, target: Target, backend: Backend,
          recipe_name: str, passes, records, check: list[tuple], import_check: dict, timings: dict,
          started: float, batch_sizes: tuple = (), peer=None, data_report: dict | None = None,
          allow_nonfinite: bool = False, decoder=None, memory: dict | None = None,
          memory_since: str = "the process started") -> dict:
    """Stages 5-7 for a compressed ``graph``: its bundle at ``out`` (written atomically); returns
    the manifest.

    ``check`` holds the held-out batches (nnforge.heldout): the fidelity against fp32 is measured
    on all of them, the runtime check and the bundle's reference files use the first (the others
    go to reference/held_out.safetensors, so that ``nf.verify`` recomputes the recorded figures).
    With ``batch_sizes`` and a target whose runtime's speed means something here, the manifest
    gets speed records (nnforge.speed): the bundle against ``original`` dense on the same backend
    and against ``peer`` (``(label, function of the input list)``: the torch model), per batch size.
    A ``decoder`` (frontend.decoders.DecoderImport) adds its tokenizer and the manifest's
    ``decoder`` section (state pairs, max_len, generation settings)."""
    t0 = time.perf_counter()
    check = [tuple(b) for b in check]
    # the compressed graph's own inputs (an encoded KV cache's empty state for the fp32 zero caches)
    graph_check = [inputs_for(graph, original, b) for b in check]
    check_inputs = graph_check[0]
    fp32, expected, per_layer = layer_fidelity(original, graph, check[0], check_inputs)
    # fidelity on the outputs both graphs have (an encoded cache's state outputs are not the fp32 cache)
    shared = shared_outputs(graph, original)
    compared = [i for i, _ in shared]
    acc = Fidelity()
    held: dict[str, torch.Tensor] = {}         # the batches after the first, stored as zero_tail boxes
    held_shapes: dict[str, list[int]] = {}

    def take(b: int, fp32_outs, graph_outs):
        """One held-out batch's figures; later batches keep only their boxes (a decoder's outputs
        carry every layer's cache of max_len slots, of which a check writes a few)."""
        if not allow_nonfinite:
            refuse_nonfinite_outputs(original, [fp32_outs], "held-out", first=b)
        fp32_outs = [fp32_outs[j] for _, j in shared]
        acc.add([graph_outs[i] for i in compared], fp32_outs)
        return fp32_outs
    fp32 = take(0, fp32, expected)
    if len(check) > 1:
        run_fp32, run_graph = Interpreter(original), Interpreter(graph)
        for b, (ins, mine) in enumerate(zip(check[1:], graph_check[1:]), start=1):
            outs = take(b, run_fp32.run(*ins), run_graph.run(*mine))
            boxes, full = tail_trimmed(held_out_tensors([mine], [outs], first=b))
            held.update(boxes)
            held_shapes.update(full)
    fid = json_safe(acc.result())
    timings["reference_s"] = time.perf_counter() - t0
    shapes = {v.name: list(torch.as_tensor(x).shape) for v, x in zip(graph.inputs, check_inputs)}
    timed, not_timed = backend.times_here(target) if batch_sizes else (False, "no batch sizes named")
    if decoder is not None:
        not_timed = "a decoder is timed in tokens/s while it generates (nnforge generate, benchmarks/llm.py)"
    with BundleWriter(out) as tmp:
        t0 = time.perf_counter()
        # a decoder's reference tensors are mostly its caches' unwritten slots: stored as boxes
        save_tensors(tmp / REF_INPUTS, *tail_trimmed({v.name: torch.as_tensor(x)
                                                      for v, x in zip(graph.inputs, check_inputs)}))
        save_tensors(tmp / REF_EXPECTED, *tail_trimmed({f"output{i}": t for i, t in enumerate(expected)}))
        save_tensors(tmp / REF_FP32, *tail_trimmed({f"output{i}": t for i, t in enumerate(fp32)}))
        if len(check) > 1:
            save_tensors(tmp / REF_HELD_OUT, held, held_shapes)
        if decoder is not None and decoder.tokenizer is not None:
            decoder.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        artifact = lower_into(tmp, graph, target, backend, recipe=recipe_name, shapes=shapes,
                              speed=speed_shapes(graph, check_inputs, batch_sizes) if timed else [],
                              reference=[torch.as_tensor(x) for x in check_inputs],
                              expected=[torch.as_tensor(x) for x in expected],
                              steps=[decoder.step_symbols()] if decoder is not None else [])
        timings["lower_s"] = time.perf_counter() - t0
        numerics = {"inputs": [list(torch.as_tensor(x).shape) for x in check_inputs],
                    "held_out": (data_report or {}).get("held_out", {"source": "check inputs given to build",
                                                                     "batches": len(check)}),
                    "reference": "nnforge reference interpreter (fp32)",
                    "fidelity_vs_fp32": fid, "tolerance": runtime_tolerance(graph)}
        if len(compared) != len(graph.outputs):
            numerics["compared_outputs"] = [graph.outputs[i].name for i in compared]
        if allow_nonfinite:
            numerics["allow_nonfinite"] = True
        runs, why = target.can_run()
        speed = {"measured": False, "why": not_timed if not timed else why}
        if runs:
            t0 = time.perf_counter()
            runner = backend.load(tmp, artifact.entry)
            numerics.update(runtime_check(runner, graph, backend, target, check_inputs, expected, fp32,
                                          allow_nonfinite, compared=compared))
            timings["runtime_check_s"] = time.perf_counter() - t0
            if timed:
                t0 = time.perf_counter()
                speed = speed_records(runner, artifact, graph, original, target, backend, check_inputs, batch_sizes,
                                      peer)
                timings["speed_s"] = time.perf_counter() - t0
        else:
            numerics["runtime_checked"] = False
            numerics["runtime_skipped_because"] = why
        timings["total_s"] = time.perf_counter() - started
        if memory is not None:
            memory["after_lowering"] = _peak_so_far(memory)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "nnforge_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"name": graph.name, "source": source, "frontend_check": import_check,
                      **{k: original.meta[k] for k in ("shapes", "guards_dropped") if k in original.meta}},
            "target": target.to_dict(),
            "backend": {"name": backend.name, "entry": artifact.entry, "files": artifact.files,
                        "toolchain": artifact.toolchain},
            "toolchain": {"python": platform.python_version(), "torch": torch.__version__,
                          "platform": f"{sys.platform}-{platform.machine()}", **artifact.toolchain},
            "recipe": recipe_record(recipe_name, passes),
            "calibration": (data_report or {}).get("calibration"),
            "signature": {"inputs": [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)}
                                     for v in graph.inputs],
                          "outputs": [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)}
                                      for v in graph.outputs],
                          **({"guards": graph.meta["shape_guards"]} if graph.meta.get("shape_guards") else {})},
            "compression": compression_report(original, graph, per_layer),
            "numerics": numerics,
            "speed": speed,
            "fallbacks": [f.to_dict() for f in artifact.fallbacks],
            "passes": [r.to_dict() for r in records],
            "timings": {k: round(v, 4) for k, v in timings.items()},
        }
        if memory is not None:
            manifest["memory"] = {"peak_rss_bytes": memory,
                                  "what": "the compiling process's peak resident memory (with the pages of a "
                                          "memory-mapped checkpoint it read, which the kernel can drop) at the end "
                                          f"of each stage, since {memory_since}"}
        if decoder is not None:
            manifest["decoder"] = decoder.manifest_section(graph, reduction_record(graph, passes))
        return write_manifest(tmp, manifest)


def runtime_tolerance(graph: Graph) -> dict:
    """What the bundle's runtime is held to against the reference interpreter: BACKEND_TOLERANCE,
    or ENCODED_STATE_TOLERANCE for a graph whose outputs hold an encoded KV cache's codes."""
    return ENCODED_STATE_TOLERANCE if any(n.op == "kv_cache_write" for n in graph.nodes) else BACKEND_TOLERANCE


def runtime_check(runner, graph: Graph, backend: Backend, target: Target, inputs: tuple, expected: list,
                  fp32: list, allow_nonfinite: bool = False, compared: list[int] | None = None) -> dict:
    """The manifest's record of the bundle's runtime against the reference interpreter on
    ``inputs``; a BackendError when it disagrees beyond the tolerance (or, for a graph that rounds
    activations at run time, drifts from fp32 further than rounding explains: nnforge.numerics).
    ``fp32`` holds the fp32 graph's outputs at the indices ``compared`` of the graph's (default:
    all of them)."""
    got = runner(*[torch.as_tensor(x) for x in inputs])
    got = list(got) if isinstance(got, tuple) else [got]
    metrics = compare(compared_outputs(graph, got), compared_outputs(graph, expected), nan_equal=allow_nonfinite)
    tolerance = runtime_tolerance(graph)
    out = {}
    if rounds_at_run_time(graph) and not within(metrics, tolerance):
        picked = list(range(len(expected))) if compared is None else compared
        reference = compare([expected[i] for i in picked], fp32)
        vs_fp32 = compare([got[i] for i in picked], fp32)
        ok, allowed = within_rounding(vs_fp32, reference)
        out["backend_vs_fp32"] = json_safe(vs_fp32)
        out["check"] = (f"activations are rounded at run time: backend vs fp32 cosine {vs_fp32['cosine_min']:.6f} "
                        f"must be >= {allowed:.6f} (the reference's {reference['cosine_min']:.6f}, see "
                        "nnforge.numerics)")
        if not ok:
            raise BackendError(f"{backend.name} backend output drifts from fp32 further than rounding explains for "
                               f"{graph.name} on {target.name}: cosine vs fp32 {vs_fp32['cosine_min']:.6f} < "
                               f"{allowed:.6f} (reference interpreter: {reference['cosine_min']:.6f})")
    elif not within(metrics, tolerance):
        codes = "" if metrics["exact_match"] is None else f", integer outputs equal {metrics['exact_match']:.6f}"
        raise BackendError(f"{backend.name} backend output disagrees with the reference interpreter for "
                           f"{graph.name} on {target.name}: cosine {metrics['cosine_min']:.6f} (at least "
                           f"{tolerance['cosine_min']}){codes}, max abs error {metrics['max_abs_error']:.3g}")
    out["backend_vs_reference"] = json_safe(metrics)
    out["runtime_checked"] = True
    return out


def speed_records(runner, artifact: Artifact, graph: Graph, original: Graph, target: Target, backend: Backend,
                  check_inputs: tuple, batch_sizes: tuple, peer) -> dict:
    """The manifest's ``speed`` section: the bundle against its dense form on the same backend and
    against ``peer`` per batch size, with the backend's per-shape dispatch where it has one."""
    from . import speed
    dense_label = f"dense on {backend.name}"
    runners = {speed.BUNDLE: _bundle_call(runner, "auto")}
    dispatch = artifact.entry.get("dispatch") if isinstance(artifact.entry, dict) else None
    if dispatch and dispatch.get("dispatched"):
        runners[speed.COMPRESSED_ONLY] = _bundle_call(runner, "compressed")
    shapes = {v.name: list(torch.as_tensor(x).shape) for v, x in zip(graph.inputs, check_inputs)}
    runners[dense_label] = _bundle_call(dense_runner(original, target, backend, shapes), None)
    if peer is not None:
        label, fn = peer
        runners[label] = fn
    records = speed.measure(runners, graph, check_inputs, batch_sizes)
    if hasattr(runner, "dispatch"):
        runner.dispatch("auto")
    out = {"measured": True, "batch_sizes": list(batch_sizes), "machine": machine(),
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


def dense_runner(original: Graph, target: Target, backend: Backend, shapes: dict):
    """A runner of ``original`` after the cleanup passes, lowered by ``backend`` for ``target``:
    the speed records' dense baseline. The last one is kept, so compiling one model with several
    recipes (the demo) lowers it once."""
    import hashlib
    import json
    from .ir import graph_to_dict
    doc, tensors = graph_to_dict(original)
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode())
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    key = (h.hexdigest(), backend.name, json.dumps(target.to_dict(), sort_keys=True, default=str))
    if key not in _DENSE:
        dense = PassManager(cleanup_passes()).run(original, PassContext(target=target))
        with tempfile.TemporaryDirectory(prefix="nnforge-dense-") as tmp:
            artifact = lower_into(Path(tmp), dense, target, backend, recipe="fp32 (dense baseline)", shapes=shapes)
            made = backend.load(Path(tmp), artifact.entry)
        _DENSE.clear()
        _DENSE[key] = made
    return _DENSE[key]



"""The public surface: compile, load, verify, targets. Thin: the work is in pipeline.py,
bundle.py and the frontends, passes and backends.

    >>> import nnforge as nf
    >>> bundle = nf.compile(model, target="onnx", recipe="w4-rtn", example_inputs=(x,))
    >>> runner = nf.load(bundle.path)
    >>> y = runner(x)
    >>> nf.verify(bundle.path)
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm


from .backends.base import get_backend
from .bundle.format import claim_out
from .bundle import SIGNATURE, Bundle, BundleError, check_files, read_manifest, runtime_problems
from .ir import GraphError, Interpreter
from .numerics import compare, fidelity, json_safe, within
from .passes import PassContext, PassError, PassManager, cleanup_passes, resolve_recipe
from .heldout import calibration_batches, require_calibration, split
from .pipeline import as_tuple, check_import, import_model, load_state_dict, speed_peer, write_bundle
from .speed import check_batch_sizes, default_batch_sizes
from .targets import Target, get_target, list_targets


def compile(model, target: str | Target, recipe=None, *, example_inputs, calibration=None, out=None,
            check_inputs=None, dynamic_shapes=None, input_names=None, output_names=None,
            name: str | None = None, progress: bool = False, trust_code: bool = False,
            batch_sizes=None, allow_nonfinite: bool = False, calibration_source: str | None = None) -> Bundle:
    """Import ``model``, compress it with ``recipe`` and write a bundle for ``target``.

    model: torch.nn.Module, torch.export.ExportedProgram, or path to an .onnx file; with
        ``trust_code=True`` also a file whose loading runs code (TorchScript, a pickled module, .pt2),
        which is refused otherwise (see nnforge.pipeline.import_model).
    recipe: None, a preset name (see ``nnforge.passes.PRESETS``), a .toml path, or a list of pass configs.
    calibration: input tuples shaped like example_inputs (the batch size may differ); data-driven
        passes (GPTQ, SparseGPT, SmoothQuant, activation ranges, Hessian palettes, ...) refuse to
        run without it. ``calibration_source`` says where it came from, for the manifest.
    check_inputs: held-out inputs (one tuple or a list of tuples) the fidelity figures are measured
        on. Default: a few calibration batches held out from the passes, or the example inputs
        when no pass reads data (nnforge.heldout); the manifest says which, and how many rows.
    allow_nonfinite: accept NaN/inf in weights, inputs and fp32 outputs (refused by default,
        naming the tensor); a NaN output still never scores as a match.
    dynamic_shapes: torch.export dynamic shapes; symbols keep the names of their ``Dim``.
    out: bundle directory (default ./bundles/<model>-<target>); replaced atomically.
    batch_sizes: where the target runs natively here, the manifest's speed records time the bundle
        at these batch sizes against the same graph dense on its backend and against torch eager,
        and the tvm backend picks per shape between each compressed kernel and the dense one
        (nnforge.speed; default (1, 32), or $NNFORGE_BATCH_SIZES; () measures nothing).

        >>> nf.compile(model, "onnx", "w4-gptq", example_inputs=(x,), calibration=batches)
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    batch_sizes = default_batch_sizes() if batch_sizes is None else check_batch_sizes(batch_sizes)
    tgt = get_target(target)
    backend = get_backend(tgt.backend)
    recipe_name, passes = resolve_recipe(recipe, tgt.options.get("pass_defaults"))
    calibration = calibration_batches(calibration)
    require_calibration(passes, calibration, recipe_name)
    example = as_tuple(example_inputs)
    with ExitStack() as claims:
        if out is not None:         # checked and locked before any work (nnforge.bundle.format.claim_out)
            claims.enter_context(claim_out(out))
        bar = tqdm(total=3, desc="import", unit="stage", leave=False,
                   disable=None if progress else True)      # None: shown on a terminal only
        try:
            t0 = time.perf_counter()
            graph, source = import_model(model, example, dynamic_shapes=dynamic_shapes, input_names=input_names,
                                         output_names=output_names, name=name, trust_code=trust_code)
            out_dir = Path(out) if out is not None else Path("bundles") / f"{graph.name.lower()}-{tgt.name}"
            claims.enter_context(claim_out(out_dir))
            data = split(graph, passes, example, calibration=calibration, check_inputs=check_inputs,
                         calibration_source=calibration_source, allow_nonfinite=allow_nonfinite)
            import_check = check_import(model, graph, example) or graph.meta.pop("frontend_check", {})
            timings["frontend_s"] = time.perf_counter() - t0
            bar.update()
            bar.set_description(f"compress ({recipe_name})")
            t0 = time.perf_counter()
            pm = PassManager(cleanup_passes() + passes)
            compressed = pm.run(graph, PassContext(calibration=data.calibration, target=tgt, progress=progress))
            timings["passes_s"] = time.perf_counter() - t0
            bar.update()
            bar.set_description(f"lower for {tgt.name} and check")
            write_bundle(out_dir, graph=compressed, original=graph, source=source, target=tgt, backend=backend,
                         recipe_name=recipe_name, passes=passes, records=pm.records, check=data.check,
                         data_report=data.report, allow_nonfinite=allow_nonfinite, import_check=import_check,
                         timings=timings, started=start, batch_sizes=batch_sizes,
                         peer=speed_peer(model, source) if batch_sizes else None)
            bar.update()
        finally:
            bar.close()             # cleared before any error is printed
        return Bundle.open(out_dir)


def load(path, device: str | None = None, *, target: str | None = None, key=None):
    """A runner for the bundle at ``path``: numpy in -> numpy out, torch in -> torch out.
    The bundle's files are checked against its manifest first (and the manifest against its
    signature when ``key``, an Ed25519 public key, is given); a bundle for another ``target``, from
    a newer nnforge or for another runtime version is refused. Nothing in it is executed except
    the native library of a CPU (tvm) bundle, loaded only when its sha256 matches (see nnforge.bundle)."""
    return Bundle.open(path, key=key).load(device, target=target)


def verify(path, key=None) -> dict:
    """Re-hash every file of a bundle, re-run its numerics check and recompute what its manifest
    claims (nnforge.claims: signature, compression per layer, fidelity on the held-out inputs,
    recipe).

    Raises BundleError naming every changed, missing or extra file, the failed check, or every
    manifest field its files contradict; with ``key`` (an Ed25519 public key: PEM bytes/text or a
    path to a PEM file), also a missing or wrong signature of the manifest. Returns a report: file
    count, signature, the runtime's agreement with the stored expected outputs (when the target
    runs here), the reference interpreter's, and the fidelity against fp32.

        >>> nf.verify("bundles/mlp-onnx", key="release.pub.pem")["signature"]
    """
    from .claims import disagreements
    root, manifest = read_manifest(path, key=key)
    problems = check_files(root, manifest)
    if problems:
        raise BundleError(f"bundle {root} failed verification: " + "; ".join(problems))
    bundle = Bundle(root, manifest)
    try:
        graph = bundle.graph()
    except GraphError as e:
        raise BundleError(f"bundle {root}: graph.json/weights.safetensors do not form a valid graph: {e}") from None
    inputs, expected, fp32 = bundle.reference()
    numerics = manifest.get("numerics") or {}
    tolerance = numerics.get("tolerance", {})
    allow_nonfinite = bool(numerics.get("allow_nonfinite"))
    report = {"path": str(root), "files": len(manifest["files"]), "integrity": "ok", "target": bundle.target,
              "signature": _signature_status(root, key)}
    interpreter = Interpreter(graph)
    held = bundle.held_out()
    outs = [interpreter.run(*ins) for ins, _ in held]
    interp = compare(outs[0], expected, nan_equal=allow_nonfinite)
    if not within(interp, tolerance):
        raise BundleError(f"bundle {root}: its graph no longer reproduces its expected outputs "
                          f"(cosine {interp['cosine_min']:.6f})")
    wrong = disagreements(manifest, graph, outs, [f for _, f in held])
    if wrong:
        raise BundleError(f"bundle {root}: its manifest disagrees with its files: " + "; ".join(wrong))
    report["interpreter_vs_expected"] = json_safe(interp)
    report["fidelity_vs_fp32"] = json_safe(fidelity(outs, [f for _, f in held]))
    report["claims"] = "recomputed and confirmed: signature, compression, fidelity on the held-out inputs, recipe"
    ok, why = get_target(bundle.target).can_run()
    runtime = runtime_problems(manifest) if ok else []
    if ok and not runtime:
        got = bundle.load()(*inputs)
        got = list(got) if isinstance(got, tuple) else [got]
        metrics = compare(got, expected, nan_equal=allow_nonfinite)
        if not within(metrics, tolerance):
            raise BundleError(f"bundle {root}: runtime output fails the numerics check: cosine "
                              f"{metrics['cosine_min']:.6f} < {tolerance.get('cosine_min')}")
        report["runtime_vs_expected"] = json_safe(metrics)
    else:
        reason = "; ".join(runtime) if runtime else f"target {bundle.target} {why}"
        report["runtime_vs_expected"] = f"skipped: {reason}"
    report["passed"] = True
    return report


def _signature_status(root: Path, key) -> str:
    if key is not None:
        from .bundle.signing import key_id, load_public_key
        return f"ok (ed25519, key {key_id(load_public_key(key))})"
    return "present, not checked (pass key=)" if (root / SIGNATURE).exists() else \
        "unsigned: the manifest's claims rest on the recomputed checks alone (nf.sign signs a bundle)"


def sign(path, private_key, *, password: bytes | None = None) -> Path:
    """Sign the bundle at ``path`` with an Ed25519 private key (PEM bytes/text, a path to a PEM
    file, or a cryptography key): writes ``manifest.sig``, which ``nf.verify(path, key=public_key)``
    and ``nf.load(path, key=...)`` check. Needs the cryptography package (``nnforge[sign]``).

        >>> nf.sign(bundle.path, Path("release.pem").read_bytes())
    """
    from .bundle.signing import sign as sign_bundle
    return sign_bundle(path, private_key, password=password)


def target(name: str) -> Target:
    """The target called ``name``; ``.with_options(...)`` adjusts its backend options, e.g.
    ``nf.target("cpu").with_options(tune=True)`` (see nnforge.backends.tvm.tuning)."""
    return get_target(name)


def targets() -> list[Target]:
    """Every known target; ``t.can_run()`` says whether its bundles run on this machine."""
    return list_targets()


__all__ = ["compile", "load", "verify", "sign", "load_state_dict", "target", "targets", "Bundle"]

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
from pathlib import Path

from tqdm import tqdm


from .backends.base import get_backend
from .bundle import Bundle, BundleError, check_files, read_manifest
from .ir import GraphError, Interpreter
from .numerics import compare, json_safe, within
from .passes import PassContext, PassError, PassManager, cleanup_passes, resolve_recipe
from .pipeline import as_tuple, check_import, import_model, write_bundle
from .targets import Target, get_target, list_targets


def compile(model, target: str | Target, recipe=None, *, example_inputs, calibration=None, out=None,
            check_inputs=None, dynamic_shapes=None, input_names=None, output_names=None,
            name: str | None = None, progress: bool = False) -> Bundle:
    """Import ``model``, compress it with ``recipe`` and write a bundle for ``target``.

    model: torch.nn.Module, torch.export.ExportedProgram, or path to an .onnx file.
    recipe: None, a preset name (see ``nnforge.passes.PRESETS``), a .toml path, or a list of pass configs.
    calibration: iterable of input tuples shaped like example_inputs (for calibrated passes).
    check_inputs: held-out inputs for the numerics check (default: example_inputs).
    dynamic_shapes: torch.export dynamic shapes; symbols keep the names of their ``Dim``.
    out: bundle directory (default ./bundles/<model>-<target>); replaced atomically.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    tgt = get_target(target)
    backend = get_backend(tgt.backend)
    recipe_name, passes = resolve_recipe(recipe, tgt.options.get("pass_defaults"))
    calib = [as_tuple(b) for b in calibration] if calibration is not None else None
    if calib is not None and not calib:
        raise PassError("calibration is empty: pass at least one input tuple")
    needing = [p.name for p in passes if p.needs_calibration]
    if needing and not calib:
        raise PassError(f"recipe {recipe_name} runs {', '.join(needing)}, which need calibration data: pass "
                        "calibration=[input tuples shaped like example_inputs]")
    example = as_tuple(example_inputs)
    bar = tqdm(total=3, desc="import", unit="stage", disable=not progress, leave=False)
    t0 = time.perf_counter()
    graph, source = import_model(model, example, dynamic_shapes=dynamic_shapes, input_names=input_names,
                                 output_names=output_names, name=name)
    import_check = check_import(model, graph, example)
    timings["frontend_s"] = time.perf_counter() - t0
    bar.update()
    bar.set_description(f"compress ({recipe_name})")
    t0 = time.perf_counter()
    pm = PassManager(cleanup_passes() + passes)
    compressed = pm.run(graph, PassContext(calibration=calib, target=tgt, progress=progress))
    timings["passes_s"] = time.perf_counter() - t0
    bar.update()
    bar.set_description(f"lower for {tgt.name} and check")
    out_dir = Path(out) if out is not None else Path("bundles") / f"{graph.name.lower()}-{tgt.name}"
    write_bundle(out_dir, graph=compressed, original=graph, source=source, target=tgt, backend=backend,
                 recipe_name=recipe_name, passes=passes, records=pm.records,
                 check_inputs=as_tuple(check_inputs) if check_inputs is not None else example,
                 import_check=import_check, timings=timings, started=start)
    bar.update()
    bar.close()
    return Bundle.open(out_dir)


def load(path, device: str | None = None):
    """A runner for the bundle at ``path``: numpy in -> numpy out, torch in -> torch out.
    The bundle's files are checked against its manifest first; nothing in it is executed except the
    native library of a CPU (tvm) bundle, loaded only when its sha256 matches (see nnforge.bundle)."""
    return Bundle.open(path).load(device)


def verify(path) -> dict:
    """Re-hash every file of a bundle and re-run its numerics check.

    Raises BundleError naming every changed, missing or extra file, or the failed check.
    Returns a report: file count, the runtime's agreement with the stored expected outputs
    (when the target runs here), the reference interpreter's, and the fidelity against fp32."""
    root, manifest = read_manifest(path)
    problems = check_files(root, manifest)
    if problems:
        raise BundleError(f"bundle {root} failed verification: " + "; ".join(problems))
    bundle = Bundle(root, manifest)
    try:
        graph = bundle.graph()
    except GraphError as e:
        raise BundleError(f"bundle {root}: graph.json/weights.safetensors do not form a valid graph: {e}") from None
    inputs, expected, fp32 = bundle.reference()
    tolerance = manifest["numerics"].get("tolerance", {})
    report = {"path": str(root), "files": len(manifest["files"]), "integrity": "ok", "target": bundle.target}
    interp = compare(Interpreter(graph).run(*inputs), expected)
    if not within(interp, tolerance):
        raise BundleError(f"bundle {root}: its graph no longer reproduces its expected outputs "
                          f"(cosine {interp['cosine_min']:.6f})")
    report["interpreter_vs_expected"] = json_safe(interp)
    report["fidelity_vs_fp32"] = json_safe(compare(expected, fp32))
    ok, why = get_target(bundle.target).can_run()
    if ok:
        got = bundle.load()(*inputs)
        got = list(got) if isinstance(got, tuple) else [got]
        metrics = compare(got, expected)
        if not within(metrics, tolerance):
            raise BundleError(f"bundle {root}: runtime output fails the numerics check: cosine "
                              f"{metrics['cosine_min']:.6f} < {tolerance.get('cosine_min')}")
        report["runtime_vs_expected"] = json_safe(metrics)
    else:
        report["runtime_vs_expected"] = f"skipped: target {bundle.target} {why}"
    report["passed"] = True
    return report


def target(name: str) -> Target:
    """The target called ``name``; ``.with_options(...)`` adjusts its backend options, e.g.
    ``nf.target("cpu").with_options(tune=True)`` (see nnforge.backends.tvm.tuning)."""
    return get_target(name)


def targets() -> list[Target]:
    """Every known target; ``t.can_run()`` says whether its bundles run on this machine."""
    return list_targets()


__all__ = ["compile", "load", "verify", "target", "targets", "Bundle"]

"""The public surface: compile, load, verify, sign, targets. Thin wrappers: the work is in
nnforge.pipeline (compiling), nnforge.bundle (opening, verifying, signing) and the stages they call.

    >>> import nnforge as nf
    >>> bundle = nf.compile(model, target="onnx", recipe="w4-rtn", example_inputs=(x,))
    >>> runner = nf.load(bundle.path)
    >>> y = runner(x)
    >>> nf.verify(bundle.path)
"""
from __future__ import annotations

from pathlib import Path

from . import pipeline
from .bundle.store import Bundle
from .frontend import load_state_dict
from .targets import Target, get_target, list_targets


def compile(model, target: str | Target, recipe=None, *, example_inputs=None, calibration=None, out=None,
            check_inputs=None, dynamic_shapes=None, input_names=None, output_names=None,
            name: str | None = None, progress: bool = False, trust_code: bool = False,
            batch_sizes=None, allow_nonfinite: bool = False, calibration_source: str | None = None,
            max_len: int | None = None, head: str = "w8", converters: dict | None = None) -> Bundle:
    """Import ``model``, compress it with ``recipe`` and write a bundle for ``target``.

    model: torch.nn.Module, torch.export.ExportedProgram, or path to an .onnx file; with
        ``trust_code=True`` also a file whose loading runs code (TorchScript, a pickled module, .pt2),
        which is refused otherwise (see nnforge.pipeline.import_model). A causal LM (a transformers
        model with a generation head, a model directory, a .gguf file) becomes a decoder bundle:
        one graph for prefill and decode with its KV cache as state for ``max_len`` tokens (default
        512 or the model's own limit), its tokenizer, and ``Bundle.generate``/``perplexity``; it
        takes no example_inputs, and ``calibration``/``check_inputs`` may be text (a .txt path, a
        string or a list of strings, cut into token windows). ``head`` is the LM head's format
        (with the embedding, when they are tied): "w8" (int8 per channel, the default, as llama.cpp
        keeps it at 6-8 bits), "fp32", or "recipe" (compressed like every other layer).
    recipe: None, a preset name (see ``nnforge.passes.PRESETS``), a .toml path, or a list of pass configs.
    calibration: input tuples shaped like example_inputs (the batch size may differ); data-driven
        passes (GPTQ, SparseGPT, SmoothQuant, activation ranges, Hessian palettes, ...) refuse to
        run without it. ``calibration_source`` says where it came from, for the manifest.
    check_inputs: held-out inputs (one tuple or a list of tuples) the fidelity figures are measured
        on. Default: a few calibration batches held out from the passes, or the example inputs
        when no pass reads data (nnforge.heldout); the manifest says which, and how many rows.
    allow_nonfinite: accept NaN/inf in weights, inputs and fp32 outputs (refused by default,
        naming the tensor); a NaN output still never scores as a match.
    dynamic_shapes: which input axes of a torch module stay free. Unset (the default): every axis
        torch.export finds the model takes at any size (``Dim.AUTO``; a batch of one is traced as
        two rows so that the batch stays free), named batch / seq / height / width by role; the
        conditions the trace took ("seq <= 64") become the signature's guards, which the bundle
        checks on every call (nnforge.frontend.free_axes). ``"static"``: the example's exact
        shapes. Or a torch.export specification; symbols keep the names of their ``Dim``.
    out: bundle directory (default ./bundles/<model>-<target>); replaced atomically.
    batch_sizes: where the target runs natively here, the manifest's speed records time the bundle
        at these batch sizes against the same graph dense on its backend and against torch eager,
        and the tvm backend picks per shape between each compressed kernel and the dense one
        (nnforge.speed; default (1, 32), or $NNFORGE_BATCH_SIZES; () measures nothing).
    converters: converters for ops the importer lacks, or replacing its own, by op: for a torch model
        a torch op or its name ("aten.topk.default") -> ``fn(cx, node)`` returning the IR value (a
        tuple for an op with several outputs), where ``node`` is the torch.fx node and ``cx`` the
        :class:`~nnforge.frontend.torch_context.TorchContext` (``cx.value(arg)``, ``cx.emit(op, *inputs,
        **attrs)``, ``cx.const``, ``cx.shape``); for an .onnx file an op type ("TopK") -> ``fn(cx)``
        reading ``cx.node``. nnforge's own are in nnforge/frontend/torch_ops.py and onnx_ops.py.

        >>> nf.compile(model, "onnx", "w4-gptq", example_inputs=(x,), calibration=batches)
        >>> def cumprod(cx, node):            # exp(cumsum(log x)), for positive x
        ...     x = cx.emit("log", cx.value(node.args[0]), name=f"{node.name}_log")
        ...     return cx.emit("exp", cx.emit("cumsum", x, axis=node.args[1], name=f"{node.name}_sum"))
        >>> nf.compile(model, "cpu", example_inputs=(x,), converters={"aten.cumprod.default": cumprod})
    """
    return pipeline.compile(model, target, recipe, example_inputs=example_inputs, calibration=calibration, out=out,
                            check_inputs=check_inputs, dynamic_shapes=dynamic_shapes, input_names=input_names,
                            output_names=output_names, name=name, progress=progress, trust_code=trust_code,
                            batch_sizes=batch_sizes, allow_nonfinite=allow_nonfinite,
                            calibration_source=calibration_source, max_len=max_len, head=head,
                            converters=converters)


def load(path, device: str | None = None, *, target: str | None = None, key=None):
    """A runner for the bundle at ``path``: numpy in -> numpy out, torch in -> torch out.
    The bundle's files are checked against its manifest first (and the manifest against its
    signature when ``key``, an Ed25519 public key, is given); a bundle for another ``target``, from
    a newer nnforge or for another runtime version is refused. Nothing in it is executed except
    the native library of a CPU (tvm) bundle, loaded only when its sha256 matches (see nnforge.bundle)."""
    return Bundle.open(path, key=key).load(device, target=target)


def verify(path, key=None) -> dict:
    """Re-hash every file of the bundle at ``path``, re-run its numerics check and recompute what
    its manifest claims; raises BundleError naming what disagrees. See
    :func:`nnforge.bundle.store.verify` for the checks and the report.

        >>> nf.verify("bundles/mlp-onnx", key="release.pub.pem")["signature"]
    """
    from .bundle.store import verify as verify_bundle
    return verify_bundle(path, key=key)


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

"""A decoder graph (one with state: docs/decoders.md) as a stateful iOS 18 / macOS 15 package.

The KV cache is Core ML state: each cache input is an fp16 state tensor of the graph's fixed
shape at batch 1, read with ``read_state`` and written back with ``coreml_update_state``, so a
step hands back only the logits. The graph is lowered twice, with the token axis fixed at
``prefill_chunk`` (function ``prefill``) and at 1 (function ``decode``, the default), and
coremltools' ``save_multifunction`` joins the two into one package whose functions share each
weight's stored blobs.

``stateful.StatefulRunner`` runs either function over an *engine*: Core ML itself on macOS
(``stateful.CoremlEngine``), or ``mil_numpy.NumpyEngine``, the verification path that evaluates
the saved MIL program in numpy on any machine.
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections import Counter

from ...ir import Graph
from ...targets import Target
from ..base import Artifact, BackendError, LowerContext
from .stateful import DECODE, INPUT_IDS, LOGITS, POSITIONS, PREFILL  # noqa: F401  (the package's function names)

# tokens a prefill call takes when the target names none: long enough that a prompt is a few
# calls, short enough that a prompt's remainder (run one token at a time) stays short
DEFAULT_PREFILL_CHUNK = 32


def is_decoder(graph: Graph, ctx: LowerContext) -> bool:
    """A decoder graph with its one-token step (``ctx.steps``) and its state."""
    return bool(ctx.steps) and bool(graph.state_pairs())


def step_bindings(graph: Graph, target: Target, ctx: LowerContext) -> dict[str, dict[str, int]]:
    """Function name -> the dimension symbols it fixes: batch 1 for both, the token axis at the
    prefill chunk (``options.prefill_chunk``, at most the cache length) or at 1."""
    names = {v.name: v for v in graph.inputs}
    held = {i for i, _ in graph.state_pairs()}
    extra = [n for n in names if n not in held and n not in (INPUT_IDS, POSITIONS)]
    if extra or INPUT_IDS not in names or POSITIONS not in names:
        raise BackendError(f"the coreml backend's stateful decoder takes {INPUT_IDS}, {POSITIONS} and the KV cache; "
                           f"graph {graph.name} has input(s) {', '.join(extra) or 'without ' + INPUT_IDS}: compile "
                           "without the recipe that adds them (kv-evict / kv-merge keep the cache in the runner)")
    batch, seq = names[INPUT_IDS].shape
    lengths = {names[i].shape[2] for i in held}
    if len(lengths) != 1 or not isinstance(next(iter(lengths)), int):
        raise BackendError(f"the coreml backend holds the KV cache as state of one fixed length; graph {graph.name} "
                           f"has cache lengths {sorted(map(str, lengths))}")
    chunk = target.options.get("prefill_chunk", DEFAULT_PREFILL_CHUNK)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise BackendError(f"target {target.name}: prefill_chunk must be a positive integer, got {chunk!r}")
    chunk = min(chunk, next(iter(lengths)))
    decode = {**dict(ctx.steps[0]), **({batch: 1} if isinstance(batch, str) else {})}
    return {PREFILL: {**decode, **({seq: chunk} if isinstance(seq, str) else {})}, DECODE: decode}


def lower_decoder(backend, graph: Graph, target: Target, ctx: LowerContext, deploy_name: str, deploy) -> Artifact:
    """Write ``model.mlpackage`` with functions ``prefill`` and ``decode`` over the cache as state."""
    import coremltools as ct
    from .mil_types import IO_NP as _IO_NP, MODEL_DIR, np_name as _np_name
    from .lower import build_program, input_type, op_signature
    pairs = graph.state_pairs()
    binds = step_bindings(graph, target, ctx)
    held = dict(pairs)
    lowered, fallbacks = {}, None
    with tempfile.TemporaryDirectory(prefix="nnforge-coreml-") as tmp:
        desc = ct.utils.MultiFunctionDescriptor()
        for fn, bind in binds.items():
            prog, lw = build_program(graph, deploy, target, bind=bind, state=pairs)
            specs = [ct.TensorType(name=lw.name_of_input(v), shape=[bind.get(d, d) for d in v.shape],
                                   dtype=_IO_NP[input_type(v)]) for v in graph.inputs if v.name not in held]
            try:
                with contextlib.redirect_stderr(io.StringIO()):     # coremltools' unasked progress bars
                    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=deploy, inputs=specs,
                                       compute_precision=ct.precision.FLOAT16, skip_model_load=True)
            except Exception as e:
                raise BackendError(f"core ml backend: coremltools could not convert function {fn} of graph "
                                   f"{graph.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            model.save(f"{tmp}/{fn}.mlpackage")
            lw.values.clear()           # (the program's vars: what is kept of a lowering is its names and op map)
            del prog, model
            desc.add_function(f"{tmp}/{fn}.mlpackage", src_function_name="main", target_function_name=fn)
            lowered[fn] = lw
            fallbacks = fallbacks if fallbacks is not None else lw.fallbacks     # the same graph: reported once
        desc.default_function_name = DECODE
        with contextlib.redirect_stderr(io.StringIO()):
            ct.utils.save_multifunction(desc, f"{tmp}/joined.mlpackage")
        # save_multifunction keeps no metadata: it is added to the joined package, saved into the bundle
        model = ct.models.MLModel(f"{tmp}/joined.mlpackage", skip_model_load=True)
        lw = lowered[DECODE]
        inputs = [v for v in graph.inputs if v.name not in held]
        entry_inputs = [{"name": v.name, "mil_name": lw.name_of_input(v), "dtype": _np_name(v.dtype),
                         "io_dtype": input_type(v), "dims": list(v.shape)} for v in inputs]
        by_name = {v.name: v for v in graph.inputs}
        state = [{"input": i, "output": o, "mil_name": lw.name_of_input(by_name[i]),
                  "shape": [binds[DECODE].get(d, d) for d in by_name[i].shape], "dtype": "float16"} for i, o in pairs]
        logits = next(v for v in graph.outputs if v.name == LOGITS)
        entry_outputs = [{"name": LOGITS, "mil_name": lw.name_of_output(graph.outputs.index(logits)),
                          "dtype": _np_name(logits.dtype), "io_dtype": "fp32"}]
        backend._describe(model, graph, target, ctx.recipe, [], [], {})     # (features are per function here)
        meta = model.user_defined_metadata
        meta["nnforge.inputs"] = json.dumps({s["name"]: s["mil_name"] for s in entry_inputs})
        meta["nnforge.outputs"] = json.dumps({s["name"]: s["mil_name"] for s in entry_outputs})
        meta["nnforge.functions"] = json.dumps({fn: b for fn, b in binds.items()})
        meta["nnforge.state"] = json.dumps({s["input"]: s["mil_name"] for s in state})
        path = ctx.files.path(MODEL_DIR)
        with contextlib.redirect_stderr(io.StringIO()):
            model.save(str(path))
    files = sorted(f"{MODEL_DIR}/{p.relative_to(path).as_posix()}" for p in path.rglob("*") if p.is_file())
    seq = next(v for v in graph.inputs if v.name == INPUT_IDS).shape[1]
    entry = {"model": MODEL_DIR, "deployment_target": deploy_name, "compute_precision": "float16",
             "stateful": True, "default_function": DECODE,
             "functions": {fn: {"tokens": b.get(seq, seq) if isinstance(seq, str) else seq,
                                "mil_ops": dict(sorted(Counter(t for types in lowered[fn].op_map.values()
                                                               for t in types).items()))}
                           for fn, b in binds.items()},
             "inputs": entry_inputs, "outputs": entry_outputs, "state": state,
             "renamed": {k: v for k, v in lw.renamed.items() if v}, "weights": lw.weight_names}
    entry["verify"] = backend._verify(path, graph, op_signature(graph, lw), lw.weight_names, set(lw.perms), lw.plain,
                                      functions={fn: op_signature(graph, lowered[fn]) for fn in binds})
    entry["weight_forms"] = entry["verify"].pop("weight_forms")
    if ctx.reference is not None:
        from .mil_numpy import program_check
        entry["verify"]["program_check"] = program_check(path, entry, graph, ctx.reference, ctx.expected)
    return Artifact(files=files, entry=entry, fallbacks=list(fallbacks or []), toolchain=backend.toolchain())


# --- running it ------------------------------------------------------------------------------------


__all__ = ["is_decoder", "step_bindings", "lower_decoder"]

"""Which inputs calibrate the passes and which check the result.

Every fidelity figure a bundle records is measured on inputs that no pass saw (DESIGN.md,
"Numbers we print"). :func:`split` decides them, in this order:

1. ``check_inputs`` from the user: those, refused where they repeat a calibration row;
2. otherwise calibration data: a few of its batches, spread over it, are held out and the passes
   see the rest (one batch that can spare rows gives up its last rows instead);
3. otherwise the example inputs, which is only allowed when no pass reads data.

Data-driven passes refuse to run without calibration from the user; nothing here invents any.
Non-finite values in the model's weights or in any of these inputs are refused, naming the tensor,
unless ``allow_nonfinite``. A graph whose batch axis is fixed takes calibration and check batches
of another size: their rows are regrouped to its batch size (the batch axis is free in data).

    >>> data = split(graph, passes, example, calibration=batches)
    >>> data.calibration, data.check, data.report
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .frontend.errors import FrontendError
from .ir import WEIGHT_OPS, Graph
from .ir.dtypes import dtype as ir_dtype
from .numerics import nonfinite
from .passes import PassError

MAX_HELD_OUT_BATCHES = 4
HELD_OUT_SHARE = 8              # hold out about one calibration batch in this many


@dataclass
class Data:
    calibration: list[tuple] | None     # what the passes see
    check: list[tuple]                  # held-out batches: fidelity and the runtime check
    report: dict                        # the manifest's record of both


def calibration_batches(data) -> list[tuple] | None:
    """Calibration as a list of input tuples (an iterable of tuples, or of tensors for a
    one-input model), read once: a generator is consumed here."""
    if data is None:
        return None
    if isinstance(data, torch.Tensor) or _is_array(data):
        raise PassError("calibration is a list of input tuples (batches), not one tensor: wrap it, "
                        "calibration=[(x,)]")
    return [tuple(b) if isinstance(b, (list, tuple)) else (b,) for b in data]


def check_batches(data) -> list[tuple]:
    """check_inputs as a list of input tuples: one tuple of tensors (a single batch), one tensor,
    or a list of such tuples."""
    if isinstance(data, torch.Tensor) or _is_array(data):
        return [(data,)]
    items = list(data)
    if all(isinstance(x, torch.Tensor) or _is_array(x) for x in items):
        return [tuple(items)]
    return [tuple(b) if isinstance(b, (list, tuple)) else (b,) for b in items]


def _is_array(x) -> bool:
    return type(x).__module__ == "numpy" and hasattr(x, "shape")


def require_calibration(passes, calibration: list | None, recipe: str = "") -> list[str]:
    """The names of the passes that read data; an error naming them when ``calibration`` (from
    :func:`calibration_batches`) is missing or empty. Checked before the model is imported."""
    needing = [p.name for p in passes if p.needs_calibration]
    if calibration is not None and not calibration:
        raise PassError("calibration is empty: pass at least one input tuple")
    if needing and calibration is None:
        raise PassError(f"{'recipe ' + recipe + ' runs ' if recipe else ''}{', '.join(needing)}, which "
                        f"need{'s' if len(needing) == 1 else ''} calibration data, and none "
                        "was given: pass calibration=[input tuples shaped like example_inputs] (command line: "
                        "--calibration FILE, a .safetensors or .npz file with one tensor per input name, rows on "
                        "the first axis). nnforge does not make calibration data up")
    return needing


def split(graph: Graph, passes, example: tuple, *, calibration=None, check_inputs=None,
          calibration_source: str | None = None, allow_nonfinite: bool = False) -> Data:
    """The calibration batches the passes see and the held-out batches every figure is measured
    on (module docstring), checked for non-finite values and fitted to the graph's batch size."""
    calib = calibration_batches(calibration)
    needing = require_calibration(passes, calib)
    if not allow_nonfinite:
        _refuse_nonfinite(graph, example, calib, check_inputs)
    calib_report = None
    if calib is not None:
        calib_report = {"source": calibration_source or "calibration= (from the user)", **_count(calib)}
        calib = fit_batches(graph, calib, "calibration")
    if check_inputs is not None:
        check = fit_batches(graph, check_batches(check_inputs), "check_inputs")
        if calib:
            _refuse_overlap(check, calib)
        held = {"source": "check_inputs= (from the user)"}
    elif calib:
        check, calib, held = _hold_out(graph, calib)
    else:
        check = fit_batches(graph, [tuple(example)], "example inputs")
        held = {"source": "the example inputs (no pass reads data)"}
    if calib_report is not None:
        calib_report["used_by_passes"] = _count(calib) if needing else "none (no pass reads data)"
    held.update(_count(check))
    return Data(calib, check, {"calibration": calib_report, "held_out": held})


def _count(batches) -> dict:
    rows = sum(int(torch.as_tensor(b[0]).shape[0]) if b and torch.as_tensor(b[0]).dim() else 1 for b in batches)
    return {"batches": len(batches), "rows": rows}


def _hold_out(graph: Graph, calib: list[tuple]) -> tuple[list[tuple], list[tuple], dict]:
    n = len(calib)
    if n >= 2:
        k = min(MAX_HELD_OUT_BATCHES, max(1, n // HELD_OUT_SHARE))
        idx = sorted({(2 * i + 1) * n // (2 * k) for i in range(k)})
        held = [calib[i] for i in idx]
        rest = [b for i, b in enumerate(calib) if i not in idx]
        return held, rest, {"source": f"calibration batches {', '.join(map(str, idx))} of {n}, held out "
                                      "(the passes saw the others)"}
    (batch,) = calib
    rows = _rows(batch)
    fixed = _fixed_batch(graph)
    if rows is None or rows < 2 or (fixed is not None and rows <= fixed):
        raise PassError("calibration is a single batch with no rows to spare, so nothing is left to measure "
                        "fidelity on inputs the passes did not see: pass more calibration batches, or "
                        "check_inputs= (command line: --check-inputs FILE) with inputs kept apart from "
                        "calibration")
    h = max(1, rows // HELD_OUT_SHARE)
    if fixed is not None:
        h = max(h, fixed) if rows - max(h, fixed) >= fixed else h
    held = tuple(torch.as_tensor(x)[rows - h:] for x in batch)
    rest = tuple(torch.as_tensor(x)[:rows - h] for x in batch)
    return [held], [rest], {"source": f"the last {h} of the {rows} calibration rows, held out (the passes saw "
                                      "the others)"}


def _rows(batch: tuple) -> int | None:
    """The shared leading size of a batch's tensors, or None."""
    sizes = {int(torch.as_tensor(x).shape[0]) if torch.as_tensor(x).dim() else None for x in batch}
    return sizes.pop() if len(sizes) == 1 else None


def _row_keys(batch: tuple) -> list[bytes]:
    rows = _rows(batch)
    tensors = [torch.as_tensor(x).contiguous() for x in batch]
    if rows is None:
        h = hashlib.blake2b(digest_size=16)
        for t in tensors:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return [h.digest()]
    keys = []
    for r in range(rows):
        h = hashlib.blake2b(digest_size=16)
        for t in tensors:
            h.update(str(tuple(t.shape[1:])).encode())
            h.update(t[r].numpy().tobytes())
        keys.append(h.digest())
    return keys


def _refuse_overlap(check: list[tuple], calib: list[tuple]) -> None:
    seen = {k for b in calib for k in _row_keys(b)}
    total = repeated = 0
    for b in check:
        keys = _row_keys(b)
        total += len(keys)
        repeated += sum(k in seen for k in keys)
    if repeated:
        raise PassError(f"{repeated} of the {total} check_inputs rows are also calibration rows: fidelity measured "
                        "on data a pass saw overstates it; keep check inputs apart from calibration")


def _fixed_batch(graph: Graph) -> int | None:
    """The batch size the graph's inputs all fix on their first axis, or None (a free batch axis,
    or inputs that do not share one)."""
    firsts = {v.shape[0] if len(v.shape) else None for v in graph.inputs}
    if len(firsts) != 1:
        return None
    (first,) = firsts
    return first if isinstance(first, int) else None


def fit_batches(graph: Graph, batches: list[tuple], what: str) -> list[tuple]:
    """``batches`` with their rows regrouped into the graph's fixed batch size, when it has one
    and they differ from it only there (rows left over are dropped, and at least one whole batch
    must remain); unchanged otherwise. Anything else that does not fit is an error naming the
    batch, the input and both shapes."""
    fixed = _fixed_batch(graph)
    for i, b in enumerate(batches):
        _check_batch(graph, b, what, i, free_batch=fixed is not None)
    if fixed is None or all(_rows(b) == fixed for b in batches):
        return batches
    rows = [torch.cat([torch.as_tensor(b[j]) for b in batches]) for j in range(len(graph.inputs))]
    n = rows[0].shape[0]
    if n < fixed:
        raise PassError(f"{what}: {n} rows in all, but the model's batch axis is fixed at {fixed}: give at least "
                        f"{fixed} rows")
    return [tuple(r[s:s + fixed] for r in rows) for s in range(0, n - fixed + 1, fixed)]


def _check_batch(graph: Graph, batch: tuple, what: str, i: int, free_batch: bool) -> None:
    names = [v.name for v in graph.inputs]
    if len(batch) != len(names):
        raise PassError(f"{what} batch {i} has {len(batch)} tensors; the model takes {len(names)} "
                        f"({', '.join(names)})")
    for x, v in zip(batch, graph.inputs):
        t = torch.as_tensor(x)
        want = v.dtype.torch_dtype
        if want is not None and t.dtype != want:
            raise PassError(f"{what} batch {i}, input {v.name}: dtype {_dtype_name(t.dtype)}, but the model takes "
                            f"{v.dtype.name}")
        shape = list(v.shape)
        ok = t.dim() == len(shape) and all(
            not isinstance(d, int) or d == n or (axis == 0 and free_batch) for axis, (d, n) in
            enumerate(zip(shape, t.shape)))
        if not ok:
            raise PassError(f"{what} batch {i}, input {v.name}: shape {list(t.shape)}, but the model takes "
                            f"{shape}" + (" (only the batch axis may differ)" if free_batch else ""))


def _dtype_name(dt: torch.dtype) -> str:
    try:
        return ir_dtype(dt).name
    except (KeyError, ValueError, TypeError):
        return str(dt).replace("torch.", "")


def _refuse_nonfinite(graph: Graph, example: tuple, calib, check_inputs) -> None:
    from .ir.encodings import Dense
    hint = "; pass allow_nonfinite=True (command line: --allow-nonfinite) if the model means it"
    # a layer's weights must be finite; other constants may hold infinities on purpose (an
    # attention mask of -inf), but never NaN
    layer_weights = {v.name for n in graph.nodes if n.op in WEIGHT_OPS for v in n.inputs[1:] if v is not None
                     and v.is_weight}
    bad = nonfinite((f"weight {name}", v.encoding.data) for name, v in graph.weights.items()
                    if isinstance(v.encoding, Dense) and name in layer_weights)
    bad += [b for b in nonfinite((f"constant {name}", v.encoding.data) for name, v in graph.weights.items()
                                 if isinstance(v.encoding, Dense) and name not in layer_weights) if "NaN" in b]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise FrontendError(f"model {graph.name}: " + "; ".join(bad[:3]) + more + hint)
    names = [v.name for v in graph.inputs]
    # a tensor shared by many batches (a decoder's zero KV caches, the same for every window) is
    # checked where it first appears: at a long max_len, checking it again per batch is most of a compile
    seen: set[int] = set()

    def first_seen(named):
        for name, x in named:
            if id(x) not in seen:
                seen.add(id(x))
                yield name, x
    bad = nonfinite(first_seen((f"example input {n}", x) for n, x in zip(names, example)))
    if bad:
        raise FrontendError("; ".join(bad) + hint)
    for what, data, err in (("calibration", calib, PassError), ("check_inputs", check_inputs, FrontendError)):
        if data is None:
            continue
        batches = data if what == "calibration" else check_batches(data)
        for i, b in enumerate(batches):
            bad = nonfinite(first_seen((f"{what} batch {i}, input {n}", x) for n, x in zip(names, b)))
            if bad:
                raise err("; ".join(bad) + hint)


def refuse_nonfinite_outputs(graph: Graph, outputs_per_batch, what: str, first: int = 0) -> None:
    """The fp32 model's outputs on the held-out batches (numbered from ``first``) must be finite
    (its figures would mean nothing otherwise)."""
    names = [v.name for v in graph.outputs]
    for i, outs in enumerate(outputs_per_batch, start=first):
        bad = nonfinite((f"output {n}", t) for n, t in zip(names, outs))
        if bad:
            raise FrontendError(f"model {graph.name} computes non-finite values on {what} batch {i}: " + "; ".join(bad)
                                + "; pass allow_nonfinite=True (command line: --allow-nonfinite) if it means to")


def inputs_for(graph: Graph, like: Graph, batch: tuple) -> tuple:
    """``batch``, inputs of ``like`` (the fp32 graph), as inputs of ``graph`` (the compressed one):
    every input carried over by name, one that ``graph.meta["input_copies"]`` says starts as a copy
    of another (token reduction's slots: the positions) copied, and each state input that only
    ``graph`` has (a KV-cache encoding's codes and scales, docs/kv_cache.md) empty, as a new
    sequence starts: zeros of its dtype, its batch axis sized like the others. A check batch therefore prefills from an empty
    cache, and ``like``'s state inputs that ``graph`` dropped must be empty too.

        >>> inputs_for(compressed, original, (ids, positions, *zero_caches))   # ids, positions, *zero states
    """
    names = [v.name for v in graph.inputs]
    given = dict(zip((v.name for v in like.inputs), batch))
    if names == list(given):
        return tuple(batch)
    for v in like.inputs:
        if v.name not in names and bool(torch.as_tensor(given[v.name]).any()):
            raise PassError(f"check input {v.name} holds a non-empty cache, but the compressed graph {graph.name} "
                            f"replaced that state (by {', '.join(n for n in names if n.startswith(v.name + '.'))}): "
                            "its check batches must prefill from an empty cache (zeros, positions from 0)")
    from .ir.specialize import bind_symbols
    carried = {v.name: list(torch.as_tensor(given[v.name]).shape) for v in graph.inputs if v.name in given}
    env = bind_symbols(graph, shapes=carried)
    copies = graph.meta.get("input_copies", {})       # an input that starts as a copy of another (slots)
    return tuple(given[v.name] if v.name in given else given[copies[v.name]] if copies.get(v.name) in given
                 else torch.zeros(v.type.concrete(env), dtype=v.dtype.torch_dtype) for v in graph.inputs)


def shared_outputs(graph: Graph, like: Graph) -> list[tuple[int, int]]:
    """(index in ``graph``'s outputs, index in ``like``'s) of the outputs both have by name, in
    ``graph``'s order: what the compressed graph's fidelity against fp32 compares (a KV-cache
    encoding leaves the logits and replaces the cache outputs)."""
    theirs = {v.name: i for i, v in enumerate(like.outputs)}
    return [(i, theirs[v.name]) for i, v in enumerate(graph.outputs) if v.name in theirs]

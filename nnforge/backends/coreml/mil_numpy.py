"""A numpy evaluator of saved MIL programs: verification on machines without Core ML, never a
way to deploy. It runs a function of the package as written to disk (``verify.load_program``),
op by op in program order, each op computed in float32 (int64 for integers) and its result
rounded to the op's output type, so an fp16 program is evaluated at fp16 precision per op, as
Core ML's fp16 compute units round it (their accumulation order and transcendental rounding
differ, so agreement is to fp16 rounding, not bit for bit). Weights come from their constexpr
chains through ``weights.decode_op``, the decoder the weight check also uses. State
(``read_state`` / ``coreml_update_state`` / ``write_state``) lives in a dict the caller holds.

    >>> engine = NumpyEngine("model.mlpackage")
    >>> state = engine.new_state()
    >>> engine.call(state, "decode", {"input_ids": ids, "positions": pos})["logits"]
"""
from __future__ import annotations

import math

import numpy as np

from ...registry import Registry
from .verify import CoreMLVerifyError, load_program
from .weights import decode_op

OPS = Registry("MIL op evaluator")
_NP = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int8": np.int8, "uint8": np.uint8,
       "bool": np.bool_, "int16": np.int16, "uint16": np.uint16}


def _f(x):
    return np.asarray(x, np.float32) if np.asarray(x).dtype.kind == "f" else np.asarray(x)


def _elementwise(fn):
    return lambda a: fn(*(_f(a[k]) for k in ("x", "y") if k in a))


for _name, _fn in {"add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide,
                   "pow": np.power, "maximum": np.maximum, "minimum": np.minimum, "equal": np.equal,
                   "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal, "greater": np.greater,
                   "greater_equal": np.greater_equal, "logical_and": np.logical_and, "logical_or": np.logical_or,
                   "logical_xor": np.logical_xor, "logical_not": np.logical_not, "floor_div": np.floor_divide,
                   "mod": np.mod, "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "sin": np.sin, "cos": np.cos,
                   "tanh": np.tanh, "floor": np.floor, "ceil": np.ceil, "abs": np.abs,
                   "relu": lambda x: np.maximum(x, 0), "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
                   "silu": lambda x: x / (1 + np.exp(-x)),
                   "erf": np.vectorize(math.erf, otypes=[np.float32])}.items():
    OPS.register(_name)(_elementwise(_fn))


@OPS.register("rsqrt")
def _rsqrt(a):
    return 1 / np.sqrt(_f(a["x"]) + np.float32(a.get("epsilon", 1e-12)))


@OPS.register("gelu")
def _gelu(a):
    x = _f(a["x"])
    if str(a.get("mode", "EXACT")) == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + np.vectorize(math.erf, otypes=[np.float32])(x / np.sqrt(2)))


@OPS.register("identity")
def _identity(a):
    return a["x"]


@OPS.register("cast")
def _cast(a):
    return np.asarray(a["x"]).astype(_NP[str(a["dtype"])])


@OPS.register("select")
def _select(a):
    return np.where(a["cond"], _f(a["a"]), _f(a["b"]))


@OPS.register("matmul")
def _matmul(a):
    x, y = _f(a["x"]), _f(a["y"])
    if a.get("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@OPS.register("linear")
def _linear(a):
    y = np.matmul(_f(a["x"]), _f(a["weight"]).T)
    return y + _f(a["bias"]) if "bias" in a else y


@OPS.register("softmax")
def _softmax(a):
    x = _f(a["x"])
    axis = int(a.get("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _reduce(fn):
    def run(a):
        axes = a.get("axes")
        return fn(_f(a["x"]), axis=None if axes is None else tuple(int(i) for i in np.atleast_1d(axes)),
                  keepdims=bool(a.get("keep_dims", False)))
    return run


for _name, _fn in {"reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min,
                   "reduce_prod": np.prod}.items():
    OPS.register(_name)(_reduce(_fn))


@OPS.register("reduce_log_sum_exp")
def _logsumexp(a):
    x = _f(a["x"])
    axes = tuple(int(i) for i in np.atleast_1d(a["axes"]))
    m = x.max(axis=axes, keepdims=True)
    out = np.log(np.exp(x - m).sum(axis=axes, keepdims=True)) + m
    return out if a.get("keep_dims", False) else np.squeeze(out, axis=axes)


@OPS.register("reduce_argmax")
def _argmax(a):
    out = np.argmax(a["x"], axis=int(a.get("axis", -1)))
    return np.expand_dims(out, int(a.get("axis", -1))) if a.get("keep_dims", False) else out


@OPS.register("reshape")
def _reshape(a):
    return np.reshape(a["x"], [int(d) for d in a["shape"]])


@OPS.register("transpose")
def _transpose(a):
    return np.transpose(a["x"], [int(p) for p in a["perm"]])


@OPS.register("expand_dims")
def _expand_dims(a):
    x = a["x"]
    for axis in sorted(int(i) % (np.ndim(x) + len(a["axes"])) for i in a["axes"]):
        x = np.expand_dims(x, axis)
    return x


@OPS.register("squeeze")
def _squeeze(a):
    axes = a.get("axes")
    return np.squeeze(a["x"], axis=None if axes is None else tuple(int(i) for i in axes))


@OPS.register("concat")
def _concat(a):
    return np.concatenate([np.asarray(v) for v in a["values"]], axis=int(a["axis"]))


@OPS.register("tile")
def _tile(a):
    return np.tile(a["x"], [int(r) for r in a["reps"]])


@OPS.register("shape")
def _shape(a):
    return np.asarray(np.shape(a["x"]), np.int32)


@OPS.register("fill")
def _fill(a):
    return np.full([int(d) for d in a["shape"]], a.get("value", 0.0))


@OPS.register("range_1d")
def _range(a):
    return np.arange(a["start"], a["end"], a["step"])


@OPS.register("gather")
def _gather(a):
    return np.take(a["x"], np.asarray(a["indices"], np.int64), axis=int(a.get("axis", 0)))


@OPS.register("gather_along_axis")
def _gather_along(a):
    return np.take_along_axis(a["x"], np.asarray(a["indices"], np.int64), axis=int(a.get("axis", 0)))


@OPS.register("slice_by_index")
def _slice(a):
    x = np.asarray(a["x"])
    rank = x.ndim
    begin, end = [int(i) for i in a["begin"]], [int(i) for i in a["end"]]
    stride = [int(i) for i in a.get("stride", [1] * rank)]
    bmask = list(a.get("begin_mask", [False] * rank))
    emask = list(a.get("end_mask", [False] * rank))
    squeeze = list(a.get("squeeze_mask", [False] * rank))
    index = tuple(slice(None if bmask[i] else begin[i], None if emask[i] else end[i], stride[i]) for i in range(rank))
    out = x[index]
    drop = tuple(i for i in range(rank) if squeeze[i])
    return np.squeeze(out, axis=drop) if drop else out


class ProgramEvaluator:
    """The functions of one saved program, evaluated in numpy (module docstring); the decoded
    weights are kept between calls."""

    def __init__(self, prog):
        self.prog = prog
        self.weights: dict[str, np.ndarray] = {}
        self.first_overflow: str | None = None      # the first op to make inf/NaN from finite inputs

    def run(self, function: str, feeds: dict, state: dict) -> dict:
        """The outputs of ``function`` by name on ``feeds`` (inputs by MIL name); ``state``
        (state input name -> array) is read and written in place."""
        if function not in self.prog.functions:
            raise CoreMLVerifyError(f"the program has no function {function!r} (it has {', '.join(sorted(self.prog.functions))})")
        fn = self.prog.functions[function]
        env: dict[str, object] = {}
        for name, var in fn.inputs.items():
            if _is_state(var):
                env[name] = ("state", name)
            elif name not in feeds:
                raise CoreMLVerifyError(f"function {function}: input {name} not given")
            else:
                env[name] = np.asarray(feeds[name]).astype(_np_of(var))
        for op in fn.operations:
            self._op(op, env, state, function)
        return {v.name: env[v.name] for v in fn.outputs}

    def _op(self, op, env, state, function):
        t = op.op_type
        out = op.outputs[0] if op.outputs else None
        if t == "const":
            env[out.name] = out.val if not isinstance(out.val, np.ndarray) else out.val
            return
        if t.startswith("constexpr_"):
            if out.name not in self.weights:
                self.weights[out.name] = np.asarray(decode_op(op))
            env[out.name] = self.weights[out.name]
            return
        args = {}
        for key, v in op.inputs.items():
            args[key] = [env[x.name] for x in v] if isinstance(v, (list, tuple)) else env[v.name]
        if t == "read_state":
            env[out.name] = state[args["input"][1]].copy()
            return
        if t in ("coreml_update_state", "write_state"):
            value = np.asarray(args["value"]).astype(np.float16 if t == "write_state" else _np_of(op.inputs["value"]))
            state[args["state"][1]] = value
            if out is not None:
                env[out.name] = value
            return
        if t not in OPS:
            raise CoreMLVerifyError(f"function {function}: the numpy MIL evaluator has no rule for op {t} ({op.name})")
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            result = OPS.lookup(t)(args)
            env[out.name] = np.asarray(result).astype(_np_of(out))
        if self.first_overflow is None and env[out.name].dtype.kind == "f" and not np.isfinite(env[out.name]).all() \
                and all(np.isfinite(a).all() for a in _floats(args)):
            big = max((float(np.abs(a).max()) for a in _floats(args) if a.size), default=0.0)
            self.first_overflow = f"{t} {op.name} in function {function} (its inputs reach {big:.4g})"


def _floats(args: dict) -> list[np.ndarray]:
    out = []
    for v in args.values():
        for a in (v if isinstance(v, list) else [v]):
            if isinstance(a, (np.ndarray, np.generic)) and a.dtype.kind == "f":
                out.append(np.asarray(a))
    return out


def _is_state(var) -> bool:
    from coremltools.converters.mil.mil import types
    return types.is_state(var.sym_type)


def _np_of(var):
    from coremltools.converters.mil.mil import types
    dtype = var.dtype
    return _NP[types.builtin_to_string(dtype)]


class NumpyEngine:
    """A :class:`~.decoder.StatefulRunner` engine over :class:`ProgramEvaluator`: the state is a
    dict of fp16 arrays, zero when made."""

    def __init__(self, path, entry: dict):
        self.evaluator = ProgramEvaluator(load_program(path))
        self.shapes = {s["mil_name"]: s["shape"] for s in entry["state"]}

    def new_state(self) -> dict:
        return {name: np.zeros(shape, np.float16) for name, shape in self.shapes.items()}

    def write(self, state, name, value):
        state[name] = np.asarray(value).astype(np.float16)

    def read(self, state, name):
        return state[name]

    def call(self, state, function, feeds):
        return self.evaluator.run(function, feeds, state)


# What the fp16 program evaluated here is held to against the fp32 interpreter: every op rounds
# its result to fp16, so agreement is to fp16 rounding over the whole depth (not the 0.9999 a
# runtime computing in fp32 is held to); a wrong lowering (a dropped rope, a misplaced cache
# write, a wrong mask) is far below it.
FP16_PROGRAM_TOLERANCE = {"cosine_min": 0.999}
DECODE_STEPS = 3            # decode calls after the prefill chunk in the compile-time check


def program_check(path, entry: dict, graph, reference: list, expected: list | None = None) -> dict:
    """The saved decoder program against the reference interpreter at compile time: the first
    held-out sequence's first tokens (one ``prefill`` chunk when it is that long, then
    :data:`DECODE_STEPS` ``decode`` calls, each step through the state) evaluated here in numpy,
    against ``expected`` (the bundle graph's outputs on ``reference``, LowerContext.expected: the
    first tokens' logits of a causal model are those of the whole sequence), or without it the
    interpreter's run of ``graph`` on those tokens; the logits compared. A BackendError when they
    disagree beyond :data:`FP16_PROGRAM_TOLERANCE`."""
    import torch
    from ...ir import Interpreter
    from ...numerics import compare, json_safe, within
    from ..base import BackendError
    from .stateful import PREFILL, StatefulRunner
    runner = StatefulRunner(NumpyEngine(path, entry), entry)
    names = [v.name for v in graph.inputs]
    given = {n: torch.as_tensor(x)[:1] for n, x in zip(names, reference)}
    chunk = runner.chunk if given["input_ids"].shape[1] >= runner.chunk else 0
    n = min(given["input_ids"].shape[1], chunk + DECODE_STEPS)
    inputs = [given[v][:, :n] if v in ("input_ids", "positions") else given[v] for v in names]
    got = runner.run_numpy(runner.check_inputs([x.numpy() for x in inputs]))[0]
    want = torch.as_tensor(expected[0])[:1, :n] if expected is not None else Interpreter(graph).run(*inputs)[0]
    metrics = compare([torch.from_numpy(got)], [torch.as_tensor(want)])
    agree = float((torch.from_numpy(got).argmax(-1) == torch.as_tensor(want).argmax(-1)).double().mean())
    overflow = runner.engine.evaluator.first_overflow
    if not within(metrics, FP16_PROGRAM_TOLERANCE):
        why = (f"; the fp16 program first overflows at {overflow}: the model's activations pass fp16's range "
               "(+-65504), which Core ML's fp16 compute units cannot hold; this backend computes in fp16 only, so "
               "compile this model for another target" if overflow else "")
        raise BackendError(f"core ml backend: the saved program of graph {graph.name}, evaluated in numpy over {n} "
                           f"tokens ({PREFILL} {chunk}, then decode), disagrees with the reference interpreter: "
                           f"cosine {metrics['cosine_min']:.6f} (at least {FP16_PROGRAM_TOLERANCE['cosine_min']}){why}")
    return {**({"first_overflow": overflow} if overflow else {}), "tokens": n, "prefill_tokens": chunk, "decode_steps": n - chunk, "argmax_equal": agree,
            "tolerance": FP16_PROGRAM_TOLERANCE,
            "against": ("the bundle graph's outputs on the held-out batch (the reference interpreter, before the "
                        "prepare passes)" if expected is not None else "the reference interpreter on the lowered graph"),
            "evaluated": "the saved MIL program in numpy, each op rounded to "
            "its fp16 output (nnforge.backends.coreml.mil_numpy)", **json_safe(metrics)}


def program_runner(bundle_dir):
    """A stateful coreml bundle's runner that decodes its saved MIL program in numpy: a
    :class:`~nnforge.generation.DecoderRunner` whose ``generate`` and ``decoder()`` run the
    package's ``prefill`` and ``decode`` functions here (verification, module docstring).

        >>> lm = program_runner("bundles/llama-apple-a17")
        >>> lm.generate([1, 17, 42], 16, stop_tokens=[]).tokens
    """
    from pathlib import Path
    from ...bundle import safe_join
    from ...generation import DecoderRunner
    from ..base import BackendError
    from .stateful import StatefulRunner
    import json
    root = Path(bundle_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    entry = (manifest.get("backend") or {}).get("entry") or {}
    if manifest.get("backend", {}).get("name") != "coreml" or not entry.get("stateful"):
        raise BackendError(f"{root}: not a stateful coreml decoder bundle (backend "
                           f"{manifest.get('backend', {}).get('name')!r}); compile a causal LM for an apple target")
    runner = StatefulRunner(NumpyEngine(safe_join(root, entry["model"]), entry), entry)
    return DecoderRunner(runner, manifest["decoder"], runner.input_names, runner.output_names)


__all__ = ["DECODE_STEPS", "FP16_PROGRAM_TOLERANCE", "NumpyEngine", "OPS", "ProgramEvaluator", "program_check",
           "program_runner"]

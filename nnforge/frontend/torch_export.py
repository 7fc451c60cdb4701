"""torch.export -> IR.

The model is exported with ``torch.export`` and decomposed to core ATen (keeping ``aten.linear``
whole, so compression passes see every linear layer with its weight). Each ATen op is converted by
a small function from :mod:`.torch_ops`; users add or override converters with ``converters=``.
Symbolic sizes from ``dynamic_shapes`` become IR dimension symbols named after the ``Dim``.

    >>> from torch.export import Dim
    >>> g = from_torch(model, (ids, mask), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},) * 2)
"""
from __future__ import annotations

import operator
import re
import warnings

import torch
import torch.fx

from ..ir import Dense, Graph, Value, sanitize_name, symbolic as sym
from ..ir.graph import GraphError
from ..ir.verifier import verify
from .errors import FrontendError, Unsupported, UnsupportedError, UnsupportedOpsError
from .free_axes import (UnkeptGuard, attempts, axis_name, constraint_error, fixed_widened_axis, is_static_request,
                         quiet_specialisation, settle_guards, shape_guards)
from .torch_context import TorchContext, module_path, source_line
from .torch_context import Converter, sympy_to_dim  # noqa: F401  (re-exported: they were defined here)
from . import torch_routing  # noqa: F401  (registers the routing converters)
from .torch_ops import CONVERTERS, SKIP


# Nodes that only carry shape arithmetic or assertions: their SymInt values are read from meta.
_SYM_OPS = {operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod, operator.neg,
            operator.truediv, torch.sym_max, torch.sym_min}


def _symbol_names(ep, user_inputs: list[torch.fx.Node], input_names: list[str], dynamic_shapes) -> dict[str, str]:
    """Map torch's shape symbols (s0, s23, ...) to readable names: the Dim's name when the user
    gave one, else '<input>_<axis>'."""
    specs: list = []
    if isinstance(dynamic_shapes, dict):
        # torch keys them by forward() argument names, which name the export's placeholders.
        specs = [dynamic_shapes.get(node.name, dynamic_shapes.get(n)) for node, n in zip(user_inputs, input_names)]
    elif isinstance(dynamic_shapes, (list, tuple)):
        specs = list(dynamic_shapes)
    names: dict[str, str] = {}
    used: set[str] = set()
    for i, node in enumerate(user_inputs):
        val = node.meta.get("val")
        spec = specs[i] if i < len(specs) else None
        for axis, d in enumerate(getattr(val, "shape", ())):
            if not isinstance(d, torch.SymInt) or not d.node.expr.is_Symbol:
                continue
            s = d.node.expr.name
            if s in names:
                continue
            want = None
            if isinstance(spec, dict) and axis in spec:
                want = getattr(spec[axis], "__name__", None)
            elif isinstance(spec, (list, tuple)) and axis < len(spec):
                want = getattr(spec[axis], "__name__", None)
            want = re.sub(r"\W", "_", want) if want and re.match(r"^[A-Za-z_]\w*$", want) else None
            name = want or axis_name(input_names[i], val, axis)
            if want is None and name in used:
                name = f"{input_names[i]}_{axis}"
            while name in used and want is None:
                name += "_"
            names[s] = name
            used.add(name)
    return names


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _example_input_names(model: torch.nn.Module, n: int, input_names=None) -> list[str]:
    """Names for ``n`` example inputs: the given ones, else the parameters of ``forward``."""
    if input_names:
        return list(input_names)
    import inspect
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return (params + [f"input {i}" for i in range(len(params), n)])[:n]


def _export_dtype_error(model, example_inputs, input_names, error: Exception) -> FrontendError | None:
    """Where torch.export failed on a dtype clash (a conv given int64 inputs, say) and an example
    input's dtype is none of the model's weight dtypes: an error naming that input."""
    if "type" not in str(error).lower():
        return None
    weights = sorted({_dtype_name(p.dtype) for p in model.parameters() if p.is_floating_point()})
    names = _example_input_names(model, len(example_inputs), input_names)
    odd = [(n, _dtype_name(x.dtype)) for n, x in zip(names, example_inputs)
           if isinstance(x, torch.Tensor) and weights and _dtype_name(x.dtype) not in weights]
    if not odd:
        return None
    iname, dt = odd[0]
    return FrontendError(f"{type(model).__name__}: input '{iname}' is {dt}, but the model's weights are "
                         f"{' / '.join(weights)} and torch.export failed on the mix ({str(error).splitlines()[0]}): "
                         f"give example inputs of dtype {weights[0]}, or convert the input inside the model")


def export_module(model: torch.nn.Module, example_inputs, dynamic_shapes=None, *,
                  input_names=None) -> torch.export.ExportedProgram:
    """torch.export + core-ATen decomposition, keeping aten.linear intact."""
    model = model.eval()
    with warnings.catch_warnings():
        # torch's own pytree code trips its LeafSpec deprecation while exporting; not the user's concern.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        try:
            with torch.no_grad():
                ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
        except Exception as e:
            named = _export_dtype_error(model, example_inputs, input_names, e)
            if named is not None:
                raise named from e
            raise FrontendError(f"torch.export failed for {type(model).__name__}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else e}") from e
        table = torch.export.default_decompositions()
        table.pop(torch.ops.aten.linear.default, None)
        return ep.run_decompositions(table)


def _input_dtype_clash(name: str, n: torch.fx.Node, inputs: dict) -> FrontendError | None:
    """An error naming the model input whose dtype reaches ``n`` unchanged and clashes with its
    other operands (int64 ids into a Linear), where ``n`` could not be converted; None when the
    operands agree or no input is to blame."""
    # tensors passed directly: those inside a list (index_put's indices) are integer by nature
    direct = [a for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.fx.Node)]
    operands = [a for a in direct if isinstance(a.meta.get("val"), torch.Tensor)]
    dtypes = {a: a.meta["val"].dtype for a in operands}
    if len(set(dtypes.values())) < 2:
        return None
    for a in operands:
        stack, seen = [a], {a}
        while stack:                                # the user inputs this operand comes from
            x = stack.pop()
            if x in inputs and x.meta["val"].dtype == dtypes[a]:
                want = sorted({_dtype_name(d) for d in dtypes.values() if d != dtypes[a]})
                return FrontendError(
                    f"{name}: input '{inputs[x]}' is {_dtype_name(dtypes[a])}, but layer {module_path(n) or n.name} "
                    f"({n.target}) takes "
                    f"{' / '.join(want)} there: give example inputs of dtype {want[0]}, or convert the input "
                    "inside the model" + ("" if dtypes[a].is_floating_point else
                                          " (integer ids usually go through an embedding first)"))
            for y in x.all_input_nodes:
                if y not in seen:
                    seen.add(y)
                    stack.append(y)
    return None


def _converter(target, converters: dict | None):
    """The user's converter for ``target`` (keyed by the op or by its name, "aten.topk.default"),
    else nnforge's own; None when neither has one."""
    for table in (converters or {}, CONVERTERS):
        for key in (target, str(target)):
            if key in table:
                return table[key]
    return None


def from_exported_program(ep: torch.export.ExportedProgram, *, name: str = "model",
                          input_names: list[str] | None = None, output_names: list[str] | None = None,
                          dynamic_shapes=None, converters: dict | None = None) -> Graph:
    sig = ep.graph_signature
    g = Graph(name)
    state = dict(ep.state_dict)
    state.update(getattr(ep, "constants", {}) or {})
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    kinds = {spec.arg.name: spec for spec in sig.input_specs if hasattr(spec.arg, "name")}
    user = [n for n in placeholders if kinds[n.name].kind == torch.export.graph_signature.InputKind.USER_INPUT]
    names = list(input_names) if input_names else [sanitize_name(n.name) for n in user]
    if len(names) != len(user):
        raise FrontendError(f"{name}: {len(user)} model inputs but {len(names)} input names were given")
    cx = TorchContext(ep, g, _symbol_names(ep, user, names, dynamic_shapes))

    for n in placeholders:
        spec = kinds[n.name]
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
            val = n.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise FrontendError(f"{name}: input {n.name} is a {type(val).__name__}; only tensor inputs are supported")
            itype = cx.type_of(n)
            derived = [d for d in itype.shape if not isinstance(d, int) and not sym.is_symbol(d)]
            if derived:
                raise FrontendError(f"{name}: input {names[user.index(n)]} has the derived size(s) "
                                    f"{', '.join(map(str, derived))} in {list(itype.shape)}; give each input axis "
                                    "its own Dim (derived dims such as 2*Dim are not supported on inputs)")
            cx.values[n] = g.add_input(names[user.index(n)], itype)
        else:
            tensor = state.get(spec.target)
            if tensor is None:
                raise FrontendError(f"{name}: no tensor for {spec.kind.name.lower()} {spec.target}")
            cx.values[n] = g.add_weight(g.fresh_name(spec.target), Dense(tensor.detach().clone()))

    problems: list[Unsupported] = []
    poisoned: set[torch.fx.Node] = set()
    out_node = None
    for n in ep.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            out_node = n
            continue
        if n.op != "call_function":
            problems.append(Unsupported(n.op, n.name, source_line(n), "unsupported fx node kind"))
            continue
        if any(a in poisoned for a in n.all_input_nodes):
            poisoned.add(n)
            continue
        val = n.meta.get("val")
        if n.target in SKIP:
            continue
        if n.target in _SYM_OPS or str(n.target) == "aten.sym_size.int" or isinstance(val, torch.SymInt):
            cx.values[n] = val          # shape arithmetic: read later through cx.dim()
            continue
        if n.target is operator.getitem:
            src, idx = n.args
            parts = cx.values.get(src)
            if not isinstance(parts, (list, tuple)) or parts[idx] is None:
                problems.append(Unsupported(f"{src.target}[{idx}]", n.name, source_line(n),
                                            "this output of the op is not supported"))
                poisoned.add(n)
            else:
                cx.values[n] = parts[idx]
            continue
        conv = _converter(n.target, converters)
        if conv is None:
            problems.append(Unsupported(str(n.target), n.name, source_line(n)))
            poisoned.add(n)
            continue
        cx.node = n
        try:
            result = conv(cx, n)
        except (UnsupportedError, GraphError) as e:
            clash = _input_dtype_clash(name, n, {p: names[i] for i, p in enumerate(user)})
            if clash is not None:
                raise clash from e
            problems.append(Unsupported(str(n.target), n.name, source_line(n), str(e)))
            poisoned.add(n)
            continue
        cx.values[n] = result
        if isinstance(result, Value) and isinstance(val, torch.Tensor):
            want = cx.type_of(n)
            if not result.type.same_as(want):
                raise FrontendError(f"{name}: converting node {n.name} ({n.target}) gave {result.type}, "
                                    f"torch says {want} [{source_line(n)}]")
    if problems:
        raise UnsupportedOpsError(name, problems)

    outs = []
    # Outputs beyond the user's are buffers the model writes (a rope table it refreshes): state
    # torch.export hands back, not results.
    user_outputs = [s.arg.name for s in sig.output_specs
                    if s.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT and hasattr(s.arg, "name")]
    leaves = torch.utils._pytree.tree_leaves(out_node.args[0])
    if len(user_outputs) < len(leaves):
        leaves = [a for a in leaves if isinstance(a, torch.fx.Node) and a.name in set(user_outputs)]
    for i, a in enumerate(leaves):
        v = cx.values.get(a) if isinstance(a, torch.fx.Node) else None
        if not isinstance(v, Value):
            raise FrontendError(f"{name}: output {i} is not a tensor computed by the graph")
        outs.append(v)
    g.set_outputs(outs)
    if output_names is not None and len(output_names) != len(outs):
        raise FrontendError(f"{name}: {len(outs)} outputs but {len(output_names)} output names were given")
    g.name_outputs(output_names or [f"output_{i}" if len(outs) > 1 else "output" for i in range(len(outs))])
    g.remove_unused_weights()
    g.meta.update({"frontend": "torch.export", "torch": torch.__version__})
    return verify(g)


def from_torch(model: torch.nn.Module, example_inputs, *, dynamic_shapes=None, input_names=None,
               output_names=None, converters=None, name: str | None = None) -> Graph:
    """Trace ``model`` with torch.export and convert it to an IR graph."""
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    first: FrontendError | None = None
    example = tuple(example_inputs)
    for tried in attempts(model, example, dynamic_shapes):
        imported = False
        try:
            with quiet_specialisation():
                ep = export_module(model, tried.example, tried.spec, input_names=input_names)
            imported = True
            if fixed_widened_axis(ep, tried, example):
                continue
            g = from_exported_program(ep, name=name or type(model).__name__, input_names=input_names,
                                      output_names=output_names, dynamic_shapes=tried.spec, converters=converters)
            g.meta["shape_guards"] = shape_guards(ep, model, [list(v.shape) for v in g.inputs])
        except (FrontendError, UnkeptGuard) as e:
            if tried.last and isinstance(e, UnkeptGuard):
                raise FrontendError(f"{name or type(model).__name__}: torch.export traced the model under a condition "
                                    f"on its input sizes that nnforge cannot check when it runs ({e}); mark fewer "
                                    "axes free in dynamic_shapes") from e
            if tried.last and tried.spec is not None and constraint_error(model, e) is not e:
                raise constraint_error(model, e) from e
            # an op with no converter at all fails every shape alike
            if tried.last or isinstance(e, UnsupportedOpsError) and any(not i.reason for i in e.items):
                raise
            # a widened example the model refuses only says the batch of one is the model's own
            if isinstance(e, FrontendError) and (tried.example is example or imported):
                first = first or e
            continue
        note = tried.note
        free = any(not isinstance(d, int) for v in g.inputs for d in v.shape)
        if not free and not is_static_request(dynamic_shapes):
            note = "static: the model fixes every input axis (torch.export found none free)"
            if first is not None:
                why = str(first.items[0]) if isinstance(first, UnsupportedOpsError) else str(first).splitlines()[0]
                note = f"static: torch.export could not trace {g.name} with free axes nnforge keeps ({why})"
                warnings.warn(note + "; its inputs take the example's shapes only. Give dynamic_shapes explicitly "
                              "to free the axes it allows.", stacklevel=3)
        g.meta["shapes"] = note
        g.meta["shape_guards"], dropped = settle_guards(model, g, example, g.meta["shape_guards"])
        if dropped:
            g.meta["guards_dropped"] = dropped
        return g
    raise AssertionError("the last attempt returns or raises")

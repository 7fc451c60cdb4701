"""The triton backend's launcher: a graph rebuilt as a fixed sequence of torch and Triton calls.

A :class:`Plan` is built once at load: every node becomes a step holding its callable, its
resolved weights (already on the device, in the form that callable wants) and the slots of its
activations; activations are freed after their last use, as in the reference interpreter.

- ``linear`` with a packed weight: the kernel module's ``matmul`` (act-order permutations are
  the kernel's business, per the kernel contract), on the compute dtype (fp16, or bf16).
- ``linear`` listed in the entry's ``fp8_linears`` (lowering put it there: an E4M3 ``fake_quant``
  input and an e4m3 weight, on H100): the fake_quant's *input* quantised by the kernel module's
  ``quantize_fp8`` (the same rounding as the fake_quant) and ``matmul_fp8act`` on fp8 tensor
  cores; the fake_quant step itself is dropped when nothing else reads its output.
- ``dynamic_quant`` and ``linear`` listed in the entry's ``act_linears`` (lowering put them there:
  a per-token int8/int4 dynamic_quant whose every reader is a linear with an intweight-packed
  weight): the dynamic_quant step becomes ``kernels.intact.quantize`` of its float input, whose
  slot then holds int8 codes and per-row scales (:class:`~.kernels.intact.ActCodes`) instead of the
  rounded float activation, quantised once for all its linears; each linear is
  ``intact.matmul`` on those codes, int8 x int8 on tensor cores.
- ``linear`` / ``matmul`` / ``conv`` / ``embedding`` with a dense or decoded weight: the op's
  reference kernel on compute-dtype operands.
- ``hadamard`` listed in the entry's ``hadamards`` (lowering put it there): ``kernels.hadamard``
  on the fp32 activation.
- every other op: its reference kernel as it is, on fp32 activations.

Activations travel in fp32 and only the matmul-like ops drop to the compute dtype: norms,
softmax, reductions and activation rounding (``fake_quant``) then see exactly the interpreter's
arithmetic, and an fp32 mask constant such as ``finfo(float32).min`` never overflows to -inf.

On CUDA, calls whose inputs all have batch 1 (decoding) replay a CUDA graph captured once per
input shape (:class:`ShapeCache`), which removes the per-kernel launch cost that dominates at
batch 1.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from typing import Callable

import torch

from ...ir import Graph, GraphError
from ...ir.interpreter import bind_inputs
from ...ir.ops import RunContext, get_op
from ..base import BackendError
from . import decoder

MATMUL_LIKE = ("linear", "matmul", "conv", "embedding")


def to_compute(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, saturating: an fp32 weight beyond fp16's range becomes +-65504, not inf."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    info = torch.finfo(dtype)
    return t.clamp(info.min, info.max).to(dtype) if info.max < torch.finfo(t.dtype).max else t.to(dtype)


class Plan:
    """The graph as steps over numbered activation slots. ``weights`` maps a weight name to its
    dense tensor (already on the device) and ``packed`` to ``(kernel module, PackedWeight)``."""

    def __init__(self, graph: Graph, weights: dict[str, torch.Tensor], packed: dict[str, tuple],
                 compute_dtype: torch.dtype, fp8_linears: dict | None = None, hadamards: Collection[str] = (),
                 act_linears: dict | None = None):
        self.graph = graph
        self.compute_dtype = compute_dtype
        self.fp8_linears = dict(fp8_linears or {})
        self.hadamards = set(hadamards)
        self.act_linears = dict(act_linears or {})
        self.act_quants = {rec.get("quant") for rec in self.act_linears.values()}
        self._check_act_linears(packed)
        self._converted: dict[str, torch.Tensor] = {}     # one compute-dtype copy per weight
        reads = {n: self._reads(n, packed) for n in graph.nodes}
        read = {v for ins in reads.values() for v in ins} | set(graph.outputs)
        # a fake_quant whose every reader now quantises its input itself, a kv_cache_read whose
        # attention reads the state itself
        nodes = [n for n in graph.nodes if n.op not in ("fake_quant", "kv_cache_read") or
                 any(o in read for o in n.outputs)]
        readers: dict = {}
        for n in nodes:
            for v in dict.fromkeys(reads[n]):
                readers.setdefault(v, []).append(n)
        in_place = [n for n in nodes if n.op in ("cache_update", "kv_cache_write")
                    and decoder.writes_in_place(graph, n, readers)]
        slot: dict = {}
        for v in graph.inputs:
            slot[v] = len(slot)
        last: dict = {}
        for i, n in enumerate(nodes):
            for v in reads[n]:
                if v is not None and not v.is_weight:
                    last[v] = i
        for v in graph.outputs:
            last[v] = len(nodes)
        self.steps = []
        for i, node in enumerate(nodes):
            for o in node.outputs:
                slot[o] = len(slot)
            args = [None if v is None else ("w", self._weight(node, k, v, weights)) if v.is_weight else ("s", slot[v])
                    for k, v in enumerate(reads[node])]
            free = sorted({slot[v] for v in reads[node] if v is not None and not v.is_weight and last.get(v) == i}
                          | {slot[o] for o in node.outputs if o not in last})
            fn = decoder.write_step(node) if node in in_place else self._callable(node, packed)
            self.steps.append((node, fn, args, [slot[o] for o in node.outputs], free))
        self.n_slots = len(slot)
        # graph inputs the steps write in place (the launcher owns them), and the positions each
        # such write is checked against before a call
        self.written_inputs = sorted(slot[v] for n in in_place for v in decoder.state_of(n))
        self.position_checks = [(slot[decoder.positions_of(n)], decoder.cache_length(n), n) for n in in_place]
        self.input_slots = [slot[v] for v in graph.inputs]
        self.outputs = [("w", weights[v.name]) if v.is_weight else ("s", slot[v]) for v in graph.outputs]
        self.output_dtypes = [v.dtype.torch_dtype for v in graph.outputs]
        self.input_dtypes = [v.dtype.torch_dtype for v in graph.inputs]

    def _reads(self, node, packed) -> list:
        """The values ``node``'s step reads: its inputs, but an fp8 linear reads the input of
        the fake_quant in front of it."""
        if node.op == "attention":
            return decoder.attention_reads(self.graph, node)
        rec = self.fp8_linears.get(node.name)
        if rec is None:
            return list(node.inputs)
        q = node.inputs[0].producer if node.op == "linear" else None
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if q is None or q.name != rec.get("quant") or q.op != "fake_quant" or w is None or w.name not in packed \
                or not hasattr(packed[w.name][0], "matmul_fp8act"):
            raise BackendError(f"entry lists {node.name} ({node.op}) as an fp8 linear fed by fake_quant "
                               f"{rec.get('quant')!r}, which the graph and packed weights do not match; recompile")
        return [q.inputs[0], *node.inputs[1:]]

    def _check_act_linears(self, packed) -> None:
        """BackendError unless the entry's ``act_linears`` match the graph: each a linear reading a
        per-token int8/int4 dynamic_quant, its weight packed for intweight, and every reader of
        that dynamic_quant listed (nothing else may see its slot's codes)."""
        if not self.act_linears:
            return
        from .kernels.intact import ACT_BITS
        uses, nodes = self.graph.uses(), {n.name: n for n in self.graph.nodes}
        for name, rec in self.act_linears.items():
            node = nodes.get(name)
            q = node.inputs[0].producer if node is not None and node.op == "linear" else None
            w = node.inputs[1] if node is not None and len(node.inputs) > 1 else None
            per_token = (q is not None and q.name == rec.get("quant") and q.op == "dynamic_quant"
                         and q.attrs["format"] in ACT_BITS and not q.attrs["group"])
            only_fused = per_token and q.outputs[0] not in self.graph.outputs and \
                {n.name for n, _ in uses.get(q.outputs[0], [])} <= set(self.act_linears)
            packed_int = (w is not None and w.name == rec.get("weight") and w.name in packed
                          and packed[w.name][1].format == "int-weight")
            if not (only_fused and packed_int):
                raise BackendError(f"entry lists {name} as an int8 x int8 linear fed by dynamic_quant "
                                   f"{rec.get('quant')!r}, which the graph and packed weights do not match; recompile")

    def _weight(self, node, k: int, v, weights) -> torch.Tensor | None:
        if v.name not in weights:
            return None      # packed: the step's callable holds it
        if node.op not in MATMUL_LIKE:
            return weights[v.name]
        if v.name not in self._converted:
            self._converted[v.name] = to_compute(weights[v.name], self.compute_dtype)
        return self._converted[v.name]

    def _callable(self, node, packed) -> Callable:
        opdef, attrs, cdt = get_op(node.op), node.attrs, self.compute_dtype
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if node.name in self.hadamards:
            if node.op != "hadamard":
                raise BackendError(f"entry lists {node.name} ({node.op}) as a hadamard for the kernel; recompile")
            from .kernels.hadamard import hadamard
            block = attrs["block"]
            return lambda ctx, x: [hadamard(x, block)]
        if node.name in self.fp8_linears:
            module, pw = packed[w.name]
            scale = float(node.inputs[0].producer.attrs["scale"])

            def fp8_linear(ctx, x, _w, bias=None):
                shape = x.shape
                xq = module.quantize_fp8(x.reshape(-1, shape[-1]), scale)
                y = module.matmul_fp8act(xq, scale, pw, None if bias is None else bias.to(cdt), out_dtype=cdt)
                return [y.reshape(*shape[:-1], pw.n).float()]
            return fp8_linear
        if node.name in self.act_quants:
            from .kernels import intact
            bits, clip = intact.ACT_BITS[attrs["format"]], attrs["clip"]
            return lambda ctx, x: [intact.quantize(x, bits, clip)]
        if node.name in self.act_linears:
            from .kernels import intact
            pw = packed[w.name][1]

            def int_linear(ctx, a, _w, bias=None):
                return [intact.matmul(a, pw, None if bias is None else bias.to(cdt), out_dtype=cdt).float()]
            return int_linear
        if node.op == "linear" and w is not None and w.is_weight and w.name in packed:
            module, pw = packed[w.name]

            def kernel_linear(ctx, x, _w, bias=None):
                shape = x.shape
                y = module.matmul(x.reshape(-1, shape[-1]).to(cdt).contiguous(), pw,
                                  None if bias is None else bias.to(cdt))
                return [y.reshape(*shape[:-1], pw.n).float()]
            return kernel_linear
        if node.op == "attention":
            return decoder.attention_step(self.graph, node)
        if node.op in MATMUL_LIKE:
            def compute(ctx, *args):
                args = [a.to(cdt) if a is not None and a.is_floating_point() else a for a in args]
                return [o.float() if o.is_floating_point() else o for o in opdef.run(ctx, args, attrs)]
            return compute
        return lambda ctx, *args: opdef.run(ctx, list(args), attrs)

    def run(self, inputs: list[torch.Tensor], env: dict) -> list[torch.Tensor]:
        """Run every step on ``inputs`` (on the plan's device, floats in fp32); ``env`` binds the
        graph's dimension symbols. Returns the outputs in the graph's dtypes."""
        ctx = RunContext(env=env, float_dtype=torch.float32)
        vals: list = [None] * self.n_slots
        for s, x in zip(self.input_slots, inputs):
            vals[s] = x
        for node, fn, args, outs, free in self.steps:
            try:
                got = fn(ctx, *[None if a is None else a[1] if a[0] == "w" else vals[a[1]] for a in args])
            except BackendError:
                raise
            except Exception as e:
                raise BackendError(f"triton backend: node {node.name} ({node.op}) failed: "
                                   f"{type(e).__name__}: {e}") from e
            for s, t in zip(outs, got):
                vals[s] = t
            for s in free:
                vals[s] = None
        res = [v if kind == "w" else vals[v] for kind, v in self.outputs]
        return [r.to(dt) if r.dtype != dt else r for r, dt in zip(res, self.output_dtypes)]


class ShapeCache:
    """One replayable capture per input signature (shapes and dtypes), least recently used first
    out. A signature is captured the ``capture_after``-th time it is seen and runs eagerly before
    that: a decoding loop whose length grows every step sees each shape once, and capturing
    those would cost three runs each and save nothing. ``capture(inputs)`` returns a callable that
    replays on new inputs of that signature; one whose capture failed runs eagerly from then on
    (``failed`` says why)."""

    def __init__(self, eager: Callable, capture: Callable, max_entries: int = 16, capture_after: int = 2):
        self.eager, self.capture = eager, capture
        self.max_entries, self.capture_after = max_entries, capture_after
        self.entries: OrderedDict = OrderedDict()
        self.seen: OrderedDict = OrderedDict()
        self.failed: dict = {}

    @staticmethod
    def key(inputs) -> tuple:
        return tuple((tuple(x.shape), x.dtype) for x in inputs)

    def __call__(self, inputs):
        key = self.key(inputs)
        replay = self.entries.get(key)
        if replay is not None:
            self.entries.move_to_end(key)
            return replay(inputs)
        if key in self.failed:
            return self.eager(inputs)
        self.seen[key] = self.seen.pop(key, 0) + 1
        if len(self.seen) > 16 * self.max_entries:
            self.seen.popitem(last=False)
        if self.seen[key] < self.capture_after:
            return self.eager(inputs)
        try:
            replay = self.capture(inputs)
        except Exception as e:       # e.g. an op that syncs with the host: not capturable
            self.failed[key] = f"{type(e).__name__}: {e}"
            return self.eager(inputs)
        del self.seen[key]
        self.entries[key] = replay
        if len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return replay(inputs)


def capture_cuda_graph(fn: Callable, inputs: list[torch.Tensor], warmup: int = 2, *, keep: Collection[int] = (),
                       returns: Collection[int] | None = None) -> Callable:
    """Capture ``fn(static inputs)`` into a ``torch.cuda.CUDAGraph`` and return its replayer.
    Warm-up runs on a side stream first, so Triton compiles and cuBLAS allocates its workspace
    outside the capture (the pattern of the torch CUDA graphs notes). Inputs at the indices in
    ``keep`` are captured as themselves, not copied (a resident KV cache the graph writes in
    place: the replays must be given those same tensors); only the outputs at ``returns`` (default
    all) are copied out of the graph's buffers, the others are returned as those buffers."""
    static_in = [x if i in keep else x.clone() for i, x in enumerate(inputs)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)

    def replay(new_inputs):
        for i, (s, x) in enumerate(zip(static_in, new_inputs)):
            if i not in keep:
                s.copy_(x)
            elif x is not s:
                raise BackendError(f"a CUDA graph captured on input {i} in place was replayed on another tensor")
        graph.replay()
        # the next replay overwrites static_out
        return [o.clone() if returns is None or i in returns else o for i, o in enumerate(static_out)]
    return replay


class Launcher:
    """Runs a :class:`Plan` on ``device``: inputs moved there (floats as fp32), factory calls of
    the reference kernels (``arange``, ``full``) made there, CUDA graphs for batch-1 calls."""

    def __init__(self, plan: Plan, device: torch.device, cuda_graphs: bool):
        self.plan, self.device = plan, device
        self.graphs = ShapeCache(self._eager, self._capture) if cuda_graphs and device.type == "cuda" else None

    def _eager(self, inputs):
        try:
            _, env = bind_inputs(self.plan.graph, inputs)
        except GraphError as e:          # run_torch skips the Runner's input checks
            raise BackendError(str(e)) from None
        written = self.plan.written_inputs     # already in their stored dtypes (own_inputs)
        with torch.device(self.device), torch.no_grad():
            return self.plan.run([x if i in written else x.float() if x.is_floating_point() else x
                                  for i, x in enumerate(inputs)], env)

    def _capture(self, inputs):
        return capture_cuda_graph(self._eager, inputs)

    def own_inputs(self, inputs: list[torch.Tensor], *, copy: bool = True) -> list[torch.Tensor]:
        """``inputs`` on the device, after checking the positions of every in-place cache write;
        the inputs the steps write in place are copies in their graph dtypes (``copy``: False for
        a resident decoder's state, written where it lies)."""
        decoder.check_positions(self.plan.position_checks, inputs)
        dtypes = self.plan.input_dtypes
        return [x.to(self.device, dtypes[i], copy=copy) if i in self.plan.written_inputs else
                x.to(self.device, non_blocking=True) for i, x in enumerate(inputs)]

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        inputs = self.own_inputs(inputs)
        if self.graphs is not None and all(x.dim() >= 1 and x.shape[0] == 1 for x in inputs):
            return self.graphs(inputs)
        return self._eager(inputs)


__all__ = ["Plan", "Launcher", "ShapeCache", "capture_cuda_graph", "to_compute", "MATMUL_LIKE"]

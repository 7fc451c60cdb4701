"""Rotations (QuaRot, Ashkboos et al. 2024; the random-Hadamard rotations SpinQuant starts from): an
orthogonal change of basis that leaves the model's function as it was and spreads the few outlier
channels of its activations over all channels, so that low-bit weights and activations lose less.

Three kinds, in this order, each exact in real arithmetic:

1. **The residual stream** (``residual``): the stream is carried as ``r Q``, ``Q = diag(s) M`` with
   random signs ``s`` and ``M`` the Hadamard matrix of the largest power-of-two block dividing the
   width (symmetric, so ``Q`` and its inverse are both one ``hadamard`` op and a sign flip). RMS
   norms commute with ``Q`` once their weights are fused into the linears they feed (``rms(rQ) ==
   rms(r)``), so a norm read only by linears loses its weight and those linears take ``W diag(w) Q``;
   the writers to the stream (the embedding, through scalar multiplies, and the linears whose output
   is added to it) take ``Q`` on their output side. What cannot fold gets an online rotation: a
   writer that is not a linear (Gemma's post-norms, an embedding tied to the LM head) is rotated
   after it, and a reader that is not such a norm (the final norm of a tied head, a LayerNorm)
   reads the stream rotated back. A stream that LayerNorms read (their mean subtraction does not
   commute with ``Q``), whose RMS norms nearly mute some channels (Gemma's: ``SILENCE``) or that no
   RMS norm reads is left as it is, and the linears it feeds are
   rotated online (3).
2. **Attention heads** (``heads``): per head, V's rows and the output projection's columns take a
   Hadamard matrix of the head width: the attention-weighted sum commutes with it, and the cache
   then holds rotated values, which an encoded cache quantises better.
3. **Online** (``online``): ``"inputs"`` puts a ``hadamard`` op before every linear whose input is
   not rotated yet (the MLP's down projection of a stream-rotated model; every linear of a model
   whose stream could not be rotated) and multiplies its weight by the same matrix;
   ``"qk"`` rotates queries and keys after RoPE per head, which leaves the scores as they were
   and gives a quantised key cache rotated keys.

Run it before any weight or activation pass (it needs plain weights) and before the KV-cache pass.

    >>> Rotate()(graph)                      # residual + heads folded, online inputs and qk
    >>> Rotate(online=())(graph)             # folded only: no new op, every backend runs it
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir import Dense, Graph, Node, Value
from ..ir.hadamard import hadamard_matrix, largest_block
from .base import Pass, PassContext, PassError, register_pass

ONLINE = ("inputs", "qk")


def _weight(graph: Graph, node: Node, slot: int = 1) -> Value | None:
    """``node``'s weight at ``slot`` when it is a plain weight no other node reads, else None."""
    v = node.inputs[slot] if len(node.inputs) > slot else None
    if v is None or not v.is_weight or type(v.encoding) is not Dense or not v.dtype.is_float:
        return None
    return v if len(graph.uses().get(v, [])) == 1 else None


class _Weights:
    """Weight edits done in float64 and written back once per weight in its own dtype: a weight
    may be rotated on both sides (a fused linear's rows by the heads, its columns by the stream)."""

    def __init__(self, graph: Graph):
        self.g, self.edits = graph, {}

    def get(self, v: Value) -> torch.Tensor:
        if v.name not in self.edits:
            self.edits[v.name] = v.encoding.data.to(torch.float64)
        return self.edits[v.name]

    def set(self, v: Value, data: torch.Tensor) -> None:
        self.edits[v.name] = data

    def write(self) -> None:
        for name, data in self.edits.items():
            old = self.g.weights[name].encoding.data
            self.g.set_encoding(name, Dense(data.to(old.dtype)))


def _only_reader(uses, v: Value, graph: Graph) -> Node | None:
    readers = uses.get(v, [])
    if len(readers) != 1 or v in graph.outputs:
        return None
    return readers[0][0]


def _insert(graph: Graph, v: Value, op: str, *inputs, name: str, **attrs) -> Value:
    """A node computing on ``v`` placed right after ``v``'s producer, so before every reader of ``v``
    (the other ``inputs`` are weights)."""
    at = graph.nodes.index(v.producer) + 1 if v.producer is not None else 0
    name = graph.fresh_name(name, node=True)
    if at == len(graph.nodes):
        return graph.op(op, *inputs, name=name, **attrs)
    with graph.inserting_before(graph.nodes[at]):
        return graph.op(op, *inputs, name=name, **attrs)


def require_plain_weights(graph: Graph, who: str, verb: str) -> None:
    """PassError naming the first linear or embedding whose weight is already encoded: a change of
    basis needs the weights as they are."""
    for node in graph.nodes:
        if node.op in ("linear", "embedding") and node.inputs[1].is_weight \
                and type(node.inputs[1].encoding) is not Dense:
            raise PassError(f"{who}: layer {node.name}'s weight is already encoded "
                            f"({type(node.inputs[1].encoding).__name__}); {verb} before compressing weights")


# --- 1. the residual stream --------------------------------------------------------------------

@dataclass
class _Stream:
    values: list[Value]
    adds: list[Node]
    readers: list[tuple[Node | None, int, Value]]     # (node or None for a graph output, slot, value read)


def _find_stream(graph: Graph) -> _Stream | str:
    """The residual stream from the input of the first norm: a chain of adds, and everything else
    that reads one of its values; or why there is none."""
    first = next((n for n in graph.nodes if n.op in ("rms_norm", "layer_norm")), None)
    if first is None:
        return "the graph has no norm"
    uses = graph.uses()
    values, adds, readers = [first.inputs[0]], [], []
    while True:
        r = values[-1]
        nxt = None
        for node, slot in uses.get(r, []):
            if node.op == "add" and nxt is None:
                nxt = node
            else:
                readers.append((node, slot, r))
        readers += [(None, i, r) for i, o in enumerate(graph.outputs) if o is r]
        if nxt is None:
            break
        adds.append(nxt)
        values.append(nxt.output)
    if not adds:
        return f"no add extends {values[0].name}, the value the first norm ({first.name}) reads"
    return _Stream(values, adds, readers)


def _scalar(v: Value) -> bool:
    return all(d == 1 for d in v.shape)


def _writer_plan(graph: Graph, v: Value, uses) -> list[Node] | None:
    """The linears and embeddings whose output side takes ``Q`` so that ``v`` comes out rotated
    (through scalar multiplies and adds of such values, each read only on the way), or None."""
    node = v.producer
    if node is None:
        return None
    if node.op in ("linear", "embedding"):
        w = _weight(graph, node)
        bias = node.inputs[2] if node.op == "linear" and len(node.inputs) > 2 else None
        if w is None or (bias is not None and _weight(graph, node, 2) is None):
            return None
        return [node]
    if node.op not in ("mul", "add"):
        return None
    parts = [x for x in node.inputs if not (node.op == "mul" and _scalar(x))]
    if node.op == "mul" and len(parts) != 1:
        return None
    plan = []
    for x in parts:
        if _only_reader(uses, x, graph) is not node:
            return None
        sub = _writer_plan(graph, x, uses)
        if sub is None:
            return None
        plan += sub
    return plan


def _norm_plan(graph: Graph, node: Node, uses) -> list[Node] | None:
    """The linears an RMS norm's output feeds, when they are all it feeds and their weights are
    their own (so the norm's weight can fuse into them), else None."""
    if node.op != "rms_norm" or node.output in graph.outputs:
        return None
    readers = uses.get(node.output, [])
    linears = [n for n, slot in readers if n.op == "linear" and slot == 0 and _weight(graph, n) is not None]
    if not readers or len(linears) != len(readers):
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None and not node.inputs[1].is_weight:
        return None
    return linears


# A norm weight this small against its median marks a channel the model mutes (Gemma sets the
# weights of its massive-activation channels near zero): the fused, rotated weight then has to
# cancel that channel's huge normalised value exactly, which quantised weights do not.
SILENCE = 0.1


def _silenced(node: Node) -> float:
    """The smallest |scale| of an RMS norm's channels over their median (1 without a weight)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None:
        return 1.0
    scale = (node.attrs["offset"] + weight.encoding.data.to(torch.float64)).abs()
    median = float(scale.median())
    return float(scale.min()) / median if median > 0 else 0.0


def rotate_residual(graph: Graph, generator: torch.Generator, weights: _Weights, rotated: set,
                    limit: int = 0) -> dict | str:
    """Carry the residual stream rotated (module docstring, 1); what was done, or why nothing was."""
    stream = _find_stream(graph)
    if isinstance(stream, str):
        return stream
    uses = graph.uses()
    norms = {}
    for node, slot, _ in stream.readers:
        if node is not None and slot == 0 and node.op == "rms_norm":
            plan = _norm_plan(graph, node, uses)
            if plan is not None:
                norms[node] = plan
    silencing = [(n, f) for n in norms if (f := _silenced(n)) < SILENCE]
    if silencing:
        node, f = min(silencing, key=lambda t: t[1])
        return (f"the weight of {len(silencing)} of the stream's {len(norms)} RMS norms nearly silences channels ({node.name}: "
                f"smallest |weight| {f:.3g} of the median; Gemma's way of muting its massive-activation channels): fused "
                "into rotated linears, those channels' huge normalised values would leak through the weights' "
                "quantisation error")
    if not norms:
        kinds = sorted({n.op for n, _, _ in stream.readers if n is not None})
        return (f"no RMS norm on the stream feeds only linears (the stream's readers: {', '.join(kinds)}; a "
                "layer_norm's mean subtraction does not commute with a rotation)")
    width = stream.values[0].shape[-1]
    if not isinstance(width, int):
        return f"the stream's width {width} is not static"
    block = width & -width
    while limit and block > limit:
        block //= 2
    m = hadamard_matrix(block, width)
    signs = torch.randint(0, 2, (width,), generator=generator).to(torch.float64) * 2 - 1
    q = signs[:, None] * m                                          # Q = diag(s) M
    dt = stream.values[0].dtype
    sign_weight = graph.add_weight(graph.fresh_name("rotate.residual.signs"),
                                   Dense(signs.to(dt.torch_dtype)))

    # writers: the stream's first value and each add's other operand
    writers = [(stream.values[0], None)] + [
        (add.inputs[1] if add.inputs[0] is r else add.inputs[0], add) for add, r in zip(stream.adds, stream.values)]
    folded, online_writers, start_online = 0, 0, False
    for v, add in writers:
        plan = _writer_plan(graph, v, uses) if (add is None or _only_reader(uses, v, graph) is add) else None
        if plan is not None:
            for node in plan:
                w = node.inputs[1]
                if node.op == "embedding":
                    weights.set(w, weights.get(w) @ q)
                else:
                    weights.set(w, q.T @ weights.get(w))
                    if len(node.inputs) > 2 and node.inputs[2] is not None:
                        weights.set(node.inputs[2], weights.get(node.inputs[2]) @ q)
            folded += 1
            continue
        flipped = _insert(graph, v, "mul", v, sign_weight, name=f"{v.name}.rotate_signs")
        turned = _insert(graph, flipped, "hadamard", flipped, block=block, name=f"{v.name}.rotate")
        if add is None:
            # only the readers that take the stream rotated; the rest go on reading it as it was
            start_online = True
            for node, slot in uses.get(v, []):
                if node in norms or node is stream.adds[0]:
                    node.inputs[slot] = turned
        else:
            add.inputs[add.inputs.index(v)] = turned
        online_writers += 1

    # readers: fuse and rotate the norms that feed only linears; rotate the stream back for the rest
    unrotated: dict[Value, Value] = {}
    back = 0
    for node, slot, r in stream.readers:
        if node in norms:
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            scale = (node.attrs["offset"] + weight.encoding.data.to(torch.float64)) if weight is not None else None
            for lin in norms[node]:
                w = lin.inputs[1]
                data = weights.get(w) * scale[None, :] if scale is not None else weights.get(w)
                weights.set(w, data @ q)
            node.inputs[1:] = []
            node.attrs["offset"] = 0.0
            rotated.add(node.output)
            continue
        if r is stream.values[0] and start_online:
            continue
        if r not in unrotated:
            turned = _insert(graph, r, "hadamard", r, block=block, name=f"{r.name}.unrotate")
            unrotated[r] = _insert(graph, turned, "mul", turned, sign_weight, name=f"{r.name}.unrotate_signs")
        if node is None:
            graph.outputs[slot] = unrotated[r]
        else:
            node.inputs[slot] = unrotated[r]
        back += 1
    return {"width": width, "block": block, "norms_fused": len(norms), "writers_folded": folded,
            "writers_online": online_writers, "readers_rotated_back": back}


# --- 2. attention heads ------------------------------------------------------------------------

def _value_rows(graph: Graph, v: Value, uses) -> tuple[Node, int, int] | None:
    """The linear whose output rows make ``v`` (all of them, or a slice of a fused projection) and
    the rows, when each value on the way is read only on the way."""
    node = v.producer
    if node is None:
        return None
    if node.op == "linear" and _weight(graph, node) is not None:
        return node, 0, node.inputs[1].shape[0]
    if node.op == "slice" and node.attrs["axis"] in (-1, v.type.rank - 1):
        lin = node.inputs[0].producer
        if lin is not None and lin.op == "linear" and _weight(graph, lin) is not None \
                and node.output not in graph.outputs:
            return lin, node.attrs["start"], node.attrs["end"]
    return None


def _back(uses, graph: Graph, v: Value, *ops: str) -> Value | None:
    """Walk up from ``v`` through producers of the given ops, each value read only by the next."""
    for op in ops:
        node = v.producer
        if node is None or node.op != op or _only_reader(uses, node.inputs[0], graph) is not node:
            return None
        v = node.inputs[0]
    return v


def _forward(uses, graph: Graph, v: Value, *ops: str) -> Node | None:
    """The node reached from ``v`` through readers of the given ops (the last one returned)."""
    node = None
    for op in ops:
        node = _only_reader(uses, v, graph)
        if node is None or node.op != op:
            return None
        v = node.output
    return node


def rotate_heads(graph: Graph, weights: _Weights, rotated: set, limit: int = 0) -> int:
    """Rotate V and the output projection per head (module docstring, 2); the layers done."""
    uses = graph.uses()
    done = 0
    for att in [n for n in graph.nodes if n.op == "attention"]:
        cache = att.inputs[2].producer
        if cache is None or cache.op != "cache_update":
            continue
        src = _back(uses, graph, cache.inputs[1], "permute", "reshape")
        rows = _value_rows(graph, src, uses) if src is not None else None
        out = _forward(uses, graph, att.output, "permute", "reshape", "linear")
        if rows is None or out is None or _weight(graph, out) is None:
            continue
        head_dim = att.inputs[2].shape[-1]
        h = hadamard_matrix(largest_block(head_dim, limit), head_dim)
        lin, start, end = rows
        w = weights.get(lin.inputs[1]).clone()
        for s in range(start, end, head_dim):
            w[s:s + head_dim] = h.T @ w[s:s + head_dim]
        weights.set(lin.inputs[1], w)
        bias = lin.inputs[2] if len(lin.inputs) > 2 else None
        if bias is not None:
            b = weights.get(bias).clone()
            for s in range(start, end, head_dim):
                b[s:s + head_dim] = b[s:s + head_dim] @ h
            weights.set(bias, b)
        wo = weights.get(out.inputs[1])
        weights.set(out.inputs[1], wo @ torch.block_diag(*[h] * (wo.shape[1] // head_dim)))
        rotated.add(out.inputs[0])
        done += 1
    return done


# --- 3. online ---------------------------------------------------------------------------------

def rotate_qk(graph: Graph, limit: int = 0) -> int:
    """A ``hadamard`` per head on the queries and on the keys written to the cache; the layers done."""
    done = 0
    for att in [n for n in graph.nodes if n.op == "attention"]:
        cache = att.inputs[1].producer
        if cache is None or cache.op != "cache_update":
            continue
        head_dim = att.inputs[0].shape[-1]
        block = largest_block(head_dim, limit)
        if block == 1:
            continue
        q, k = att.inputs[0], cache.inputs[1]
        att.inputs[0] = _insert(graph, q, "hadamard", q, block=block, name=f"{att.name}.q_rotate")
        cache.inputs[1] = _insert(graph, k, "hadamard", k, block=block, name=f"{cache.name}.k_rotate")
        done += 1
    return done


def rotate_inputs(graph: Graph, weights: _Weights, rotated: set, limit: int = 0) -> dict:
    """A ``hadamard`` before each linear input not rotated yet, shared by the linears reading it,
    and the same matrix in their weights; counts, and the linears left out (shared weights)."""
    groups: dict[Value, list[Node]] = {}
    skipped = []
    for node in graph.nodes:
        if node.op != "linear" or node.inputs[0] in rotated:
            continue
        if _weight(graph, node) is None:
            skipped.append(node.name)
            continue
        groups.setdefault(node.inputs[0], []).append(node)
    ops = done = 0
    for x, linears in groups.items():
        width = x.shape[-1]
        block = largest_block(width, limit) if isinstance(width, int) else 1
        if block == 1:
            skipped += [n.name for n in linears]
            continue
        m = hadamard_matrix(block, width)
        turned = _insert(graph, x, "hadamard", x, block=block, name=f"{x.name}.rotate")
        for lin in linears:
            lin.inputs[0] = turned
            weights.set(lin.inputs[1], weights.get(lin.inputs[1]) @ m)
        rotated.add(turned)
        ops, done = ops + 1, done + len(linears)
    return {"hadamard_ops": ops, "linears": done, "left_out": skipped}


@register_pass
@dataclass
class Rotate(Pass):
    """Rotate the model's bases (module docstring): ``residual`` and ``heads`` fold rotations into
    the weights, ``online`` ("inputs", "qk") adds ``hadamard`` ops where they cannot fold; the
    residual signs come from ``seed``. ``block`` caps every rotation's block (0: as wide as the
    width allows): FP4 formats with small scale blocks keep more with rotations of their own block
    size (MR-GPTQ, Egiazarian et al. 2025), a whole-width rotation mixing every block's outliers
    into every other block."""
    name = "rotate"
    exact = True
    residual: bool = True
    heads: bool = True
    online: tuple = ONLINE
    seed: int = 0
    block: int = 0

    def __post_init__(self):
        online = (self.online,) if isinstance(self.online, str) else tuple(self.online or ())
        unknown = [o for o in online if o not in ONLINE]
        if unknown:
            raise PassError(f"{self.name}: unknown online rotation(s) {', '.join(map(repr, unknown))}; "
                            f"choose from {', '.join(ONLINE)}")
        self.online = online
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 0 \
                or (self.block and self.block & (self.block - 1)):
            raise PassError(f"{self.name}: block must be 0 (whole width) or a power of two, got {self.block!r}")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        require_plain_weights(graph, self.name, "rotate")
        weights, rotated = _Weights(graph), set()
        generator = torch.Generator().manual_seed(self.seed)
        if self.residual:
            done = rotate_residual(graph, generator, weights, rotated, self.block)
            if isinstance(done, str):
                ctx.record("residual", {"unchanged": done})
                if "inputs" not in self.online:
                    ctx.warn(f"the residual stream was not rotated ({done}); online=('inputs',) rotates the "
                             "linears it feeds instead")
            else:
                ctx.record("residual", done)
        if self.heads:
            ctx.record("heads", rotate_heads(graph, weights, rotated, self.block))
        if "qk" in self.online:
            ctx.record("qk", rotate_qk(graph, self.block))
        if "inputs" in self.online:
            ctx.record("inputs", rotate_inputs(graph, weights, rotated, self.block))
        weights.write()
        graph.remove_unused_weights()
        return graph


__all__ = ["Rotate", "rotate_residual", "rotate_heads", "rotate_qk", "rotate_inputs"]

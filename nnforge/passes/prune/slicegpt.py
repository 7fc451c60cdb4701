"""SliceGPT (Ashkboos et al., 2024): rotate the residual stream onto its principal components, then
delete the least of them, so that every hidden dimension the stream feeds shrinks: the embedding's
columns, the rows of every linear writing to the stream and the columns of every linear reading it.
The result is a smaller dense graph, not a mask.

Each value of the stream (the input of the first norm, then each residual add's output) gets its own
orthogonal basis ``Q_i`` (the eigenvectors of ``Σ xᵀx`` over the calibration tokens, largest first)
and is carried as ``x Q_i[:, :k]``. Exactly as in the rotation pass (passes/rotate.py), an RMS
norm commutes with the change of basis once its weight is fused into the linears it feeds; after
slicing it sees ``k`` of ``d`` channels, so it divides by the original width (``eps`` scaled by
``d/k`` and ``sqrt(d/k)`` folded into its readers): the norm then equals the full one whenever
the deleted components are zero, which is the approximation SliceGPT makes.

- Writers: the embedding (through scalar multiplies) takes ``Q_0`` on its columns; a linear whose
  output is added to the stream takes ``Q_{i+1}ᵀ`` on its rows; a writer that is not a linear
  (Gemma's post-norms) is followed by a new ``d → k`` linear (a post-norm's weight folded in).
- Shortcuts: with ``basis="layer"`` the residual path between two values takes ``Q_iᵀ Q_{i+1}``,
  a ``k × k`` linear (SliceGPT's shortcut matrices); ``basis="shared"`` computes one basis from all
  values together and needs none, at some fidelity.
- Readers: an RMS norm feeding only linears with their own weights is fused into them; the final
  norm of an LM head tied to the embedding gets a ``k × k`` linear ``Q_Lᵀ diag(w) Q_0`` and the head
  reads the sliced embedding (the same approximation as slicing the embedding); anything else reads
  the stream projected back to ``d`` channels.

The stream must be read by RMS norms (Llama, Qwen, Mistral, Gemma, Phi-3): LayerNorm's mean
subtraction does not commute with the rotation, and a graph whose stream it reads is refused.

    >>> SliceGPT(fraction=0.25)(graph, PassContext(calibration=batches))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...ir import Dense, Graph, Node, TensorType, Value
from ..base import Pass, PassContext, PassError, register_pass
from ..quantize.calibrate import run_calibration
from ..rotate import (_find_stream, _insert, _norm_plan, _only_reader, _weight, _Weights, _writer_plan,
                      require_plain_weights)
from .structures import reinfer

BASES = ("layer", "shared")
WEIGHTINGS = ("energy", "token")
HEADS = ("tied", "untie")


class _Resized(_Weights):
    """The rotation pass's float64 weight edits, written back at their new shapes (slicing changes
    them; every reader is rewritten to match before the types are inferred again)."""

    def write(self) -> None:
        for name, data in self.edits.items():
            v = self.g.weights[name]
            v.encoding = Dense(data.to(v.encoding.data.dtype))
            v.type = TensorType(v.encoding.dtype, tuple(data.shape))


def _embedding_behind(graph: Graph, v: Value, uses) -> Node | None:
    """The embedding ``v`` comes from through scalar multiplies, each read only on the way."""
    node = v.producer
    while node is not None and node.op == "mul":
        parts = [x for x in node.inputs if not all(d == 1 for d in x.shape)]
        if len(parts) != 1 or _only_reader(uses, parts[0], graph) is not node:
            return None
        node = parts[0].producer
    return node if node is not None and node.op == "embedding" else None


def _covariances(graph: Graph, stream, batches, who: str, normalise: bool = False,
                 project: int = 0) -> tuple[list[torch.Tensor], int]:
    """``Σ xᵀx`` (float64) of each stream value over every calibration token, and the tokens' count;
    with ``normalise``, of each token's unit vector ``x / |x|``. With ``project`` (a kept width),
    each value is projected onto its ``project`` principal components as soon as they are known,
    so that every later value is seen as the sliced model computes it (SliceGPT's sequential
    calibration: a layer's basis then fits the inputs it will get, errors of the earlier slicing
    included)."""
    uses = graph.uses()
    index = {v: i for i, v in enumerate(stream.values)}
    # one node reading each value, the first in graph order, sees it for every batch
    order = {n: i for i, n in enumerate(graph.nodes)}
    watch: dict[Node, list[tuple[int, int]]] = {}
    for v, i in index.items():
        readers = sorted(uses.get(v, []), key=lambda r: order[r[0]])
        if readers:
            node, slot = readers[0]
            watch.setdefault(node, []).append((slot, i))
    width = stream.values[0].shape[-1]
    cov = [torch.zeros(width, width, dtype=torch.float64) for _ in stream.values]
    tokens = [0]

    def before(node: Node, args) -> None:
        for slot, i in watch.get(node, ()):
            for batch in args:
                x = batch[slot].reshape(-1, width).to(torch.float64)
                if normalise:
                    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
                cov[i] += x.T @ x
                if i == 0:
                    tokens[0] += x.shape[0]
            if project:
                q = _bases([cov[i]], False)[0][0][:, :project]
                for batch in args:
                    t = batch[slot]          # the very tensor every later reader reads
                    x = t.reshape(-1, width).to(torch.float64)
                    t.copy_(((x @ q) @ q.T).reshape(t.shape).to(t.dtype))

    run_calibration(graph, batches, before, who=who, until=[n.name for n in watch])
    return cov, tokens[0]


def _bases(cov: list[torch.Tensor], shared: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each value's eigenvectors (columns, largest eigenvalue first) and eigenvalues."""
    if shared:
        total = sum(c / c.trace().clamp_min(1e-300) for c in cov)
        cov = [total] * len(cov)
    vecs, vals = [], []
    for c in cov:
        e, q = torch.linalg.eigh(c)
        vals.append(e.flip(0).clamp_min(0))
        vecs.append(q.flip(1))
    return vecs, vals


@register_pass
@dataclass
class SliceGPT(Pass):
    """Delete ``fraction`` of the residual stream's width along its least principal components
    (module docstring). ``basis``: "layer" (one basis per stream value, ``k × k`` shortcut linears
    between them) or "shared" (one basis, no shortcut linears). The kept width is rounded down to a
    multiple of ``multiple`` (kernels' vector widths). ``weighting``: the principal components of
    the tokens as they are ("energy", SliceGPT's) or of each token's direction ("token": the norms
    that read the stream see only directions, and a few massive-activation tokens would otherwise
    choose the basis). ``sequential``: each layer's basis from the already-sliced model's values.
    ``head`` (an LM head tied to the embedding): "tied" keeps one vocabulary matrix, the sliced
    embedding, which the head reads through a ``k × k`` linear (every token's logit then sees only
    the embedding's kept components); "untie" gives the head its own sliced matrix (SliceGPT's
    way: exact on the head's side, one more vocabulary-sized matrix)."""
    name = "slicegpt"
    needs_calibration: ClassVar[bool] = True
    fraction: float = 0.25
    basis: str = "layer"
    multiple: int = 8
    weighting: str = "energy"
    sequential: bool = True
    head: str = "tied"

    def __post_init__(self):
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0 <= self.fraction < 1:
            raise PassError(f"{self.name}: fraction must be in [0, 1), the share of the hidden width deleted; "
                            f"got {self.fraction!r}")
        if self.basis not in BASES:
            raise PassError(f"{self.name}: basis must be one of {', '.join(BASES)}, got {self.basis!r}")
        if self.weighting not in WEIGHTINGS:
            raise PassError(f"{self.name}: weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.head not in HEADS:
            raise PassError(f"{self.name}: head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if not isinstance(self.sequential, bool):
            raise PassError(f"{self.name}: sequential must be true or false, got {self.sequential!r}")
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise PassError(f"{self.name}: multiple must be a positive integer, got {self.multiple!r}")

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        require_plain_weights(graph, self.name, "slice")
        stream = _find_stream(graph)
        if isinstance(stream, str):
            raise PassError(f"{self.name}: no residual stream to slice: {stream}")
        for node, _, r in stream.readers:
            if node is not None and node.op == "layer_norm":
                raise PassError(f"{self.name}: the residual stream {r.name} is read by layer_norm {node.name}; "
                                "SliceGPT needs RMS-norm streams (a LayerNorm's mean subtraction does not commute "
                                "with the rotation)")
        d = stream.values[0].shape[-1]
        if not isinstance(d, int):
            raise PassError(f"{self.name}: the stream's width {d} is not static")
        # fraction 0 keeps the whole width: the change of basis alone, exact
        k = d if self.fraction == 0 else int(d * (1 - self.fraction)) // self.multiple * self.multiple
        if k < 1:
            raise PassError(f"{self.name}: slicing {self.fraction:.0%} of width {d} in multiples of "
                            f"{self.multiple} leaves nothing")

        cov, tokens = _covariances(graph, stream, ctx.calibration, self.name, self.weighting == "token",
                                   project=k if self.sequential and self.basis == "layer" and k < d else 0)
        vecs, vals = _bases(cov, self.basis == "shared")
        q = [v[:, :k] for v in vecs]
        kept = [float(e[:k].sum() / e.sum().clamp_min(1e-300)) for e in vals]
        figures = self._slice(graph, stream, q, d, k)
        reinfer(graph, graph.nodes)
        graph.remove_unused_weights()
        ctx.record("slice", {"width": d, "kept_width": k, "calibration_tokens": tokens,
                             "variance_kept_mean": sum(kept) / len(kept), "variance_kept_min": min(kept), **figures})
        return graph

    def _slice(self, graph: Graph, stream, q: list[torch.Tensor], d: int, k: int) -> dict:
        uses = graph.uses()
        weights = _Resized(graph)
        dt = stream.values[0].dtype
        index = {v: i for i, v in enumerate(stream.values)}
        counts = {"writers_folded": 0, "writer_linears": 0, "shortcut_linears": 0, "norms_fused": 0,
                  "readers_projected_back": 0, "tied_head": False}

        def linear(x: Value, w: torch.Tensor, name: str) -> Value:
            """``x @ w.T`` as a new linear right after ``x``'s producer. Its weight takes its shape
            with the others' (the types around it are the unsliced ones until then)."""
            weight = graph.add_weight(graph.fresh_name(f"{name}.weight"),
                                      Dense(torch.zeros(w.shape[0], x.shape[-1], dtype=dt.torch_dtype)))
            weights.set(weight, w)
            return _insert(graph, x, "linear", x, weight, name=name)

        def fold(plan: list[Node], qn: torch.Tensor) -> None:
            """The writers' output side into the sliced basis ``qn``: embedding columns, linear rows."""
            for node in plan:
                w = node.inputs[1]
                if node.op == "embedding":
                    weights.set(w, weights.get(w) @ qn)
                    continue
                weights.set(w, qn.T @ weights.get(w))
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    weights.set(node.inputs[2], weights.get(node.inputs[2]) @ qn)
            counts["writers_folded"] += 1

        # which norms fuse: decided before any edit (their plans read the graph as it was)
        norms = {node: _norm_plan(graph, node, uses) for node, slot, _ in stream.readers
                 if node is not None and slot == 0 and node.op == "rms_norm"}
        norms = {n: p for n, p in norms.items() if p is not None}

        # the first value's writer: the embedding, possibly tied to the LM head
        tied, carried = None, {}
        v0 = stream.values[0]
        plan = _writer_plan(graph, v0, uses)
        emb = _embedding_behind(graph, v0, uses) if plan is None else None
        if plan is not None:
            fold(plan, q[0])
        elif emb is not None and emb.inputs[1].is_weight and type(emb.inputs[1].encoding) is Dense:
            # the weight is shared (an LM head tied to it): the embedding reads a sliced copy, which
            # the head then reads too (below)
            old = emb.inputs[1]
            sliced = old.encoding.data.to(torch.float64) @ q[0]
            new = graph.add_weight(graph.fresh_name(f"{old.name}.sliced"), Dense(sliced.to(old.dtype.torch_dtype)))
            emb.inputs[1] = new
            tied = (old, new)
            counts["writers_folded"] += 1
        else:
            # the value stays as it was for readers that do not fuse; the stream and the norms
            # that fuse read its sliced form
            carried[v0] = linear(v0, q[0].T, f"{v0.name}.slice")
            counts["writer_linears"] += 1

        # each add: its writer to the stream, and the shortcut from the value before it
        for i, add in enumerate(stream.adds):
            prev = stream.values[i]
            other = add.inputs[1] if add.inputs[0] is prev else add.inputs[0]
            qn = q[i + 1]
            plan = _writer_plan(graph, other, uses) if _only_reader(uses, other, graph) is add else None
            if plan is not None:
                fold(plan, qn)
            else:
                post = other.producer
                m = qn.T
                if post is not None and post.op == "rms_norm" and len(post.inputs) > 1 \
                        and post.inputs[1] is not None and _weight(graph, post) is not None \
                        and _only_reader(uses, other, graph) is add:
                    # a post-norm: its weight joins the new linear's columns
                    scale = post.attrs["offset"] + post.inputs[1].encoding.data.to(torch.float64)
                    m = qn.T * scale[None, :]
                    post.inputs[1:] = []
                    post.attrs["offset"] = 0.0
                add.inputs[add.inputs.index(other)] = linear(other, m, f"{add.name}.slice")
                counts["writer_linears"] += 1
            sliced = carried.get(prev, prev)
            if self.basis == "layer":
                sliced = linear(sliced, qn.T @ q[i], f"{add.name}.shortcut")
                counts["shortcut_linears"] += 1
            add.inputs[add.inputs.index(prev)] = sliced

        # readers
        back: dict[Value, Value] = {}
        ratio = d / k
        for node, slot, r in stream.readers:
            qi = q[index[r]]
            if node in norms:
                node.inputs[0] = carried.get(r, r)
                self._fuse_norm(node, norms[node], qi, ratio, weights)
                counts["norms_fused"] += 1
                continue
            head = self._tied_head(graph, node, r, tied, uses) if tied is not None else None
            if head is not None:
                g = node.attrs["offset"] + node.inputs[1].encoding.data.to(torch.float64) \
                    if len(node.inputs) > 1 and node.inputs[1] is not None else torch.ones(d, dtype=torch.float64)
                node.inputs[1:] = []
                node.attrs["offset"] = 0.0
                node.attrs["eps"] = node.attrs["eps"] * ratio
                if self.head == "untie":
                    old = tied[0]
                    data = (old.encoding.data.to(torch.float64) * g[None, :]) @ (math.sqrt(ratio) * qi)
                    own = graph.add_weight(graph.fresh_name(f"{old.name}.head"), Dense(data.to(old.dtype.torch_dtype)))
                    for lin in head:
                        lin.inputs[1] = own
                else:
                    m = math.sqrt(ratio) * (q[0].T * g[None, :]) @ qi      # (k_out = Q_0 side, k_in = Q_L side)
                    turned = linear(node.output, m, f"{node.name}.slice")
                    for lin in head:
                        lin.inputs[0] = turned
                        lin.inputs[1] = tied[1]
                counts["tied_head"] = self.head
                continue
            if r in carried:            # the first value, not sliced in place: read as it was
                continue
            if r not in back:
                back[r] = linear(r, qi, f"{r.name}.unslice")
            if node is None:
                graph.outputs[slot] = back[r]
            else:
                node.inputs[slot] = back[r]
            counts["readers_projected_back"] += 1
        weights.write()
        return counts

    @staticmethod
    def _fuse_norm(node: Node, linears: list[Node], qi: torch.Tensor, ratio: float, weights: _Weights) -> None:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        scale = node.attrs["offset"] + weight.encoding.data.to(torch.float64) if weight is not None else None
        for lin in linears:
            w = weights.get(lin.inputs[1])
            if scale is not None:
                w = w * scale[None, :]
            weights.set(lin.inputs[1], math.sqrt(ratio) * (w @ qi))
        node.inputs[1:] = []
        node.attrs["offset"] = 0.0
        node.attrs["eps"] = node.attrs["eps"] * ratio

    @staticmethod
    def _tied_head(graph: Graph, node: Node | None, r: Value, tied, uses) -> list[Node] | None:
        """The linears an RMS norm on the last stream value feeds, when they all read the embedding's
        original (tied) weight and nothing else reads the norm."""
        if node is None or node.op != "rms_norm" or node.inputs[0] is not r or node.output in graph.outputs:
            return None
        readers = uses.get(node.output, [])
        head = [n for n, slot in readers if n.op == "linear" and slot == 0 and n.inputs[1] is tied[0]
                and (len(n.inputs) < 3 or n.inputs[2] is None)]
        if not readers or len(head) != len(readers):
            return None
        return head


__all__ = ["SliceGPT"]

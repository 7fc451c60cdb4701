"""Passes and the PassManager.

A pass is a dataclass holding its options (one typed, validated config per technique, like
torchao's ``AOBaseConfig``), registered by name so recipes can refer to it. ``run(graph, ctx)``
returns the rewritten graph; it may edit the graph it is given (the PassManager hands each pass a
graph it owns). Options travel in the pass object and the :class:`PassContext`, never in globals.

    >>> pm = PassManager([DeadCodeElimination(), QuantizeRTN(bits=4, group_size=32)])
    >>> graph = pm.run(graph, PassContext(calibration=batches))
"""
from __future__ import annotations

import dataclasses
import fnmatch
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import NnforgeError
from ..ir import Graph, GraphError, Node, WEIGHT_OPS
from ..ir.ops import WEIGHT_SLOT
from ..ir.verifier import verify
from ..registry import Registry


class PassError(NnforgeError, ValueError):
    """A pass cannot run as configured (bad option, missing calibration data, ...)."""


@dataclass
class PassContext:
    """What passes may read besides the graph: calibration inputs, the target, and where to
    record figures. ``figures`` collects per-pass numbers for the bundle manifest; ``warnings``
    what a pass did that the user should know about (the manifest's pass record and the CLI's
    compile output carry them)."""
    calibration: list | None = None
    target: Any = None
    progress: bool = False
    seed: int = 0
    figures: dict[str, dict] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    current: str = ""
    # the graph as it was before the first pass that changed its function (see Pass.exact): what
    # recovery passes tune the compressed model towards; the PassManager keeps it
    reference: Any = None

    def record(self, key: str, value) -> None:
        self.figures.setdefault(self.current, {})[key] = value

    def warn(self, message: str) -> None:
        """Note something the compile should say out loud: it names the layers and what to do."""
        self.warnings.setdefault(self.current, []).append(message)


PASSES: Registry[type["Pass"]] = Registry("pass")
# Class decorator: make a Pass dataclass available to recipes under ``cls.name``.
register_pass = PASSES.register()


class Pass(ABC):
    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    # a pass that fixes dimension sizes (a backend's prepare pass) may turn symbols into numbers
    keeps_signature: ClassVar[bool] = True
    # a pass that re-encodes the graph's state (the KV-cache pass) may replace its state pairs
    # (Graph.state_pairs); every other input and output stays as it was
    rewrites_state: ClassVar[bool] = False
    # inputs and outputs (fnmatch patterns) a pass that rewrites the state may also add: the
    # token-reduction pass's slots input and query outputs
    adds_io: ClassVar[tuple[str, ...]] = ()
    # a pass that leaves the graph's function as it was (up to float rounding): cleanups, rotations;
    # the PassManager keeps the graph from before the first pass that is not (PassContext.reference)
    exact: ClassVar[bool] = False

    @abstractmethod
    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        """Rewrite ``graph`` and return the result."""

    def applies(self, graph: Graph) -> bool:
        """Whether the pass has anything to do on ``graph`` (a backend's prepare pass that does not
        is left out, so that lowering a graph is not held to what it would rewrite)."""
        return True

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        if self.needs_calibration and not ctx.calibration:
            raise PassError(f"pass {self.name} needs calibration data: pass calibration=[input tuples, ...] "
                            "to nnforge.compile (shaped like example_inputs)")
        return self.run(graph, ctx)

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}

    @classmethod
    def from_options(cls, options: dict, where: str = "") -> "Pass":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise PassError(f"{where or cls.name}: unknown option(s) {', '.join(unknown)} for pass {cls.name}; "
                            f"valid options: {', '.join(sorted(names)) or 'none'}")
        try:
            return cls(**options)
        except (TypeError, ValueError) as e:
            raise PassError(f"{where or cls.name}: {e}") from None


@dataclass
class LayerSelection:
    """Which layers a weight pass touches: node-name patterns (fnmatch, matched against the node
    name and its weight's name), exclusions, and op kinds."""
    layers: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=lambda: ["linear", "conv"])

    def __post_init__(self):
        for key in ("layers", "exclude", "ops"):
            value = getattr(self, key)
            if isinstance(value, str):
                setattr(self, key, [value])
            elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PassError(f"option {key} must be a list of strings, got {value!r}")
        bad = sorted(set(self.ops) - set(WEIGHT_OPS))
        if bad:
            raise PassError(f"ops {bad} carry no weights; choose from {', '.join(WEIGHT_OPS)}")

    def matches(self, node: Node) -> bool:
        if node.op not in self.ops:
            return False
        w = node.inputs[WEIGHT_SLOT] if len(node.inputs) > WEIGHT_SLOT else None
        names = [node.name] + ([w.name] if w is not None else [])
        if not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.layers):
            return False
        return not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.exclude)

    def select(self, graph: Graph) -> list[Node]:
        """Selected nodes whose weight slot holds a graph weight, in graph order. A ``layers`` or
        ``exclude`` pattern that matches no such layer, or a selection left empty, is an error
        naming the pattern and some of the layers that exist: a typo must not compile silently
        into a bundle that compressed nothing (or everything)."""
        eligible = [n for n in graph.nodes if n.op in self.ops and len(n.inputs) > WEIGHT_SLOT
                    and n.inputs[WEIGHT_SLOT] is not None and n.inputs[WEIGHT_SLOT].is_weight]
        names = [[n.name, n.inputs[WEIGHT_SLOT].name] for n in eligible]
        who = getattr(self, "name", "layer selection")
        for key in ("layers", "exclude"):
            for p in getattr(self, key):
                if p != "*" and not any(fnmatch.fnmatchcase(x, p) for pair in names for x in pair):
                    raise PassError(f"{who}: {key} pattern {p!r} matches no {'/'.join(self.ops)} layer of graph "
                                    f"{graph.name}; {_some_layers(eligible)}")
        out = [n for n in eligible if self.matches(n)]
        if not out:
            raise PassError(f"{who}: selects no layer of graph {graph.name} (layers={self.layers}, "
                            f"exclude={self.exclude}, ops={self.ops}); {_some_layers(eligible)}")
        return out


def _some_layers(nodes: list[Node], limit: int = 6) -> str:
    if not nodes:
        return "the graph has no such layer with a weight"
    shown = ", ".join(f"{n.name} ({n.inputs[WEIGHT_SLOT].name})" for n in nodes[:limit])
    more = f", ... ({len(nodes)} in all)" if len(nodes) > limit else ""
    return f"its layers (node, weight): {shown}{more}"


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    figures: dict
    warnings: list[str] = field(default_factory=list)
    cpu_seconds: float | None = None        # the process's CPU time over the pass, every thread counted

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _same_but_sizes(g: Graph, before: Graph) -> bool:
    """Inputs and outputs keep their names, dtypes and ranks, and every size that was a number
    still is that number (dimension symbols may have become numbers)."""
    pairs = list(zip(g.inputs, before.inputs)) + list(zip(g.outputs, before.outputs))
    if len(g.inputs) != len(before.inputs) or len(g.outputs) != len(before.outputs):
        return False
    return all(a.name == b.name and a.dtype == b.dtype and len(a.shape) == len(b.shape)
               and all(isinstance(y, str) or x == y for x, y in zip(a.shape, b.shape)) for a, b in pairs)


def _same_but_state(g: Graph, before: Graph, added: tuple[str, ...] = ()) -> bool:
    """Inputs and outputs that are not state (nor named by a pattern of ``added``) keep their
    names, types and order, and each state input has the type of its output."""
    def plain(graph: Graph) -> tuple[list, list]:
        ins = {i for i, _ in graph.state_pairs()}
        outs = {o for _, o in graph.state_pairs()}
        new = [v.name for v in [*graph.inputs, *graph.outputs] if any(fnmatch.fnmatchcase(v.name, p) for p in added)
               and v.name not in {x.name for x in [*before.inputs, *before.outputs]}]
        return ([(v.name, str(v.type)) for v in graph.inputs if v.name not in ins and v.name not in new],
                [(v.name, str(v.type)) for v in graph.outputs if v.name not in outs and v.name not in new])
    types = {v.name: str(v.type) for v in [*g.inputs, *g.outputs]}
    return plain(g) == plain(before) and all(types[i] == types[o] for i, o in g.state_pairs())


class PassManager:
    """Runs passes in order on a copy of the graph, verifying after each one that the graph is
    well-formed and that its inputs and outputs kept their names and types."""

    def __init__(self, passes: list[Pass], *, verify_each: bool = True):
        self.passes = list(passes)
        self.verify_each = verify_each
        self.records: list[PassRecord] = []

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        if self.verify_each:
            verify(graph)                 # a malformed input is reported as such, not as a pass failure
        g = graph.copy()
        signature = g.signature()
        ctx.reference = None
        for p in self.passes:
            if not p.exact and ctx.reference is None:
                ctx.reference = g.copy()        # weights are shared, not copied: encodings are immutable
            before = len(g.nodes)
            ctx.current = p.name
            # a recipe may run one pass twice (a decoder's head format): each record keeps its own warnings
            warned = len(ctx.warnings.get(p.name, []))
            t0, c0 = time.perf_counter(), time.process_time()
            g = p(g, ctx)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            if self.verify_each:
                try:
                    verify(g)
                except GraphError as e:
                    raise GraphError(f"after pass {p.name}: {e}") from None
                if p.rewrites_state:
                    if not _same_but_state(g, graph, p.adds_io):
                        raise GraphError(f"pass {p.name} changed inputs or outputs that are not the graph's state: "
                                         f"{signature} -> {g.signature()}")
                    signature = g.signature()
                elif g.signature() != signature and (p.keeps_signature or not _same_but_sizes(g, graph)):
                    raise GraphError(f"pass {p.name} changed the graph's signature: {signature} -> {g.signature()}")
            self.records.append(PassRecord(p.name, seconds, before, len(g.nodes), dict(ctx.figures.get(p.name, {})),
                                           ctx.warnings.get(p.name, [])[warned:], round(cpu, 2)))
        ctx.reference = None
        return g

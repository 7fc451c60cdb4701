"""The dataflow form of a plan (target option ``dataflow = true``): the top function becomes one
``#pragma HLS DATAFLOW`` region whose layers run as concurrent processes joined by on-chip
ping-pong channels, so activations never leave the chip between layers while weights stream in.

Dataflow needs every channel to have exactly one writer and one reader: reshapes become copies, and
a value read by k consumers (or read and also a graph output) is split by k - 1 ``fanout2``
processes. Every value then owns its buffer (no sharing across lifetimes, unlike the sequential form).
"""
from __future__ import annotations

from . import layers as L


def to_dataflow(plan) -> None:
    """Rewrite ``plan.layers`` in place into single-writer single-reader form; set ``plan.pool``."""
    layers = []
    for layer in plan.layers:
        if isinstance(layer, L.Alias):                 # a reshape: its own channel
            n = plan.sizes[plan.ids[layer.inputs[0]]]
            _new(plan, layer.output, f"dfc{len(layers)}", n)
            layer = L.Copy(layer.name, layer.node, layer.inputs, layer.output, n=n)
        layers.append(layer)
    readers: dict[str, list] = {}
    for layer in layers:
        for slot, v in enumerate(layer.inputs):
            if v not in [w for w in layer.inputs[:slot]]:
                readers.setdefault(v, []).append(layer)
    outputs = set(plan.outputs)
    producer = {layer.output: i for i, layer in enumerate(layers)}
    inserts: dict[int, list] = {}                      # position -> fan-out layers to insert before it
    for n_fan, (v, rs) in enumerate(sorted(readers.items())):
        k = len(rs) + (1 if v in outputs else 0)
        if k < 2:
            continue
        src = v
        if v in outputs:                               # the producer writes a channel; a fan-out feeds the port
            src = f"{v}@df"
            layers[producer[v]].output = src
            _new(plan, src, f"fan{n_fan}_src", plan.sizes[plan.ids[v]])
        size = plan.sizes[plan.ids[v]]
        targets = ([v] if v in outputs else []) + [f"{v}@fan{i}" for i in range(len(rs))]
        for i, r in enumerate(rs):
            r.inputs = [targets[-len(rs) + i] if x == v else x for x in r.inputs]
        chain, cur = [], src
        for i, t in enumerate(targets[:-1]):
            nxt = targets[-1] if i == len(targets) - 2 else f"{v}@fant{i}"
            for j, name in enumerate((t, nxt)):
                if name != v and name not in plan.ids:
                    _new(plan, name, f"fan{n_fan}_{i}_{j}", size)
            chain.append(L.Fanout2(f"fan{n_fan}_{i}", f"fan-out of {v}", [cur], t, n=size, output2=nxt))
            cur = nxt
        at = producer.get(v, -1) + 1
        inserts.setdefault(at, []).extend(chain)
    plan.layers = []
    for i in range(len(layers) + 1):
        plan.layers.extend(inserts.get(i, []))
        if i < len(layers):
            plan.layers.append(layers[i])
    ports = {plan.ids[v] for v in plan.inputs + plan.outputs}
    plan.pool = {plan.ids[out]: plan.sizes[plan.ids[out]] for layer in plan.layers
                 for out in (layer.output, getattr(layer, "output2", "")) if out and plan.ids[out] not in ports}


def _new(plan, value: str, ident: str, size: int) -> None:
    """A channel the rewrite adds (identifiers without the model's v_/in_/out_ prefixes cannot collide)."""
    plan.ids[value] = ident
    plan.sizes[ident] = size

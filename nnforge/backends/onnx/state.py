"""KV caches that ONNX Runtime writes in place. GroupQueryAttention (attention.py) writes the new
rows into its past cache only when its present output shares the past input's buffer, and
otherwise makes a present whose slots past the longest row are zeros; so every call binds each
such present output to its past input's memory (I/O binding). ``run_numpy`` does that on a
private copy of the caller's caches (they are never written); :class:`Resident` keeps the caches
between decode steps and hands back only the logits.

The bundle entry's ``kv_cache`` (also in the model's metadata) says which outputs share which
input's buffer and which input holds the positions.
"""
from __future__ import annotations

import json

import numpy as np

from ..base import BackendError, ResidentState

METADATA_KEY = "nnforge.kv_cache"


class KvCache:
    """How to run a session whose caches are written in place: each shared output bound to its
    input's buffer, positions checked first, and several tokens per row of a batch with past
    context run row by row (GroupQueryAttention takes those for one row at a time)."""

    def __init__(self, runner, spec: dict, where: str):
        try:
            self.positions = spec["positions"]
            self.shared = dict(spec["shared_buffers"])
        except (KeyError, TypeError, ValueError) as e:
            raise BackendError(f"{where}: kv_cache record is malformed ({e})") from None
        specs = {i.name: i for i in runner.inputs}
        bad = [n for n in [self.positions, *self.shared.values()] if n not in specs] + \
            [n for n in self.shared if n not in runner.output_names]
        if bad:
            raise BackendError(f"{where}: kv_cache names {bad}, which the model has no input or output for")
        lengths = {specs[i].dims[2] for i in self.shared.values()}
        if not all(isinstance(n, int) for n in lengths):
            raise BackendError(f"{where}: caches written in place need a fixed length, got {sorted(map(str, lengths))}")
        self.max_len = min(lengths)
        self.batch_dim = specs[self.positions].dims[0]
        self.batched = {name for name, s in specs.items() if s.dims and s.dims[0] == self.batch_dim}
        self.runner = runner

    def check(self, positions: np.ndarray) -> None:
        """What GroupQueryAttention assumes of the positions, refused with a BackendError."""
        if positions.ndim != 2 or positions.size == 0:
            return
        if positions.min() < 0 or positions.max() >= self.max_len:
            raise BackendError(f"input {self.positions}: positions {int(positions.min())}..{int(positions.max())} "
                               f"reach outside the cache's {self.max_len} slots 0..{self.max_len - 1}: the sequence "
                               "is longer than the max_len the bundle was built for")
        steps = positions - positions[:, -1:]
        if not np.array_equal(steps, np.broadcast_to(np.arange(1 - positions.shape[1], 1), positions.shape)):
            raise BackendError(f"input {self.positions}: each row's positions must be consecutive (the bundle's "
                               "GroupQueryAttention is told only the last one); feed non-consecutive tokens in "
                               "separate calls")

    def run(self, feeds: dict, state: dict) -> dict:
        """Outputs by name for inputs ``feeds`` and caches ``state`` (writable C-contiguous arrays
        by input name, updated in place: the shared outputs are those arrays)."""
        positions = feeds[self.positions]
        self.check(positions)
        batch, seq = positions.shape
        if batch > 1 and seq > 1 and seq != int(positions[:, -1].max()) + 1:
            rows = [self._run({n: a[i:i + 1] if n in self.batched else a for n, a in feeds.items()},
                              {n: a[i:i + 1] for n, a in state.items()}) for i in range(batch)]
            return {n: state[self.shared[n]] if self.shared.get(n) in state else np.concatenate([r[n] for r in rows])
                    for n in rows[0]}
        return self._run(feeds, state)

    def _run(self, feeds: dict, state: dict) -> dict:
        session = self.runner.session
        binding = session.io_binding()
        for name, a in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(a))
        for name, a in state.items():
            binding.bind_input(name, "cpu", 0, a.dtype.type, list(a.shape), a.ctypes.data)
        names = self.runner.output_names
        for name in names:
            past = self.shared.get(name)
            if past in state:
                a = state[past]
                binding.bind_output(name, "cpu", 0, a.dtype.type, list(a.shape), a.ctypes.data)
            else:
                binding.bind_output(name, "cpu")
        try:
            session.run_with_iobinding(binding)
        except Exception as e:       # ORT raises its own pybind exception types
            raise BackendError(f"ONNX Runtime failed on inputs "
                               f"{', '.join(f'{n} {list(a.shape)}' for n, a in {**feeds, **state}.items())}: "
                               f"{str(e).splitlines()[0]}") from None
        got = binding.get_outputs()
        return {name: state[self.shared[name]] if self.shared.get(name) in state else got[i].numpy()
                for i, name in enumerate(names)}


def spec_of(session) -> dict | None:
    """The kv_cache record a model carries in its metadata (None when it writes no cache in place)."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    return json.loads(text) if text else None


class Resident(ResidentState):
    """A decoder's caches kept as arrays that ONNX Runtime writes in place between steps: a step
    binds each cache to the same memory as input and output, and only the logits come back."""

    def __init__(self, runner, kv: KvCache, state_pairs, tokens, logits):
        names = runner.input_names
        missing = [n for n in [*tokens, *(i for i, _ in state_pairs)] if n not in names] + \
            [n for n in [logits, *(o for _, o in state_pairs)] if n not in runner.output_names]
        if missing:
            raise BackendError(f"the model has no input or output {missing} of the decoder's state")
        fed = set(tokens) | {i for i, _ in state_pairs}
        if set(names) - fed:
            raise BackendError(f"the model has inputs {sorted(set(names) - fed)} a decoder step does not feed")
        self.kv, self.pairs, self.tokens, self.logits = kv, list(state_pairs), tokens, logits
        self.in_place = {i for i, o in self.pairs if kv.shared.get(o) == i}
        # each state input in the model's own dtype: an encoded cache's codes and scales beside
        # the float caches written in place (docs/kv_cache.md)
        self.dtypes = {s.name: s.dtype for s in runner.inputs}
        self.arrays: dict[str, np.ndarray] = {}

    def reset(self, shapes):
        self.arrays = {i: np.zeros(shapes[i], self.dtypes[i]) for i, _ in self.pairs}

    def run(self, token_ids, positions):
        feeds = {self.tokens[0]: np.asarray(token_ids, np.int64), self.tokens[1]: np.asarray(positions, np.int64)}
        feeds.update({i: a for i, a in self.arrays.items() if i not in self.in_place})
        outs = self.kv.run(feeds, {i: self.arrays[i] for i in self.in_place})
        for i, o in self.pairs:
            if i not in self.in_place:
                self.arrays[i] = outs[o]
        return outs[self.logits]

    def read(self, name):
        return self.arrays[name].copy()

    def write(self, values):
        self.arrays = {i: np.array(values[i], self.dtypes[i], order="C") for i, _ in self.pairs}


__all__ = ["KvCache", "METADATA_KEY", "Resident", "spec_of"]

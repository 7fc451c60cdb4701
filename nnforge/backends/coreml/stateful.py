"""The runner side of a stateful Core ML decoder package (decoder.py writes it): one engine state
per sequence, whole prefill chunks through the package's ``prefill`` function and the rest through
``decode``. The engine is Core ML itself on macOS (:class:`CoremlEngine`) or
``mil_numpy.NumpyEngine``, the verification path that evaluates the saved MIL program in numpy."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base import BackendError, InputSpec, ResidentState, Runner

PREFILL, DECODE = "prefill", "decode"
INPUT_IDS, POSITIONS, LOGITS = "input_ids", "positions", "logits"


class StatefulRunner(Runner):
    """A stateful decoder package run by ``engine`` (Core ML, or the numpy MIL evaluator): called
    with the graph's inputs (token ids, positions, every cache) it writes each sequence's caches
    into a fresh state, runs its tokens through ``prefill`` in whole chunks and the rest through
    ``decode``, and returns the logits and the caches as the graph's outputs. The state holds one
    sequence (a fixed shape at batch 1), so the sequences of a batch run one after another, each in
    its own state. :meth:`resident` keeps the states in the engine between decode steps."""

    def __init__(self, engine, entry: dict):
        try:
            self.engine, self.entry = engine, entry
            self.state = list(entry["state"])
            self.chunk = int(entry["functions"][PREFILL]["tokens"])
            self.ids, self.positions = (next(i for i in entry["inputs"] if i["name"] == n) for n in (INPUT_IDS,
                                                                                                     POSITIONS))
            self.logits = entry["outputs"][0]["mil_name"]
            self.max_len = int(self.state[0]["shape"][2])
        except (KeyError, TypeError, ValueError, StopIteration, IndexError) as e:
            raise BackendError(f"coreml backend entry of a stateful decoder is malformed ({e!r}): it needs "
                               "functions.prefill.tokens, inputs input_ids and positions, outputs and state") from None
        self.inputs = [InputSpec(i["name"], np.dtype(i["dtype"]), ("batch", *i["dims"][1:])) for i in entry["inputs"]] \
            + [InputSpec(s["input"], np.dtype("float32"), ("batch", *s["shape"][1:])) for s in self.state]
        self.output_names = [LOGITS] + [s["output"] for s in self.state]

    def run_numpy(self, inputs: list) -> list:
        named = dict(zip(self.input_names, inputs))
        logits, caches = [], []
        for row in range(named[INPUT_IDS].shape[0]):
            state = self.engine.new_state()
            for s in self.state:
                self.engine.write(state, s["mil_name"], named[s["input"]][row:row + 1])
            logits.append(self.tokens(state, named[INPUT_IDS][row:row + 1], named[POSITIONS][row:row + 1]))
            caches.append([np.asarray(self.engine.read(state, s["mil_name"]), np.float32) for s in self.state])
        return [np.concatenate(logits)] + [np.concatenate(parts) for parts in zip(*caches)]

    def tokens(self, state, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The logits [1, n, vocab] of one sequence's ``ids`` at ``positions`` ([1, n]), its state updated."""
        if positions.size and (positions.min() < 0 or positions.max() >= self.max_len):
            raise BackendError(f"input {POSITIONS}: positions {int(positions.min())}..{int(positions.max())} reach "
                               f"outside the cache's {self.max_len} slots: the sequence is longer than the max_len "
                               "the bundle was built for")
        out, start, n = [], 0, ids.shape[1]
        while start < n:
            fn, size = (PREFILL, self.chunk) if n - start >= self.chunk else (DECODE, 1)
            feeds = {self.ids["mil_name"]: ids[:, start:start + size].astype(np.int32),
                     self.positions["mil_name"]: positions[:, start:start + size].astype(np.int32)}
            out.append(np.asarray(self.engine.call(state, fn, feeds)[self.logits], np.float32))
            start += size
        return np.concatenate(out, axis=1)

    def resident(self, state_pairs, tokens, logits):
        return _Resident(self)


class _Resident(ResidentState):
    """One engine state per sequence of the batch, kept between calls."""

    def __init__(self, runner: StatefulRunner):
        self.runner, self.states = runner, []
        self.names = {s["input"]: s["mil_name"] for s in runner.state}

    def reset(self, shapes):
        batch = next(iter(shapes.values()))[0]
        self.states = [self.runner.engine.new_state() for _ in range(int(batch))]

    def run(self, token_ids, positions):
        ids, pos = np.asarray(token_ids), np.asarray(positions)
        return np.concatenate([self.runner.tokens(state, ids[b:b + 1], pos[b:b + 1])
                               for b, state in enumerate(self.states)])

    def read(self, name):
        return np.concatenate([np.asarray(self.runner.engine.read(state, self.names[name])) for state in self.states])

    def write(self, values):
        batch = next(iter(values.values())).shape[0]
        self.states = [self.runner.engine.new_state() for _ in range(int(batch))]
        for b, state in enumerate(self.states):
            for name, mil in self.names.items():
                self.runner.engine.write(state, mil, np.asarray(values[name])[b:b + 1])


class CoremlEngine:
    """Core ML predictions of the package's functions (macOS): one model per function, each with
    its own state object, the cache copied across when the calls switch function."""

    def __init__(self, path: Path, entry: dict, units):
        import coremltools as ct
        try:
            self.models = {fn: ct.models.MLModel(str(path), compute_units=units, function_name=fn)
                           for fn in entry["functions"]}
        except Exception as e:
            raise BackendError(f"{path}: Core ML cannot load it: {str(e).splitlines()[0]}") from None
        self.names = [s["mil_name"] for s in entry["state"]]

    def new_state(self):
        return {"states": {fn: m.make_state() for fn, m in self.models.items()}, "current": DECODE}

    def _switch(self, state, fn):
        if state["current"] != fn:
            old, new = state["states"][state["current"]], state["states"][fn]
            for name in self.names:
                new.write_state(name, old.read_state(name))
            state["current"] = fn

    def write(self, state, name, value):
        state["states"][state["current"]].write_state(name, np.asarray(value, np.float16))

    def read(self, state, name):
        return state["states"][state["current"]].read_state(name)

    def call(self, state, fn, feeds):
        self._switch(state, fn)
        try:
            return self.models[fn].predict(feeds, state=state["states"][fn])
        except Exception as e:
            raise BackendError(f"Core ML failed in function {fn} on inputs "
                               f"{', '.join(f'{k} {list(v.shape)}' for k, v in feeds.items())}: "
                               f"{str(e).splitlines()[0]}") from None


def load_stateful(path: Path, entry: dict, device: str | None) -> StatefulRunner:
    """The Core ML runner of a stateful package (macOS only)."""
    import coremltools as ct
    units = {None: ct.ComputeUnit.ALL, "all": ct.ComputeUnit.ALL, "cpu": ct.ComputeUnit.CPU_ONLY,
             "gpu": ct.ComputeUnit.CPU_AND_GPU, "ane": ct.ComputeUnit.CPU_AND_NE}
    if device not in units:
        raise BackendError(f"the coreml backend runs on devices {', '.join(k for k in units if k)}; got {device!r}")
    return StatefulRunner(CoremlEngine(path, entry, units[device]), entry)


__all__ = ["PREFILL", "DECODE", "StatefulRunner", "CoremlEngine", "load_stateful"]

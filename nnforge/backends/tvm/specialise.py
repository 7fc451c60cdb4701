"""Copies of ``main`` with some dimension symbols fixed, for the shapes a bundle runs at most.

A decoder runs its graph once per generated token at batch 1 and one token: with ``batch`` and
``seq`` symbolic, every such call spends as much time in the VM's shape bookkeeping (building
shape tuples, matching and checking them, allocating each intermediate) as in some of its kernels.
A copy of ``main`` with those symbols bound to constants has static shapes: its memory is planned
once, its reshapes take constant shapes, and Relax's own loops are compiled for those sizes. It
shares ``main``'s parameters (the same ``prepare`` output) and kernels, so the library grows by
its bytecode and a few small loops. :class:`Specialised` picks, per call, the first copy whose
symbols the inputs' shapes match, else ``main``.

    >>> entries = add_specialised(mod, [{"batch": 1, "seq": 1}])
    >>> Specialised(entries, inputs).function_for([[1, 1], [1, 1], ...])   # 'main_step0'
"""
from __future__ import annotations

from .lower import ENTRY_FUNCTION


def add_specialised(mod, bindings: list[dict[str, int]]) -> list[dict]:
    """Add to ``mod`` one copy of ``main`` per binding of its dimension symbols (those it does not
    have are left out; a binding of none adds nothing); the manifest's record of each:
    ``{"function", "symbols"}``."""
    from tvm import relax, tirx
    from tvm.relax.utils import copy_with_new_vars
    main = mod[ENTRY_FUNCTION]
    known = {v.name for v in relax.analysis.defined_symbolic_vars(main)}
    entries = []
    for binding in bindings:
        symbols = {name: int(value) for name, value in binding.items() if name in known}
        if not symbols or any(e["symbols"] == symbols for e in entries):
            continue
        name = f"{ENTRY_FUNCTION}_step{len(entries)}"
        # new Relax variables: a variable may be a parameter of one function only
        func = copy_with_new_vars(main).bind_symbolic_vars(
            {s: tirx.IntImm("int64", v) for s, v in symbols.items()})
        mod[name] = func.with_attr("global_symbol", name)
        entries.append({"function": name, "symbols": symbols})
    return entries


class Specialised:
    """Which function of the library runs a call, from its inputs' shapes."""

    def __init__(self, entries: list[dict], input_dims: list[list]):
        # per function: the (input, axis, size) its symbols fix
        self.checks = []
        for e in entries:
            fixed = [(i, a, e["symbols"][d]) for i, dims in enumerate(input_dims)
                     for a, d in enumerate(dims) if isinstance(d, str) and d in e["symbols"]]
            self.checks.append((e["function"], fixed))
        self.enabled = bool(self.checks)

    def function_for(self, shapes: list[list[int]]) -> str:
        for name, fixed in self.checks:
            if all(shapes[i][a] == size for i, a, size in fixed):
                return name
        return ENTRY_FUNCTION


__all__ = ["add_specialised", "Specialised"]

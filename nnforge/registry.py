"""One registry type for every name-to-thing table: ops, weight encodings, passes, frontend
converters, each backend's ``LOWERINGS``, fuzz proposers.

A registry is a mapping filled by a decorator that refuses a second entry under a name unless
told to replace it, and that can say at once every name a graph needs and it lacks:

    >>> LOWERINGS = Registry("onnx lowering")
    >>> @LOWERINGS.register("add", "sub")
    ... def _binary(b, node, fallbacks): ...
    >>> LOWERINGS.missing(n.op for n in graph.nodes)
    ['gelu', 'tanh']
    >>> LOWERINGS["gelu"]                      # UnknownNameError: names 'gelu' and the known names

Item assignment and deletion are the explicit overrides (a user's own entry, a test's
``monkeypatch.setitem``); ``register`` is how the code base fills its tables.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, MutableMapping
from typing import Any, Callable, Generic, TypeVar

from .errors import RegistryError, UnknownNameError

T = TypeVar("T")


class Registry(MutableMapping, Generic[T]):
    """Entries by name. ``kind`` says what an entry is ("op", "pass", "tvm lowering"), for messages;
    ``key`` is the attribute that names an object registered without explicit names."""

    def __init__(self, kind: str, *, key: str = "name"):
        self.kind = kind
        self.key = key
        self._entries: dict[Hashable, T] = {}

    def register(self, *names: Hashable, replace: bool = False) -> Callable[[T], T]:
        """Decorator: enter the object under each of ``names`` (or under its ``key`` attribute
        when none is given). A name already taken raises :class:`RegistryError` naming both
        entries, unless ``replace`` is set.

            >>> @PASSES.register()                 # under QuantizeRTN.name
            ... class QuantizeRTN(Pass): ...
        """
        def deco(obj: T) -> T:
            keys = names or (self._own_name(obj),)
            if not replace:
                for k in keys:
                    if k in self._entries:
                        raise RegistryError(f"{self.kind} {k} registered twice: by {_label(self._entries[k])} and by "
                                            f"{_label(obj)}; register it with replace=True to override")
            for k in keys:
                self._entries[k] = obj
            return obj
        return deco

    def lookup(self, name: Hashable, error: type[Exception] = UnknownNameError) -> T:
        """The entry under ``name``; an unknown name raises ``error`` naming it and every known name."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(map(str, self._entries))) or "none"
            raise error(f"unknown {self.kind} {name!r}; known: {known}") from None

    def missing(self, names: Iterable[Hashable]) -> list:
        """The names among ``names`` that have no entry, each once, sorted: what a backend or
        frontend reports, all together, before it starts."""
        return sorted({n for n in names if n not in self._entries}, key=str)

    def _own_name(self, obj: Any) -> Hashable:
        name = getattr(obj, self.key, None)
        if name is None:
            raise RegistryError(f"{_label(obj)} has no {self.key!r} attribute to register it by: give the "
                                f"{self.kind} name to register()")
        return name

    def __getitem__(self, name: Hashable) -> T:
        return self.lookup(name)

    def get(self, name: Hashable, default=None):
        return self._entries.get(name, default)

    def __setitem__(self, name: Hashable, obj: T) -> None:
        self._entries[name] = obj

    def __delitem__(self, name: Hashable) -> None:
        try:
            del self._entries[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<Registry of {len(self._entries)} {self.kind} entries>"


def _label(obj: Any) -> str:
    """module.qualname of a function or class, the start of its repr for anything else."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and name:
        return f"{module}.{name}"
    text = repr(obj)
    return text if len(text) <= 100 else text[:97] + "..."


__all__ = ["Registry"]

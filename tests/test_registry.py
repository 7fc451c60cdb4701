"""The one registry type: decorator by explicit names or the object's own name, the duplicate check
naming both entries, explicit replacement, missing(), lookup errors naming the known names."""
from __future__ import annotations

import pytest

from nnforge import NnforgeError
from nnforge.errors import RegistryError, UnknownNameError
from nnforge.registry import Registry


def _relu(*args):
    return "relu"


def test_register_under_each_name_and_read_back():
    reg = Registry("test lowering")

    @reg.register("add", "sub")
    def binary(*args):
        return "binary"

    assert binary.__name__ == "binary"                  # the decorator hands the function back
    assert reg["add"] is binary and reg["sub"] is binary
    assert "add" in reg and "mul" not in reg
    assert sorted(reg) == ["add", "sub"] and len(reg) == 2
    assert dict(reg) == {"add": binary, "sub": binary}
    assert {**reg, "mul": _relu}["mul"] is _relu        # a caller's own entries merge as with a dict
    assert reg.get("mul") is None and reg.get("mul", _relu) is _relu


def test_register_by_the_objects_own_name():
    passes, encodings = Registry("pass"), Registry("weight encoding", key="kind")

    @passes.register()
    class Dce:
        name = "dce"

    @encodings.register()
    class Dense:
        kind = "dense"

    assert passes["dce"] is Dce and encodings["dense"] is Dense
    with pytest.raises(RegistryError, match=r"\.Nameless has no 'name' attribute to register it by"):
        passes.register()(type("Nameless", (), {}))


def test_a_second_entry_under_a_name_names_both_and_changes_nothing():
    reg = Registry("test lowering")
    reg.register("relu")(_relu)

    def other(*args):
        return "other"

    with pytest.raises(RegistryError, match=r"test lowering relu registered twice: by tests\.test_registry\._relu "
                                            r"and by tests\.test_registry\..*other; .*replace=True"):
        reg.register("gelu", "relu")(other)
    assert reg["relu"] is _relu and "gelu" not in reg     # all names or none
    with pytest.raises(ValueError):                       # a RegistryError is a ValueError, as before
        reg.register("relu")(_relu)


def test_explicit_replacement_and_removal():
    reg = Registry("test lowering")
    reg.register("relu")(_relu)

    def mine(*args):
        return "mine"

    reg.register("relu", replace=True)(mine)
    assert reg["relu"] is mine
    reg["relu"] = _relu                                   # item assignment is an explicit override
    assert reg["relu"] is _relu
    del reg["relu"]
    assert "relu" not in reg
    with pytest.raises(UnknownNameError, match="unknown test lowering 'relu'"):
        del reg["relu"]


def test_monkeypatch_setitem_and_delitem_restore(monkeypatch):
    reg = Registry("test lowering")
    reg.register("relu")(_relu)
    with monkeypatch.context() as m:
        m.setitem(reg, "relu", print)
        m.setitem(reg, "gelu", print)
        assert reg["relu"] is print and reg["gelu"] is print
    assert reg["relu"] is _relu and "gelu" not in reg
    with monkeypatch.context() as m:
        m.delitem(reg, "relu")
        assert "relu" not in reg
    assert reg["relu"] is _relu


def test_missing_lists_every_absent_name_once_sorted():
    reg = Registry("test lowering")
    reg.register("add", "relu")(_relu)
    assert reg.missing(["tanh", "add", "gelu", "tanh", "relu"]) == ["gelu", "tanh"]
    assert reg.missing(iter(["add"])) == []
    assert reg.missing([]) == []


def test_unknown_name_names_it_and_every_known_name():
    reg = Registry("test lowering")
    reg.register("relu", "add")(_relu)
    with pytest.raises(UnknownNameError) as ei:
        reg["gelu"]
    assert str(ei.value) == "unknown test lowering 'gelu'; known: add, relu"   # not quoted as KeyError quotes
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, NnforgeError)

    class StageError(ValueError):
        pass

    with pytest.raises(StageError, match="unknown test lowering 'gelu'; known: add, relu"):
        reg.lookup("gelu", StageError)
    with pytest.raises(UnknownNameError, match="unknown test lowering 'x'; known: none"):
        Registry("test lowering")["x"]


def test_non_string_keys():
    """Torch converters are keyed by op overload objects, hls costs by layer type."""
    reg = Registry("layer cost")
    reg.register(int, float)(_relu)
    assert reg[int] is _relu and reg.missing([str, int, bool]) == [bool, str]
    assert "known: <class 'float'>, <class 'int'>" in str(pytest.raises(UnknownNameError, reg.__getitem__, str).value)

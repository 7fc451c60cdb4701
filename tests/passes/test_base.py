"""Pass infrastructure: the Pass interface (calibration check, options), the registry, the
PassManager (runs on a copy, verifies and checks the signature after every pass, records), and
LayerSelection (layer patterns, exclusions, op kinds)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from nnforge.ir import Dense, Graph, GraphError, run_graph, tensor
from nnforge.passes import (PASSES, DeadCodeElimination, LayerSelection, Pass, PassContext, PassError, PassManager,
                            QuantizeRTN, register_pass)
from tests.passes.graphs import inputs, mlp_graph


@dataclass
class Breaker(Pass):
    """A buggy pass: makes fc2 read a value that is not in the graph."""
    name = "breaker"

    def run(self, graph, ctx):
        from nnforge.ir import Value
        graph.node("fc2").inputs[0] = Value("ghost", graph.value("act").type)
        return graph


@dataclass
class Renamer(Pass):
    """A buggy pass: renames the graph output."""
    name = "renamer"

    def run(self, graph, ctx):
        graph.rename(graph.outputs[0], "renamed")
        return graph


@dataclass
class Recorder(Pass):
    name = "recorder"
    value: int = 3
    needs_calibration = False

    def run(self, graph, ctx):
        ctx.record("value", self.value)
        ctx.record("calibration_batches", len(ctx.calibration or []))
        return graph


@dataclass
class NeedsData(Pass):
    name = "needs_data"
    needs_calibration = True

    def run(self, graph, ctx):
        ctx.record("batches", len(ctx.calibration))
        return graph


# --- PassManager --------------------------------------------------------------------------------
def test_pass_manager_runs_on_a_copy_and_records():
    g = mlp_graph()
    before = str(g)
    pm = PassManager([Recorder(), QuantizeRTN(bits=8), DeadCodeElimination()])
    ctx = PassContext(calibration=[(torch.zeros(1, 16),)] * 2)
    out = pm.run(g, ctx)
    assert out is not g and str(g) == before                         # the input graph is untouched
    assert all(isinstance(v.encoding, Dense) for v in g.weights.values())
    assert [r.name for r in pm.records] == ["recorder", "quantize_rtn", "dce"]
    assert pm.records[0].figures == {"value": 3, "calibration_batches": 2}
    assert pm.records[1].figures["layers"] == 2
    assert pm.records[2].figures == {"nodes_removed": 0}
    assert all(r.nodes_before == r.nodes_after == 3 and r.seconds >= 0 for r in pm.records)
    assert pm.records[0].to_dict() == {"name": "recorder", "seconds": pm.records[0].seconds, "nodes_before": 3,
                                       "nodes_after": 3, "figures": {"value": 3, "calibration_batches": 2},
                                       "warnings": [], "cpu_seconds": pm.records[0].cpu_seconds}
    assert all(r.cpu_seconds >= 0 for r in pm.records)
    assert ctx.figures["quantize_rtn"]["layers"] == 2


@dataclass
class Warner(Pass):
    name = "warner"
    says: str = ""

    def run(self, graph, ctx):
        ctx.warn(f"warner: {self.says}")
        return graph


def test_pass_records_keep_their_own_warnings_when_a_pass_runs_twice():
    pm = PassManager([Warner(says="first"), Recorder(), Warner(says="second")])
    pm.run(mlp_graph(), PassContext())
    assert [r.warnings for r in pm.records] == [["warner: first"], [], ["warner: second"]]
    assert pm.records[2].to_dict()["warnings"] == ["warner: second"]


def test_pass_manager_verifies_after_each_pass():
    pm = PassManager([Recorder(), Breaker(), Recorder()])
    with pytest.raises(GraphError, match="after pass breaker: graph mlp is malformed [\\s\\S]*node fc2 reads "
                                         "dangling value ghost"):
        pm.run(mlp_graph())
    assert [r.name for r in pm.records] == ["recorder"]              # stopped at the broken pass


def test_pass_manager_checks_signature():
    with pytest.raises(GraphError, match="pass renamer changed the graph's signature: .*'fc2'.* -> .*'renamed'"):
        PassManager([Renamer()]).run(mlp_graph())


def test_pass_manager_verification_can_be_turned_off():
    out = PassManager([Renamer()], verify_each=False).run(mlp_graph())
    assert out.outputs[0].name == "renamed"


def test_pass_manager_empty_list_copies():
    g = mlp_graph()
    out = PassManager([]).run(g)
    assert out is not g and str(out) == str(g)
    x = inputs()
    assert torch.equal(run_graph(out, [x])[0], run_graph(g, [x])[0])


# --- Pass ----------------------------------------------------------------------------------------
def test_calibration_required():
    with pytest.raises(PassError, match="pass needs_data needs calibration data: pass calibration="):
        NeedsData()(mlp_graph())
    with pytest.raises(PassError, match="needs calibration"):
        PassManager([NeedsData()]).run(mlp_graph(), PassContext(calibration=[]))
    ctx = PassContext(calibration=[(torch.zeros(1, 16),)])
    NeedsData()(mlp_graph(), ctx)
    assert ctx.figures[""]["batches"] == 1


def test_options_and_from_options():
    p = Recorder.from_options({"value": 7})
    assert p.value == 7 and p.options() == {"value": 7}
    with pytest.raises(PassError, match="recipe x: unknown option\\(s\\) colour, size for pass recorder; "
                                        "valid options: value"):
        Recorder.from_options({"size": 1, "colour": 2}, where="recipe x")
    with pytest.raises(PassError, match="quantize_rtn: bits must be an integer in 2..8, got 12"):
        QuantizeRTN.from_options({"bits": 12})


def test_registry():
    for name in ("dce", "fold_constants", "simplify", "fuse_linear", "quantize_rtn"):
        assert PASSES[name].name == name
    with pytest.raises(ValueError, match="pass dce registered twice"):
        register_pass(DeadCodeElimination)


def test_context_record_goes_under_current_pass():
    ctx = PassContext()
    ctx.current = "a"
    ctx.record("k", 1)
    ctx.current = "b"
    ctx.record("k", 2)
    assert ctx.figures == {"a": {"k": 1}, "b": {"k": 2}}


# --- LayerSelection ---------------------------------------------------------------------------------
def selection_graph() -> Graph:
    g = Graph("sel")
    x = g.add_input("x", tensor("f32", 2, 8))
    ids = g.add_input("ids", tensor("i64", 2))
    img = g.add_input("img", tensor("f32", 1, 2, 5, 5))
    h = x
    for name in ("encoder.layer.0.attention.q", "encoder.layer.0.attention.output.dense", "encoder.layer.1.ffn"):
        h = g.op("linear", h, g.add_weight(f"{name}.weight", Dense(torch.randn(8, 8))), None, name=name)
    e = g.op("embedding", ids, g.add_weight("tok.weight", Dense(torch.randn(10, 8))), name="tok")
    c = g.op("conv", img, g.add_weight("stem.weight", Dense(torch.randn(3, 2, 3, 3))), None, stride=[1, 1],
             padding=[0, 0, 0, 0], dilation=[1, 1], name="stem")
    m = g.op("matmul", h, g.add_weight("proj", Dense(torch.randn(8, 4))), name="mm")
    act = g.op("matmul", h, g.op("permute", h, perm=[1, 0], name="t"), name="scores")   # no weight operand
    g.set_outputs([e, c, m, act])
    return g


def names(nodes):
    return [n.name for n in nodes]


def test_layer_selection_defaults_take_linear_and_conv():
    assert names(LayerSelection().select(selection_graph())) == [
        "encoder.layer.0.attention.q", "encoder.layer.0.attention.output.dense", "encoder.layer.1.ffn", "stem"]


def test_layer_selection_patterns_and_exclusions():
    g = selection_graph()
    assert names(LayerSelection(layers=["encoder.layer.0.*"]).select(g)) == [
        "encoder.layer.0.attention.q", "encoder.layer.0.attention.output.dense"]
    assert names(LayerSelection(exclude=["*.attention.output.dense", "stem"]).select(g)) == [
        "encoder.layer.0.attention.q", "encoder.layer.1.ffn"]
    # patterns also match the weight's name
    assert names(LayerSelection(layers=["stem.weight"]).select(g)) == ["stem"]
    assert names(LayerSelection(layers="*.ffn").select(g)) == ["encoder.layer.1.ffn"]       # a string is one pattern


def test_layer_pattern_matching_no_layer_is_an_error_naming_it():
    """A typo in a recipe's layer pattern used to compile with nothing applied."""
    g = selection_graph()
    with pytest.raises(PassError, match=r"layers pattern 'nothing\*' matches no linear/conv layer of graph sel; "
                                        r"its layers \(node, weight\): encoder.layer.0.attention.q"):
        LayerSelection(layers=["nothing*"]).select(g)
    with pytest.raises(PassError, match=r"exclude pattern '\*.atention.\*' matches no"):
        LayerSelection(exclude=["*.atention.*"]).select(g)
    with pytest.raises(PassError, match=r"selects no layer of graph sel"):
        LayerSelection(layers=["stem"], exclude=["stem"]).select(g)


def test_layer_selection_ops():
    g = selection_graph()
    assert names(LayerSelection(ops=["embedding"]).select(g)) == ["tok"]
    assert names(LayerSelection(ops="conv").select(g)) == ["stem"]
    assert names(LayerSelection(ops=["linear"], layers=["*.q"]).select(g)) == ["encoder.layer.0.attention.q"]


def test_layer_selection_matmul():
    """BUG: "matmul" is one of WEIGHT_OPS and LayerSelection accepts ops=["matmul"], but
    LayerSelection.matches calls ``node.input("weight")`` and matmul's slots are named a and b, so
    selecting matmuls crashes with ``KeyError: "op matmul has no input slot 'weight'"`` (the same
    call is in WeightQuantConfig.targets). Only the matmul whose second operand is a weight should
    be selected."""
    g = selection_graph()
    assert names(LayerSelection(ops=["matmul"]).select(g)) == ["mm"]
    assert names(LayerSelection(ops=["matmul"], layers=["proj"]).select(g)) == ["mm"]


def test_layer_selection_validation():
    with pytest.raises(PassError, match="ops \\['relu'\\] carry no weights; choose from linear, matmul, conv, "
                                        "embedding"):
        LayerSelection(ops=["relu", "linear"])
    with pytest.raises(PassError, match="option layers must be a list of strings, got 3"):
        LayerSelection(layers=3)
    with pytest.raises(PassError, match="option exclude must be a list of strings"):
        LayerSelection(exclude=["a", 1])


def test_pass_manager_reports_a_malformed_input_graph():
    """BUG: PassManager.run copies its input before verifying anything, and Graph.copy() raises a
    bare KeyError for a value it has not copied (here a weight of another graph), so a malformed
    input graph fails with ``KeyError: %fc1.weight: f32[32, 16]`` instead of a GraphError naming
    node fc1 and the dangling value (what ``verify`` reports for the same graph)."""
    g, other = mlp_graph(), mlp_graph()
    g.node("fc1").inputs[1] = other.weights["fc1.weight"]
    with pytest.raises(GraphError, match="node fc1 reads dangling value fc1.weight"):
        PassManager([DeadCodeElimination()]).run(g)

"""Hostile graphs: cycles, unsorted nodes, dangling values, type and attribute disagreements,
absurd sizes and deep nesting give a named GraphError (or SerializationError naming the file), in
memory and in graph.json; and a 100,000-node chain goes through every graph walk without
recursion. Each test checks that the message names the node, value or file at fault."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from nnforge.ir import (Graph, GraphError, InterpreterError, SerializationError, Value, check, format_graph,
                        load_graph, run_graph, save_graph, tensor, verify)
from nnforge.ir import serialize, verifier
from nnforge.passes.base import PassContext, PassManager
from nnforge.passes.cleanup import cleanup_passes
from tests.ir.test_verifier import mlp_graph




def chain(n: int, name: str = "chain") -> Graph:
    """x -> relu -> relu -> ... (n nodes, default names relu, relu_1, ...)."""
    g = Graph(name)
    v = g.add_input("x", tensor("f32", "batch", 4))
    for _ in range(n):
        v = g.op("relu", v)
    g.set_outputs([v])
    return g


def save(g: Graph, tmp_path: Path) -> tuple[Path, Path]:
    j, w = tmp_path / "graph.json", tmp_path / "weights.safetensors"
    save_graph(g, j, w)
    return j, w


def edit_json(j: Path, fn) -> None:
    doc = json.loads(j.read_text())
    fn(doc)
    j.write_text(json.dumps(doc))


def load_error(j: Path, w: Path) -> str:
    with pytest.raises(SerializationError) as info:
        load_graph(j, w)
    msg = str(info.value)
    assert msg.startswith(f"{j}: "), msg                  # every load error names the file first
    return msg


# --- cycles --------------------------------------------------------------------------------------
def test_cycle_names_the_nodes_on_it_and_not_those_below():
    g = mlp_graph()
    g.op("neg", g.outputs[0], name="below")                 # waits on the cycle, is not on it
    g.node("fc1").inputs[0] = g.value("fc2")                 # fc1 <- fc2 <- act <- fc1
    with pytest.raises(GraphError) as info:
        g.toposort()
    assert str(info.value) == ("graph mlp has a cycle through nodes: act, fc1, fc2 "
                               "(data flows fc1 -> act -> fc2 -> fc1); 1 more node(s) wait on the cycle")
    with pytest.raises(GraphError, match="has a cycle through nodes: act, fc1, fc2 \\(data flows"):
        verify(g)


def test_self_loop_is_a_cycle():
    g = mlp_graph()
    act = g.node("act")
    act.inputs[0] = act.output
    with pytest.raises(GraphError, match="graph mlp has a cycle through nodes: act \\(data flows act -> act\\)"):
        verify(g)


def test_long_cycle_is_found_without_recursion():
    g = chain(20_000)
    g.nodes[0].inputs[0] = g.nodes[-1].output                # one cycle through every node
    with pytest.raises(GraphError) as info:
        g.toposort()
    msg = str(info.value)
    assert msg.startswith("graph chain has a cycle through nodes: relu, relu_1, relu_10, ")
    assert "... (20000 nodes) ..." in msg and len(msg) < 400


def test_cycle_in_file_names_file_node_and_cycle(tmp_path):
    j, w = save(mlp_graph(), tmp_path)
    edit_json(j, lambda d: d["nodes"][0]["inputs"].__setitem__(0, "fc2"))
    msg = load_error(j, w)
    assert "node fc1 (linear): input 'fc2' is not defined before it but by node fc2, which depends on it: " \
           "graph mlp has a cycle through nodes: act, fc1, fc2" in msg


def test_node_listed_twice_is_named():
    g = mlp_graph()
    g.nodes.append(g.node("act"))
    with pytest.raises(GraphError, match="node act appears twice in the node list"):
        g.toposort()
    assert "node name 'act' is used twice" in str(pytest.raises(GraphError, verify, g).value)


# --- unsorted nodes ----------------------------------------------------------------------------
def test_unsorted_nodes_name_node_and_value():
    g = mlp_graph()
    g.nodes.reverse()
    msg = str(pytest.raises(GraphError, verify, g).value)
    assert "node act reads fc1 (input 0) before node fc1 defines it" in msg
    assert "nodes are not in topological order (Graph.toposort() can fix it)" in msg
    g.toposort()
    assert check(g) == []


def test_unsorted_nodes_in_file_name_file_node_and_value(tmp_path):
    j, w = save(mlp_graph(), tmp_path)
    edit_json(j, lambda d: d["nodes"].reverse())
    msg = load_error(j, w)
    assert "node fc2 (linear): input 'act' is not defined before it but by node act further down: " \
           "graph.json must list nodes in topological order" in msg


def test_interpreter_names_a_node_run_out_of_order():
    g = mlp_graph()
    g.nodes.reverse()
    with pytest.raises(InterpreterError, match="node fc2 \\(linear\\) reads act, which no input or earlier node"):
        run_graph(g, [torch.randn(2, 4)])


# --- dangling values -------------------------------------------------------------------------------
def test_dangling_value_from_another_graph_is_named():
    g, other = mlp_graph(), mlp_graph()
    g.node("act").inputs[0] = other.value("fc1")             # same name, another graph's value
    g.outputs.append(other.value("fc2"))
    msg = str(pytest.raises(GraphError, verify, g).value)
    assert "node act reads dangling value fc1 (input 0), defined nowhere in the graph" in msg
    assert "graph output fc2 is defined nowhere in the graph" in msg


def test_node_output_posing_as_graph_input_is_named():
    g = mlp_graph()
    g.inputs.append(g.value("act"))
    assert "graph input act is not a plain input (it has node act)" in str(pytest.raises(GraphError, verify, g).value)


def test_dangling_input_in_file_names_file_node_and_value(tmp_path):
    j, w = save(mlp_graph(), tmp_path)
    edit_json(j, lambda d: d["nodes"][1]["inputs"].__setitem__(0, "ghost"))
    msg = load_error(j, w)
    assert "node act (relu): input 'ghost' is not defined before it: no input, weight or node of the graph " \
           "defines it" in msg


def test_dangling_output_in_file_names_file_and_value(tmp_path):
    j, w = save(mlp_graph(), tmp_path)
    edit_json(j, lambda d: d["outputs"].append("ghost"))
    assert "graph output 'ghost' is not defined" in load_error(j, w)


# --- shape and attribute disagreements -------------------------------------------------------------
def test_stored_type_disagreeing_with_inference_is_named():
    g = mlp_graph()
    g.value("act").type = tensor("f32", "batch", 9)
    msg = str(pytest.raises(GraphError, verify, g).value)
    assert "node act (relu): output act is typed f32[batch, 9] but its inputs give f32[batch, 8]" in msg


def test_recorded_type_disagreeing_in_file_is_named(tmp_path):
    j, w = save(mlp_graph(), tmp_path)
    edit_json(j, lambda d: d["nodes"][1]["outputs"][0].update(shape=["batch", 9]))
    msg = load_error(j, w)
    assert "node act (relu): recorded output type {'name': 'act', 'dtype': 'float32', 'shape': ['batch', 9]} " \
           "disagrees with the inferred f32[batch, 8]" in msg


def test_attribute_of_the_wrong_kind_in_file_is_named(tmp_path):
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 3))
    g.set_outputs([g.op("softmax", x, axis=1, name="sm")])
    j, w = save(g, tmp_path)
    edit_json(j, lambda d: d["nodes"][0]["attrs"].update(axis=[1]))
    assert "node sm (softmax): attribute axis must be of kind int, got [1]" in load_error(j, w)


def test_attribute_shape_disagreement_is_named():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 3))
    g.set_outputs([g.op("permute", x, perm=[1, 0], name="p")])
    g.node("p").attrs["perm"] = [0, 1, 2]                    # a perm for rank 3 on a rank-2 input
    assert "node p (permute): " in str(pytest.raises(GraphError, verify, g).value)


# --- absurd sizes -------------------------------------------------------------------------------
def test_absurd_symbolic_shape_is_named():
    g = Graph("g")
    g.add_input("x", tensor("f32", "batch", 4))
    g.set_outputs([g.op("full", shape=[f"{1 << 41}*batch", 2], value=0.0, dtype="f32", name="r")])
    msg = str(pytest.raises(GraphError, verify, g).value)   # even with batch = 1 it is too large
    assert f"value r has an absurd shape f32[2199023255552*batch, 2] (more than {verifier.MAX_ELEMENTS}" in msg


def test_rank_above_cap_in_file_is_refused_before_building(tmp_path):
    j, w = save(mlp_graph(), tmp_path)
    edit_json(j, lambda d: d["inputs"][0].update(shape=[1] * 1_000_000))
    assert f"input x: rank 1000000, above the cap of {verifier.MAX_RANK}" in load_error(j, w)


def test_node_count_cap(tmp_path, monkeypatch):
    g = chain(11)
    j, w = save(g, tmp_path)
    monkeypatch.setattr(verifier, "MAX_NODES", 10)
    monkeypatch.setattr(serialize, "MAX_NODES", 10)
    assert check(g) == ["graph chain has 11 nodes, above the cap of 10"]   # nothing else walks it
    assert "11 nodes, above the cap of 10" in load_error(j, w)


def test_weight_bytes_cap(tmp_path, monkeypatch):
    g = mlp_graph()
    j, w = save(g, tmp_path)
    monkeypatch.setattr(verifier, "MAX_WEIGHT_BYTES", 100)
    assert "graph mlp: its weights take 224 bytes, above the cap of 100" in str(pytest.raises(GraphError, verify, g).value)
    monkeypatch.setattr(serialize, "MAX_WEIGHTS_FILE_BYTES", 100)
    assert load_error_for(w, j, w).startswith(f"{w}: weights file is ")


def load_error_for(path: Path, j: Path, w: Path) -> str:
    with pytest.raises(SerializationError) as info:
        load_graph(j, w)
    assert str(info.value).startswith(f"{path}: "), info.value
    return str(info.value)


def test_json_file_size_cap(tmp_path, monkeypatch):
    j, w = save(mlp_graph(), tmp_path)
    monkeypatch.setattr(serialize, "MAX_JSON_BYTES", 100)
    assert "graph JSON file is " in load_error(j, w) and "above the cap of 100" in load_error(j, w)


def test_truncated_weights_file_names_it(tmp_path):
    j, w = save(mlp_graph(), tmp_path)
    w.write_bytes(w.read_bytes()[:-50])                       # the header declares more than the file holds
    assert "cannot read weights" in load_error_for(w, j, w)


def test_oversized_attributes_are_named():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 3))
    g.set_outputs([g.op("pad", x, pads=[0, 0, 0, 0], name="p")])
    g.node("p").attrs["pads"] = [0] * 100_000
    msg = str(pytest.raises(GraphError, verify, g).value)
    assert f"node p (pad): attribute pads has 100,000 items, above the cap of {verifier.MAX_ATTR_ITEMS}" in msg


# --- nesting ---------------------------------------------------------------------------------------
def test_deep_json_is_refused_before_parsing(tmp_path):
    j, w = save(mlp_graph(), tmp_path)
    text = j.read_text()
    deep = "[" * 100_000 + "]" * 100_000
    j.write_text(text.replace('"meta": {}', f'"meta": {{"x": {deep}}}', 1))
    assert f"graph JSON is nested 100,002 levels deep, above the cap of {serialize.MAX_JSON_DEPTH}" in load_error(j, w)


def test_brackets_in_strings_do_not_count(tmp_path):
    g = mlp_graph()
    g.node("act").meta["source"] = '"[[[[' * 1000 + "\\" + "{" * 1000
    j, w = save(g, tmp_path)
    assert serialize.json_depth(j.read_text()) < 10
    assert load_graph(j, w).node("act").meta["source"] == g.node("act").meta["source"]


def test_depth_scan_is_linear_on_unclosed_strings():
    text = '"' + '\\"' * 2_000_000                           # a string that never closes
    t0 = time.perf_counter()
    assert serialize.json_depth(text) == 0
    assert serialize.json_depth('"[' * 1_000_000) == 500_000          # "[" is a string, the next [ is not
    assert time.perf_counter() - t0 < 10


def test_deep_meta_within_the_depth_scan_cap_still_named(tmp_path):
    g = mlp_graph()
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    g.node("act").meta["deep"] = deep
    with pytest.raises(SerializationError, match=f"node act: meta is nested deeper than the cap of "
                                                 f"{serialize.MAX_JSON_DEPTH} levels"):
        save(g, tmp_path)
    doc, tensors = serialize.graph_to_dict(mlp_graph())
    doc["nodes"][1]["meta"] = {"deep": deep}
    with pytest.raises(SerializationError, match="src: node act \\(relu\\): meta is nested deeper than the cap"):
        serialize.graph_from_dict(doc, tensors, source="src")


def test_malformed_entries_are_named(tmp_path):
    j, w = save(mlp_graph(), tmp_path)
    edit_json(j, lambda d: d["nodes"].__setitem__(1, ["act"]))
    assert "field 'nodes' must be a list of objects" in load_error(j, w)
    j, w = save(mlp_graph(), tmp_path)
    edit_json(j, lambda d: d["nodes"][1].update(meta="source"))
    assert "node act (relu): meta must be an object, got str" in load_error(j, w)


# --- a 100,000-node chain --------------------------------------------------------------------------
@pytest.mark.slow  # 100k nodes through every walk; the smaller graphs above run by default
def test_100k_node_chain_goes_through_every_walk(tmp_path):
    """Build, verify, save + load, interpret, print, toposort and clean up a 100,000-node chain
    under Python's default recursion limit: every walk is iterative, and none is quadratic
    (about 30 s of CPU in all on one core; a quadratic step would take hours)."""
    n = 100_000
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    t0 = time.process_time()
    try:
        g = chain(n)
        assert g.nodes[-1].name == f"relu_{n - 1}"
        verify(g)
        j, w = save(g, tmp_path)
        g2 = load_graph(j, w)
        assert len(g2.nodes) == n
        x = torch.randn(2, 4)
        torch.testing.assert_close(run_graph(g2, [x])[0], torch.relu(x))
        text = format_graph(g2)
        assert text.count("\n") == n + 2
        g2.nodes.reverse()
        g2.toposort()
        assert [m.name for m in g2.nodes[:2]] == ["relu", "relu_1"]
        g3 = PassManager(cleanup_passes()).run(g2, PassContext())
        assert len(g3.nodes) == n
    finally:
        sys.setrecursionlimit(limit)
    assert time.process_time() - t0 < 120


def test_fresh_names_stay_lowest_after_removal():
    g = chain(5)
    g.remove_nodes([g.node("relu_2")])
    assert g.fresh_name("relu", node=True) == "relu_2"        # the lowest free suffix, as before
    assert g.fresh_name("relu_2") == "relu_2"

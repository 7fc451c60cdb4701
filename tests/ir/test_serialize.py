"""Serialisation: a graph with Dense and IntQuant weights (zero points, act-order, fp16 scales),
symbolic shapes, optional inputs, dtype and list attributes and metadata round-trips losslessly
(same document, same printed graph, bit-identical weight tensors, same outputs); damaged files
are refused with an error naming the file (and the entry at fault)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnforge.ir import (Dense, Graph, GraphError, IntQuant, SerializationError, format_graph, graph_from_dict,
                        graph_to_dict, load_graph, run_graph, save_graph, tensor)


def rich_graph() -> Graph:
    gen = torch.Generator().manual_seed(0)
    g = Graph("rich")
    g.meta = {"source": "test", "vocab": 10}
    ids = g.add_input("ids", tensor("i64", "batch", "seq"))
    emb = g.add_weight("emb.weight", IntQuant.quantize(torch.randn(10, 16, generator=gen), 8))
    w1 = torch.randn(24, 16, generator=gen)
    perm = torch.randperm(16, generator=gen)
    stored = IntQuant.quantize(w1[:, perm], 4, group_size=8, symmetric=False, scale_dtype=torch.float16)
    fc1 = g.add_weight("fc1.weight", IntQuant.from_codes(stored.int_codes(), stored.scale, bits=4, signed=False,
                                                         shape=(24, 16), group_size=8, zero_point=stored.zero_point,
                                                         perm=perm))
    b1 = g.add_weight("fc1.bias", Dense(torch.randn(24, generator=gen)))
    w2 = g.add_weight("fc2.weight", Dense(torch.randn(5, 24, generator=gen)))
    ln = g.add_weight("ln.weight", Dense(torch.rand(24, generator=gen) + 0.5))
    e = g.op("embedding", ids, emb, name="embed", meta={"module": "embeddings"})
    h = g.op("linear", e, fc1, b1, name="fc1")
    h = g.op("layer_norm", h, ln, None, eps=1e-6, name="ln")
    h = g.op("gelu", h, approximate="tanh", name="act")
    y = g.op("linear", h, w2, None, name="fc2")
    pooled = g.op("reduce_mean", y, axes=[1], name="pool")
    mask = g.op("cast", g.op("gt", ids, g.add_weight("zero", Dense(torch.tensor(0))), name="nz"), dtype="f32",
                name="maskf")
    flat = g.op("reshape", y, shape=["batch*seq", -1], name="flat")
    g.set_outputs([pooled, mask, flat])
    return g


def save(g: Graph, tmp_path: Path) -> tuple[Path, Path]:
    j, w = tmp_path / "graph.json", tmp_path / "weights.safetensors"
    save_graph(g, j, w)
    return j, w


def test_round_trip_is_lossless(tmp_path):
    g = rich_graph()
    j, w = save(g, tmp_path)
    g2 = load_graph(j, w)
    doc, tensors = graph_to_dict(g)
    doc2, tensors2 = graph_to_dict(g2)
    assert doc2 == doc                                    # structure, names, types, attrs, meta
    assert tensors2.keys() == tensors.keys()
    for k in tensors:
        assert tensors2[k].dtype == tensors[k].dtype, k
        assert torch.equal(tensors2[k], tensors[k]), k    # bit-exact
    assert format_graph(g2) == format_graph(g)
    assert g2.signature() == g.signature()
    for name, v in g.weights.items():
        v2 = g2.weights[name]
        assert type(v2.encoding) is type(v.encoding)
        assert v2.encoding.params() == v.encoding.params()
        assert torch.equal(v2.encoding.decode(), v.encoding.decode())
    assert g2.node("embed").meta == {"module": "embeddings"}
    assert g2.meta == {"source": "test", "vocab": 10}
    ids = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(1))
    for a, b in zip(run_graph(g, [ids]), run_graph(g2, [ids])):
        assert torch.equal(a, b)


def test_document_is_plain_json(tmp_path):
    j, _ = save(rich_graph(), tmp_path)
    doc = json.loads(j.read_text())
    assert doc["format"] == "nnforge.graph" and doc["version"] == 1
    fc1 = next(w for w in doc["weights"] if w["name"] == "fc1.weight")
    assert fc1["encoding"] == "int" and fc1["params"]["bits"] == 4
    assert set(fc1["tensors"]) == {"codes", "scale", "zero_point", "perm"}
    cast = next(n for n in doc["nodes"] if n["name"] == "maskf")
    assert cast["attrs"] == {"dtype": "float32"}
    fc2 = next(n for n in doc["nodes"] if n["name"] == "fc2")
    assert fc2["inputs"] == ["act", "fc2.weight", None]


def test_weights_file_is_safetensors_not_pickle(tmp_path):
    from safetensors import safe_open
    _, w = save(rich_graph(), tmp_path)
    with safe_open(str(w), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["producer"] == "nnforge"
    assert "fc1.weight::codes" in keys and "emb.weight::scale" in keys
    assert not w.read_bytes().startswith(b"\x80")          # not a pickle stream


# --- damaged files ---------------------------------------------------------------------------------------
def _edit_json(j: Path, fn):
    doc = json.loads(j.read_text())
    fn(doc)
    j.write_text(json.dumps(doc))


def test_invalid_json_names_file(tmp_path):
    j, w = save(rich_graph(), tmp_path)
    j.write_text(j.read_text()[:-40])
    with pytest.raises(SerializationError, match=f"{j}: cannot read graph JSON"):
        load_graph(j, w)


def test_missing_files_name_the_file(tmp_path):
    j, w = save(rich_graph(), tmp_path)
    with pytest.raises(SerializationError, match="nope.json: cannot read graph JSON"):
        load_graph(tmp_path / "nope.json", w)
    with pytest.raises(SerializationError, match="nope.safetensors: cannot read weights"):
        load_graph(j, tmp_path / "nope.safetensors")


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_weights_name_the_file(tmp_path, cut):
    j, w = save(rich_graph(), tmp_path)
    data = w.read_bytes()
    w.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(SerializationError, match=f"{w}: cannot read weights"):
        load_graph(j, w)


def test_garbage_weights_name_the_file(tmp_path):
    j, w = save(rich_graph(), tmp_path)
    w.write_bytes(b"\xff" * 64)
    with pytest.raises(SerializationError, match="weights.safetensors: cannot read weights"):
        load_graph(j, w)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="something-else"), "not an nnforge graph \\(format field is 'something-else'\\)"),
    (lambda d: d.update(version=99), "graph format version 99, this nnforge reads 1"),
    (lambda d: d.pop("nodes"), "missing or malformed field 'nodes'"),
    (lambda d: d["outputs"].append("ghost"), "graph output 'ghost' is not defined"),
    (lambda d: d["nodes"][1]["inputs"].__setitem__(0, "later"), "node fc1 \\(linear\\): input 'later' is not defined before it"),
    (lambda d: d["nodes"][1]["outputs"][0].update(shape=["batch", "seq", 25]),
     "node fc1 \\(linear\\): recorded output type .* disagrees with the inferred f32\\[batch, seq, 24\\]"),
    (lambda d: d["inputs"][0].update(dtype="complex"), "input ids: bad type"),
    (lambda d: d["weights"][1]["params"].update(shape=[24, 17]), "weight fc1.weight: IntQuant codes must be uint8"),
    (lambda d: d["weights"][1].update(encoding="zip"), "weight fc1.weight: unknown weight encoding 'zip'"),
    (lambda d: d["weights"][1]["tensors"].update(codes="nope::codes"),
     "weight fc1.weight: tensor 'nope::codes' is missing from the weights file"),
    (lambda d: d["weights"].pop(3), "weights file has tensors no weight refers to: fc2.weight::data"),
], ids=["format", "version", "no-nodes", "ghost-output", "forward-ref", "output-type", "input-dtype",
        "weight-shape", "encoding-kind", "missing-tensor", "extra-tensor"])
def test_tampered_document_names_file_and_entry(tmp_path, edit, message):
    j, w = save(rich_graph(), tmp_path)
    _edit_json(j, edit)
    with pytest.raises(SerializationError, match=f"{j}: .*{message}"):
        load_graph(j, w)


@pytest.mark.parametrize("edit, what", [
    (lambda d: d["nodes"][2].update(op="frobnicate"), "an unknown op"),
    (lambda d: d["nodes"][3]["attrs"].update(approximate="fast"), "an attribute outside its choices"),
    (lambda d: d["nodes"][2].update(name="bad name"), "an invalid node name"),
    (lambda d: d["nodes"][3]["inputs"].append("ids"), "an extra input"),
], ids=["unknown-op", "attr-choice", "node-name", "arity"])
def test_tampered_nodes_name_the_file(tmp_path, edit, what):
    """BUG: graph_from_dict only wraps KeyError/TypeError (and a few checks of its own) into
    SerializationError "<file>: ..."; the GraphErrors raised while rebuilding nodes (unknown op from
    get_op, bad attributes / arity / names from Graph.add_node) escape unwrapped, so the error for a
    tampered graph.json says e.g. "unknown op 'frobnicate'; known: ..." without naming
    the file (and, for get_op, without naming the node)."""
    j, w = save(rich_graph(), tmp_path)
    _edit_json(j, edit)
    with pytest.raises(GraphError) as info:
        load_graph(j, w)
    assert str(j) in str(info.value), f"{what}: {info.value}"
    assert isinstance(info.value, SerializationError)


def test_hostile_dimension_in_file_is_refused_not_run(tmp_path):
    j, w = save(rich_graph(), tmp_path)
    _edit_json(j, lambda d: d["inputs"][0].update(shape=["__import__('os').system('touch pwned')", "seq"]))
    with pytest.raises(GraphError, match="unsupported syntax"):
        load_graph(j, w)
    assert not (Path.cwd() / "pwned").exists()


def test_modified_weight_tensor_dtype_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    j, w = save(rich_graph(), tmp_path)
    tensors = load_file(str(w))
    tensors["fc1.weight::scale"] = tensors["fc1.weight::scale"].to(torch.int32)
    save_file(tensors, str(w))
    with pytest.raises(SerializationError, match="weight fc1.weight: IntQuant scale must be a float tensor"):
        load_graph(j, w)


def test_graph_from_dict_rejects_non_documents():
    with pytest.raises(SerializationError, match="src: not an nnforge graph"):
        graph_from_dict([1, 2], {}, source="src")
    with pytest.raises(SerializationError, match="src: not an nnforge graph \\(format field is None\\)"):
        graph_from_dict({}, {}, source="src")


def test_loaded_graph_is_verified(tmp_path):
    j, w = save(rich_graph(), tmp_path)
    _edit_json(j, lambda d: d.update(outputs=[]))
    with pytest.raises(GraphError, match="graph rich has no outputs"):
        load_graph(j, w)

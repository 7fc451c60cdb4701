"""Model names in the generated HLS C++: every graph, node and value name becomes a valid C++
identifier (prefixed, never a keyword, a leading digit or a reserved ``__``), names appear in
comments only after ``layers.comment`` makes them one harmless line, two names that map to one
identifier are an error naming both, and a layer the templates cannot implement is an error naming
its node and op.

The IR already refuses most hostile names (``nnforge.ir.graph.NAME_RE``); the backend must not rely
on that (a bundle's graph.json or another frontend can carry anything), so the hostile-name tests
force the names onto a valid graph, build the project, compile it with g++ and grep every
generated file."""
from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
import torch

from nnforge.backends.base import BackendError
from nnforge.backends.hls import csim, make_sim, render, tb_inputs
from nnforge.backends.hls import project as P
from nnforge.backends.hls.layers import comment
from nnforge.backends.hls.project import HlsOptions, Names, build_plan
from nnforge.ir import Dense, Graph, tensor
from nnforge.ir.graph import GraphError
from tests.hls.test_warnings import WARN_FLAGS

CXX_KEYWORDS = ["class", "int", "namespace", "return", "template", "typedef", "void", "static", "operator",
                "auto", "register", "signed", "struct", "union", "new", "delete", "this", "true", "false"]

# name -> what must never appear in generated text. Each carries a distinct marker (PWNEDn) so that
# the grep can also check where the sanitised remains land (inside identifiers or comments only).
HOSTILE = {
    "n1\n#define act_t float // PWNED1": ["#define act_t float", "\n#define act_t", "// PWNED1"],
    "n2\r#include <PWNED2.h>": ["#include <PWNED2", "\r"],
    'n3"); system("PWNED3': ['"PWNED3', 'system("'],
    "n4'PWNED4'": ["'PWNED4"],
    "n5 */ int PWNED5; /*": ["*/ int PWNED5", "/*"],
    "n6 // PWNED6": ["// PWNED6"],
    "n7\\\nPWNED7 = 1;": ["\\\nPWNED7", "\\\n", "\\PWNED7"],
    "n8 ??/\nPWNED8": ["??/", "\nPWNED8"],
    "n9 名前 PWNED9 ü": ["名前", "ü"],
    "0n10-PWNED10 x": [],                       # harmless in a comment; an identifier needs the prefix and _
    "n11\x00\tPWNED11\x0b": ["\x00", "\x0b", "\tPWNED11"],
    "#pragma HLS PIPELINE off PWNED12": ["#pragma HLS PIPELINE off"],
}


# --- names the IR itself refuses ------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["0abc", "a-b", "a b", "ä", "名前", "a\nb", "a*/b", "a//b", 'a"b', "a'b",
                                 "#include <x>", "#define x 1", "a\\b", "a\rb"])
def test_graph_refuses_names_that_are_not_identifiers(bad):
    g = Graph("g")
    with pytest.raises(GraphError, match=r"invalid input name .* names must match"):
        g.add_input(bad, tensor("f32", 2, 8))
    x = g.add_input("x", tensor("f32", 2, 8))
    with pytest.raises(GraphError, match=r"invalid node name .* names must match"):
        g.op("relu", x, name=bad)


def test_a_name_ending_in_a_newline_is_refused_by_the_ir():
    from nnforge.ir import GraphError
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 8))
    with pytest.raises(GraphError, match="invalid node name 'r\\\\n'"):
        g.op("relu", x, name="r\n")


def test_graph_names_are_sanitised_by_the_ir():
    g = Graph('3d model-v2 "*/\n#define')
    assert g.name == "v_3d_model_v2______define"
    x = g.add_input("x", tensor("f32", 2, 8))
    g.set_outputs([g.op("relu", x, name="r")])
    assert build_plan(g, HlsOptions()).name == "nf_v_3d_model_v2_define_top"


# --- keywords and other names the IR accepts: a project that compiles, runs and matches ------------
def _accepted_graph() -> Graph:
    """Names the IR accepts but C++ would not take as they are: keywords, leading / trailing / double
    underscores, dots."""
    g = Graph("namespace")
    x = g.add_input("class", tensor("f32", 2, 8))
    y = g.add_input("_Int", tensor("f32", 2, 8))
    w = g.add_weight("template", Dense(torch.randn(4, 8) * 0.1))
    outs = [g.op("linear", x, w, None, name="return")]
    v = x
    for i, kw in enumerate(CXX_KEYWORDS[4:]):
        v = g.op("relu" if i % 2 else "clamp", v, name=kw, **({} if i % 2 else {"min": -1.0}))
    outs += [v, g.op("add", x, y, name="int"), g.op("mul", x, y, name="__x__"),
             g.op("sub", x, y, name="a..b."), g.op("relu", y, name="trailing_newline"),
             g.op("gelu", g.op("reshape", y, name="_Upper", shape=[16]), name="x.__.y")]
    g.set_outputs(outs)
    return g


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NNFORGE_HLS_CACHE", str(tmp_path_factory.mktemp("hls-cache")))
    yield
    mp.undo()


def _identifiers(plan) -> list[str]:
    return [plan.name] + list(plan.ids.values()) + [layer.cfg for layer in plan.layers]


def _assert_valid_identifiers(plan):
    for ident in _identifiers(plan):
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", ident), ident
        assert "__" not in ident, f"{ident}: identifiers containing __ are reserved in C++"
        assert ident not in CXX_KEYWORDS


def _syntax_check(files: dict, tmp_path, top: str, strict: bool = True):
    for rel, data in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    src = tmp_path / "hls" / "src"
    unity = tmp_path / "hls" / "unity.cpp"
    unity.write_text(f'#include "src/{top}.cpp"\n#include "src/host.cpp"\n' +
                     ('#include "tb/tb.cpp"\n' if "hls/tb/tb.cpp" in files else ""))
    r = subprocess.run([csim.compiler(), "-std=c++14", "-fsyntax-only", *(WARN_FLAGS if strict else []),
                        f"-I{src}", "-isystem", str(csim.ap_types_dir()), str(unity)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-4000:]


def test_keywords_and_odd_names_compile_and_run(cache, tmp_path):
    g = _accepted_graph()
    plan = build_plan(g, HlsOptions())
    _assert_valid_identifiers(plan)
    assert plan.name == "nf_namespace_top"
    assert plan.ids["class"] == "in_class" and plan.ids["_Int"] == "in_Int"
    files = render.render(plan, tb_inputs(plan))
    text = "\n".join(_generated_text(files).values())
    assert "// trailing_newline: relu" in text
    _syntax_check(files, tmp_path, plan.name)
    srcs = render.sources(plan)
    sim = make_sim(plan, srcs)
    xs = [np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32) for _ in range(2)]
    for v, a, b in zip(plan.outputs, sim.run(xs), plan.emulate(xs)):
        assert np.array_equal(a.reshape(-1), b.reshape(-1)), v


# --- hostile names forced past the IR -----------------------------------------------------------
def _hostile_graph() -> Graph:
    """A valid graph, then every HOSTILE name forced onto its graph, input, node and value names."""
    g = Graph("g")
    hostile = list(HOSTILE)
    x = g.add_input("x", tensor("f32", 2, 8))
    w = g.add_weight("w", Dense(torch.randn(4, 8) * 0.1))
    v, outs = x, []
    for i in range(len(hostile)):
        v = g.op(["relu", "gelu", "clamp"][i % 3], v, name=f"node{i}", **({"max": 2.0} if i % 3 == 2 else {}))
        if i % 4 == 3:
            outs.append(v)
    outs += [g.op("linear", v, w, None, name="lin"), g.op("add", x, v, name="add")]
    g.set_outputs(outs)
    g.name = hostile[0] + " graph"
    x.name = hostile[1] + " input"
    for i, node in enumerate(g.nodes[:len(hostile)]):
        node.name = hostile[i]
        node.output.name = hostile[(i + 5) % len(hostile)] + " value"
    g.nodes[-1].name = g.nodes[-1].output.name = "#define wmem 0 // last"
    return g


def _generated_text(files: dict) -> dict:
    """{path: text} of every generated text file (the copied nf_*.h templates and the binaries aside)."""
    return {rel: data.decode("utf-8") for rel, data in files.items()
            if not rel.startswith("hls/src/nf/") and not rel.endswith(".bin")}


def _assert_nothing_injected(texts: dict):
    text = "\n".join(texts.values())
    for name, fragments in HOSTILE.items():
        assert name not in text or comment(name) == name
        for frag in fragments:
            assert frag not in text, f"{frag!r} of the name {name!r} reached the generated C++"
    assert "#define wmem" not in text
    assert not re.search(r"[^\x20-\x7e\n\t]", text.replace("\t", " ")), "control or non-ASCII text in the sources"
    for rel, line in ((rel, line) for rel, t in texts.items() for line in t.split("\n")):
        for m in re.finditer(r"PWNED\d+", line):       # what is left of a name: in an identifier or a comment
            before = line[:m.start()]
            assert "//" in before or before.endswith("_"), line
        if rel.endswith((".cpp", ".h")) and line.lstrip().startswith("#"):
            assert re.match(r"\s*#(include [\"<][\w./]+[\">]|ifndef \w+|ifdef \w+|define \w+( [\w ]*)?(//.*)?|"
                            r"else|endif|pragma HLS .*)$", line), line


@pytest.mark.parametrize("dataflow", [False, True])
def test_hostile_names_cannot_inject_text(dataflow, tmp_path):
    g = _hostile_graph()
    plan = build_plan(g, HlsOptions(dataflow=dataflow))
    _assert_valid_identifiers(plan)
    files = render.render(plan, tb_inputs(plan))
    _assert_nothing_injected(_generated_text(files))
    _syntax_check(files, tmp_path, plan.name)


def test_comment_keeps_one_safe_line():
    assert comment("blocks.0.attn: linear 64 -> 32, 2:4, [1, 2] {x} (a @ b)") == \
        "blocks.0.attn: linear 64 -> 32, 2:4, [1, 2] {x} (a @ b)"
    for name in HOSTILE:
        c = comment(name)
        assert re.fullmatch(r"[A-Za-z0-9 _.,:;+\-=<>()\[\]{}@^%&|~!]*", c) and len(c) == len(name)


# --- collisions ------------------------------------------------------------------------------------
def test_names_mapping_to_one_identifier_are_an_error_naming_both():
    cases = [  # (name a, name b, identifier): node names, as the IR accepts them
        ("blk.0", "blk_0", "n_blk_0"), ("a__b", "a_b", "n_a_b"), ("_x", "x", "n_x"), ("x.", "x_", "n_x_"),
        ("class.", "class_", "n_class_")]
    for a, b, ident in cases:
        g = Graph("g")
        x = g.add_input("in", tensor("f32", 2, 8))
        r1 = g.add_node("relu", [x], name=a, output_names=["r1"]).output
        g.set_outputs([g.add_node("relu", [r1], name=b, output_names=["r2"]).output])
        with pytest.raises(BackendError) as e:
            build_plan(g, HlsOptions())
        msg = str(e.value)
        assert f"node {a!r}" in msg and f"node {b!r}" in msg and f"C++ identifier {ident};" in msg, msg
    g = Graph("g")                                        # value names
    x = g.add_input("x", tensor("f32", 2, 8))
    v1 = g.add_node("relu", [x], name="r1", output_names=["v.1"]).output
    v2 = g.add_node("relu", [v1], name="r2", output_names=["v_1"]).output
    g.set_outputs([g.op("relu", v2, name="o")])
    with pytest.raises(BackendError, match=r"value 'v\.1' and value 'v_1' both become the C\+\+ identifier v_v_1"):
        build_plan(g, HlsOptions())


def test_forced_names_that_collide_are_an_error():
    """Non-ASCII or control characters that reach the backend collide like any other character."""
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 8))
    g.set_outputs([g.op("relu", g.op("relu", x, name="a"), name="b")])
    g.nodes[0].name, g.nodes[1].name = "ä", "\n"
    with pytest.raises(BackendError, match=r"node 'ä' and node '\\n' both become the C\+\+ identifier n_;"):
        build_plan(g, HlsOptions())


def test_names_object_directly():
    names = Names()
    assert names("v_", "__a..b__", "value") == "v_a_b_"
    assert names("nf_", "x_", "graph", "_top") == "nf_x_top"
    assert names("v_", "__a..b__", "value") == "v_a_b_"               # the same name again is no collision
    with pytest.raises(BackendError, match=r"value '__a\.\.b__' and value 'a\.b_' both become the C\+\+ "
                                           r"identifier v_a_b_"):
        names("v_", "a.b_", "value")
    assert P.cxx_name("a-b c\n\"*/#") == "a_b_c_____"


# --- layers the templates cannot implement: errors name the node and the op -----------------------
def _one(op, *shapes, inputs=None, dtypes=None, **attrs):
    g = Graph("g")
    dtypes = dtypes or ["f32"] * len(shapes)
    xs = inputs or [g.add_input(f"x{i}", tensor(d, *s)) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    g.set_outputs([g.op(op, *xs, name="the_node", **attrs)])
    return g


def test_unsupported_layers_name_the_node_and_op():
    cases = [
        (_one("softmax", (2, 8), axis=0), "node the_node (softmax)", "last axis only"),
        (_one("layer_norm", (2, 8), axis=0, eps=1e-5), "node the_node (layer_norm)", "last axis only"),
        (_one("add", (1, 1, 1, 1, 2), (1, 1, 1, 1, 2)), "node the_node (add)", "rank 5 > 4"),
        (_one("reduce_sum", (2, 3, 4), axes=[0, 2]), "node the_node (reduce_sum)", "not contiguous"),
        (_one("relu", (2, 8), dtypes=["i64"]), "node the_node (relu)", "int/bool operand"),
    ]
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 8))
    g.set_outputs([g.op("matmul", g.add_weight("c", Dense(torch.randn(4, 2))), x, name="the_node")])
    cases.append((g, "node the_node (matmul)", "constant left operand"))
    g = Graph("g")
    x, w = g.add_input("x", tensor("f32", 2, 8)), g.add_input("w", tensor("f32", 4, 8))
    g.set_outputs([g.op("linear", x, w, None, name="the_node")])
    cases.append((g, "node the_node (linear)", "the weight is an activation"))
    for graph, where, why in cases:
        with pytest.raises(BackendError) as e:
            build_plan(graph, HlsOptions())
        assert where in str(e.value) and why in str(e.value), str(e.value)


def test_unknown_ops_are_named_with_every_node():
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 8))
    g.set_outputs([g.op("exp", g.op("erf", g.op("relu", x, name="ok"), name="class"), name="blk.0.exp")])
    with pytest.raises(BackendError, match=r"no lowering for op\(s\) erf, exp \(nodes class, blk\.0\.exp\); "
                                           r"supported: .*linear"):
        build_plan(g, HlsOptions())


def test_a_failing_lowering_names_the_node_and_op(monkeypatch):
    def broken(plan, node, name):
        raise ValueError("boom")
    monkeypatch.setitem(P.LOWERINGS, "relu", broken)
    g = Graph("g")
    x = g.add_input("x", tensor("f32", 2, 8))
    g.set_outputs([g.op("relu", x, name="blk.0.act")])
    with pytest.raises(BackendError, match=r"lowering node blk\.0\.act \(relu\) failed: boom"):
        build_plan(g, HlsOptions())


def test_dataflow_with_int_values_names_the_graph():
    g = Graph("my_graph")
    ids = g.add_input("ids", tensor("i64", 2, 4))
    g.set_outputs([g.op("cast", ids, dtype="f32", name="c")])
    with pytest.raises(BackendError, match=r"graph my_graph: the dataflow form takes activations only"):
        build_plan(g, HlsOptions(dataflow=True))

"""How nnforge's modules import each other: few import circles, and no import from a layer of the
pipeline up to a higher one (the layers of docs/pipeline.md).

Every ``import`` / ``from ... import`` anywhere in a module (inside functions and ``if
TYPE_CHECKING:`` too) is an edge to the module it names: a submodule when the imported name is
one, else the package. A circle is a strongly connected component of more than one module. To
break one, move the piece both sides share (a context class, a registry, a helper) into its own
small module that both import, so the imports run one way.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import nnforge

MAX_CIRCLES = 2
# docs/pipeline.md, "Layers": a module may import from its own layer and the ones below. Names are
# relative to nnforge; the longest name that prefixes a module places it ("" is the package itself).
LAYERS = [
    ["errors", "registry", "version"],
    ["ir", "numerics", "targets", "plots"],
    ["frontend", "passes", "timing", "generation", "kvreduce", "bundle", "bundle.format"],
    ["fpga", "hls", "backends"],
    ["heldout", "figures", "speed", "claims", "bundle.store", "bundle.signing", "models"],
    ["pipeline", "divergence", "fuzz", "demo", "demo_llm"],
    ["api", "cli", ""],
]


def layer_of(module: str) -> int | None:
    rel = module.split(".", 1)[1] if "." in module else ""
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if rel == n or (n and rel.startswith(n + ".")):
                if best is None or len(n) > best[1]:
                    best = (i, len(n))
    return None if best is None else best[0]


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ``root`` (a package folder)."""
    mods = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph(root: Path) -> nx.DiGraph:
    """module -> module it imports, over the modules of the package at ``root``."""
    mods = _modules(root)
    top = root.name
    graph = nx.DiGraph()
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(name, is_package, node.level, node.module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                if not target.startswith(top):
                    continue
                while target and target not in mods:      # the deepest module the name lies in
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target != name:
                    graph.add_edge(name, target)
    return graph


def circles(graph: nx.DiGraph) -> list[list[str]]:
    """The import circles of ``graph``: its strongly connected components of two or more modules."""
    return sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)


def test_at_most_two_import_circles():
    graph = import_graph(Path(nnforge.__file__).parent)
    found = circles(graph)
    listing = "\n".join(f"  {c}: {sorted(graph.subgraph(c).edges())}" for c in found)
    assert len(found) <= MAX_CIRCLES, f"{len(found)} import circles (at most {MAX_CIRCLES}):\n{listing}"


def test_a_circle_is_found_wherever_its_imports_are(tmp_path):
    """A function-level import and a relative import of a package's submodule close a circle."""
    pkg = tmp_path / "nnforge"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "sub" / "b.py").write_text("from nnforge.sub import a\n")
    (pkg / "c.py").write_text("from .sub import a\n")
    graph = import_graph(pkg)
    assert circles(graph) == [["nnforge.sub.a", "nnforge.sub.b"]]
    assert graph.has_edge("nnforge.sub", "nnforge.sub.b") and graph.has_edge("nnforge.c", "nnforge.sub.a")


def test_no_import_runs_up_a_layer():
    graph = import_graph(Path(nnforge.__file__).parent)
    unplaced = sorted({m for m in graph.nodes if layer_of(m) is None})
    assert not unplaced, f"modules in no layer (add them to LAYERS and docs/pipeline.md): {unplaced}"
    upward = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})" for a, b in graph.edges()
                    if layer_of(b) > layer_of(a))
    assert not upward, "imports from a higher layer:\n  " + "\n  ".join(upward)


def test_backends_import_no_passes_speed_or_bundle_store():
    """A backend gets what it needs through its LowerContext and writes through the writer it is
    handed: it imports the bundle format's names at most, never passes, speed or the bundle store."""
    graph = import_graph(Path(nnforge.__file__).parent)
    banned = ("nnforge.passes", "nnforge.speed", "nnforge.pipeline", "nnforge.bundle.store", "nnforge.bundle.signing")
    bad = sorted((a, b) for a, b in graph.edges
                 if a.startswith("nnforge.backends") and any(b == x or b.startswith(x + ".") for x in banned))
    assert not bad

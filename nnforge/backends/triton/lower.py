"""Lowering for the triton backend: each encoded weight through the capability table (the row
that takes it names its kernel module), its packed tensors, and the kernel sources a bundle carries.

Only ``linear`` weights go to kernels: the kernel contract computes ``x @ W.T`` with W stored
[out, in], which is how a linear weight is encoded; a ``matmul`` weight operand is [in, out], so
an encoded one is decoded instead (a reported fallback, like every weight no row takes). Of the
weightless ops, ``hadamard`` nodes go to ``kernels.hadamard`` (the entry's ``hadamards``), each
block too large for it a reported fallback to the op's reference kernel. A per-token int8/int4
``dynamic_quant`` read only by linears whose weights intweight packed runs with them in
``kernels.intact`` (the entry's ``act_linears``); any other runs as the op's reference kernel.

    >>> artifact = lower_graph(graph, get_target("h100"), ctx.files, toolchain)
    >>> lowered.entry["linears"]["fc.weight"]["module"]
    'intweight'
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from pathlib import Path
from types import ModuleType

from ...ir import Graph
from ...targets import Target
from ..base import Artifact, BackendError, Fallback
from .capabilities import CAPABILITIES, KERNEL_PACKAGE, kernel_module

GRAPH_FILE = "graph.json"                 # written by the pipeline (save_graph); read in place
WEIGHTS_FILE = "weights.safetensors"
PACKED_FILE = "triton_weights.safetensors"
KERNEL_DIR = "kernels"
# Sources a bundle records besides the modules its weights use: the package, the helpers every
# module imports, and the kernel modules a module borrows from (lut unpacks minifloat's bit planes,
# intact reads intweight's packed weights and shares its epilogue).
SHARED_SOURCES = ("__init__", "common")
BORROWS = {"lut": ("minifloat",), "intact": ("intweight",)}
COMPUTE_DTYPES = ("float16", "bfloat16")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def module_source(module: ModuleType) -> Path:
    path = getattr(module, "__file__", None)
    if not path or not Path(path).is_file():
        raise BackendError(f"kernel module {module.__name__} has no source file to put in the bundle")
    return Path(path)


def compute_dtype(target: Target) -> str:
    want = target.options.get("compute_dtype", "float16")
    if want not in COMPUTE_DTYPES:
        raise BackendError(f"target {target.name} ({target.path}): options.compute_dtype must be one of "
                           f"{', '.join(COMPUTE_DTYPES)}, got {want!r}")
    return want


def _linear_weights(graph: Graph) -> dict[str, list[str]]:
    """Encoded weights that some linear uses as its weight, with every node using them."""
    users: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op == "linear" and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].is_weight:
            w = node.inputs[1]
            if w.encoding.kind != "dense":
                users.setdefault(w.name, []).append(node.name)
    return users


def _other_encoded_uses(graph: Graph) -> list[tuple[str, str]]:
    """(weight, node) for encoded weights read other than as a linear's weight (a tied embedding
    table, a matmul operand): those are decoded whatever the kernels take."""
    out = []
    for node in graph.nodes:
        for slot, v in enumerate(node.inputs):
            if v is None or not v.is_weight or v.encoding.kind == "dense":
                continue
            if node.op == "linear" and slot == 1:
                continue
            out.append((v.name, node.name))
    return out


def fp8_linears(graph: Graph, target: Target, linears: dict) -> dict[str, dict]:
    """Linear nodes that run fp8 x fp8 (``minifloat.matmul_fp8act``): the input is a ``fake_quant``
    to E4M3 with a static per-tensor scale (the fp8-w8a8 preset) and the minifloat module takes
    the packed weight with e4m3 activations on ``target`` (one whose architecture file says it has
    fp8 tensor cores). Node name -> the weight, the fake_quant node whose input the step quantises
    itself, and its scale."""
    out = {}
    for node in graph.nodes:
        w = node.inputs[1] if node.op == "linear" and len(node.inputs) > 1 else None
        if w is None or w.name not in linears or linears[w.name]["module"] != "minifloat":
            continue
        q = node.inputs[0].producer
        if q is None or q.op != "fake_quant" or q.attrs["format"].name != "float8_e4m3fn" or q.attrs["zero_point"]:
            continue
        if kernel_module("minifloat")[0].supports(w.encoding, target, activations="e4m3") is None:
            out[node.name] = {"weight": w.name, "quant": q.name, "scale": float(q.attrs["scale"])}
    return out


def act_linears(graph: Graph, target: Target, linears: dict) -> dict[str, dict]:
    """Linear nodes that run int8 x int8 (``intact.matmul``): the input is a per-token int8 or
    int4 ``dynamic_quant`` (not a graph output) whose every reader is such a linear, each with a
    weight intweight packed and ``intact.supports`` takes on ``target``. Node name -> its weight and
    the dynamic_quant, which the launcher then runs as ``intact.quantize`` (codes and scales; the
    float activation it would round is never made). A dynamic_quant with any other reader runs as
    before, and so do its linears."""
    module, _ = kernel_module("intact")
    if module is None:
        return {}
    readers = graph.uses()
    out = {}
    for q in graph.nodes:
        if q.op != "dynamic_quant" or q.attrs["format"] not in module.ACT_BITS or q.attrs["group"] \
                or q.outputs[0] in graph.outputs:
            continue
        users = readers.get(q.outputs[0], [])
        if users and all(slot == 0 and _int_weight(node, linears) is not None
                         and module.supports(_int_weight(node, linears).encoding, target, q.attrs["format"]) is None
                         for node, slot in users):
            out.update({node.name: {"weight": node.inputs[1].name, "quant": q.name} for node, _ in users})
    return out


def _int_weight(node, linears: dict):
    """``node``'s weight when it is a linear whose weight intweight packed, else None."""
    w = node.inputs[1] if node.op == "linear" and len(node.inputs) > 1 else None
    return w if w is not None and w.name in linears and linears[w.name]["module"] == "intweight" else None


def kernel_hadamards(graph: Graph, target: Target) -> tuple[list[str], list[Fallback]]:
    """The ``hadamard`` nodes that :mod:`.kernels.hadamard` runs on ``target`` (its capability
    row, then the module's ``supports`` of the node's block), and a fallback naming each other one,
    which the op's reference kernel runs in torch."""
    names, fallbacks = [], []
    for node in graph.nodes:
        if node.op != "hadamard":
            continue
        block = node.attrs["block"]
        _, why = CAPABILITIES.find(node.op, "dense", target)
        if not why:
            module, why = kernel_module("hadamard")
            why = why or module.supports(block, target)
        if why:
            fallbacks.append(Fallback(node.name, f"hadamard of block {block} (node {node.name})",
                                      f"run by torch, the op's reference kernel (no Triton kernel takes it: {why})"))
        else:
            names.append(node.name)
    return names, fallbacks


def check_gpu(target: Target) -> None:
    """BackendError naming the file at fault unless ``target``'s TOML and its GPU architecture
    file hold everything the kernels read (SM count, tile candidates of every kernel family)."""
    from .kernels import KernelError
    from .kernels.common import gpu_target
    try:
        gpu_target(target)
    except KernelError as e:
        raise BackendError(f"triton backend, target {target.name}: {e}") from None


def lower_graph(graph: Graph, target: Target, files_out, toolchain: dict) -> Artifact:
    """Pack every linear weight a kernel takes into ``triton_weights.safetensors``, copy the
    kernel sources used into ``kernels/`` (both through ``files_out``, the bundle's
    :class:`~nnforge.bundle.format.ArtifactWriter`), list the ``hadamard`` nodes the kernel runs,
    and describe the rest of the graph for the launcher, which reads the bundle's graph and
    weights files."""
    from safetensors.torch import save_file
    cdt = compute_dtype(target)
    check_gpu(target)
    files = []
    fallbacks: list[Fallback] = []
    linears, packed = {}, {}
    used: set[str] = set()
    for wname, nodes in _linear_weights(graph).items():
        enc = graph.weights[wname].encoding
        cap, why = CAPABILITIES.find("linear", enc, target)
        if cap is None:
            fallbacks.append(Fallback(wname, f"{enc.describe()} weight of {', '.join(nodes)}",
                                      f"decoded to {cdt} dense at load, run by torch "
                                      f"(no Triton kernel takes it: {why})"))
            continue
        name = cap.accepts.module          # every row of an encoded kind names its kernel module
        try:
            pw = kernel_module(name)[0].pack(enc, target.name)
        except Exception as e:
            raise BackendError(f"triton backend: kernel {name} accepted weight {wname} ({enc.describe()}, used by "
                               f"{', '.join(nodes)}) but pack() failed: {type(e).__name__}: {e}") from e
        keys = {}
        for field, t in pw.tensors.items():
            keys[field] = f"{wname}.{field}"
            packed[keys[field]] = t.detach().contiguous().cpu()
        linears[wname] = {"module": name, "format": pw.format, "n": int(pw.n), "k": int(pw.k),
                          "meta": pw.meta, "tensors": keys}
        used.add(name)
    for wname, node in _other_encoded_uses(graph):
        enc, op = graph.weights[wname].encoding, graph.node(node).op
        why = "not its weight operand" if op == "linear" else CAPABILITIES.find(op, enc, target)[1]
        what = "matmul weight operand [in, out]" if op == "matmul" else f"{op} weight"
        fallbacks.append(Fallback(wname, f"{enc.describe()} {what} of node {node}",
                                  f"decoded to dense at load, run by torch ({why}: the kernels take linear "
                                  "weights only)"))
    if packed:
        save_file(packed, os.fspath(files_out.path(PACKED_FILE)), metadata={"producer": "nnforge triton backend"})
        files.append(PACKED_FILE)
    hadamards, torch_hadamards = kernel_hadamards(graph, target)
    if hadamards:                          # the bundle carries every kernel it runs, the rotation's too
        used.add("hadamard")
    int_linears = act_linears(graph, target, linears)
    if int_linears:
        used.add("intact")
    kernels = {}
    if used:
        package = importlib.import_module(KERNEL_PACKAGE)
        sources = {n: package if n == "__init__" else importlib.import_module(f"{KERNEL_PACKAGE}.{n}")
                   for n in SHARED_SOURCES}
        for n in sorted(used | {b for u in used for b in BORROWS.get(u, ())}):
            sources[n] = importlib.import_module(f"{KERNEL_PACKAGE}.{n}")
        for name, module in sources.items():
            rel = f"{KERNEL_DIR}/{name}.py"
            shutil.copyfile(module_source(module), files_out.path(rel))
            kernels[name] = {"file": rel, "sha256": sha256_of(files_out.path(rel)),
                             "format": getattr(module, "FORMAT", None)}
            files.append(rel)
    entry = {
        "graph": GRAPH_FILE, "weights": WEIGHTS_FILE, "packed": PACKED_FILE if packed else None,
        "target": target.name, "compute_capability": target.options.get("compute_capability"),
        "compute_dtype": cdt, "cuda_graphs": bool(target.options.get("cuda_graphs", True)),
        "inputs": [{"name": v.name, "dtype": v.dtype.name, "dims": list(v.shape)} for v in graph.inputs],
        "outputs": [v.name for v in graph.outputs],
        "kernels": kernels, "linears": linears, "fp8_linears": fp8_linears(graph, target, linears),
        "act_linears": int_linears,
        "hadamards": hadamards, "decoded": sorted({f.where for f in fallbacks}),
    }
    return Artifact(files=files, entry=entry, fallbacks=fallbacks + torch_hadamards, toolchain=toolchain)


__all__ = ["lower_graph", "sha256_of", "PACKED_FILE", "KERNEL_DIR", "KERNEL_PACKAGE", "fp8_linears", "act_linears",
           "kernel_hadamards", "GRAPH_FILE", "WEIGHTS_FILE"]

"""Reading a model into the IR: a torch module, an ExportedProgram, an IR graph, or a model file
(.onnx; with ``trust_code=True`` TorchScript, a pickled module or a .pt2 archive), with the
loading's safety checks (nothing is unpickled or run unless trusted; weights files are read
without running code), and the check that an imported torch model still computes what the module
does.

    >>> graph, source = import_model(module, (x,))
    >>> check_import(module, graph, (x,))["cosine_min"]
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import torch

from ..ir import Graph, Interpreter, sanitize_name
from ..numerics import FP32_TOLERANCE, compare, json_safe, within
from .errors import FrontendError


def as_tuple(inputs) -> tuple:
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs)
    return (inputs,)


# Model files nnforge reads, by suffix. Torch files are told apart by content: a TorchScript
# archive (code/ inside the zip), a pickle of an nn.Module, or weights only (a state dict).
TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".jit", ".torchscript"}
MODEL_FILES = ".onnx (ONNX), .pt2 (torch.export.save; trust_code=True), .pt/.pth/.bin/.ckpt/.pkl/.jit " \
              "(TorchScript or a pickled nn.Module; trust_code=True)"


def import_model(model, example_inputs, *, dynamic_shapes=None, input_names=None, output_names=None,
                 name=None, trust_code: bool = False, converters: dict | None = None) -> tuple[Graph, str]:
    """(IR graph, source kind) for a torch module, an ExportedProgram, a Graph, or a model file.

    A model file is an .onnx file, or with ``trust_code=True`` a file whose loading runs code: a
    TorchScript archive, a pickled nn.Module or a torch.export .pt2 archive. Without it these are
    refused before anything in them is unpickled or run (see :func:`read_torch_file`). ``converters``
    add or override the frontend's op converters (see ``nnforge.compile``)."""
    if isinstance(model, Graph):
        return model, "ir"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.suffix.lower() == ".onnx":
            from .onnx_import import from_onnx
            return from_onnx(path, name=name, output_names=output_names, converters=converters), "onnx"
        loaded, source = read_torch_file(path, trust_code=trust_code)
        program = _script_to_export(loaded, example_inputs, path) if source == "torchscript" else loaded
        graph, _ = import_model(program, example_inputs, dynamic_shapes=dynamic_shapes, input_names=input_names,
                                output_names=output_names, name=name or sanitize_name(path.stem),
                                converters=converters)
        if isinstance(loaded, torch.nn.Module):
            graph.meta["frontend_check"] = check_import(loaded, graph, as_tuple(example_inputs))
        return graph, source
    if isinstance(model, torch.export.ExportedProgram):
        from .torch_export import from_exported_program
        return from_exported_program(model, name=name or "model", input_names=input_names,
                                     output_names=output_names, dynamic_shapes=dynamic_shapes,
                                     converters=converters), "torch.export"
    if isinstance(model, torch.nn.Module):
        from .torch_export import from_torch
        return from_torch(model, as_tuple(example_inputs), dynamic_shapes=dynamic_shapes, input_names=input_names,
                          output_names=output_names, name=name, converters=converters), "torch"
    raise FrontendError(f"cannot compile a {type(model).__name__}: pass a torch.nn.Module, an ExportedProgram "
                        "or the path of a model file: " + MODEL_FILES)


def _torch_archive_kind(path: Path) -> str:
    """'torchscript', 'pt2' or 'pickle' (a torch.save zip or a plain pickle), from the zip's names."""
    if not zipfile.is_zipfile(path):
        return "pickle"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise FrontendError(f"{path}: not a readable torch file: {e}") from None
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("archive_format") or n.endswith("serialized_exported_program.json") for n in names):
        return "pt2"
    return "pickle"


def load_state_dict(path: str | os.PathLike) -> dict:
    """The tensors of a weights file, read without running code: safetensors, or a torch
    checkpoint through ``torch.load(weights_only=True)`` (a pickle that needs anything but tensors
    and plain containers is refused, naming what it asked for).

        >>> module.load_state_dict(load_state_dict("model.safetensors"))
    """
    path = Path(path)
    if not path.is_file():
        raise FrontendError(f"{path}: no such weights file")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(os.fspath(path))
        except (OSError, SafetensorError, ValueError) as e:
            raise FrontendError(f"{path}: cannot read tensors: {e}") from None
    if _torch_archive_kind(path) != "pickle":
        raise FrontendError(f"{path}: not a weights file (it holds a program); see nnforge.frontend.import_model")
    import pickle
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        wanted = _unsafe_globals(path, e)
        if not wanted:          # not a pickle at all, or one torch's reader does not parse
            reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
            raise FrontendError(f"{path}: not a readable torch checkpoint ({reason}); nnforge reads "
                                f"{MODEL_FILES}") from None
        raise FrontendError(f"{path}: refusing to unpickle: loading it calls {', '.join(wanted)}, which could run "
                            "code; nnforge reads torch checkpoints only with torch.load(weights_only=True) or "
                            "safetensors. If you trust this file, pass trust_code=True") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise FrontendError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                            f"nnforge reads {MODEL_FILES}") from None


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """What a refused pickle asks for, found without running it: torch's scan of a torch.save zip,
    the global named in torch's error, or the opcodes of a bare pickle."""
    try:
        from torch.serialization import get_unsafe_globals_in_checkpoint
        named = get_unsafe_globals_in_checkpoint(os.fspath(path))
    except Exception:           # not a torch.save zip
        named = re.findall(r"GLOBAL ([\w.]+)", str(error))
    if named:
        return sorted(set(named))
    # a bare pickle: read its opcodes (pickletools never executes them)
    import pickletools
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except Exception:
        allowed = set()
    names, strings = set(), []
    with open(path, "rb") as f:
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    names.add(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:
            pass
    return sorted(names - allowed)


def read_torch_file(path: Path, *, trust_code: bool = False):
    """(model, source) for a torch model file. TorchScript archives, .pt2 archives and pickled
    modules run code when loaded: refused unless ``trust_code=True``. A file of weights only is
    read safely (:func:`load_state_dict`) and refused as a model: weights need their module."""
    suffix = path.suffix.lower()
    if suffix not in TORCH_SUFFIXES | {".pt2", ".safetensors"}:
        raise FrontendError(f"{path}: not a model file nnforge reads; it reads {MODEL_FILES}")
    if not path.is_file():
        raise FrontendError(f"{path}: no such model file")
    kind = "safetensors" if suffix == ".safetensors" else "pt2" if suffix == ".pt2" else _torch_archive_kind(path)
    if kind in ("torchscript", "pt2") and not trust_code:
        what = "a TorchScript archive: it holds code that runs" if kind == "torchscript" else \
            "a torch.export archive: torch.export.load unpickles it"
        raise FrontendError(f"{path}: refusing {what} when it is loaded. If you trust this file, pass "
                            "trust_code=True; otherwise export the model to ONNX")
    if kind == "safetensors" or (kind == "pickle" and not trust_code):
        obj = load_state_dict(path)
    else:
        try:
            if kind == "torchscript":
                return torch.jit.load(os.fspath(path), map_location="cpu"), "torchscript"
            if kind == "pt2":
                return torch.export.load(os.fspath(path)), "torch.export"
            obj = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
        except Exception as e:
            raise FrontendError(f"{path}: cannot load this {kind} file: {type(e).__name__}: {str(e)[:300]}") from None
        if isinstance(obj, (torch.nn.Module, torch.export.ExportedProgram)):
            return obj, "torch"
    n = sum(isinstance(v, torch.Tensor) for v in obj.values()) if isinstance(obj, dict) else 0
    raise FrontendError(f"{path}: holds weights only ({type(obj).__name__} of {n} tensors), not a model: build "
                        "the module, call module.load_state_dict(nnforge.load_state_dict(path)) "
                        "and compile the module")


def _script_to_export(module, example_inputs, path: Path):
    """A TorchScript module as an ExportedProgram (torch's TorchScript converter)."""
    from torch._export.converter import TS2EPConverter
    try:
        return TS2EPConverter(module, as_tuple(example_inputs)).convert()
    except Exception as e:
        raise FrontendError(f"{path}: torch cannot convert this TorchScript module to an ExportedProgram: "
                            f"{type(e).__name__}: {str(e)[:300]}; export the model to ONNX instead") from None


def check_import(model, graph: Graph, inputs: tuple) -> dict:
    """The imported graph on the reference interpreter against the torch model itself."""
    if not isinstance(model, torch.nn.Module):
        return {}
    with torch.no_grad():
        want = model(*inputs)
    # torch.export flattens outputs as pytrees (tuples, dicts, transformers' ModelOutput), leaves in order
    want = torch.utils._pytree.tree_leaves(want)
    got = Interpreter(graph).run(*inputs)
    metrics = compare(got, want, nan_equal=True)        # reproducing the model's own NaN is right here
    if not within(metrics, FP32_TOLERANCE):
        raise FrontendError(f"{graph.name}: the imported graph disagrees with the torch model "
                            f"(cosine {metrics['cosine_min']:.6f} < {FP32_TOLERANCE['cosine_min']}); "
                            "this is an nnforge frontend bug, please report it")
    return json_safe(metrics)


__all__ = ["import_model", "load_state_dict", "read_torch_file", "check_import", "as_tuple", "MODEL_FILES",
           "TORCH_SUFFIXES"]

"""Reading a causal LM the user has: a transformers model object, a local model directory
(config.json, safetensors weights, tokenizer files) or a GGUF file. Nothing is downloaded.

    >>> config, weights, tokenizer, source = load_causal_lm("path/to/model")
    >>> weights["model.layers.0.self_attn.q_proj.weight"]      # read from disk on access

Weights come out under the names of the transformers module that ``AutoModelForCausalLM`` builds
for the config (what :class:`~.spec.WeightNames` refers to). Directory weights are read lazily from
the safetensors files (memory-mapped), so a large model is never held twice; pickled ``.bin``
checkpoints are refused, since loading them can run code (pass ``state_dict=`` to supply the
tensors yourself).
"""
from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import FrontendError
from .spec import KNOWN_FAMILIES, family_of, spec_from_config

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# any of these makes a directory's tokenizer present (transformers reads the rest beside them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
# checkpoint names older than the module names transformers builds today -> the module names
_RENAMES = ((re.compile(r"^language_model\.model\."), "model.language_model."),   # Gemma 3 multimodal
            (re.compile(r"^language_model\.lm_head\."), "lm_head."))
_BASE_PREFIXES = ("model.", "transformer.")      # a base model's checkpoint (GPT-2's own) lacks them


class LoadedCausalLM(NamedTuple):
    config: Any                          # the transformers config
    weights: Mapping[str, torch.Tensor]  # module name -> tensor (lazy for directories)
    tokenizer: Any | None                # None: none came with the model; the runner then takes token ids
    source: str                          # where it came from, for messages and the manifest


def load_causal_lm(source, *, state_dict: Mapping[str, torch.Tensor] | None = None,
                   trust_remote_code: bool = False) -> LoadedCausalLM:
    """(config, weights, tokenizer or None, source description) of a causal LM.

    ``source``: a transformers ``PreTrainedModel``; a model directory (config.json with
    model.safetensors or a sharded model.safetensors.index.json, and tokenizer files); or a .gguf
    file (read by transformers' GGUF loader, which dequantises it; needs the ``gguf`` and
    ``accelerate`` packages). ``state_dict``: with a directory, the tensors to use instead of its
    weight files (e.g. a pickled checkpoint you loaded yourself with ``torch.load(weights_only=True)``).

        >>> load_causal_lm(Path("gemma-3-270m-q4_k_m.gguf")).config.model_type
        'gemma3_text'
    """
    if isinstance(source, torch.nn.Module):
        return _from_module(source, trust_remote_code)
    if not isinstance(source, (str, os.PathLike)):
        raise FrontendError(f"cannot read a causal LM from a {type(source).__name__}: pass a transformers model, a "
                            "model directory or a .gguf file")
    path = Path(source)
    if not path.exists():
        raise FrontendError(f"{path}: no such file or directory (nnforge reads local models only; it downloads "
                            "nothing)")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _from_gguf(path, trust_remote_code)
        raise FrontendError(f"{path}: not a model nnforge reads as a causal LM; pass its directory (config.json, "
                            "*.safetensors, tokenizer files) or a .gguf file")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _from_gguf(ggufs[0], trust_remote_code)
        found = f"; it holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}): pass one" if ggufs else ""
        raise FrontendError(f"{path}: no config.json, so not a transformers model directory{found}")
    return _from_directory(path, state_dict, trust_remote_code)


# ---- a module object ---------------------------------------------------------------------------

def _from_module(model: torch.nn.Module, trust_remote_code: bool) -> LoadedCausalLM:
    from transformers import PreTrainedModel
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise FrontendError(f"{name} is not a transformers model: pass a transformers causal LM "
                            f"({KNOWN_FAMILIES}), a model directory or a .gguf file")
    config = model.config
    family_of(config, where=name)
    weights = _Copied(model.state_dict())
    _check_weights(config, weights, name)
    tokenizer, where = None, ""
    origin = Path(str(getattr(config, "_name_or_path", "") or ""))
    if str(origin) not in ("", ".") and origin.is_dir() and _tokenizer_files(origin):
        tokenizer, where = _read_tokenizer(origin, trust_remote_code), f", tokenizer from {origin}"
    return LoadedCausalLM(config, weights, tokenizer, f"transformers {name} object{where}")


# ---- a model directory -------------------------------------------------------------------------

def _from_directory(path: Path, state_dict, trust_remote_code: bool) -> LoadedCausalLM:
    config = _read_config(path, trust_remote_code)
    if state_dict is not None:
        weights, files = _Copied(_renamed(dict(state_dict), config)), "tensors passed as state_dict"
    else:
        weights = _safetensors_weights(path, config)
        files = f"{len(weights.files)} safetensors file(s)"
    _check_weights(config, weights, f"{path} ({files})")
    found = _tokenizer_files(path)
    tokenizer = _read_tokenizer(path, trust_remote_code) if found else None
    return LoadedCausalLM(config, weights, tokenizer,
                          f"{path} ({files}; tokenizer: {', '.join(found) if found else 'none'})")


def _read_config(path: Path, trust_remote_code: bool):
    config_file = path / "config.json"
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FrontendError(f"{config_file}: not a readable config ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise FrontendError(f"{config_file}: not a readable config (a JSON {type(raw).__name__}, not an object)")
    # the architecture is checked before transformers reads the file, so a model type transformers
    # does not know is reported as what it is
    family_of(_RawConfig(raw), where=str(config_file))
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:                      # transformers raises ValueError, KeyError, OSError, TypeError...
        raise FrontendError(f"{config_file}: transformers cannot read this config ({type(e).__name__}: "
                            f"{str(e)[:300]})") from None


class _RawConfig:
    """config.json's model_type and architectures, for family_of before transformers reads it."""

    def __init__(self, raw: dict):
        self.model_type = raw.get("model_type")
        self.architectures = raw.get("architectures")


def _safetensors_weights(path: Path, config) -> SafetensorsWeights:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise FrontendError(f"{index}: not a readable safetensors index ({type(e).__name__}: {e})") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise FrontendError(f"{index} lists shard(s) that are not there: {', '.join(missing)}")
        where = {key: (path / file, key) for key, file in weight_map.items()}
    elif (path / SAFETENSORS_FILE).is_file():
        file = path / SAFETENSORS_FILE
        where = {key: (file, key) for key in _safetensors_keys(file)}
    else:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise FrontendError(
                f"{path}: its weights are in {', '.join(pickles)}, a pickle whose loading can run code; nnforge reads "
                "weights as safetensors only. Convert them to model.safetensors, or load them yourself "
                "(torch.load(file, weights_only=True)) and pass state_dict= to load_causal_lm")
        raise FrontendError(f"{path}: no weights (no {SAFETENSORS_FILE} and no {SAFETENSORS_INDEX})")
    names = _canonical_names(where, _expected_keys(config))
    return SafetensorsWeights({name: where[key] for name, key in names.items()})


def _safetensors_keys(file: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(os.fspath(file), framework="pt") as f:
            return list(f.keys())
    except (OSError, SafetensorError, ValueError) as e:
        raise FrontendError(f"{file}: not a readable safetensors file ({e})") from None


class _ReadOnAccess(Mapping):
    """Module name -> tensor, each made by ``__getitem__`` when asked for; the names are the keys
    of ``self._names``."""
    _names: Mapping

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names


class SafetensorsWeights(_ReadOnAccess):
    """Module name -> tensor, read from safetensors files when asked for (safetensors memory-maps
    each file). Floating tensors come out as float32: a bfloat16 or float16 one is widened into a
    temporary file (:data:`WIDENED_DIR`, default the system's temporary directory) and mapped back,
    once, so a half-precision checkpoint is not held in memory at twice its size either."""

    def __init__(self, where: dict[str, tuple[Path, str]]):
        self._where = self._names = where
        self._open: dict[Path, Any] = {}
        self._widened: dict[str, torch.Tensor] = {}

    @property
    def files(self) -> list[Path]:
        return sorted({file for file, _ in self._where.values()})

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._widened:
            return self._widened[name]
        file, key = self._where[name]
        from safetensors import SafetensorError, safe_open
        try:
            if file not in self._open:
                self._open[file] = safe_open(os.fspath(file), framework="pt")
            t = self._open[file].get_tensor(key)
        except (OSError, SafetensorError, ValueError) as e:
            raise FrontendError(f"{file}: cannot read tensor {key} ({e})") from None
        if t.is_floating_point() and t.dtype != torch.float32:
            t = self._widened[name] = widened(t)
        return t


# where half-precision checkpoint tensors are widened to float32 files (None: tempfile's default)
WIDENED_DIR: str | None = os.environ.get("NNFORGE_WIDENED_DIR")
WIDEN_IN_MEMORY_BELOW = 1 << 20         # bytes of float32: smaller tensors are not worth a file


def widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32, in a file of its own mapped back privately and unlinked at once (its pages
    are the kernel's to drop and re-read; nothing written to them reaches the disk), written in
    chunks so that no float32 copy of the whole tensor is made in memory. Small tensors, or a
    directory that cannot take the file, give an ordinary copy."""
    import tempfile
    if t.numel() * 4 < WIDEN_IN_MEMORY_BELOW:
        return t.to(torch.float32)
    try:
        fd, name = tempfile.mkstemp(prefix="nnforge-widened-", suffix=".f32", dir=WIDENED_DIR)
    except OSError:
        return t.to(torch.float32)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in t.reshape(-1).split(1 << 22):
                f.write(memoryview(chunk.to(torch.float32).numpy()))
        out = torch.from_file(name, shared=False, size=t.numel(), dtype=torch.float32).reshape(t.shape)
    except OSError:                     # a full disk: the copy in memory, as without the file
        out = t.to(torch.float32)
    finally:
        try:
            os.unlink(name)
        except OSError:                 # (Windows keeps a mapped file; the temporary directory has it)
            pass
    return out


class _Copied(_ReadOnAccess):
    """Module name -> a float32 copy of the caller's tensor, made when asked for: the graph must not
    share memory with a module or state dict the caller may go on changing. (A checkpoint's
    tensors need no copy: safetensors maps its files privately, so the graph's weights stay pages
    of the file, and nothing written to them reaches it.)"""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._names = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._names[name].detach()
        return t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone()


def _expected_keys(config) -> set[str]:
    return set(spec_from_config(config).weight_keys())


def _canonical_names(keys, expected: set[str]) -> dict[str, str]:
    """module name -> checkpoint key. A key the decoder reads keeps its name; an older spelling of
    one (a base model's key without its prefix, Gemma 3's language_model.model.*) takes the module
    name; anything else keeps its own name."""
    names = {k: k for k in keys if k in expected}
    for key in keys:
        if key in expected:
            continue
        candidates = [pattern.sub(repl, key) for pattern, repl in _RENAMES] + [p + key for p in _BASE_PREFIXES]
        name = next((c for c in candidates if c in expected and c not in names), key)
        names.setdefault(name, key)
    return names


def _renamed(state_dict: dict, config) -> dict:
    return {name: state_dict[key] for name, key in _canonical_names(state_dict, _expected_keys(config)).items()}


def _check_weights(config, weights: Mapping, where: str) -> None:
    spec = spec_from_config(config)
    missing = [k for k in spec.weight_keys() if k not in weights]
    if missing:
        listed = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise FrontendError(f"{where}: {len(missing)} weight(s) the {spec.family} decoder needs are missing "
                            f"({listed}); nnforge reads the weights of a {spec.architecture}")


# ---- tokenizers ----------------------------------------------------------------------------------

def _tokenizer_files(path: Path) -> list[str]:
    return [name for name in TOKENIZER_FILES if (path / name).is_file()]


def _read_tokenizer(path: Path, trust_remote_code: bool, **kwargs):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code,
                                             **kwargs)
    except Exception as e:                      # transformers raises OSError, ValueError, TypeError...
        what = kwargs.get("gguf_file") or ", ".join(_tokenizer_files(path))
        raise FrontendError(f"{path}: transformers cannot read the tokenizer ({what}): {type(e).__name__}: "
                            f"{str(e)[:300]}") from None


# ---- a GGUF file ---------------------------------------------------------------------------------

def _from_gguf(path: Path, trust_remote_code: bool) -> LoadedCausalLM:
    import importlib.util
    lacking = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if lacking:
        raise FrontendError(f"{path}: reading a GGUF file needs the {' and '.join(lacking)} package(s): "
                            "pip install 'nnforge[models]'")
    has_tokenizer = _gguf_has_tokenizer(path)
    import transformers
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                     dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as e:                      # unsupported GGUF architectures are a ValueError, bad files vary
        raise FrontendError(f"{path}: transformers cannot load this GGUF file ({type(e).__name__}: "
                            f"{str(e)[:300]})") from None
    family_of(model.config, where=str(path))
    weights = model.state_dict()
    _check_weights(model.config, weights, str(path))
    tokenizer = _read_tokenizer(path.parent, trust_remote_code, gguf_file=path.name) if has_tokenizer else None
    return LoadedCausalLM(model.config, weights, tokenizer,
                          f"{path} (GGUF dequantised to float32 by transformers {transformers.__version__}; "
                          f"tokenizer: {'from the GGUF' if has_tokenizer else 'none'})")


def _gguf_has_tokenizer(path: Path) -> bool:
    try:
        return "tokenizer.ggml.tokens" in _gguf_keys(path, until="tokenizer.ggml.tokens")
    except (OSError, ValueError, struct.error) as e:
        raise FrontendError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


# GGUF metadata value types -> fixed sizes in bytes (8 is a string, 9 an array)
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_keys(path: Path, until: str | None = None) -> list[str]:
    """The metadata keys of a GGUF (v2/v3) file, read up to ``until``. gguf's GGUFReader would parse
    every value, the whole vocabulary among them, where this only steps over them."""
    with open(path, "rb") as f:
        def read(fmt: str):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def skip(kind: int) -> None:
            if kind == 8:
                f.seek(read("Q"), 1)
            elif kind == 9:
                item, count = read("I"), read("Q")
                if item in _GGUF_SIZES:
                    f.seek(count * _GGUF_SIZES[item], 1)
                else:
                    for _ in range(count):
                        skip(item)
            elif kind in _GGUF_SIZES:
                f.seek(_GGUF_SIZES[kind], 1)
            else:
                raise ValueError(f"unknown metadata value type {kind}")

        if f.read(4) != b"GGUF":
            raise ValueError("no GGUF magic number")
        version = read("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; transformers reads versions 2 and 3")
        read("Q")                                   # tensor count
        keys = []
        for _ in range(read("Q")):
            keys.append(f.read(read("Q")).decode("utf-8"))
            if keys[-1] == until:
                break
            skip(read("I"))
        return keys


__all__ = ["load_causal_lm", "LoadedCausalLM", "SafetensorsWeights", "TOKENIZER_FILES"]

"""The bundle: one directory per compile, with ``manifest.json``, the compressed graph
(``graph.json`` + ``weights.safetensors``), the backend's artifacts, and reference inputs/outputs.

The manifest records every other file's sha256 and size; :func:`verify` re-hashes them and names
every changed, missing or extra file. Writing goes to a temporary sibling directory that is
renamed into place, so a failed compile never leaves a half-written bundle. Loading executes no
code from a bundle except the native library of a CPU (tvm) bundle, which is its model: that file
is checked against the manifest's sha256 here and against the digest the backend recorded at
build time, and loaded from a private copy; as with any shared library, load such bundles only
from sources you trust. Any path that would leave the bundle directory is refused.

    >>> b = Bundle.open("bundles/minilm-onnx")
    >>> runner = b.load()
    >>> report = verify("bundles/minilm-onnx")
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "nnforge.bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"
REF_INPUTS = "reference/inputs.safetensors"
REF_EXPECTED = "reference/expected.safetensors"     # reference interpreter on the compressed graph
REF_FP32 = "reference/fp32.safetensors"             # the uncompressed model in fp32


class BundleError(ValueError):
    """A bundle is missing, malformed, tampered with, or unsafe; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel``, refusing absolute paths, ``..``, and symlinks anywhere on the way."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\\" in rel or ":" in rel:
        raise BundleError(f"bundle {root}: refusing file path {rel!r} (must be a plain relative path)")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"bundle {root}: refusing file path {rel!r} (escapes the bundle directory)")
    path = root
    for p in parts:
        path = path / p
        if path.is_symlink():
            raise BundleError(f"bundle {root}: refusing {rel!r}: {path.name} is a symbolic link")
    resolved_root = root.resolve()
    if resolved_root not in path.resolve().parents:
        raise BundleError(f"bundle {root}: refusing file path {rel!r} (resolves outside the bundle)")
    return path


def list_files(root: Path) -> list[str]:
    """Every file under ``root`` except the manifest, as relative posix paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def file_table(root: Path) -> dict[str, dict]:
    return {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size} for rel in list_files(root)}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.fspath(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(os.fspath(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise BundleError(f"{path}: cannot read tensors: {e}") from None


def ordered(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    """Tensors saved as prefix0, prefix1, ... back in order."""
    keys = sorted((k for k in tensors if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))
    return [tensors[k] for k in keys]


def _is_bundle(root: Path) -> bool:
    try:
        read_manifest(root)
    except BundleError:
        return False
    return True


class BundleWriter:
    """Context manager that builds a bundle in a temporary sibling directory and renames it into
    place on success; on any error the temporary directory is removed."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.out.is_symlink():
            raise BundleError(f"refusing to write bundle to {self.out}: it is a symbolic link")
        if self.out.exists() and (not self.out.is_dir() or (any(self.out.iterdir()) and not _is_bundle(self.out))):
            raise BundleError(f"refusing to overwrite {self.out}: it exists and is not an nnforge bundle")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.rename(self.out, old / "b")
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def write_manifest(root: Path, manifest: dict) -> dict:
    """Fill in the file table (every file but the manifest) and write manifest.json."""
    manifest = dict(manifest)
    manifest["files"] = file_table(root)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle directory")
    mpath = root / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        raise BundleError(f"{root}: missing {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{mpath}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not an nnforge bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format version {manifest.get('format_version')!r}; "
                          f"this nnforge reads version {FORMAT_VERSION}")
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{mpath}: manifest has no file table")
    for rel in manifest["files"]:
        safe_join(root, rel)
    return root, manifest


def check_files(root: Path, manifest: dict) -> list[str]:
    """Every changed, missing or extra file, as messages naming it."""
    problems = []
    recorded = manifest["files"]
    present = set(list_files(root))
    for rel, info in sorted(recorded.items()):
        path = safe_join(root, rel)
        if rel not in present or not path.is_file():
            problems.append(f"missing file {rel}")
            continue
        size = path.stat().st_size
        if size != info.get("size"):
            problems.append(f"changed file {rel} (size {size}, manifest says {info.get('size')})")
        elif sha256_file(path) != info.get("sha256"):
            problems.append(f"changed file {rel} (sha256 differs from the manifest)")
    for rel in sorted(present - set(recorded)):
        problems.append(f"extra file {rel} (not in the manifest)")
    return problems


@dataclass
class Bundle:
    path: Path
    manifest: dict = field(repr=False)

    @classmethod
    def open(cls, path: str | Path, *, check: bool = True) -> "Bundle":
        root, manifest = read_manifest(path)
        if check:
            problems = check_files(root, manifest)
            if problems:
                raise BundleError(f"bundle {root} failed its integrity check: " + "; ".join(problems))
        return cls(root, manifest)

    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def size_bytes(self) -> int:
        return sum(f["size"] for f in self.manifest["files"].values())

    @property
    def deploy_bytes(self) -> int:
        """Bytes a deployment needs: the backend's artifacts and the weights they read."""
        need = set(self.manifest["backend"].get("files", [])) | {WEIGHTS_FILE}
        return sum(f["size"] for rel, f in self.manifest["files"].items() if rel in need)

    def load(self, device: str | None = None):
        """A runner for this bundle (numpy in -> numpy out, torch in -> torch out)."""
        from .backends.base import get_backend
        from .targets import get_target
        target = get_target(self.target)
        ok, why = target.can_run()
        if not ok:
            raise BundleError(f"bundle {self.path} is for target {self.target}, which cannot run on this machine: {why}")
        backend = get_backend(self.manifest["backend"]["name"])
        for rel in self.manifest["backend"].get("files", []):
            safe_join(self.path, rel)
        return backend.load(self.path, self.manifest["backend"]["entry"], device)

    def graph(self):
        from .ir import load_graph
        return load_graph(safe_join(self.path, GRAPH_FILE), safe_join(self.path, WEIGHTS_FILE))

    def reference(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(inputs, expected outputs of the compressed graph, fp32 reference outputs)."""
        ins = ordered(load_tensors(safe_join(self.path, REF_INPUTS)), "input")
        exp = ordered(load_tensors(safe_join(self.path, REF_EXPECTED)), "output")
        fp32 = ordered(load_tensors(safe_join(self.path, REF_FP32)), "output")
        return ins, exp, fp32

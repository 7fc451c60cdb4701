"""The bundle: one directory per compile, with ``manifest.json``, the compressed graph
(``graph.json`` + ``weights.safetensors``), the backend's artifacts, and reference inputs/outputs.

The manifest records every other file's sha256 and size; :func:`verify` re-hashes them and names
every changed, missing or extra file. Writing goes to a temporary sibling directory that is
renamed into place, so a failed compile never leaves a half-written bundle. Loading executes no
code from a bundle except the native library of a CPU (tvm) bundle, which is its model: that file
is checked against the manifest's sha256 here and against the digest the backend recorded at
build time, and loaded from a private copy; as with any shared library, load such bundles only
from sources you trust. Any path that would leave the bundle directory is refused.

A bundle is refused when it was written by a newer nnforge, when its backend's runtime on this
machine is not one its artifacts work with (:data:`RUNTIMES`), or when it is loaded as a bundle
for another target; each message gives both versions (or both targets). ``manifest.sig`` (see
:mod:`nnforge.signing`) is an Ed25519 signature of ``manifest.json``, which holds every other
file's sha256. :func:`pack` and :func:`extract` move a bundle as one .tar, .tar.gz or .zip file;
extraction checks every entry before it writes anything.

    >>> b = Bundle.open("bundles/minilm-onnx")
    >>> runner = b.load()
    >>> pack(b.path, "minilm-onnx.tar.gz")
    >>> extract("minilm-onnx.tar.gz", "elsewhere/minilm-onnx")
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "nnforge.bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"                          # optional, written by nnforge.signing.sign
MAX_MANIFEST_BYTES = 1 << 26
ARCHIVE_LIMIT = 1 << 36                             # bytes an archive may unpack to (64 GiB)
GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"
REF_INPUTS = "reference/inputs.safetensors"
REF_EXPECTED = "reference/expected.safetensors"     # reference interpreter on the compressed graph
REF_FP32 = "reference/fp32.safetensors"             # the uncompressed model in fp32
REF_HELD_OUT = "reference/held_out.safetensors"     # further held-out batches and their fp32 outputs


class BundleError(ValueError):
    """A bundle is missing, malformed, tampered with, or unsafe; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_rel(root: Path, rel) -> str:
    """``rel`` if it is a plain relative path that stays inside ``root``: no absolute path, drive,
    backslash, ``.`` or ``..`` component. Only the string is checked (see :func:`safe_join`)."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\\" in rel or ":" in rel:
        raise BundleError(f"bundle {root}: refusing file path {rel!r} (must be a plain relative path)")
    if any(p in ("", ".", "..") for p in rel.split("/")):
        raise BundleError(f"bundle {root}: refusing file path {rel!r} (escapes the bundle directory)")
    return rel


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel``, refusing absolute paths, ``..``, and symlinks anywhere on the way."""
    check_rel(root, rel)
    path = root
    for p in rel.split("/"):
        path = path / p
        if path.is_symlink():
            raise BundleError(f"bundle {root}: refusing {rel!r}: {path.name} is a symbolic link")
    resolved_root = root.resolve()
    if resolved_root not in path.resolve().parents:
        raise BundleError(f"bundle {root}: refusing file path {rel!r} (resolves outside the bundle)")
    return path


def list_files(root: Path) -> list[str]:
    """Every file under ``root`` except the manifest and its signature, as relative posix paths
    (a symbolic link is listed, never followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel not in (MANIFEST, SIGNATURE):
                out.append(rel)
    return sorted(out)


def file_table(root: Path) -> dict[str, dict]:
    return {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size} for rel in list_files(root)}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Tensors sharing storage (a graph returning one value twice, or a view of another output)
    are copied: safetensors refuses to write shared storage."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    save_file(out, os.fspath(path))


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


def load_inputs(path: Path, names: list[str]) -> list[torch.Tensor]:
    """Inputs saved under the model's input names (as ``nnforge run --inputs`` reads them); bundles
    written before that keep them as input0, input1, ..."""
    tensors = load_tensors(path)
    if all(n in tensors for n in names):
        return [tensors[n] for n in names]
    old = ordered(tensors, "input")
    if len(old) != len(names):
        raise BundleError(f"{path}: holds {', '.join(sorted(tensors)) or 'nothing'}, not the inputs "
                          f"{', '.join(names)}")
    return old


def _is_bundle(root: Path) -> bool:
    """Whether ``root`` holds an nnforge manifest (of any version): only such a directory may be
    replaced by a new bundle."""
    try:
        manifest = json.loads(_read_manifest_bytes(root))
    except (BundleError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_out(out: Path) -> None:
    """Refuse an output path that a bundle must not replace: a symbolic link (never followed), a
    file, or a non-empty directory without an nnforge manifest."""
    if out.is_symlink():
        raise BundleError(f"refusing to write bundle to {out}: it is a symbolic link (remove the link or "
                          "choose another output directory)")
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleError(f"refusing to overwrite {out}: it exists and is not an nnforge bundle (it is a file): "
                          "remove it or choose another output directory")
    if any(out.iterdir()) and not _is_bundle(out):
        raise BundleError(f"refusing to overwrite {out}: it exists and is not an nnforge bundle (a directory "
                          "with no nnforge manifest.json): choose another output directory, or empty this one")


class BundleWriter:
    """Context manager that builds a bundle in a temporary sibling directory and renames it into
    place on success; on any error (the rename included) the temporary directory is removed and
    whatever was at ``out`` before is left as it was. ``out`` is claimed for the duration
    (:func:`nnforge.bundle_out.claim_out`: checked, locked against a second writer, cleared of a
    killed compile's leftovers); a compile that claims it earlier keeps that claim. A symbolic
    link at ``out`` is refused, both on entry and again just before the rename, and is never
    followed. An OSError raised while writing (a full disk) is given ``out`` as its file name when
    it names none, so the error says which bundle failed."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.tmp: Path | None = None
        self._claim = None

    def __enter__(self) -> Path:
        from .bundle_out import claim_out       # it builds on this module
        claim = claim_out(self.out)
        claim.__enter__()
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        except BaseException:
            claim.__exit__(None, None, None)
            raise
        self._claim = claim
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                try:
                    self._commit()
                except BaseException:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    raise
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if isinstance(exc, OSError) and exc.filename is None:
                    exc.filename = str(self.out)
        finally:
            self._claim.__exit__(None, None, None)
        return False

    def _commit(self) -> None:
        check_out(self.out)         # again: something may have been planted there meanwhile
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            try:
                os.rename(self.out, old / "b")
            except OSError as e:
                old.rmdir()
                raise BundleError(f"cannot replace the bundle at {self.out}: {e}") from None
        try:
            os.rename(self.tmp, self.out)
        except OSError as e:
            if old is not None:
                os.rename(old / "b", self.out)
                shutil.rmtree(old, ignore_errors=True)
            raise BundleError(f"cannot move the new bundle into {self.out}: {e}") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)      # rmtree removes links, never what they point to


def write_manifest(root: Path, manifest: dict) -> dict:
    """Fill in the file table (every file but the manifest) and write manifest.json."""
    manifest = dict(manifest)
    manifest["files"] = file_table(root)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


# --- versions -------------------------------------------------------------------------------------
def _series(version) -> tuple[int, ...] | None:
    """The part of a version that must not be newer than ours: the major version, or major.minor
    before 1.0 (0.2 may break what 0.1 reads)."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if not m:
        return None
    major, minor = int(m[1]), int(m[2])
    return (major,) if major else (0, minor)


def check_versions(mpath: Path, manifest: dict) -> None:
    """Refuse a manifest of another format version or written by a newer nnforge series."""
    from . import __version__ as ours
    theirs = manifest.get("nnforge_version")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format version {manifest.get('format_version')!r} (written by nnforge "
                          f"{theirs}); this nnforge {ours} reads format version {FORMAT_VERSION}")
    series = _series(theirs)
    if series is None:
        raise BundleError(f"{mpath}: manifest has no readable nnforge_version ({theirs!r}); this is nnforge {ours}")
    if series > _series(ours):
        raise BundleError(f"{mpath}: bundle written by nnforge {theirs}, newer than this nnforge {ours}: "
                          f"upgrade nnforge to {'.'.join(map(str, series))}.x to load it")


# runtime package a backend records in its toolchain -> (installed distribution, how many leading
# version numbers must agree). A tvm library is native code built against its runtime's ABI and
# Triton kernels follow its language, so both need the same major.minor; ONNX Runtime and Core ML
# read older files within a major version.
RUNTIMES = {"onnxruntime": ("onnxruntime", 1), "coremltools": ("coremltools", 1),
            "tvm": ("apache-tvm", 2), "triton": ("triton", 2)}


def runtime_problems(manifest: dict) -> list[str]:
    """Each runtime that built this bundle and is installed here in a version it does not work
    with, naming both versions (a runtime that is absent is for ``Target.can_run`` to report)."""
    from importlib.metadata import PackageNotFoundError, version
    problems = []
    for key, theirs in sorted((manifest.get("backend", {}).get("toolchain") or {}).items()):
        if key not in RUNTIMES:
            continue
        dist, n = RUNTIMES[key]
        try:
            ours = version(dist)
        except PackageNotFoundError:
            continue
        want, have = re.findall(r"\d+", str(theirs))[:n], re.findall(r"\d+", ours)[:n]
        if want != have:
            need = ".".join(want) + ".x" if want else str(theirs)
            problems.append(f"built with {key} {theirs}, but this machine has {key} {ours}: install {key} {need} "
                            "or recompile the bundle here")
    return problems


def _read_manifest_bytes(root: Path) -> bytes:
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle directory")
    mpath = root / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        raise BundleError(f"{root}: missing {MANIFEST}")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath}: {mpath.stat().st_size} bytes, more than a manifest can be "
                          f"({MAX_MANIFEST_BYTES})")
    return mpath.read_bytes()


def read_manifest(path: str | Path, *, key=None) -> tuple[Path, dict]:
    """(root, manifest) of the bundle at ``path``. With ``key`` (an Ed25519 public key, see
    :mod:`nnforge.signing`) the manifest's signature is checked on the same bytes that are parsed."""
    root = Path(path)
    data = _read_manifest_bytes(root)
    mpath = root / MANIFEST
    if key is not None:
        from .signing import check_signature
        check_signature(root, data, key)
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise BundleError(f"{mpath}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not an nnforge bundle manifest")
    check_versions(mpath, manifest)
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{mpath}: manifest has no file table")
    for rel in manifest["files"]:
        check_rel(root, rel)
    return root, manifest


def check_files(root: Path, manifest: dict) -> list[str]:
    """Every changed, missing, extra or unsafe (symbolic link) file, as messages naming it."""
    problems = []
    recorded = manifest["files"]
    present = set(list_files(root))
    for rel, info in sorted(recorded.items()):
        try:
            path = safe_join(root, rel)
        except BundleError as e:
            problems.append(f"unsafe file {rel} ({str(e).split(': ', 1)[-1]})")
            continue
        if rel not in present or not path.is_file():
            problems.append(f"missing file {rel}")
            continue
        info = info if isinstance(info, dict) else {}
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
    def open(cls, path: str | Path, *, check: bool = True, key=None) -> "Bundle":
        """The bundle at ``path``, its files checked against the manifest (and, with ``key``, the
        manifest against its signature)."""
        root, manifest = read_manifest(path, key=key)
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

    def load(self, device: str | None = None, *, target: str | None = None):
        """A runner for this bundle (numpy in -> numpy out, torch in -> torch out). With ``target``,
        a bundle built for another target is refused."""
        from .backends.base import get_backend
        from .targets import get_target
        if target is not None and target != self.target:
            raise BundleError(f"bundle {self.path} was built for target {self.target}, not {target}: "
                              f"compile it for {target}")
        tgt = get_target(self.target)
        ok, why = tgt.can_run()
        if not ok:
            raise BundleError(f"bundle {self.path} is for target {self.target}, which cannot run on this machine: {why}")
        built_by = self.manifest["backend"]["name"]
        if built_by != tgt.backend:
            raise BundleError(f"bundle {self.path}: its artifacts are from the {built_by} backend, but target "
                              f"{self.target} runs on the {tgt.backend} backend")
        problems = runtime_problems(self.manifest)
        if problems:
            raise BundleError(f"bundle {self.path} cannot be loaded here: " + "; ".join(problems))
        backend = get_backend(built_by)
        for rel in self.manifest["backend"].get("files", []):
            safe_join(self.path, rel)
        return backend.load(self.path, self.manifest["backend"]["entry"], device)

    def graph(self):
        from .ir import load_graph
        return load_graph(safe_join(self.path, GRAPH_FILE), safe_join(self.path, WEIGHTS_FILE))

    def reference(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(inputs, expected outputs of the compressed graph, fp32 reference outputs)."""
        ins = load_inputs(safe_join(self.path, REF_INPUTS), [i["name"] for i in self.manifest["signature"]["inputs"]])
        exp = ordered(load_tensors(safe_join(self.path, REF_EXPECTED)), "output")
        fp32 = ordered(load_tensors(safe_join(self.path, REF_FP32)), "output")
        return ins, exp, fp32

    def held_out(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """(inputs, fp32 outputs) of every held-out batch, the reference batch first: what the
        manifest's fidelity figures were measured on."""
        ins, _, fp32 = self.reference()
        out = [(ins, fp32)]
        path = self.path / REF_HELD_OUT
        if REF_HELD_OUT in self.manifest.get("files", {}) or path.exists():
            extra = load_tensors(safe_join(self.path, REF_HELD_OUT))
            batches = sorted({int(k.split("/", 1)[0]) for k in extra})
            for b in batches:
                out.append((ordered({k.split("/", 1)[1]: v for k, v in extra.items() if k.startswith(f"{b}/")}, "input"),
                            ordered({k.split("/", 1)[1]: v for k, v in extra.items() if k.startswith(f"{b}/")}, "fp32")))
        return out


# --- archives -------------------------------------------------------------------------------------
def pack(path: str | Path, archive: str | Path) -> Path:
    """Write the bundle at ``path`` (checked first) into one .tar, .tar.gz/.tgz or .zip file
    holding its manifest, signature (if any) and recorded files at the top level.

        >>> pack("bundles/mlp-onnx", "mlp-onnx.tar.gz")
    """
    b = Bundle.open(path)
    archive = Path(archive)
    name = archive.name.lower()
    kind = "zip" if name.endswith(".zip") else "w:gz" if name.endswith((".tar.gz", ".tgz")) else \
        "w" if name.endswith(".tar") else None
    if kind is None:
        raise BundleError(f"{archive}: a bundle archive must end in .tar, .tar.gz, .tgz or .zip")
    rels = [MANIFEST] + ([SIGNATURE] if (b.path / SIGNATURE).is_file() else []) + sorted(b.manifest["files"])
    fd, tmp = tempfile.mkstemp(prefix=f".{archive.name}.tmp-", dir=archive.parent)
    os.close(fd)
    try:
        if kind == "zip":
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for rel in rels:
                    z.write(safe_join(b.path, rel), rel)
        else:
            with tarfile.open(tmp, kind) as t:
                for rel in rels:
                    t.add(safe_join(b.path, rel), rel, recursive=False)
        os.replace(tmp, archive)          # replaces a link at ``archive`` itself, never its target
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return archive


@contextmanager
def _archive_members(archive: Path):
    """Yield [(name, kind, size, open)] for every entry of a zip or tar archive; kind is one of
    file, dir, symlink, hardlink, device or fifo, other."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            out = []
            for info in z.infolist():
                mode = info.external_attr >> 16
                kind = ("dir" if info.is_dir() else "symlink" if stat.S_ISLNK(mode) else
                        "file" if not stat.S_IFMT(mode) or stat.S_ISREG(mode) else "device or fifo")
                out.append((info.filename, kind, info.file_size, lambda i=info: z.open(i)))
            yield out
        return
    try:
        t = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"{archive}: not a .tar, .tar.gz or .zip archive: {e}") from None
    with t:
        out = []
        for m in t.getmembers():
            kind = ("file" if m.isreg() else "dir" if m.isdir() else "symlink" if m.issym() else
                    "hardlink" if m.islnk() else "device or fifo" if (m.isdev()) else "other")
            out.append((m.name, kind, m.size, lambda m=m: t.extractfile(m)))
        yield out


def extract(archive: str | Path, dest: str | Path, *, key=None, max_bytes: int = ARCHIVE_LIMIT) -> Bundle:
    """Unpack a bundle archive (.tar, .tar.gz or .zip; made by :func:`pack` or holding one
    top-level bundle directory) into ``dest`` and check it against its manifest (and, with
    ``key``, its signature). Every entry is checked before anything is written: an absolute name,
    a ``..`` component, a symbolic or hard link, a device or fifo, a duplicate name, or more than
    ``max_bytes`` in all is refused, naming the entry. ``dest`` is written like a compile's output:
    all or nothing.

        >>> extract("mlp-onnx.tar.gz", "bundles/mlp-onnx").load()
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise BundleError(f"{archive}: no such archive")
    with _archive_members(archive) as members:
        files, seen, total = [], set(), 0
        for name, kind, size, opener in members:
            rel = name
            while rel.startswith("./"):
                rel = rel[2:]
            rel = rel.rstrip("/") if kind == "dir" else rel
            if not rel:
                continue
            if rel.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", rel):
                raise BundleError(f"{archive}: refusing entry {name!r}: absolute path")
            if any(p in ("..", ".", "") for p in rel.replace("\\", "/").split("/")) or "\\" in rel:
                raise BundleError(f"{archive}: refusing entry {name!r}: escapes the bundle directory ('..')")
            if kind not in ("file", "dir"):
                raise BundleError(f"{archive}: refusing entry {name!r}: it is a {kind}, and a bundle holds "
                                  "only plain files")
            if rel in seen:
                raise BundleError(f"{archive}: refusing entry {name!r}: it appears twice")
            seen.add(rel)
            total += size
            if total > max_bytes:
                raise BundleError(f"{archive}: unpacks to more than {max_bytes} bytes (at entry {name!r}); "
                                  "pass max_bytes= to allow it")
            if kind == "file":
                files.append((rel, size, opener))
        names = {rel for rel, _, _ in files}
        prefix = ""
        if MANIFEST not in names:
            tops = {rel.split("/", 1)[0] for rel in seen}
            if len(tops) != 1 or f"{next(iter(tops))}/{MANIFEST}" not in names:
                raise BundleError(f"{archive}: no {MANIFEST} at the top level or in a single top-level directory")
            prefix = next(iter(tops)) + "/"
        with BundleWriter(dest) as tmp:
            written = 0
            for rel, size, opener in files:
                path = tmp / rel[len(prefix):]
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as out, opener() as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        written += len(chunk)
                        if written > max_bytes:
                            raise BundleError(f"{archive}: entry {rel!r} unpacks to more than its recorded size "
                                              f"allows ({max_bytes} bytes in all)")
                        out.write(chunk)
            root, manifest = read_manifest(tmp, key=key)
            problems = check_files(root, manifest)
            if problems:
                raise BundleError(f"{archive}: the unpacked bundle fails its integrity check: " + "; ".join(problems))
    return Bundle(dest, manifest)

"""The bundle format: file names, the manifest and its file table, checksums, safe paths, tensor
files, and the writer that builds a bundle in a temporary sibling directory and renames it into
place. It imports no backend: backends and the pipeline write through it, and
:mod:`nnforge.bundle.store` (opening, verifying, packing) reads through it.

A bundle is one directory per compile: ``manifest.json`` (every other file's sha256 and size),
the compressed graph (``graph.json`` + ``weights.safetensors``), the backend's artifacts, and
reference inputs/outputs. Writing never leaves a half-written bundle: :class:`BundleWriter` claims
the output first (:class:`claim_out`: checked, locked against a second writer, cleared of a
killed compile's leftovers) and renames the finished directory into place.

    >>> with BundleWriter("bundles/mlp-onnx") as tmp:
    ...     save_tensors(tmp / REF_INPUTS, {"x": x})
    ...     write_manifest(tmp, manifest)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from ..errors import NnforgeError

FORMAT = "nnforge.bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"                          # optional, written by nnforge.bundle.signing.sign
MAX_MANIFEST_BYTES = 1 << 26
ARCHIVE_LIMIT = 1 << 36                             # bytes an archive may unpack to (64 GiB)
GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.safetensors"
REF_INPUTS = "reference/inputs.safetensors"
REF_EXPECTED = "reference/expected.safetensors"     # reference interpreter on the compressed graph
REF_FP32 = "reference/fp32.safetensors"             # the uncompressed model in fp32
REF_HELD_OUT = "reference/held_out.safetensors"     # further held-out batches and their fp32 outputs
TOKENIZER_DIR = "tokenizer"                          # a decoder's tokenizer (transformers' save_pretrained files)


class BundleError(NnforgeError, ValueError):
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


SHAPE_KEY = "nnforge.shape."     # metadata: the full shape of a tensor stored as its zero_tail box


def zero_tail(t: torch.Tensor) -> torch.Tensor:
    """The smallest box of ``t`` from index 0 on every axis that holds all its nonzero values, as a
    copy (``t`` itself when that is all of it): the slots of a decoder's KV cache a check's few
    tokens wrote, out of ``max_len``. Everything outside the box is zero."""
    t = torch.as_tensor(t)
    if t.dim() == 0 or t.numel() == 0:
        return t
    nonzero = t.ne(0)
    box = []
    for axis in range(t.dim()):
        along = nonzero.flatten(0, axis - 1).any(0) if axis else nonzero
        along = along.flatten(1).any(1) if along.dim() > 1 else along
        hits = along.nonzero()
        box.append(int(hits[-1]) + 1 if hits.numel() else 0)
    if box == list(t.shape):
        return t
    return t[tuple(slice(0, n) for n in box)].clone()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]] | None = None) -> None:
    """Tensors sharing storage (a graph returning one value twice, or a view of another output)
    are copied: safetensors refuses to write shared storage. ``shapes``: the full shape of each
    tensor given as its :func:`zero_tail` box, kept in the file's metadata so that
    :func:`load_tensors` pads it back with zeros."""
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
    meta = {SHAPE_KEY + k: ",".join(str(int(n)) for n in shape) for k, shape in (shapes or {}).items()
            if list(shape) != list(out[k].shape)}
    save_file(out, os.fspath(path), metadata=meta or None)


def tail_trimmed(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """(each tensor as its :func:`zero_tail` box, the full shapes): what :func:`save_tensors`
    takes to store reference tensors that are mostly zero padding."""
    return {k: zero_tail(v) for k, v in tensors.items()}, {k: list(torch.as_tensor(v).shape) for k, v in tensors.items()}


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    try:
        tensors = load_file(os.fspath(path))
        with safe_open(os.fspath(path), "pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError, ValueError) as e:
        raise BundleError(f"{path}: cannot read tensors: {e}") from None
    for key, text in meta.items():
        name = key[len(SHAPE_KEY):]
        if not key.startswith(SHAPE_KEY) or name not in tensors:
            continue
        box = tensors[name]
        try:
            shape = [int(n) for n in text.split(",")]
        except ValueError:
            shape = None
        if shape is None or len(shape) != box.dim() or any(b > n for b, n in zip(box.shape, shape)):
            raise BundleError(f"{path}: tensor {name} of shape {list(box.shape)} does not fit the full shape "
                              f"{text!r} its metadata records")
        full = torch.zeros(shape, dtype=box.dtype)
        full[tuple(slice(0, n) for n in box.shape)] = box
        tensors[name] = full
    return tensors


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


def is_bundle(root: Path) -> bool:
    """Whether ``root`` holds an nnforge manifest (of any version): only such a directory may be
    replaced by a new bundle."""
    try:
        manifest = json.loads(read_manifest_bytes(root))
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
    if any(out.iterdir()) and not is_bundle(out):
        raise BundleError(f"refusing to overwrite {out}: it exists and is not an nnforge bundle (a directory "
                          "with no nnforge manifest.json): choose another output directory, or empty this one")


class BundleWriter:
    """Context manager that builds a bundle in a temporary sibling directory and renames it into
    place on success; on any error (the rename included) the temporary directory is removed and
    whatever was at ``out`` before is left as it was. ``out`` is claimed for the duration
    (:class:`claim_out`: checked, locked against a second writer, cleared of a
    killed compile's leftovers); a compile that claims it earlier keeps that claim. A symbolic
    link at ``out`` is refused, both on entry and again just before the rename, and is never
    followed. An OSError raised while writing (a full disk) is given ``out`` as its file name when
    it names none, so the error says which bundle failed."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.tmp: Path | None = None
        self._claim = None

    def __enter__(self) -> Path:
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
def read_manifest_bytes(root: Path) -> bytes:
    """The bytes of ``root``'s manifest, refused when it is missing, a link, or absurdly large."""
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle directory")
    mpath = root / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        raise BundleError(f"{root}: missing {MANIFEST}")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath}: {mpath.stat().st_size} bytes, more than a manifest can be "
                          f"({MAX_MANIFEST_BYTES})")
    return mpath.read_bytes()


def parse_manifest(root: Path, data: bytes) -> dict:
    """The manifest ``data`` of the bundle at ``root`` as a dict, refused unless it is an nnforge
    manifest with a file table of plain relative paths (its versions are the reader's business:
    :func:`nnforge.bundle.store.read_manifest`)."""
    mpath = root / MANIFEST
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise BundleError(f"{mpath}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not an nnforge bundle manifest")
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{mpath}: manifest has no file table")
    for rel in manifest["files"]:
        check_rel(root, rel)
    return manifest


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



try:
    import fcntl
except ImportError:         # not POSIX: outputs are checked and cleaned, but not locked
    fcntl = None

_held = threading.local()   # this thread's claims: lock path -> [fd, depth]


def _check_parent(out: Path) -> None:
    """The nearest existing ancestor of ``out`` must be a directory this process may write in."""
    anc = out.parent
    while not anc.exists() and not anc.is_symlink() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise BundleError(f"cannot write a bundle to {out}: {anc} is not a directory; choose another output "
                          "directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise BundleError(f"cannot write a bundle to {out}: {anc} is not writable (no write permission, or a "
                          "read-only file system); choose another output directory or make it writable")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"cannot write a bundle to {out}: cannot create {out.parent}: {e.strerror or e}") from None


def _lock(out: Path, lock: Path) -> int | None:
    """An open descriptor of ``lock``, exclusively flocked; a BundleError naming the holder's pid
    if another process (or thread) holds it."""
    if fcntl is None:
        return None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise BundleError(f"cannot write a bundle to {out}: cannot create its lock file {lock}: "
                              f"{e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BundleError(f"another nnforge compile (pid {pid}) is writing a bundle to {out}: wait for it to "
                              f"finish or choose another output directory (lock file {lock})") from None
        # the previous holder unlinks the file before it unlocks: a lock on an unlinked (or since
        # replaced) file guards nothing, so open the path again
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _clear_leftovers(out: Path) -> None:
    """Remove the hidden temporary siblings of a killed compile to ``out`` (we hold its lock, so
    none is in use); an old bundle set aside by a commit killed before its second rename goes back."""
    # exactly the names BundleWriter makes (tempfile: 8 characters), so a bundle called
    # "NAME.tmp-x" next to "NAME" keeps its own temporary directory
    leftover = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    for p in sorted(out.parent.iterdir()):
        m = leftover.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        old = p / "b"
        if m[1] == "old" and not os.path.lexists(out) and not old.is_symlink() and is_bundle(old):
            os.rename(old, out)
        shutil.rmtree(p, ignore_errors=True)


class claim_out:
    """Context manager: check ``out``, lock it and clear a killed compile's leftovers; yields
    ``Path(out)``. Entering it again in the same thread (a BundleWriter inside a compile that
    claimed early) only re-checks ``out``. Another process or thread gets a BundleError at once
    naming this one's pid: it would replace this compile's bundle a moment later, so the loser
    hears at once that it lost, rather than waiting to overwrite it."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.key: str | None = None

    def __enter__(self) -> Path:
        out = self.out
        check_out(out)
        _check_parent(out)
        key = os.path.join(os.path.realpath(out.parent), f".{out.name}.lock")
        held = getattr(_held, "locks", None)
        if held is None:
            held = _held.locks = {}
        if key in held:
            held[key][1] += 1
            self.key = key
            return out
        fd = _lock(out, Path(key))
        held[key] = [fd, 1]
        self.key = key
        try:
            _clear_leftovers(out)
            check_out(out)          # again, now that nobody else can be writing it
        except BaseException:
            self._release()
            raise
        return out

    def __exit__(self, exc_type, exc, tb):
        self._release()
        return False

    def _release(self) -> None:
        held = _held.locks
        entry = held[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            del held[self.key]
            if entry[0] is not None:
                # unlink before unlocking: a process that opened the file meanwhile sees it is gone
                try:
                    os.unlink(self.key)
                except FileNotFoundError:
                    pass
                os.close(entry[0])
        self.key = None


class TensorIndex:
    """Where each tensor of a safetensors file lies: ``span(key) -> (byte offset, length)`` (read
    from the file's JSON header only), so that an artifact can read a weight in place."""

    def __init__(self, path: Path):
        import struct
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.base = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self.entries, self.base = header, 8 + n

    def span(self, key: str) -> tuple[int, int] | None:
        e = self.entries.get(key)
        if e is None:
            return None
        begin, end = e["data_offsets"]
        return self.base + begin, end - begin


class ArtifactWriter:
    """What a backend writes its files through (``LowerContext.files``): paths inside the bundle
    being built, refused when they would leave it, and where each weight lies in the bundle's
    ``weights.safetensors`` (``weights``, with ``weights_file`` its bundle-relative name), which
    the pipeline writes before lowering.

        >>> onnx.save_model(model, ctx.files.path("model.onnx"))
        >>> ctx.files.write_bytes("hls/weights.bin", image)
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.weights_file = WEIGHTS_FILE
        self._weights: TensorIndex | None = None

    @property
    def weights(self) -> TensorIndex:
        if self._weights is None:
            self._weights = TensorIndex(self.root / WEIGHTS_FILE)
        return self._weights

    def path(self, rel: str) -> Path:
        """The path of bundle file ``rel`` (its directories made), for a tool that writes files
        itself."""
        check_rel(self.root, rel)
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return safe_join(self.root, rel)

    def write_bytes(self, rel: str, data: bytes) -> str:
        self.path(rel).write_bytes(data)
        return rel

    def exists(self, rel: str) -> bool:
        return (self.root / check_rel(self.root, rel)).exists()


def held_out_tensors(batches: list[tuple], fp32_runs: list[list], first: int = 1) -> dict[str, torch.Tensor]:
    """The held-out batches after the first, with their fp32 outputs, keyed ``{b}/input{i}`` and
    ``{b}/fp32{i}`` (b counts from 1, as in the manifest; these batches from ``first``). The tensors may be :func:`zero_tail`
    boxes; save them with :func:`tail_trimmed`'s shapes."""
    out = {}
    for b, (ins, outs) in enumerate(zip(batches, fp32_runs), start=first):
        out.update({f"{b}/input{i}": torch.as_tensor(x) for i, x in enumerate(ins)})
        out.update({f"{b}/fp32{i}": t for i, t in enumerate(outs)})
    return out


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "SIGNATURE", "MAX_MANIFEST_BYTES", "ARCHIVE_LIMIT", "GRAPH_FILE", "TOKENIZER_DIR",
           "WEIGHTS_FILE", "REF_INPUTS", "REF_EXPECTED", "REF_FP32", "REF_HELD_OUT", "BundleError", "sha256_file",
           "check_rel", "safe_join", "list_files", "file_table", "save_tensors", "load_tensors", "ordered",
           "zero_tail", "tail_trimmed",
           "load_inputs", "is_bundle", "check_out", "BundleWriter", "write_manifest", "read_manifest_bytes",
           "parse_manifest", "check_files", "claim_out", "held_out_tensors", "TensorIndex",
           "ArtifactWriter"]

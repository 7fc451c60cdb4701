"""Where a bundle is written: the output path is checked, locked and cleared of what a killed
compile left there before any work starts.

:func:`claim_out` refuses a symbolic link, a file, a directory holding something other than an
nnforge bundle, and a parent that is not a writable directory, each naming the path and what to do;
then it locks the output (``flock`` on a hidden ``.NAME.lock`` sibling holding the owner's pid), so
a second compile to the same place fails at once naming the first one's pid, and removes the hidden
``.NAME.tmp-*`` / ``.NAME.old-*`` siblings of a compile that was killed (putting the previous bundle
back if it was killed between the two renames of its commit). The lock file goes when the claim
ends. A claim is reentrant within one thread, so :class:`nnforge.bundle.BundleWriter` (which always
claims its output) can run inside a longer claim taken at the start of a compile.

    >>> with claim_out("bundles/mlp-onnx") as out:      # before importing and compressing
    ...     bundle = nf.compile(model, "onnx", example_inputs=(x,), out=out)
"""
from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

from .bundle import BundleError, _is_bundle, check_out

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
        if m[1] == "old" and not os.path.lexists(out) and not old.is_symlink() and _is_bundle(old):
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

"""Opening, verifying, packing and extracting bundles: what reads a bundle back. A bundle's
runtime is found through its backend (imported when a bundle is loaded); the format itself is
:mod:`nnforge.bundle.format`. Loading executes no code from a bundle except the native library of
a CPU (tvm) bundle, which is its model: that file is checked against the manifest's sha256 and
against the digest the backend recorded at build time, and loaded from a private copy; as with any
shared library, load such bundles only from sources you trust. Any path that would leave the
bundle directory is refused.

A bundle is refused when it was written by a newer nnforge, when its backend's runtime on this
machine is not one its artifacts work with, or when it is loaded as a bundle for another target;
each message gives both versions (or both targets). ``manifest.sig`` (see
:mod:`nnforge.bundle.signing`) is an Ed25519 signature of ``manifest.json``, which holds every other
file's sha256. :func:`pack` and :func:`extract` move a bundle as one .tar, .tar.gz or .zip file;
extraction checks every entry before it writes anything.

    >>> b = Bundle.open("bundles/minilm-onnx")
    >>> runner = b.load()
    >>> pack(b.path, "minilm-onnx.tar.gz")
    >>> extract("minilm-onnx.tar.gz", "elsewhere/minilm-onnx")
"""
from __future__ import annotations

import os
import re
import stat
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .format import (ARCHIVE_LIMIT, FORMAT_VERSION, GRAPH_FILE, MANIFEST, REF_EXPECTED, REF_FP32,
                     REF_HELD_OUT, REF_INPUTS, SIGNATURE, WEIGHTS_FILE, BundleError, BundleWriter, check_files,
                     load_inputs, load_tensors, ordered, parse_manifest, read_manifest_bytes, safe_join)
from .signing import check_signature


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
    from ..version import __version__ as ours
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


def read_manifest(path: str | Path, *, key=None) -> tuple[Path, dict]:
    """(root, manifest) of the bundle at ``path``. With ``key`` (an Ed25519 public key, see
    :mod:`nnforge.bundle.signing`) the manifest's signature is checked on the same bytes that are parsed."""
    root = Path(path)
    data = read_manifest_bytes(root)
    if key is not None:
        check_signature(root, data, key)
    manifest = parse_manifest(root, data)
    check_versions(root / MANIFEST, manifest)
    return root, manifest


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
        from ..backends.base import get_backend
        from ..targets import get_target
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
        runner = backend.load(self.path, self.manifest["backend"]["entry"], device)
        runner.guards = tuple(self.manifest["signature"].get("guards", ()))
        if "decoder" not in self.manifest:
            return runner
        from ..generation import DecoderRunner
        sig = self.manifest["signature"]
        return DecoderRunner(runner, self.manifest["decoder"], [i["name"] for i in sig["inputs"]],
                             [o["name"] for o in sig["outputs"]], self.tokenizer())

    def tokenizer(self):
        """A decoder bundle's tokenizer (transformers, read from its ``tokenizer/`` files; nothing
        in them runs), or None when the model came without one."""
        section = self.manifest.get("decoder") or {}
        if not section.get("tokenizer"):
            return None
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(safe_join(self.path, section["tokenizer"]), local_files_only=True,
                                             trust_remote_code=False)

    def graph(self):
        from ..ir import load_graph
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


def verify(path, key=None) -> dict:
    """Re-hash every file of a bundle, re-run its numerics check and recompute what its manifest
    claims (nnforge.claims: signature, compression per layer, fidelity on the held-out inputs,
    recipe).

    Raises BundleError naming every changed, missing or extra file, the failed check, or every
    manifest field its files contradict; with ``key`` (an Ed25519 public key: PEM bytes/text or a
    path to a PEM file), also a missing or wrong signature of the manifest. Returns a report: file
    count, signature, the runtime's agreement with the stored expected outputs (when the target
    runs here), the reference interpreter's, and the fidelity against fp32.

        >>> nf.verify("bundles/mlp-onnx", key="release.pub.pem")["signature"]
    """
    from ..claims import disagreements
    from ..ir import GraphError, Interpreter
    from ..numerics import compare, fidelity, json_safe, rounds_at_run_time, within, within_rounding
    from ..passes.kvcache import compared_outputs
    from ..targets import get_target
    root, manifest = read_manifest(path, key=key)
    problems = check_files(root, manifest)
    if problems:
        raise BundleError(f"bundle {root} failed verification: " + "; ".join(problems))
    bundle = Bundle(root, manifest)
    try:
        graph = bundle.graph()
    except GraphError as e:
        raise BundleError(f"bundle {root}: graph.json/weights.safetensors do not form a valid graph: {e}") from None
    inputs, expected, fp32 = bundle.reference()
    numerics = manifest.get("numerics") or {}
    tolerance = numerics.get("tolerance", {})
    allow_nonfinite = bool(numerics.get("allow_nonfinite"))
    report = {"path": str(root), "files": len(manifest["files"]), "integrity": "ok", "target": bundle.target,
              "signature": _signature_status(root, key)}
    interpreter = Interpreter(graph)
    held = bundle.held_out()
    outs = [interpreter.run(*ins) for ins, _ in held]
    if "compared_outputs" in numerics:         # the fp32 reference holds only the outputs both graphs have
        names = [v.name for v in graph.outputs]
        unknown = [n for n in numerics["compared_outputs"] if n not in names]
        if unknown:
            raise BundleError(f"bundle {root}: numerics.compared_outputs names {unknown}, which its graph does not output")
        picked = [names.index(n) for n in numerics["compared_outputs"]]
        fp32_outs = [[o[i] for i in picked] for o in outs]
    else:
        fp32_outs = outs
    interp = compare(outs[0], expected, nan_equal=allow_nonfinite)
    if not within(interp, tolerance):
        raise BundleError(f"bundle {root}: its graph no longer reproduces its expected outputs "
                          f"(cosine {interp['cosine_min']:.6f})")
    wrong = disagreements(manifest, graph, fp32_outs, [f for _, f in held])
    if wrong:
        raise BundleError(f"bundle {root}: its manifest disagrees with its files: " + "; ".join(wrong))
    report["interpreter_vs_expected"] = json_safe(interp)
    report["fidelity_vs_fp32"] = json_safe(fidelity(fp32_outs, [f for _, f in held]))
    report["claims"] = "recomputed and confirmed: signature, compression, fidelity on the held-out inputs, recipe"
    ok, why = get_target(bundle.target).can_run()
    runtime = runtime_problems(manifest) if ok else []
    if ok and not runtime:
        got = bundle.load()(*inputs)
        got = list(got) if isinstance(got, tuple) else [got]
        metrics = compare(compared_outputs(graph, got), compared_outputs(graph, expected), nan_equal=allow_nonfinite)
        if not within(metrics, tolerance) and rounds_at_run_time(graph):
            # as the compile's runtime check: no further from fp32 than rounding explains
            picked = ([names.index(n) for n in numerics["compared_outputs"]] if "compared_outputs" in numerics
                      else list(range(len(got))))
            vs_fp32 = compare([got[i] for i in picked], fp32)
            passed, allowed = within_rounding(vs_fp32, compare([expected[i] for i in picked], fp32))
            if not passed:
                raise BundleError(f"bundle {root}: runtime output drifts from fp32 further than rounding explains: "
                                  f"cosine vs fp32 {vs_fp32['cosine_min']:.6f} < {allowed:.6f}")
        elif not within(metrics, tolerance):
            raise BundleError(f"bundle {root}: runtime output fails the numerics check: cosine "
                              f"{metrics['cosine_min']:.6f} < {tolerance.get('cosine_min')}")
        report["runtime_vs_expected"] = json_safe(metrics)
    else:
        reason = "; ".join(runtime) if runtime else f"target {bundle.target} {why}"
        report["runtime_vs_expected"] = f"skipped: {reason}"
    report["passed"] = True
    return report


def _signature_status(root: Path, key) -> str:
    if key is not None:
        from .signing import key_id, load_public_key
        return f"ok (ed25519, key {key_id(load_public_key(key))})"
    return "present, not checked (pass key=)" if (root / SIGNATURE).exists() else \
        "unsigned: the manifest's claims rest on the recomputed checks alone (nf.sign signs a bundle)"


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

"""Hostile bundles and hostile places to write them: planted symbolic links, failures half-way
through a write, archives with escaping or special entries, tampered files, bundles for another
target or another nnforge/runtime version, and signed manifests.

Every refusal is a BundleError whose message names the file, the entry, or both versions."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.export import Dim

import nnforge as nf
from nnforge import BundleError
from nnforge.api import sign
from nnforge.backends.base import BackendError
from nnforge.backends.onnx import OnnxBackend
from nnforge.bundle import SIGNATURE, extract, pack, runtime_problems
from nnforge.cli import main
from nnforge.targets import list_targets

from tests.conftest import tiny_mlp

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


def compile_mlp(out, **kw):
    return nf.compile(tiny_mlp(), "onnx", None, example_inputs=(X,), dynamic_shapes=({0: Dim("batch")},), out=out, **kw)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pristine") / "mlp"
    compile_mlp(out)
    return out


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(pristine, dst, symlinks=True)
    return dst


def siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def edit_manifest(root: Path, fn) -> None:
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m, indent=1))


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --- writing: planted links, no partial directory ----------------------------------------------------
def test_dangling_symlink_at_the_output_is_refused(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(BundleError, match=f"refusing to write bundle to {link}: it is a symbolic link"):
        compile_mlp(link)
    assert siblings(tmp_path) == ["out"] and not (tmp_path / "would-be-created").exists()


def test_symlink_planted_while_compiling_is_not_followed(tmp_path, monkeypatch):
    """A link appears at the output path after the first check (a race): the final rename refuses
    it, the link's target stays empty and the temporary directory is removed."""
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "out"
    real_lower = OnnxBackend.lower

    def lower_then_plant(self, graph, target, out_dir):
        lowered = real_lower(self, graph, target, out_dir)
        out.symlink_to(victim, target_is_directory=True)
        return lowered
    monkeypatch.setattr(OnnxBackend, "lower", lower_then_plant)
    with pytest.raises(BundleError, match="symbolic link"):
        compile_mlp(out)
    assert siblings(victim) == [] and out.is_symlink()
    assert siblings(tmp_path) == ["out", "victim"]


def test_symlink_inside_a_replaced_bundle_is_not_followed(bundle, tmp_path):
    """Recompiling over a bundle holding a planted link to a directory removes the link, never what
    it points to."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep")
    (bundle / "planted").symlink_to(precious, target_is_directory=True)
    (bundle / "reference" / "planted-file").symlink_to(precious / "thesis.tex")
    compile_mlp(bundle)
    assert tree(precious) == {"thesis.tex": b"keep"}
    assert not (bundle / "planted").exists() and nf.verify(bundle)["passed"]
    assert siblings(tmp_path) == ["b", "precious"]


@pytest.mark.parametrize("failure", [BackendError("injected"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failing_backend_leaves_no_partial_directory(tmp_path, monkeypatch, failure):
    def boom(self, graph, target, ctx):
        ctx.files.write_bytes("model.onnx", b"partial")
        raise failure
    monkeypatch.setattr(OnnxBackend, "lower", boom)
    with pytest.raises(type(failure)):
        compile_mlp(tmp_path / "bundles" / "mlp")
    assert siblings(tmp_path / "bundles") == []


def test_failing_final_rename_restores_the_old_bundle(bundle, tmp_path, monkeypatch):
    before = tree(bundle)
    real = os.rename

    def rename(src, dst):
        if Path(dst) == bundle and ".tmp-" in Path(src).name:
            raise OSError(28, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(BundleError, match=f"cannot move the new bundle into {bundle}: .*No space left"):
        compile_mlp(bundle)
    monkeypatch.undo()
    assert tree(bundle) == before and siblings(tmp_path) == ["b"]


# --- archives ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["b.tar", "b.tar.gz", "b.zip"])
def test_pack_and_extract_round_trip(bundle, tmp_path, name):
    archive = pack(bundle, tmp_path / name)
    b = extract(archive, tmp_path / "unpacked")
    assert b.path == tmp_path / "unpacked" and tree(b.path) == tree(bundle)
    assert nf.verify(b.path)["passed"]


def test_extract_accepts_one_top_level_directory(bundle, tmp_path):
    archive = tmp_path / "b.tgz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(bundle, "mlp-onnx")
    assert tree(extract(archive, tmp_path / "x").path) == tree(bundle)


def _tar_with(tmp_path: Path, bundle: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    """A valid bundle archive plus one hostile member."""
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as t:
        for p in sorted(bundle.rglob("*")):
            if p.is_file():
                t.add(p, p.relative_to(bundle).as_posix())
        member.size = len(data) if member.isreg() else 0
        t.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return archive


def _member(name: str, kind=tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, linkname
    return m


HOSTILE_TAR = {
    "dotdot": (_member("../escaped.txt"), r"refusing entry '../escaped.txt': escapes the bundle directory"),
    "nested_dotdot": (_member("reference/../../escaped.txt"), "refusing entry 'reference/../../escaped.txt'"),
    "absolute": (_member("/tmp/nnforge-escaped.txt"), "refusing entry '/tmp/nnforge-escaped.txt': absolute path"),
    "symlink": (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "refusing entry 'link': it is a symlink"),
    "hardlink": (_member("hard", tarfile.LNKTYPE, "manifest.json"), "refusing entry 'hard': it is a hardlink"),
    "chardev": (_member("null", tarfile.CHRTYPE), "refusing entry 'null': it is a device or fifo"),
    "fifo": (_member("pipe", tarfile.FIFOTYPE), "refusing entry 'pipe': it is a device or fifo"),
    "duplicate": (_member("manifest.json"), "refusing entry 'manifest.json': it appears twice"),
}


@pytest.mark.parametrize("case", list(HOSTILE_TAR))
def test_extract_refuses_hostile_tar_entries_before_writing(bundle, tmp_path, case):
    member, match = HOSTILE_TAR[case]
    archive = _tar_with(tmp_path, bundle, member, b"pwned")
    dest = tmp_path / "parent" / "dest"
    with pytest.raises(BundleError, match=match) as ei:
        extract(archive, dest)
    assert str(archive) in str(ei.value)
    assert not (tmp_path / "parent").exists(), "something was written"
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/nnforge-escaped.txt").exists()


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink"])
def test_extract_refuses_hostile_zip_entries(bundle, tmp_path, case):
    archive = pack(bundle, tmp_path / "b.zip")
    with zipfile.ZipFile(archive, "a") as z:
        if case == "symlink":
            info = zipfile.ZipInfo("link")
            info.external_attr = (0o120777 << 16)
            z.writestr(info, "/etc/passwd")
        else:
            z.writestr("../escaped.txt" if case == "dotdot" else "/tmp/nnforge-escaped.txt", "pwned")
    with pytest.raises(BundleError, match="refusing entry"):
        extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and not (tmp_path / "escaped.txt").exists()


def test_extract_refuses_an_archive_bigger_than_allowed(bundle, tmp_path):
    archive = pack(bundle, tmp_path / "b.tar")
    with pytest.raises(BundleError, match="unpacks to more than 1000 bytes"):
        extract(archive, tmp_path / "dest", max_bytes=1000)
    assert not (tmp_path / "dest").exists()


def test_extract_refuses_a_tampered_archive_and_writes_nothing(bundle, tmp_path):
    w = bundle / "weights.safetensors"
    archive = tmp_path / "b.tar"
    with tarfile.open(archive, "w") as t:
        for p in sorted(bundle.rglob("*")):
            if p.is_file() and p != w:
                t.add(p, p.relative_to(bundle).as_posix())
        data = bytearray(w.read_bytes())
        data[-3] ^= 1
        info = tarfile.TarInfo("weights.safetensors")
        info.size = len(data)
        t.addfile(info, io.BytesIO(bytes(data)))
    with pytest.raises(BundleError, match="fails its integrity check: changed file weights.safetensors"):
        extract(archive, tmp_path / "dest")
    assert siblings(tmp_path) == ["b", "b.tar"]


def test_extract_does_not_overwrite_a_directory_that_is_not_a_bundle(bundle, tmp_path):
    archive = pack(bundle, tmp_path / "b.zip")
    dest = tmp_path / "home"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="refusing to overwrite .*home: it exists and is not an nnforge bundle"):
        extract(archive, dest)
    assert tree(dest) == {"notes.txt": b"mine"}


def test_extract_of_something_that_is_not_an_archive(tmp_path):
    f = tmp_path / "junk.tar"
    f.write_bytes(b"\x00junk" * 100)
    with pytest.raises(BundleError, match="junk.tar: not a .tar, .tar.gz or .zip archive"):
        extract(f, tmp_path / "dest")


# --- verify names every problem -------------------------------------------------------------------------
def test_verify_names_every_changed_missing_and_extra_file(bundle, tmp_path):
    (bundle / "graph.json").write_text((bundle / "graph.json").read_text() + " ")
    data = bytearray((bundle / "weights.safetensors").read_bytes())
    data[-3] ^= 1
    (bundle / "weights.safetensors").write_bytes(bytes(data))
    (bundle / "reference" / "fp32.safetensors").unlink()
    (bundle / "notes.txt").write_text("x")
    (bundle / "reference" / "extra.bin").write_bytes(b"x")
    (bundle / "link").symlink_to("/etc/hostname")
    with pytest.raises(BundleError) as ei:
        nf.verify(bundle)
    msg = str(ei.value)
    for part in ["changed file graph.json (size", "changed file weights.safetensors (sha256",
                 "missing file reference/fp32.safetensors", "extra file notes.txt", "extra file reference/extra.bin",
                 "extra file link"]:
        assert part in msg, (part, msg)


def test_verify_names_every_file_under_a_symlinked_directory(bundle, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(bundle / "reference", outside)
    shutil.rmtree(bundle / "reference")
    (bundle / "reference").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BundleError) as ei:
        nf.verify(bundle)
    msg = str(ei.value)
    for rel in ["reference/inputs.safetensors", "reference/expected.safetensors", "reference/fp32.safetensors"]:
        assert f"unsafe file {rel}" in msg, msg
    assert "reference is a symbolic link" in msg and "extra file reference" in msg


# --- another target, another version -------------------------------------------------------------------
def test_bundle_for_another_target_is_refused(bundle):
    with pytest.raises(BundleError, match=f"bundle {bundle} was built for target onnx, not cpu: compile it for cpu"):
        nf.load(bundle, target="cpu")
    assert nf.load(bundle, target="onnx")(X.numpy()).shape == (4, 8)


def test_manifest_target_and_backend_disagreeing_is_refused(bundle):
    other = next((t for t in list_targets() if t.backend != "onnx" and t.can_run()[0]), None)
    if other is None:
        pytest.skip("no runnable target with another backend here")
    edit_manifest(bundle, lambda m: m["target"].__setitem__("name", other.name))
    with pytest.raises(BundleError, match=f"artifacts are from the onnx backend, but target {other.name} runs on "
                                          f"the {other.backend} backend"):
        nf.load(bundle)


@pytest.mark.parametrize("theirs", ["99.0.0", "1.0.0", "0.2.0"])
def test_bundle_from_a_newer_nnforge_is_refused_with_both_versions(bundle, theirs):
    edit_manifest(bundle, lambda m: m.__setitem__("nnforge_version", theirs))
    for call in (nf.load, nf.verify, nf.Bundle.open):
        with pytest.raises(BundleError) as ei:
            call(bundle)
        msg = str(ei.value)
        assert f"bundle written by nnforge {theirs}, newer than this nnforge {nf.__version__}" in msg, msg


def test_bundle_from_an_older_nnforge_patch_release_loads(bundle):
    edit_manifest(bundle, lambda m: m.__setitem__("nnforge_version", "0.1.99" if nf.__version__.startswith("0.1")
                                                  else nf.__version__))
    assert nf.verify(bundle)["passed"]


def test_other_format_version_is_refused_with_both_versions(bundle):
    edit_manifest(bundle, lambda m: (m.__setitem__("format_version", 2), m.__setitem__("nnforge_version", "0.9.0")))
    with pytest.raises(BundleError, match=rf"bundle format version 2 \(written by nnforge 0.9.0\); this nnforge "
                                          rf"{nf.__version__} reads format version 1"):
        nf.load(bundle)


def test_bundle_for_another_runtime_version_is_refused_with_both_versions(bundle):
    installed = version("onnxruntime")
    edit_manifest(bundle, lambda m: m["backend"]["toolchain"].__setitem__("onnxruntime", "2.1.0"))
    with pytest.raises(BundleError, match=f"built with onnxruntime 2.1.0, but this machine has onnxruntime "
                                          f"{installed}: install onnxruntime 2.x"):
        nf.load(bundle)
    report = nf.verify(bundle)          # files and graph still verify; the runtime check says why it was skipped
    assert report["passed"] and "onnxruntime 2.1.0" in report["runtime_vs_expected"]


def test_runtime_rules():
    have = {d: version(d) for d in ("apache-tvm", "onnxruntime") if _installed(d)}
    if "apache-tvm" in have:
        major, minor = have["apache-tvm"].split(".")[:2]
        other = f"{major}.{int(minor) + 1}.0"
        assert runtime_problems({"backend": {"toolchain": {"tvm": other}}}) == [
            f"built with tvm {other}, but this machine has tvm {have['apache-tvm']}: install tvm {major}.{int(minor) + 1}.x "
            "or recompile the bundle here"]
        assert runtime_problems({"backend": {"toolchain": {"tvm": have["apache-tvm"]}}}) == []
    if "onnxruntime" in have:     # same major: fine
        assert runtime_problems({"backend": {"toolchain": {"onnxruntime": have["onnxruntime"].split(".")[0] + ".0.0"}}}) == []
    assert runtime_problems({"backend": {"toolchain": {"some-compiler": "9"}}}) == []


def _installed(dist: str) -> bool:
    try:
        version(dist)
    except Exception:
        return False
    return True


# --- signing ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys():
    pytest.importorskip("cryptography")
    from nnforge.bundle.signing import generate_keypair
    return generate_keypair(), generate_keypair()


def test_signed_bundle_verifies_with_its_key(bundle, keys, tmp_path):
    (priv, pub), _ = keys
    assert nf.verify(bundle)["signature"].startswith("unsigned")
    sig = sign(bundle, priv)
    assert sig == bundle / SIGNATURE
    pub_file = tmp_path / "pub.pem"
    pub_file.write_bytes(pub)
    for key in (pub, pub.decode(), pub_file, str(pub_file)):
        report = nf.verify(bundle, key=key)
        assert report["passed"] and report["signature"].startswith("ok (ed25519, key ")
    assert nf.verify(bundle)["signature"] == "present, not checked (pass key=)"
    assert nf.load(bundle, key=pub)(X.numpy()).shape == (4, 8)
    b = extract(pack(bundle, tmp_path / "signed.tar.gz"), tmp_path / "copy", key=pub)
    assert (b.path / SIGNATURE).is_file()


def test_tampered_signed_manifest_is_refused(bundle, keys):
    (priv, pub), _ = keys
    sign(bundle, priv)
    nf.verify(bundle, key=pub)
    # no file hash changes, and nothing in the files contradicts it (a recipe edit would be caught:
    # tests/test_claims.py); without a key it goes unnoticed: that is what signing is for
    edit_manifest(bundle, lambda m: m["model"].__setitem__("source", "a trusted vendor"))
    assert nf.verify(bundle)["passed"]
    for call in (lambda: nf.verify(bundle, key=pub), lambda: nf.load(bundle, key=pub)):
        with pytest.raises(BundleError, match="manifest.json does not match its signature manifest.sig"):
            call()


def test_reforged_file_table_is_caught_by_the_signature(bundle, keys):
    """An attacker changes the weights and rewrites the manifest's file table to match."""
    from nnforge.bundle import file_table
    (priv, pub), _ = keys
    sign(bundle, priv)
    data = bytearray((bundle / "weights.safetensors").read_bytes())
    data[-3] ^= 1
    (bundle / "weights.safetensors").write_bytes(bytes(data))
    edit_manifest(bundle, lambda m: m.__setitem__("files", file_table(bundle)))
    with pytest.raises(BundleError, match="does not match its signature"):
        nf.verify(bundle, key=pub)


def test_wrong_key_missing_signature_and_bad_keys(bundle, keys, tmp_path):
    (priv, pub), (_, other_pub) = keys
    with pytest.raises(BundleError, match=f"bundle {bundle} is not signed"):
        nf.verify(bundle, key=pub)
    sign(bundle, priv)
    with pytest.raises(BundleError, match="manifest.sig was made with key [0-9a-f]{16}, not with the given key"):
        nf.verify(bundle, key=other_pub)
    with pytest.raises(BundleError, match="cannot read the public key"):
        nf.verify(bundle, key=b"-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    with pytest.raises(BundleError, match="key file .*absent.pem does not exist"):
        nf.verify(bundle, key=tmp_path / "absent.pem")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(BundleError, match="signed with Ed25519 keys, not"):
        sign(bundle, ec_pem)
    (bundle / SIGNATURE).write_text("garbage")
    with pytest.raises(BundleError, match="manifest.sig is not valid JSON"):
        nf.verify(bundle, key=pub)


def test_sign_refuses_a_damaged_bundle_and_replaces_a_planted_link(bundle, keys, tmp_path):
    (priv, pub), _ = keys
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (bundle / SIGNATURE).symlink_to(victim)
    sign(bundle, priv)
    assert victim.read_text() == "keep" and not (bundle / SIGNATURE).is_symlink()
    nf.verify(bundle, key=pub)
    (bundle / "notes.txt").write_text("x")
    with pytest.raises(BundleError, match="refusing to sign a bundle that fails its integrity check: extra file notes.txt"):
        sign(bundle, priv)


def test_cli_verify_with_key(bundle, keys, tmp_path, capsys):
    (priv, pub), (_, other_pub) = keys
    sign(bundle, priv)
    (tmp_path / "pub.pem").write_bytes(pub)
    (tmp_path / "other.pem").write_bytes(other_pub)
    assert main(["verify", str(bundle), "--key", str(tmp_path / "pub.pem")]) == 0
    assert "signature: ok (ed25519" in capsys.readouterr().out
    assert main(["verify", str(bundle), "--key", str(tmp_path / "other.pem")]) == 2
    assert "nnforge: error: bundle" in capsys.readouterr().err
    edit_manifest(bundle, lambda m: m.__setitem__("created", "yesterday"))
    assert main(["verify", str(bundle), "--key", str(tmp_path / "pub.pem")]) == 2
    assert "does not match its signature" in capsys.readouterr().err


def test_pack_replaces_a_planted_link_instead_of_writing_through_it(bundle, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    link = tmp_path / "b.tar.gz"
    link.symlink_to(victim)
    pack(bundle, link)
    assert victim.read_text() == "keep" and not link.is_symlink() and tarfile.is_tarfile(link)

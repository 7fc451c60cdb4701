"""Claiming a bundle's output path before a compile: bad places refused with a message that names
the path and what to do, one writer at a time (the loser told the winner's pid), and what a killed
compile left behind cleared. The tests run as root on the CI machine, where permission bits do not
stop writes: the read-only parent is tested through ``os.access`` (what the check asks), and again
with real permission bits only when not root."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from nnforge.bundle import format as bundle_out
from nnforge.bundle import FORMAT, MANIFEST, BundleError, BundleWriter
from nnforge.bundle.format import claim_out


def fake_bundle(d: Path, tag: str = "old") -> Path:
    d.mkdir(parents=True)
    (d / MANIFEST).write_text(f'{{"format": "{FORMAT}", "tag": "{tag}"}}')
    return d


def siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(BundleError, match=f"refusing to overwrite {tmp_path / 'out'}: .*it is a file.*remove it or "
                                          "choose another output directory"):
        with claim_out(tmp_path / "out"):
            pass
    assert siblings(tmp_path) == ["out"] and (tmp_path / "out").read_text() == "mine"


def test_out_that_is_a_directory_of_other_things_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match=f"refusing to overwrite {tmp_path / 'out'}: it exists and is not an "
                                          "nnforge bundle .*no nnforge manifest.json.*choose another output"):
        with claim_out(tmp_path / "out"):
            pass
    assert siblings(tmp_path) == ["out"]


def test_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub" / "out"
    with pytest.raises(BundleError, match=f"cannot write a bundle to {out}: {tmp_path / 'afile'} is not a directory"):
        with claim_out(out):
            pass
    assert siblings(tmp_path) == ["afile"]


def test_parent_without_write_permission_is_refused(tmp_path, monkeypatch):
    """What os.access answers decides (root passes the permission bits, so they are not used here)."""
    parent = tmp_path / "ro"
    parent.mkdir()
    real = os.access
    monkeypatch.setattr(bundle_out.os, "access", lambda p, mode: False if Path(p) == parent else real(p, mode))
    out = parent / "missing" / "out"
    with pytest.raises(BundleError, match=rf"cannot write a bundle to {out}: {parent} is not writable \(no write "
                                          r"permission, or a read-only file system\); choose another output "
                                          "directory or make it writable"):
        with claim_out(out):
            pass
    assert siblings(parent) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_parent_is_refused_for_real(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(BundleError, match=f"{parent} is not writable"):
            with claim_out(parent / "out"):
                pass
    finally:
        parent.chmod(0o755)


def test_missing_parents_are_created_and_the_lock_goes_at_the_end(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with claim_out(out) as claimed:
        assert claimed == out and siblings(out.parent) == [".out.lock"]
        assert (out.parent / ".out.lock").read_text().strip() == str(os.getpid())
    assert siblings(out.parent) == []


def test_a_second_writer_is_refused_naming_the_first_ones_pid(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from nnforge.bundle.format import claim_out\n"
                               f"with claim_out({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BundleError, match=rf"another nnforge compile \(pid {holder.pid}\) is writing a bundle to "
                                              f"{out}: wait for it to finish or choose another output directory"):
            with BundleWriter(out):
                pass
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and siblings(tmp_path) == []
    with BundleWriter(out) as tmp:          # free again once the first one is done
        (tmp / MANIFEST).write_text(f'{{"format": "{FORMAT}"}}')
    assert siblings(tmp_path) == ["out"]


def test_another_thread_is_refused_but_the_same_thread_may_claim_again(tmp_path):
    out = tmp_path / "out"
    errors = []

    def other():
        try:
            with claim_out(out):
                pass
        except BundleError as e:
            errors.append(str(e))
    with claim_out(out):
        with BundleWriter(out) as tmp:          # a compile's own writer, inside its early claim
            (tmp / MANIFEST).write_text(f'{{"format": "{FORMAT}"}}')
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert siblings(tmp_path) == [".out.lock", "out"]
    assert len(errors) == 1 and f"(pid {os.getpid()}) is writing a bundle to {out}" in errors[0]
    assert siblings(tmp_path) == ["out"]


def test_a_killed_compiles_temporary_directories_are_removed(tmp_path):
    out = fake_bundle(tmp_path / "out")
    stale = tmp_path / ".out.tmp-k1ll3d_x"
    (stale / "reference").mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"partial")
    fake_bundle(tmp_path / ".out.old-abcd1234" / "b")
    (tmp_path / ".out.lock").write_text("99999999\n")            # its lock file, no longer locked
    neighbour = tmp_path / ".out.tmp-x.tmp-abcd1234"            # the temporary of a bundle "out.tmp-x"
    neighbour.mkdir()
    with claim_out(out):
        assert siblings(tmp_path) == [".out.lock", neighbour.name, "out"]
    assert siblings(tmp_path) == [neighbour.name, "out"] and siblings(out) == [MANIFEST]


def test_a_compile_killed_between_its_renames_gets_the_old_bundle_back(tmp_path):
    fake_bundle(tmp_path / ".out.old-abcd1234" / "b", tag="previous")
    with claim_out(tmp_path / "out"):
        pass
    assert siblings(tmp_path) == ["out"] and '"previous"' in (tmp_path / "out" / MANIFEST).read_text()


def test_a_lock_file_unlinked_by_its_last_holder_is_not_trusted(tmp_path, monkeypatch):
    """The previous holder removes the lock file between our open and our flock: the lock we got
    is on a file nobody else will open, so the path is opened and locked again."""
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    real = bundle_out.fcntl.flock
    calls = []

    def flock(fd, op):
        calls.append(os.fstat(fd).st_ino)
        if len(calls) == 1:
            os.unlink(lock)
        return real(fd, op)
    monkeypatch.setattr(bundle_out.fcntl, "flock", flock)
    with claim_out(out):
        fd = bundle_out._held.locks[str(lock)][0]
        assert len(calls) == 2 and os.path.samestat(os.fstat(fd), os.stat(lock))


def test_an_os_error_while_writing_names_the_bundle(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OSError) as e:
        with BundleWriter(out):
            raise OSError(28, "No space left on device")
    assert e.value.filename == str(out) and "No space left on device" in str(e.value)
    assert siblings(tmp_path) == []


def test_zero_tail_boxes_come_back_whole_and_bad_metadata_names_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file
    cache = torch.zeros(2, 3, 100, 8)
    cache[0, 1, :5] = torch.randn(5, 8)
    cache[1, 0, 3, 7] = 2.0
    dense = torch.randn(4, 4)
    boxes, shapes = bundle_out.tail_trimmed({"cache": cache, "dense": dense, "empty": torch.zeros(3, 2)})
    assert list(boxes["cache"].shape) == [2, 2, 5, 8] and boxes["dense"] is dense
    assert list(boxes["empty"].shape) == [0, 0]
    bundle_out.save_tensors(tmp_path / "t.safetensors", boxes, shapes)
    back = bundle_out.load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(back["cache"], cache) and torch.equal(back["dense"], dense)
    assert torch.equal(back["empty"], torch.zeros(3, 2))
    save_file({"x": torch.ones(2, 5)}, str(tmp_path / "bad.safetensors"), metadata={"nnforge.shape.x": "2,3"})
    with pytest.raises(BundleError, match=r"bad.safetensors: tensor x of shape \[2, 5\] does not fit the full shape "
                                          r"'2,3' its metadata records"):
        bundle_out.load_tensors(tmp_path / "bad.safetensors")

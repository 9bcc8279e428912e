"""Durable writes: files and folders reach the disk (fsync) before a name says they are complete."""

import os

import pytest

from distpddm import durable


def _record_fsyncs(monkeypatch) -> list:
    """Every ``os.fsync`` and ``os.replace`` / ``os.rename``, in order, by the paths they were about."""
    events = []
    fsync, replace, rename = os.fsync, os.replace, os.rename

    def spy_fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        replace(src, dst)

    def spy_rename(src, dst):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        rename(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "rename", spy_rename)
    return events


def test_atomic_write_replaces_contents_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "index.json"
    durable.atomic_write_text(target, "first ✓")
    assert target.read_text(encoding="utf-8") == "first ✓"
    durable.atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    durable.atomic_write_bytes(str(tmp_path / "other.bin"), b"")  # str paths and empty files too
    assert (tmp_path / "other.bin").read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "other.bin"]  # no temporary left


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = _record_fsyncs(monkeypatch)
    target = tmp_path / "model.pt"
    durable.atomic_write_bytes(target, b"weights")
    folder, final = os.path.realpath(tmp_path), os.path.realpath(target)
    (replaced,) = [e for e in events if e[0] == "replace"]
    _, tmp, dst = replaced
    assert dst == final and os.path.dirname(tmp) == folder  # a temporary in the same folder, renamed
    at = events.index(replaced)
    assert ("fsync", tmp) in events[:at]  # its bytes on disk before its name says it is complete
    assert ("fsync", folder) in events[at:]  # and the rename itself durable


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_text("old")

    def broken(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="No space"):
        durable.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_fsync_file_and_dir(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"x")
    events = _record_fsyncs(monkeypatch)
    durable.fsync_file(tmp_path / "a")
    durable.fsync_dir(tmp_path)
    assert events == [("fsync", os.path.realpath(tmp_path / "a")), ("fsync", os.path.realpath(tmp_path))]


def test_commit_dir_moves_a_folder_with_its_files_durably(tmp_path, monkeypatch):
    staging = tmp_path / ".step-100.tmp"
    (staging / "shards").mkdir(parents=True)
    (staging / "meta.json").write_text("{}")
    (staging / "shards" / "rank0.pt").write_bytes(b"r0")
    events = _record_fsyncs(monkeypatch)
    final = tmp_path / "step-100"
    durable.commit_dir(staging, final)
    assert not staging.exists()
    assert (final / "meta.json").read_text() == "{}" and (final / "shards" / "rank0.pt").read_bytes() == b"r0"
    (moved,) = [e for e in events if e[0] in ("rename", "replace")]
    assert moved[1:] == (os.path.realpath(staging), os.path.realpath(final))
    before = {e[1] for e in events[: events.index(moved)] if e[0] == "fsync"}
    inside = [staging / "meta.json", staging / "shards" / "rank0.pt", staging / "shards", staging]
    assert {os.path.realpath(p) for p in inside} <= before  # every file and folder, before the rename
    assert ("fsync", os.path.realpath(tmp_path)) in events[events.index(moved) :]  # and the rename after

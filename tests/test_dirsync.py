"""A directory fsync with nothing new to sync returns at once (docs/semantics.md §3.5).

Under durability=full a rename through the mount fsyncs its directory before
it returns; a program saving atomically by hand then fsyncs the directory
itself.  That second fsync is answered without a fsync of its own when the
directory's ctime is still the one read before the daemon's fsync
(atomicfs/dirsync.py); a change made since, through the mount or directly in
SOURCE, makes it a real fsync.  The daemon's calls are recorded with strace.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import powercutkit
import pytest
from conftest import Mount, MountFactory, needs_fuse
from sessionkit import status_of
from stracekit import EPS, Call, PtraceRefused, Tracer, dir_syncs

from atomicfs import dirsync

BODY = b"saved by hand\n" * 100


def traced(m: Mount, out: Path) -> Tracer:
    assert m.proc is not None
    try:
        return Tracer(m.proc.pid, out)
    except (FileNotFoundError, PtraceRefused) as exc:
        pytest.skip(f"needs strace with ptrace: {exc}")


def save_by_hand(directory: Path, name: str, body: bytes) -> None:
    """tmp, write, fsync, close, rename over the name (no fsync of the directory)."""
    tmp = directory / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, directory / name)


def fsync_dir(directory: Path) -> tuple[float, float]:
    """fsync() of the directory through a descriptor of its own; (start, end) times."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.time()
        os.fsync(fd)
        return t0, time.time()
    finally:
        os.close(fd)


def syncs_during(calls: list[Call], directory: Path, span: tuple[float, float]) -> list[Call]:
    return [c for c in dir_syncs(calls, str(directory))
            if span[0] - EPS <= c.start and c.end <= span[1] + EPS]


@needs_fuse
def test_a_directory_fsync_right_after_a_rename_through_the_mount_needs_no_fsync(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "doc").write_bytes(b"old\n")
    m = mount_factory(source=src)
    tracer = traced(m, tmp_path / "daemon.strace")
    try:
        save_by_hand(m.mountpoint, "doc", BODY)
        span = fsync_dir(m.mountpoint)
    finally:
        calls = tracer.stop()
    assert (src / "doc").read_bytes() == BODY
    assert syncs_during(calls, src, span) == [], \
        "the directory, fsync'ed by the rename just before, was fsync'ed again"
    counts = status_of(m.mountpoint)["dir_fsyncs"]
    assert counts["on"] and counts["answered_at_once"] == 1, counts


@needs_fuse
def test_a_directory_fsync_after_a_change_is_a_real_fsync(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """A change made since the daemon's last fsync, directly in SOURCE beside the
    mount or through the mount under durability=batch (not fsync'ed yet), makes
    the program's fsync of the directory reach the disk."""
    src = tmp_path / "src"
    src.mkdir()
    m = mount_factory(source=src)
    tracer = traced(m, tmp_path / "daemon.strace")
    try:
        save_by_hand(m.mountpoint, "doc", BODY)
        fsync_dir(m.mountpoint)  # nothing new: answered at once (the test above)
        (src / "beside").write_bytes(b"made in SOURCE\n")  # not through the mount
        beside = fsync_dir(m.mountpoint)
        again = fsync_dir(m.mountpoint)  # nothing new since that one
        os.chmod(src, 0o750)  # the directory's own metadata, beside the mount
        chmod = fsync_dir(m.mountpoint)
    finally:
        calls = tracer.stop()
    assert len(syncs_during(calls, src, beside)) == 1, "a change beside the mount was not synced"
    assert syncs_during(calls, src, again) == []
    assert len(syncs_during(calls, src, chmod)) == 1, "a chmod beside the mount was not synced"


@needs_fuse
def test_batch_a_directory_fsync_after_a_rename_syncs_the_directory(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """Under batch the rename is not durable when it returns: the directory fsync
    that follows must sync the directory (the group it persists, or its own)."""
    src = tmp_path / "src"
    src.mkdir()
    m = mount_factory(source=src, options=["durability=batch"])
    tracer = traced(m, tmp_path / "daemon.strace")
    try:
        fsync_dir(m.mountpoint)
        save_by_hand(m.mountpoint, "doc", BODY)
        span = fsync_dir(m.mountpoint)
    finally:
        calls = tracer.stop()
    synced = syncs_during(calls, src, span)
    assert synced, "the renamed name was not made durable"
    assert len(synced) == 1, "the group persist fsync'ed the directory, then the call again"


@needs_fuse
@pytest.mark.parametrize("kind", ["ext4", "xfs"])
def test_a_save_by_hand_whose_directory_fsync_was_answered_at_once_survives_a_cut(
        tmp_path: Path, kind: str) -> None:
    """The power-cut check of the lever: save by hand, fsync of the directory
    (answered at once, the rename's fsync having made it durable), power cut at
    once: the new version is there after the remount."""
    with powercutkit.powercut_fs(tmp_path / "pc", kind) as pc:
        (pc.source / "doc").write_bytes(b"old\n")
        pc.sync()
        m = pc.mount_atomicfs()
        for i in range(20):
            save_by_hand(m.mountpoint, "doc", BODY + str(i).encode())
            fsync_dir(m.mountpoint)
        mkdir_fd = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.mkdir(m.path("d"))
            os.fsync(mkdir_fd)
        finally:
            os.close(mkdir_fd)
        pc.cut()
        pc.release()
        pc.remount()
        assert (pc.source / "doc").read_bytes() == BODY + b"19"
        assert (pc.source / "d").is_dir()


# -- the record without FUSE --------------------------------------------------------------
def test_the_record_is_clean_until_the_directory_changes(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncs = dirsync.DirSyncs(dirsync.fine_grained_ctime(fd))
        if not syncs.enabled:
            pytest.skip("coarse ctimes here: the record is off (the probe's answer)")
        assert not syncs.clean(fd), "never fsync'ed: not clean"
        syncs.synced([syncs.snapshot(fd)])
        assert syncs.clean(fd)
        changes: list[Callable[[], object]] = [
            lambda: (d / "f").write_bytes(b""), lambda: os.rename(d / "f", d / "g"),
            lambda: os.unlink(d / "g"), lambda: os.chmod(d, 0o700),
            lambda: os.setxattr(d, "user.k", b"v")]
        for change in changes:
            syncs.synced([syncs.snapshot(fd)])
            try:
                change()
            except OSError as exc:  # user xattrs unsupported on this filesystem
                assert exc.errno == errno.ENOTSUP
                continue
            assert not syncs.clean(fd), f"{change} left the record clean"
    finally:
        os.close(fd)


def test_an_fsync_whose_snapshot_is_older_than_a_change_leaves_the_record_unclean(
        tmp_path: Path) -> None:
    """The order in the daemon: snapshot, (a change meanwhile), fsync, record."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncs = dirsync.DirSyncs(True)
        snap = syncs.snapshot(fd)
        (tmp_path / "meanwhile").write_bytes(b"")
        syncs.synced([snap])
        assert not syncs.clean(fd)
        off = dirsync.DirSyncs(False)
        off.synced([off.snapshot(fd)])
        assert not off.clean(fd), "with the record off every fsync is made"
    finally:
        os.close(fd)

"""A power cut between a commit's point of no return and its directory fsync.

XFS answers fsync of a directory with success once the filesystem is shut down
(a simulated power cut, or an I/O error that shuts it down): the shutdown
unpins the directory's inode and the fsync forces nothing.  ext4 answers EIO,
and the daemon then tried syncfs, which failed too, and logged it.  Either way
close() returned 0 for a commit whose rename (or journal record) the cut then
dropped: the file came back older than a version whose close() had returned
(docs/verification-powercuts.md, the XFS "older" cases).  The daemon now checks
that the filesystem is still up after every directory fsync
(syscalls.fsync_dir_fd) and fails the call with EIO when durability is not
known (docs/semantics.md §11).

Each test holds the commit at a fault point (``sleep:``) right before the
directory fsync, waits until the step before it shows in SOURCE, cuts the
power, then checks: a close() that returned 0 must find its version after
the cut.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import powercutkit
import pytest
from conftest import needs_fuse
from sessionkit import save

from atomicfs import syscalls

pytestmark = needs_fuse

OLD = b"old version\n" * 300
NEW = b"new version, acknowledged\n" * 200
HOLD = 3.0  # seconds the commit waits at the fault point: the test cuts meanwhile


def wait_for(cond: Callable[[], bool], timeout: float = 20) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if cond():
                return True
        except OSError:
            pass
        time.sleep(0.01)
    return False


def cut_during_commit(pc: powercutkit.PowerCutFs, fault: str, reached: Callable[[], bool],
                      options: tuple[str, ...] = (), fsync: bool = False
                      ) -> tuple[int | None, bytes, str]:
    """Save NEW over f through the mount (``fsync``: and fsync it), the commit held at
    ``fault``; cut the power once ``reached()`` (the step before the fault point is
    visible in SOURCE).  Returns the save's errno (None: every call returned 0),
    f's content after remount and recovery, and the daemon's log."""
    m = pc.mount_atomicfs(options, env={"ATOMICFS_FAULTS": f"sleep:{fault}:{HOLD}"})
    result: dict[str, int | None] = {}
    saver = threading.Thread(
        target=lambda: result.update(err=save(m.path("f"), NEW, fsync=fsync)))
    saver.start()
    try:
        assert wait_for(reached), "the commit never reached the fault point"
        pc.cut()
    finally:
        saver.join(60)
    assert not saver.is_alive(), "close() never returned"
    log = m.log()
    pc.restart()
    return result["err"], (pc.source / "f").read_bytes(), log


def check(err: int | None, got: bytes, log: str) -> None:
    assert got in (OLD, NEW), "the file is torn"
    if err is None:
        assert got == NEW, ("the save returned 0, and the power cut brought back the "
                            f"older version; daemon log:\n{log}")
    else:
        assert err == errno.EIO, f"the save failed with {errno.errorcode.get(err, err)}"


@pytest.mark.parametrize("kind", ["xfs", "ext4"])
def test_a_cut_before_the_directory_fsync_of_a_rename_commit(tmp_path: Path,
                                                            kind: str) -> None:
    """The rename is done (SOURCE shows the new content) and the directory fsync
    has not run when the power goes: close() must not return 0 unless the new
    version survives."""
    with powercutkit.powercut_fs(tmp_path / "pc", kind) as pc:
        (pc.source / "f").write_bytes(OLD)
        pc.sync()
        err, got, log = cut_during_commit(
            pc, "commit.before_dir_fsync",
            lambda: (pc.source / "f").read_bytes() == NEW)
        check(err, got, log)


def test_batch_an_fsync_caught_before_its_directory_fsync(tmp_path: Path) -> None:
    """durability=batch: fsync() publishes the staged version (rename) and syncs its
    directory; the power goes between the two.  The fsync must not return 0
    unless the new version survives."""
    with powercutkit.powercut_fs(tmp_path / "pc", "xfs") as pc:
        (pc.source / "f").write_bytes(OLD)
        pc.sync()
        err, got, log = cut_during_commit(
            pc, "commit.before_dir_fsync", lambda: (pc.source / "f").read_bytes() == NEW,
            options=("durability=batch",), fsync=True)
        check(err, got, log)


def test_batch_an_fsync_while_the_group_persist_syncs_the_directory(tmp_path: Path) -> None:
    """durability=batch: a save (close, staged) is published by the background
    group persist, which is held before its directory fsync; an fsync() of the
    file then must wait for that round (it returned 0 at once), and the power goes.
    The fsync must not return 0 unless the new version survives."""
    with powercutkit.powercut_fs(tmp_path / "pc", "xfs") as pc:
        (pc.source / "f").write_bytes(OLD)
        pc.sync()
        m = pc.mount_atomicfs(("durability=batch",),
                              env={"ATOMICFS_FAULTS": f"sleep:commit.before_dir_fsync:{HOLD}"})
        assert save(m.path("f"), NEW) is None
        assert wait_for(lambda: (pc.source / "f").read_bytes() == NEW), "never published"
        result: dict[str, int | None] = {}

        def fsync() -> None:
            fd = os.open(m.path("f"), os.O_RDONLY)
            try:
                os.fsync(fd)
                result["err"] = None
            except OSError as exc:
                result["err"] = exc.errno
            finally:
                with contextlib.suppress(OSError):
                    os.close(fd)

        syncer = threading.Thread(target=fsync)
        syncer.start()
        time.sleep(0.3)  # the fsync reaches the daemon (before the fix: and returned)
        pc.cut()
        syncer.join(60)
        assert not syncer.is_alive(), "fsync() never returned"
        log = m.log()
        pc.restart()
        check(result["err"], (pc.source / "f").read_bytes(), log)


def test_a_directory_fsync_through_the_mount_after_a_cut_fails(tmp_path: Path) -> None:
    """fsync() of a directory through the mount after XFS went down: EIO, not 0
    (the daemon's fsyncdir used XFS's answer as it was)."""
    with powercutkit.powercut_fs(tmp_path / "pc", "xfs") as pc:
        m = pc.mount_atomicfs()
        (m.path("d")).mkdir()
        fd = os.open(m.path("d"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
            os.mkdir(m.path("d", "e"))
            pc.cut()
            with pytest.raises(OSError) as exc:
                os.fsync(fd)
            assert exc.value.errno == errno.EIO
        finally:
            os.close(fd)
        pc.release()


@pytest.mark.parametrize("kind", ["xfs", "ext4"])
def test_a_directory_fsync_after_a_shutdown_raises_eio(tmp_path: Path, kind: str) -> None:
    """The fact the fix rests on, without FUSE: a rename, the filesystem shut down,
    then an fsync of the directory through a descriptor opened before (as a commit
    holds one: it is got before the point of no return).  XFS's own answer is 0
    (``os.fsync``, what the daemon called), yet the remount shows the rename lost;
    ``syscalls.fsync_dir_fd`` raises EIO on both filesystems.  (``fsync_dir``,
    which reopens an O_PATH fd, got EIO from XFS's open already.)"""
    with powercutkit.powercut_fs(tmp_path / "pc", kind) as pc:
        (pc.source / "a").write_bytes(OLD)
        pc.sync()
        dir_fd = os.open(pc.source, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rename(pc.source / "a", pc.source / "b")
            pc.cut()
            try:
                os.fsync(dir_fd)
                kernel_says = 0
            except OSError as exc:
                kernel_says = exc.errno or 0
            with pytest.raises(OSError) as raised:
                syscalls.fsync_dir_fd(dir_fd)
            assert raised.value.errno == errno.EIO
        finally:
            os.close(dir_fd)
        pc.remount()
        assert sorted(os.listdir(pc.source)) == ["a"], "the rename was durable after all"
        assert kernel_says == (0 if kind == "xfs" else errno.EIO)

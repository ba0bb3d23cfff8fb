"""Durability promises checked by power cuts and faults (docs/semantics.md §3, §9).

A power cut is simulated the way xfstests' "godown" does: SOURCE lives on a
loop-mounted XFS image, which is shut down with ``XFS_IOC_GOINGDOWN`` and the
flag NOLOGFLUSH (2): whatever had not reached the disk is gone.  The image is
then mounted again (log recovery) and the tree is looked at directly.

- durability=batch: fsync() returns only once the file's last commit is
  durable, also while a group persist that already published the file is
  still waiting for its directory fsync (a fault point holds it there);
- durability=batch: a publication that fails in a group persist is reported by
  fsync() (the call that waits for it, and the next fsync of every descriptor
  that was open), and the mount shows what SOURCE holds;
- durability=full: a commit whose directory fsync fails never closes a
  descriptor twice (the cause of the EBADF lines logged during power cuts).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import scratchfs
from conftest import IS_ROOT, MountFactory
from sessionkit import wait_for

GOINGDOWN = 0x8004587D  # XFS_IOC_GOINGDOWN == EXT4_IOC_SHUTDOWN: _IOR('X', 125, __u32)
NOLOGFLUSH = 2
MKFS = {"xfs": ["mkfs.xfs", "-q", "-f"], "ext4": ["mkfs.ext4", "-q", "-F"]}

needs_root = pytest.mark.skipif(not IS_ROOT, reason="loop images need root")


@dataclass
class Disk:
    """A loop-mounted image that can lose its power and come back."""

    image: Path
    point: Path

    def cut(self) -> None:
        """Shut the filesystem down without flushing its log: a power cut."""
        fd = os.open(self.point, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, GOINGDOWN, struct.pack("I", NOLOGFLUSH))
        finally:
            os.close(fd)

    def remount(self) -> None:
        """Power back on: unmount the dead filesystem, mount it again (log recovery)."""
        scratchfs.unmount(self.point)
        res = scratchfs.sh("mount", "-o", "loop", str(self.image), str(self.point))
        assert res.returncode == 0, f"remount failed: {res.stderr}"


@contextlib.contextmanager
def disk(tmp_path: Path, fs: str = "xfs") -> Iterator[Disk]:
    image, point = tmp_path / f"{fs}.img", tmp_path / f"{fs}-disk"
    with scratchfs.loop_fs(image, point, MKFS[fs], size=320 << 20):
        yield Disk(image, point)


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


# -- durability=batch: fsync() is durable ------------------------------------------------
@needs_root
def test_batch_fsync_waits_for_the_directory_fsync_of_a_group_that_published_the_file(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """The group persist has published the file and waits (fault point) before its
    directory fsync; an fsync() of the file now must wait for it: after a power
    cut right after fsync() returned, the file is there."""
    with disk(tmp_path) as d:
        src = d.point / "src"
        src.mkdir()
        os.sync()
        m = mount_factory(source=src, options=["durability=batch"],
                          env={"ATOMICFS_FAULTS": "sleep:persist.before_dir_fsync:1.5"})
        body = b"acknowledged by fsync\n" * 100
        with open(m.path("f"), "wb") as f:
            f.write(body)  # closed: staged, published by the next group
        reader = os.open(m.path("f"), os.O_RDONLY)
        try:
            # published: the group now sleeps before fsyncing the directory
            assert wait_for(lambda: read_or_none(src / "f") == body, timeout=5)
            os.fsync(reader)
            d.cut()
        finally:
            os.close(reader)
        m.kill()
        d.remount()
        assert read_or_none(src / "f") == body, "fsync() returned, the file is lost"


@pytest.mark.parametrize("new", [True, False], ids=["new-file", "rewrite"])
def test_batch_fsync_reports_a_failed_publication_and_the_mount_shows_source(
        mount_factory: MountFactory, new: bool) -> None:
    m = mount_factory(options=["durability=batch"],
                      env={"ATOMICFS_FAULTS": "fail:persist.publish:EIO"})
    m.expect_log(r"group persist failed: EIO")
    if not new:
        m.src("f").write_bytes(b"old\n")
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"new\n")
        with pytest.raises(OSError) as err:
            os.fsync(fd)
        assert err.value.errno == errno.EIO
    finally:
        os.close(fd)
    on_source = read_or_none(m.src("f"))
    assert on_source == (None if new else b"old\n")
    assert read_or_none(m.path("f")) == on_source, "the mount shows what SOURCE lacks"


def test_batch_fsync_of_every_open_descriptor_reports_a_publication_lost_after_close(
        mount_factory: MountFactory) -> None:
    """close() staged the version and returned; the group's publication fails later:
    a descriptor open meanwhile must not get a successful fsync() (once)."""
    m = mount_factory(options=["durability=batch"],
                      env={"ATOMICFS_FAULTS": "fail:persist.publish:EIO"})
    m.expect_log(r"group persist failed: EIO")
    m.src("f").write_bytes(b"old\n")
    reader = os.open(m.path("f"), os.O_RDONLY)
    try:
        with open(m.path("f"), "wb") as f:
            f.write(b"new\n")
        assert wait_for(lambda: read_or_none(m.path("f")) == b"old\n", timeout=5), \
            "after the failed publication the mount must show SOURCE's version"
        with pytest.raises(OSError) as err:
            os.fsync(reader)
        assert err.value.errno == errno.EIO
        os.fsync(reader)  # reported once, as Linux reports a writeback error
    finally:
        os.close(reader)
    assert m.src("f").read_bytes() == b"old\n"


# -- the EBADF lines: a descriptor closed twice --------------------------------------------
def test_a_failed_directory_fsync_closes_no_descriptor_twice(
        mount_factory: MountFactory) -> None:
    """durability=full, the directory fsync after a publication fails (EIO, as on a
    shut-down filesystem): close() reports EIO, never EBADF, and no later deferred
    close hits a descriptor that was closed already (or reused)."""
    m = mount_factory(env={"ATOMICFS_FAULTS": "fail:commit.after_dir_fsync:EIO"})
    m.expect_log(r"commit of .* failed: EIO")
    for i in range(6):
        m.src(f"old{i}").write_bytes(b"old\n")
    errors = []
    for rnd in range(5):
        for i in range(6):
            for name in (f"old{i}", f"new{rnd}-{i}"):
                fd = os.open(m.path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(fd, b"x" * 5000)
                try:
                    os.close(fd)
                except OSError as exc:
                    errors.append(exc.errno)
    assert set(errors) == {errno.EIO}, [errno.errorcode[e] for e in errors]
    assert "EBADF" not in m.log() and "Bad file descriptor" not in m.log(), m.log()[-3000:]

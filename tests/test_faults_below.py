"""Faults from the filesystem below a live mount (docs/semantics.md §2.1, §8.2).

- EROFS: the source filesystem (a tmpfs) is remounted read-only under the
  mount, then read-write again;
- EDQUOT: the source is a directory under a space quota (a btrfs qgroup, or
  ext4 project quota where the kernel has it), then the limit is lifted;
- ENOSPC in the middle of a journalled in-place commit.

Each time: every call that would change the tree fails with the errno, at a
call the program sees (open, write, fsync, close, or the namespace call
itself), never silently; committed versions stay intact, through the mount
and in the source; the daemon keeps serving; once the fault is gone, commits
succeed again; and nothing of the daemon's is left after the unmount.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import scratchfs
from conftest import MountFactory
from sessionkit import assert_no_debris, status_of, wait_for

KiB = 1024
MiB = 1024 * KiB


def fill(path: Path, flags: int, byte: bytes) -> tuple[int, int | None, int | None]:
    """Write 8 MiB of ``byte`` in 256 KiB writes, stopping at the first error, then
    close: ``(bytes written, errno of write() or None, errno of close() or None)``."""
    fd = os.open(path, flags, 0o644)
    written, at_write, at_close = 0, None, None
    try:
        while written < 8 * MiB:
            written += os.write(fd, byte * (256 * KiB))
    except OSError as exc:
        at_write = exc.errno
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            at_close = exc.errno
    return written, at_write, at_close


def errno_of(fn: Callable[[], object]) -> int | None:
    """The errno ``fn`` fails with, or None if it succeeds."""
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def write_then_close(path: Path, flags: int, data: bytes, offset: int | None = None) -> str:
    """open, write, close; returns where it failed and how: "open:EROFS", ..., or "ok"."""
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        return f"open:{errno.errorcode[exc.errno or 0]}"
    failed = None
    try:
        if data:
            if offset is None:
                os.write(fd, data)
            else:
                os.pwrite(fd, data, offset)
    except OSError as exc:
        failed = f"write:{errno.errorcode[exc.errno or 0]}"
    try:
        os.close(fd)
    except OSError as exc:
        failed = failed or f"close:{errno.errorcode[exc.errno or 0]}"
    return failed or "ok"


# -- EROFS --------------------------------------------------------------------------------
@pytest.fixture
def tmpfs_source(tmp_path: Path) -> Iterator[Path]:
    with scratchfs.tmpfs(tmp_path / "tmpfs", "16m") as point:
        yield point


def test_source_remounted_read_only_under_a_live_mount(tmpfs_source: Path,
                                                       mount_factory: MountFactory) -> None:
    src = tmpfs_source
    (src / "f").write_bytes(b"committed f\n")
    (src / "d").mkdir()
    (src / "d" / "g").write_bytes(b"committed g\n")
    before = {p: (src / p).read_bytes() for p in ("f", "d/g")}
    m = mount_factory(source=src)
    held = os.open(m.path("f"), os.O_RDWR)  # a writer that has not written yet
    try:
        res = scratchfs.sh("mount", "-o", "remount,ro", str(src))
        assert res.returncode == 0, "an idle daemon keeps the source busy for a read-only " \
            f"remount: {res.stderr.strip()}"
        # the writer that was open: every way it can reach a commit reports EROFS
        assert errno_of(lambda: os.write(held, b"x")) == errno.EROFS
        # a session without a shadow yet; longer (a shorter one: the xfail test below)
        os.ftruncate(held, len(before["f"]) + 100)
        assert errno_of(lambda: os.fsync(held)) == errno.EROFS
    finally:
        rc = errno_of(lambda: os.close(held))
    assert rc == errno.EROFS, f"close() of a written descriptor gave {rc}, not EROFS"
    mp = m.path
    outcomes = {
        "rewrite": write_then_close(mp("f"), os.O_WRONLY | os.O_TRUNC, b"new\n"),
        "truncate-only (: > f)": write_then_close(mp("f"), os.O_WRONLY | os.O_TRUNC, b""),
        "patch": write_then_close(mp("d/g"), os.O_RDWR, b"P", offset=2),
        "create": write_then_close(mp("d/new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, b"n"),
    }
    for what, outcome in outcomes.items():
        assert outcome.endswith(":EROFS"), \
            f"{what} on a read-only source: {outcome}, want EROFS from open, write or close"
    namespace = {
        "truncate(2)": lambda: os.truncate(mp("f"), 1),
        "mkdir": lambda: os.mkdir(mp("nd")),
        "unlink": lambda: os.unlink(mp("d/g")),
        "rename": lambda: os.rename(mp("d/g"), mp("d/h")),
        "link": lambda: os.link(mp("f"), mp("f2")),
        "symlink": lambda: os.symlink("f", mp("s")),
        "chmod": lambda: os.chmod(mp("f"), 0o600),
        "utime": lambda: os.utime(mp("f"), (1, 1)),
        "setxattr": lambda: os.setxattr(mp("f"), "user.x", b"1"),
    }
    got = {what: errno_of(fn) for what, fn in namespace.items()}
    assert got == dict.fromkeys(namespace, errno.EROFS), got
    # nothing changed, and the daemon still serves the committed versions
    assert {p: (src / p).read_bytes() for p in before} == before
    assert {p: mp(p).read_bytes() for p in before} == before
    assert sorted(os.listdir(m.mountpoint)) == ["d", "f"]
    assert status_of(m.mountpoint)["failures"].get("EROFS", 0) >= 1
    # read-write again: commits work
    res = scratchfs.sh("mount", "-o", "remount,rw", str(src))
    assert res.returncode == 0, res.stderr
    assert write_then_close(mp("f"), os.O_WRONLY | os.O_TRUNC, b"after\n") == "ok"
    assert write_then_close(mp("d/new"), os.O_WRONLY | os.O_CREAT, b"new\n") == "ok"
    assert (src / "f").read_bytes() == b"after\n"
    assert (src / "d" / "new").read_bytes() == b"new\n"
    assert (src / "d" / "g").read_bytes() == before["d/g"]
    m.unmount()
    assert_no_debris(src)
    assert not (src / ".atomicfs").exists()


def test_a_daemon_idle_after_commits_lets_the_source_remount_read_only(
        tmpfs_source: Path, mount_factory: MountFactory) -> None:
    """After commits (durability=full), the daemon holds nothing open for writing
    on SOURCE's filesystem once idle: the committed files' former shadows are
    closed at the commit and the ready shadows after housekeeping.IDLE_DRAIN, so
    `mount -o remount,ro` of the source is not refused as busy."""
    src = tmpfs_source
    (src / "old").write_bytes(b"committed\n")
    m = mount_factory(source=src)
    m.path("old").write_bytes(b"replaced\n")  # a rename commit
    for i in range(3):  # new files (the first asks the pool, which then fills)
        m.path(f"new{i}").write_bytes(b"new\n")
    assert m.path("old").read_bytes() == b"replaced\n"  # read back: a read-only fd
    assert status_of(m.mountpoint)["housekeeping"]["shadows_made"] >= 1
    try:
        assert wait_for(lambda: scratchfs.sh("mount", "-o", "remount,ro",
                                             str(src)).returncode == 0,
                        timeout=15, interval=0.5), \
            "the source stayed busy for a read-only remount"
        assert status_of(m.mountpoint)["housekeeping"]["shadows_ready"] == 0
        assert m.path("new2").read_bytes() == b"new\n"
    finally:
        scratchfs.sh("mount", "-o", "remount,rw", str(src))
    m.path("new0").write_bytes(b"saved again\n")  # the pool refills on demand
    assert (src / "new0").read_bytes() == b"saved again\n"


def test_dropped_session_does_not_leave_its_size_in_the_kernel(
        tmpfs_source: Path, mount_factory: MountFactory) -> None:
    """A session dropped at its last release (its commit failed: EROFS) takes its
    attributes out of the kernel at once: the next reader sees the committed size."""
    src = tmpfs_source
    (src / "f").write_bytes(b"committed f\n")
    m = mount_factory(source=src)
    held = os.open(m.path("f"), os.O_RDWR)
    try:
        assert scratchfs.sh("mount", "-o", "remount,ro", str(src)).returncode == 0
        os.ftruncate(held, 3)
    finally:
        assert errno_of(lambda: os.close(held)) == errno.EROFS
    try:
        assert m.path("f").read_bytes() == b"committed f\n", \
            "a reader sees the dropped session's size"
    finally:
        assert scratchfs.sh("mount", "-o", "remount,rw", str(src)).returncode == 0


# -- EDQUOT ---------------------------------------------------------------------------------
@pytest.fixture(params=sorted(scratchfs.QUOTA_KINDS))
def quota_source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[scratchfs.QuotaFs]:
    make = scratchfs.QUOTA_KINDS[request.param]
    with make(tmp_path / "quota", 6 * MiB) as fs:
        yield fs


PATCH = b"J" * (MiB + MiB // 4)


def test_quota_exceeded_under_a_live_mount(quota_source: scratchfs.QuotaFs,
                                           mount_factory: MountFactory) -> None:
    q = quota_source
    src = q.root
    committed = os.urandom(MiB)
    (src / "f").write_bytes(committed)
    (src / "h").write_bytes(committed)
    os.link(src / "h", src / "h.lnk")  # hard-linked: its commits are journalled in place
    q.set_limit(4 * MiB)  # ~2 MiB in use: 2 MiB left
    m = mount_factory(source=src, prefix=q.daemon_prefix)
    mp = m.path
    journal = status_of(m.mountpoint)["journal"]

    # a commit that needs more space than is left, at close(): a journalled one
    # (the shadow takes 1.25 MiB, the journal record as much again)
    outcome = write_then_close(mp("h"), os.O_RDWR, PATCH, offset=256 * KiB)
    assert outcome == ("close:EDQUOT" if journal else "write:EDQUOT"), outcome
    assert (src / "h").read_bytes() == committed, "a failed commit changed the committed file"
    assert os.stat(src / "h").st_nlink == 2 and mp("h").read_bytes() == committed
    if journal:
        assert os.listdir(src / ".atomicfs") == [], \
            "a failed journalled commit left its record behind (it holds quota until remount)"

    # a new file larger than what is left: the error reaches the writer, no file appears
    written, at_write, at_close = fill(mp("big"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, b"B")
    failure = at_write or at_close
    assert failure == errno.EDQUOT, f"writing 8 MiB under a 2 MiB quota: {failure}"
    big = src / "big"
    assert not big.exists() or big.read_bytes() == b"B" * written, \
        "the new file is neither absent nor exactly what was written before the error"
    print(f"{q.kind}: hard-linked patch: {outcome}; new file: "
          f"{errno.errorcode[failure]} after {written} bytes, "
          f"{'kept' if big.exists() else 'absent'}")
    if big.exists():
        os.unlink(mp("big"))

    # the daemon keeps serving
    assert mp("f").read_bytes() == committed
    assert sorted(os.listdir(m.mountpoint)) == ["f", "h", "h.lnk"]
    assert status_of(m.mountpoint)["failures"].get("EDQUOT", 0) >= 1

    # the limit lifted: the same commits succeed
    q.set_limit(None)
    assert write_then_close(mp("big"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                            b"B" * (8 * MiB)) == "ok"
    assert write_then_close(mp("h"), os.O_RDWR, PATCH, offset=256 * KiB) == "ok"
    want_h = committed[:256 * KiB] + PATCH
    assert (src / "big").exists(), "close() returned 0 after writing a new file, and the " \
        "file does not exist (was a new file of that name dropped just before?)"
    assert (src / "big").read_bytes() == b"B" * (8 * MiB)
    assert (src / "h").read_bytes() == want_h and (src / "h.lnk").read_bytes() == want_h
    assert (src / "f").read_bytes() == committed
    m.unmount()
    assert_no_debris(src)
    assert not (src / ".atomicfs").exists(), os.listdir(src / ".atomicfs")


# -- ENOSPC in the middle of a journalled in-place commit -----------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="journalled commits need root")
def test_enospc_while_a_journalled_commit_is_applied(tmpfs_source: Path,
                                                      mount_factory: MountFactory) -> None:
    """The commit needs space for filling the target's holes: it is reserved
    (fallocate) before the record is written, so ENOSPC comes while nothing has
    changed, and no record of the failed commit is left to be replayed."""
    src = tmpfs_source
    size, patch = 8 * MiB, 4 * MiB
    with open(src / "f", "wb") as f:  # sparse: 64 KiB of data, then a hole
        f.write(b"A" * (64 * KiB))
        f.truncate(size)
    os.link(src / "f", src / "f.lnk")  # hard-linked: journalled in place
    old = (src / "f").read_bytes()
    m = mount_factory(source=src)
    if not status_of(m.mountpoint)["journal"]:
        pytest.skip("no journalled commits on this tmpfs (open_by_handle_at)")
    # room for the shadow (4 MiB) and the record (4 MiB), not for filling the hole too
    st = os.statvfs(src)
    (src / "filler").write_bytes(b"F" * (st.f_bavail * st.f_frsize - 5 * patch // 2))
    outcome = write_then_close(m.path("f"), os.O_RDWR, b"B" * patch, offset=MiB)
    new = old[:MiB] + b"B" * patch + old[MiB + patch:]
    got_src, got_mnt = (src / "f").read_bytes(), m.path("f").read_bytes()
    if outcome == "ok":
        assert got_src == new and got_mnt == new
    else:
        assert outcome == "close:ENOSPC", outcome
        assert got_src == old, f"the source file holds {got_src.count(b'B')} of the " \
            f"{patch} new bytes after close() failed"
        assert got_mnt == old
        assert os.listdir(src / ".atomicfs") == [], "a record of a failed commit remains: " \
            "the next mount would replay it"


# -- a write that fails, then close() ------------------------------------------------------
def test_failed_write_then_close_keeps_the_committed_version(mount_factory: MountFactory,
                                                             tmp_path: Path) -> None:
    """docs/semantics.md §8: after a write() fails (ENOSPC), the session is not committed:
    close() returns the error and the committed version stays, until the file is
    truncated to zero (a rewrite from scratch)."""
    with scratchfs.tmpfs(tmp_path / "small", "4m") as src:
        (src / "f").write_bytes(b"old version\n")
        m = mount_factory(source=src)
        try:
            # a writer that checks every write, and closes after the error as cp does
            written, failure, at_close = fill(m.path("f"), os.O_WRONLY | os.O_TRUNC, b"N")
            assert failure == errno.ENOSPC, failure
            assert at_close == errno.ENOSPC, f"close() after the failed write gave {at_close}"
            assert (src / "f").read_bytes() == b"old version\n", \
                f"close() after the failed write committed {os.path.getsize(src / 'f')} bytes"
            assert wait_for(lambda: m.path("f").read_bytes() == b"old version\n"), \
                "the mount does not show the committed version after the session was dropped"
            # a rewrite from scratch (O_TRUNC) starts clean and commits
            m.path("f").write_bytes(b"new version\n")
            assert (src / "f").read_bytes() == b"new version\n"
        finally:
            m.unmount()

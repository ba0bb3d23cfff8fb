"""Write sessions through a live mount: docs/semantics.md §1, §2, §4, §5, §6.1-6.3, §8.2.

Every test drives a real atomicfs mount and checks the *source tree* (what is
committed) as well as what the mount shows.  Crash behaviour is in test_crash.py.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT, Mount, MountFactory
from probekit import ProbeProcess
from sessionkit import (
    NEW,
    OLD,
    TIMEOUT,
    TOOL_IDS,
    TOOLS,
    Tool,
    assert_no_debris,
    data_map,
    make_source,
    run,
    status_of,
    user_entries,
    wait_for,
)

from atomicfs.harness import ReaderProcess

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")


def mounted(mount_factory: MountFactory, tmp_path: Path, files: dict[str, bytes],
            options: tuple[str, ...] = ()) -> Mount:
    return mount_factory(source=make_source(tmp_path, files), options=options)


def rewrite(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def snapshot(path: Path) -> dict[str, object]:
    """Everything §1.1 says a session must not touch in the committed version."""
    st = os.stat(path)
    return {
        "content": path.read_bytes(),
        "ino": st.st_ino, "size": st.st_size, "mode": st.st_mode, "uid": st.st_uid,
        "gid": st.st_gid, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
        "xattrs": {n: os.getxattr(path, n) for n in os.listxattr(path)},
    }


# -- §1.1: the committed version is untouched until a commit -------------------------
def test_committed_version_untouched_until_commit(mount_factory, tmp_path) -> None:
    src = make_source(tmp_path, {"f": OLD})
    os.setxattr(src / "f", "user.tag", b"kept")
    m = mount_factory(source=src)
    before = snapshot(m.src("f"))
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, NEW)
        os.ftruncate(fd, 3 * MiB)
        os.pwrite(fd, b"tail", 3 * MiB - 4)
        os.ftruncate(fd, len(NEW))
        during = snapshot(m.src("f"))
        assert during == before, "a write session changed the committed version before a commit"
        assert os.stat(m.path("f")).st_size == len(NEW), "the mount does not show the session"
    finally:
        os.close(fd)
    assert m.src("f").read_bytes() == NEW, "close() did not commit the session"
    assert os.getxattr(m.src("f"), "user.tag") == b"kept"


# -- §1.3, §2.1: ordinary programs, results through the mount and in the source ------
@pytest.mark.parametrize("tool", TOOLS, ids=TOOL_IDS)
def test_legacy_writer_result(mount_factory, tmp_path, tool: Tool) -> None:
    m = mounted(mount_factory, tmp_path, {"dir/f": OLD})
    work = tmp_path / "work"
    work.mkdir()
    res = tool.go(m.path("dir", "f"), work)
    assert res.returncode == 0, f"{tool.name} failed: {res.stderr.decode(errors='replace')}"
    assert m.path("dir", "f").read_bytes() == tool.expected, f"{tool.name}: wrong content " \
        "through the mount"
    # close-to-open, from the source side: the program's close() committed it
    assert m.src("dir", "f").read_bytes() == tool.expected, f"{tool.name}: the source does " \
        "not hold the new version after the program exited"
    assert sorted(os.listdir(m.path("dir"))) == ["f"], f"{tool.name} left extra names"
    m.unmount()
    assert m.src("dir", "f").read_bytes() == tool.expected
    assert sorted(os.listdir(m.src("dir"))) == ["f"], f"{tool.name}: extra files in the source"
    assert user_entries(m.source) == ["dir"]
    assert not m.src(".atomicfs").exists(), "a clean unmount left SOURCE/.atomicfs"
    assert_no_debris(m.source)


# -- §1.3: open(O_TRUNC) + dup + close without writing commits nothing ----------------
def test_trunc_open_closed_without_writing_commits_nothing(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    other = ReaderProcess()  # started before the session (see ReaderProcess)
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
    fd2 = os.dup(fd)
    try:
        os.close(fd)  # the shell's close after dup2(): FLUSH with nothing written
        assert m.src("f").read_bytes() == OLD, \
            "closing an O_TRUNC descriptor that wrote nothing committed the truncation"
        assert other.read(m.path("f")) == OLD, \
            "a reader opened after the first close sees the uncommitted truncation"
        assert m.src("f").read_bytes() == OLD
        os.write(fd2, NEW)
    finally:
        os.close(fd2)
        other.close()
    assert m.src("f").read_bytes() == NEW, "the write after the dup was not committed at close"
    assert m.path("f").read_bytes() == NEW


# -- §2.1/§2.3: a descriptor written by another process commits at that close ---------
def test_descriptor_shared_with_child_commits_at_childs_close(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
    try:
        res = subprocess.run(["sh", "-c", "printf 'from the child\\n'"], stdout=fd,
                             timeout=TIMEOUT)
        assert res.returncode == 0
        assert m.src("f").read_bytes() == b"from the child\n", \
            "the child's close after writing did not commit (parent still holds the fd)"
    finally:
        os.close(fd)
    assert m.src("f").read_bytes() == b"from the child\n"


# -- §2.2: fsync commits what was written so far; the session goes on ----------------
def test_fsync_commits_so_far_and_session_goes_on(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"first part\n")
        os.fsync(fd)
        assert m.src("f").read_bytes() == b"first part\n", "fsync() did not commit"
        os.write(fd, b"second part\n")
        assert m.src("f").read_bytes() == b"first part\n", \
            "a write after fsync reached the committed version without a commit"
        os.fdatasync(fd)
        assert m.src("f").read_bytes() == b"first part\nsecond part\n", "fdatasync() did not commit"
        os.write(fd, b"third\n")
    finally:
        os.close(fd)
    assert m.src("f").read_bytes() == b"first part\nsecond part\nthird\n"


def test_fsync_publishes_a_new_file(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {})
    fd = os.open(m.path("new"), os.O_CREAT | os.O_WRONLY, 0o640)
    try:
        os.write(fd, b"durable")
        assert not m.src("new").exists(), "a new file reached the source before any commit"
        os.fsync(fd)
        assert m.src("new").read_bytes() == b"durable", "fsync() did not publish the new file"
        assert stat.S_IMODE(os.stat(m.src("new")).st_mode) == 0o640
        os.write(fd, b" and more")
    finally:
        os.close(fd)
    assert m.src("new").read_bytes() == b"durable and more"


# -- §2.3, §4.1: mmap writers ---------------------------------------------------------
@pytest.mark.parametrize("msync", [True, False], ids=["msync", "munmap-only"])
def test_mmap_writer_commits(mount_factory, tmp_path, msync: bool) -> None:
    m = mounted(mount_factory, tmp_path, {"f": b"." * 8192})
    fd = os.open(m.path("f"), os.O_RDWR)
    try:
        mm = mmap.mmap(fd, 8192, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        mm[0:5] = b"hello"
        mm[8000:8005] = b"world"
        assert os.pread(fd, 5, 8000) == b"world", "the writer does not see its mmap writes"
        if msync:
            mm.flush()
            assert m.src("f").read_bytes()[8000:8005] == b"world", "msync() did not commit"
        mm.close()
    finally:
        os.close(fd)
    expected = b"hello" + b"." * 7995 + b"world" + b"." * 187
    assert m.src("f").read_bytes() == expected, "mmap writes not committed by munmap+close"
    assert m.path("f").read_bytes() == expected


# -- §2.4: close-to-open from another process ----------------------------------------
def test_close_to_open_other_process(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    for i in range(50):
        content = bytes([65 + i % 26]) * (1 + i * 997) + b"\n%d\n" % i
        rewrite(m.path("f"), content)
        res = run(["cat", str(m.path("f"))])
        assert res.returncode == 0, res.stderr
        assert res.stdout == content, f"round {i}: a reader opened after close() returned " \
            f"got {len(res.stdout)} bytes, not the {len(content)} just committed"
        assert m.src("f").read_bytes() == content, f"round {i}: source not committed at close"


# -- §4: isolation -------------------------------------------------------------------
def test_committed_isolation_reader_during_session(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    other = ReaderProcess()  # started before the session (see ReaderProcess)
    w = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
    r = -1
    try:
        os.write(w, NEW)
        r = os.open(m.path("f"), os.O_RDONLY)
        assert os.pread(r, 2 * len(NEW), 0) == NEW, \
            "the writing process does not read its own writes through a new descriptor"
        assert other.read(m.path("f")) == OLD, "another process reads uncommitted data"
        assert m.src("f").read_bytes() == OLD
        os.close(w)
        w = -1
        assert os.pread(r, 2 * len(NEW), 0) == NEW
        assert m.path("f").read_bytes() == NEW, "a new open after the commit reads the old version"
        assert other.read(m.path("f")) == NEW, "another process reads the old version"
    finally:
        if w >= 0:
            os.close(w)
        if r >= 0:
            os.close(r)
        other.close()


def test_read_your_writes(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    w = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
    rw = os.open(m.path("f"), os.O_RDWR)
    try:
        os.write(w, b"abcdef")
        assert os.pread(rw, 100, 0) == b"abcdef", "an O_RDWR handle misses the session's writes"
        os.pwrite(rw, b"XY", 2)
        assert os.pread(rw, 100, 0) == b"abXYef", "O_RDWR handle: its own write is not visible"
        # (Python's mmap holds a dup of the fd: mm.close() closes a written descriptor,
        # a commit point, so the source is checked before it)
        mm = mmap.mmap(rw, 6, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            assert mm[:] == b"abXYef", "a writer's MAP_SHARED mapping misses the session"
            mm[0:1] = b"Z"
            assert os.pread(rw, 100, 0) == b"ZbXYef", "a write through mmap is not read back"
            assert m.src("f").read_bytes() == OLD, "uncommitted writes reached the source"
        finally:
            mm.close()
    finally:
        os.close(w)
        os.close(rw)
    assert m.src("f").read_bytes() == b"ZbXYef"


def test_mmap_reader_without_session(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    fd = os.open(m.path("f"), os.O_RDONLY)
    try:
        for flags in (mmap.MAP_PRIVATE, mmap.MAP_SHARED):
            mm = mmap.mmap(fd, len(OLD), flags=flags, prot=mmap.PROT_READ)
            try:
                assert mm[:] == OLD, f"mmap flags={flags} reads wrong data"
            finally:
                mm.close()
    finally:
        os.close(fd)


def test_known_limit_isolated_reader_refuses_shared_mmap(mount_factory, tmp_path) -> None:
    """Documented limit (docs/semantics.md §4.5): under isolation=committed a
    read-only handle opened by another process while a session has uncommitted
    changes, and no process writing the file maps it shared, is served with
    direct_io, and the kernel (libfuse 3.14) refuses mmap(MAP_SHARED) of it with
    ENODEV.  MAP_PRIVATE of the same handle works and shows the committed version."""
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    with ProbeProcess() as other:  # started before the session
        w = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(w, NEW)
            r = other.open(m.path("f"))
            with pytest.raises(OSError) as info:
                other.map(r, len(OLD), shared=True)
            assert info.value.errno == errno.ENODEV, f"expected ENODEV, got {info.value!r}"
            mm = other.map(r, len(OLD), shared=False)
            assert other.mapped(mm) == OLD, \
                "MAP_PRIVATE of an isolated reader shows uncommitted data"
        finally:
            os.close(w)


@pytest.mark.mount_options("isolation=shared")
def test_shared_isolation_reader_sees_uncommitted_writes(mount: Mount) -> None:
    m = mount
    rewrite(m.path("log"), b"line 0\n")  # committed
    w = os.open(m.path("log"), os.O_WRONLY | os.O_APPEND)
    r = os.open(m.path("log"), os.O_RDONLY)
    mm = None
    try:
        os.write(w, b"line 1\n")
        assert os.pread(r, 100, 0) == b"line 0\nline 1\n", \
            "isolation=shared: a reader does not see the writer's uncommitted write"
        assert m.src("log").read_bytes() == b"line 0\n", "a write was committed without a commit"
        r2 = os.open(m.path("log"), os.O_RDONLY)  # opened during the session
        try:
            os.write(w, b"line 2\n")
            assert os.read(r2, 100) == b"line 0\nline 1\nline 2\n", \
                "isolation=shared: a reader opened during the session misses writes (tail -f)"
            mm = mmap.mmap(r2, 21, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            assert mm[:] == b"line 0\nline 1\nline 2\n", "shared mmap of a reader: wrong data"
        finally:
            if mm is not None:
                mm.close()
            os.close(r2)
    finally:
        os.close(w)
        os.close(r)
    assert m.src("log").read_bytes() == b"line 0\nline 1\nline 2\n"


# -- §4.4: no read() ever mixes two versions -----------------------------------------
_MIX_BUG = (
    "BUG (§4.4): a read handle that is not isolated (opened while no session existed, "
    "or any handle under isolation=shared) reads through the page cache, so one 1 MiB "
    "read() becomes several 128 KiB READ requests; a writer's open(O_TRUNC) (the kernel "
    "sets i_size to 0) or a commit landing between them makes that read() return an "
    "empty file or a mix of two versions. "
)
MIX_CASES = [
    pytest.param("committed", "reopen", id="committed-reopen", marks=pytest.mark.xfail(
        strict=True, reason=_MIX_BUG + "Here: a reader that opens, reads, closes in a loop.")),
    pytest.param("committed", "held", id="committed-held", marks=pytest.mark.xfail(
        strict=True, reason=_MIX_BUG + "Here: one read handle kept open across sessions.")),
    pytest.param("shared", "held", id="shared-held", marks=pytest.mark.xfail(
        strict=True, reason=_MIX_BUG + "Here: isolation=shared, one handle kept open.")),
]


@pytest.mark.parametrize(("isolation", "reader"), MIX_CASES)
def test_reader_never_sees_a_mix_within_one_read(mount_factory, tmp_path, isolation: str,
                                                 reader: str) -> None:
    size = MiB
    m = mounted(mount_factory, tmp_path, {"f": bytes([0]) * size},
                options=(f"isolation={isolation}",))
    path = m.path("f")
    stop = threading.Event()
    versions = [0]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            v = 1
            while not stop.is_set():
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
                try:
                    assert os.write(fd, bytes([v % 256]) * size) == size
                finally:
                    os.close(fd)
                versions[0] = v
                v += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    held = os.open(path, os.O_RDONLY) if reader == "held" else -1
    t = threading.Thread(target=writer, daemon=True)
    bad: list[str] = []
    reads = 0
    t.start()
    try:
        # the mix is a race: usually seen within 2 s; under load it took over 10 s
        # (a strict xfail that passes fails the suite): the loop ends at the first mix
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and not bad and not errors:
            if held >= 0:
                data = os.pread(held, 2 * size, 0)
            else:
                fd = os.open(path, os.O_RDONLY)
                try:
                    data = os.read(fd, 2 * size)
                finally:
                    os.close(fd)
            reads += 1
            values = set(data[:: 4096]) | {data[-1]} if data else set()
            if len(data) != size or data.count(data[:1]) != len(data):
                bad.append(f"read {reads}: {len(data)} bytes, byte values {sorted(values)[:6]}")
    finally:
        stop.set()
        t.join(timeout=TIMEOUT)
        if held >= 0:
            os.close(held)
    assert not errors, f"the writer failed: {errors[0]!r}"
    assert not bad, "one read() returned a mix of versions or a partial file:\n" + "\n".join(bad)
    assert versions[0] >= 10 and reads >= 10, f"too little concurrency to mean anything " \
        f"({versions[0]} versions, {reads} reads)"


# -- §5.1: metadata kept by a commit ----------------------------------------------------
@needs_root
@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6755, 0o1644], ids=oct)
def test_commit_keeps_setid_mode_for_root_writer(mount_factory, tmp_path, mode: int) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    os.chmod(m.path("f"), mode)
    rewrite(m.path("f"), NEW)
    assert m.src("f").read_bytes() == NEW
    assert stat.S_IMODE(os.stat(m.src("f")).st_mode) == mode, \
        f"source mode {oct(os.stat(m.src('f')).st_mode)} after a root rewrite, want {oct(mode)}"
    assert stat.S_IMODE(os.stat(m.path("f")).st_mode) == mode


def _write_as_nobody(path: Path, data: bytes) -> None:
    """Root opens ``path`` for writing; uid/gid 65534 writes through that descriptor."""
    fd = os.open(path, os.O_WRONLY)
    try:
        res = subprocess.run(["printf", "%s", data.decode()], stdout=fd, user=65534, group=65534,
                             extra_groups=[], timeout=TIMEOUT, capture_output=False)
        assert res.returncode == 0
    finally:
        os.close(fd)


@needs_root
def test_write_by_non_owner_clears_setid_like_ext4(mount_factory, tmp_path) -> None:
    ref = tmp_path / "ext4-reference"
    ref.mkdir()
    (ref / "f").write_bytes(OLD)
    os.chmod(ref / "f", 0o6777)
    _write_as_nobody(ref / "f", b"written by nobody")
    want_mode = stat.S_IMODE(os.stat(ref / "f").st_mode)
    assert want_mode == 0o777, f"setup: ext4 kept {oct(want_mode)} (was the write privileged?)"
    want_data = (ref / "f").read_bytes()

    m = mounted(mount_factory, tmp_path, {"f": OLD})
    os.chmod(m.path("f"), 0o6777)
    _write_as_nobody(m.path("f"), b"written by nobody")
    assert m.src("f").read_bytes() == want_data
    got_src = stat.S_IMODE(os.stat(m.src("f")).st_mode)
    got_mnt = stat.S_IMODE(os.stat(m.path("f")).st_mode)
    assert (got_mnt, got_src) == (want_mode, want_mode), \
        f"mode after a non-owner write: mount {oct(got_mnt)}, source {oct(got_src)}; " \
        f"ext4 gives {oct(want_mode)}"


@needs_root
def test_commit_keeps_owner_and_group(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    os.chown(m.path("f"), 1234, 5678)
    rewrite(m.path("f"), NEW)
    for where, p in (("source", m.src("f")), ("mount", m.path("f"))):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (1234, 5678), \
            f"{where}: owner {st.st_uid}:{st.st_gid} after a commit, want 1234:5678"
    assert m.src("f").read_bytes() == NEW


@needs_root
def test_commit_keeps_user_and_trusted_xattrs(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    os.setxattr(m.path("f"), "user.colour", b"blue")
    os.setxattr(m.path("f"), "trusted.secret", b"\x00\x01binary")
    rewrite(m.path("f"), NEW)
    for where, p in (("source", m.src("f")), ("mount", m.path("f"))):
        got = {n: os.getxattr(p, n) for n in os.listxattr(p)}
        assert got.get("user.colour") == b"blue", f"{where}: user xattr lost: {got}"
        assert got.get("trusted.secret") == b"\x00\x01binary", f"{where}: trusted xattr lost: {got}"
    assert m.src("f").read_bytes() == NEW


def test_commit_keeps_posix_acl(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    res = run(["setfacl", "-m", "u:65534:rw", str(m.path("f"))])
    assert res.returncode == 0, res.stderr

    def acl(p: Path) -> str:
        out = run(["getfacl", "--omit-header", "--absolute-names", "--numeric", str(p)])
        assert out.returncode == 0, out.stderr
        return out.stdout.decode()

    before_src, before_mnt = acl(m.src("f")), acl(m.path("f"))
    assert "user:65534:rw-" in before_src, f"setfacl did not reach the source:\n{before_src}"
    rewrite(m.path("f"), NEW)
    assert acl(m.src("f")) == before_src, "the ACL in the source changed across a commit"
    assert acl(m.path("f")) == before_mnt, "the ACL through the mount changed across a commit"
    assert m.src("f").read_bytes() == NEW


def test_explicit_times_set_during_session_survive_commit(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    atime, mtime = 1_000_000_123_456_789, 1_200_000_987_654_321
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, NEW)
        os.utime(m.path("f"), ns=(atime, mtime))
    finally:
        os.close(fd)
    for where, p in (("source", m.src("f")), ("mount", m.path("f"))):
        st = os.stat(p)
        assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime), \
            f"{where}: times ({st.st_atime_ns}, {st.st_mtime_ns}) after the commit, " \
            f"want ({atime}, {mtime}) as set by utimensat"
    assert m.src("f").read_bytes() == NEW


def test_plain_rewrite_sets_mtime_now_and_ctime(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    os.utime(m.src("f"), ns=(10**18, 10**18))  # far from now
    start = time.time_ns() - 50_000_000  # kernel time stamps are coarse
    rewrite(m.path("f"), NEW)
    end = time.time_ns() + 50_000_000
    for where, p in (("source", m.src("f")), ("mount", m.path("f"))):
        st = os.stat(p)
        assert start <= st.st_mtime_ns <= end, f"{where}: mtime {st.st_mtime_ns} is not the " \
            f"time of the write ({start}..{end})"
        assert st.st_ctime_ns >= st.st_mtime_ns, f"{where}: ctime before mtime"


# -- §5.2, §5.3: identity and hard links ----------------------------------------------
def test_st_ino_through_mount_is_stable_across_commits(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD})
    ino = os.stat(m.path("f")).st_ino
    for i in range(3):
        rewrite(m.path("f"), NEW + b"%d" % i)
        assert os.stat(m.path("f")).st_ino == ino, f"st_ino changed after commit {i + 1}"
        fd = os.open(m.path("f"), os.O_RDONLY)
        try:
            assert os.fstat(fd).st_ino == ino
        finally:
            os.close(fd)
    assert m.src("f").read_bytes() == NEW + b"2"


def test_hard_links_see_the_commit_through_every_name(mount_factory, tmp_path) -> None:
    src = make_source(tmp_path, {"a": OLD})
    os.link(src / "a", src / "b")
    m = mount_factory(source=src)
    os.link(m.path("a"), m.path("c"))  # a third name made through the mount
    assert len({os.stat(m.path(n)).st_ino for n in "abc"}) == 1, "names show different st_ino"
    rewrite(m.path("a"), NEW)
    for n in "abc":
        assert m.path(n).read_bytes() == NEW, f"mount: name {n} does not show the commit"
        assert m.src(n).read_bytes() == NEW, f"source: name {n} does not hold the commit"
    assert len({os.stat(m.path(n)).st_ino for n in "abc"}) == 1, "mount: the link was split"
    src_inos = {os.stat(m.src(n)).st_ino for n in "abc"}
    assert len(src_inos) == 1, "source: the hard link was split by the commit"
    assert os.stat(m.src("a")).st_nlink == 3


@needs_root
def test_st_ino_survives_the_kernel_forgetting_the_file(mount_factory, tmp_path) -> None:
    """The kernel forgets files it has not used (memory pressure; here drop_caches)
    and looks them up again later: a file, committed meanwhile too, keeps its
    number, and a hard link seen only after the forget shows the same number, so a
    tool walking a big tree (tar, rsync -H, du) keeps the link whole."""
    src = make_source(tmp_path, {"a": OLD, "other": OLD})
    os.link(src / "a", src / "b")
    m = mount_factory(source=src)
    ino = os.stat(m.path("a")).st_ino
    other = os.stat(m.path("other")).st_ino
    rewrite(m.path("a"), NEW)  # a commit: the backing file is a new one in SOURCE
    assert os.stat(m.path("a")).st_ino == ino
    known = status_of(m.mountpoint)["inodes"]
    with open("/proc/sys/vm/drop_caches", "w") as caches:
        caches.write("2")  # unused dentries and inodes: the kernel forgets a and other
    assert wait_for(lambda: status_of(m.mountpoint)["inodes"] < known, timeout=10), \
        "the kernel forgot nothing"
    assert os.stat(m.path("b")).st_ino == ino, "a hard link seen after the forget: other number"
    assert os.stat(m.path("a")).st_ino == ino, "the file's number changed after the forget"
    assert os.stat(m.path("other")).st_ino == other
    assert m.path("b").read_bytes() == NEW


# -- §5.5: rename and unlink of a file being written ----------------------------------
@pytest.mark.parametrize("case", ["existing", "new", "new-over-existing"])
def test_rename_of_file_being_written(mount_factory, tmp_path, case: str) -> None:
    files = {"g": b"replaced target\n"} if case == "new-over-existing" else {}
    if case == "existing":
        files["f"] = OLD
    m = mounted(mount_factory, tmp_path, files)
    flags = os.O_WRONLY | os.O_TRUNC | (os.O_CREAT if case != "existing" else 0)
    fd = os.open(m.path("f"), flags, 0o644)
    try:
        os.write(fd, NEW)
        os.rename(m.path("f"), m.path("g"))
        os.write(fd, b"after the rename\n")
        if case == "existing":
            assert m.src("g").read_bytes() == OLD, "rename changed the committed content"
    finally:
        os.close(fd)
    want = NEW + b"after the rename\n"
    assert m.src("g").read_bytes() == want, "the commit did not land at the new name"
    assert not m.src("f").exists(), "the old name exists in the source after the commit"
    assert m.path("g").read_bytes() == want
    assert sorted(os.listdir(m.mountpoint)) == ["g"]
    assert user_entries(m.source) == ["g"]
    assert_no_debris(m.source)


@pytest.mark.parametrize("case", ["existing", "new"])
def test_unlink_of_file_being_written(mount_factory, tmp_path, case: str) -> None:
    m = mounted(mount_factory, tmp_path, {"f": OLD} if case == "existing" else {})
    fd = os.open(m.path("f"), os.O_RDWR | os.O_TRUNC | os.O_CREAT, 0o644)
    try:
        os.write(fd, NEW)
        os.unlink(m.path("f"))
        os.write(fd, b"more")
        assert os.pread(fd, 4, len(NEW)) == b"more", "the open file is no longer readable"
    finally:
        os.close(fd)
    time.sleep(0.1)  # RELEASE is asynchronous; give a wrong late commit its chance
    assert user_entries(m.source) == [], f"unlinked file reappeared: {user_entries(m.source)}"
    assert os.listdir(m.mountpoint) == []
    assert_no_debris(m.source)


# -- new files before their first commit ---------------------------------------------
def test_new_file_before_first_commit(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {})
    fd = os.open(m.path("n"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"pending data")
        st = os.stat(m.path("n"))
        assert stat.S_ISREG(st.st_mode) and st.st_size == 12, f"stat of a new file: {st}"
        assert os.listdir(m.mountpoint) == ["n"], "readdir misses the new file"
        os.chmod(m.path("n"), 0o600)
        assert stat.S_IMODE(os.stat(m.path("n")).st_mode) == 0o600, "chmod of a new file lost"
        os.rename(m.path("n"), m.path("n2"))
        assert os.listdir(m.mountpoint) == ["n2"], "rename of a new file not shown by readdir"
        assert os.stat(m.path("n2")).st_size == 12
        assert user_entries(m.source) == [], \
            f"a new file is in the source before its first commit: {user_entries(m.source)}"
    finally:
        os.close(fd)
    assert user_entries(m.source) == ["n2"]
    assert m.src("n2").read_bytes() == b"pending data"
    assert stat.S_IMODE(os.stat(m.src("n2")).st_mode) == 0o600


def test_touch_creates_an_empty_file_in_the_source(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {})
    res = run(["touch", str(m.path("t"))])
    assert res.returncode == 0, res.stderr
    assert m.path("t").exists() and os.stat(m.path("t")).st_size == 0
    # touch writes nothing: the commit is the last RELEASE, which is asynchronous
    assert wait_for(lambda: m.src("t").exists()), "touch did not create the file in the source"
    assert m.src("t").read_bytes() == b""
    m.unmount()
    assert user_entries(m.source) == ["t"] and m.src("t").read_bytes() == b""


# -- §6: sparse files ------------------------------------------------------------------
def _sparse_1g(path: Path) -> dict[int, bytes]:
    chunks = {0: b"a" * 4096, 512 * MiB: b"b" * 4096, GiB - 4096: b"c" * 4096}
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.ftruncate(fd, GiB)
        for off, data in chunks.items():
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)
    return chunks


def test_commit_keeps_holes(mount_factory, tmp_path) -> None:
    src = make_source(tmp_path, {})
    chunks = _sparse_1g(src / "sparse")
    before = data_map(src / "sparse")
    assert before == [(off, off + 4096) for off in sorted(chunks)], f"setup: {before}"
    m = mount_factory(source=src)
    assert os.stat(m.path("sparse")).st_blocks * 512 < MiB, "st_blocks of a committed sparse file"
    fd = os.open(m.path("sparse"), os.O_RDWR)
    try:
        os.pwrite(fd, b"d" * 4096, 256 * MiB)
        st = os.stat(m.path("sparse"))
        assert st.st_size == GiB
        assert st.st_blocks * 512 < MiB, \
            f"st_blocks of a sparse file in a session: {st.st_blocks * 512} bytes"
    finally:
        os.close(fd)
    chunks[256 * MiB] = b"d" * 4096
    after = data_map(m.src("sparse"))
    assert after == [(off, off + 4096) for off in sorted(chunks)], \
        f"the commit changed the data map: {after}"
    st = os.stat(m.src("sparse"))
    assert st.st_size == GiB
    assert st.st_blocks * 512 < MiB, f"the commit allocated {st.st_blocks * 512} bytes"
    for where, p in (("source", m.src("sparse")), ("mount", m.path("sparse"))):
        fd = os.open(p, os.O_RDONLY)
        try:
            for off, data in chunks.items():
                assert os.pread(fd, 4096, off) == data, f"{where}: wrong data at {off}"
            assert os.pread(fd, 4096, 768 * MiB) == bytes(4096), f"{where}: a hole is not zeros"
        finally:
            os.close(fd)


def test_extending_makes_holes(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {"t": b"x" * 4096, "w": b"y" * 4096})
    blocks = os.stat(m.src("t")).st_blocks
    os.truncate(m.path("t"), GiB)
    st = os.stat(m.src("t"))
    assert st.st_size == GiB, "truncate by path was not committed"
    assert st.st_blocks == blocks, f"truncate-extend allocated: st_blocks {blocks} -> " \
        f"{st.st_blocks}"
    assert os.stat(m.path("t")).st_blocks == blocks, "st_blocks through the mount"
    assert data_map(m.src("t")) == [(0, 4096)]
    with open(m.path("t"), "rb") as f:
        f.seek(512 * MiB)
        assert f.read(4096) == bytes(4096)
    # writing past EOF leaves a hole between the old end and the new data
    fd = os.open(m.path("w"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"z" * 4096, 100 * MiB)
    finally:
        os.close(fd)
    assert data_map(m.src("w")) == [(0, 4096), (100 * MiB, 100 * MiB + 4096)], \
        f"writing past EOF wrote zeros: {data_map(m.src('w'))}"
    assert os.stat(m.src("w")).st_blocks * 512 < 256 * KiB


def test_st_blocks_of_a_new_file_in_session(mount_factory, tmp_path) -> None:
    m = mounted(mount_factory, tmp_path, {})
    fd = os.open(m.path("big"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"q" * MiB)
        for st in (os.stat(m.path("big")), os.fstat(fd)):
            assert st.st_size == MiB
            assert st.st_blocks * 512 >= MiB, \
                f"st_blocks {st.st_blocks} of a new file holding 1 MiB in its session"
    finally:
        os.close(fd)
    assert m.src("big").read_bytes() == b"q" * MiB


# -- §2.1, §8.2: a commit that hits ENOSPC ----------------------------------------------
@needs_root
def test_commit_enospc_reaches_close_and_keeps_committed(mount_factory, tmp_path) -> None:
    tfs = tmp_path / "tmpfs"
    tfs.mkdir()
    res = run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(tfs)])
    assert res.returncode == 0, res.stderr
    m = None
    try:
        committed = b"A" * MiB
        (tfs / "f").write_bytes(committed)
        free = os.statvfs(tfs).f_bavail * os.statvfs(tfs).f_frsize
        (tfs / "filler").write_bytes(b"F" * (free - 256 * KiB))  # leaves ~256 KiB free
        m = mount_factory(source=tfs)
        # a reader opened before the session shares the kernel's page cache with it
        reader = os.open(m.path("f"), os.O_RDONLY)
        fd = os.open(m.path("f"), os.O_RDWR)
        try:
            os.pwrite(fd, b"B" * 4096, 0)  # fits; the commit needs a second MiB
        finally:
            with pytest.raises(OSError) as info:
                os.close(fd)
        assert info.value.errno == errno.ENOSPC, f"close() gave {info.value!r}, want ENOSPC"
        assert m.src("f").read_bytes() == committed, "a failed commit changed the file"
        # one warning line per failed commit: the close's (its error went to close()),
        # then the last release's, which tries again and drops the data
        warning = r"WARNING .*commit of /f at (close|last close) failed: ENOSPC"
        assert wait_for(lambda: len(_lines(m, warning)) >= 2), \
            "no warning logged for the commit that failed at the last release"
        try:  # the dropped pages are invalidated for handles still open
            assert wait_for(lambda: os.pread(reader, 4096, 0) == committed[:4096]), \
                "a handle open across the dropped session still reads its data"
        finally:
            os.close(reader)
        # the daemon keeps serving
        assert m.path("f").read_bytes() == committed, "the mount shows dropped data"
        assert sorted(os.listdir(m.mountpoint)) == ["f", "filler"]
        rewrite(m.path("small"), b"still serving")
        assert m.src("small").read_bytes() == b"still serving"
        os.unlink(m.path("filler"))
        assert wait_for(lambda: os.statvfs(tfs).f_bavail * os.statvfs(tfs).f_frsize > 2 * MiB), \
            "unlinking a file through the mount did not free its space"
        fd = os.open(m.path("f"), os.O_RDWR)
        try:
            os.pwrite(fd, b"B" * 4096, 0)
        finally:
            os.close(fd)
        assert m.src("f").read_bytes() == b"B" * 4096 + committed[4096:], \
            "the rewrite after freeing space was not committed"
        lines = _lines(m, warning)
        assert len(lines) == 2, "want one warning per failed commit (close, last close):\n" \
            + "\n".join(lines)
        assert " at close failed" in lines[0] and "error was returned" in lines[0], lines[0]
        assert " at last close failed" in lines[1] and "dropped" in lines[1], lines[1]
        assert all("No space left" in line for line in lines), lines
        assert_no_debris(tfs)
    finally:
        if m is not None:
            m.unmount()
        subprocess.run(["umount", str(tfs)], capture_output=True, timeout=TIMEOUT)
        if os.path.ismount(tfs):
            subprocess.run(["umount", "-l", str(tfs)], capture_output=True, timeout=TIMEOUT)


def _lines(m: Mount, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [line for line in m.log().splitlines() if rx.search(line)]

"""What each kind of reader sees under isolation=committed (docs/semantics.md §4).

- §4.1: a process that holds a descriptor of a file open for writing reads the
  session's content through every descriptor it opens (any thread of it; a child
  that inherited the writing descriptor too), and can map it shared.
- A child that does not hold a writing descriptor is another process: it reads
  the committed version, as any other reader.
- §4.5: a reader in another process may map a file shared when a process writing
  it maps it shared (LMDB): that handle reads the writer's content; when no writer
  maps it, the reader's handle is isolated and refuses MAP_SHARED (ENODEV; see
  test_sessions.test_known_limit_isolated_reader_refuses_shared_mmap).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import Mount, MountFactory
from probekit import ProbeProcess
from sessionkit import NEW, OLD, TIMEOUT, make_source, status_of


def mounted(mount_factory: MountFactory, tmp_path: Path,
            options: tuple[str, ...] = ()) -> Mount:
    return mount_factory(source=make_source(tmp_path, {"f": OLD}), options=options)


@pytest.mark.parametrize("options", [(), ("isolation=shared",)], ids=["committed", "shared"])
def test_a_second_read_only_descriptor_reads_the_session(mount_factory: MountFactory,
                                                         tmp_path: Path,
                                                         options: tuple[str, ...]) -> None:
    m = mounted(mount_factory, tmp_path, options)
    w = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(w, NEW)
        r = os.open(m.path("f"), os.O_RDONLY)
        try:
            assert os.pread(r, 2 * len(NEW), 0) == NEW, \
                "the writing process reads the committed version through a new descriptor"
            mm = mmap.mmap(r, len(NEW), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            try:
                assert mm[:] == NEW
                os.pwrite(w, b"LATER", 0)
                assert mm[:5] == b"LATER", "the writer's own shared map misses its write"
            finally:
                mm.close()
        finally:
            os.close(r)
        assert m.src("f").read_bytes() == OLD  # nothing committed yet
    finally:
        os.close(w)
    assert m.src("f").read_bytes() == b"LATER" + NEW[5:]


def test_a_thread_of_the_writer_reads_the_session(mount_factory: MountFactory,
                                                  tmp_path: Path) -> None:
    """git index-pack: its threads reopen the pack the process is writing."""
    m = mounted(mount_factory, tmp_path)
    w = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
    seen: list[object] = []

    def reader() -> None:
        try:
            fd = os.open(m.path("f"), os.O_RDONLY)
            try:
                seen.append(os.pread(fd, 2 * len(NEW), 0))
            finally:
                os.close(fd)
        except OSError as exc:
            seen.append(exc)

    try:
        os.write(w, NEW)
        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        os.close(w)
    assert seen == [NEW] * 4


CHILD_READS = "import os, sys; sys.stdout.write(open(sys.argv[1], 'rb').read().hex())"


def child_reads(path: Path, pass_fds: tuple[int, ...] = ()) -> bytes:
    res = subprocess.run([sys.executable, "-c", CHILD_READS, str(path)], pass_fds=pass_fds,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    return bytes.fromhex(res.stdout)


def test_a_child_holding_the_writing_descriptor_reads_the_session(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    m = mounted(mount_factory, tmp_path)
    w = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(w, NEW)
        assert child_reads(m.path("f"), pass_fds=(w,)) == NEW
    finally:
        os.close(w)


def test_a_child_without_a_writing_descriptor_reads_the_committed_version(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """Descendants of the writer are other processes (docs/semantics.md §4.1)."""
    m = mounted(mount_factory, tmp_path)
    w = os.open(m.path("f"), os.O_WRONLY | os.O_TRUNC)  # close-on-exec: not inherited
    try:
        os.write(w, NEW)
        assert child_reads(m.path("f")) == OLD
        os.fsync(w)  # a commit point: the child sees the new version from here
        assert child_reads(m.path("f")) == NEW
    finally:
        os.close(w)


def test_a_reader_maps_shared_a_file_whose_writer_maps_it(mount_factory: MountFactory,
                                                          tmp_path: Path) -> None:
    """LMDB's pattern: the writer maps its file shared; a reader in another process
    maps it shared too and reads the writer's content (its mapping and its read()s),
    uncommitted changes included: the writer's design, not atomicfs, decides what
    its readers see."""
    m = mounted(mount_factory, tmp_path)
    size = len(OLD)
    with ProbeProcess() as other:  # started before the session
        w = os.open(m.path("f"), os.O_RDWR)
        try:
            wmap = mmap.mmap(w, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            try:
                os.pwrite(w, b"uncommitted", 0)
                r = other.open(m.path("f"))
                rmap = other.map(r, size, shared=True)  # not ENODEV
                assert other.mapped(rmap)[:11] == b"uncommitted"
                assert other.pread(r)[:11] == b"uncommitted"
                os.pwrite(w, b"later", 0)
                assert other.mapped(rmap)[:11] == b"latermitted"
                assert m.src("f").read_bytes() == OLD
                os.fsync(w)
                assert m.src("f").read_bytes()[:11] == b"latermitted"
                assert other.mapped(rmap)[:11] == b"latermitted"
            finally:
                wmap.close()
        finally:
            os.close(w)
    assert status_of(m.mountpoint)["failures"] == {}


def test_a_reader_of_a_plain_writer_stays_isolated(mount_factory: MountFactory,
                                                  tmp_path: Path) -> None:
    """The cost of the rule above is paid only where a writer maps the file: a
    reader of a file written by write() alone reads the committed version."""
    m = mounted(mount_factory, tmp_path)
    with ProbeProcess() as other:
        w = os.open(m.path("f"), os.O_RDWR)
        try:
            os.pwrite(w, b"uncommitted", 0)
            r = other.open(m.path("f"))
            assert other.pread(r) == OLD
            os.fsync(w)
            assert other.pread(r)[:11] == b"uncommitted"  # after the commit
        finally:
            os.close(w)

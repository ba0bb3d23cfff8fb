"""The request handlers called directly, without the kernel (no /dev/fuse, no mount).

Each test builds :class:`AtomicOperations` over a temporary SOURCE and calls its
handlers as pyfuse3 would, with a made-up request context (uid 0, pid 0: no
process to ask /proc about), then checks SOURCE and the replies.  After every
test the invariants are checked (:func:`check_invariants`): the inode table's
(``InodeTable.check``), every open session's extent map (``ExtentMap.check``),
and that nothing but the daemon's own directory is left of a commit in SOURCE.

This is the fast level of the suite: the commit protocol's decisions (commit
points, isolation, sessions across rename and unlink, batch staging) are
exercised here in milliseconds; the mount tests check the same through the
kernel.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from atomicfs.operations import AtomicOperations
from atomicfs.options import MountOptions

ROOT = pyfuse3.ROOT_INODE
CTX = pyfuse3.RequestContext()  # uid 0, gid 0, pid 0


class Harness:
    """An :class:`AtomicOperations` over ``source``, and short forms of its requests."""

    def __init__(self, source: Path, **options: str) -> None:
        self.source = source
        fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.ops = AtomicOperations(fd, MountOptions(**options))  # type: ignore[arg-type]
        self.ops.prepare()

    def run(self, fn: Callable[[], Awaitable[None]]) -> None:
        trio.run(fn)

    async def lookup(self, name: str, parent: int = ROOT) -> int:
        attr = await self.ops.lookup(parent, name.encode(), CTX)
        return int(attr.st_ino)

    async def create(self, name: str, parent: int = ROOT) -> tuple[int, int]:
        info, attr = await self.ops.create(parent, name.encode(), 0o100644,
                                           os.O_WRONLY | os.O_CREAT, CTX)
        return int(info.fh), int(attr.st_ino)

    async def open(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        return await self.ops.open(ino, flags, CTX)

    async def write(self, fh: int, data: bytes, off: int = 0) -> None:
        assert await self.ops.write(fh, off, data) == len(data)

    async def read(self, fh: int, size: int = 1 << 20) -> bytes:
        return bytes(await self.ops.read(fh, 0, size))

    async def close(self, fh: int) -> None:
        """close(): FLUSH, then the last RELEASE."""
        await self.ops.flush(fh)
        await self.ops.release(fh)

    def on_disk(self, name: str) -> bytes | None:
        try:
            return (self.source / name).read_bytes()
        except FileNotFoundError:
            return None


def check_invariants(h: Harness) -> None:
    ops = h.ops
    ops.table.check()
    for session in ops.files.sessions.values():
        session.emap.check()
    for handle in ops.files.handles.values():
        assert handle.inode.ino in ops.table.by_ino, "a handle on a dropped inode"
    leftovers = [n for n in os.listdir(h.source / ".atomicfs") if n.startswith("commit-")]
    assert not leftovers, f"temporary commit names left: {leftovers}"


@pytest.fixture
def harness(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    marker = request.node.get_closest_marker("ops_options")
    source = tmp_path / "src"
    source.mkdir()
    h = Harness(source, **(marker.kwargs if marker else {}))
    try:
        yield h
        check_invariants(h)
    finally:
        h.ops.shutdown()
    assert not (source / ".atomicfs").exists(), "the daemon's directory outlived it"


def test_new_file_appears_only_at_its_first_commit(harness: Harness) -> None:
    async def body() -> None:
        fh, ino = await harness.create("new.txt")
        await harness.write(fh, b"complete content")
        assert harness.on_disk("new.txt") is None  # pending: only through the mount
        assert await harness.lookup("new.txt") == ino
        await harness.ops.flush(fh)
        assert harness.on_disk("new.txt") == b"complete content"
        await harness.ops.release(fh)
        assert not harness.ops.files.sessions

    harness.run(body)


def test_rewrite_leaves_the_committed_version_until_close(harness: Harness) -> None:
    (harness.source / "f").write_bytes(b"old version")

    async def body() -> None:
        ino = await harness.lookup("f")
        before = (await harness.ops.getattr(ino, CTX)).st_ino
        w = (await harness.open(ino, os.O_WRONLY | os.O_TRUNC)).fh
        await harness.write(w, b"new")
        assert harness.on_disk("f") == b"old version"
        # a reader opened during the session is isolated: the committed version
        r = await harness.open(ino, os.O_RDONLY)
        assert r.direct_io
        assert await harness.read(r.fh) == b"old version"
        await harness.close(w)
        assert harness.on_disk("f") == b"new"
        assert await harness.read(r.fh) == b"new"  # after the commit: the new version
        await harness.close(r.fh)
        assert (await harness.ops.getattr(ino, CTX)).st_ino == before  # st_ino stays

    harness.run(body)


def test_truncating_open_and_close_without_writes_commits_at_the_last_release(
        harness: Harness) -> None:
    """`: > f` empties f, but the shell's first close (before any write) must not."""
    (harness.source / "f").write_bytes(b"keep me until the last release")

    async def body() -> None:
        ino = await harness.lookup("f")
        fh = (await harness.open(ino, os.O_WRONLY | os.O_TRUNC)).fh
        await harness.ops.flush(fh)  # no write through this handle: no commit point
        assert harness.on_disk("f") == b"keep me until the last release"
        await harness.ops.release(fh)
        assert harness.on_disk("f") == b""

    harness.run(body)


def test_fsync_commits_and_the_session_goes_on(harness: Harness) -> None:
    (harness.source / "f").write_bytes(b"v0")

    async def body() -> None:
        ino = await harness.lookup("f")
        fh = (await harness.open(ino, os.O_RDWR)).fh
        await harness.write(fh, b"v1")
        await harness.ops.fsync(fh, False)
        assert harness.on_disk("f") == b"v1"
        assert ino in harness.ops.files.sessions
        await harness.write(fh, b"v2 longer", 0)
        assert harness.on_disk("f") == b"v1"
        await harness.close(fh)
        assert harness.on_disk("f") == b"v2 longer"

    harness.run(body)


def test_rename_during_a_session_commits_at_the_new_name(harness: Harness) -> None:
    (harness.source / "a").write_bytes(b"old")

    async def body() -> None:
        ino = await harness.lookup("a")
        fh = (await harness.open(ino, os.O_WRONLY | os.O_TRUNC)).fh
        await harness.write(fh, b"written while renamed")
        await harness.ops.rename(ROOT, b"a", ROOT, b"b", 0, CTX)
        assert harness.on_disk("b") == b"old"
        await harness.close(fh)
        assert harness.on_disk("a") is None
        assert harness.on_disk("b") == b"written while renamed"

    harness.run(body)


def test_unlink_during_a_session_drops_its_data_without_a_failure(harness: Harness) -> None:
    (harness.source / "gone").write_bytes(b"old")

    async def body() -> None:
        ino = await harness.lookup("gone")
        fh = (await harness.open(ino, os.O_WRONLY)).fh
        await harness.write(fh, b"never published")
        await harness.ops.unlink(ROOT, b"gone", CTX)
        await harness.close(fh)
        assert harness.on_disk("gone") is None
        assert os.listdir(harness.source) == [".atomicfs"]
        assert not harness.ops.committer.counters.failures

    harness.run(body)


def test_a_new_file_unlinked_before_its_commit_never_exists(harness: Harness) -> None:
    async def body() -> None:
        fh, _ = await harness.create("tmp")
        await harness.write(fh, b"scratch")
        await harness.ops.unlink(ROOT, b"tmp", CTX)
        await harness.close(fh)
        assert harness.on_disk("tmp") is None
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await harness.lookup("tmp")
        assert caught.value.errno == errno.ENOENT

    harness.run(body)


@pytest.mark.ops_options(durability="batch")
def test_batch_stages_a_commit_and_the_group_persist_publishes_it(harness: Harness) -> None:
    (harness.source / "f").write_bytes(b"old")

    async def body() -> None:
        ino = await harness.lookup("f")
        fh = (await harness.open(ino, os.O_WRONLY | os.O_TRUNC)).fh
        await harness.write(fh, b"staged")
        await harness.close(fh)
        assert ino in harness.ops.batch.staged
        assert harness.on_disk("f") == b"old"  # visible through the mount only
        r = (await harness.open(ino, os.O_RDONLY)).fh
        assert await harness.read(r) == b"staged"
        await harness.close(r)
        await harness.ops.batch.persist()
        assert not harness.ops.batch.staged
        assert harness.on_disk("f") == b"staged"

    harness.run(body)


@pytest.mark.ops_options(durability="batch")
def test_batch_fsync_publishes_before_it_returns(harness: Harness) -> None:
    async def body() -> None:
        fh, ino = await harness.create("durable")
        await harness.write(fh, b"fsync'ed")
        await harness.ops.fsync(fh, False)
        assert ino not in harness.ops.batch.staged
        assert harness.on_disk("durable") == b"fsync'ed"
        await harness.close(fh)

    harness.run(body)


def test_a_request_on_an_unknown_handle_is_an_errno_not_a_crash(harness: Harness) -> None:
    async def body() -> None:
        for call in (harness.ops.read(999, 0, 10), harness.ops.write(999, 0, b"x"),
                     harness.ops.flush(999)):
            with pytest.raises(pyfuse3.FUSEError) as caught:
                await call
            assert caught.value.errno == errno.EBADF

    harness.run(body)


@pytest.mark.ops_options(durability="batch")
def test_batch_journalled_commit_comes_after_what_was_staged_before(harness: Harness) -> None:
    """A hard-linked file is committed in place (journal), straight to SOURCE and
    durable at once: the commits acknowledged before it are published first, or a
    crash could keep it without them (docs/semantics.md §9.2)."""
    (harness.source / "linked").write_bytes(b"old\n")
    os.link(harness.source / "linked", harness.source / "other-name")
    (harness.source / "earlier").write_bytes(b"old\n")

    async def body() -> None:
        earlier = await harness.lookup("earlier")
        fh = (await harness.open(earlier, os.O_WRONLY | os.O_TRUNC)).fh
        await harness.write(fh, b"acknowledged first\n")
        await harness.close(fh)
        assert earlier in harness.ops.batch.staged  # visible, not yet in SOURCE
        linked = await harness.lookup("linked")
        fh = (await harness.open(linked, os.O_WRONLY | os.O_TRUNC)).fh
        await harness.write(fh, b"in place, second\n")
        await harness.close(fh)
        assert harness.on_disk("linked") == b"in place, second\n"
        assert harness.on_disk("earlier") == b"acknowledged first\n"
        assert not harness.ops.batch.staged

    harness.run(body)

"""Reads of committed files, and the wait between such reads and an in-place change.

A read of a committed file comes from the page cache at once, else from a
worker thread.  A journalled (or unjournalled in-place) commit and an append in
place change the committed file itself: :meth:`Reads.exclusive` runs such a
change after the threaded reads begun before it, and reads that arrive
meanwhile wait for it, so no read sees a half-applied change.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from . import faults, syscalls
from .inodes import Inode, InodeTable
from .sessions import Session

# Test knob: every read of a committed file goes through a worker thread, as a
# cold one does (tests exercise the thread path without dropping the page cache).
THREADED_READS = os.environ.get("ATOMICFS_THREADED_READS") == "1"


class Reads:
    """Reads of committed files; in-place changes wait for them and they for those."""

    def __init__(self, table: InodeTable) -> None:
        self.table = table
        self.applying: dict[int, trio.Event] = {}  # inode -> set when its in-place apply ends
        self.reading: dict[int, int] = {}  # inode -> reads of its committed file in threads
        self.counts = {"from_cache": 0, "in_thread": 0}  # reads of committed files, by path
        self._read_done: dict[int, trio.Event] = {}  # set when an inode's reading drops to 0

    def stats(self) -> dict[str, int]:
        """For the status document: reads of committed files, by path."""
        return dict(self.counts)

    async def read_committed(self, inode: Inode, size: int, offset: int) -> bytes:
        """Read the committed file: from the page cache at once, else in a worker
        thread (a cold read does not stall the event loop, and the kernel's
        read-ahead requests reach the disk side by side).  A read waits for an
        in-place apply of its file, and the apply for the threaded reads begun
        before it (:meth:`apply`), so none sees a mix."""
        applying = self.applying.get(inode.ino)
        if applying is not None:  # an in-place commit is half-applied: wait for it
            await applying.wait()
        fd = self.table.data(inode)
        data = None if THREADED_READS else syscalls.pread_cached(fd, size, offset)
        if data is not None:
            self.counts["from_cache"] += 1
            return data
        self.counts["in_thread"] += 1
        ino = inode.ino
        own = os.dup(fd)  # a commit may close the inode's fd while the thread reads
        self.reading[ino] = self.reading.get(ino, 0) + 1
        try:
            def pread() -> bytes:
                faults.point("read.in_thread")
                return os.pread(own, size, offset)

            return await trio.to_thread.run_sync(pread)
        finally:
            os.close(own)
            self.reading[ino] -= 1
            if not self.reading[ino]:
                del self.reading[ino]
                done = self._read_done.pop(ino, None)
                if done is not None:
                    done.set()

    async def exclusive(self, inode: Inode, work: Callable[[], None]) -> None:
        """Run ``work`` (a change of the committed file in place) in a thread while
        isolated readers of the file wait, after the threaded reads begun before it."""
        done = self.applying[inode.ino] = trio.Event()
        try:
            while inode.ino in self.reading:  # reads begun before: let them finish
                await self._read_done.setdefault(inode.ino, trio.Event()).wait()
            await trio.to_thread.run_sync(work)
        finally:
            del self.applying[inode.ino]
            done.set()

    async def apply(self, session: Session, work: Callable[[int], None],
                     target: int) -> None:
        """Run ``work(target)`` in a thread while isolated readers of the file wait
        (``target``: the file open for writing, the caller's to close)."""
        await self.exclusive(session.inode, lambda: work(target))
        if session.shadow is not None:
            os.ftruncate(session.shadow, 0)
        session.emap.reset(session.size)
        session.base_size = session.size
        session.mtime_ns = None

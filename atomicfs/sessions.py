"""Write sessions: the uncommitted content of a file, shared by all its writers.

A session is created by the first open that can modify a file (or by a
truncate by path) and holds:

- ``emap``: an :class:`~atomicfs.extents.ExtentMap` saying, for every byte of
  the session's content, whether it is the committed file's byte at the same
  offset, the shadow file's byte at the same offset, or a hole;
- ``shadow``: a sparse scratch file on the same filesystem (an ``O_TMPFILE``,
  so a crash leaves nothing behind), written at the same offsets as the file;
- the times the session's writes give the file.

The committed version is never touched by a session: only a commit
(:mod:`atomicfs.commit`) replaces it.  New files that were never committed are
*pending*: their shadow is the only copy and they exist only through the mount.

Concurrency (trio): code between two ``await`` is atomic.  ``read`` and
``stat`` never await, so they see either the state before a commit or after
it, never a mix.  Writes, truncates and commits take ``lock``; a commit holds
it from its first step to the swap of the inode onto the new file.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import syscalls
from .extents import Extent, ExtentMap, Kind
from .inodes import Inode

ZEROS_CHUNK = bytes(1 << 20)
FAILING_WRITES = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}
MAX_EXACT_EXTENTS = 256  # above this, st_blocks of a session is estimated
# The bound on a session's extent map (~115 bytes an extent: ~7.5 MiB).  Beyond it,
# the smallest gaps between written ranges are filled into the shadow ("spilled")
# until the map holds half; see Session.spill_plan.
MAX_EXTENTS = int(os.environ.get("ATOMICFS_MAX_EXTENTS", 1 << 16))  # env: a test knob
# The clock the kernel stamps file times with (current_time()).  A write's mtime read
# from the finer time.time_ns() runs ~ a tick ahead of it, so the commit's ctime (set
# by the kernel) would come out *before* the mtime.
CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)


def zeros(n: int) -> bytes:
    return ZEROS_CHUNK[:n] if n <= len(ZEROS_CHUNK) else bytes(n)


@dataclass(eq=False)
class Session:
    inode: Inode
    emap: ExtentMap
    base_size: int  # size of the committed version this session started from
    shadow: int | None = None  # O_RDWR fd of the shadow file, made on first write
    pending: bool = False  # a new file, not yet in the source tree
    writers: int = 0  # open handles that can write
    mtime_ns: int | None = None  # None: the committed file's mtime still holds
    lock: trio.Lock = field(default_factory=trio.Lock)
    created_at: float = field(default_factory=time.monotonic)
    commits: int = 0
    killed_by: int = 0  # a writer was killed by this signal: the last release drops
    write_errno: int = 0  # errno of a write that failed: no commit until truncated to zero
    spill_at: int = MAX_EXTENTS  # map size that triggers the next spill
    spilled: int = 0  # committed bytes copied into the shadow to bound the map
    # the multi-file transaction this session belongs to (atomicfs.transactions): not
    # committed at close, fsync or last release, but by the transaction's commit
    tx: Any = None

    @property
    def dirty(self) -> bool:
        """Does the content differ from the committed version (or is it a new file)?"""
        return self.pending or not self.emap.is_clean() or self.emap.size != self.base_size

    @property
    def size(self) -> int:
        return self.emap.size

    # -- content -----------------------------------------------------------
    def read(self, committed_fd: int | None, offset: int, size: int) -> bytes:
        """The session's bytes ``[offset, offset+size)``, assembled from their sources."""
        parts: list[bytes] = []
        for ext in self.emap.extents(offset, offset + size):
            if ext.kind is Kind.HOLE:
                parts.append(zeros(ext.length))
                continue
            fd = self.shadow if ext.kind is Kind.SHADOW else committed_fd
            if fd is None:
                raise OSError(errno.EIO, "session extent without a source file")
            data = os.pread(fd, ext.length, ext.start)
            if len(data) < ext.length:  # a source shorter than recorded: zeros, as a hole
                data += zeros(ext.length - len(data))
            parts.append(data)
        return b"".join(parts)

    def write(self, make_shadow: Callable[[Session], int], offset: int, data: bytes) -> int:
        """Write into the shadow.  A write that fails for want of space or by an I/O
        error marks the session ``failed``: its content is not what the program
        meant, so it is not committed (docs/semantics.md §8) until truncated to zero."""
        try:
            if self.shadow is None:
                self.shadow = make_shadow(self)
            written = os.pwrite(self.shadow, data, offset)
        except OSError as exc:
            if exc.errno in FAILING_WRITES:
                self.write_errno = exc.errno
            raise
        self.emap.write(offset, written)
        self.touch()
        return written

    def truncate(self, size: int) -> None:
        if size == 0:
            self.write_errno = 0  # nothing left that a failed write should have changed
        if size < self.emap.size and self.shadow is not None:
            # Drop shadow bytes past the new end, so a later extension reads as a hole.
            os.ftruncate(self.shadow, size)
        self.emap.truncate(size)
        self.touch()

    # -- bounding the extent map ----------------------------------------------
    def spill_plan(self) -> list[Extent]:
        """Gaps to fill so the map shrinks to MAX_EXTENTS/2, smallest first.

        A gap is a COMMITTED or HOLE extent between two SHADOW extents; making it
        SHADOW merges three extents into one.  Its bytes go into the shadow first
        (:meth:`spill_copy`): a COMMITTED gap's data ranges are copied, its holes
        and a HOLE gap stay holes in the shadow (a commit keeps shadow holes as
        holes).  Smallest first, so the bytes copied are as few as the bound allows.
        """
        if len(self.emap) <= self.spill_at:
            return []
        gaps = sorted(self.emap.bridges(frozenset({Kind.COMMITTED, Kind.HOLE})),
                      key=lambda e: e.length)
        return gaps[:max(0, (len(self.emap) - MAX_EXTENTS // 2 + 1) // 2)]

    def spill_copy(self, committed_fd: int | None, plan: list[Extent]) -> list[Extent]:
        """Copy the planned gaps' bytes into the shadow (blocking: run in a thread).

        Returns the gaps done.  The map is not touched here (readers may run
        meanwhile, and read those bytes from the committed file); :meth:`spill_apply`
        does that.
        """
        done: list[Extent] = []
        for gap in plan:
            if gap.kind is Kind.COMMITTED:
                if committed_fd is None or self.shadow is None:
                    continue
                for a, b in syscalls.data_ranges(committed_fd, gap.start, gap.end):
                    syscalls.copy_range(committed_fd, self.shadow, a, b - a)
                    self.spilled += b - a
            done.append(gap)
        return done

    def spill_apply(self, done: list[Extent]) -> None:
        for gap in done:
            self.emap.write(gap.start, gap.length)
        # the next spill when the map has grown by half again (if gaps could not be filled)
        self.spill_at = max(MAX_EXTENTS, len(self.emap) + len(self.emap) // 2)

    def touch(self) -> None:
        self.mtime_ns = time.clock_gettime_ns(CLOCK_REALTIME_COARSE)

    # -- accounting ----------------------------------------------------------
    def blocks(self, committed: os.stat_result | None, committed_fd: int | None) -> int:
        """st_blocks of the session's content: what it really occupies.

        The shadow holds data only where the map says SHADOW (truncate and punch
        keep it so), so its own st_blocks counts exactly; committed bytes count
        where the map still uses them.
        """
        total = os.stat(self.shadow).st_blocks if self.shadow is not None else 0
        if committed is None or committed_fd is None or not committed.st_blocks:
            return total
        kept = self.emap.count(Kind.COMMITTED)
        if kept == self.base_size:
            return total + committed.st_blocks
        if len(self.emap) > MAX_EXACT_EXTENTS:  # estimate, in proportion
            return total + committed.st_blocks * kept // max(1, self.base_size)
        data = 0
        for ext in self.emap.extents():
            if ext.kind is Kind.COMMITTED:
                data += sum(b - a for a, b in syscalls.data_ranges(committed_fd, ext.start,
                                                                     ext.end))
        return total + (data + 511) // 512

    def close(self) -> None:
        if self.shadow is not None:
            os.close(self.shadow)
            self.shadow = None


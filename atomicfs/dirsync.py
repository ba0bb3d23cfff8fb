"""A directory fsync with nothing new to sync returns at once (docs/semantics.md §3.5).

Programs that save atomically by hand (tmp, fsync, rename, fsync of the
directory), git and sqlite fsync a directory right after the daemon did: under
``durability=full`` every namespace operation and every commit fsyncs its
directory before it returns.  The second fsync has nothing to write, but it
still costs a hand-off to a worker thread and back.

The record: for each directory the daemon fsync'ed, the ctime it had when the
fsync was about to start (an fstat in the event loop, after the change and
before the hand-off).  A later fsync of the directory returns at once when the
directory's ctime is still that one: every change of a directory's entries,
mode, owner or xattrs sets its ctime, and since Linux 6.13 ext4, XFS, btrfs and
tmpfs give a fine-grained ctime to a change made after the ctime was read
("multigrain timestamps"), so no change after the fstat can keep the recorded
value.  That holds for changes made directly in SOURCE beside the mount too.
With coarse timestamps (older kernels, other filesystems) a change within the
same clock tick keeps the ctime: the mount probes this at start
(:func:`fine_grained_ctime`) and then always fsyncs.

Why the fstat is taken in the event loop: every change the daemon makes to
SOURCE is a system call made by the event loop's thread, so none is half done
while the fstat runs; one made after it gets a new ctime.  A record is stored
only once its fsync succeeded; two fsyncs of one directory in flight at once
may store them in either order: an older ctime only makes the next check fail
(one fsync too many, never one too few).  A change beside the mount racing
with the daemon's fstat and fsync could in principle be missed (the kernel sets
the ctime and the entry under the directory's lock, which an fstat does not
take); for such changes the record is best effort.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

Key = tuple[int, int]  # (st_dev, st_ino) of the directory
PROBE_ROUNDS = 8
MAX_RECORDS = 4096  # directories remembered; forgetting one costs one fsync, no more


@dataclass(frozen=True)
class Snapshot:
    """A directory's identity and ctime, read just before an fsync of it starts."""

    key: Key
    ctime_ns: int


@dataclass
class DirSyncStats:
    skipped: int = 0  # fsyncs of a directory answered at once: nothing new since the last
    done: int = 0  # fsyncs of a directory made (by a program's request)


class DirSyncs:
    """The ctime each directory had when the daemon last fsync'ed it (event loop only)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.counts = DirSyncStats()
        self._synced: dict[Key, int] = {}

    def stats(self) -> dict[str, Any]:
        """For the status document: a program's directory fsyncs answered at once
        and made, and whether the record is on (fine-grained ctimes here)."""
        return {"on": self.enabled, "answered_at_once": self.counts.skipped,
                "made": self.counts.done}

    @staticmethod
    def snapshot(fd: int) -> Snapshot:
        """Read before handing the fsync of directory ``fd`` (any fd, O_PATH too) off."""
        st = os.stat(fd)
        return Snapshot((st.st_dev, st.st_ino), st.st_ctime_ns)

    def synced(self, snaps: list[Snapshot]) -> None:
        """The fsyncs that started after these snapshots succeeded."""
        if not self.enabled:
            return
        for snap in snaps:
            self._synced.pop(snap.key, None)
            self._synced[snap.key] = snap.ctime_ns
        while len(self._synced) > MAX_RECORDS:
            del self._synced[next(iter(self._synced))]

    def clean(self, fd: int) -> bool:
        """Has directory ``fd`` not changed since an fsync of it that succeeded?

        An fstat: on a filesystem that went down it fails (EIO), as the fsync's
        check would (docs/semantics.md §11)."""
        if not self.enabled:
            return False
        snap = self.snapshot(fd)
        return self._synced.get(snap.key) == snap.ctime_ns


def fine_grained_ctime(dir_fd: int) -> bool:
    """Does a change made right after the ctime was read always get a new ctime here?

    Makes and removes a directory in ``dir_fd`` (the daemon's own directory)
    PROBE_ROUNDS times, reading the ctime between the steps.  With coarse
    timestamps (a clock tick of 1-10 ms) these steps, some microseconds apart,
    keep the same ctime; with multigrain timestamps every one changes it."""
    name = f"ctime-probe-{os.getpid()}"
    try:
        for _ in range(PROBE_ROUNDS):
            before = os.stat(dir_fd).st_ctime_ns
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            made = os.stat(dir_fd).st_ctime_ns
            os.rmdir(name, dir_fd=dir_fd)
            after = os.stat(dir_fd).st_ctime_ns
            if not before != made != after:
                return False
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=dir_fd)
        return False
    return True

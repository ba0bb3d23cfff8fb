"""Putting a complete file into the source tree, and what every commit shares.

:class:`Publisher` makes a finished file (complete, fsync'ed unless batch) the
file's version in the source tree: ``linkat`` of a new file to its name, or a
link under a temporary name in the daemon's directory and ``renameat2`` over
the old one (the point of no return), then moves the FUSE inode onto it
(:meth:`Publisher.become`).  The commit protocol (:mod:`atomicfs.commit`)
publishes at once under ``durability=full``; the group persist
(:mod:`atomicfs.batch`) publishes staged versions later under ``batch``.  Both
count into one :class:`CommitStats`.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import faults, recovery, syscalls
from .dirsync import DirSyncs
from .inodes import Backing, Inode, InodeTable, Key, stat_at

log = logging.getLogger(__name__)

# The ways a commit is made (commit.py chooses one per commit).
STRATEGIES = ("rename", "reflink", "journal", "inplace", "new")


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds, and the number of samples."""
    if not samples:
        return {}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99),
            "max_ms": round(ordered[-1] * 1000, 3), "samples": len(ordered)}


@dataclass
class CommitStats:
    commits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STRATEGIES, 0))
    bytes_committed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    # commits that happened but whose directory fsync (or deferred apply) failed
    not_durable: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def summary(self) -> dict[str, Any]:
        """For the status document (latencies as percentiles)."""
        return {
            "commits": dict(self.commits),
            "bytes_committed": self.bytes_committed,
            "failures": dict(self.failures),
            "commit_latency": percentiles(list(self.latencies)),
            "not_durable": self.not_durable,
        }

    def failed(self, exc: OSError) -> None:
        name = errno_name(exc)
        self.failures[name] = self.failures.get(name, 0) + 1


class NotDurable(OSError):
    """A commit that happened (visible, in SOURCE) but is not known durable: its
    directory could be neither fsync'ed nor synced, or the filesystem went down
    before that was known.  The call that made the commit gets EIO (§1.5 of the
    contract: acknowledged means durable); the new version stays."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EIO, f"{os.strerror(errno.EIO)}: {what}")


def errno_name(exc: OSError) -> str:
    """ENOSPC, EIO...: the symbolic name of an OSError's errno (EIO when it has none)."""
    return errno.errorcode.get(exc.errno or errno.EIO, str(exc.errno))


def failure_text(exc: OSError) -> str:
    """``ENOSPC (No space left on device)``: for the one log line of a failed commit."""
    return f"{errno_name(exc)} ({os.strerror(exc.errno or errno.EIO)})"


def fsync_all(fds: list[int], point: str) -> None:
    faults.point(point)  # in the worker thread: the loop goes on
    for fd in fds:
        syscalls.fsync_dir_fd(fd)  # EIO if the filesystem went down (XFS answers 0)


async def sync_dirs(dirs: list[Inode], point: str = "dirs.before_fsync",
                    record: DirSyncs | None = None) -> None:
    """fsync directories in a worker thread (``record``: noted there once done, so a
    program's fsync of one of them right after returns at once: atomicfs/dirsync.py).

    The thread gets descriptors opened here, never an inode's O_PATH fd: a
    directory the kernel forgets is dropped and its fd closed while the thread
    runs, and its number may be reused by another file (whose fsync would then
    stand in for the directory's)."""
    fds: list[int] = []
    try:
        for d in dirs:
            fds.append(syscalls.reopen(d.fd, os.O_RDONLY | os.O_DIRECTORY))
        # read in the event loop, after the changes and before the fsyncs start
        snaps = [record.snapshot(fd) for fd in fds] if record is not None else []
        await trio.to_thread.run_sync(fsync_all, fds, point)
        if record is not None:
            record.synced(snaps)
    finally:
        for fd in fds:
            os.close(fd)


def name_finder(table: InodeTable, pending_name: Callable[[Inode], tuple[Inode, bytes] | None]
                ) -> Callable[[Inode, Key | None], tuple[Inode, bytes]]:
    """Build the function that finds a current (parent, name) of an inode.

    ``key``: the backing file the name must lead to (a staged file's old file);
    None: the inode's own backing file, or any name (for where to make a shadow).
    """

    def find(inode: Inode, key: Key | None) -> tuple[Inode, bytes]:
        found = pending_name(inode)
        if found is not None:
            return found
        want = {inode.key} if key is None else {key}
        if key is None and inode.ino in table.aliases_of:
            want |= table.aliases_of[inode.ino]
        for parent_ino, name in sorted(inode.names):
            parent = table.by_ino.get(parent_ino)
            st = stat_at(parent.fd, name) if parent is not None else None
            if parent is not None and st is not None and (st.st_dev, st.st_ino) in want:
                return parent, name
            inode.names.discard((parent_ino, name))
        raise OSError(errno.EIO, "file has no name left to commit under")

    return find


class Publisher:
    """Puts finished files at their names in the source tree (synchronous steps)."""

    def __init__(self, table: InodeTable, daemon_dir: int,
                 find_name: Callable[[Inode, Key | None], tuple[Inode, bytes]],
                 published: Callable[[Inode], None], stats: CommitStats) -> None:
        self.table = table
        self.daemon_dir = daemon_dir
        self.find_name = find_name
        self.published = published  # told when a new file got its name in SOURCE
        self.counters = stats

    def describe(self, inode: Inode) -> str:
        """A path of the file relative to the mount, for messages (best effort)."""
        parts: list[bytes] = []
        node = inode
        for _ in range(256):
            if node is self.table.root:
                return "/" + b"/".join(reversed(parts)).decode("utf-8", "backslashreplace")
            name = node.any_name()
            parent = self.table.by_ino.get(name[0]) if name else None
            if name is None or parent is None:
                break
            parts.append(name[1])
            node = parent
        return f"<inode {inode.ino}>"

    def publish(self, inode: Inode, fd: int, new_file: bool, old_key: Key | None,
                 where: tuple[Inode, bytes] | None = None) -> Inode:
        """Put ``fd`` in the source tree at the inode's name (synchronous steps only).

        Raises only before the point of no return (the link of a new file, the
        rename over an old one), with the source tree unchanged."""
        parent, name = where or self.find_name(inode, old_key)
        if new_file:
            syscalls.link_fd(fd, parent.fd, name)
            self.past_no_return(inode, "commit.after_link")
            try:
                self.published(inode)
            except Exception:  # pragma: no cover - bookkeeping; a bug, logged
                log.exception("commit of %s: the new file is in place, its pending "
                              "entry was not updated", self.describe(inode))
            return parent
        tmp = b"commit-" + secrets.token_hex(8).encode()
        try:
            syscalls.link_fd(fd, self.daemon_dir, tmp)
        except FileNotFoundError:  # SOURCE/.atomicfs removed beside the mount
            if not recovery.revive_daemon_dir(self.table.root.fd, self.daemon_dir):
                raise
            syscalls.link_fd(fd, self.daemon_dir, tmp)
        try:
            faults.point("commit.after_link")
            syscalls.renameat2(self.daemon_dir, tmp, parent.fd, name)
        except BaseException:
            os.unlink(tmp, dir_fd=self.daemon_dir)
            raise
        self.past_no_return(inode, "commit.after_rename")
        return parent

    def past_no_return(self, inode: Inode, point: str) -> None:
        """A fault point after a commit's point of no return: a failure injected here
        stands for a bookkeeping step failing; the commit stands (it is logged)."""
        try:
            faults.point(point)
        except Exception as exc:
            log.warning("commit of %s: a step after its point of no return failed (%s); "
                        "the commit stands", self.describe(inode), exc)

    def become(self, inode: Inode, fd: int, new_file: bool, keep_fd: bool,
                backing: Backing | None) -> None:
        """Move the FUSE inode onto the file behind ``fd`` (st_ino stays).

        ``keep_fd``: ``fd`` stays the inode's data fd (batch: the group persist
        syncs and publishes through it).  Otherwise ``fd``, open for writing, is
        closed and the committed version is read through a read-only fd opened on
        demand: an idle daemon holds nothing open for writing on SOURCE's
        filesystem, so a read-only remount of it is not refused as busy.
        Bookkeeping only (``backing`` was got before the point of no return): it
        cannot fail.
        """
        data_fd = fd if keep_fd else None
        if new_file or backing is None:
            self.table.set_data_fd(inode, data_fd)  # same inode: the O_PATH fd still fits
        else:
            self.table.rebind(inode, backing, data_fd=data_fd)
        if not keep_fd:
            self.table.closer(fd)

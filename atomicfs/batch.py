"""durability=batch: staged commits and the group persist; the order and durability
of changes that go straight to SOURCE (docs/semantics.md §3, §9).

Under ``batch`` a commit is *staged*: the new version is visible through the
mount at once and published in SOURCE by the next group persist, within
BATCH_DELAY, in the order the versions were first staged: data synced, each
published (:class:`atomicfs.publish.Publisher`), directories synced.  A staged
version that cannot be published is *lost*: reads go back to what SOURCE holds
and the file's next fsync() reports the error (through ``lost``).

A change that goes straight to SOURCE (a namespace operation, a metadata
change, a journalled commit) first publishes what was staged before it
(:meth:`Batch.before_change`), and under ``full`` is made durable before the
reply (:meth:`Batch.after_change`, :meth:`Batch.after_metadata_change`).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from . import faults, syscalls
from .dirsync import DirSyncs
from .inodes import Inode, InodeTable, Key
from .publish import CommitStats, Publisher, failure_text, fsync_all, sync_dirs

log = logging.getLogger(__name__)

BATCH_DELAY = 0.05  # seconds from staging to the group persist (durability=batch)
# Measurement knob (scripts/bench_namespace.py): 0 turns off what docs/semantics.md §9
# adds, the directory fsyncs of namespace operations (full) and the ordering of
# changes behind staged commits (batch), to measure their cost side by side.
PREFIX = os.environ.get("ATOMICFS_PREFIX", "1") != "0"


@dataclass(eq=False)
class Staged:
    """A committed version visible through the mount, not yet published (batch)."""

    inode: Inode
    old_key: Key | None  # the source file it replaces (None: a new file)
    new_file: bool
    old_fd: int | None = None  # O_PATH fd of that source file
    version: int = 0



class Batch:
    """Staged versions and their group persist (``enabled``: durability=batch)."""

    def __init__(self, table: InodeTable, publisher: Publisher, stats: CommitStats,
                 lost: Callable[[Inode, OSError, str], None], dirsyncs: DirSyncs,
                 durability: str = "full") -> None:
        self.table = table
        self.dirsyncs = dirsyncs  # the directories' fsyncs are recorded there
        self.publisher = publisher
        self.counters = stats
        self.enabled = durability == "batch"
        self.staged: dict[int, Staged] = {}
        self.wakeup = trio.Event()
        self._persist_lock = trio.Lock()
        self._changed_dirs: dict[int, Inode] = {}  # batch: to fsync in the next group
        # told of a staged version that was lost ("new", "rewrite") or published but
        # maybe not durable ("unsynced"): files.LostVersions, which reports it to fsync()
        self.lost = lost

    def stats(self) -> dict[str, int]:
        """For the status document."""
        return {"staged": len(self.staged)}

    def stage(self, inode: Inode, fd: int, new_file: bool) -> None:
        item = self.staged.get(inode.ino)
        # got before anything changes: staging is all or nothing
        backing = None if new_file else self.table.prepare(fd)
        old_fd = inode.fd if backing is not None and item is None else None
        if item is None:
            item = Staged(inode, None if new_file else inode.key, new_file)
            self.staged[inode.ino] = item
            self.table.hold(inode)
            if backing is not None:  # the source still holds the old file: keep finding it
                item.old_fd = old_fd
                self.table.rebind(inode, backing, data_fd=fd, keep_old=True)
                self.table.alias(item.old_key, inode)
                self.wakeup.set()
                return
        item.version += 1
        self.publisher.become(inode, fd, new_file, keep_fd=True, backing=backing)
        self.wakeup.set()

    def source_links(self, inode: Inode) -> int:
        """nlink of the file in the source tree (a staged file's is its old file's)."""
        item = self.staged.get(inode.ino)
        if item is not None:
            return 1 if item.old_fd is None else os.stat(item.old_fd).st_nlink
        return os.stat(inode.fd).st_nlink

    # -- namespace operations: ordered and durable (docs/semantics.md §9) ---------------
    async def before_change(self, inode: Inode | None = None) -> None:
        """Call before a change that goes straight to SOURCE (a namespace operation;
        ``inode``: a metadata change of that file).

        durability=batch (§9.2): every commit acknowledged before it is published
        first, so the filesystem's journal, which commits metadata in the order it
        was made (ext4, XFS), can never keep this change without them.  A change of
        a staged file itself goes into its staged version: it needs a persist only
        if something was staged after it (:meth:`must_persist_before_staging`).
        Code after this call must reach the change without an await.
        """
        if not self.enabled or not self.staged or not PREFIX:
            return
        if inode is not None and inode.ino in self.staged:
            if self.must_persist_before_staging(inode):
                await self.persist()
            if inode.ino in self.staged:
                return  # the change lands in the staged version, published in order
        for _ in range(100):  # new commits may be staged while a persist awaits
            if not self.staged:
                return
            await self.persist()
        raise OSError(errno.EAGAIN, "staged commits kept coming; the change was not made")

    async def after_change(self, dirs: list[Inode]) -> None:
        """Call after a namespace operation changed ``dirs`` in SOURCE, before replying.

        durability=full (§9.1): fsync them now, so the change is durable before the
        call returns.  batch: the next group persist fsyncs them (bounded delay).
        """
        if not PREFIX:
            return
        if self.enabled:
            for d in dirs:
                if d.ino not in self._changed_dirs:
                    self.table.hold(d)  # its fd stays open until the group fsyncs it
                    self._changed_dirs[d.ino] = d
            self.wakeup.set()
            return
        await sync_dirs(dirs, record=self.dirsyncs)

    async def after_metadata_change(self, inode: Inode) -> None:
        """Call after a change of a committed file's mode, owner, times or xattrs,
        before replying.

        durability=full (§9.1): the change is made durable now: a regular file or a
        directory is fsync'ed.  Anything else (a symlink, a fifo, a device) cannot
        be opened to be fsync'ed (a fifo's open would wait for a writer): its
        parent directory is fsync'ed instead, which on a filesystem whose journal
        commits in order (ext4, XFS) carries the change too.  A new file's changes
        go with its first commit; under batch, :meth:`before_change` orders them.
        """
        if self.enabled or not PREFIX:
            return
        if inode.is_reg or inode.is_dir:
            fd = syscalls.reopen(inode.fd, os.O_RDONLY | (os.O_DIRECTORY if inode.is_dir else 0))
            try:
                await trio.to_thread.run_sync(fsync_all, [fd], "metadata.before_fsync")
            finally:
                os.close(fd)
            return
        parent = self.table.by_ino.get(min(inode.names)[0]) if inode.names else None
        await sync_dirs([parent if parent is not None else self.table.root],
                        "metadata.before_fsync", self.dirsyncs)

    def must_persist_before_staging(self, inode: Inode) -> bool:
        """Would staging a new version of ``inode`` break the acknowledged order?

        Staged versions are published in the order they were first staged.  A new
        version of a file staged earlier replaces its staged version in place; if
        anything was staged after that one, publishing the file at its old place
        would put this later commit before those (a crash between them keeps a
        later commit without an earlier one: docs/semantics.md §9.2).  Then the
        group is persisted first and the new version is staged last.
        """
        return PREFIX and inode.ino in self.staged and next(reversed(self.staged)) != inode.ino

    async def persist(self, inode: Inode | None = None) -> None:
        """Publish staged versions durably: data synced, published in the order they
        were staged, directories synced.

        With ``inode``: returns once that inode's staged version is durable or
        reported lost (docs/semantics.md §3).  When nothing of it is staged it
        still waits for a group persist under way: that one may have published
        the file and not yet synced its directory.  A failure is reported through
        :attr:`lost` (fsync() reports it), never raised to whoever ran the group.
        """
        if inode is not None and inode.ino not in self.staged \
                and not self._persist_lock.locked():
            return
        async with self._persist_lock:
            if inode is None:
                await self._persist_group()
                return
            # A group skips a version superseded while its data was synced (a commit
            # of the same file by a last release or mmap writeback, which the kernel
            # does not serialize with fsync): the next round publishes the newer one,
            # which holds this one's content.
            for _ in range(100):
                if inode.ino not in self.staged:
                    return
                await self._persist_group()
        raise OSError(errno.EAGAIN, "the file kept being committed; its fsync gave up")

    async def _persist_group(self) -> None:
        """One group persist; the caller holds ``_persist_lock``.

        Invariant: the steps between the awaits (the publishing loop) run as one,
        so the staged dict and the inodes do not change under it.
        """
        items = [(item, item.version, os.dup(item.inode.data_fd))
                 for item in self.staged.values() if item.inode.data_fd is not None]
        changed: dict[int, Inode] = {}
        if not items and not self._changed_dirs:
            return

        def sync_data() -> list[OSError | None]:
            results: list[OSError | None] = []
            for _, _, fd in items:
                try:
                    os.fsync(fd)
                    results.append(None)
                except OSError as exc:
                    results.append(exc)
            return results

        try:
            synced = await trio.to_thread.run_sync(sync_data) if items else []
            faults.point("commit.after_fsync")
            parents: dict[int, Inode] = {}
            published: list[Inode] = []
            for (item, version, fd), error in zip(items, synced, strict=True):
                if item.version != version or self.staged.get(item.inode.ino) is not item:
                    break  # superseded meanwhile: it and all after it go in the next round
                if error is None:
                    try:
                        faults.point("persist.publish")
                        parent = self.publisher.publish(item.inode, fd, item.new_file, item.old_key)
                    except OSError as exc:
                        error = exc
                if error is None:
                    parents[parent.ino] = parent
                    published.append(item.inode)
                    self._unstage(item)
                elif error.errno == errno.EIO and not item.inode.names:
                    self._unstage(item)  # unlinked meanwhile: nothing left to publish
                else:
                    self._lose(item, error)
            changed, self._changed_dirs = self._changed_dirs, {}
            try:
                # with the directories of namespace operations made since the last group
                await sync_dirs(list({**parents, **changed}.values()),
                                "persist.before_dir_fsync", self.dirsyncs)
                faults.point("commit.after_dir_fsync")
            except OSError as exc:  # published and visible, maybe not durable
                self.counters.failed(exc)
                log.warning("group persist: %d file(s) published but their directories not "
                            "synced: %s; they may not survive a power cut; their next fsync() "
                            "reports it", len(published), failure_text(exc))
                for inode in published:
                    self.lost(inode, exc, "unsynced")
        finally:
            for _, _, fd in items:
                os.close(fd)
            for d in changed.values():
                self.table.release(d)

    def _lose(self, item: Staged, exc: OSError) -> None:
        """A staged version could not be published: drop it, put the inode back on
        what SOURCE holds (reads agree with SOURCE), and report the error to the
        file's next fsync() (docs/semantics.md §3)."""
        inode = item.inode
        self.counters.failed(exc)
        log.warning("commit of %s at group persist failed: %s; the source tree keeps its "
                    "previous version; the file's next fsync() reports it",
                    self.publisher.describe(inode), failure_text(exc))
        del self.staged[inode.ino]
        if item.old_fd is not None:
            self.table.unalias(item.old_key, inode)
            self.table.restore(inode, item.old_fd, item.old_key)
        self.lost(inode, exc, "new" if item.new_file else "rewrite")
        self.table.release(inode)

    def _unstage(self, item: Staged) -> None:
        del self.staged[item.inode.ino]
        if item.old_fd is not None:
            self.table.unalias(item.old_key, item.inode)
            self.table.closer(item.old_fd)  # may free the replaced file: off the loop
        self.table.release(item.inode)

    async def run_batches(self) -> None:
        """Background task: persist staged commits within BATCH_DELAY of staging."""
        while True:
            await self.wakeup.wait()
            self.wakeup = trio.Event()
            await trio.sleep(BATCH_DELAY)
            try:
                with self.table.scope():
                    await self.persist()
            except Exception:
                log.exception("group persist failed; retrying")

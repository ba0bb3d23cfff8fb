"""Commit: replace a file's committed version with its session's content, all or nothing.

Rename commit (the default), in this order:
1. fill the shadow: copy the committed version's *data* ranges that the
   session still uses (SEEK_DATA/SEEK_HOLE, so holes stay holes), set the size;
2. metadata: xattrs (ACLs, labels), owner, mode, then times last;
3. ``fsync`` the shadow — the new content is on stable storage;
4. check the target name still is the committed file, link the shadow into the
   daemon's directory under a temporary name and ``rename`` it over the target
   (one atomic step: every observer sees the old or the new file);
5. move the FUSE inode onto the new file (``st_ino`` through the mount stays);
6. ``fsync`` the directory — the new entry is durable — before returning.

The rename (or, for a new file, the link; for a journalled commit, the
record's fsync) is the commit's *point of no return*.  Everything needed after
it (the new file's O_PATH fd, its stat and handle, a descriptor of the
directory to fsync) is got before it; what follows is bookkeeping that cannot
fail, and the directory fsync, whose failure is logged and counted but never
reported as a failed commit: the commit happened (docs/semantics.md §11).
Ownership of the shadow's fd passes to :meth:`Committer._install` at the point
of no return: before it, a failure leaves the fd to the caller; after it, the
caller must not touch it (two owners closing one fd number was how a deferred
close in the housekeeper came to close another file's fd).

A crash before 4 leaves the committed version and an unnamed shadow the
filesystem frees; between the link and the rename, a temporary name in the
daemon's directory that recovery removes; after the rename, the new version.

New files (pending) are published by ``linkat`` of their shadow to their name,
after the same fill/fsync; the name appears only with complete content.

Where the filesystem can reflink (XFS with reflink=1, btrfs), step 1 instead
clones the committed version into a fresh file and writes only the changed
ranges into it, so the cost follows the change, not the file's size.

Journalled in-place commit (:mod:`atomicfs.journal`): the changed extents are
written to a redo record first, then applied to the file itself.  Used for
hard-linked files (a rename would split the link) and, under ``commit=auto``,
for large files with small changes where no reflink is available (see
:meth:`Committer.choose`).  Without the journal (a daemon that cannot reopen
files by handle, i.e. not root), hard-linked files are written in place
without a record: durable, but not atomic across a crash.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any

import trio

from . import faults, journal, metadata, recovery, syscalls
from .batch import Batch
from .dirsync import DirSyncs
from .extents import Kind
from .housekeeping import Housekeeper
from .inodes import Inode, InodeTable
from .publish import CommitStats, NotDurable, Publisher, failure_text
from .reads import Reads
from .sessions import Session
from .shadows import Shadows

log = logging.getLogger(__name__)


# auto: a journalled commit when the unchanged data to copy exceeds this many bytes
# and is more than JOURNAL_RATIO times the changed bytes (docs/semantics.md §1,
# "How a commit is made").
JOURNAL_MIN_COPY = 8 << 20
JOURNAL_RATIO = 4



# Commit points with nobody left to receive a failure: the data is dropped (log line).
_DROPPED_AT = ("last close", "unmount")


class Committer:
    """Makes commits; the caller holds ``session.lock``."""

    def __init__(self, table: InodeTable, daemon_dir: int, publisher: Publisher,
                 shadows: Shadows, batch: Batch, reads: Reads, housekeeper: Housekeeper,
                 stats: CommitStats, dirsyncs: DirSyncs, strategy: str = "auto") -> None:
        self.table = table
        self.dirsyncs = dirsyncs  # a commit's directory fsync is recorded there
        self.daemon_dir = daemon_dir
        self.publisher = publisher
        self.shadows = shadows
        self.batch = batch
        self.reads = reads
        self.housekeeper = housekeeper
        self.strategy = strategy
        self.counters = stats
        self.in_flight = 0  # commits started and not yet finished (status, shutdown)
        self.journal_ok = journal.available(table.root.fd)
        self.reflink_ok = probe_reflink(daemon_dir)
        self._records = 0

    def describe(self, inode: Inode) -> str:
        """A path of the file relative to the mount, for messages (best effort)."""
        return self.publisher.describe(inode)

    def stats(self) -> dict[str, Any]:
        """For the status document: the counters since mount, commits under way, and
        what the source filesystem offers."""
        return {**self.counters.summary(), "commits_in_flight": self.in_flight,
                "reflink": self.reflink_ok, "journal": self.journal_ok}

    def choose(self, session: Session, committed: os.stat_result, links: int) -> str:
        """The commit strategy for this session (the cost model; docs/semantics.md §1)."""
        if links > 1:
            return "journal" if self.journal_ok else "inplace"
        if self.strategy == "journal" and self.journal_ok:
            return "journal"
        if self.reflink_ok:
            return "reflink"
        if self.strategy == "auto" and self.journal_ok:
            kept = session.emap.count(Kind.COMMITTED)
            if committed.st_size and committed.st_blocks * 512 < committed.st_size:
                kept = kept * committed.st_blocks * 512 // committed.st_size  # sparse
            changed = session.emap.count(Kind.SHADOW) + session.emap.count(Kind.HOLE)
            if kept > JOURNAL_MIN_COPY and kept > JOURNAL_RATIO * changed:
                return "journal"
        return "rename"

    async def commit(self, session: Session, data_fd: Callable[[Inode], int],
                     at: str = "close") -> bool:
        """Commit the session if it has changes. Returns True if a commit was made.

        ``at`` names the commit point (close, fsync, last close, unmount...) for
        the one warning line a failure logs.  Raises OSError (ENOSPC, EIO...)
        with the committed version unchanged.
        """
        if not session.dirty:
            return False
        inode = session.inode
        started = time.monotonic()
        self.in_flight += 1
        try:
            if session.pending:
                if not inode.names:
                    return False  # unlinked before its first commit: it never existed
                await self._publish_new(session)
                kind = "new"
            else:
                committed = os.stat(inode.fd)
                links = self.batch.source_links(inode)
                if links == 0:
                    return False  # unlinked while written: its data vanishes at release
                kind = self.choose(session, committed, links)
                if kind in ("journal", "inplace"):
                    # straight to SOURCE, durable at once: under batch, after what was
                    # staged before it (docs/semantics.md §9.2)
                    await self.batch.before_change()
                if kind == "journal":
                    await self._journalled(session)
                elif kind == "inplace":
                    await self._in_place(session)
                else:
                    await self._rename(session, committed, data_fd(inode), kind == "reflink")
        except NotDurable:
            raise  # the commit happened; logged and counted by _sync_dirs
        except OSError as exc:
            if self.nameless(session):
                # Unlinked (or replaced by a rename) while the commit ran: the file is
                # gone from the tree, and its content with it at the last release, as
                # on any filesystem.  Nothing was lost that anyone could still open:
                # no failure (docs/semantics.md §2.5).
                log.debug("commit of inode %d at %s dropped: the file lost its last name "
                          "meanwhile (%s)", inode.ino, at, failure_text(exc))
                return False
            self.counters.failed(exc)
            log.warning("commit of %s at %s failed: %s; the committed version is unchanged; "
                        "%s", self.describe(inode), at, failure_text(exc),
                        "the uncommitted data is dropped" if at in _DROPPED_AT
                        else "the error was returned to the caller")
            log.debug("the failed commit's traceback", exc_info=True)
            raise
        finally:
            self.in_flight -= 1
        self.counters.commits[kind] += 1
        self.counters.bytes_committed += session.size
        self.counters.latencies.append(time.monotonic() - started)
        log.debug("committed inode %d (%s, %d bytes)", inode.ino, kind, session.size)
        session.commits += 1
        return True

    def nameless(self, session: Session) -> bool:
        """Has the file no name left, through the mount or in SOURCE?  (A pending file
        whose names were all unlinked; a committed one whose source file has no link.)"""
        inode = session.inode
        if session.pending:
            return not inode.names
        try:
            return self.batch.source_links(inode) == 0
        except OSError:
            return False

    # -- strategies ------------------------------------------------------------
    def _new_shadow(self, session: Session) -> int:
        if session.shadow is None:
            session.shadow = self.shadows.make(session.inode)
        return session.shadow

    async def _rename(self, session: Session, committed: os.stat_result, data_fd: int,
                      clone: bool) -> None:
        inode = session.inode
        plan = list(session.emap.extents())
        size = session.size
        mtime = session.mtime_ns if session.mtime_ns is not None else committed.st_mtime_ns
        sync = not self.batch.enabled
        if clone:
            changes = session.shadow
            shadow = self.shadows.make(inode)
        else:
            changes = None
            shadow = self._new_shadow(session)
        # The thread reads the committed version through a descriptor of its own: the
        # inode's may be replaced and closed meanwhile (a failed group persist puts the
        # inode back on SOURCE's file, docs/semantics.md §3).
        try:
            data_fd = os.dup(data_fd)
        except BaseException:
            if clone:
                os.close(shadow)
            raise

        def build() -> None:
            if not clone:  # fill the shadow with the unchanged data
                for ext in plan:
                    if ext.kind is Kind.COMMITTED:
                        for a, b in syscalls.data_ranges(data_fd, ext.start, ext.end):
                            syscalls.copy_range(data_fd, shadow, a, b - a)
            else:  # clone the committed version, then write the changes into the clone
                syscalls.clone_file(shadow, data_fd)
                for ext in plan:
                    if ext.kind is Kind.SHADOW and changes is not None:
                        # the shadow's own holes (never written) are holes here too
                        for a, b, data in syscalls.split_by_data(changes, ext.start, ext.end):
                            if data:
                                syscalls.copy_range(changes, shadow, a, b - a)
                            else:
                                syscalls.punch_hole(shadow, a, b - a)
                    elif ext.kind is Kind.HOLE:
                        syscalls.punch_hole(shadow, ext.start, ext.length)
            os.ftruncate(shadow, size)
            metadata.replace_xattrs(inode.fd, shadow)
            syscalls.fchown_fd(shadow, committed.st_uid, committed.st_gid)
            os.fchmod(shadow, stat.S_IMODE(committed.st_mode))
            syscalls.utimens_fd(shadow, committed.st_atime_ns, mtime)
            if sync:
                faults.point("commit.before_fsync")
                os.fsync(shadow)
                faults.point("commit.after_fsync")

        # Without an fsync or data to copy, the steps are a few cheap syscalls: run them
        # here rather than pay a thread's round trip (durability=batch saves).
        quick = not sync and not clone and session.emap.count(Kind.COMMITTED) == 0
        try:
            await _blocking(build, quick)
        except BaseException:
            if clone:
                os.close(shadow)
            raise
        finally:
            os.close(data_fd)
        if not clone:
            session.shadow = None  # the new version from here
        # From the check of the name to the swap there is no await (_install).
        try:
            dir_fd = await self._install(session, shadow, new_file=False)
        except BaseException:
            if not clone and os.fstat(shadow).st_nlink == 0:
                session.shadow = shadow  # linked nowhere: still the session's content
            else:
                os.close(shadow)
            raise
        if clone:
            session.close()  # the shadow of changes; the clone is the new version
        await self._sync_dir(dir_fd, session.inode)

    async def _publish_new(self, session: Session) -> None:
        shadow = session.shadow
        if shadow is None:
            raise OSError(errno.EIO, "a new file without its shadow")
        size = session.size
        mtime = session.mtime_ns
        sync = not self.batch.enabled

        def build() -> None:
            os.ftruncate(shadow, size)
            if mtime is not None:
                syscalls.utimens_fd(shadow, None, mtime)
            if sync:
                faults.point("commit.before_fsync")
                os.fsync(shadow)
                faults.point("commit.after_fsync")

        await _blocking(build, not sync)
        session.shadow = None
        try:
            dir_fd = await self._install(session, shadow, new_file=True)
        except BaseException:
            session.shadow = shadow  # not published: still the only copy of the new file
            raise
        await self._sync_dir(dir_fd, session.inode)

    async def _install(self, session: Session, fd: int, new_file: bool) -> int | None:
        """Make ``fd`` (complete, fsync'ed unless batch) the file's committed version.

        Full durability: publish it in the source tree now; returns a descriptor of
        its directory, to fsync (:meth:`_sync_dir`) before the commit is
        acknowledged.  Batch: stage it — visible through the mount at once,
        published by a later group persist (:meth:`Batch.persist`), after the ones
        staged before it; returns None.  On an exception nothing changed and ``fd``
        is still the caller's; once it returns, ``fd`` belongs to the inode table.
        From the check of the file's name to the swap there is no await.
        """
        inode = session.inode
        size = session.size
        dir_fd = None
        if self.batch.enabled:
            if self.batch.must_persist_before_staging(inode):
                await self.batch.persist()
            self.batch.stage(inode, fd, new_file)  # all or nothing
        else:
            # Before the point of no return: everything the steps after it need.
            where = self.publisher.find_name(inode, inode.key)
            backing = None if new_file else self.table.prepare(fd)
            try:
                dir_fd = syscalls.reopen(where[0].fd, os.O_RDONLY | os.O_DIRECTORY)
            except BaseException:
                if backing is not None:
                    os.close(backing.fd)
                raise
            try:
                self.publisher.publish(inode, fd, new_file, inode.key, where)
            except BaseException:
                os.close(dir_fd)
                if backing is not None:
                    os.close(backing.fd)
                raise
            # Past the point of no return: nothing below raises; fd is ours now.
            self.publisher.become(inode, fd, new_file, keep_fd=False, backing=backing)
        # The session's content is the committed version from here, before the next
        # await: a read during the directory's fsync reads the new file (the shadow it
        # was written into is the new file now, no longer the session's).
        session.emap.reset(size)
        session.base_size = size
        session.mtime_ns = None
        session.pending = False
        return dir_fd

    async def _sync_dir(self, dir_fd: int | None, inode: Inode) -> None:
        """fsync the directory of a commit that happened (``dir_fd``: ours, closed here).

        Raises :class:`NotDurable` (EIO) if that could not be made sure of: the
        commit stands, but the call must not report it durable (docs/semantics.md §11)."""
        if dir_fd is not None:
            # read in the event loop after the publish, before the fsync starts
            snap = self.dirsyncs.snapshot(dir_fd)
            with trio.CancelScope(shield=True):
                durable = await trio.to_thread.run_sync(self._sync_dirs, [dir_fd], [inode])
            if durable:
                self.dirsyncs.synced([snap])
            if not durable:
                raise NotDurable(f"the commit of {self.describe(inode)} is done but not "
                                 "known durable")

    def _sync_dirs(self, dir_fds: list[int], inodes: list[Inode]) -> bool:
        """fsync directories (fds of ours, closed here) after commits that happened.

        Returns whether they are known durable.  Never raises: the commits happened
        and a failure here cannot undo them.  A failed fsync is retried as a syncfs;
        if that fails too, or the filesystem went down meanwhile (XFS answers a
        directory fsync after a shutdown with success: syscalls.fsync_dir_fd), it is
        logged and counted, and the caller fails the call that asked for the commit
        with EIO (docs/semantics.md §11).  Runs in a worker thread: it touches no
        table state but counters."""
        durable = True
        for dir_fd in dir_fds:
            try:
                try:
                    faults.point("commit.before_dir_fsync")  # a slow disk: sleep:...
                    faults.point("commit.dir_fsync")
                    syscalls.fsync_dir_fd(dir_fd)
                except OSError as exc:
                    try:
                        syscalls.syncfs(dir_fd)
                        syscalls.check_up(dir_fd)
                    except OSError:
                        durable = False
                        self.counters.not_durable += 1
                        log.error("commits of %s are done and visible, but their directory "
                                  "could not be synced (%s): a power cut may bring back the "
                                  "previous versions; the call gets EIO",
                                  ", ".join(self.describe(i) for i in inodes),
                                  failure_text(exc))
                    else:
                        log.warning("directory fsync failed (%s); synced by syncfs instead",
                                    failure_text(exc))
            finally:
                os.close(dir_fd)
        self.publisher.past_no_return(inodes[0], "commit.after_dir_fsync")
        return durable

    @staticmethod
    def _changes(session: Session) -> tuple[list[journal.Change], int, int | None]:
        """The session's changes as journal records them (blocking: SEEK_DATA calls).

        Where the shadow has a hole inside a SHADOW range (bytes never written,
        or a gap a spill left), the change is a hole: no zeros are written.
        """
        changes: list[journal.Change] = []
        shadow = session.shadow
        for ext in session.emap.extents():
            if ext.kind is Kind.COMMITTED:
                continue
            if ext.kind is Kind.HOLE or shadow is None:
                kind = journal.HOLE if ext.kind is Kind.HOLE else journal.DATA
                changes.append(journal.Change(ext.start, ext.length, kind))
                continue
            for a, b, data in syscalls.split_by_data(shadow, ext.start, ext.end):
                changes.append(journal.Change(a, b - a, journal.DATA if data else journal.HOLE))
        return changes, session.size, session.mtime_ns

    async def _journalled(self, session: Session) -> None:
        """Redo record first, then apply in place (atomic across a crash; journal.py)."""
        inode = session.inode
        changes, size, mtime = await trio.to_thread.run_sync(self._changes, session)
        record = journal.Record(journal.file_id(inode.fd), size, mtime, tuple(changes))
        shadow = session.shadow if session.shadow is not None else -1
        self._records += 1
        name = f"{journal.RECORD_PREFIX}{os.getpid()}-{self._records:012d}"
        target = syscalls.reopen(inode.fd, os.O_RDWR)
        try:
            # space for filling holes first: ENOSPC must come before the record
            reserved = await trio.to_thread.run_sync(journal.reserve, target, record)
            try:
                try:
                    await trio.to_thread.run_sync(journal.write_record, self.daemon_dir, name,
                                                  record, shadow)
                except FileNotFoundError:  # SOURCE/.atomicfs removed beside the mount
                    if not recovery.revive_daemon_dir(self.table.root.fd, self.daemon_dir):
                        raise
                    await trio.to_thread.run_sync(journal.write_record, self.daemon_dir, name,
                                                  record, shadow)
            except BaseException:
                await trio.to_thread.run_sync(journal.unreserve, target, reserved)
                raise
        except BaseException:
            os.close(target)
            raise
        # Durable from here (write-ahead): the point of no return.  The target's fsync
        # and the record's removal follow off the call's path (journal.py, 3.).
        for attempt in (1, 2):  # the redo is idempotent: one retry
            try:
                faults.point("commit.journal_apply")
                await self.reads.apply(session, lambda fd: journal.apply(fd, record, shadow, None,
                                                                     sync=False), target)
                break
            except OSError as exc:
                if attempt == 1:
                    continue
                self.counters.not_durable += 1
                log.error("commit of %s is recorded in the journal but could not be applied "
                          "now (%s); the commit stands: the next mount replays record %s",
                          self.describe(inode), failure_text(exc), name)
                self.table.closer(target)
                return
        self.housekeeper.settle_later(target, name)

    async def _in_place(self, session: Session) -> None:
        """In place without a record: durable, not crash-atomic (no journal available)."""
        changes, size, mtime = await trio.to_thread.run_sync(self._changes, session)
        record = journal.Record(journal.FileId(0, 0, b""), size, mtime, tuple(changes))
        shadow = session.shadow if session.shadow is not None else -1
        target = syscalls.reopen(session.inode.fd, os.O_RDWR)
        try:  # out of space before the first byte changes, where fallocate can tell
            await trio.to_thread.run_sync(journal.reserve, target, record)
            await self.reads.apply(session, lambda fd: journal.apply(fd, record, shadow, None),
                              target)
        finally:
            os.close(target)


async def _blocking(fn: Callable[[], None], quick: bool) -> None:
    """Run ``fn`` in a worker thread, or right here when ``quick`` (no fsync, no copy)."""
    if quick:
        fn()
    else:
        await trio.to_thread.run_sync(fn)


def probe_reflink(dir_fd: int) -> bool:
    """Does the filesystem of ``dir_fd`` support FICLONE?"""
    try:
        a = syscalls.tmpfile(dir_fd)
    except OSError:
        return False
    try:
        b = syscalls.tmpfile(dir_fd)
        try:
            os.pwrite(a, b"x" * 4096, 0)
            syscalls.clone_file(b, a)
            return True
        except OSError:
            return False
        finally:
            os.close(b)
    finally:
        os.close(a)

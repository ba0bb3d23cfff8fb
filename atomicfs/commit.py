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
import secrets
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from . import faults, journal, metadata, syscalls
from .extents import Kind
from .housekeeping import Housekeeper
from .inodes import Backing, Inode, InodeTable, Key, stat_at
from .sessions import Session

log = logging.getLogger(__name__)


STRATEGIES = ("rename", "reflink", "journal", "inplace", "new")
# auto: a journalled commit when the unchanged data to copy exceeds this many bytes
# and is more than JOURNAL_RATIO times the changed bytes (docs/semantics.md §1,
# "How a commit is made").
JOURNAL_MIN_COPY = 8 << 20
JOURNAL_RATIO = 4


# Test knob: every read of a committed file goes through a worker thread, as a
# cold one does (tests exercise the thread path without dropping the page cache).
THREADED_READS = os.environ.get("ATOMICFS_THREADED_READS") == "1"
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


@dataclass
class CommitStats:
    commits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STRATEGIES, 0))
    bytes_committed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    # commits that happened but whose directory fsync (or deferred apply) failed
    not_durable: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

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


# Commit points with nobody left to receive a failure: the data is dropped (log line).
_DROPPED_AT = ("last close", "unmount")


def _fsync_all(fds: list[int], point: str) -> None:
    faults.point(point)  # in the worker thread: the loop goes on
    for fd in fds:
        syscalls.fsync_dir_fd(fd)  # EIO if the filesystem went down (XFS answers 0)


async def sync_dirs(dirs: list[Inode], point: str = "dirs.before_fsync") -> None:
    """fsync directories in a worker thread.

    The thread gets descriptors opened here, never an inode's O_PATH fd: a
    directory the kernel forgets is dropped and its fd closed while the thread
    runs, and its number may be reused by another file (whose fsync would then
    stand in for the directory's)."""
    fds: list[int] = []
    try:
        for d in dirs:
            fds.append(syscalls.reopen(d.fd, os.O_RDONLY | os.O_DIRECTORY))
        await trio.to_thread.run_sync(_fsync_all, fds, point)
    finally:
        for fd in fds:
            os.close(fd)


def _replace_xattrs(src_fd: int, dst_fd: int) -> None:
    """Make dst's xattrs exactly src's (dst may have inherited default ACLs)."""
    wanted = metadata.list_xattrs(src_fd)
    for name in metadata.list_xattrs(dst_fd):
        if name not in wanted:
            try:
                metadata.remove_xattr(dst_fd, name)
            except Exception:  # a label the fs will not drop: keep it
                log.debug("could not remove xattr %r from a shadow", name)
    metadata.copy_xattrs(src_fd, dst_fd, wanted)


class Committer:
    """Makes commits; the caller holds ``session.lock``."""

    def __init__(self, table: InodeTable, daemon_dir: int,
                 find_name: Callable[[Inode, Key | None], tuple[Inode, bytes]],
                 published: Callable[[Inode], None], strategy: str = "auto",
                 durability: str = "full", housekeeper: Housekeeper | None = None) -> None:
        self.table = table
        self.daemon_dir = daemon_dir
        self.housekeeper = housekeeper or Housekeeper(daemon_dir)
        self.find_name = find_name
        self.published = published
        self.strategy = strategy
        self.stats = CommitStats()
        self.in_flight = 0  # commits started and not yet finished (status, shutdown)
        self.journal_ok = journal.available(table.root.fd)
        self.reflink_ok = probe_reflink(daemon_dir)
        self._records = 0
        self.applying: dict[int, trio.Event] = {}  # inode -> set when its in-place apply ends
        self.reading: dict[int, int] = {}  # inode -> reads of its committed file in threads
        self.reads = {"from_cache": 0, "in_thread": 0}  # reads of committed files, by path
        self._read_done: dict[int, trio.Event] = {}  # set when an inode's reading drops to 0
        self.batch = durability == "batch"
        self.staged: dict[int, Staged] = {}
        self.wakeup = trio.Event()
        self._persist_lock = trio.Lock()
        self._changed_dirs: dict[int, Inode] = {}  # batch: to fsync in the next group
        # told of a staged version that was lost ("new", "rewrite") or published but
        # maybe not durable ("unsynced"): set by Files, which reports it to fsync()
        self.lost: Callable[[Inode, OSError, str], None] = lambda inode, exc, how: None

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
                links = self.source_links(inode)
                if links == 0:
                    return False  # unlinked while written: its data vanishes at release
                kind = self.choose(session, committed, links)
                if kind in ("journal", "inplace"):
                    # straight to SOURCE, durable at once: under batch, after what was
                    # staged before it (docs/semantics.md §9.2)
                    await self.before_change()
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
            self.stats.failed(exc)
            log.warning("commit of %s at %s failed: %s; the committed version is unchanged; "
                        "%s", self.describe(inode), at, failure_text(exc),
                        "the uncommitted data is dropped" if at in _DROPPED_AT
                        else "the error was returned to the caller")
            log.debug("the failed commit's traceback", exc_info=True)
            raise
        finally:
            self.in_flight -= 1
        self.stats.commits[kind] += 1
        self.stats.bytes_committed += session.size
        self.stats.latencies.append(time.monotonic() - started)
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
            return self.source_links(inode) == 0
        except OSError:
            return False

    # -- strategies ------------------------------------------------------------
    def make_shadow(self, inode: Inode) -> int:
        """A new unnamed file on the inode's filesystem: a ready one from the pool (in
        the daemon's directory) where the file is on the source root's filesystem,
        else one made in the file's directory."""
        if inode.key[0] == self.table.dev:
            fd = self.housekeeper.take_shadow()
            if fd is not None:
                return fd
        try:
            dir_fd = self.find_name(inode, None)[0].fd
        except OSError:  # unlinked while open: never committed, any directory will do
            dir_fd = self.daemon_dir
        return syscalls.tmpfile(dir_fd)

    def new_file_shadow(self, parent: Inode, parent_st: os.stat_result, mode: int) -> int:
        """The unnamed file that becomes a new file in ``parent`` at its first commit.

        A ready one from the pool (made in the daemon's directory) when the parent
        would give a file made in it nothing a file made elsewhere lacks: same
        filesystem, no default ACL, no security label, and (for an unprivileged
        daemon, which cannot chown) no setgid group; else one made in ``parent``.
        """
        if (parent.key[0] == self.table.dev
                and (metadata.IS_ROOT or not parent_st.st_mode & stat.S_ISGID)
                and not any(n == b"system.posix_acl_default" or n.startswith(b"security.")
                            for n in metadata.list_xattrs(parent.fd))):
            fd = self.housekeeper.take_shadow()
            if fd is not None:
                try:
                    os.fchmod(fd, mode & 0o7777)
                    syscalls.touch_fd(fd, atime=True)  # made now, by the kernel's clock
                except BaseException:
                    os.close(fd)
                    raise
                return fd
        return syscalls.tmpfile(parent.fd, mode & 0o7777)

    def _new_shadow(self, session: Session) -> int:
        if session.shadow is None:
            session.shadow = self.make_shadow(session.inode)
        return session.shadow

    async def _rename(self, session: Session, committed: os.stat_result, data_fd: int,
                      clone: bool) -> None:
        inode = session.inode
        plan = list(session.emap.extents())
        size = session.size
        mtime = session.mtime_ns if session.mtime_ns is not None else committed.st_mtime_ns
        sync = not self.batch
        if clone:
            changes = session.shadow
            shadow = self.make_shadow(inode)
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
            _replace_xattrs(inode.fd, shadow)
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
        sync = not self.batch

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
        published by a later group persist (:meth:`persist`), after the ones
        staged before it; returns None.  On an exception nothing changed and ``fd``
        is still the caller's; once it returns, ``fd`` belongs to the inode table.
        From the check of the file's name to the swap there is no await.
        """
        inode = session.inode
        size = session.size
        dir_fd = None
        if self.batch:
            if self._must_persist_before_staging(inode):
                await self.persist()
            self._stage(inode, fd, new_file)  # all or nothing
        else:
            # Before the point of no return: everything the steps after it need.
            where = self.find_name(inode, inode.key)
            backing = None if new_file else self.table.prepare(fd)
            try:
                dir_fd = syscalls.reopen(where[0].fd, os.O_RDONLY | os.O_DIRECTORY)
            except BaseException:
                if backing is not None:
                    os.close(backing.fd)
                raise
            try:
                self._publish(inode, fd, new_file, inode.key, where)
            except BaseException:
                os.close(dir_fd)
                if backing is not None:
                    os.close(backing.fd)
                raise
            # Past the point of no return: nothing below raises; fd is ours now.
            self._become(inode, fd, new_file, keep_fd=False, backing=backing)
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
            with trio.CancelScope(shield=True):
                durable = await trio.to_thread.run_sync(self._sync_dirs, [dir_fd], [inode])
            if not durable:
                raise NotDurable(f"the commit of {self.describe(inode)} is done but not "
                                 "known durable")

    def _publish(self, inode: Inode, fd: int, new_file: bool, old_key: Key | None,
                 where: tuple[Inode, bytes] | None = None) -> Inode:
        """Put ``fd`` in the source tree at the inode's name (synchronous steps only).

        Raises only before the point of no return (the link of a new file, the
        rename over an old one), with the source tree unchanged."""
        parent, name = where or self.find_name(inode, old_key)
        if new_file:
            syscalls.link_fd(fd, parent.fd, name)
            self._past_no_return(inode, "commit.after_link")
            try:
                self.published(inode)
            except Exception:  # pragma: no cover - bookkeeping; a bug, logged
                log.exception("commit of %s: the new file is in place, its pending "
                              "entry was not updated", self.describe(inode))
            return parent
        tmp = b"commit-" + secrets.token_hex(8).encode()
        syscalls.link_fd(fd, self.daemon_dir, tmp)
        try:
            faults.point("commit.after_link")
            syscalls.renameat2(self.daemon_dir, tmp, parent.fd, name)
        except BaseException:
            os.unlink(tmp, dir_fd=self.daemon_dir)
            raise
        self._past_no_return(inode, "commit.after_rename")
        return parent

    def _past_no_return(self, inode: Inode, point: str) -> None:
        """A fault point after a commit's point of no return: a failure injected here
        stands for a bookkeeping step failing; the commit stands (it is logged)."""
        try:
            faults.point(point)
        except Exception as exc:
            log.warning("commit of %s: a step after its point of no return failed (%s); "
                        "the commit stands", self.describe(inode), exc)

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
                        self.stats.not_durable += 1
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
        self._past_no_return(inodes[0], "commit.after_dir_fsync")
        return durable

    def _become(self, inode: Inode, fd: int, new_file: bool, keep_fd: bool,
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

    # -- batch durability: staging and group persist ------------------------------------
    def _stage(self, inode: Inode, fd: int, new_file: bool) -> None:
        item = self.staged.get(inode.ino)
        # got before anything changes: staging is all or nothing
        backing = None if new_file else self.table.prepare(fd)
        old_fd = inode.fd if backing is not None and item is None else None
        if item is None:
            item = Staged(inode, None if new_file else inode.key, new_file)
            self.staged[inode.ino] = item
            inode.holders += 1
            if backing is not None:  # the source still holds the old file: keep finding it
                item.old_fd = old_fd
                self.table.rebind(inode, backing, data_fd=fd, keep_old=True)
                self.table.alias(item.old_key, inode)
                self.wakeup.set()
                return
        item.version += 1
        self._become(inode, fd, new_file, keep_fd=True, backing=backing)
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
        if something was staged after it (:meth:`_must_persist_before_staging`).
        Code after this call must reach the change without an await.
        """
        if not self.batch or not self.staged or not PREFIX:
            return
        if inode is not None and inode.ino in self.staged:
            if self._must_persist_before_staging(inode):
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
        if self.batch:
            for d in dirs:
                if d.ino not in self._changed_dirs:
                    d.holders += 1  # its fd stays open until the group fsyncs it
                    self._changed_dirs[d.ino] = d
            self.wakeup.set()
            return
        await sync_dirs(dirs)

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
        if self.batch or not PREFIX:
            return
        if inode.is_reg or inode.is_dir:
            fd = syscalls.reopen(inode.fd, os.O_RDONLY | (os.O_DIRECTORY if inode.is_dir else 0))
            try:
                await trio.to_thread.run_sync(_fsync_all, [fd], "metadata.before_fsync")
            finally:
                os.close(fd)
            return
        parent = self.table.by_ino.get(min(inode.names)[0]) if inode.names else None
        await sync_dirs([parent if parent is not None else self.table.root],
                        "metadata.before_fsync")

    def _must_persist_before_staging(self, inode: Inode) -> bool:
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
            faults.point("persist.before_fsync")  # a worker thread: the loop serves on
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
                        parent = self._publish(item.inode, fd, item.new_file, item.old_key)
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
                                "persist.before_dir_fsync")
                faults.point("commit.after_dir_fsync")
            except OSError as exc:  # published and visible, maybe not durable
                self.stats.failed(exc)
                log.warning("group persist: %d file(s) published but their directories not "
                            "synced: %s; they may not survive a power cut; their next fsync() "
                            "reports it", len(published), failure_text(exc))
                for inode in published:
                    self.lost(inode, exc, "unsynced")
        finally:
            for _, _, fd in items:
                os.close(fd)
            for d in changed.values():
                d.holders -= 1
                self.table.maybe_drop(d)

    def _lose(self, item: Staged, exc: OSError) -> None:
        """A staged version could not be published: drop it, put the inode back on
        what SOURCE holds (reads agree with SOURCE), and report the error to the
        file's next fsync() (docs/semantics.md §3)."""
        inode = item.inode
        self.stats.failed(exc)
        log.warning("commit of %s at group persist failed: %s; the source tree keeps its "
                    "previous version; the file's next fsync() reports it",
                    self.describe(inode), failure_text(exc))
        del self.staged[inode.ino]
        if item.old_fd is not None:
            self.table.unalias(item.old_key, inode)
            self.table.restore(inode, item.old_fd, item.old_key)
        inode.holders -= 1
        self.lost(inode, exc, "new" if item.new_file else "rewrite")
        self.table.maybe_drop(inode)

    def _unstage(self, item: Staged) -> None:
        del self.staged[item.inode.ino]
        if item.old_fd is not None:
            self.table.unalias(item.old_key, item.inode)
            self.table.closer(item.old_fd)  # may free the replaced file: off the loop
        item.inode.holders -= 1
        self.table.maybe_drop(item.inode)

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
                await self._apply(session, lambda fd: journal.apply(fd, record, shadow, None,
                                                                     sync=False), target)
                break
            except OSError as exc:
                if attempt == 1:
                    continue
                self.stats.not_durable += 1
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
            await self._apply(session, lambda fd: journal.apply(fd, record, shadow, None),
                              target)
        finally:
            os.close(target)

    async def read_committed(self, inode: Inode, size: int, offset: int) -> bytes:
        """Read the committed file: from the page cache at once, else in a worker
        thread (a cold read does not stall the event loop, and the kernel's
        read-ahead requests reach the disk side by side).  A read waits for an
        in-place apply of its file, and the apply for the threaded reads begun
        before it (:meth:`_apply`), so none sees a mix."""
        applying = self.applying.get(inode.ino)
        if applying is not None:  # an in-place commit is half-applied: wait for it
            await applying.wait()
        fd = self.table.data(inode)
        data = None if THREADED_READS else syscalls.pread_cached(fd, size, offset)
        if data is not None:
            self.reads["from_cache"] += 1
            return data
        self.reads["in_thread"] += 1
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

    async def _apply(self, session: Session, work: Callable[[int], None],
                     target: int) -> None:
        """Run ``work(target)`` in a thread while isolated readers of the file wait
        (``target``: the file open for writing, the caller's to close)."""
        await self.exclusive(session.inode, lambda: work(target))
        if session.shadow is not None:
            os.ftruncate(session.shadow, 0)
        session.emap.reset(session.size)
        session.base_size = session.size
        session.mtime_ns = None


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

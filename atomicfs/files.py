"""Open regular files: handles, write sessions, and the commit points.

Policy (docs/semantics.md §2, §4):
- An open that can modify the file (write access, O_TRUNC) joins the inode's
  write session, creating it if needed; O_TRUNC empties the session, never the
  committed file.  A create makes a *pending* file with a session.
- ``flush`` (every close) commits if *this* handle wrote since its last commit
  point, and returns the commit's error to close().  A close without writes
  (the shell's open/dup2/close before writing) commits nothing.  Nor does a
  close by the exit of a child that wrote nothing while the process that opened
  the handle still holds it (``/bin/true`` inside ``( ... ) > f``: the shell
  goes on writing), nor the close of a process being killed by a signal, whose
  unfinished writes are dropped at the last release (:mod:`atomicfs.processes`).
- ``fsync`` commits the session so far, durably; the session goes on.
- The last ``release`` of a session commits what is left (mmap writeback,
  truncate-only sessions, descriptors that never flushed), then ends it.
- A read-only open while a session exists is *isolated* under
  ``isolation=committed``: it bypasses the page cache (direct_io) and reads
  the committed version -- unless the opening process is writing the file (it
  holds a descriptor of it open for writing: it reads its own writes), or a
  process writing the file maps it shared (readers then map it too: LMDB).
  docs/semantics.md §4; :meth:`OpenFiles._isolated`.  Every other handle reads the
  session's content, which is also what the kernel's page cache holds.
- The kernel's page cache is kept across opens (``keep_cache``): it holds what
  was written through it, which a commit makes the committed content.  When a
  session ends without committing what it holds (a failed last commit, an
  unlinked file), the cached pages are dropped: the next open of the file asks
  the kernel to drop them, and handles still open are invalidated by the
  housekeeper.
- Opens wait for a commit in progress on the same file, so an open after a
  close() returned sees what that close committed.
- A session that only appends is a log, committed in steps (checkpoints,
  :mod:`atomicfs.appends`, docs/semantics.md §10); a reader's open
  checkpoints it first, so an isolated reader sees every append made before
  its open, and every checkpoint after.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from . import metadata, processes, syscalls
from .appends import Appends
from .batch import Batch
from .commit import Committer
from .extents import ExtentMap, Kind
from .housekeeping import Housekeeper
from .inodes import Inode, InodeTable
from .namespace import Namespace
from .reads import Reads
from .sessions import Session
from .shadows import Shadows
from .transactions import Transactions

log = logging.getLogger(__name__)

WRITE_MODES = (os.O_WRONLY, os.O_RDWR)
MAX_WRITERS_ASKED = 16  # processes whose maps a read-only open reads, at most


def can_modify(flags: int) -> bool:
    return (flags & os.O_ACCMODE) in WRITE_MODES or bool(flags & os.O_TRUNC)


@dataclass(eq=False)
class FileHandle:
    fh: int
    inode: Inode
    flags: int
    session: Session | None  # the write session, for handles that can write
    isolated: bool  # reads come from the committed version
    pid: int = 0  # the process that opened it
    wrote: bool = False  # wrote (or truncated) since this handle's last commit point
    maps_shared: bool = False  # its opener was seen mapping the file MAP_SHARED
    lost: int = 0  # errno of a staged version lost since this handle's last fsync (batch)
    tx: Any = None  # the transaction of its opener (docs/semantics.md §14)


@dataclass(eq=False)
class OpenState:
    """What is open: handles, write sessions, and what a lost staged version left for
    them.  Built before the components that report into it (the group persist,
    through :class:`LostVersions`) and shared with :class:`OpenFiles`, which owns the
    lifecycle of handles and sessions."""

    handles: dict[int, FileHandle] = field(default_factory=dict)
    writer_handles: dict[int, set[FileHandle]] = field(default_factory=dict)  # inode -> writers
    sessions: dict[int, Session] = field(default_factory=dict)
    stale_cache: set[int] = field(default_factory=set)  # inodes whose page cache may be stale
    unseen: dict[int, int] = field(default_factory=dict)  # inode -> errno no handle saw yet


class LostVersions:
    """Where the group persist reports a staged version it lost (durability=batch).

    Built before :class:`atomicfs.batch.Batch` (which is handed :meth:`report`) and
    before :class:`OpenFiles` (which uses the batch): this breaks that cycle."""

    def __init__(self, state: OpenState, namespace: Namespace,
                 housekeeper: Housekeeper) -> None:
        self.state = state
        self.namespace = namespace
        self.housekeeper = housekeeper

    def report(self, inode: Inode, exc: OSError, how: str) -> None:
        """A staged version of ``inode`` (durability=batch) was not made durable
        (docs/semantics.md §3): the next fsync() of every descriptor open on it
        reports the error once, as Linux reports a writeback error; with none open,
        the next descriptor opened.

        ``how``: "rewrite" (the inode is back on SOURCE's version), "new" (the new
        file never reached SOURCE: its name goes, as an unlinked file's would) or
        "unsynced" (published and visible, its directory not synced).
        """
        err = exc.errno or errno.EIO
        handles = [h for h in self.state.handles.values() if h.inode is inode]
        for handle in handles:
            handle.lost = err
        if not handles:
            self.state.unseen[inode.ino] = err
        if how == "unsynced":
            return
        session = self.state.sessions.get(inode.ino)
        if session is not None and not session.write_errno:
            # its content was built on the lost version: never commit it (§8.2)
            session.write_errno = err
        if how == "new":
            for parent_ino, name in list(inode.names):
                if self.namespace.remove_pending(parent_ino, name) is not None:
                    self.housekeeper.forget_entry(parent_ino, name)
            inode.gone = True
        else:  # the kernel's pages hold the lost version
            self.state.stale_cache.add(inode.ino)
            self.housekeeper.invalidate(inode.ino)


class OpenFiles:
    def __init__(self, state: OpenState, table: InodeTable, namespace: Namespace,
                 committer: Committer, shadows: Shadows, batch: Batch, reads: Reads,
                 housekeeper: Housekeeper, daemon_dir: int,
                 isolation: str = "committed", mountpoint: str | None = None,
                 checkpoint: float = 5.0, checkpoint_bytes: int = 64 << 20) -> None:
        self.table = table
        self.mountpoint = mountpoint  # None: closes are not told apart (processes.py)
        self.namespace = namespace
        self.committer = committer
        self.shadows = shadows
        self.batch = batch
        self.reads = reads
        self.housekeeper = housekeeper
        self.isolation = isolation
        # the registries (shared with LostVersions), under short names
        self.handles = state.handles
        self.writer_handles = state.writer_handles
        self.sessions = state.sessions
        self.stale_cache = state.stale_cache
        self.unseen = state.unseen
        self._next_fh = 1
        self.appends = Appends(committer, batch, reads, self._commit, checkpoint, checkpoint_bytes)
        # built here, like the appends: a transaction's opens and creates join it, and
        # its end drops its sessions through these open files
        self.transactions = Transactions(table, namespace, self, committer, batch, shadows,
                                         housekeeper, daemon_dir)

    def stats(self) -> dict[str, Any]:
        """For the status document: the open sessions (by inode) and handles."""
        now = time.monotonic()
        sessions = [{
            "inode": session.inode.ino,
            "path": self.committer.describe(session.inode),
            "size": session.size,
            "buffered_bytes": session.emap.count(Kind.SHADOW),
            "extents": len(session.emap),
            "age_s": round(now - session.created_at, 3),
            "writers": session.writers,
            "new_file": session.pending,
            "dirty": session.dirty,
            "spilled_bytes": session.spilled,
            **self.appends.session_stats(session),
        } for session in self.sessions.values()]
        return {"sessions": sorted(sessions, key=lambda s: s["inode"]),
                "open_handles": len(self.handles)}

    def get(self, fh: int) -> FileHandle:
        try:
            return self.handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, f"unknown file handle {fh}") from None

    def _register(self, inode: Inode, flags: int, session: Session | None,
                  isolated: bool, pid: int = 0) -> FileHandle:
        inode.fd  # noqa: B018 - opened now and kept while held: the file may be unlinked
        handle = FileHandle(self._next_fh, inode, flags, session, isolated, pid,
                            lost=self.unseen.pop(inode.ino, 0))
        self._next_fh += 1
        self.handles[handle.fh] = handle
        if session is not None:
            self.writer_handles.setdefault(inode.ino, set()).add(handle)
        self.table.hold(inode)
        return handle

    # -- sessions --------------------------------------------------------------
    def _start_session(self, inode: Inode) -> Session:
        size = os.stat(inode.fd).st_size
        session = Session(inode, ExtentMap(size), base_size=size)
        self.sessions[inode.ino] = session
        self.table.hold(inode)
        self.appends.start(session, log=True)
        return session

    def end_session(self, session: Session) -> None:
        self._end_session(session)

    def _end_session(self, session: Session) -> None:
        if self.sessions.get(session.inode.ino) is session:
            del self.sessions[session.inode.ino]
        if session.dirty and not session.pending:  # uncommitted content is dropped
            self.stale_cache.add(session.inode.ino)
            # The kernel's attributes (the session's size) go at once: an attribute-only
            # invalidation touches no page, so it cannot wait on a request (safe here,
            # inside a handler); the cached pages go from the housekeeper's thread.
            with contextlib.suppress(OSError):  # ENOENT: the kernel forgot the inode
                pyfuse3.invalidate_inode(session.inode.ino, attr_only=True)
            self.housekeeper.invalidate(session.inode.ino)
        if session.pending:  # never committed: the new file goes with its session
            for parent_ino, name in list(session.inode.names):
                self.namespace.remove_pending(parent_ino, name)
                self.housekeeper.forget_entry(parent_ino, name)
            session.inode.gone = True
        self.appends.forget(session)
        session.close()
        self.table.release(session.inode)

    def _make_shadow(self, session: Session) -> int:
        return self.shadows.make(session.inode)

    async def _commit(self, session: Session, at: str) -> bool:
        # docs/semantics.md §8: after a failed write the committed version stays
        if session.write_errno and session.dirty:
            if self.committer.nameless(session):
                return False  # unlinked: nothing to keep, nothing lost (semantics §2.5)
            raise OSError(session.write_errno, "not committed: an earlier write to this file "
                          f"failed ({os.strerror(session.write_errno)})")
        # a log is committed by appending in place (§10); else as usual
        with self.table.critical():  # may use the descriptors kept for commits
            made = (await self.appends.commit_log(session)
                    or await self.committer.commit(session, self.table.data, at))
        self.appends.committed(session)  # a whole commit: a log again from here (§10)
        return made

    async def publish(self, inode: Inode) -> None:
        """Make the file real in the source tree now (before a namespace operation
        needs it there): commit a pending new file, persist a staged version."""
        session = self.sessions.get(inode.ino)
        if session is not None and session.pending:
            async with session.lock:
                if session.pending:
                    await self._commit(session, "link or rename")
        await self.batch.persist(inode)

    # -- open, create ----------------------------------------------------------
    def _keep_cache(self, inode: Inode) -> bool:
        """May the kernel keep the file's cached pages at this open?"""
        if inode.ino in self.stale_cache:
            self.stale_cache.discard(inode.ino)
            return False
        return True

    async def open(self, inode: Inode, flags: int, pid: int = 0,
                   tx: Any = None) -> tuple[FileHandle, pyfuse3.FileInfo]:
        if inode.gone:
            # The kernel still caches the name of a new file whose first commit failed
            # and was dropped.  ESTALE makes the VFS look the name up again (ENOENT,
            # or a create with O_CREAT) instead of writing into a file that cannot be
            # committed any more.
            raise OSError(errno.ESTALE, "a dropped new file")
        session = self.sessions.get(inode.ino)
        if session is not None and session.lock.locked():
            async with session.lock:  # a commit is running: let it land first
                pass
            session = self.sessions.get(inode.ino)
        if can_modify(flags):
            if os.statvfs(inode.fd).f_flag & os.ST_RDONLY:
                # as ext4 would: else `: > f` would succeed and its commit be dropped
                raise OSError(errno.EROFS, "the source filesystem is read-only")
            if session is not None and session.tx is not tx:
                # one writer of a file at a time across a transaction's boundary
                # (docs/semantics.md §14): the other side would share its session
                raise OSError(errno.EBUSY, "the file is being written "
                              + ("outside the transaction" if tx is not None
                                 else "by a transaction"))
            fresh = session is None
            if session is None:
                if tx is not None and self.batch.source_links(inode) > 1:
                    raise OSError(errno.EOPNOTSUPP, "a hard-linked file cannot be written "
                                  "in a transaction yet")
                session = self._start_session(inode)
                if tx is not None:
                    self.transactions.adopt_session(tx, session)
            session.writers += 1
            handle = self._register(inode, flags, session, isolated=False, pid=pid)
            handle.tx = tx
            if flags & os.O_TRUNC and fresh:
                # made just now, with no await since: nobody holds its lock or writes
                # it, and with no other writer it is no log rotation.  Emptied at once:
                # taking a trio lock is a checkpoint, a pass of the scheduler (~50 us)
                self._empty_at_open(session, others=0)
            elif flags & os.O_TRUNC:
                await self._truncate_open(session)
            if tx is not None and not session.pending:
                # a transaction's writes bypass the page cache, which every process
                # shares: it keeps the committed version for the others (§14)
                return handle, pyfuse3.FileInfo(fh=handle.fh, direct_io=True, keep_cache=True)
            return handle, pyfuse3.FileInfo(fh=handle.fh, keep_cache=self._keep_cache(inode))
        if session is not None and session.tx is not None:
            # a transaction's content: its members read it, nobody else (§14)
            isolated = session.tx is not tx
        else:
            isolated = session is not None and self._isolated(session, pid)
        if session is not None:
            log.debug("read-only open of %s by pid %d during a session: %s",
                      self.committer.describe(inode), pid,
                      "isolated" if isolated else "page cache")
        if isolated and session is not None:
            upto = self.appends.unsaved(session)
            if upto is not None:  # the reader sees every append made before its open
                async with session.lock:
                    upto = self.appends.unsaved(session)
                    if upto is not None:
                        await self.appends.try_checkpoint(session, upto, "a reader's open")
        handle = self._register(inode, flags, None, isolated, pid)
        handle.tx = tx
        keep = isolated or self._keep_cache(inode)  # direct_io: the cache is not used
        direct = isolated or (session is not None and session.tx is not None
                              and not session.pending)  # a member's: as its writes
        return handle, pyfuse3.FileInfo(fh=handle.fh, direct_io=direct, keep_cache=keep)

    def _isolated(self, session: Session, pid: int) -> bool:
        """Is a read-only open by ``pid`` during ``session`` an isolated handle (direct_io,
        reads the committed version) rather than a page-cache handle (reads the
        session's content, may be mapped MAP_SHARED)?  docs/semantics.md §4.

        Page-cache handles, under isolation=committed too:
        - the opener is writing the file: it holds a descriptor of it open for writing
          (any thread of it; descriptors inherited count, its children's do not);
        - a process writing the file maps it shared (LMDB, databases coordinating
          through shared memory): a reader that will map it too must not be refused
          (direct_io handles refuse MAP_SHARED with ENODEV), and it is the writer's
          own design that readers see its pages.
        Costs /proc reads, only at a read-only open of a file with a session: the
        opener's descriptor table (~60 us), then the maps of the session's writers
        (~170 us for a small process; a writer seen mapping is remembered).
        """
        if self.isolation != "committed":
            return False
        if self.mountpoint is None or not pid:
            return True
        ino = session.inode.ino
        writers = self.writer_handles.get(ino, set())
        if any(h.maps_shared for h in writers):
            return False
        if processes.writes_file(pid, self.mountpoint, ino):
            return False
        asked: set[int] = set()
        for h in sorted(writers, key=lambda h: h.fh):
            if h.pid and h.pid not in asked and len(asked) < MAX_WRITERS_ASKED:
                asked.add(h.pid)
                if processes.maps_shared(h.pid, self.mountpoint, ino):
                    h.maps_shared = True  # kept for the handle's life: /proc/PID/maps is dear
                    return False
        return True

    async def _truncate_open(self, session: Session) -> None:
        """An open with O_TRUNC joins the session: it empties it.  A rewrite from here
        (never checkpointed), unless it rotates a log another writer holds (§10)."""
        async with session.lock:
            rotation = self._empty_at_open(session, session.writers - 1)
            if rotation and session.dirty:
                await self._commit(session, "rotation")

    def _empty_at_open(self, session: Session, others: int) -> bool:
        """Empty ``session`` at an O_TRUNC open (its lock held, or nobody else can have
        it); returns whether it rotates a log (``others``: its other writers)."""
        rotation = self.appends.truncating(session, 0, others)
        if session.size:
            session.truncate(0)
        return rotation

    def create(self, parent: Inode, name: bytes, mode: int, flags: int,
               ctx: pyfuse3.RequestContext, tx: Any = None
               ) -> tuple[FileHandle, pyfuse3.EntryAttributes]:
        """A new file: an unnamed shadow that gets its name at its first commit (in a
        transaction: at the transaction's commit)."""
        if tx is not None:
            self.transactions.creatable(tx, parent, name)
        else:
            self.namespace._creatable(parent, name)
            if self.namespace.exists(parent, name):
                raise OSError(errno.EEXIST, "file exists")
        parent_st = os.stat(parent.fd)
        shadow = self.shadows.for_new_file(parent, parent_st, mode)
        try:
            metadata.give_to_caller(shadow, ctx, parent_st, mode)
            path_fd = syscalls.reopen(shadow, os.O_PATH)
        except BaseException:
            os.close(shadow)
            raise
        st = os.stat(shadow)
        inode = self.table.learn(parent.ino, name, path_fd, st)
        inode.names.discard((parent.ino, name))
        if tx is not None:
            self.transactions.add_entry(tx, parent, name, inode)
        else:
            self.namespace.add_pending(parent, name, inode)
        self.table.remember(inode)
        session = Session(inode, ExtentMap(0), base_size=0, shadow=shadow, pending=True)
        session.mtime_ns = st.st_mtime_ns
        self.sessions[inode.ino] = session
        self.table.hold(inode)
        if tx is not None:
            self.transactions.adopt_session(tx, session)
        # a new file is a log only if its creator appends (§10); else it appears whole
        self.appends.start(session, log=bool(flags & os.O_APPEND))
        session.writers += 1
        handle = self._register(inode, flags, session, isolated=False, pid=ctx.pid)
        return handle, self.attributes(inode, tx)

    # -- attributes ------------------------------------------------------------
    def attributes(self, inode: Inode, viewer: Any = None) -> pyfuse3.EntryAttributes:
        """The file's attributes through the mount: the session's, if it has one
        (a transaction's session: only for its members, ``viewer``)."""
        st = os.stat(inode.fd)
        attr = metadata.entry_attributes(inode.ino, st)
        staged = self.batch.staged.get(inode.ino)
        if staged is not None:  # the visible version is an unnamed file until persisted
            attr.st_nlink = (self.namespace.pending_links(inode) if staged.new_file
                             else self.batch.source_links(inode))
        session = self.sessions.get(inode.ino)
        if session is None or (session.tx is not None and session.tx is not viewer):
            return attr
        if session.pending and session.tx is not None:
            attr.st_nlink = len(inode.names)
            attr.st_blocks = session.blocks(None, None)
        elif session.pending:  # pending names, plus the one its first commit is making
            attr.st_nlink = self.namespace.pending_links(inode) + st.st_nlink
            attr.st_blocks = session.blocks(None, None)
        else:
            attr.st_blocks = session.blocks(st, self.table.data(inode))
        attr.st_size = session.size
        if session.mtime_ns is not None:
            attr.st_mtime_ns = session.mtime_ns
            attr.st_ctime_ns = max(st.st_ctime_ns, session.mtime_ns)
        return attr

    # -- I/O ---------------------------------------------------------------------
    async def read(self, handle: FileHandle, off: int, size: int) -> bytes:
        session = self.sessions.get(handle.inode.ino)
        if session is None or handle.isolated or (session.tx is not None
                                                  and handle.tx is not session.tx):
            # (a transaction's content is for its members only; a descriptor opened
            # before it began reads the committed version too, docs/semantics.md §14)
            if session is not None and session.pending:
                return b""  # a new file has no committed version yet
            return await self.reads.read_committed(handle.inode, size, off)
        committed_fd = None if session.pending else self.table.data(handle.inode)
        return session.read(committed_fd, off, size)

    async def write(self, handle: FileHandle, off: int, buf: bytes) -> int:
        session = handle.session
        if session is None:
            raise OSError(errno.EBADF, "handle not open for writing")
        with self.table.critical():  # a file open for writing can be saved: its shadow
            if session.lock.locked():  # may come from the descriptors kept for commits
                async with session.lock:
                    written = self._write(handle, session, off, buf)
            else:
                written = self._write(handle, session, off, buf)
        if len(session.emap) > session.spill_at:
            await self._spill(session)
        upto = self.appends.due(session)
        if upto is not None:  # checkpoint_bytes appended (or the interval passed)
            async with session.lock:
                upto = self.appends.due(session)
                if upto is not None:
                    await self.appends.try_checkpoint(session, upto, "bytes appended")
        return written

    async def _spill(self, session: Session) -> None:
        """Bound the session's extent map (sessions.MAX_EXTENTS)."""
        async with session.lock:
            plan = session.spill_plan()
            done = []
            if plan:
                # a descriptor of its own for the thread: the inode's may be closed
                # meanwhile (a lost staged version, commit.py _lose)
                committed = None if session.pending else os.dup(self.table.data(session.inode))
                try:
                    done = await trio.to_thread.run_sync(session.spill_copy, committed, plan)
                except OSError as exc:  # the map stays as it was, exact; only bigger
                    log.warning("%s: extent map not bounded (%s)",
                                self.committer.describe(session.inode), exc)
                finally:
                    if committed is not None:
                        os.close(committed)
            session.spill_apply(done)

    def _write(self, handle: FileHandle, session: Session, off: int, buf: bytes) -> int:
        if handle.flags & os.O_APPEND:
            off = session.size
        size_before = session.size
        written = session.write(self._make_shadow, off, buf)
        handle.wrote = True
        self.appends.wrote(session, off, written, size_before)
        return written

    async def truncate(self, inode: Inode, size: int, handle: FileHandle | None,
                       tx: Any = None) -> None:
        session = handle.session if handle is not None else self.sessions.get(inode.ino)
        if handle is None and session is not None and session.tx is not tx:
            raise OSError(errno.EBUSY, "the file is being written on the other side of "
                          "a transaction")
        if handle is None and session is None and tx is not None:
            session = self._start_session(inode)  # a transaction's: committed with it
            self.transactions.adopt_session(tx, session)
        while session is not None:
            async with session.lock:
                # by path: the session may have ended (last release) while we waited
                if handle is not None or self.sessions.get(inode.ino) is session:
                    others = session.writers - (handle is not None)
                    rotation = self.appends.truncating(session, size, others)
                    session.truncate(size)
                    if handle is not None:
                        handle.wrote = True
                    if rotation and session.dirty:
                        await self._commit(session, "rotation")
                    return
            session = self.sessions.get(inode.ino)
        # truncate(2) by path with no session open: a session of its own, committed now.
        session = self._start_session(inode)
        try:
            async with session.lock:
                session.truncate(size)
                await self._commit(session, "truncate")
        finally:
            self._end_session(session)

    # -- commit points -----------------------------------------------------------
    async def flush(self, handle: FileHandle) -> None:
        session = handle.session
        if session is None or not handle.wrote or self._unfinished(handle, session):
            return
        if session.tx is not None:
            return  # committed by its transaction (docs/semantics.md §14)
        async with session.lock:
            await self._commit(session, "close")
            session.killed_by = 0
        handle.wrote = False

    def _unfinished(self, handle: FileHandle, session: Session) -> bool:
        """Is this close after writes not the end of the program's writing?"""
        if self.mountpoint is None or not handle.pid:
            return False
        opener = processes.state(handle.pid)
        signal = opener.signal
        if signal:
            session.killed_by = signal
            # Children that inherited the descriptor close it later (a `sleep` the
            # killed shell started): those closes commit only what is written after.
            handle.wrote = False
            log.warning("%s: the process writing it (pid %d) was killed by signal %d before "
                        "closing it; its unfinished writes will not be committed",
                        self.committer.describe(handle.inode), handle.pid, signal)
            return True
        if (processes.silent_children_closing(handle.pid, opener.threads)
                and processes.holds(handle.pid, self.mountpoint, handle.inode.ino,
                                    handle.flags & os.O_ACCMODE)):
            log.debug("close of %s not a commit point: a child of its opener (pid %d) that "
                      "wrote nothing exited or ran exec; the opener still holds it",
                      self.committer.describe(handle.inode), handle.pid)
            return True
        return False

    async def fsync(self, handle: FileHandle, datasync: bool) -> None:
        session = handle.session or self.sessions.get(handle.inode.ino)
        if session is not None and session.tx is not None:
            return  # a transaction's: durable with its commit, not before (§14)
        if session is not None:
            async with session.lock:
                await self._commit(session, "fsync")
                session.killed_by = 0
            handle.wrote = False
        await self.batch.persist(handle.inode)  # batch: fsync is durable all the same
        if handle.lost:  # batch: a version staged earlier was lost (docs/semantics.md §3)
            err, handle.lost = handle.lost, 0
            raise OSError(err, "an earlier commit of this file was not made durable "
                          f"({os.strerror(err)})")

    async def release(self, handle: FileHandle) -> None:
        del self.handles[handle.fh]
        writers = self.writer_handles.get(handle.inode.ino)
        if writers is not None:
            writers.discard(handle)
            if not writers:
                del self.writer_handles[handle.inode.ino]
        session = handle.session
        try:
            if session is not None:
                session.writers -= 1
                if session.writers == 0:
                    await self._last_release(session)
        finally:
            self.table.release(handle.inode)

    async def _last_release(self, session: Session) -> None:
        if session.tx is not None:
            return  # kept by its transaction until it commits or aborts (§14)
        try:
            async with session.lock:
                if session.writers == 0 and session.dirty and session.write_errno:
                    if not self.committer.nameless(session):  # unlinked: nothing is lost
                        log.warning("%s: not committed at its last close: a write to it "
                                    "failed (%s); the committed version is kept",
                                    self.committer.describe(session.inode),
                                    os.strerror(session.write_errno))
                elif session.writers == 0 and session.dirty and not session.killed_by:
                    await self._commit(session, "last close")
        except OSError:
            pass  # logged by the committer; nobody is left to hear of it
        finally:
            if session.writers == 0:
                self._end_session(session)

    async def release_remaining(self) -> None:
        """At unmount: commit sessions whose last RELEASE never arrived.

        When the connection ends, the kernel drops requests it had not delivered,
        RELEASE among them. A session none of whose handles holds unflushed writes
        (every descriptor passed a close: new empty files, truncations) is committed
        as its release would have; one still being written is dropped, except the
        whole writes of a log (a last checkpoint, docs/semantics.md §10).
        """
        for session in list(self.sessions.values()):
            if session.tx is not None:
                continue  # its transaction was aborted (the daemon is stopping)
            if session.killed_by or any(h.wrote for h in self.handles.values()
                                        if h.session is session):
                upto = self.appends.whole_writes(session)
                if upto is not None:  # a log keeps its whole appends (§10)
                    async with session.lock:
                        await self.appends.try_checkpoint(session, upto, "unmount")
                continue
            try:
                async with session.lock:
                    if session.dirty:
                        await self._commit(session, "unmount")
            except OSError:
                pass  # logged by the committer

    def close_all(self) -> None:
        for session in list(self.sessions.values()):
            session.close()
        self.sessions.clear()
        self.handles.clear()
        self.writer_handles.clear()


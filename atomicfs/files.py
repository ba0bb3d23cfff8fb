"""Open regular files: handles, write sessions, and the commit points.

Policy (SEMANTICS §2, §4):
- An open that can modify the file (write access, O_TRUNC) joins the inode's
  write session, creating it if needed; O_TRUNC empties the session, never the
  committed file.  A create makes a *pending* file with a session.
- ``flush`` (every close) commits if *this* handle wrote since its last commit
  point, and returns the commit's error to close().  A close without writes
  (the shell's open/dup2/close before writing) commits nothing.
- ``fsync`` commits the session so far, durably; the session goes on.
- The last ``release`` of a session commits what is left (mmap writeback,
  truncate-only sessions, descriptors that never flushed), then ends it.
- A read-only open while a session exists is *isolated* under
  ``isolation=committed``: it bypasses the page cache (direct_io) and reads
  the committed version.  Every other handle reads the session's content, which
  is also what the kernel's page cache holds.
- Opens wait for a commit in progress on the same file, so an open after a
  close() returned sees what that close committed.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

import pyfuse3

from . import metadata, syscalls
from .commit import Committer
from .extents import ExtentMap
from .inodes import Inode, InodeTable
from .namespace import Namespace
from .sessions import Session

log = logging.getLogger(__name__)

WRITE_MODES = (os.O_WRONLY, os.O_RDWR)


def can_modify(flags: int) -> bool:
    return (flags & os.O_ACCMODE) in WRITE_MODES or bool(flags & os.O_TRUNC)


@dataclass(eq=False)
class FileHandle:
    fh: int
    inode: Inode
    flags: int
    session: Session | None  # the write session, for handles that can write
    isolated: bool  # reads come from the committed version
    wrote: bool = False  # wrote (or truncated) since this handle's last commit point


class Files:
    def __init__(self, table: InodeTable, namespace: Namespace, committer: Committer,
                 isolation: str = "committed") -> None:
        self.table = table
        self.namespace = namespace
        self.committer = committer
        self.isolation = isolation
        self.handles: dict[int, FileHandle] = {}
        self.sessions: dict[int, Session] = {}
        self._next_fh = 1

    def get(self, fh: int) -> FileHandle:
        try:
            return self.handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, f"unknown file handle {fh}") from None

    def _register(self, inode: Inode, flags: int, session: Session | None,
                  isolated: bool) -> FileHandle:
        handle = FileHandle(self._next_fh, inode, flags, session, isolated)
        self._next_fh += 1
        self.handles[handle.fh] = handle
        inode.holders += 1
        return handle

    # -- sessions --------------------------------------------------------------
    def _start_session(self, inode: Inode) -> Session:
        size = os.stat(inode.fd).st_size
        session = Session(inode, ExtentMap(size), base_size=size)
        self.sessions[inode.ino] = session
        inode.holders += 1
        return session

    def _end_session(self, session: Session) -> None:
        if self.sessions.get(session.inode.ino) is session:
            del self.sessions[session.inode.ino]
        if session.pending:  # never committed: the new file goes with its session
            for parent_ino, name in list(session.inode.names):
                self.namespace.remove_pending(parent_ino, name)
            session.inode.gone = True
        session.close()
        session.inode.holders -= 1
        self.table.maybe_drop(session.inode)

    def _make_shadow(self, session: Session) -> int:
        return self.committer.make_shadow(session.inode)

    async def _commit(self, session: Session) -> bool:
        return await self.committer.commit(session, self.table.data)

    async def publish(self, inode: Inode) -> None:
        """Make the file real in the source tree now (before a namespace operation
        needs it there): commit a pending new file, persist a staged version."""
        session = self.sessions.get(inode.ino)
        if session is not None and session.pending:
            async with session.lock:
                if session.pending:
                    await self._commit(session)
        await self.committer.persist(inode)

    # -- open, create ----------------------------------------------------------
    async def open(self, inode: Inode, flags: int) -> tuple[FileHandle, pyfuse3.FileInfo]:
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
            if session is None:
                session = self._start_session(inode)
            session.writers += 1
            handle = self._register(inode, flags, session, isolated=False)
            if flags & os.O_TRUNC and session.size:
                async with session.lock:
                    session.truncate(0)
            return handle, pyfuse3.FileInfo(fh=handle.fh, keep_cache=False)
        isolated = session is not None and self.isolation == "committed"
        handle = self._register(inode, flags, None, isolated)
        return handle, pyfuse3.FileInfo(fh=handle.fh, direct_io=isolated, keep_cache=False)

    def create(self, parent: Inode, name: bytes, mode: int, flags: int,
               ctx: pyfuse3.RequestContext) -> tuple[FileHandle, pyfuse3.EntryAttributes]:
        """A new file: an unnamed shadow that gets its name at its first commit."""
        self.namespace._creatable(parent, name)
        if self.namespace.exists(parent, name):
            raise OSError(errno.EEXIST, "file exists")
        shadow = syscalls.tmpfile(parent.fd, mode & 0o7777)
        try:
            metadata.give_to_caller(shadow, ctx, os.stat(parent.fd), mode)
            path_fd = syscalls.reopen(shadow, os.O_PATH)
        except BaseException:
            os.close(shadow)
            raise
        st = os.stat(shadow)
        inode = self.table.learn(parent.ino, name, path_fd, st)
        inode.names.discard((parent.ino, name))
        self.namespace.add_pending(parent, name, inode)
        inode.lookups += 1
        session = Session(inode, ExtentMap(0), base_size=0, shadow=shadow, pending=True)
        session.mtime_ns = st.st_mtime_ns
        self.sessions[inode.ino] = session
        inode.holders += 1
        session.writers += 1
        handle = self._register(inode, flags, session, isolated=False)
        return handle, self.attributes(inode)

    # -- attributes ------------------------------------------------------------
    def attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """The file's attributes through the mount: the session's, if it has one."""
        st = os.stat(inode.fd)
        attr = metadata.entry_attributes(inode.ino, st)
        staged = self.committer.staged.get(inode.ino)
        if staged is not None:  # the visible version is an unnamed file until persisted
            attr.st_nlink = (self.namespace.pending_links(inode) if staged.new_file
                             else self.committer.source_links(inode))
        session = self.sessions.get(inode.ino)
        if session is None:
            return attr
        if session.pending:  # pending names, plus the one its first commit is making
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
        if session is None or handle.isolated:
            applying = self.committer.applying.get(handle.inode.ino)
            if applying is not None:  # an in-place commit is half-applied: wait for it
                await applying.wait()
            if session is not None and session.pending:
                return b""  # a new file has no committed version yet
            return os.pread(self.table.data(handle.inode), size, off)
        committed_fd = None if session.pending else self.table.data(handle.inode)
        return session.read(committed_fd, off, size)

    async def write(self, handle: FileHandle, off: int, buf: bytes) -> int:
        session = handle.session
        if session is None:
            raise OSError(errno.EBADF, "handle not open for writing")
        if session.lock.locked():
            async with session.lock:
                return self._write(handle, session, off, buf)
        return self._write(handle, session, off, buf)

    def _write(self, handle: FileHandle, session: Session, off: int, buf: bytes) -> int:
        if handle.flags & os.O_APPEND:
            off = session.size
        written = session.write(self._make_shadow, off, buf)
        handle.wrote = True
        return written

    async def truncate(self, inode: Inode, size: int, handle: FileHandle | None) -> None:
        session = handle.session if handle is not None else self.sessions.get(inode.ino)
        while session is not None:
            async with session.lock:
                # by path: the session may have ended (last release) while we waited
                if handle is not None or self.sessions.get(inode.ino) is session:
                    session.truncate(size)
                    if handle is not None:
                        handle.wrote = True
                    return
            session = self.sessions.get(inode.ino)
        # truncate(2) by path with no session open: a session of its own, committed now.
        session = self._start_session(inode)
        try:
            async with session.lock:
                session.truncate(size)
                await self._commit(session)
        finally:
            self._end_session(session)

    # -- commit points -----------------------------------------------------------
    async def flush(self, handle: FileHandle) -> None:
        session = handle.session
        if session is None or not handle.wrote:
            return
        async with session.lock:
            await self._commit(session)
        handle.wrote = False

    async def fsync(self, handle: FileHandle, datasync: bool) -> None:
        session = handle.session or self.sessions.get(handle.inode.ino)
        if session is not None:
            async with session.lock:
                await self._commit(session)
            handle.wrote = False
        await self.committer.persist(handle.inode)  # batch: fsync is durable all the same

    async def release(self, handle: FileHandle) -> None:
        del self.handles[handle.fh]
        session = handle.session
        try:
            if session is not None:
                session.writers -= 1
                if session.writers == 0:
                    await self._last_release(session)
        finally:
            handle.inode.holders -= 1
            self.table.maybe_drop(handle.inode)

    async def _last_release(self, session: Session) -> None:
        try:
            async with session.lock:
                if session.writers == 0 and session.dirty:
                    await self._commit(session)
        except OSError as exc:
            log.warning("commit of inode %d at its last close failed (%s); the committed "
                        "version is unchanged and the uncommitted data is dropped",
                        session.inode.ino, os.strerror(exc.errno or errno.EIO))
        finally:
            if session.writers == 0:
                self._end_session(session)

    async def release_remaining(self) -> None:
        """At unmount: commit sessions whose last RELEASE never arrived.

        When the connection ends, the kernel drops requests it had not delivered,
        RELEASE among them. A session none of whose handles holds unflushed writes
        (every descriptor passed a close: new empty files, truncations) is committed
        as its release would have; one still being written is dropped.
        """
        for session in list(self.sessions.values()):
            if any(h.wrote for h in self.handles.values() if h.session is session):
                continue
            try:
                async with session.lock:
                    if session.dirty:
                        await self._commit(session)
            except OSError as exc:
                log.warning("commit of %s at unmount failed (%s); the committed version "
                            "is unchanged", self.committer.describe(session.inode),
                            os.strerror(exc.errno or errno.EIO))

    def close_all(self) -> None:
        for session in list(self.sessions.values()):
            session.close()
        self.sessions.clear()
        self.handles.clear()


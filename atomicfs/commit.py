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

A crash before 4 leaves the committed version and an unnamed shadow the
filesystem frees; between the link and the rename, a temporary name in the
daemon's directory that recovery removes; after the rename, the new version.

New files (pending) are published by ``linkat`` of their shadow to their name,
after the same fill/fsync; the name appears only with complete content.

Hard-linked files (nlink > 1) cannot be replaced by rename without splitting
the link: until the journalled commit exists they are written in place
(shadow ranges copied into the file, then fsync) — durable, but not atomic
across a crash.  See README, "Semantics".
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from . import faults, metadata, syscalls
from .extents import Kind
from .inodes import Inode, InodeTable, stat_at
from .sessions import Session

log = logging.getLogger(__name__)


@dataclass
class CommitStats:
    commits: dict[str, int] = field(default_factory=lambda: {"rename": 0, "new": 0,
                                                              "inplace": 0})
    bytes_committed: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def failed(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.failures[name] = self.failures.get(name, 0) + 1


def _fsync_dir(dir_path_fd: int) -> None:
    fd = syscalls.reopen(dir_path_fd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_xattrs(src_fd: int, dst_fd: int) -> None:
    """Make dst's xattrs exactly src's (dst may have inherited default ACLs)."""
    wanted = set(metadata.list_xattrs(src_fd))
    for name in metadata.list_xattrs(dst_fd):
        if name not in wanted:
            try:
                metadata.remove_xattr(dst_fd, name)
            except Exception:  # a label the fs will not drop: keep it
                log.debug("could not remove xattr %r from a shadow", name)
    metadata.copy_xattrs(src_fd, dst_fd)


class Committer:
    """Makes commits; the caller holds ``session.lock``."""

    def __init__(self, table: InodeTable, daemon_dir: int,
                 find_name: Callable[[Inode], tuple[Inode, bytes]],
                 published: Callable[[Inode], None], strategy: str = "auto") -> None:
        self.table = table
        self.daemon_dir = daemon_dir
        self.find_name = find_name
        self.published = published
        self.strategy = strategy
        self.stats = CommitStats()

    async def commit(self, session: Session, data_fd: Callable[[Inode], int]) -> bool:
        """Commit the session if it has changes. Returns True if a commit was made.

        Raises OSError (ENOSPC, EIO...) with the committed version unchanged.
        """
        if not session.dirty:
            return False
        inode = session.inode
        try:
            if session.pending:
                if not inode.names:
                    return False  # unlinked before its first commit: it never existed
                await self._publish_new(session)
                kind = "new"
            else:
                committed = os.stat(inode.fd)
                if committed.st_nlink == 0:
                    return False  # unlinked while written: its data vanishes at release
                if committed.st_nlink > 1 or self.strategy == "journal":
                    await self._in_place(session, data_fd(inode))
                    kind = "inplace"
                else:
                    await self._rename(session, committed, data_fd(inode))
                    kind = "rename"
        except OSError as exc:
            self.stats.failed(exc)
            raise
        self.stats.commits[kind] += 1
        self.stats.bytes_committed += session.size
        session.commits += 1
        return True

    # -- strategies ------------------------------------------------------------
    def _new_shadow(self, session: Session) -> int:
        if session.shadow is None:
            parent, _ = self.find_name(session.inode)
            session.shadow = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                                     dir_fd=parent.fd)
        return session.shadow

    async def _rename(self, session: Session, committed: os.stat_result, data_fd: int) -> None:
        inode = session.inode
        shadow = self._new_shadow(session)
        plan = list(session.emap.extents())
        size = session.size
        mtime = session.mtime_ns if session.mtime_ns is not None else committed.st_mtime_ns

        def build() -> None:
            for ext in plan:
                if ext.kind is Kind.COMMITTED:
                    for a, b in syscalls.data_ranges(data_fd, ext.start, ext.end):
                        syscalls.copy_range(data_fd, shadow, a, b - a)
            os.ftruncate(shadow, size)
            _replace_xattrs(inode.fd, shadow)
            syscalls.fchown_fd(shadow, committed.st_uid, committed.st_gid)
            os.fchmod(shadow, stat.S_IMODE(committed.st_mode))
            syscalls.utimens_fd(shadow, committed.st_atime_ns, mtime)
            faults.point("commit.before_fsync")
            os.fsync(shadow)
            faults.point("commit.after_fsync")

        await trio.to_thread.run_sync(build)
        # From here to the swap there is no await: no other request can interleave.
        parent, name = self.find_name(inode)
        tmp = b"commit-" + secrets.token_hex(8).encode()
        syscalls.link_fd(shadow, self.daemon_dir, tmp)
        faults.point("commit.after_link")
        try:
            syscalls.renameat2(self.daemon_dir, tmp, parent.fd, name)
        except OSError:
            os.unlink(tmp, dir_fd=self.daemon_dir)
            raise
        faults.point("commit.after_rename")
        new_path = syscalls.reopen(shadow, os.O_PATH)
        self.table.rebind(inode, new_path, os.stat(shadow), data_fd=shadow)
        session.shadow = None
        session.emap.reset(size)
        session.base_size = size
        session.mtime_ns = None
        await trio.to_thread.run_sync(_fsync_dir, parent.fd)
        faults.point("commit.after_dir_fsync")

    async def _publish_new(self, session: Session) -> None:
        inode = session.inode
        shadow = session.shadow
        if shadow is None:
            raise OSError(errno.EIO, "a new file without its shadow")
        size = session.size
        mtime = session.mtime_ns

        def build() -> None:
            os.ftruncate(shadow, size)
            if mtime is not None:
                syscalls.utimens_fd(shadow, None, mtime)
            faults.point("commit.before_fsync")
            os.fsync(shadow)
            faults.point("commit.after_fsync")

        await trio.to_thread.run_sync(build)
        parent, name = self.find_name(inode)
        syscalls.link_fd(shadow, parent.fd, name)
        faults.point("commit.after_link")
        self.published(inode)
        session.pending = False
        self.table.set_data_fd(inode, shadow)
        session.shadow = None
        session.emap.reset(size)
        session.base_size = size
        session.mtime_ns = None
        await trio.to_thread.run_sync(_fsync_dir, parent.fd)
        faults.point("commit.after_dir_fsync")

    async def _in_place(self, session: Session, data_fd: int) -> None:
        inode = session.inode
        plan = list(session.emap.extents())
        size = session.size
        shadow = session.shadow
        mtime = session.mtime_ns

        def apply() -> None:
            fd = syscalls.reopen(inode.fd, os.O_RDWR)
            try:
                for ext in plan:
                    if ext.kind is Kind.SHADOW and shadow is not None:
                        syscalls.copy_range(shadow, fd, ext.start, ext.length)
                    elif ext.kind is Kind.HOLE:
                        syscalls.punch_hole(fd, ext.start, ext.length)
                os.ftruncate(fd, size)
                if mtime is not None:
                    syscalls.utimens_fd(fd, None, mtime)
                os.fsync(fd)
            finally:
                os.close(fd)

        await trio.to_thread.run_sync(apply)
        if shadow is not None:
            os.ftruncate(shadow, 0)
        session.emap.reset(size)
        session.base_size = size
        session.mtime_ns = None


def name_finder(table: InodeTable, pending_name: Callable[[Inode], tuple[Inode, bytes] | None]
                ) -> Callable[[Inode], tuple[Inode, bytes]]:
    """Build the function that finds a current (parent, name) of an inode."""

    def find(inode: Inode) -> tuple[Inode, bytes]:
        found = pending_name(inode)
        if found is not None:
            return found
        for parent_ino, name in sorted(inode.names):
            parent = table.by_ino.get(parent_ino)
            st = stat_at(parent.fd, name) if parent is not None else None
            if parent is not None and st is not None and (st.st_dev, st.st_ino) == inode.key:
                return parent, name
            inode.names.discard((parent_ino, name))
        raise OSError(errno.EIO, "file has no name left to commit under")

    return find

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
from .inodes import Inode, InodeTable, stat_at
from .sessions import Session

log = logging.getLogger(__name__)


STRATEGIES = ("rename", "reflink", "journal", "inplace", "new")
# auto: a journalled commit when the unchanged data to copy exceeds this many bytes
# and is more than JOURNAL_RATIO times the changed bytes (README, "Commit strategies").
JOURNAL_MIN_COPY = 8 << 20
JOURNAL_RATIO = 4


@dataclass
class CommitStats:
    commits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STRATEGIES, 0))
    bytes_committed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

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
        self.journal_ok = journal.available(table.root.fd)
        self.reflink_ok = probe_reflink(daemon_dir)
        self._records = 0
        self.applying: dict[int, trio.Event] = {}  # inode -> set when its in-place apply ends

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

    def choose(self, session: Session, committed: os.stat_result) -> str:
        """The commit strategy for this session (the cost model; README)."""
        if committed.st_nlink > 1:
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

    async def commit(self, session: Session, data_fd: Callable[[Inode], int]) -> bool:
        """Commit the session if it has changes. Returns True if a commit was made.

        Raises OSError (ENOSPC, EIO...) with the committed version unchanged.
        """
        if not session.dirty:
            return False
        inode = session.inode
        started = time.monotonic()
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
                kind = self.choose(session, committed)
                if kind == "journal":
                    await self._journalled(session)
                elif kind == "inplace":
                    await self._in_place(session)
                else:
                    await self._rename(session, committed, data_fd(inode), kind == "reflink")
        except OSError as exc:
            self.stats.failed(exc)
            raise
        self.stats.commits[kind] += 1
        self.stats.bytes_committed += session.size
        self.stats.latencies.append(time.monotonic() - started)
        log.debug("committed inode %d (%s, %d bytes)", inode.ino, kind, session.size)
        session.commits += 1
        return True

    # -- strategies ------------------------------------------------------------
    def _new_shadow(self, session: Session) -> int:
        if session.shadow is None:
            parent, _ = self.find_name(session.inode)
            session.shadow = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                                     dir_fd=parent.fd)
        return session.shadow

    async def _rename(self, session: Session, committed: os.stat_result, data_fd: int,
                      clone: bool) -> None:
        inode = session.inode
        plan = list(session.emap.extents())
        size = session.size
        mtime = session.mtime_ns if session.mtime_ns is not None else committed.st_mtime_ns
        if clone:
            parent, _ = self.find_name(inode)
            changes = session.shadow
            shadow = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                             dir_fd=parent.fd)
        else:
            changes = None
            shadow = self._new_shadow(session)

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
                        syscalls.copy_range(changes, shadow, ext.start, ext.length)
                    elif ext.kind is Kind.HOLE:
                        syscalls.punch_hole(shadow, ext.start, ext.length)
            os.ftruncate(shadow, size)
            _replace_xattrs(inode.fd, shadow)
            syscalls.fchown_fd(shadow, committed.st_uid, committed.st_gid)
            os.fchmod(shadow, stat.S_IMODE(committed.st_mode))
            syscalls.utimens_fd(shadow, committed.st_atime_ns, mtime)
            faults.point("commit.before_fsync")
            os.fsync(shadow)
            faults.point("commit.after_fsync")

        try:
            await trio.to_thread.run_sync(build)
        except BaseException:
            if clone:
                os.close(shadow)
            raise
        # From here to the swap there is no await: no other request can interleave.
        parent, name = self.find_name(inode)
        tmp = b"commit-" + secrets.token_hex(8).encode()
        syscalls.link_fd(shadow, self.daemon_dir, tmp)
        faults.point("commit.after_link")
        try:
            syscalls.renameat2(self.daemon_dir, tmp, parent.fd, name)
        except OSError:
            os.unlink(tmp, dir_fd=self.daemon_dir)
            if clone:
                os.close(shadow)
            raise
        faults.point("commit.after_rename")
        new_path = syscalls.reopen(shadow, os.O_PATH)
        self.table.rebind(inode, new_path, os.stat(shadow), data_fd=shadow)
        if clone:
            session.close()  # the shadow of changes; the clone is the file now
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

    def _changes(self, session: Session) -> tuple[list[journal.Change], int, int | None]:
        changes = [journal.Change(e.start, e.length,
                                  journal.DATA if e.kind is Kind.SHADOW else journal.HOLE)
                   for e in session.emap.extents() if e.kind is not Kind.COMMITTED]
        return changes, session.size, session.mtime_ns

    async def _journalled(self, session: Session) -> None:
        """Redo record first, then apply in place (atomic across a crash; journal.py)."""
        inode = session.inode
        changes, size, mtime = self._changes(session)
        record = journal.Record(journal.file_id(inode.fd), size,
                                -1 if mtime is None else mtime, tuple(changes))
        shadow = session.shadow if session.shadow is not None else -1
        self._records += 1
        name = f"{journal.RECORD_PREFIX}{os.getpid()}-{self._records}"
        await trio.to_thread.run_sync(journal.write_record, self.daemon_dir, name, record,
                                      shadow)
        await self._apply(session, lambda fd: journal.apply(fd, record, shadow, None))
        await trio.to_thread.run_sync(journal.retire, self.daemon_dir, name)

    async def _in_place(self, session: Session) -> None:
        """In place without a record: durable, not crash-atomic (no journal available)."""
        changes, size, mtime = self._changes(session)
        record = journal.Record(journal.FileId(0, 0, b""), size,
                                -1 if mtime is None else mtime, tuple(changes))
        shadow = session.shadow if session.shadow is not None else -1
        await self._apply(session, lambda fd: journal.apply(fd, record, shadow, None))

    async def _apply(self, session: Session, work: Callable[[int], None]) -> None:
        """Run ``work(target_fd)`` in a thread while isolated readers of the file wait."""
        inode = session.inode
        done = self.applying[inode.ino] = trio.Event()
        try:
            fd = syscalls.reopen(inode.fd, os.O_RDWR)
            try:
                await trio.to_thread.run_sync(work, fd)
            finally:
                os.close(fd)
        finally:
            del self.applying[inode.ino]
            done.set()
        if session.shadow is not None:
            os.ftruncate(session.shadow, 0)
        session.emap.reset(session.size)
        session.base_size = session.size
        session.mtime_ns = None


def probe_reflink(dir_fd: int) -> bool:
    """Does the filesystem of ``dir_fd`` support FICLONE?"""
    try:
        a = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        b = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
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

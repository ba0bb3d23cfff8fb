"""The commit of a transaction (docs/design-transactions.md, "The commit"): build
and sync every new version, write the redo record, check conflicts, rename
everything into place and move the inodes (:class:`TxCommitter`).  The lifecycle
(:class:`atomicfs.transactions.Transactions`) decides what a failure means."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyfuse3
import trio

from . import faults, syscalls, txattrs, txrecord
from .extents import Kind
from .inodes import Backing, Inode, open_path, stat_at
from .publish import failure_text, sync_dirs
from .sessions import Session
from .txstate import Identity, Transaction, TxFailed, attr_identity_of, conflicts, identity_of

if TYPE_CHECKING:
    from .batch import Batch
    from .commit import Committer
    from .housekeeping import Housekeeper
    from .inodes import InodeTable
    from .shadows import Shadows

log = logging.getLogger("atomicfs.transactions")  # its lines are the transactions'

SYNCFS_ABOVE = 16  # staged files to sync: more than this, one syncfs instead of fsyncs


class TxCommitter:
    """Everything of a commit between "committing" and its outcome.  ``emptied``
    answers whether a committed directory is empty for the member (the view's)."""

    def __init__(self, table: InodeTable, committer: Committer, batch: Batch,
                 shadows: Shadows, housekeeper: Housekeeper,
                 emptied: Callable[[Transaction, Inode | None, list[bytes]], bool]) -> None:
        self.table = table
        self.committer = committer
        self.batch = batch
        self.shadows = shadows
        self.housekeeper = housekeeper
        self.emptied = emptied

    def _meta_steps(self, tx: Transaction, built: set[int]) -> list[tuple[txrecord.Op, Inode]]:
        """The record's ``meta`` operations: the attributes of the committed objects the
        transaction changed, at a name they have after the commit (a moved object at
        its new name), but those rewritten (their new version carries them) or
        removed by it."""
        steps: list[tuple[txrecord.Op, Inode]] = []
        tx.metas = 0
        for ino, changes in sorted(tx.attrs.items()):
            node = self.table.by_ino.get(ino)
            if ino in built or node is None or changes.empty():
                continue
            where = self._meta_name(tx, node, *tx.attr_names[ino])
            if where is None:
                continue  # removed by the transaction: its attributes go with it
            parent, name = where
            st = os.stat(node.fd)
            op = txrecord.Meta(self._final_path(tx, parent), name, st.st_dev, st.st_ino,
                               txrecord.identity(node.fd), changes)
            steps.append((op, parent))
            tx.metas += 1
        return steps

    def _meta_name(self, tx: Transaction, node: Inode, parent: Inode, name: bytes
                   ) -> tuple[Inode, bytes] | None:
        """Where the object whose attributes changed is after the commit: the name it
        was first touched by, unless the transaction removed or moved it."""
        if (parent.ino, name) not in tx.whiteouts:
            return parent, name
        # names it was given: entries, or names inside directories the transaction
        # made (prepare_new linked it there already)
        given = sorted({k for k, v in tx.entries.items() if v is node}
                       | {k for k in node.names if k[0] in tx.private})
        return (self.table.get(given[0][0]), given[0][1]) if given else None

    async def sync_filesystem(self) -> str | None:
        """One syncfs of SOURCE's filesystem: attributes set in place are durable
        before the commit is acknowledged (they are in the filesystem's journal, not
        in any file's data).  Returns None when it succeeded, else why not."""
        root = self.table.root.fd

        def sync() -> None:
            faults.point("tx.syncfs")
            syscalls.sync_filesystem(root)

        try:
            await trio.to_thread.run_sync(sync)
        except OSError as exc:
            return failure_text(exc)
        return None

    def final_names(self, tx: Transaction, inode: Inode) -> list[tuple[int, bytes]]:
        """The names a rewritten committed file has after the commit: its committed
        name unless the transaction removed it, and the names it gave it (moves and
        links); none: its content goes."""
        names = {k for k, v in tx.entries.items() if v is inode}
        try:
            parent, name = self.shadows.find_name(inode, inode.key)
        except OSError:
            pass  # no committed name left (unlinked)
        else:
            if (parent.ino, name) not in tx.whiteouts:
                names.add((parent.ino, name))
        return sorted(names)

    def check_session(self, tx: Transaction, session: Session) -> None:
        where = self.committer.describe(session.inode)
        if session.write_errno and session.dirty:
            raise TxFailed(f"a write to {where} failed ({os.strerror(session.write_errno)})")
        if session.killed_by:
            raise TxFailed(f"a process writing {where} was killed (signal "
                           f"{session.killed_by})")

    async def build(self, session: Session) -> int:
        """The new version of a committed file, complete, in an unnamed file."""
        inode = session.inode
        committed = os.stat(inode.fd)
        if self.batch.source_links(inode) > 1:
            raise TxFailed(f"{self.committer.describe(inode)} is hard-linked (not supported "
                           "in a transaction yet)")
        plan = list(session.emap.extents())
        size = session.size
        mtime = session.mtime_ns if session.mtime_ns is not None else committed.st_mtime_ns
        shadow = session.shadow if session.shadow is not None else \
            self.shadows.make(inode)
        data_fd = os.dup(self.table.data(inode))

        changes = session.tx.attrs.get(inode.ino) if session.tx is not None else None

        def build() -> None:
            for ext in plan:
                if ext.kind is Kind.COMMITTED:
                    for a, b in syscalls.data_ranges(data_fd, ext.start, ext.end):
                        syscalls.copy_range(data_fd, shadow, a, b - a)
            os.ftruncate(shadow, size)
            # xattrs, owner, mode, times: the committed file's with the transaction's
            txattrs.copy_onto(inode.fd, shadow, committed, changes, mtime)

        try:
            await trio.to_thread.run_sync(build)
        except BaseException:
            if shadow is not session.shadow:
                os.close(shadow)
            raise
        finally:
            os.close(data_fd)
        # the session keeps reading its content from this file until the apply: it holds
        # every byte now (the committed ranges were copied in)
        if session.shadow is None:
            session.shadow = shadow
        return os.dup(shadow)

    def prepare_new(self, tx: Transaction, built: dict[int, int]) -> None:
        """New files get their final size and times; what is new inside directories the
        transaction made is put in place there now (nobody else can reach them), so
        that one sync makes it durable before the record."""
        for (parent_ino, name), inode in sorted(tx.entries.items()):
            if parent_ino not in tx.private:
                continue
            if inode.is_dir and inode.ino not in tx.staged:
                continue  # a committed directory it moved: stashed and put by the record
            parent = self.table.get(parent_ino)
            token = tx.staged.get(inode.ino)
            session = tx.sessions.get(inode.ino)
            if token is not None:
                os.rename(token, name, src_dir_fd=tx.staging_fd, dst_dir_fd=parent.fd)
                del tx.staged[inode.ino]
                self.table.release(inode)
            elif session is None or not session.pending:
                # a real object moved or linked in: a link (its new version if rewritten);
                # its committed name goes in the record's first phase
                fd = built.get(inode.ino)
                syscalls.link_fd(fd if fd is not None else inode.fd, parent.fd, name)
            else:
                session = tx.sessions[inode.ino]
                self._finish_new(session)
                assert session.shadow is not None
                syscalls.link_fd(session.shadow, parent.fd, name)
            del tx.entries[(parent_ino, name)]
        for session in tx.sessions.values():
            if session.pending and session.inode.names:
                self._finish_new(session)

    @staticmethod
    def _finish_new(session: Session) -> None:
        shadow = session.shadow
        if shadow is None:
            raise TxFailed("a new file without its shadow")
        os.ftruncate(shadow, session.size)
        if session.mtime_ns is not None:
            syscalls.utimens_fd(shadow, None, session.mtime_ns)

    async def sync(self, tx: Transaction, built: list[int]) -> None:
        """Make every staged object durable: one fsync each, or one syncfs when there
        are many, or new directories (whose whole content must be durable)."""
        fds = list(built) + [s.shadow for s in tx.sessions.values()
                             if s.pending and s.shadow is not None and s.inode.names]
        root = self.table.root.fd
        whole = bool(tx.private) or len(fds) > SYNCFS_ABOVE

        def sync() -> None:
            faults.point("tx.before_sync")
            if whole:
                syscalls.sync_filesystem(root)
                return
            for fd in fds:
                os.fsync(fd)

        await trio.to_thread.run_sync(sync)

    def _committed_path(self, tx: Transaction, parent: Inode) -> tuple[bytes, ...]:
        """The path of a directory in the committed tree (the record's first phase):
        through committed names, not the names the transaction gave (a moved
        directory's new name is an entry)."""
        return self._path(parent, lambda node, n: tx.entries.get(n) is not node)

    def _final_path(self, tx: Transaction, parent: Inode) -> tuple[bytes, ...]:
        """The path of a directory after the commit (the record's second phase and
        its attributes): not through the names the transaction removed or moved
        away (a moved directory's old name is a whiteout)."""
        def kept(node: Inode, n: tuple[int, bytes]) -> bool:
            gone = tx.whiteouts.get(n)
            return gone is None or (gone[1], gone[2]) != node.key

        return self._path(parent, kept)

    def _path(self, parent: Inode, usable: Callable[[Inode, tuple[int, bytes]], bool]
              ) -> tuple[bytes, ...]:
        parts: list[bytes] = []
        node = parent
        for _ in range(4096):
            if node is self.table.root:
                return tuple(reversed(parts))
            name = next((n for n in sorted(node.names)
                         if self.table.by_ino.get(n[0]) is not None and usable(node, n)),
                        None)
            if name is None:
                break
            parts.append(name[1])
            node = self.table.get(name[0])
        # an ancestor the kernel forgot (the table knows no name of it): where SOURCE
        # has the directory now, which is its committed place
        return self._source_path(parent)

    def _source_path(self, directory: Inode) -> tuple[bytes, ...]:
        try:
            here = os.readlink(b"/proc/self/fd/%d" % directory.fd)
            top = os.readlink(b"/proc/self/fd/%d" % self.table.root.fd)
        except OSError as exc:
            raise TxFailed(f"the directory {self.committer.describe(directory)} has no "
                           f"path ({exc.strerror})") from None
        if here == top:
            return ()
        if not here.startswith(top.rstrip(b"/") + b"/") or here.endswith(b" (deleted)"):
            raise TxFailed(f"the directory {self.committer.describe(directory)} has no path")
        return tuple(here[len(top.rstrip(b"/")) + 1:].split(b"/"))

    def apply(self, tx: Transaction, built: list[tuple[Session, int]]) -> list[Inode]:
        """Stage names, write the record, rename everything into place, move the inodes.

        No await: requests see the tree before it or after it.  Before the record is
        durable a failure aborts the transaction (nothing changed in the tree);
        after it, the next mount replays the record.
        """
        removals: list[tuple[txrecord.Op, Inode]] = []  # op, parent
        puts: list[tuple[txrecord.Op, Inode]] = []
        backings: dict[int, Backing] = {}
        dirs: dict[int, Inode] = {}
        sfd = tx.staging_fd
        self._check_conflicts(tx)

        def put(fd: int | None, token: str | None, parent: Inode, name: bytes) -> None:
            if token is None:  # a file (or a moved or linked object): linked in now
                assert fd is not None
                token = tx.token("f")
                syscalls.link_fd(fd, sfd, token.encode())
            puts.append((txrecord.Put(token, self._final_path(tx, parent), name), parent))

        try:
            # phase A, paths of the committed tree, deepest first: committed names
            # removed or moved away (a directory after what was in it; a new name may
            # take the place of one); a moved directory is stashed under a token
            stashed: dict[int, str] = {}  # ino of a moved directory -> its token
            for key, (parent, dev, ino, fid) in sorted(tx.whiteouts.items()):
                where = self._committed_path(tx, parent)
                moved = tx.moved_dirs.get(key)
                if moved is not None:
                    stashed[moved.ino] = tx.token("m")
                    op: txrecord.Op = txrecord.Stash(where, key[1], dev, ino, fid,
                                                     stashed[moved.ino])
                elif key in tx.removed_dirs:
                    op = txrecord.Rmdir(where, key[1], dev, ino, fid)
                else:
                    op = txrecord.Unlink(where, key[1], dev, ino, fid)
                removals.append((op, parent))
            removals.sort(key=lambda step: -len(step[0].parent))
            # phase B, paths of the new tree, shallowest first: the new versions of
            # committed files at each of their names
            rebuilt = {session.inode.ino for session, _ in built}
            for session, fd in built:
                for parent_ino, name in self.final_names(tx, session.inode):
                    put(fd, None, self.table.get(parent_ino), name)
            # new names in committed directories (those in new directories are in
            # place already, prepare_new): new files, moved and linked objects get
            # a token now, staged directories, symlinks and fifos have one
            for (parent_ino, name), inode in sorted(tx.entries.items()):
                if inode.ino in rebuilt:
                    continue
                parent = self.table.get(parent_ino)
                new = tx.sessions.get(inode.ino)
                staged = tx.staged.get(inode.ino)
                if staged is not None:
                    put(None, staged, parent, name)
                elif inode.ino in stashed:  # a committed directory it moved
                    put(None, stashed[inode.ino], parent, name)
                elif new is not None and new.pending:  # a new file
                    put(new.shadow, None, parent, name)
                else:  # a real object moved or linked here
                    put(inode.fd, None, parent, name)
            puts.sort(key=lambda step: len(step[0].parent))
            # attributes of committed objects, in place, once every name is there
            steps = removals + puts + self._meta_steps(tx, rebuilt)
            ops = [op for op, _ in steps]
            for session, fd in built:
                backings[session.inode.ino] = self.table.prepare(fd)
            faults.point("tx.before_record")
            txrecord.write(sfd, ops)
            tx.applied = len(ops)
        except BaseException:
            # the record is not there: nothing of the tree changed (the caller aborts)
            for backing in backings.values():
                os.close(backing.fd)
            raise
        # Point of no return: the record is durable.
        faults.point("tx.after_record")
        for i, (op, parent) in enumerate(steps):
            try:
                faults.point("tx.apply_op")
                txrecord.apply_op(sfd, op, parent.fd)
            except OSError as exc:
                # the record stays: the next mount completes it (commit, "incomplete")
                tx.unapplied.append(f"{os.fsdecode(op.name)} ({exc.strerror or exc})")
                log.error("transaction of pid %d: applying %s failed (%s)", tx.root,
                          op.name, exc)
            if i == 0:
                faults.point("tx.apply")
            dirs[parent.ino] = parent
        # bookkeeping: cannot fail
        for session, fd in built:
            inode = session.inode
            self.table.rebind(inode, backings[inode.ino], data_fd=None)
            self.table.closer(fd)
            self._committed(session)
            # a process's cached pages of the old version go at its next read: it asks
            # for the attributes (new mtime and size) first, and the kernel drops them
            invalidate_attrs(inode.ino)
            self.housekeeper.invalidate(inode.ino)
        for session in tx.sessions.values():
            if session.pending and session.inode.names:  # new files, all in place now
                self._committed(session)
        for parent_ino, name in tx.entries:  # new names in committed directories
            # an outsider may have made the same name meanwhile (no conflict detection
            # yet) and the kernel cached it: forget it
            self.housekeeper.forget_entry(parent_ino, name)
        for ino in list(tx.staged):
            node = self.table.by_ino.get(ino)
            if node is not None:
                self.table.release(node)
        for (_pino, name), (parent, dev, ino, _fid) in tx.whiteouts.items():
            node = self.table.by_key.get((dev, ino))
            if node is not None:
                node.names.discard((parent.ino, name))
        return list(dirs.values())

    def _check_conflicts(self, tx: Transaction) -> None:
        """First committer wins: a committed name the transaction changes that was
        changed by anyone else since the transaction first touched it (through the
        mount, or in SOURCE directly) fails the commit.  Called in apply, with no
        await between this check and the renames."""
        changed = set(tx.entries) | set(tx.whiteouts)
        changed.update(tx.rewrites[ino] for ino, s in tx.sessions.items()
                       if ino in tx.rewrites and s.dirty and not s.pending)

        def stat_now(parent_ino: int, name: bytes) -> os.stat_result | None:
            parent = self.table.by_ino.get(parent_ino)
            if parent is None:
                return None
            return stat_at(parent.fd, name) if name else os.stat(parent.fd)

        def now(p: int, n: bytes) -> Identity | None:
            st = stat_now(p, n)
            if (p, n) in tx.by_inode:  # a moved directory: still that directory?
                return None if st is None else (st.st_dev, st.st_ino)
            return identity_of(st)

        found = conflicts(tx.seen, changed, now)
        found += conflicts(tx.attr_seen, {(parent.ino, name) for ino, (parent, name)
                                          in tx.attr_names.items() if ino in tx.attrs},
                           lambda p, n: attr_identity_of(stat_now(p, n)))
        for parent_ino, name in found:
            parent = self.table.by_ino.get(parent_ino)
            path = (b"/".join((*self._committed_path(tx, parent), name)).rstrip(b"/")
                    if parent is not None else name).decode(errors="replace") or "/"
            raise TxFailed(f"conflict: {path} was changed outside the transaction "
                           "since the transaction first changed it")
        for (parent_ino, name), child in tx.removed_dirs.items():
            # a directory it removes holds nothing but what it removes (an outsider's
            # new name inside is a conflict, not a failed rmdir after the record)
            parent = self.table.get(parent_ino)  # held by its whiteout
            try:
                fd = open_path(parent.fd, name, self.table)[0]
                try:
                    names = source_names(fd)
                finally:
                    os.close(fd)
            except OSError:
                names = []  # replaced or gone: the identity check above said so
            if not self.emptied(tx, child, names):
                where = b"/".join((*self._committed_path(tx, parent), name)).decode(
                    errors="replace")
                raise TxFailed(f"conflict: {where} has new content from outside the "
                               "transaction, which removes it")

    def _committed(self, session: Session) -> None:
        size = session.size
        if session.pending:
            self.table.set_data_fd(session.inode, None)
        if session.shadow is not None:
            self.table.closer(session.shadow)
        session.shadow = None
        session.emap.reset(size)
        session.base_size = size
        session.mtime_ns = None
        session.pending = False

    async def sync_dirs(self, dirs: list[Inode]) -> str | None:
        """fsync each changed directory; a failure is retried as one syncfs (as
        Committer._sync_dirs).  Returns None when they are durable, else why not."""
        try:
            await sync_dirs(dirs, "tx.before_dir_fsync")
        except OSError as exc:
            log.warning("a committed transaction's directory fsync failed (%s); trying "
                        "syncfs", failure_text(exc))
            return await self.sync_filesystem()
        return None


def source_names(path_fd: int) -> list[bytes]:
    """The names in a directory of SOURCE (from an O_PATH fd of it)."""
    fd = syscalls.reopen(path_fd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [os.fsencode(n) for n in os.listdir(fd)]
    finally:
        os.close(fd)


def invalidate_attrs(ino: int) -> None:
    with contextlib.suppress(OSError):  # ENOENT: the kernel does not know the inode
        pyfuse3.invalidate_inode(ino, attr_only=True)

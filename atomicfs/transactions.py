"""Multi-file transactions: ``atomicfs run MOUNTPOINT -- CMD`` (docs/semantics.md §14,
docs/design-transactions.md).

This module owns the open transactions: their begin, commit and abort through
the control xattrs, the runner's watch, status, and the member's view of the
tree (below).  Who is a member is :mod:`atomicfs.membership`'s (the process
tree of the *root*, the process that ``atomicfs run`` forks and that execs CMD);
the state of one transaction is :mod:`atomicfs.txstate`'s; building, syncing,
recording and applying a commit is :mod:`atomicfs.txcommit`'s.

What a transaction changes is invisible to everyone else until it commits:
- contents of existing files: its write sessions (tagged ``session.tx``) are
  not committed at close, fsync or last release; outsiders' read-only opens are
  isolated (the committed version), members read the session;
- new names (files, directories, symlinks, fifos) are *entries* of the
  transaction, keyed by (parent inode, name), consulted for members only:
  a new file is a pending unnamed file (as outside a transaction), a new
  directory, symlink or fifo is made in the staging directory
  ``SOURCE/.atomicfs/tx-ID/``.  Inside a new directory everything is real
  (nobody else can reach it), except new files, which stay entries until the
  commit.

Commit (:meth:`Transactions.commit`, the steps in :class:`atomicfs.txcommit.TxCommitter`):
build and sync every new version in the staging directory, then -- with no
``await`` from here to the last rename -- write and sync the redo record
(:mod:`atomicfs.txrecord`), rename each staged object to its name, move the
inodes onto them; then sync the changed directories and retire the record.  A
crash before the record is durable leaves nothing (recovery removes the
staging directory), after it the next mount replays the record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import secrets
import stat
import time
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from . import metadata, syscalls, txattrs, txrecord
from .inodes import Inode, open_path, stat_at
from .membership import Membership, proc_stat
from .namespace import check_name, is_reserved
from .sessions import Session
from .txcommit import TxCommitter, invalidate_attrs, source_names
from .txstate import Transaction as Transaction  # operations.py types its members with it
from .txstate import TxFailed, attr_identity_of, identity_of

if TYPE_CHECKING:
    from .batch import Batch
    from .commit import Committer
    from .files import OpenFiles
    from .housekeeping import Housekeeper
    from .inodes import InodeTable
    from .namespace import Namespace
    from .shadows import Shadows

log = logging.getLogger(__name__)

CONTROL_PREFIX = "user.atomicfs.tx."  # getxattr on the mount's root: begin, commit, abort


# -- the daemon's side ------------------------------------------------------------------
class Transactions:
    def __init__(self, table: InodeTable, namespace: Namespace, files: OpenFiles,
                 committer: Committer, batch: Batch, shadows: Shadows,
                 housekeeper: Housekeeper, daemon_dir: int) -> None:
        self.table = table
        self.namespace = namespace
        self.files = files
        self.committer = committer
        self.batch = batch
        self.shadows = shadows
        self.housekeeper = housekeeper
        self.daemon_dir = daemon_dir
        self.tx_committer = TxCommitter(table, committer, batch, shadows, housekeeper,
                                        self._emptied)
        self.membership = Membership()
        self.open: dict[int, Transaction] = {}  # root pid -> transaction
        self.finished: dict[int, Transaction] = {}  # recent results (getxattr may repeat)
        self.counts = {"committed": 0, "aborted": 0, "failed": 0, "incomplete": 0}
        self._send, self._receive = trio.open_memory_channel[Transaction](256)

    # -- membership and views ----------------------------------------------------------
    def member(self, ctx: pyfuse3.RequestContext | None) -> Transaction | None:
        if not self.open or ctx is None:
            return None
        tx = self.membership.find(ctx.pid)
        return tx if tx is not None and tx.state == "open" else None

    def entry(self, tx: Transaction | None, parent: Inode, name: bytes) -> Inode | None:
        if tx is None:
            return None
        return tx.entries.get((parent.ino, name))

    def touched_name(self, parent_ino: int, name: bytes) -> bool:
        """Does an open transaction hold an entry or a whiteout at this name in a
        committed directory (replies: timeout 0)?  Inside a directory the transaction
        made, only its members can reach a name: the kernel may cache it as usual
        (its dentries shared by all processes are reached through that directory's
        name, which carries timeout 0; an abort makes the kernel forget them)."""
        return any(tx.touches(parent_ino, name) and parent_ino not in tx.private
                   for tx in self.open.values())

    def touched_inode(self, inode: Inode) -> bool:
        """Can another process reach this inode in another version than a member sees
        (replies about it: timeout 0)?  A committed file the transaction writes, or
        something the transaction made with a name in a committed directory.  What
        is inside a directory the transaction made only members can reach: its
        replies keep the usual timeouts."""
        for tx in self.open.values():
            session = tx.sessions.get(inode.ino)
            if ((session is not None and not session.pending) or inode.ino in tx.attrs
                    or inode.ino in tx.linked):
                return True
            if (session is not None or inode.ino in tx.staged) and any(
                    p not in tx.private for p, _ in inode.names):
                return True
        return False

    def nlink_delta(self, tx: Transaction, inode: Inode) -> int:
        """How a member's link count of ``inode`` differs from SOURCE's: names the
        transaction gave it (moves, links), less committed names it removed."""
        if inode.ino not in tx.linked:
            return 0
        named = sum(1 for v in tx.entries.values() if v is inode)
        session = tx.sessions.get(inode.ino)
        if session is not None and session.pending:
            return named - 1  # a new file: one name is counted already
        return named - sum(1 for (_p, dev, ino, _h) in tx.whiteouts.values()
                           if (dev, ino) == inode.key)

    def made(self, inode: Inode) -> bool:
        """Did an open transaction make this inode (a new file, or a directory, symlink
        or fifo in its staging directory)?  Until the commit only its members can
        reach it, and all of them see the same attributes: replies about it may keep
        the usual attribute timeout (its name in a committed directory keeps entry
        timeout 0, so an outsider's lookup is asked again and fails)."""
        for tx in self.open.values():
            session = tx.sessions.get(inode.ino)
            if (session is not None and session.pending) or inode.ino in tx.staged:
                return True
        return False

    def owner(self, inode: Inode) -> Transaction | None:
        for tx in self.open.values():
            if inode.ino in tx.sessions or inode.ino in tx.staged or inode.ino in tx.private:
                return tx
        return None

    def owns(self, tx: Transaction | None, node: Inode) -> bool:
        """Is ``node`` something the member's transaction made (changes to it are
        invisible to others already)?"""
        if tx is None:
            return False
        session = tx.sessions.get(node.ino)
        return ((session is not None and session.pending) or node.ino in tx.staged
                or any(p in tx.private for p, _ in node.names))

    def private_parent(self, tx: Transaction | None, parent: Inode) -> bool:
        """Is ``parent`` a directory the transaction made (its content is real)?"""
        return tx is not None and parent.ino in tx.private

    def whited(self, tx: Transaction | None, parent: Inode, name: bytes) -> bool:
        """Has the member's transaction removed this committed name?"""
        return tx is not None and (parent.ino, name) in tx.whiteouts

    def exists(self, tx: Transaction, parent: Inode, name: bytes) -> bool:
        return self.entry(tx, parent, name) is not None or (
            not self.whited(tx, parent, name) and self.namespace.exists(parent, name))

    def listing(self, tx: Transaction | None, parent: Inode, names: list[bytes]) -> list[bytes]:
        if tx is None:
            return names
        extra = [n for (p, n) in tx.entries if p == parent.ino]
        gone = {n for (p, n) in tx.whiteouts if p == parent.ino}
        if not extra and not gone:
            return names
        return sorted(set(names).union(extra) - (gone - set(extra)))

    # -- begin, commit, abort (the control xattrs) -------------------------------------
    async def control(self, name: str, ctx: pyfuse3.RequestContext) -> bytes:
        """``getxattr(ROOT, "user.atomicfs.tx.VERB:PID")``: begin, commit or abort the
        transaction of root PID; the caller must be its runner (PID's parent)."""
        verb, _, arg = name[len(CONTROL_PREFIX):].partition(":")
        caller = self.membership.read_tgid(ctx.pid) or ctx.pid
        if verb == "abort-all":  # atomicfs umount --lazy: the daemon's owner or root
            if ctx.uid not in (0, os.getuid()):
                raise OSError(errno.EPERM, "only the mount's owner may abort transactions")
            self.abort_all("the mount is being unmounted (--lazy)")
            return b"ok"
        try:
            root = int(arg)
        except ValueError:
            raise OSError(errno.EINVAL, "bad transaction control request") from None
        if verb == "begin":
            return self.begin(root, caller)
        tx = self.open.get(root) or self.finished.get(root)
        if tx is None or tx.runner != caller:
            raise OSError(errno.ESRCH, "no such transaction")
        if verb == "commit":
            if tx.state == "open":
                await self.commit(tx)
        elif verb == "abort":
            if tx.state == "open":
                self.abort(tx, "its command failed")
        else:
            raise OSError(errno.EINVAL, "bad transaction control request")
        assert tx.result is not None
        return _result_bytes(tx.result)

    def begin(self, root: int, runner: int) -> bytes:
        existing = self.open.get(root)
        if existing is not None and existing.runner == runner:
            return b'{"ok": true}'
        st = proc_stat(root)
        if st is None or st[0] != runner:
            raise OSError(errno.EPERM, "a transaction's root must be the caller's child")
        name = f"{txrecord.STAGING_PREFIX}{root}-{secrets.token_hex(4)}"
        os.mkdir(name, 0o700, dir_fd=self.daemon_dir)
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=self.daemon_dir)
        tx = Transaction(root, runner, "", name, fd)
        try:
            tx.runner_fd = os.pidfd_open(runner)
        except OSError:
            tx.runner_fd = None
        self.open[root] = tx
        self.membership.add(root, st[1], tx)
        self._send.send_nowait(tx)
        # the command is not known yet: the root has not exec'd it (status shows it)
        log.info("transaction of pid %d began (atomicfs run pid %d)", root, runner)
        return b'{"ok": true}'

    async def run(self) -> None:
        """Watch each transaction's runner: if it dies first, the transaction aborts."""
        async with trio.open_nursery() as nursery:
            async for tx in self._receive:
                if tx.runner_fd is not None:
                    nursery.start_soon(self._watch, tx)

    async def _watch(self, tx: Transaction) -> None:
        assert tx.runner_fd is not None
        try:
            await trio.lowlevel.wait_readable(tx.runner_fd)
            if tx.state == "open":
                log.warning("transaction of pid %d aborted: its runner (pid %d) died",
                            tx.root, tx.runner)
                self.abort(tx, "its runner died")
        except trio.ClosedResourceError:
            pass  # the transaction ended: _finish stopped the watch
        except Exception:
            log.exception("watching the runner of transaction %d failed", tx.root)
        finally:
            fd, tx.runner_fd = tx.runner_fd, None
            if fd is not None:
                os.close(fd)

    def _finish(self, tx: Transaction, state: str, result: dict[str, Any]) -> None:
        tx.state = state
        tx.result = result
        self.open.pop(tx.root, None)
        self.membership.remove(tx.root)
        self.finished[tx.root] = tx
        while len(self.finished) > 64:
            self.finished.pop(next(iter(self.finished)))
        if tx.runner_fd is not None:
            trio.lowlevel.notify_closing(tx.runner_fd)

    def abort(self, tx: Transaction, why: str) -> None:
        """Drop everything the transaction did (no await: all or nothing)."""
        if tx.state not in ("open", "committing"):
            return
        for inode in list(tx.entries.values()):
            self._drop_names(tx, inode)
        for ino, session in list(tx.sessions.items()):
            self._release_session(tx, ino, session, drop=True)
        for ino in list(tx.staged):
            self._forget(ino)
        tx.staged.clear()
        self._release_all_private(tx)
        self._release_whiteouts(tx)
        self._release_attrs(tx)
        self._release_linked(tx)
        self._retire(tx)
        self.counts["aborted"] += 1
        log.info("transaction of pid %d aborted: %s", tx.root, why)
        self._finish(tx, "aborted", {"ok": False, "aborted": why})

    def _drop_names(self, tx: Transaction, inode: Inode) -> None:
        for key in [k for k, v in tx.entries.items() if v is inode]:
            del tx.entries[key]
            inode.names.discard(key)
            self.housekeeper.forget_entry(*key)

    def _forget(self, ino: int) -> None:
        inode = self.table.by_ino.get(ino)
        if inode is not None:
            inode.gone = True
            self.table.release(inode)

    def _release_session(self, tx: Transaction, ino: int, session: Session,
                         drop: bool) -> None:
        """The transaction lets go of a session: dropped (abort) or committed already."""
        del tx.sessions[ino]
        session.tx = None
        if drop and session.writers:
            # a process of the transaction still writes it: nothing it writes is
            # committed (close() and fsync() return ECANCELED)
            session.killed_by = session.killed_by or 9
            session.write_errno = errno.ECANCELED
            if not session.pending:  # the cached pages hold none of its writes
                self.files.stale_cache.add(ino)
        if session.writers == 0:
            self.files.end_session(session)
        self.table.release(session.inode)  # the transaction's hold

    def _retire(self, tx: Transaction, keep_record: bool = False) -> None:
        for parent in tx.directories.values():
            self.table.release(parent)
        tx.directories.clear()
        try:
            os.close(tx.staging_fd)
            if not keep_record:
                txrecord.remove_tree(self.daemon_dir, tx.staging_name)
        except OSError as exc:
            log.error("transaction of pid %d: its staging directory was not removed (%s); "
                      "the next mount removes it", tx.root, exc)

    # -- creating names ------------------------------------------------------------------
    def adopt_session(self, tx: Transaction, session: Session) -> None:
        session.tx = tx
        self.files.appends.forget(session)  # no checkpoints: not a log (§10) inside
        tx.sessions[session.inode.ino] = session
        self.table.hold(session.inode)
        changes = tx.attrs.get(session.inode.ino)
        if changes is not None and changes.mtime_ns is not None:
            # the mtime goes with the content from here (a write moves it on)
            session.mtime_ns, changes.mtime_ns = changes.mtime_ns, None
        if not session.pending:
            self._see_rewrite(tx, session.inode)
            # attributes the kernel cached (with their timeout) go now: from here every
            # reply about the file has timeout 0, so each process asks and gets its own
            # view; an attribute-only invalidation touches no page (safe in a handler)
            invalidate_attrs(session.inode.ino)

    def _see_rewrite(self, tx: Transaction, inode: Inode) -> None:
        """First touch of a committed file's contents: remember its name and what it
        is now (the committed version the mount serves)."""
        if inode.ino in tx.rewrites:
            return
        try:
            parent, name = self.shadows.find_name(inode, inode.key)
        except OSError:
            return  # no name (unlinked): nothing to put in place at the commit
        if parent.ino in tx.private:
            return
        tx.rewrites[inode.ino] = (parent.ino, name)
        tx.seen.setdefault((parent.ino, name), identity_of(os.stat(inode.fd)))
        self._keep_directory(tx, parent)

    def _keep_directory(self, tx: Transaction, parent: Inode) -> None:
        """Hold a committed directory the transaction records a change in until it
        ends: the kernel may forget it meanwhile (memory pressure), and the commit
        puts the change there by its inode."""
        if parent.ino not in tx.directories and parent is not self.table.root:
            tx.directories[parent.ino] = parent
            self.table.hold(parent)

    def add_entry(self, tx: Transaction, parent: Inode, name: bytes, inode: Inode) -> None:
        if parent.ino not in tx.private:  # first touch of a committed name: what it is
            tx.seen.setdefault((parent.ino, name), identity_of(stat_at(parent.fd, name)))
        tx.entries[(parent.ino, name)] = inode
        inode.names.add((parent.ino, name))
        self._keep_directory(tx, parent)
        if self.whited(tx, parent, name) or stat_at(parent.fd, name) is not None:
            # it takes the place of a committed name, which the kernel may have cached
            # for an outsider: forget it, so everyone's next lookup asks again (a new
            # name needs nothing: a lookup that failed is not cached)
            self.housekeeper.forget_entry(parent.ino, name)

    def creatable(self, tx: Transaction, parent: Inode, name: bytes) -> None:
        check_name(name)
        if is_reserved(parent, name, self.table.root):
            raise OSError(errno.EPERM, "name reserved for atomicfs")
        if self.exists(tx, parent, name):
            raise OSError(errno.EEXIST, "file exists")

    def make(self, tx: Transaction, parent: Inode, name: bytes, kind: str, mode: int,
             ctx: pyfuse3.RequestContext, target: bytes = b"", rdev: int = 0
             ) -> tuple[Inode, os.stat_result]:
        """mkdir, symlink or mknod by a member: real inside a directory the transaction
        made, else staged in the staging directory as an entry."""
        if self.private_parent(tx, parent) and (parent.ino, name) not in tx.entries:
            if kind == "dir":
                inode, st = self.namespace.mkdir(parent, name, mode, ctx)
                self._hold_private(tx, inode)
            elif kind == "symlink":
                inode, st = self.namespace.symlink(parent, name, target, ctx)
            else:
                inode, st = self.namespace.mknod(parent, name, mode, rdev, ctx)
            return inode, st
        self.creatable(tx, parent, name)
        token = tx.token("d" if kind == "dir" else "s")
        sfd = tx.staging_fd
        if kind == "dir":
            os.mkdir(token, stat.S_IMODE(mode), dir_fd=sfd)
        elif kind == "symlink":
            os.symlink(target, token, dir_fd=sfd)
        else:
            os.mknod(token, mode, rdev, dir_fd=sfd)
        fd, st = open_path(sfd, token.encode(), self.table)
        try:
            metadata.give_to_caller(fd, ctx, os.stat(parent.fd), mode if kind != "symlink"
                                    else None)
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        inode = self.table.learn(parent.ino, name, fd, st)
        inode.names.discard((parent.ino, name))
        self.table.remember(inode)
        self.table.hold(inode)  # the transaction's, until it ends
        tx.staged[inode.ino] = token
        if kind == "dir":
            self._hold_private(tx, inode)
        self.add_entry(tx, parent, name, inode)
        return inode, st

    def unlink(self, tx: Transaction, parent: Inode, name: bytes) -> bool:
        """unlink by a member of one of its entries; False: not an entry (real)."""
        inode = tx.entries.get((parent.ino, name))
        if inode is None:
            if self.private_parent(tx, parent):
                return False
            self._revalidate(tx, parent, name)
            self._whiteout(tx, parent, name)
            return True
        if inode.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        del tx.entries[(parent.ino, name)]
        inode.names.discard((parent.ino, name))
        token = tx.staged.pop(inode.ino, None)
        if token is not None:  # a symlink or fifo made by the transaction
            os.unlink(token, dir_fd=tx.staging_fd)
            self.table.release(inode)
        self._drop_link(tx, inode)
        return True

    def _revalidate(self, tx: Transaction, parent: Inode, name: bytes) -> None:
        """The first unlink or rmdir of a committed name by a member answers ESTALE.
        When an unlink or rmdir succeeds the kernel turns the name's dentry into a
        negative one for every process, keeping its expiry time, until the
        housekeeper makes it forget the name: an outsider's lookup meanwhile found
        nothing.  The kernel retries the call once with the name looked up again,
        and replies about a name in tx.revalidated carry timeout 0, so the negative
        dentry is expired at once and an outsider's next lookup asks the daemon
        (as _move_committed does for renames)."""
        if self._first_use(tx, parent, name):
            raise OSError(errno.ESTALE, "looked up again by the kernel's retry")

    @staticmethod
    def _first_use(tx: Transaction, parent: Inode, name: bytes) -> bool:
        """Is this the member's first rename, unlink or rmdir of a committed name (the
        daemon answers ESTALE once; replies about the name carry timeout 0 from now)?"""
        known = (parent.ino, name) in tx.revalidated or (
            parent.key, name) in tx.revalidated_keys
        tx.revalidated.add((parent.ino, name))
        tx.revalidated_keys.add((parent.key, name))
        return not known

    def _whiteout(self, tx: Transaction, parent: Inode, name: bytes,
                  moving: Inode | None = None) -> None:
        """unlink of a committed file by a member: gone for the transaction only,
        removed from SOURCE by its commit.  ``moving``: a committed directory the
        member moves away from this name (stashed by the commit, then put at its new
        name with all it holds)."""
        check_name(name)
        if is_reserved(parent, name, self.table.root) or self.whited(tx, parent, name):
            raise OSError(errno.ENOENT, "no such file")
        if self.namespace.pending_at(parent, name) is not None:
            raise OSError(errno.EBUSY, "a new file is being written there outside the "
                          "transaction")
        try:
            fd, st = open_path(parent.fd, name, self.table)
        except FileNotFoundError:
            raise OSError(errno.ENOENT, "no such file") from None
        try:
            if stat.S_ISDIR(st.st_mode) != (moving is not None):
                raise OSError(errno.EISDIR if moving is None else errno.ENOTDIR,
                              "is a directory" if moving is None else "not a directory")
            handle = txrecord.identity(fd)
        finally:
            os.close(fd)
        key = (parent.ino, name)
        tx.whiteouts[key] = (parent, st.st_dev, st.st_ino, handle)
        if moving is not None:
            tx.moved_dirs[key] = moving
            self.table.hold(moving)
            tx.by_inode.add(key)
            tx.seen.setdefault(key, (st.st_dev, st.st_ino))
        else:
            tx.seen.setdefault(key, identity_of(st))
        self.table.hold(parent)  # its inode number must not change while it is recorded
        # outsiders' cached name: asked again from now on (replies carry timeout 0)
        self.housekeeper.forget_entry(parent.ino, name)

    def rmdir(self, tx: Transaction, parent: Inode, name: bytes) -> None:
        """rmdir by a member: of one of its entries, or inside a directory it made."""
        inode = tx.entries.get((parent.ino, name))
        if inode is None:
            if self.private_parent(tx, parent):
                st = stat_at(parent.fd, name)
                child = self.table.find(st) if st is not None else None
                if child is not None and any(p == child.ino for p, _ in tx.entries):
                    raise OSError(errno.ENOTEMPTY, "directory not empty")
                self.namespace.rmdir(parent, name)
                if child is not None:
                    self._release_private(tx, child.ino)
                return
            self._revalidate(tx, parent, name)
            self._remove_dir(tx, parent, name)
            return
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if any(p == inode.ino for p, _ in tx.entries):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        if inode.ino not in tx.staged:  # a committed directory it moved here
            self._remove_moved_dir(tx, parent, name, inode)
            return
        token = tx.staged[inode.ino]
        os.rmdir(token, dir_fd=tx.staging_fd)  # ENOTEMPTY: real content
        del tx.entries[(parent.ino, name)]
        inode.names.discard((parent.ino, name))
        del tx.staged[inode.ino]
        self._release_private(tx, inode.ino)
        self.table.release(inode)

    def rename(self, tx: Transaction, old_parent: Inode, old: bytes, new_parent: Inode,
               new: bytes, flags: int) -> bool:
        """rename by a member; False: both ends are real (inside directories it made)."""
        check_name(new)
        if is_reserved(new_parent, new, self.table.root):
            raise OSError(errno.EPERM, "name reserved for atomicfs")
        if self.whited(tx, old_parent, old) and (old_parent.ino, old) not in tx.entries:
            raise OSError(errno.ENOENT, "no such file")  # (an entry may take its place)
        moving = tx.entries.get((old_parent.ino, old))
        target = tx.entries.get((new_parent.ino, new))
        src_private = self.private_parent(tx, old_parent)
        dst_private = self.private_parent(tx, new_parent)
        if flags & syscalls.RENAME_EXCHANGE:
            return self._exchange(tx, old_parent, old, new_parent, new)
        if moving is None and not src_private:
            return self._move_committed(tx, old_parent, old, new_parent, new, target, flags)
        if moving is None and dst_private and target is None:
            return False  # all real, inside directories the transaction made
        if moving is None:  # a real object in a directory it made: stage it first
            st = stat_at(old_parent.fd, old)
            if st is None:
                raise OSError(errno.ENOENT, "no such file")
            # its name's dentry (with the usual timeout: only members reach it) moves
            # to a name others reach: looked up again first, with timeout 0
            self._revalidate(tx, old_parent, old)
            moving = self.table.find(st)
            counted = moving is None
            if moving is None:  # (counted as a kernel lookup: not one, undone below)
                moving, st = self.namespace.entry(old_parent, old)
            token = tx.token("d" if stat.S_ISDIR(st.st_mode) else "s")
            self._check_target(tx, moving, new_parent, new, target, flags)
            os.rename(old, token, src_dir_fd=old_parent.fd, dst_dir_fd=tx.staging_fd)
            moving.names.discard((old_parent.ino, old))
            self.table.hold(moving)
            if counted:
                self.table.forget(moving.ino, 1)
            tx.staged[moving.ino] = token
            if stat.S_ISDIR(st.st_mode):
                self._hold_private(tx, moving)
        else:
            if moving is target:
                return True
            self._check_target(tx, moving, new_parent, new, target, flags)
            del tx.entries[(old_parent.ino, old)]
            moving.names.discard((old_parent.ino, old))
        if target is not None:
            self._drop_target(tx, new_parent, new, target)
        elif dst_private and stat_at(new_parent.fd, new) is not None:
            self._remove_real(new_parent, new, moving.is_dir)
        elif (moving.is_dir and not self.whited(tx, new_parent, new)
              and stat_at(new_parent.fd, new) is not None):
            self._remove_dir(tx, new_parent, new)  # an empty committed directory
        if moving.ino in tx.linked:  # a real object it moved or linked before
            self._place(tx, new_parent, new, moving)
            self._drop_link(tx, moving)
        else:
            self.add_entry(tx, new_parent, new, moving)
        return True

    def _move_committed(self, tx: Transaction, old_parent: Inode, old: bytes,
                        new_parent: Inode, new: bytes, target: Inode | None,
                        flags: int) -> bool:
        """A member moves a committed name: a whiteout at the old name and an entry
        at the new one, leading to the same inode (the kernel keeps it across the
        rename).  A directory keeps its content (it is keyed by the directory's inode
        number): the commit stashes it and puts it at its new name."""
        st = stat_at(old_parent.fd, old)
        if st is None or is_reserved(old_parent, old, self.table.root):
            raise OSError(errno.ENOENT, "no such file")
        if self._first_use(tx, old_parent, old):
            # The kernel moves the old name's dentry to the new name for every process
            # when the rename succeeds, keeping its expiry time, and cannot be told to
            # drop it first (that needs the directory lock the rename holds).  ESTALE
            # makes it retry the rename once with every name looked up again: this
            # member's lookup of the old name is answered with timeout 0 from now on,
            # so the dentry it moves is expired and an outsider asks again.
            raise OSError(errno.ESTALE, "looked up again by the kernel's retry")
        there = None if target is not None or self.whited(tx, new_parent, new) else \
            stat_at(new_parent.fd, new)
        if target is not None and target.key == (st.st_dev, st.st_ino) or (
                there is not None and (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino)):
            return True  # two names of one file: rename(2) does nothing
        moving = self.table.find(st)
        counted = moving is None
        if moving is None:  # (counted as a kernel lookup: not one, undone below)
            moving, st = self.namespace.entry(old_parent, old)
        try:
            self._check_target(tx, moving, new_parent, new, target, flags)
            self._whiteout(tx, old_parent, old, moving if moving.is_dir else None)
            if target is not None:
                self._drop_target(tx, new_parent, new, target)
            elif self.private_parent(tx, new_parent) and there is not None:
                self._remove_real(new_parent, new, moving.is_dir)
            elif there is not None and moving.is_dir:  # an empty committed directory
                self._remove_dir(tx, new_parent, new)
            self._place(tx, new_parent, new, moving)
            # the kernel moved the old name's dentry here, for every process: forget it
            self.housekeeper.forget_entry(new_parent.ino, new)
        finally:
            if counted:
                self.table.forget(moving.ino, 1)
        return True

    def _exchange(self, tx: Transaction, p1: Inode, n1: bytes, p2: Inode, n2: bytes) -> bool:
        """RENAME_EXCHANGE by a member: each name is removed from its view (a whiteout,
        the end of an entry, or a real object inside a directory it made moved into
        the staging directory) and given the other's object.  False: both names are
        real, inside directories the transaction made (done for real)."""
        ends = ((p1, n1), (p2, n2))
        private = [self.private_parent(tx, p) and (p.ino, n) not in tx.entries
                   for p, n in ends]
        if all(private):
            return False
        committed = []
        for (parent, name), real in zip(ends, private, strict=True):
            if (parent.ino, name) in tx.entries:
                committed.append(False)
                continue
            st = stat_at(parent.fd, name)
            if (st is None or self.whited(tx, parent, name)
                    or is_reserved(parent, name, self.table.root)):
                raise OSError(errno.ENOENT, "no such file")
            committed.append(not real)
        # (a real name inside a directory it made: its dentry, which has the usual
        # timeout, moves to a name others reach)
        stale = [self._first_use(tx, p, n) for (p, n), c, real
                 in zip(ends, committed, private, strict=True) if c or real]
        if any(stale):  # the kernel swaps both dentries: both must be expired
            raise OSError(errno.ESTALE, "looked up again by the kernel's retry")
        nodes: list[Inode] = []
        counted: list[Inode] = []
        try:
            for parent, name in ends:
                node = tx.entries.get((parent.ino, name))
                if node is None:
                    st = stat_at(parent.fd, name)
                    node = self.table.find(st) if st is not None else None
                    if node is None:  # (counted as a kernel lookup: not one, undone below)
                        node, _ = self.namespace.entry(parent, name)
                        counted.append(node)
                nodes.append(node)
            a, b = nodes
            if a is b or a.key == b.key:
                return True  # two names of one file: nothing changes
            for (parent, name), c, real, node in zip(ends, committed, private, nodes,
                                                     strict=True):
                if c:
                    self._whiteout(tx, parent, name, node if node.is_dir else None)
                elif real:  # inside a directory it made: into the staging directory
                    self._stage_real(tx, parent, name, node)
                else:
                    del tx.entries[(parent.ino, name)]
                    node.names.discard((parent.ino, name))
            for parent, name, node in ((p1, n1, b), (p2, n2, a)):
                if node.ino in tx.staged:
                    self.add_entry(tx, parent, name, node)
                else:
                    self._place(tx, parent, name, node)
            for parent, name in ends:
                self.housekeeper.forget_entry(parent.ino, name)
        finally:
            for node in counted:
                self.table.forget(node.ino, 1)
        return True

    def _stage_real(self, tx: Transaction, parent: Inode, name: bytes, node: Inode) -> None:
        """Move a real object out of a directory the transaction made into the staging
        directory under a token (then it is given a name by an entry, as one it made)."""
        token = tx.token("d" if node.is_dir else "s")
        os.rename(name, token, src_dir_fd=parent.fd, dst_dir_fd=tx.staging_fd)
        node.names.discard((parent.ino, name))
        self.table.hold(node)
        tx.staged[node.ino] = token
        if node.is_dir:
            self._hold_private(tx, node)

    def link(self, tx: Transaction, node: Inode, parent: Inode, name: bytes) -> bool:
        """link(2) by a member: an entry leading to ``node``; False: both ends are real
        (inside directories the transaction made)."""
        if node.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        if node.ino in tx.staged:
            raise OSError(errno.EOPNOTSUPP, "a hard link to a symlink or fifo made in the "
                          "transaction is not supported")
        session = tx.sessions.get(node.ino)
        real = session is None or not session.pending
        if real and self.private_parent(tx, parent) and self.owns(tx, node) and not any(
                v is node for v in tx.entries.values()):
            return False
        self.creatable(tx, parent, name)
        self._place(tx, parent, name, node)
        self.table.remember(node)  # the reply is an entry the kernel counts
        return True

    def _place(self, tx: Transaction, parent: Inode, name: bytes, inode: Inode) -> None:
        """Give an existing object (a real one, or a new file) a new name: an entry,
        or, back at a committed name of its own that the transaction removed, the
        end of that whiteout."""
        gone = tx.whiteouts.get((parent.ino, name))
        if gone is not None and (gone[1], gone[2]) == inode.key:
            del tx.whiteouts[(parent.ino, name)]
            self.table.release(gone[0])
            moved = tx.moved_dirs.pop((parent.ino, name), None)
            if moved is not None:
                self.table.release(moved)
            inode.names.add((parent.ino, name))
            self.housekeeper.forget_entry(parent.ino, name)
            return
        self.add_entry(tx, parent, name, inode)
        if inode.ino not in tx.linked:
            tx.linked[inode.ino] = inode
            self.table.hold(inode)

    def _drop_link(self, tx: Transaction, inode: Inode) -> None:
        """A moved or linked object lost an entry: let go of it when it has none."""
        if inode.ino in tx.linked and not any(v is inode for v in tx.entries.values()):
            del tx.linked[inode.ino]
            self.table.release(inode)

    def _release_linked(self, tx: Transaction) -> None:
        for inode in list(tx.linked.values()):
            self.table.release(inode)
        tx.linked.clear()

    def _remove_dir(self, tx: Transaction, parent: Inode, name: bytes) -> None:
        """rmdir of a committed directory by a member: allowed when the member's view
        of it is empty (every committed name in it removed by the transaction, no
        entries).  The kernel marks the directory's inode dead for every process: it
        gets a new generation, so an outsider's next lookup makes a fresh one."""
        check_name(name)
        if is_reserved(parent, name, self.table.root) or self.whited(tx, parent, name):
            raise OSError(errno.ENOENT, "no such directory")
        try:
            fd, st = open_path(parent.fd, name, self.table)
        except FileNotFoundError:
            raise OSError(errno.ENOENT, "no such directory") from None
        try:
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, "not a directory")
            handle = txrecord.identity(fd)
            names = source_names(fd)
        finally:
            os.close(fd)
        child = self.table.find(st)
        if not self._emptied(tx, child, names):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        tx.whiteouts[(parent.ino, name)] = (parent, st.st_dev, st.st_ino, handle)
        tx.seen.setdefault((parent.ino, name), identity_of(st))
        self.table.hold(parent)
        tx.removed_dirs[(parent.ino, name)] = child
        if child is not None:
            self.table.hold(child)  # its children's whiteouts are keyed by its number
            child.generation += 1
        self.housekeeper.forget_entry(parent.ino, name)

    def _remove_moved_dir(self, tx: Transaction, parent: Inode, name: bytes,
                          inode: Inode) -> None:
        """rmdir by a member of a committed directory it moved (``mv dir old; rm -r
        old``): its entry goes, and the stash at its old name becomes an rmdir."""
        if not any(v is inode for v in tx.moved_dirs.values()):
            raise OSError(errno.EIO, "a moved directory without its old name")
        if not self._emptied(tx, inode, source_names(inode.fd)):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        del tx.entries[(parent.ino, name)]
        inode.names.discard((parent.ino, name))
        self._drop_link(tx, inode)
        self._unstash(tx, inode)

    def _unstash(self, tx: Transaction, inode: Inode) -> None:
        """A committed directory it moved is removed (emptied, by rmdir or replaced by
        a rename): the stash at its old name becomes an rmdir."""
        old = next(k for k, v in tx.moved_dirs.items() if v is inode)
        del tx.moved_dirs[old]  # its hold goes to removed_dirs
        tx.removed_dirs[old] = inode
        inode.generation += 1  # the kernel marks it dead: _remove_dir
        self.housekeeper.forget_entry(*old)

    def _emptied(self, tx: Transaction, child: Inode | None, names: list[bytes]) -> bool:
        """Is a committed directory with these names in SOURCE empty for the member?"""
        if child is None:
            return not names
        if self.namespace.pending.get(child.ino) or any(
                p == child.ino for p, _ in tx.entries):
            return False
        return all((child.ino, n) in tx.whiteouts for n in names)

    def _check_target(self, tx: Transaction, moving: Inode, new_parent: Inode, new: bytes,
                      target: Inode | None, flags: int) -> None:
        cur = target
        st = (None if target is not None or self.whited(tx, new_parent, new)
              else stat_at(new_parent.fd, new))
        if cur is None and st is None:
            return
        if flags & syscalls.RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "target exists")
        is_dir = cur.is_dir if cur is not None else stat.S_ISDIR(st.st_mode)  # type: ignore[union-attr]
        if moving.is_dir != is_dir:
            raise OSError(errno.EISDIR if is_dir else errno.ENOTDIR, "type mismatch")
        if is_dir:
            if cur is None and not self.private_parent(tx, new_parent):
                # a committed directory: replaced (removed by the commit) when the
                # member's view of it is empty
                fd, dst = open_path(new_parent.fd, new, self.table)
                try:
                    names = source_names(fd)
                finally:
                    os.close(fd)
                if not self._emptied(tx, self.table.find(dst), names):
                    raise OSError(errno.ENOTEMPTY, "directory not empty")
            if cur is not None and any(p == cur.ino for p, _ in tx.entries):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
            if cur is not None and cur.ino not in tx.staged and not self._emptied(
                    tx, cur, source_names(cur.fd)):  # a committed directory it moved
                raise OSError(errno.ENOTEMPTY, "directory not empty")

    def _drop_target(self, tx: Transaction, parent: Inode, name: bytes, target: Inode) -> None:
        del tx.entries[(parent.ino, name)]
        target.names.discard((parent.ino, name))
        self._drop_link(tx, target)
        if target.is_dir and target.ino not in tx.staged:
            self._unstash(tx, target)  # an (empty) committed directory it moved: removed
        token = tx.staged.pop(target.ino, None)
        if token is not None:
            txrecord.remove_tree(tx.staging_fd, token)
            self._release_private(tx, target.ino)
            self.table.release(target)

    def _release_whiteouts(self, tx: Transaction) -> None:
        for (parent_ino, name), (parent, _dev, _ino, _fid) in list(tx.whiteouts.items()):
            del tx.whiteouts[(parent_ino, name)]
            self.table.release(parent)
            self.housekeeper.forget_entry(parent_ino, name)
        for child in tx.removed_dirs.values():
            if child is not None:
                self.table.release(child)
        tx.removed_dirs.clear()
        for moved in tx.moved_dirs.values():
            self.table.release(moved)
        tx.moved_dirs.clear()

    def _hold_private(self, tx: Transaction, inode: Inode) -> None:
        if inode.ino not in tx.private:
            tx.private[inode.ino] = inode
            self.table.hold(inode)

    def _release_private(self, tx: Transaction, ino: int) -> None:
        inode = tx.private.pop(ino, None)
        if inode is not None:
            self.table.release(inode)

    def _release_all_private(self, tx: Transaction) -> None:
        for ino in list(tx.private):
            self._release_private(tx, ino)

    def _remove_real(self, parent: Inode, name: bytes, is_dir: bool) -> None:
        st = stat_at(parent.fd, name)
        if is_dir:
            os.rmdir(name, dir_fd=parent.fd)
        else:
            os.unlink(name, dir_fd=parent.fd)
        self.table.name_removed(parent, name, st)

    # -- attributes (atomicfs/txattrs.py) -----------------------------------------------
    # A member's change of a committed object's attributes goes into tx.attrs; one of
    # something the transaction made (owns) is real.  No await between reading the
    # committed attributes and recording the change.
    def fold(self, tx: Transaction | None, inode: Inode, attr: pyfuse3.EntryAttributes) -> None:
        """The attributes a member sees: with its transaction's changes of them, and
        the link count of its moves, links and removals."""
        if tx is None:
            return
        changes = tx.attrs.get(inode.ino)
        if changes is not None:
            txattrs.fold(attr, changes)
        if not inode.is_dir:
            attr.st_nlink = max(0, attr.st_nlink + self.nlink_delta(tx, inode))

    def _changes(self, tx: Transaction, node: Inode) -> txattrs.Changes:
        """The overlay of a committed object; made at the first change: its name and
        what it is now are remembered (conflicts), it and its parent held (their
        inode numbers must not change), the kernel's cached attributes dropped."""
        changes = tx.attrs.get(node.ino)
        if changes is not None:
            return changes
        if node is self.table.root:
            parent, name = node, b""
        else:
            parent, name = self.shadows.find_name(node, node.key)
        changes = tx.attrs[node.ino] = txattrs.Changes()
        tx.attr_names[node.ino] = (parent, name)
        tx.attr_seen.setdefault((parent.ino, name), attr_identity_of(os.stat(node.fd)))
        self.table.hold(node)
        self.table.hold(parent)
        session = tx.sessions.get(node.ino)
        if session is None or session.pending:
            # attribute-only invalidation: safe in a handler (docs/design-transactions.md)
            invalidate_attrs(node.ino)
        return changes

    def _release_attrs(self, tx: Transaction) -> None:
        """The transaction lets go of its overlay (committed or aborted): everyone's
        next stat asks again."""
        for ino, (parent, _name) in list(tx.attr_names.items()):
            node = self.table.by_ino.get(ino)
            invalidate_attrs(ino)
            if node is not None:
                self.table.release(node)
            self.table.release(parent)
        tx.attrs.clear()
        tx.attr_names.clear()
        tx.attr_seen.clear()

    async def setattr(self, tx: Transaction, node: Inode, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> None:
        """setattr by a member (docs/semantics.md §14); the caller replies with the
        attributes the member sees."""
        if fields.update_size:
            handle = self.files.get(fh) if fh is not None else None
            await self.files.truncate(node, attr.st_size, handle, tx)
        session = self.files.sessions.get(node.ino)
        meta = (fields.update_mode or fields.update_uid or fields.update_gid
                or fields.update_atime or fields.update_mtime)
        if self.owns(tx, node):  # something it made: real
            metadata.apply_setattr(node.fd, attr, fields)
            if fields.update_size or not meta:
                metadata.drop_set_id(node.fd, ctx)
            if session is not None and fields.update_mtime:
                session.mtime_ns = attr.st_mtime_ns
            return
        # from here to the change recorded: no await
        ours = session is not None and session.tx is tx and not session.pending
        if ours and fields.update_mtime:
            assert session is not None
            session.mtime_ns = attr.st_mtime_ns  # goes with the new version
        if fields.update_size or not meta:
            # a truncate, or the SETATTR the kernel sends before a write: the set-id rule
            self.drop_set_id(tx, node, ctx)
            if fields.update_size:
                return  # (its times are the content's)
        st = os.stat(node.fd)
        current = tx.attrs.get(node.ino) or txattrs.Changes()
        mode = st.st_mode if current.mode is None else stat.S_IFMT(st.st_mode) | current.mode
        uid = st.st_uid if current.uid is None else current.uid
        gid = st.st_gid if current.gid is None else current.gid
        trial = dataclasses.replace(current, xattrs=dict(current.xattrs))
        if txattrs.setattr(trial, mode, uid, gid, attr, fields, time.time_ns(),
                           times=not ours):
            self._changes(tx, node)  # (first touch: remembered and held)
            tx.attrs[node.ino] = trial

    def drop_set_id(self, tx: Transaction | None, node: Inode,
                    ctx: pyfuse3.RequestContext) -> None:
        """The set-id rule of a write or truncate (metadata.drop_set_id); for a member
        and a committed file, into the transaction's overlay."""
        if tx is None or self.owns(tx, node):
            metadata.drop_set_id(node.fd, ctx)
            return
        st = os.stat(node.fd)
        current = tx.attrs.get(node.ino)
        mode = st.st_mode
        if current is not None:
            mode = stat.S_IFMT(mode) | (stat.S_IMODE(mode) if current.mode is None
                                        else current.mode)
        gid = st.st_gid if current is None or current.gid is None else current.gid
        dropped = metadata.set_id_dropped(mode, gid, ctx)
        if dropped is not None:
            changes = self._changes(tx, node)
            changes.mode = dropped
            changes.ctime_ns = time.time_ns()

    def xattr_viewer(self, ctx: pyfuse3.RequestContext) -> Transaction | None:
        """The caller's transaction, for getxattr and listxattr: asked only while a
        transaction has changed attributes (the kernel asks for security.capability
        before every write; it need not cost a look in /proc)."""
        if not any(tx.attrs for tx in self.open.values()):
            return None
        return self.member(ctx)

    def getxattr(self, tx: Transaction | None, node: Inode, name: bytes) -> bytes:
        changes = tx.attrs.get(node.ino) if tx is not None else None
        if changes is None:
            return metadata.get_xattr(node.fd, name)
        return txattrs.get_xattr(changes, name, lambda: metadata.get_xattr(node.fd, name))

    def listxattr(self, tx: Transaction | None, node: Inode,
                  ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = list(metadata.listed_xattrs(node.fd, ctx))
        changes = tx.attrs.get(node.ino) if tx is not None else None
        if changes is None:
            return names
        names = txattrs.xattr_names(changes, names)
        if any(n.startswith(b"trusted.") for n in names) and not metadata.caller_capable(
                ctx, metadata.CAP_SYS_ADMIN):  # as metadata.listed_xattrs
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    def setxattr(self, tx: Transaction, node: Inode, name: bytes, value: bytes) -> None:
        if self.owns(tx, node):
            metadata.set_xattr(node.fd, name, value)
            return
        self._check_xattr_fits(tx, node, name, value)
        txattrs.set_xattr(self._changes(tx, node), name, value, time.time_ns())

    def _check_xattr_fits(self, tx: Transaction, node: Inode, name: bytes,
                          value: bytes) -> None:
        """Fail a member's setxattr now, as SOURCE's filesystem fails it outside a
        transaction (ENOSPC: ext4 holds one block of xattrs per inode; E2BIG, ERANGE),
        not at the commit: there the record is durable already, and the xattr, and
        the mode and times set after it, would be missing from a commit that stands.
        The object's xattrs with the transaction's changes and this one are set on a
        scratch object of the same kind in the staging directory, then it goes
        (files and directories: the kernel takes user xattrs on nothing else)."""
        kind = stat.S_IFMT(os.stat(node.fd).st_mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR):
            return
        changes = tx.attrs.get(node.ino)
        want: dict[bytes, bytes] = {}
        for n in metadata.list_xattrs(node.fd):
            if changes is None or n not in changes.xattrs:
                with contextlib.suppress(pyfuse3.FUSEError):  # ENODATA: removed since
                    want[n] = metadata.get_xattr(node.fd, n)
        if changes is not None:
            want.update({n: v for n, v in changes.xattrs.items() if v is not None})
        want[name] = value
        probe = tx.token("x")
        sfd = tx.staging_fd
        if kind == stat.S_IFDIR:
            os.mkdir(probe, 0o700, dir_fd=sfd)
        else:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600, dir_fd=sfd))
        try:
            fd = os.open(probe, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
            try:
                for n, v in sorted(want.items(), key=lambda item: item[0] == name):
                    try:
                        metadata.set_xattr(fd, n, v)
                    except OSError as exc:
                        if n == name or exc.errno in (errno.ENOSPC, errno.E2BIG,
                                                      errno.ERANGE, errno.EDQUOT):
                            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
                        # one the daemon cannot copy (not this one's fault): go on
            finally:
                os.close(fd)
        finally:
            txrecord.remove_tree(sfd, probe)

    def removexattr(self, tx: Transaction, node: Inode, name: bytes) -> None:
        if self.owns(tx, node):
            metadata.remove_xattr(node.fd, name)
            return
        try:
            self.getxattr(tx, node, name)
        except pyfuse3.FUSEError:
            raise OSError(errno.ENODATA, "no such attribute") from None
        txattrs.remove_xattr(self._changes(tx, node), name, True, time.time_ns())

    # -- commit ----------------------------------------------------------------------------
    async def commit(self, tx: Transaction) -> None:
        """Make everything the transaction did visible and durable at once, or nothing."""
        tx.state = "committing"
        started = time.monotonic()
        built: list[tuple[Session, int]] = []  # new versions of committed files
        try:
            await self.batch.persist()  # batch: SOURCE holds every staged commit first
            for session in list(tx.sessions.values()):
                self.tx_committer.check_session(tx, session)
            for session in list(tx.sessions.values()):
                if not session.pending and session.dirty and self.tx_committer.final_names(
                        tx, session.inode):
                    async with session.lock:
                        built.append((session, await self.tx_committer.build(session)))
            self.tx_committer.prepare_new(tx, {s.inode.ino: fd for s, fd in built})
            await self.tx_committer.sync(tx, [fd for _, fd in built])
            # From the record to the last rename, no await: no request sees a part of it.
            dirs = self.tx_committer.apply(tx, built)
            self._release_committed(tx)  # still no await since the record
        except (OSError, TxFailed) as exc:
            for _, fd in built:
                os.close(fd)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            tx.state = "open"
            self.abort(tx, f"the commit failed: {why}")
            self.counts["failed"] += 1
            tx.result = {"ok": False, "error": f"commit failed: {why}; nothing was changed"}
            log.warning("transaction of pid %d: commit failed (%s); nothing was changed",
                        tx.root, why)
            return
        failed = await self.tx_committer.sync_dirs(dirs)
        if tx.metas and failed is None:
            failed = await self.tx_committer.sync_filesystem()
        ms = (time.monotonic() - started) * 1000
        if failed is not None or tx.unapplied:
            self._incomplete(tx, failed, len(dirs), ms)
            return
        self.counts["committed"] += 1
        self._retire(tx)
        log.info("transaction of pid %d committed: %d names put in place or removed, "
                 "%d directories synced, in %.1f ms", tx.root, tx.applied, len(dirs), ms)
        self._finish(tx, "committed", {"ok": True})

    def _incomplete(self, tx: Transaction, unsynced: str | None, dirs: int, ms: float
                    ) -> None:
        """Past the record, a step failed: a rename or removal (a full disk:
        ``tx.unapplied``), or syncing the directories (``unsynced``: all of it is in
        place and visible, but not known durable).  The transaction is committed;
        its record stays, so the next mount (or ``atomicfs recover``) completes it
        (a replay is idempotent), and the command is told (docs/semantics.md §14)."""
        self._retire(tx, keep_record=True)
        self.counts["incomplete"] += 1
        if tx.unapplied:
            what = ", ".join(tx.unapplied[:3]) + (" ..." if len(tx.unapplied) > 3 else "")
            log.error("transaction of pid %d committed but incomplete: %s failed; its "
                      "record %s stays, and the next mount completes it", tx.root, what,
                      tx.staging_name)
            why = (f"not all of it is applied yet: {what} failed; the next mount (or "
                   "atomicfs recover) completes it")
        else:
            log.error("transaction of pid %d committed: %d names put in place or removed "
                      "and visible, but NOT known durable: syncing its %d directories "
                      "failed (%s); its record stays for the next mount to replay, in "
                      "%.1f ms", tx.root, tx.applied, dirs, unsynced, ms)
            why = (f"it is visible, but not known durable ({unsynced}): the next mount "
                   "replays its record")
        self._finish(tx, "incomplete", {"ok": False, "incomplete": True, "error": why})

    def _release_committed(self, tx: Transaction) -> None:
        """After the apply: the transaction lets go of what it held (no await)."""
        self._release_whiteouts(tx)
        self._release_attrs(tx)
        self._release_linked(tx)
        tx.entries.clear()
        tx.staged.clear()
        self._release_all_private(tx)
        for ino, session in list(tx.sessions.items()):
            self._release_session(tx, ino, session, drop=False)

    # -- status and shutdown ---------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        return [tx.summary() for tx in self.open.values()]

    def abort_all(self, why: str) -> None:
        for tx in list(self.open.values()):
            self.abort(tx, why)

    def close_all(self) -> None:
        for tx in list(self.open.values()):
            if tx.runner_fd is not None:
                os.close(tx.runner_fd)
                tx.runner_fd = None


def _result_bytes(result: dict[str, Any]) -> bytes:
    import json
    return json.dumps(result, sort_keys=True).encode()

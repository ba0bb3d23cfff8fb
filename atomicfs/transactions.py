"""Multi-file transactions: ``atomicfs run MOUNTPOINT -- CMD`` (docs/semantics.md §14,
docs/design-transactions.md).

A transaction belongs to one process tree: its *root* (the process that
``atomicfs run`` forks and that execs CMD) and the root's descendants.  Each
request carries the pid (a thread id) of the caller; :class:`Membership` walks
its parent chain in ``/proc`` (cached by pid and start time, so a reused pid
never joins) to the root of an open transaction.

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

Commit (:meth:`Transactions.commit`): build and sync every new version in the
staging directory, then -- with no ``await`` from here to the last rename --
write and sync the redo record (:mod:`atomicfs.txrecord`), rename each staged
object to its name, move the inodes onto them; then sync the changed
directories and retire the record.  A crash before the record is durable
leaves nothing (recovery removes the staging directory), after it the next
mount replays the record.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from . import faults, metadata, syscalls, txrecord
from .extents import Kind
from .inodes import Backing, Inode, open_path, stat_at
from .namespace import check_name, is_reserved
from .publish import sync_dirs
from .sessions import Session

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
SYNCFS_ABOVE = 16  # staged files to sync: more than this, one syncfs instead of fsyncs
CACHE_MAX = 65536


# -- membership (pure but for /proc) ---------------------------------------------------
def proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a process or thread from /proc; None if it is gone.

    Read on every request while a transaction is open (the membership cache is
    checked against the start time), so with the fewest syscalls: open, one read,
    close (a Python file object adds an fstat, an lseek and a second read)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)  # the whole line: procfs answers it in one read
    except OSError:
        return None
    finally:
        os.close(fd)
    return parse_stat(data)


def parse_stat(data: bytes) -> tuple[int, int] | None:
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[1]), int(fields[19])  # ppid (field 4), starttime (field 22)
    except (IndexError, ValueError):
        return None


def proc_tgid(tid: int) -> int | None:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class Membership:
    """Which open transaction, if any, a thread belongs to.

    A thread is a member when its process is a root or a descendant of one (the
    parent chain in /proc).  The answer is cached by (thread id, start time) for
    as long as the transaction is open: a process that detaches later (its parent
    exits, it is reparented to init) stays a member if it made a request before;
    one first seen after it detached is not.
    """

    def __init__(self, read_stat: Callable[[int], tuple[int, int] | None] = proc_stat,
                 read_tgid: Callable[[int], int | None] = proc_tgid) -> None:
        self.read_stat = read_stat
        self.read_tgid = read_tgid
        self.roots: dict[int, tuple[int, Any]] = {}  # root pid -> (start time, tx)
        self.cache: dict[int, tuple[int, Any]] = {}  # tid -> (start time, tx or None)

    def add(self, pid: int, start: int, tx: Any) -> None:
        self.roots[pid] = (start, tx)
        self.cache.clear()  # a thread known as an outsider may be the new root

    def remove(self, pid: int) -> None:
        self.roots.pop(pid, None)
        self.cache.clear()

    def find(self, tid: int) -> Any:
        if not self.roots or tid <= 0:
            return None
        st = self.read_stat(tid)
        if st is None:
            return None
        hit = self.cache.get(tid)
        if hit is not None and hit[0] == st[1]:
            return hit[1]
        found = None
        pid = self.read_tgid(tid) or tid
        pst = st if pid == tid else self.read_stat(pid)
        for _ in range(256):
            if pst is None:
                break
            root = self.roots.get(pid)
            if root is not None and root[0] == pst[1]:
                found = root[1]
                break
            pid = pst[0]
            if pid <= 1:
                break
            pst = self.read_stat(pid)
        if len(self.cache) > CACHE_MAX:
            self.cache.clear()
        self.cache[tid] = (st[1], found)
        return found


# -- conflicts (pure) ------------------------------------------------------------------
Identity = tuple[int, int, int, int]  # dev, ino, mtime_ns, size


def identity_of(st: os.stat_result | None) -> Identity | None:
    """What a committed name leads to, for conflict detection: another file (dev,
    ino), or the same file with other contents (mtime, size), or nothing."""
    if st is None:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def conflicts(seen: dict[tuple[int, bytes], Identity | None],
              changed: set[tuple[int, bytes]],
              now: Callable[[int, bytes], Identity | None]) -> list[tuple[int, bytes]]:
    """The names the transaction changes whose committed identity differs from the
    one it saw when it first touched them (sorted)."""
    return sorted(key for key in changed if key in seen and now(*key) != seen[key])


# -- one transaction -------------------------------------------------------------------
@dataclass(eq=False)
class Transaction:
    root: int  # pid of CMD
    runner: int  # pid of `atomicfs run`
    command: str
    staging_name: str
    staging_fd: int  # O_PATH fd of SOURCE/.atomicfs/tx-ID
    started: float = field(default_factory=time.monotonic)
    state: str = "open"  # open, committing, committed, aborted
    sessions: dict[int, Session] = field(default_factory=dict)  # ino -> content/new file
    entries: dict[tuple[int, bytes], Inode] = field(default_factory=dict)  # new names
    staged: dict[int, str] = field(default_factory=dict)  # ino -> token (dir/symlink/fifo)
    # directories it made (held: their FUSE inode numbers must not change while open)
    private: dict[int, Inode] = field(default_factory=dict)
    # committed names it removed: (parent ino, name) -> (parent, held; the file removed:
    # dev, ino, file handle)
    whiteouts: dict[tuple[int, bytes], tuple[Inode, int, int, str]] = field(
        default_factory=dict)
    # conflicts (docs/semantics.md §14): what each committed name the transaction
    # changes led to when it first touched it -- (dev, ino, mtime, size) or None
    # (absent) -- and the name of each committed file it rewrites (ino -> name)
    seen: dict[tuple[int, bytes], Identity | None] = field(default_factory=dict)
    rewrites: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    runner_fd: int | None = None  # pidfd of the runner: it dying aborts
    tokens: int = 0
    applied: int = 0  # operations of its redo record, once written

    def token(self, kind: str) -> str:
        self.tokens += 1
        return f"{kind}{self.tokens}"

    def touches(self, parent_ino: int, name: bytes) -> bool:
        return (parent_ino, name) in self.entries or (parent_ino, name) in self.whiteouts

    def summary(self) -> dict[str, Any]:
        files = sum(1 for s in self.sessions.values() if s.pending or s.dirty)
        if not self.command:
            self.command = _command(self.root)  # exec'd by now (at begin it was not yet)
        return {"root_pid": self.root, "runner_pid": self.runner, "command": self.command,
                "age_s": round(time.monotonic() - self.started, 3), "state": self.state,
                "files": files,
                "bytes": sum(s.size for s in self.sessions.values()),
                "changes": len(self.entries) + len(self.whiteouts)
                + sum(1 for s in self.sessions.values() if not s.pending and s.dirty)}


class TxFailed(Exception):
    """A commit that could not be made: nothing of the transaction is applied."""


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
        self.membership = Membership()
        self.open: dict[int, Transaction] = {}  # root pid -> transaction
        self.finished: dict[int, Transaction] = {}  # recent results (getxattr may repeat)
        self.counts = {"committed": 0, "aborted": 0, "failed": 0}
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
            if session is not None and not session.pending:
                return True
            if (session is not None or inode.ino in tx.staged) and any(
                    p not in tx.private for p, _ in inode.names):
                return True
        return False

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

    def _retire(self, tx: Transaction) -> None:
        try:
            os.close(tx.staging_fd)
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
        if not session.pending:
            self._see_rewrite(tx, session.inode)
            # attributes the kernel cached (with their timeout) go now: from here every
            # reply about the file has timeout 0, so each process asks and gets its own
            # view; an attribute-only invalidation touches no page (safe in a handler)
            _invalidate_attrs(session.inode.ino)

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

    def add_entry(self, tx: Transaction, parent: Inode, name: bytes, inode: Inode) -> None:
        if parent.ino not in tx.private:  # first touch of a committed name: what it is
            tx.seen.setdefault((parent.ino, name), identity_of(stat_at(parent.fd, name)))
        tx.entries[(parent.ino, name)] = inode
        inode.names.add((parent.ino, name))
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
        return True

    def _whiteout(self, tx: Transaction, parent: Inode, name: bytes) -> None:
        """unlink of a committed file by a member: gone for the transaction only,
        removed from SOURCE by its commit."""
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
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "is a directory")
            handle = txrecord.identity(fd)
        finally:
            os.close(fd)
        tx.whiteouts[(parent.ino, name)] = (parent, st.st_dev, st.st_ino, handle)
        tx.seen.setdefault((parent.ino, name), identity_of(st))
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
            raise OSError(errno.EOPNOTSUPP, "removing a committed directory inside a "
                          "transaction is not supported yet")
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if any(p == inode.ino for p, _ in tx.entries):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
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
        if self.whited(tx, old_parent, old):
            raise OSError(errno.ENOENT, "no such file")
        moving = tx.entries.get((old_parent.ino, old))
        target = tx.entries.get((new_parent.ino, new))
        src_private = self.private_parent(tx, old_parent)
        dst_private = self.private_parent(tx, new_parent)
        if moving is None and not src_private:
            raise OSError(errno.EOPNOTSUPP, "renaming a committed name inside a "
                          "transaction is not supported yet")
        if flags & syscalls.RENAME_EXCHANGE:
            raise OSError(errno.EOPNOTSUPP, "RENAME_EXCHANGE inside a transaction is not "
                          "supported yet")
        if moving is None and dst_private and target is None:
            return False  # all real, inside directories the transaction made
        if moving is None:  # a real object in a directory it made: stage it first
            st = stat_at(old_parent.fd, old)
            if st is None:
                raise OSError(errno.ENOENT, "no such file")
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
        self.add_entry(tx, new_parent, new, moving)
        return True

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
                raise OSError(errno.EOPNOTSUPP, "replacing a committed directory inside a "
                              "transaction is not supported yet")
            if cur is not None and any(p == cur.ino for p, _ in tx.entries):
                raise OSError(errno.ENOTEMPTY, "directory not empty")

    def _drop_target(self, tx: Transaction, parent: Inode, name: bytes, target: Inode) -> None:
        del tx.entries[(parent.ino, name)]
        target.names.discard((parent.ino, name))
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

    # -- commit ----------------------------------------------------------------------------
    async def commit(self, tx: Transaction) -> None:
        """Make everything the transaction did visible and durable at once, or nothing."""
        tx.state = "committing"
        started = time.monotonic()
        built: list[tuple[Session, int]] = []  # new versions of committed files
        try:
            await self.batch.persist()  # batch: SOURCE holds every staged commit first
            for session in list(tx.sessions.values()):
                self._check_session(tx, session)
            for session in list(tx.sessions.values()):
                if not session.pending and session.dirty and not self._removed(tx, session):
                    async with session.lock:
                        built.append((session, await self._build(session)))
            self._prepare_new(tx)
            await self._sync(tx, [fd for _, fd in built])
            # From the record to the last rename, no await: no request sees a part of it.
            dirs = self._apply(tx, built)
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
        await self._sync_dirs(dirs)
        self._retire(tx)
        self.counts["committed"] += 1
        log.info("transaction of pid %d committed: %d names put in place or removed, "
                 "%d directories synced, in %.1f ms", tx.root, tx.applied, len(dirs),
                 (time.monotonic() - started) * 1000)
        self._finish(tx, "committed", {"ok": True})

    def _removed(self, tx: Transaction, session: Session) -> bool:
        """Did the transaction remove the rewritten file's name (its content goes)?"""
        try:
            parent, name = self.shadows.find_name(session.inode, session.inode.key)
        except OSError:
            return True
        return (parent.ino, name) in tx.whiteouts

    def _check_session(self, tx: Transaction, session: Session) -> None:
        where = self.committer.describe(session.inode)
        if session.write_errno and session.dirty:
            raise TxFailed(f"a write to {where} failed ({os.strerror(session.write_errno)})")
        if session.killed_by:
            raise TxFailed(f"a process writing {where} was killed (signal "
                           f"{session.killed_by})")

    async def _build(self, session: Session) -> int:
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

        def build() -> None:
            from .commit import _replace_xattrs
            for ext in plan:
                if ext.kind is Kind.COMMITTED:
                    for a, b in syscalls.data_ranges(data_fd, ext.start, ext.end):
                        syscalls.copy_range(data_fd, shadow, a, b - a)
            os.ftruncate(shadow, size)
            _replace_xattrs(inode.fd, shadow)
            syscalls.fchown_fd(shadow, committed.st_uid, committed.st_gid)
            os.fchmod(shadow, stat.S_IMODE(committed.st_mode))
            syscalls.utimens_fd(shadow, committed.st_atime_ns, mtime)

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

    def _prepare_new(self, tx: Transaction) -> None:
        """New files get their final size and times; what is new inside directories the
        transaction made is put in place there now (nobody else can reach them), so
        that one sync makes it durable before the record."""
        for (parent_ino, name), inode in sorted(tx.entries.items()):
            if parent_ino not in tx.private:
                continue
            parent = self.table.get(parent_ino)
            token = tx.staged.get(inode.ino)
            if token is not None:
                os.rename(token, name, src_dir_fd=tx.staging_fd, dst_dir_fd=parent.fd)
                del tx.staged[inode.ino]
                self.table.release(inode)
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

    async def _sync(self, tx: Transaction, built: list[int]) -> None:
        """Make every staged object durable: one fsync each, or one syncfs when there
        are many, or new directories (whose whole content must be durable)."""
        fds = list(built) + [s.shadow for s in tx.sessions.values()
                             if s.pending and s.shadow is not None and s.inode.names]
        root = self.table.root.fd
        whole = bool(tx.private) or len(fds) > SYNCFS_ABOVE

        def sync() -> None:
            faults.point("tx.before_sync")
            if whole:
                fd = syscalls.reopen(root, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    syscalls.syncfs(fd)
                    syscalls.check_up(fd)
                finally:
                    os.close(fd)
                return
            for fd in fds:
                os.fsync(fd)

        await trio.to_thread.run_sync(sync)

    def _path(self, parent: Inode) -> tuple[bytes, ...]:
        parts: list[bytes] = []
        node = parent
        for _ in range(4096):
            if node is self.table.root:
                return tuple(reversed(parts))
            name = next((n for n in sorted(node.names)
                         if self.table.by_ino.get(n[0]) is not None), None)
            if name is None:
                break
            parts.append(name[1])
            node = self.table.get(name[0])
        raise TxFailed(f"the directory {self.committer.describe(parent)} has no path")

    def _apply(self, tx: Transaction, built: list[tuple[Session, int]]) -> list[Inode]:
        """Stage names, write the record, rename everything into place, move the inodes.

        No await: requests see the tree before it or after it.  Before the record is
        durable a failure aborts the transaction (nothing changed in the tree);
        after it, the next mount replays the record.
        """
        ops: list[txrecord.Op] = []
        steps: list[tuple[txrecord.Op, Inode, Inode]] = []  # op, parent, the object
        op: txrecord.Op
        backings: dict[int, Backing] = {}
        dirs: dict[int, Inode] = {}
        sfd = tx.staging_fd
        self._check_conflicts(tx)
        try:
            # committed names removed (before the new names: one may take the place)
            for (_pino, name), (parent, dev, ino, fid) in tx.whiteouts.items():
                gone = txrecord.Unlink(self._path(parent), name, dev, ino, fid)
                ops.append(gone)
                steps.append((gone, parent, parent))
            # content of committed files: their new versions under a token
            for session, fd in built:
                inode = session.inode
                parent, name = self.shadows.find_name(inode, inode.key)
                token = tx.token("f")
                syscalls.link_fd(fd, sfd, token.encode())
                op = txrecord.Put(token, self._path(parent), name)
                ops.append(op)
                steps.append((op, parent, inode))
            # new names in committed directories (those in new directories are in
            # place already, _prepare_new): new files get a token
            for (parent_ino, name), inode in sorted(tx.entries.items()):
                parent = self.table.get(parent_ino)
                staged = tx.staged.get(inode.ino)
                if staged is None:  # a new file
                    shadow = tx.sessions[inode.ino].shadow
                    assert shadow is not None
                    staged = tx.token("f")
                    syscalls.link_fd(shadow, sfd, staged.encode())
                op = txrecord.Put(staged, self._path(parent), name)
                ops.append(op)
                steps.append((op, parent, inode))
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
        for i, (op, parent, _inode) in enumerate(steps):
            try:
                txrecord.apply_op(sfd, op, parent.fd)
            except OSError as exc:
                log.error("transaction of pid %d: applying %s failed (%s); the next mount "
                          "replays its record", tx.root, op.name, exc)
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
            _invalidate_attrs(inode.ino)
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
        self._release_whiteouts(tx)
        tx.entries.clear()
        tx.staged.clear()
        self._release_all_private(tx)
        for ino, session in list(tx.sessions.items()):
            self._release_session(tx, ino, session, drop=False)
        return list(dirs.values())

    def _check_conflicts(self, tx: Transaction) -> None:
        """First committer wins: a committed name the transaction changes that was
        changed by anyone else since the transaction first touched it (through the
        mount, or in SOURCE directly) fails the commit.  Called in _apply, with no
        await between this check and the renames."""
        changed = set(tx.entries) | set(tx.whiteouts)
        changed.update(tx.rewrites[ino] for ino, s in tx.sessions.items()
                       if ino in tx.rewrites and s.dirty and not s.pending)

        def now(parent_ino: int, name: bytes) -> Identity | None:
            parent = self.table.by_ino.get(parent_ino)
            if parent is None:
                return None
            return identity_of(stat_at(parent.fd, name))

        for parent_ino, name in conflicts(tx.seen, changed, now):
            parent = self.table.by_ino.get(parent_ino)
            path = (b"/".join((*self._path(parent), name)) if parent is not None
                    else name).decode(errors="replace")
            raise TxFailed(f"conflict: {path} was changed outside the transaction "
                           "since the transaction first changed it")

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

    async def _sync_dirs(self, dirs: list[Inode]) -> None:
        try:
            await sync_dirs(dirs, "tx.before_dir_fsync")
        except OSError as exc:
            log.error("a committed transaction's directories could not be synced (%s); "
                      "the next mount replays its record", exc)

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


def _invalidate_attrs(ino: int) -> None:
    with contextlib.suppress(OSError):  # ENOENT: the kernel does not know the inode
        pyfuse3.invalidate_inode(ino, attr_only=True)


def _result_bytes(result: dict[str, Any]) -> bytes:
    import json
    return json.dumps(result, sort_keys=True).encode()


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"

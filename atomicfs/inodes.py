"""The inode table: FUSE inode numbers, backing identities, lookup counts, and a
bounded number of descriptors (docs/semantics.md §11; docs/design-inodes.md).

The daemon hands out its own inode numbers.  Each :class:`Inode` is keyed by the
``(st_dev, st_ino)`` of its backing file and holds the kernel's lookup count,
the names under which the daemon has seen it and, while one is needed, an
``O_PATH`` fd to it (:attr:`Inode.fd`).  When a commit replaces the backing file
(rename commit), :meth:`InodeTable.rebind` moves the FUSE inode to the new
backing file, so ``st_ino`` seen through the mount never changes.

Descriptors: ``Inode.fd`` is opened on demand and kept in a bounded LRU cache
(:class:`Budget`).  An inode whose fd was evicted is reopened by its file handle
(``open_by_handle_at``: *handle mode*, a daemon with CAP_DAC_READ_SEARCH on a
filesystem that has handles), else through a parent and a name the table knows
(*path mode*).  Either way the reopened file's ``(st_dev, st_ino)`` must be the
inode's key, else ESTALE: a file replaced behind the daemon's back is never
taken for the old one.  Never evicted: the root, inodes with holders (open
handles, sessions, staged versions: their file may be unlinked, and an unlinked
file cannot be reopened), and inodes *pinned* by a request in progress.

Pins: every access to ``Inode.fd`` inside a :meth:`InodeTable.scope` (each
request handler and background step runs in one) pins the inode until the
scope ends, so an fd a request got can never be closed under it, nor its
number reused, while the request awaits (a worker thread may be using it).
Outside any scope nothing is pinned: only code that does not await may use
such an fd.

Invariants (checked by :meth:`InodeTable.check`):
- every inode in ``by_key`` is in ``by_ino`` under its own number, and back;
- lookup counts are never negative; the root is never dropped;
- an inode is dropped only when its lookup count is zero and nothing else
  (an open handle, a write session) holds it;
- ``_lru`` holds exactly the non-root inodes whose fd is open;
- an inode's fd is closed only when it is dropped or evicted, and evicted only
  with no holder and no pin.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import errno
import logging
import os
import resource
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyfuse3

from . import faults, journal, syscalls

log = logging.getLogger(__name__)

Key = tuple[int, int]
Name = tuple[int, bytes]  # (parent FUSE inode, name in that directory)

ROOT_INODE: int = pyfuse3.ROOT_INODE
EXHAUSTED = (errno.EMFILE, errno.ENFILE)
# files dropped from the table whose inode numbers are kept for their return
# (about 210 bytes each: 28 MB at most)
NUMBERS_KEPT = 1 << 17

# The inodes pinned by the request (or background step) running in this context.
_PINS: contextvars.ContextVar[set[Inode] | None] = contextvars.ContextVar(
    "atomicfs_pins", default=None)
# Set while a commit runs: it may use the descriptors kept in reserve.
_CRITICAL: contextvars.ContextVar[bool] = contextvars.ContextVar("atomicfs_critical",
                                                                 default=False)


@dataclass
class Budget:
    """How the daemon shares its descriptors (RLIMIT_NOFILE), decided at mount.

    - ``reserve``: descriptors held back (placeholders) for commits only, so a
      flood of opens cannot take the fds a commit needs (virtiofsd's
      ``guest_fd_limit`` idea);
    - ``cache``: O_PATH fds kept for inodes nobody holds (LRU); more are opened
      on demand and closed again;
    - the rest: open files, sessions, directory handles, the daemon's own files.
    """

    limit: int
    reserve: int
    cache: int

    @classmethod
    def for_limit(cls, limit: int) -> Budget:
        reserve = max(8, min(64, limit // 16))
        cache = max(16, min(4096, (limit - reserve) // 4))
        env = os.environ.get("ATOMICFS_FD_CACHE")  # test knob: a tiny cache
        if env:
            cache = max(1, int(env))
        return cls(limit, reserve, cache)

    @classmethod
    def current(cls) -> Budget:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return cls.for_limit(soft if soft != resource.RLIM_INFINITY else 1 << 20)


@dataclass(eq=False, slots=True)  # slots: ~90 bytes less per inode at a million
class Inode:
    ino: int
    key: Key
    _fd: int | None  # O_PATH fd of the backing file, while open (see InodeTable)
    mode: int  # file type bits and permissions, as last seen
    lookups: int = 0
    names: set[Name] = field(default_factory=set)
    holders: int = 0  # open handles and sessions that keep this inode alive
    data_fd: int | None = None  # readable fd of the committed version, opened on demand
    gone: bool = False  # a new file dropped before its first commit: it never existed
    handle: journal.FileId | None = None  # file handle of the backing file (handle mode)
    pins: int = 0  # scopes (requests in progress) using the fd
    dropped: bool = False  # out of the table; its fd closes when the last pin goes
    table: InodeTable | None = field(default=None, repr=False)
    # FUSE generation: bumped when a transaction's member removes this committed
    # directory (the kernel marked its inode dead for every process: an outsider's
    # next lookup must get a fresh kernel inode, docs/design-transactions.md)
    generation: int = 0

    @property
    def fd(self) -> int:
        """An O_PATH fd of the backing file, reopened if it was evicted (ESTALE if
        the file is gone or was replaced); pinned until the current scope ends."""
        assert self.table is not None
        return self.table.path_fd(self)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def any_name(self) -> Name | None:
        return min(self.names) if self.names else None


@dataclass(eq=False)
class Backing:
    """What an inode needs to move onto a new backing file, all got beforehand (a
    commit gets it before its point of no return: docs/semantics.md §11)."""

    fd: int  # O_PATH
    st: os.stat_result
    handle: journal.FileId | None


@dataclass
class FdStats:
    exhausted: int = 0  # requests failed with EMFILE/ENFILE
    reopened: int = 0  # evicted inodes reopened
    evicted: int = 0
    stale: int = 0  # reopens that found another file (ESTALE)
    reserve_used: int = 0  # times a commit took descriptors from the reserve


class InodeTable:
    def __init__(self, root_fd: int, budget: Budget | None = None,
                 handles: bool | None = None,
                 closer: Callable[[int], None] = os.close) -> None:
        st = os.stat(root_fd)
        self._next = ROOT_INODE + 1
        # numbers of files the table dropped (the kernel forgot them), by their key:
        # the same file looked up again gets its number back (docs/semantics.md §5)
        self._numbers: collections.OrderedDict[Key, int] = collections.OrderedDict()
        self.by_ino: dict[int, Inode] = {}
        self.by_key: dict[Key, Inode] = {}
        self.aliases_of: dict[int, set[Key]] = {}  # staged inodes: keys of their old files
        self.budget = budget or Budget.current()
        self.fd_stats = FdStats()
        self._lru: collections.OrderedDict[int, Inode] = collections.OrderedDict()
        self._trim_at = self.budget.cache
        self._main_thread = threading.get_ident()
        self._reserved: list[int] = []
        self._reserve_lock = threading.Lock()
        self._warned_exhausted = False
        root = Inode(ROOT_INODE, (st.st_dev, st.st_ino), root_fd, st.st_mode, lookups=1)
        root.table = self
        self._insert(root)
        self.root = root
        self.dev = st.st_dev
        self._mount_fd: int | None = None
        if handles is None:
            handles = os.environ.get("ATOMICFS_INODE_HANDLES", "1") != "0"  # test knob
        if handles and journal.available(root_fd):
            self._mount_fd = syscalls.reopen(root_fd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            journal.file_id(root_fd)
            self._handles_ok = True
        except OSError:  # a filesystem without handles: identity by (dev, ino) only
            self._handles_ok = False
        self.mode = "handles" if self._mount_fd is not None else "paths"
        # closes fds of files a commit replaced (the housekeeper defers it to a thread)
        self.closer = closer
        self.refill_reserve()
        syscalls.on_exhausted = self.relieve

    def _insert(self, inode: Inode) -> None:
        self.by_ino[inode.ino] = inode
        self.by_key[inode.key] = inode

    def __len__(self) -> int:
        return len(self.by_ino)

    @property
    def cached(self) -> int:
        """Non-root inodes whose O_PATH fd is open now."""
        return len(self._lru)

    def get(self, ino: int) -> Inode:
        try:
            return self.by_ino[ino]
        except KeyError:
            raise OSError(errno.ESTALE, f"unknown inode {ino}") from None

    def find(self, st: os.stat_result) -> Inode | None:
        return self.by_key.get((st.st_dev, st.st_ino))

    # -- descriptors: scopes, the LRU cache, reopening ------------------------------
    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Pin every inode whose fd is used inside, until the end (a request)."""
        pins: set[Inode] = set()
        token = _PINS.set(pins)
        try:
            yield
        finally:
            _PINS.reset(token)
            for inode in pins:
                inode.pins -= 1
                if inode.pins == 0 and inode.dropped and inode._fd is not None:
                    os.close(inode._fd)  # dropped while this request used it
                    inode._fd = None
            if len(self._lru) > self.budget.cache:
                self.trim()

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A commit: may take descriptors from the reserve (refilled afterwards)."""
        token = _CRITICAL.set(True)
        try:
            yield
        finally:
            _CRITICAL.reset(token)
            if len(self._reserved) < self.budget.reserve:
                self.refill_reserve()

    def path_fd(self, inode: Inode) -> int:
        """``inode.fd``.  Also called from worker threads (commit steps): there the
        inode is pinned by the request already, and nothing is trimmed."""
        pins = _PINS.get()
        if pins is not None and inode not in pins:  # pinned first: never evicted below
            pins.add(inode)
            inode.pins += 1
        fd = inode._fd
        if fd is None:
            fd = self._reopen(inode)
            inode._fd = fd
            if not inode.dropped:
                self._lru[inode.ino] = inode
        elif inode is not self.root and not inode.dropped:
            with contextlib.suppress(KeyError):
                self._lru.move_to_end(inode.ino)
        if len(self._lru) > self._trim_at and threading.get_ident() == self._main_thread:
            self.trim()
        return fd

    def _reopen(self, inode: Inode) -> int:
        """Open an O_PATH fd of the inode's backing file again, checking its identity."""
        faults.point("inodes.reopen")
        if inode.handle is not None and self._mount_fd is not None:
            try:
                fd = self.opening(journal._open_by_handle, self._mount_fd, inode.handle,
                                  os.O_PATH)
            except OSError as exc:
                if exc.errno in EXHAUSTED:
                    raise
                self.fd_stats.stale += 1
                raise OSError(errno.ESTALE, f"inode {inode.ino}: its file is gone "
                              f"({os.strerror(exc.errno or errno.EIO)})") from None
            if self._same(fd, inode):
                self.fd_stats.reopened += 1
                return fd
            os.close(fd)
        else:
            for parent_ino, name in sorted(inode.names):
                parent = self.by_ino.get(parent_ino)
                if parent is None or parent is inode:
                    continue
                try:
                    fd, _st = open_path(parent.fd, name, self)
                except OSError as exc:
                    if exc.errno in EXHAUSTED:
                        raise
                    continue
                if self._same(fd, inode) and self._same_handle(fd, inode):
                    self.fd_stats.reopened += 1
                    return fd
                os.close(fd)
        self.fd_stats.stale += 1
        raise OSError(errno.ESTALE, f"inode {inode.ino}: its file was replaced or removed "
                      "behind the mount")

    @staticmethod
    def _same(fd: int, inode: Inode) -> bool:
        st = os.stat(fd)
        return (st.st_dev, st.st_ino) == inode.key

    @staticmethod
    def _same_handle(fd: int, inode: Inode) -> bool:
        """Same file handle (it holds the inode's generation: an inode number the
        filesystem reused for a new file does not pass)?  No handle: not checked."""
        if inode.handle is None:
            return True
        try:
            return journal.file_id(fd) == inode.handle
        except OSError:
            return False

    def _evictable(self, inode: Inode) -> bool:
        return inode.holders == 0 and inode.pins == 0 and inode is not self.root

    def _evict(self, inode: Inode) -> None:
        fd = inode._fd
        del self._lru[inode.ino]
        inode._fd = None
        if inode.data_fd is not None:
            self.closer(inode.data_fd)
            inode.data_fd = None
        if fd is not None:
            os.close(fd)
        self.fd_stats.evicted += 1

    def trim(self, target: int | None = None) -> int:
        """Close the least recently used fds of inodes nobody holds or pins, down to
        ``target`` open (default: the budget).  Returns how many were closed."""
        goal = self.budget.cache if target is None else target
        closed = 0
        for _ in range(len(self._lru)):
            if len(self._lru) <= goal:
                break
            ino, inode = next(iter(self._lru.items()))
            if self._evictable(inode):
                self._evict(inode)
                closed += 1
            else:
                self._lru.move_to_end(ino)  # in use: it goes behind the others
        # what is left over the goal is in use: no new scan before it grows a little
        self._trim_at = (self.budget.cache if len(self._lru) <= goal
                         else max(self.budget.cache, len(self._lru) + 32))
        return closed

    def relieve(self) -> bool:
        """Out of descriptors: close cached fds (on the event loop's thread) and, in
        a commit, release the reserve.  True if something was freed (try again)."""
        syscalls.exhausted_at = time.monotonic()
        freed = False
        if threading.get_ident() == self._main_thread:
            freed = self.trim(0) > 0
        if _CRITICAL.get():
            with self._reserve_lock:
                if self._reserved:
                    for fd in self._reserved:
                        os.close(fd)
                    self._reserved.clear()
                    self.fd_stats.reserve_used += 1
                    freed = True
        return freed

    def opening(self, fn: Callable[..., int], *args: object) -> int:
        """``fn(*args)``, an fd-making call, tried again once if descriptors ran out
        and :meth:`relieve` freed some."""
        try:
            return fn(*args)
        except OSError as exc:
            if exc.errno not in EXHAUSTED or not self.relieve():
                raise
        return fn(*args)

    def refill_reserve(self) -> None:
        with self._reserve_lock:
            while len(self._reserved) < self.budget.reserve:
                try:
                    self._reserved.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
                except OSError:
                    return

    @property
    def reserved(self) -> int:
        return len(self._reserved)

    def stats(self) -> dict[str, Any]:
        """For the status document: the inodes known, and the descriptors cached
        and held in reserve against the budget (docs/semantics.md §11)."""
        return {
            "inodes": len(self),
            "limit": self.budget.limit,
            "cache_budget": self.budget.cache,
            "reserve": self.budget.reserve,
            "reserve_held": self.reserved,
            "cached_inodes": self.cached,
            "inode_mode": self.mode,
            "exhausted": self.fd_stats.exhausted,
            "reopened": self.fd_stats.reopened,
            "evicted": self.fd_stats.evicted,
            "stale": self.fd_stats.stale,
            "reserve_used": self.fd_stats.reserve_used,
        }

    def note_exhausted(self, what: str) -> None:
        """A request failed for lack of descriptors: count it; log it once."""
        self.fd_stats.exhausted += 1
        if self._warned_exhausted:
            return
        self._warned_exhausted = True
        held = open_fd_count()
        log.warning("out of file descriptors (%s): the request failed with EMFILE/ENFILE; "
                    "the daemon holds %s (limit %d: %d cached inode fds of %d inodes, %d held "
                    "in reserve); further such failures are only counted (atomicfs status)",
                    what, held if held >= 0 else "all it may", self.budget.limit,
                    self.cached, len(self.by_ino), self.reserved)

    def prepare(self, fd: int) -> Backing:
        """All an inode needs to move onto the file behind ``fd`` (any fd to it)."""
        faults.point("commit.prepare_backing")
        path = self.opening(syscalls.reopen, fd, os.O_PATH)
        try:
            st = os.stat(path)
            return Backing(path, st, self._handle_of(path, st))
        except BaseException:
            os.close(path)
            raise

    def _handle_of(self, fd: int, st: os.stat_result) -> journal.FileId | None:
        """The file handle (name_to_handle_at needs no privilege): the way to reopen
        in handle mode, and the identity check in path mode."""
        if st.st_dev != self.dev or not self._handles_ok:
            return None
        try:
            return journal.file_id(fd)
        except OSError:  # EOPNOTSUPP: no handles on this filesystem; by path then
            return None

    # -- the table -----------------------------------------------------------------
    def learn(self, parent: int, name: bytes, fd: int, st: os.stat_result) -> Inode:
        """Record that ``name`` in ``parent`` is the file behind ``fd`` (taken over).

        Does not count a lookup: callers add one only once the kernel got the entry.
        """
        key = (st.st_dev, st.st_ino)
        inode = self.by_key.get(key)
        if inode is None:
            inode = Inode(self._number(key), key, fd, st.st_mode,
                          handle=self._handle_of(fd, st), table=self)
            self._insert(inode)
            self._lru[inode.ino] = inode
        else:
            if inode._fd is None and inode.key == key:  # evicted: this fd will do
                inode._fd = fd
                self._lru[inode.ino] = inode
            else:
                os.close(fd)
            inode.mode = st.st_mode
        if inode is not self.root:
            inode.names.add((parent, name))
            pins = _PINS.get()
            if pins is not None and inode not in pins:
                pins.add(inode)
                inode.pins += 1
        if len(self._lru) > self._trim_at:
            self.trim()
        return inode

    def _number(self, key: Key) -> int:
        """The FUSE inode number (``st_ino`` through the mount) of a file the table
        learns: the one it had when the table last dropped it, else a new one.

        A number is only ever given back to the key it was dropped with, and it
        is taken out of the record then, so no two known files share one.  The
        record is bounded (the oldest go first): a file forgotten longer ago than
        the last NUMBERS_KEPT drops gets a new number, as it did before.  Another
        file that takes the key (the filesystem reused the inode number of a
        deleted file) gets the number too: two files never show it at once."""
        ino = self._numbers.pop(key, None)
        if ino is not None and ino not in self.by_ino:
            return ino
        ino = self._next
        self._next += 1
        return ino

    def data(self, inode: Inode) -> int:
        """A readable fd of the inode's committed version (kept while it is held)."""
        if inode.data_fd is None:
            inode.data_fd = self.opening(syscalls.reopen, inode.fd, os.O_RDONLY)
        return inode.data_fd

    def set_data_fd(self, inode: Inode, fd: int | None) -> None:
        if inode.data_fd is not None and inode.data_fd != fd:
            self.closer(inode.data_fd)
        inode.data_fd = fd

    def rebind(self, inode: Inode, backing: Backing, data_fd: int | None,
               keep_old: bool = False) -> None:
        """Point ``inode`` at a new backing file (after a rename commit); bookkeeping
        only, it cannot fail (it runs past a commit's point of no return).

        ``keep_old``: the caller takes over the old O_PATH fd instead of it being closed.
        """
        self.set_data_fd(inode, data_fd)
        old_fd = inode._fd
        if self.by_key.get(inode.key) is inode:
            del self.by_key[inode.key]
        inode.key = (backing.st.st_dev, backing.st.st_ino)
        inode._fd = backing.fd
        inode.handle = backing.handle
        inode.mode = backing.st.st_mode
        if inode is not self.root:
            self._lru[inode.ino] = inode
        clash = self.by_key.get(inode.key)
        if clash is not None:  # pragma: no cover - would be a bug upstream
            log.error("inode %d moved onto a file inode %d has", inode.ino, clash.ino)
        self.by_key[inode.key] = inode
        if old_fd is not None and not keep_old:
            self.closer(old_fd)

    def restore(self, inode: Inode, fd: int, key: Key | None) -> None:
        """Point ``inode`` back at the file behind O_PATH ``fd`` (key ``key``): a staged
        version that could not be published is dropped (commit.py, ``_lose``).  Takes
        ``fd`` over; the inode's current fds are closed.  Bookkeeping only: it
        cannot fail (a handle that cannot be read leaves identity to (dev, ino))."""
        if key is None or self.by_key.get(key) not in (None, inode):
            raise AssertionError("restore onto a backing file that has another inode")
        try:
            handle = self._handle_of(fd, os.stat(fd))
        except OSError:
            handle = None
        self.set_data_fd(inode, None)
        old_fd = inode._fd
        if self.by_key.get(inode.key) is inode:
            del self.by_key[inode.key]
        inode.key = key
        inode._fd = fd
        inode.handle = handle
        self.by_key[key] = inode
        if old_fd is not None:
            self.closer(old_fd)

    def alias(self, key: Key | None, inode: Inode) -> None:
        """Let ``key`` (a staged inode's old source file) find ``inode`` too."""
        if key is not None:
            self.by_key[key] = inode
            self.aliases_of.setdefault(inode.ino, set()).add(key)

    def unalias(self, key: Key | None, inode: Inode) -> None:
        if key is not None and self.by_key.get(key) is inode:
            del self.by_key[key]
        keys = self.aliases_of.get(inode.ino)
        if keys is not None:
            keys.discard(key)  # type: ignore[arg-type]
            if not keys:
                del self.aliases_of[inode.ino]

    # -- reference counts: changed only through these -------------------------------
    def remember(self, inode: Inode) -> None:
        """The kernel got an entry of ``inode`` (a lookup it counts until FORGET)."""
        inode.lookups += 1

    def hold(self, inode: Inode) -> None:
        """Keep ``inode`` (and its fds) alive: an open handle, a session, a staged
        version, a directory to fsync later.  Ended by :meth:`release`."""
        inode.holders += 1

    def release(self, inode: Inode) -> None:
        """End one :meth:`hold`; the inode goes if nothing else refers to it."""
        inode.holders -= 1
        self.maybe_drop(inode)

    def forget(self, ino: int, count: int) -> None:
        """The kernel forgot ``count`` lookups of ``ino`` (FORGET)."""
        inode = self.by_ino.get(ino)
        if inode is None:
            return
        inode.lookups -= count
        if inode.lookups < 0:
            raise AssertionError(f"inode {ino}: lookup count below zero")
        self.maybe_drop(inode)

    def maybe_drop(self, inode: Inode) -> None:
        """Drop the inode if nothing refers to it; if only nobody holds it, close its
        data fd (a read-only fd kept for reads through open handles)."""
        if inode.holders != 0 or inode is self.root:
            return
        if inode.data_fd is not None:
            self.set_data_fd(inode, None)
        if inode.lookups == 0:
            del self.by_ino[inode.ino]
            if self.by_key.get(inode.key) is inode:
                del self.by_key[inode.key]
                self._numbers[inode.key] = inode.ino
                if len(self._numbers) > NUMBERS_KEPT:
                    self._numbers.popitem(last=False)
            self._lru.pop(inode.ino, None)
            inode.dropped = True
            if inode.pins == 0 and inode._fd is not None:
                os.close(inode._fd)
                inode._fd = None

    def name_removed(self, parent: Inode, name: bytes, st: os.stat_result | None) -> None:
        if st is not None:
            inode = self.find(st)
            if inode is not None:
                inode.names.discard((parent.ino, name))

    def close_all(self) -> None:
        for inode in list(self.by_ino.values()):
            if inode is not self.root:
                self.set_data_fd(inode, None)
                if inode._fd is not None:
                    os.close(inode._fd)
                    inode._fd = None
        self.by_ino = {self.root.ino: self.root}
        self.by_key = {self.root.key: self.root}
        self._lru.clear()
        with self._reserve_lock:
            for fd in self._reserved:
                os.close(fd)
            self._reserved.clear()
        if self._mount_fd is not None:
            os.close(self._mount_fd)
            self._mount_fd = None
        if syscalls.on_exhausted == self.relieve:
            syscalls.on_exhausted = None

    def check(self) -> None:
        for ino, inode in self.by_ino.items():
            assert inode.ino == ino
            assert self.by_key.get(inode.key) is inode, f"inode {ino} not under its key"
            assert inode.lookups >= 0
            assert inode.pins >= 0
            if inode is not self.root:
                assert (inode._fd is not None) == (ino in self._lru), f"inode {ino}: lru"
        for key, inode in self.by_key.items():
            assert inode.key == key or key in self.aliases_of.get(inode.ino, ())
            assert self.by_ino.get(inode.ino) is inode


def open_fd_count() -> int:
    """How many descriptors this process holds now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own
    except OSError:
        return -1


def stat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    """lstat ``name`` in ``dir_fd``, or None if it does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_path(dir_fd: int, name: bytes, table: InodeTable | None = None
              ) -> tuple[int, os.stat_result]:
    """An O_PATH fd for ``name`` in ``dir_fd`` (never following a symlink), and its
    stat; with ``table``, tried again once after freeing descriptors if none was left."""
    if table is not None:
        fd = table.opening(lambda: os.open(name, syscalls.O_PATH_NOFOLLOW, dir_fd=dir_fd))
    else:
        fd = os.open(name, syscalls.O_PATH_NOFOLLOW, dir_fd=dir_fd)
    try:
        return fd, os.stat(fd)
    except BaseException:
        os.close(fd)
        raise

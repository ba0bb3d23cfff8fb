"""The inode table: FUSE inode numbers, backing identities, lookup counts.

The daemon hands out its own inode numbers.  Each :class:`Inode` is keyed by the
``(st_dev, st_ino)`` of its backing file and holds an ``O_PATH`` fd to it, the
kernel's lookup count and the names under which the daemon has seen it.  When a
commit replaces the backing file (rename commit), :meth:`InodeTable.rebind`
moves the FUSE inode to the new backing file, so ``st_ino`` seen through the
mount never changes.

Invariants (checked by :meth:`InodeTable.check`):
- every inode in ``by_key`` is in ``by_ino`` under its own number, and back;
- lookup counts are never negative; the root is never dropped;
- an inode is dropped (fd closed) only when its lookup count is zero and
  nothing else (an open handle, a write session) holds it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3

from . import syscalls

Key = tuple[int, int]
Name = tuple[int, bytes]  # (parent FUSE inode, name in that directory)

ROOT_INODE: int = pyfuse3.ROOT_INODE


@dataclass(eq=False)
class Inode:
    ino: int
    key: Key
    fd: int  # O_PATH fd of the backing file
    mode: int  # file type bits and permissions, as last seen
    lookups: int = 0
    names: set[Name] = field(default_factory=set)
    holders: int = 0  # open handles and sessions that keep this inode alive
    data_fd: int | None = None  # readable fd of the committed version, opened on demand
    gone: bool = False  # a new file dropped before its first commit: it never existed

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def any_name(self) -> Name | None:
        return min(self.names) if self.names else None


class InodeTable:
    def __init__(self, root_fd: int) -> None:
        st = os.stat(root_fd)
        self._next = ROOT_INODE + 1
        self.by_ino: dict[int, Inode] = {}
        self.by_key: dict[Key, Inode] = {}
        self.aliases_of: dict[int, set[Key]] = {}  # staged inodes: keys of their old files
        root = Inode(ROOT_INODE, (st.st_dev, st.st_ino), root_fd, st.st_mode, lookups=1)
        self._insert(root)
        self.root = root
        self.dev = st.st_dev
        # closes fds of files a commit replaced (the housekeeper defers it to a thread)
        self.closer: Callable[[int], None] = os.close

    def _insert(self, inode: Inode) -> None:
        self.by_ino[inode.ino] = inode
        self.by_key[inode.key] = inode

    def __len__(self) -> int:
        return len(self.by_ino)

    def get(self, ino: int) -> Inode:
        try:
            return self.by_ino[ino]
        except KeyError:
            raise OSError(errno.ESTALE, f"unknown inode {ino}") from None

    def find(self, st: os.stat_result) -> Inode | None:
        return self.by_key.get((st.st_dev, st.st_ino))

    def learn(self, parent: int, name: bytes, fd: int, st: os.stat_result) -> Inode:
        """Record that ``name`` in ``parent`` is the file behind ``fd`` (taken over).

        Does not count a lookup: callers add one only once the kernel got the entry.
        """
        key = (st.st_dev, st.st_ino)
        inode = self.by_key.get(key)
        if inode is None:
            inode = Inode(self._next, key, fd, st.st_mode)
            self._next += 1
            self._insert(inode)
        else:
            os.close(fd)
            inode.mode = st.st_mode
        if inode is not self.root:
            inode.names.add((parent, name))
        return inode

    def data(self, inode: Inode) -> int:
        """A readable fd of the inode's committed version (kept until it changes)."""
        if inode.data_fd is None:
            inode.data_fd = syscalls.reopen(inode.fd, os.O_RDONLY)
        return inode.data_fd

    def set_data_fd(self, inode: Inode, fd: int | None) -> None:
        if inode.data_fd is not None and inode.data_fd != fd:
            self.closer(inode.data_fd)
        inode.data_fd = fd

    def rebind(self, inode: Inode, fd: int, st: os.stat_result, data_fd: int | None,
               keep_old: bool = False) -> None:
        """Point ``inode`` at a new backing file (after a rename commit).

        ``keep_old``: the caller takes over the old O_PATH fd instead of it being closed.
        """
        self.set_data_fd(inode, data_fd)
        old_fd = inode.fd
        del self.by_key[inode.key]
        inode.key = (st.st_dev, st.st_ino)
        inode.fd = fd
        inode.mode = st.st_mode
        clash = self.by_key.get(inode.key)
        if clash is not None:  # pragma: no cover - would be a bug upstream
            raise OSError(errno.EIO, "rebind onto a backing file that has an inode")
        self.by_key[inode.key] = inode
        if not keep_old:
            self.closer(old_fd)

    def restore(self, inode: Inode, fd: int, key: Key | None) -> None:
        """Point ``inode`` back at the file behind O_PATH ``fd`` (key ``key``): a staged
        version that could not be published is dropped (commit.py, ``_lose``).  Takes
        ``fd`` over; the inode's current fds are closed."""
        if key is None or self.by_key.get(key) not in (None, inode):
            raise AssertionError("restore onto a backing file that has another inode")
        self.set_data_fd(inode, None)
        old_fd = inode.fd
        if self.by_key.get(inode.key) is inode:
            del self.by_key[inode.key]
        inode.key = key
        inode.fd = fd
        self.by_key[key] = inode
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

    def forget(self, ino: int, count: int) -> None:
        inode = self.by_ino.get(ino)
        if inode is None:
            return
        inode.lookups -= count
        if inode.lookups < 0:
            raise AssertionError(f"inode {ino}: lookup count below zero")
        self.maybe_drop(inode)

    def maybe_drop(self, inode: Inode) -> None:
        if inode.lookups == 0 and inode.holders == 0 and inode is not self.root:
            del self.by_ino[inode.ino]
            if self.by_key.get(inode.key) is inode:
                del self.by_key[inode.key]
            self.set_data_fd(inode, None)
            os.close(inode.fd)

    def name_removed(self, parent: Inode, name: bytes, st: os.stat_result | None) -> None:
        if st is not None:
            inode = self.find(st)
            if inode is not None:
                inode.names.discard((parent.ino, name))

    def close_all(self) -> None:
        for inode in list(self.by_ino.values()):
            if inode is not self.root:
                self.set_data_fd(inode, None)
                os.close(inode.fd)
        self.by_ino = {self.root.ino: self.root}
        self.by_key = {self.root.key: self.root}

    def check(self) -> None:
        for ino, inode in self.by_ino.items():
            assert inode.ino == ino
            assert self.by_key.get(inode.key) is inode, f"inode {ino} not under its key"
            assert inode.lookups >= 0
        for key, inode in self.by_key.items():
            assert inode.key == key or key in self.aliases_of.get(inode.ino, ())
            assert self.by_ino.get(inode.ino) is inode


def stat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    """lstat ``name`` in ``dir_fd``, or None if it does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_path(dir_fd: int, name: bytes) -> tuple[int, os.stat_result]:
    """An O_PATH fd for ``name`` in ``dir_fd`` (never following a symlink), and its stat."""
    fd = os.open(name, syscalls.O_PATH_NOFOLLOW, dir_fd=dir_fd)
    try:
        return fd, os.stat(fd)
    except BaseException:
        os.close(fd)
        raise

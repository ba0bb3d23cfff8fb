"""Namespace operations on the source tree: lookup, create, link, rename, remove, list.

Each operation is one ``*at`` call relative to the parent directory's fd, so it
is a single atomic step on the backing filesystem, and the inode table is
updated to match.  Names reserved for the daemon's own files are invisible
here: lookup answers ENOENT and creating one is refused with EPERM.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

import pyfuse3

from . import metadata, syscalls
from .inodes import Inode, InodeTable, open_path, stat_at

# The daemon's own files: a directory at the root of SOURCE and temporary names.
DAEMON_DIR = b".atomicfs"
TEMP_PREFIX = b".atomicfs~"


def is_reserved(parent: Inode, name: bytes, root: Inode) -> bool:
    return name.startswith(TEMP_PREFIX) or (parent is root and name == DAEMON_DIR)


def check_name(name: bytes) -> None:
    if len(name) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long")


@dataclass
class DirHandle:
    inode: Inode
    fd: int
    names: list[bytes] = field(default_factory=list)


class Namespace:
    def __init__(self, table: InodeTable) -> None:
        self.table = table

    # -- helpers -----------------------------------------------------------
    def _visible(self, parent: Inode, name: bytes) -> None:
        check_name(name)
        if is_reserved(parent, name, self.table.root):
            raise OSError(errno.ENOENT, "reserved name")

    def _creatable(self, parent: Inode, name: bytes) -> None:
        check_name(name)
        if is_reserved(parent, name, self.table.root):
            raise OSError(errno.EPERM, "name reserved for atomicfs")

    def entry(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """Look ``name`` up in ``parent`` and count one kernel lookup for it."""
        fd, st = open_path(parent.fd, name)
        inode = self.table.learn(parent.ino, name, fd, st)
        inode.lookups += 1
        return inode, st

    def _created(self, parent: Inode, name: bytes, ctx: pyfuse3.RequestContext,
                 mode: int | None = None) -> tuple[Inode, os.stat_result]:
        fd, st = open_path(parent.fd, name)
        try:
            metadata.give_to_caller(fd, ctx, os.stat(parent.fd), mode)
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        inode = self.table.learn(parent.ino, name, fd, st)
        inode.lookups += 1
        return inode, st

    # -- operations --------------------------------------------------------
    def lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        self._visible(parent, name)
        return self.entry(parent, name)

    def mkdir(self, parent: Inode, name: bytes, mode: int,
              ctx: pyfuse3.RequestContext) -> tuple[Inode, os.stat_result]:
        self._creatable(parent, name)
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=parent.fd)
        return self._created(parent, name, ctx, mode)

    def mknod(self, parent: Inode, name: bytes, mode: int, rdev: int,
              ctx: pyfuse3.RequestContext) -> tuple[Inode, os.stat_result]:
        self._creatable(parent, name)
        os.mknod(name, mode, rdev, dir_fd=parent.fd)
        return self._created(parent, name, ctx, mode)

    def symlink(self, parent: Inode, name: bytes, target: bytes,
                ctx: pyfuse3.RequestContext) -> tuple[Inode, os.stat_result]:
        self._creatable(parent, name)
        os.symlink(target, name, dir_fd=parent.fd)
        return self._created(parent, name, ctx)

    def link(self, inode: Inode, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        self._creatable(parent, name)
        if inode.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        syscalls.link_fd(inode.fd, parent.fd, name)
        return self.entry(parent, name)

    def unlink(self, parent: Inode, name: bytes) -> os.stat_result | None:
        self._visible(parent, name)
        st = stat_at(parent.fd, name)
        os.unlink(name, dir_fd=parent.fd)
        self.table.name_removed(parent, name, st)
        return st

    def rmdir(self, parent: Inode, name: bytes) -> None:
        self._visible(parent, name)
        st = stat_at(parent.fd, name)
        os.rmdir(name, dir_fd=parent.fd)
        self.table.name_removed(parent, name, st)

    def rename(self, old_parent: Inode, old: bytes, new_parent: Inode, new: bytes,
               flags: int) -> None:
        self._visible(old_parent, old)
        self._creatable(new_parent, new)
        src = stat_at(old_parent.fd, old)
        dst = stat_at(new_parent.fd, new)
        syscalls.renameat2(old_parent.fd, old, new_parent.fd, new, flags)
        moved = self.table.find(src) if src is not None else None
        replaced = self.table.find(dst) if dst is not None else None
        if replaced is not None:
            replaced.names.discard((new_parent.ino, new))
        if moved is not None:
            moved.names.discard((old_parent.ino, old))
            moved.names.add((new_parent.ino, new))
        if flags & syscalls.RENAME_EXCHANGE and replaced is not None:
            replaced.names.add((old_parent.ino, old))

    # -- directories -------------------------------------------------------
    def opendir(self, inode: Inode) -> DirHandle:
        fd = syscalls.reopen(inode.fd, os.O_RDONLY | os.O_DIRECTORY)
        return DirHandle(inode, fd)

    def list_names(self, handle: DirHandle) -> list[bytes]:
        os.lseek(handle.fd, 0, os.SEEK_SET)
        root = self.table.root
        names = sorted(os.fsencode(n) for n in os.listdir(handle.fd))
        return [n for n in names if not is_reserved(handle.inode, n, root)]

    def readdir_entry(self, handle: DirHandle, name: bytes) -> tuple[Inode, os.stat_result] | None:
        """Look up one listed entry without counting it (None if it vanished)."""
        try:
            fd, st = open_path(handle.inode.fd, name)
        except FileNotFoundError:
            return None
        return self.table.learn(handle.inode.ino, name, fd, st), st

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
    """The tree as seen through the mount: the source tree plus pending new files.

    A *pending* file was created through the mount but not committed yet: it
    has a name here (lookup, readdir, stat, unlink, rename all see it) but no
    entry in the source tree, so a crash leaves nothing of it.
    """

    def __init__(self, table: InodeTable) -> None:
        self.table = table
        self.pending: dict[int, dict[bytes, Inode]] = {}

    # -- pending files -----------------------------------------------------
    def add_pending(self, parent: Inode, name: bytes, inode: Inode) -> None:
        self.pending.setdefault(parent.ino, {})[name] = inode
        inode.names.add((parent.ino, name))
        self._dir_changed(parent)

    def _dir_changed(self, parent: Inode) -> None:
        """A pending name came or went: move the directory's mtime and ctime as that
        change would on the source filesystem (where nothing changed yet)."""
        syscalls.touch_fd(parent.fd)

    def pending_at(self, parent: Inode, name: bytes) -> Inode | None:
        names = self.pending.get(parent.ino)
        return names.get(name) if names else None

    def remove_pending(self, parent_ino: int, name: bytes) -> Inode | None:
        names = self.pending.get(parent_ino)
        if not names or name not in names:
            return None
        inode = names.pop(name)
        if not names:
            del self.pending[parent_ino]
        inode.names.discard((parent_ino, name))
        return inode

    def pending_name(self, inode: Inode) -> tuple[Inode, bytes] | None:
        """Where a pending inode is to be published (its first pending name)."""
        for parent_ino, name in sorted(inode.names):
            if self.pending.get(parent_ino, {}).get(name) is inode:
                return self.table.get(parent_ino), name
        return None

    def published(self, inode: Inode) -> None:
        """A pending inode got its name in the source tree: it is an ordinary file now."""
        for parent_ino, name in list(inode.names):
            if self.pending.get(parent_ino, {}).get(name) is inode:
                self.remove_pending(parent_ino, name)
                inode.names.add((parent_ino, name))

    def pending_links(self, inode: Inode) -> int:
        return sum(1 for p, n in inode.names if self.pending.get(p, {}).get(n) is inode)

    def hidden_dirs(self, parent: Inode) -> int:
        """How many subdirectories of ``parent`` are invisible (the daemon's own): st_nlink."""
        if parent is not self.table.root:
            return 0
        st = stat_at(parent.fd, DAEMON_DIR)
        return 1 if st is not None and stat.S_ISDIR(st.st_mode) else 0

    def exists(self, parent: Inode, name: bytes) -> bool:
        return self.pending_at(parent, name) is not None or stat_at(parent.fd, name) is not None

    # -- helpers -----------------------------------------------------------
    def _visible(self, parent: Inode, name: bytes) -> None:
        check_name(name)
        if is_reserved(parent, name, self.table.root):
            raise OSError(errno.ENOENT, "reserved name")

    def _creatable(self, parent: Inode, name: bytes) -> None:
        check_name(name)
        if is_reserved(parent, name, self.table.root):
            raise OSError(errno.EPERM, "name reserved for atomicfs")
        if self.pending_at(parent, name) is not None:
            raise OSError(errno.EEXIST, "a new file of that name exists")

    def entry(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """Look ``name`` up in ``parent`` and count one kernel lookup for it."""
        fd, st = open_path(parent.fd, name, self.table)
        inode = self.table.learn(parent.ino, name, fd, st)
        self.table.remember(inode)
        return inode, st

    def _created(self, parent: Inode, name: bytes, ctx: pyfuse3.RequestContext,
                 mode: int | None = None) -> tuple[Inode, os.stat_result]:
        fd, st = open_path(parent.fd, name, self.table)
        try:
            metadata.give_to_caller(fd, ctx, os.stat(parent.fd), mode)
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        inode = self.table.learn(parent.ino, name, fd, st)
        self.table.remember(inode)
        return inode, st

    # -- operations --------------------------------------------------------
    def lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        self._visible(parent, name)
        inode = self.pending_at(parent, name)
        if inode is not None:
            self.table.remember(inode)
            return inode, os.stat(inode.fd)
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

    def unlink(self, parent: Inode, name: bytes) -> Inode | None:
        """Remove a name; returns the pending inode if the name was a pending file."""
        self._visible(parent, name)
        inode = self.remove_pending(parent.ino, name)
        if inode is not None:
            self._dir_changed(parent)
            return inode
        st = stat_at(parent.fd, name)
        os.unlink(name, dir_fd=parent.fd)
        self.table.name_removed(parent, name, st)
        return None

    def rmdir(self, parent: Inode, name: bytes) -> None:
        self._visible(parent, name)
        st = stat_at(parent.fd, name)
        child = self.table.find(st) if st is not None else None
        if child is not None and self.pending.get(child.ino):
            raise OSError(errno.ENOTEMPTY, "directory holds new files")
        os.rmdir(name, dir_fd=parent.fd)
        self.table.name_removed(parent, name, st)

    def rename(self, old_parent: Inode, old: bytes, new_parent: Inode, new: bytes,
               flags: int) -> bool:
        """Rename; a pending source must already have been published unless the
        target name is free (then the pending entry just moves).  Returns whether
        the source tree changed (False: only pending entries moved)."""
        self._visible(old_parent, old)
        check_name(new)
        if is_reserved(new_parent, new, self.table.root):
            raise OSError(errno.EPERM, "name reserved for atomicfs")
        moving = self.pending_at(old_parent, old)
        target = self.pending_at(new_parent, new)
        if moving is not None:
            if moving is target:
                return False
            if target is not None or stat_at(new_parent.fd, new) is not None:
                raise AssertionError("rename of a pending file over a name: publish it first")
            if flags & syscalls.RENAME_EXCHANGE:
                raise OSError(errno.ENOENT, "no such file to exchange with")
            if stat_at(old_parent.fd, old) is not None:
                raise AssertionError("a pending name shadows a source file")
            self.remove_pending(old_parent.ino, old)
            self._dir_changed(old_parent)
            self.add_pending(new_parent, new, moving)
            return False
        if target is not None:
            if flags & syscalls.RENAME_NOREPLACE:
                raise OSError(errno.EEXIST, "target exists")
            if flags & syscalls.RENAME_EXCHANGE:
                raise AssertionError("exchange with a pending file: publish it first")
            src_st = stat_at(old_parent.fd, old)
            if src_st is None:
                raise OSError(errno.ENOENT, "no such file")
            if stat.S_ISDIR(src_st.st_mode):
                raise OSError(errno.ENOTDIR, "target is not a directory")
            self.remove_pending(new_parent.ino, new)
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
        return True

    # -- directories -------------------------------------------------------
    def opendir(self, inode: Inode) -> DirHandle:
        fd = syscalls.reopen(inode.fd, os.O_RDONLY | os.O_DIRECTORY)
        return DirHandle(inode, fd)

    def list_names(self, handle: DirHandle) -> list[bytes]:
        os.lseek(handle.fd, 0, os.SEEK_SET)
        root = self.table.root
        names = {os.fsencode(n) for n in os.listdir(handle.fd)}
        names.update(self.pending.get(handle.inode.ino, {}))
        return sorted(n for n in names if not is_reserved(handle.inode, n, root))

    def readdir_entry(self, handle: DirHandle, name: bytes) -> tuple[Inode, os.stat_result] | None:
        """Look up one listed entry without counting it (None if it vanished)."""
        inode = self.pending_at(handle.inode, name)
        if inode is not None:
            return inode, os.stat(inode.fd)
        try:
            fd, st = open_path(handle.inode.fd, name, self.table)
        except FileNotFoundError:
            return None
        return self.table.learn(handle.inode.ino, name, fd, st), st

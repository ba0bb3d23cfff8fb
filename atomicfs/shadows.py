"""Shadow files: the unnamed files a session writes into and a commit publishes.

A shadow is made on the filesystem of the file it will become, so a commit
can link or rename it into place.  Where that is the source root's filesystem,
a ready one is taken from the housekeeper's pool (:mod:`atomicfs.housekeeping`
keeps a few made in the daemon's directory, off the request path); else, or
when the pool is empty, one is made here with ``O_TMPFILE``.  A write's first
shadow comes from here (``Session.write`` → ``OpenFiles._make_shadow``), not
through the commit protocol.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from . import metadata, syscalls
from .housekeeping import Housekeeper
from .inodes import Inode, InodeTable, Key


class Shadows:
    """Makes shadow files (a ready one from the pool where it fits)."""

    def __init__(self, table: InodeTable, housekeeper: Housekeeper, daemon_dir: int,
                 find_name: Callable[[Inode, Key | None], tuple[Inode, bytes]]) -> None:
        self.table = table
        self.housekeeper = housekeeper
        self.daemon_dir = daemon_dir
        self.find_name = find_name

    def make(self, inode: Inode) -> int:
        """A new unnamed file on the inode's filesystem: a ready one from the pool (in
        the daemon's directory) where the file is on the source root's filesystem,
        else one made in the file's directory."""
        if inode.key[0] == self.table.dev:
            fd = self.housekeeper.take_shadow()
            if fd is not None:
                return fd
        try:
            dir_fd = self.find_name(inode, None)[0].fd
        except OSError:  # unlinked while open: never committed, any directory will do
            dir_fd = self.daemon_dir
        return syscalls.tmpfile(dir_fd)

    def for_new_file(self, parent: Inode, parent_st: os.stat_result, mode: int) -> int:
        """The unnamed file that becomes a new file in ``parent`` at its first commit.

        A ready one from the pool (made in the daemon's directory) when the parent
        would give a file made in it nothing a file made elsewhere lacks: same
        filesystem, no default ACL, no security label, and (for an unprivileged
        daemon, which cannot chown) no setgid group; else one made in ``parent``.
        """
        if (parent.key[0] == self.table.dev
                and (metadata.IS_ROOT or not parent_st.st_mode & stat.S_ISGID)
                and not any(n == b"system.posix_acl_default" or n.startswith(b"security.")
                            for n in metadata.list_xattrs(parent.fd))):
            fd = self.housekeeper.take_shadow()
            if fd is not None:
                try:
                    os.fchmod(fd, mode & 0o7777)
                    syscalls.touch_fd(fd, atime=True)  # made now, by the kernel's clock
                except BaseException:
                    os.close(fd)
                    raise
                return fd
        return syscalls.tmpfile(parent.fd, mode & 0o7777)

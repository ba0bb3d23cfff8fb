#!/usr/bin/env python3
"""BENCHMARK PEER ONLY -- not part of atomicfs.  A plain pyfuse3 passthrough.

    python scripts/passthrough.py SOURCE MOUNTPOINT

It forwards every request to SOURCE with no commit work at all, configured as
atomicfs is (the same entry/attribute timeouts, the page cache kept across
opens, no writeback cache).  ``scripts/bench`` mounts it as the ``pyfuse3``
target: the floor of what Python plus pyfuse3 can do on this machine, which
tells how much of atomicfs's cost is its own.

Deliberately minimal: paths are kept per inode (a rename updates the paths
below it), syscalls run in the event loop (a thread hand-off would only add
cost), errors become errnos.  It does not guard against symlink races or
changes made in SOURCE beside it, and it is not meant to hold data anyone cares
about.  Stops on SIGINT/SIGTERM or at unmount.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from collections.abc import Sequence
from typing import Any

import pyfuse3
import trio

TIMEOUT = 10.0  # atomicfs's default entry_timeout/attr_timeout


def _errno(exc: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(exc.errno or errno.EIO)


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self.lookups: dict[int, int] = {pyfuse3.ROOT_INODE: 1}
        self.root_ino = os.lstat(source).st_ino

    # -- inodes ------------------------------------------------------------------
    def _ino(self, st: os.stat_result) -> int:
        return pyfuse3.ROOT_INODE if st.st_ino == self.root_ino else st.st_ino

    def _path(self, inode: int) -> str:
        try:
            return self.paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _attrs(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                      "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(attr, field, getattr(st, field))
        attr.st_ino = self._ino(st)
        attr.generation = 0
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        return attr

    def _learn(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise _errno(exc) from None
        ino = self._ino(st)
        self.paths[ino] = path
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return self._attrs(st)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._learn(self._child(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left > 0 or ino == pyfuse3.ROOT_INODE:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                self.paths.pop(ino, None)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            return self._attrs(os.lstat(self._path(inode)))
        except OSError as exc:
            raise _errno(exc) from None

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                         follow_symlinks=False)
            return self._attrs(os.lstat(path))
        except OSError as exc:
            raise _errno(exc) from None

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return os.fsencode(os.readlink(self._path(inode)))
        except OSError as exc:
            raise _errno(exc) from None

    # -- namespace ---------------------------------------------------------------
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.mknod(path, mode, rdev)
        except OSError as exc:
            raise _errno(exc) from None
        return self._learn(path)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode)
        except OSError as exc:
            raise _errno(exc) from None
        return self._learn(path)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        try:
            os.symlink(target, path)
        except OSError as exc:
            raise _errno(exc) from None
        return self._learn(path)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        try:
            os.link(self._path(inode), path, follow_symlinks=False)
        except OSError as exc:
            raise _errno(exc) from None
        return self._learn(path)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            os.unlink(self._child(parent_inode, name))
        except OSError as exc:
            raise _errno(exc) from None

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            os.rmdir(self._child(parent_inode, name))
        except OSError as exc:
            raise _errno(exc) from None

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        try:
            os.rename(old, new)
        except OSError as exc:
            raise _errno(exc) from None
        prefix = old + os.sep
        for ino, path in list(self.paths.items()):
            if path == old:
                self.paths[ino] = new
            elif path.startswith(prefix):
                self.paths[ino] = new + path[len(old):]

    # -- directories -------------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        path = self._path(fh)
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise _errno(exc) from None
        for i, name in enumerate(names[start_id:], start_id + 1):
            child = os.path.join(path, name)
            try:
                attr = self._attrs(os.lstat(child))
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i):
                break
            self.paths[attr.st_ino] = child
            self.lookups[attr.st_ino] = self.lookups.get(attr.st_ino, 0) + 1

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = os.open(self._path(fh), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = os.statvfs(self._path(pyfuse3.ROOT_INODE))
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(s, field))
        return out

    # -- files -------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        except OSError as exc:
            raise _errno(exc) from None
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, Any]:
        path = self._child(parent_inode, name)
        try:
            fd = os.open(path, flags | os.O_CREAT, mode)
        except OSError as exc:
            raise _errno(exc) from None
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._learn(path)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return os.pread(fh, size, off)
        except OSError as exc:
            raise _errno(exc) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            return os.pwrite(fh, buf, off)
        except OSError as exc:
            raise _errno(exc) from None

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            (os.fdatasync if datasync else os.fsync)(fh)
        except OSError as exc:
            raise _errno(exc) from None

    async def release(self, fh: int) -> None:
        os.close(fh)

    # -- xattrs (what the kernel asks for on every write) ------------------------
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return os.getxattr(self._path(inode), name, follow_symlinks=False)
        except OSError as exc:
            raise _errno(exc) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        try:
            return [os.fsencode(n) for n in os.listxattr(self._path(inode),
                                                          follow_symlinks=False)]
        except OSError as exc:
            raise _errno(exc) from None

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        try:
            os.setxattr(self._path(inode), name, value, follow_symlinks=False)
        except OSError as exc:
            raise _errno(exc) from None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: passthrough.py SOURCE MOUNTPOINT  (a benchmark peer, not atomicfs)",
              file=sys.stderr)
        return 2
    source, mountpoint = (os.path.abspath(a) for a in argv)
    ops = Passthrough(source)
    options = set(pyfuse3.default_options)
    options.add("fsname=pyfuse3-passthrough")
    if os.geteuid() == 0:
        options |= {"allow_other", "default_permissions"}
    pyfuse3.init(ops, mountpoint, options)
    signal.signal(signal.SIGTERM, lambda *_: pyfuse3.terminate())
    signal.signal(signal.SIGINT, lambda *_: pyfuse3.terminate())
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Open regular files: handles and their I/O.

Foundation stage: a handle is a real fd on the backing file and writes go
straight to it.  Write sessions (shadow copies committed atomically) replace
the body of this module; the interface the Operations class uses stays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyfuse3
import trio

from . import metadata, syscalls
from .inodes import Inode, InodeTable
from .namespace import Namespace

_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | getattr(os, "O_DIRECT", 0)


@dataclass(eq=False)
class FileHandle:
    fh: int
    inode: Inode
    fd: int
    flags: int


class Files:
    def __init__(self, table: InodeTable, namespace: Namespace) -> None:
        self.table = table
        self.namespace = namespace
        self.handles: dict[int, FileHandle] = {}
        self._next_fh = 1

    def get(self, fh: int) -> FileHandle:
        return self.handles[fh]

    def _register(self, inode: Inode, fd: int, flags: int) -> FileHandle:
        handle = FileHandle(self._next_fh, inode, fd, flags)
        self._next_fh += 1
        self.handles[handle.fh] = handle
        inode.holders += 1
        return handle

    def open(self, inode: Inode, flags: int) -> FileHandle:
        fd = syscalls.reopen(inode.fd, flags & ~_STRIP)
        return self._register(inode, fd, flags)

    def create(self, parent: Inode, name: bytes, mode: int, flags: int,
               ctx: pyfuse3.RequestContext) -> tuple[FileHandle, os.stat_result]:
        self.namespace._creatable(parent, name)
        fd = os.open(name, (flags & ~_STRIP) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     mode & 0o7777, dir_fd=parent.fd)
        try:
            metadata.give_to_caller(fd, ctx, os.stat(parent.fd), mode)
            inode, st = self.namespace.entry(parent, name)
        except BaseException:
            os.close(fd)
            raise
        return self._register(inode, fd, flags), st

    def stat(self, inode: Inode) -> os.stat_result:
        return os.stat(inode.fd)

    def read(self, handle: FileHandle, off: int, size: int) -> bytes:
        return os.pread(handle.fd, size, off)

    def write(self, handle: FileHandle, off: int, buf: bytes) -> int:
        return os.pwrite(handle.fd, buf, off)

    async def truncate(self, inode: Inode, size: int, handle: FileHandle | None) -> None:
        if handle is not None:
            os.ftruncate(handle.fd, size)
            return
        fd = syscalls.reopen(inode.fd, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    async def flush(self, handle: FileHandle) -> None:
        return None

    async def fsync(self, handle: FileHandle, datasync: bool) -> None:
        sync = os.fdatasync if datasync else os.fsync
        await trio.to_thread.run_sync(sync, handle.fd)

    async def release(self, handle: FileHandle) -> None:
        del self.handles[handle.fh]
        os.close(handle.fd)
        handle.inode.holders -= 1
        self.table.maybe_drop(handle.inode)

    def close_all(self) -> None:
        for handle in list(self.handles.values()):
            os.close(handle.fd)
        self.handles.clear()

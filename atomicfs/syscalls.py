"""Raw ``*at`` system calls that Python's ``os`` module lacks or restricts.

Everything the daemon does to the source tree goes through a directory fd or an
``O_PATH`` fd; nothing is reached by a path string, so a rename or a symlink
swapped in by someone else cannot make the daemon act outside the tree.  This
module holds the calls ``os`` does not offer in that form (``AT_EMPTY_PATH``
variants, ``renameat2``, ``fallocate``, ``syncfs``, ``FICLONE``) and the
``/proc/self/fd`` re-open trick, so the rest of the code reads as file-system
logic.  Every wrapper raises ``OSError`` with the call's errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import time
from collections.abc import Callable

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

FICLONE = 0x40049409

O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_int]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                           ctypes.c_int]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec),
                            ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syncfs.argtypes = [ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def proc_path(fd: int) -> str:
    """The magic link that reaches what ``fd`` refers to, even an ``O_PATH`` fd."""
    return f"/proc/self/fd/{fd}"


# Called when an open fails with EMFILE/ENFILE; returns True if it freed
# descriptors (the open is then tried once more).  Set by the inode table.
on_exhausted: Callable[[], bool] | None = None
# time.monotonic() of the last open that found no descriptor free: optional work
# (the housekeeper's pool of ready shadows) waits a while after it.
exhausted_at = -1e9


def _retry_exhausted(fn: Callable[[], int]) -> int:
    global exhausted_at
    try:
        return fn()
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        exhausted_at = time.monotonic()
        hook = on_exhausted
        if hook is None or not hook():
            raise
    return fn()


def reopen(fd: int, flags: int) -> int:
    """Open the file behind an ``O_PATH`` fd for real I/O (``flags`` as for open)."""
    return _retry_exhausted(lambda: os.open(proc_path(fd), flags | os.O_CLOEXEC))


def sync_filesystem(path_fd: int) -> None:
    """syncfs of the filesystem of a directory reached by an O_PATH fd; raises EIO
    if the filesystem went down (syncfs itself may not say so: :func:`check_up`)."""
    fd = reopen(path_fd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
        check_up(fd)
    finally:
        os.close(fd)


def fsync_dir(dir_path_fd: int) -> None:
    """fsync a directory reached by an O_PATH fd (fsync refuses O_PATH fds); raises
    EIO if the filesystem went down (:func:`fsync_dir_fd`)."""
    fd = reopen(dir_path_fd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync_dir_fd(fd)
    finally:
        os.close(fd)


def fsync_dir_fd(fd: int) -> None:
    """fsync an open directory, and raise EIO if its filesystem was shut down.

    XFS answers fsync of a *directory* with success after the filesystem was shut
    down (an I/O error, a power cut simulated by XFS_IOC_GOINGDOWN): the shutdown
    aborts the in-memory log and unpins the directory's inode, and the directory
    fsync forces the log only for a pinned inode, without checking for a shutdown
    (fsync of a regular file does check).  The rename or link the fsync was meant
    to make durable is then lost while the fsync reported success (seen here: a
    rename, GOINGDOWN, fsync of the directory -> 0, remount -> the old name;
    tests/test_powercut_xfs.py).  XFS's getattr does check for a shutdown, so a
    stat after the fsync tells the two apart: if the stat succeeds, the
    filesystem was not down when the fsync looked at the inode, and an unpinned
    inode then meant its changes were on disk.  (ext4 fails the fsync itself.)
    """
    os.fsync(fd)
    os.fstat(fd)  # EIO if the filesystem went down meanwhile (XFS: see above)


def check_up(fd: int) -> None:
    """Raise EIO if the filesystem of ``fd`` was shut down (XFS; see :func:`fsync_dir_fd`)."""
    os.fstat(fd)


def tmpfile(dir_fd: int, mode: int = 0o600) -> int:
    """An unnamed O_RDWR file in ``dir_fd``'s directory (nothing left after a crash)."""
    return _retry_exhausted(lambda: os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC,
                                            mode, dir_fd=dir_fd))


def renameat2(olddir: int, oldname: bytes, newdir: int, newname: bytes, flags: int = 0) -> None:
    _check(_libc.renameat2(olddir, oldname, newdir, newname, flags), "renameat2")


def link_fd(fd: int, newdir: int, newname: bytes) -> None:
    """Give the inode behind ``fd`` (O_PATH or O_TMPFILE fd) a new name."""
    try:
        _check(_libc.linkat(fd, b"", newdir, newname, AT_EMPTY_PATH), "linkat")
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EPERM):
            raise
        # Without CAP_DAC_READ_SEARCH, AT_EMPTY_PATH is refused; the /proc link works
        # for O_TMPFILE files and ordinary files alike.
        _check(_libc.linkat(AT_FDCWD, proc_path(fd).encode(), newdir, newname,
                            AT_SYMLINK_FOLLOW), "linkat")


def fchown_fd(fd: int, uid: int, gid: int) -> None:
    """chown the inode behind ``fd`` itself (works for O_PATH fds and symlinks)."""
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")


def touch_fd(fd: int, atime: bool = False) -> None:
    """Set the mtime (and so the ctime) of the inode behind ``fd`` to now; the atime
    too with ``atime``, else kept."""
    times = (_Timespec * 2)(_Timespec(0, UTIME_NOW if atime else UTIME_OMIT),
                            _Timespec(0, UTIME_NOW))
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "utimensat")


def utimens_fd(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set times of the inode behind ``fd``; ``None`` keeps (UTIME_OMIT).

    Negative times are before 1970 (floor division gives the timespec the kernel
    wants: tv_nsec in [0, 1e9)).
    """

    def spec(ns: int | None) -> _Timespec:
        if ns is None:
            return _Timespec(0, UTIME_OMIT)
        return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)

    times = (_Timespec * 2)(spec(atime_ns), spec(mtime_ns))
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "utimensat")


def punch_hole(fd: int, offset: int, length: int) -> None:
    if length > 0:
        _check(_libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length),
               "fallocate(PUNCH_HOLE)")


def allocate(fd: int, offset: int, length: int) -> None:
    """fallocate(KEEP_SIZE): reserve blocks for ``[offset, offset+length)``; content unchanged."""
    if length > 0:
        _check(_libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length), "fallocate")


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd), "syncfs")


def clone_file(dst_fd: int, src_fd: int) -> None:
    """Reflink the whole of ``src_fd`` into ``dst_fd`` (FICLONE)."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def pread_cached(fd: int, size: int, offset: int) -> bytes | None:
    """What ``pread(fd, size, offset)`` returns, if the page cache holds all of it
    (RWF_NOWAIT: never waits for the disk); else None (not cached, partly cached,
    or RWF_NOWAIT unsupported), and the caller reads in a worker thread.  A short
    read is complete only at the end of the file (one fstat tells)."""
    buf = bytearray(size)
    try:
        n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no RWF_NOWAIT here
        return None
    if n == size:
        return bytes(buf)
    if offset + n >= os.fstat(fd).st_size:  # the file ends there: nothing was missed
        return bytes(buf[:n])
    return None


def data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The ``[a, b)`` ranges inside ``[start, end)`` that hold data (SEEK_DATA/SEEK_HOLE)."""
    ranges: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            if exc.errno == errno.EINVAL:  # filesystem without SEEK_DATA: all data
                return [(start, end)] if start < end else []
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        ranges.append((data, hole))
        pos = hole
    return ranges


def split_by_data(fd: int, start: int, end: int) -> list[tuple[int, int, bool]]:
    """``[start, end)`` cut into ``(a, b, is_data)`` pieces, in order, by the holes of ``fd``."""
    pieces: list[tuple[int, int, bool]] = []
    pos = start
    for a, b in data_ranges(fd, start, end):
        if a > pos:
            pieces.append((pos, a, False))
        pieces.append((a, b, True))
        pos = b
    if pos < end:
        pieces.append((pos, end, False))
    return pieces


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` from src to the same offset in dst."""
    done = 0
    use_cfr = True
    while done < length:
        pos = offset + done
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, length - done, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                use_cfr = False
                continue
        else:
            buf = os.pread(src_fd, min(length - done, 1 << 20), pos)
            n = os.pwrite(dst_fd, buf, pos) if buf else 0
        if n == 0:
            break  # source shorter than expected: the rest stays a hole
        done += n

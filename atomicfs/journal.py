"""Redo journal for in-place commits: records, writing, applying, replay.

An in-place commit changes a file without replacing it (hard-linked files,
whose other names must see the change; large files, where copying the
unchanged bytes would cost more than the change).  It is made atomic by a
redo record written first:

1. the record — target identity, new size and mtime, and every changed extent
   (data, or a hole to punch) — is written to ``SOURCE/.atomicfs/journal-N``,
   and the file and the directory are fsync'ed: from here the commit is
   durable (write-ahead), and the call that made it may return once
2. the extents are applied to the target in place (the page cache: readers
   through the mount see the new version at once);
3. after the call returned, the daemon's housekeeping fsyncs the target and
   removes the record (:func:`settle`), then fsyncs the directory.

Records are named with a zero-padded sequence number, and replay applies them
in that order, so a crash that leaves several records of one file (a second
commit came before the first settled) redoes them oldest first.  Replaying a
record that was already applied and fsync'ed only rewrites what it wrote: any
later change of the file is either a later record (replayed after it) or
replaced the inode (a rename commit), which makes the old record's target
handle stale.

A crash during 1 leaves a record that does not verify (wrong length or
checksum): it is discarded and the target was never touched.  A crash during
2 or 3 leaves a complete record: replay applies it again (applying is
idempotent: the same bytes at the same offsets, the same size) and removes it.

Record layout (little-endian), version 2:
    header  "AFSJ0002" | u64 body length | u32 crc32(body)
    body    u64 st_ino | u64 new size | i64 mtime_ns | u32 flags (1: set the mtime)
            | u32 handle type | u32 handle length | handle bytes | u32 extent count
            | per extent: u64 offset | u64 length | u8 kind (1 data, 2 hole)
            | then the data of every data extent, in order
Version 1 ("AFSJ0001", no flags field, mtime_ns -1 meaning "keep", so a
time before 1970 could not be kept) is still read, for records left by an
older daemon.  The encoding functions are pure (testable without FUSE); applying and replay
take fds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from . import faults, syscalls

log = logging.getLogger(__name__)

MAGIC = b"AFSJ0002"
MAGIC_V1 = b"AFSJ0001"
HEADER = struct.Struct("<8sQI")
FIXED = struct.Struct("<QQqIII")  # ino, size, mtime_ns, flags, handle type, handle length
FIXED_V1 = struct.Struct("<QQqII")  # ino, size, mtime_ns (-1: keep), handle type, length
SET_MTIME = 1
LAYOUTS = {MAGIC: FIXED, MAGIC_V1: FIXED_V1}  # the record formats replay reads
EXTENT = struct.Struct("<QQB")
COUNT = struct.Struct("<I")
DATA, HOLE = 1, 2
RECORD_PREFIX = "journal-"
CHUNK = 1 << 20


@dataclass(frozen=True)
class FileId:
    """A persistent reference to a file (name_to_handle_at), with its inode number."""

    ino: int
    handle_type: int
    handle: bytes


@dataclass(frozen=True)
class Change:
    offset: int
    length: int
    kind: int  # DATA or HOLE


@dataclass(frozen=True)
class Record:
    target: FileId
    size: int
    mtime_ns: int | None  # None: leave the mtime as applying sets it
    changes: tuple[Change, ...]


# -- file handles ---------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def file_id(path_fd: int) -> FileId:
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(path_fd, b"", ctypes.byref(fh), ctypes.byref(mount_id),
                               syscalls.AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"name_to_handle_at: {os.strerror(err)}")
    return FileId(os.stat(path_fd).st_ino, fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes]))


def open_file_id(root_fd: int, fid: FileId, flags: int) -> int:
    """Reopen a file by handle; ``root_fd``: any fd in the filesystem (O_PATH will do)."""
    mount_fd = syscalls.reopen(root_fd, os.O_RDONLY | os.O_DIRECTORY)  # O_PATH is refused
    try:
        return _open_by_handle(mount_fd, fid, flags)
    finally:
        os.close(mount_fd)


def _open_by_handle(mount_fd: int, fid: FileId, flags: int) -> int:
    fh = _FileHandle()
    fh.handle_bytes = len(fid.handle)
    fh.handle_type = fid.handle_type
    ctypes.memmove(fh.f_handle, fid.handle, len(fid.handle))
    fd: int = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_by_handle_at: {os.strerror(err)}")
    if os.stat(fd).st_ino != fid.ino:
        os.close(fd)
        raise OSError(errno.ESTALE, "file handle names another file")
    return fd


def available(root_fd: int) -> bool:
    """Can this process reopen files by handle (root: CAP_DAC_READ_SEARCH)?"""
    try:
        fd = open_file_id(root_fd, file_id(root_fd), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    os.close(fd)
    return True


# -- encoding (pure) --------------------------------------------------------------
def encode_meta(record: Record) -> bytes:
    t = record.target
    flags, mtime = (0, 0) if record.mtime_ns is None else (SET_MTIME, record.mtime_ns)
    parts = [FIXED.pack(t.ino, record.size, mtime, flags, t.handle_type, len(t.handle)),
             t.handle, COUNT.pack(len(record.changes))]
    parts.extend(EXTENT.pack(c.offset, c.length, c.kind) for c in record.changes)
    return b"".join(parts)


def encode(record: Record, data: Iterable[bytes]) -> bytes:
    """A whole record in memory (tests, small records): header + body."""
    body = encode_meta(record) + b"".join(data)
    return HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body


def parse_meta(meta: bytes, magic: bytes = MAGIC) -> tuple[Record, int]:
    """Parse a body's metadata part; returns the record and the metadata's length."""
    fixed = LAYOUTS[magic]
    mtime: int | None
    if magic == MAGIC:
        ino, size, mtime_ns, flags, htype, hlen = fixed.unpack_from(meta, 0)
        mtime = mtime_ns if flags & SET_MTIME else None
    else:
        ino, size, mtime_ns, htype, hlen = fixed.unpack_from(meta, 0)
        mtime = None if mtime_ns == -1 else mtime_ns
    pos = fixed.size
    handle = meta[pos:pos + hlen]
    if len(handle) != hlen:
        raise ValueError("short handle")
    pos += hlen
    (count,) = COUNT.unpack_from(meta, pos)
    pos += COUNT.size
    changes = []
    for _ in range(count):
        off, length, kind = EXTENT.unpack_from(meta, pos)
        if kind not in (DATA, HOLE):
            raise ValueError("bad extent kind")
        changes.append(Change(off, length, kind))
        pos += EXTENT.size
    return Record(FileId(ino, htype, handle), size, mtime, tuple(changes)), pos


def data_length(record: Record) -> int:
    return sum(c.length for c in record.changes if c.kind == DATA)


def decode(blob: bytes) -> tuple[Record, bytes] | None:
    """Verify and parse a record; None if it is torn or corrupt (never raises)."""
    if len(blob) < HEADER.size:
        return None
    magic, body_len, crc = HEADER.unpack_from(blob, 0)
    body = blob[HEADER.size:]
    if magic not in LAYOUTS or body_len != len(body) or zlib.crc32(body) != crc:
        return None
    try:
        record, start = parse_meta(body, magic)
    except (struct.error, ValueError):
        return None
    if start + data_length(record) != len(body):
        return None
    return record, body[start:]


# -- writing, applying, replay ---------------------------------------------------------
def write_record(daemon_dir: int, name: str, record: Record, source_fd: int) -> None:
    """Write a record whose DATA extents come from ``source_fd`` (the shadow), durably."""
    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600,
                 dir_fd=daemon_dir)
    try:
        _write_record_body(fd, record, source_fd)
    except BaseException:
        # ENOSPC, EDQUOT, EIO...: the target is untouched; a torn record left here
        # would hold its space until the next mount's recovery discards it
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=daemon_dir)
        raise
    os.close(fd)
    syscalls.fsync_dir(daemon_dir)
    faults.point("journal.after_record")


def _write_record_body(fd: int, record: Record, source_fd: int) -> None:
    meta = encode_meta(record)
    crc = zlib.crc32(meta)
    os.pwrite(fd, meta, HEADER.size)
    pos = HEADER.size + len(meta)
    for change in record.changes:
        if change.kind != DATA:
            continue
        for chunk in _read_range(source_fd, change.offset, change.length):
            os.pwrite(fd, chunk, pos)
            crc = zlib.crc32(chunk, crc)
            pos += len(chunk)
    faults.point("journal.before_header")
    os.pwrite(fd, HEADER.pack(MAGIC, pos - HEADER.size, crc), 0)
    faults.point("journal.before_record_fsync")
    os.fsync(fd)


def _read_range(fd: int, offset: int, length: int) -> Iterator[bytes]:
    done = 0
    while done < length:
        chunk = os.pread(fd, min(CHUNK, length - done), offset + done)
        if not chunk:
            chunk = bytes(min(CHUNK, length - done))  # source shorter: zeros
        yield chunk
        done += len(chunk)


def apply(target_fd: int, record: Record, data_source: int, data_base: int | None,
          sync: bool = True) -> None:
    """Apply a record in place and (``sync``) fsync the target.

    DATA bytes come from ``data_source`` at the change's own offset (the shadow,
    ``data_base`` None) or sequentially from ``data_base`` on (a record file).
    """
    pos = data_base
    half = len(record.changes) // 2
    for i, change in enumerate(record.changes):
        if i == half:
            faults.point("journal.mid_apply")
        if change.kind == HOLE:
            syscalls.punch_hole(target_fd, change.offset, change.length)
            continue
        if pos is None:
            syscalls.copy_range(data_source, target_fd, change.offset, change.length)
        else:
            done = 0
            for chunk in _read_range(data_source, pos, change.length):
                os.pwrite(target_fd, chunk, change.offset + done)
                done += len(chunk)
            pos += change.length
    os.ftruncate(target_fd, record.size)
    if record.mtime_ns is not None:
        syscalls.utimens_fd(target_fd, None, record.mtime_ns)
    if sync:
        os.fsync(target_fd)
    faults.point("journal.after_apply")


def settle(target_fd: int, daemon_dir: int, name: str) -> None:
    """The end of a journalled commit, after its call returned: fsync the target the
    record was applied to, then remove the record (its removal is made durable by
    the caller's next directory fsync)."""
    os.fsync(target_fd)
    faults.point("journal.after_target_fsync")
    retire(daemon_dir, name, sync=False)


@dataclass
class Reservation:
    """What :func:`reserve` allocated in a target, and the target's state before."""

    ranges: list[tuple[int, int]]
    size: int
    atime_ns: int
    mtime_ns: int


def reserve(target_fd: int, record: Record) -> Reservation:
    """Allocate the target's holes that the record's data will fill, before the record
    is written, so that running out of space fails the commit while nothing has changed.

    fallocate(KEEP_SIZE) leaves the content as it is (the blocks read as zeros, as the
    holes did); on failure what was allocated is given back (:func:`unreserve`) and the
    error raised.  A filesystem without fallocate reserves nothing.  (On a
    copy-on-write filesystem an overwrite needs space too; that is not reserved.)
    """
    st = os.fstat(target_fd)
    res = Reservation([], st.st_size, st.st_atime_ns, st.st_mtime_ns)
    try:
        for change in record.changes:
            if change.kind != DATA:
                continue
            for a, b, data in syscalls.split_by_data(target_fd, change.offset,
                                                     change.offset + change.length):
                if not data:
                    res.ranges.append((a, b))  # a failed fallocate may have allocated part
                    syscalls.allocate(target_fd, a, b - a)
    except OSError as exc:
        unreserve(target_fd, res)
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            return Reservation([], res.size, res.atime_ns, res.mtime_ns)
        raise
    return res


def unreserve(target_fd: int, res: Reservation) -> None:
    """Give back what :func:`reserve` allocated (holes again, size and times as before;
    the ctime has moved)."""
    if not res.ranges:
        return
    try:
        for a, b in res.ranges:
            if a < res.size:
                syscalls.punch_hole(target_fd, a, min(b, res.size) - a)
        if any(b > res.size for _, b in res.ranges):
            os.ftruncate(target_fd, res.size)  # frees the blocks allocated past the end
        syscalls.utimens_fd(target_fd, res.atime_ns, res.mtime_ns)
    except OSError as exc:
        log.warning("could not give back a space reservation: %s", exc)


def retire(daemon_dir: int, name: str, sync: bool = True) -> None:
    """Remove a record; ``sync=False`` leaves the directory fsync to the caller."""
    os.unlink(name, dir_fd=daemon_dir)
    if sync:
        syscalls.fsync_dir(daemon_dir)
    faults.point("journal.after_retire")


def record_names(daemon_dir: int, prefix: str) -> list[str]:
    """The names in the daemon's directory that start with ``prefix``, in order
    (records are named with zero-padded sequence numbers)."""
    listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=daemon_dir)
    try:
        return sorted(n for n in os.listdir(listing) if n.startswith(prefix))
    finally:
        os.close(listing)


def replay(daemon_dir: int, root_fd: int) -> list[str]:
    """Apply every complete record, discard torn ones; one line per record."""
    lines = []
    for name in record_names(daemon_dir, RECORD_PREFIX):
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=daemon_dir)
        try:
            lines.append(_replay_one(fd, root_fd, name))
        finally:
            os.close(fd)
        retire(daemon_dir, name)
    return lines


def _replay_one(fd: int, root_fd: int, name: str) -> str:
    head = os.pread(fd, HEADER.size, 0)
    size = os.fstat(fd).st_size
    if len(head) < HEADER.size:
        return f"discarded torn journal record {name} (target untouched)"
    magic, body_len, crc = HEADER.unpack(head)
    if magic not in LAYOUTS or body_len != size - HEADER.size:
        return f"discarded torn journal record {name} (target untouched)"
    check = 0
    for chunk in _read_range(fd, HEADER.size, body_len):
        check = zlib.crc32(chunk, check)
    if check != crc:
        return f"discarded corrupt journal record {name} (target untouched)"
    try:
        record, start = _read_meta(fd, body_len, magic)
    except (struct.error, ValueError):
        return f"discarded unreadable journal record {name} (target untouched)"
    try:
        target = open_file_id(root_fd, record.target, os.O_RDWR)
    except OSError as exc:
        return f"discarded journal record {name}: target inode {record.target.ino} is gone " \
               f"({os.strerror(exc.errno or errno.ESTALE)})"
    try:
        apply(target, record, fd, HEADER.size + start)
    finally:
        os.close(target)
    return f"replayed journal record {name} into inode {record.target.ino} " \
           f"({len(record.changes)} extents, size {record.size})"


def _read_meta(fd: int, body_len: int, magic: bytes) -> tuple[Record, int]:
    """Read and parse a record file's metadata (its size is only known in two steps)."""
    fixed = LAYOUTS[magic]
    hlen = fixed.unpack(os.pread(fd, fixed.size, HEADER.size))[-1]
    (count,) = COUNT.unpack(os.pread(fd, COUNT.size, HEADER.size + fixed.size + hlen))
    meta_len = fixed.size + hlen + COUNT.size + count * EXTENT.size
    if meta_len > body_len:
        raise ValueError("metadata longer than the record")
    record, start = parse_meta(os.pread(fd, meta_len, HEADER.size), magic)
    if start + data_length(record) != body_len:
        raise ValueError("body length does not match the extents")
    return record, start

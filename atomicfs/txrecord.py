"""The redo record of a multi-file transaction (docs/design-transactions.md).

A transaction's changes are staged in ``SOURCE/.atomicfs/tx-ID/``: every new
version, new file, new directory or symlink is there under a short token name,
complete and synced.  Its commit writes one record, ``tx-ID/record``, listing
in order what to do with them, makes it durable, then applies it.  The record
ends with a SHA-256 of everything before it: a torn record is no record.

Operations, each idempotent so that a replay after a crash at any step of the
apply (or after it) ends in the same tree:

- ``put TOKEN PARENT NAME``: rename the staged ``TOKEN`` to ``PARENT/NAME``,
  replacing what is there.  Done once the token is gone from the staging
  directory.

- ``meta PARENT NAME DEV INO HANDLE CHANGES``: set mode, owner, times and xattrs
  (:class:`atomicfs.txattrs.Changes`) of ``PARENT/NAME`` in place if it still
  is that object (as ``unlink`` tells); setting them again changes nothing.
  After every ``put``: a directory's times are set after the names put into it.

- ``unlink PARENT NAME DEV INO HANDLE``: remove ``PARENT/NAME`` if it still is
  the file the transaction removed: (DEV, INO), and its file handle
  (``name_to_handle_at``: it holds the inode's generation, so a new file that
  got the freed inode number is not taken for it) where the filesystem has
  handles.  Done once it is not.

- ``rmdir PARENT NAME DEV INO HANDLE``: the same for a directory (empty by then:
  the operations that empty it come first).

- ``stash PARENT NAME DEV INO HANDLE TOKEN``: rename the committed directory
  ``PARENT/NAME`` into the staging directory as ``TOKEN``, if the name still is
  that directory (as ``unlink`` tells); a later ``put`` of ``TOKEN`` gives it its
  new name, with everything in it.  Done once the name is not that directory.

A record lists its operations in two phases: first every removal and stash,
deepest path first (paths of the tree before the commit: what is inside a
moved directory is removed before the directory is stashed), then every
``put``, shallowest path first (paths of the tree after it: a moved directory
is put before what goes into it).  A moved or hard-linked object was
linked into the staging directory under its token before the record was
written, so the removal of its old name never takes its last link.

``PARENT`` is a list of names from SOURCE's root; every step is opened with
``O_NOFOLLOW``, so a replay never follows a symlink out of SOURCE.

Recovery (:func:`recover`): a staging directory with a complete record is
replayed, then removed; one without (the transaction never reached its
commit point) is removed with everything staged in it.  Pure encoding and
path walking; the daemon's side is :mod:`atomicfs.transactions`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass

from . import faults, journal, syscalls, txattrs

log = logging.getLogger(__name__)

MAGIC = "atomicfs-tx 1"
RECORD = "record"
STAGING_PREFIX = "tx-"


@dataclass(frozen=True)
class Put:
    token: str
    parent: tuple[bytes, ...]
    name: bytes


@dataclass(frozen=True)
class Unlink:
    parent: tuple[bytes, ...]
    name: bytes
    dev: int
    ino: int
    handle: str = ""  # handle_type:hex of its file handle; "" where there are none


def identity(path_fd: int) -> str:
    """The file handle of the file behind an O_PATH fd, as text ("" if none)."""
    try:
        fid = journal.file_id(path_fd)
    except OSError:
        return ""
    return f"{fid.handle_type}:{fid.handle.hex()}"


@dataclass(frozen=True)
class Rmdir:
    parent: tuple[bytes, ...]
    name: bytes
    dev: int
    ino: int
    handle: str = ""


@dataclass(frozen=True)
class Stash:
    """Move the committed directory ``PARENT/NAME`` into the staging directory as
    ``TOKEN`` if it still is that directory (a ``put`` of the token follows)."""

    parent: tuple[bytes, ...]
    name: bytes
    dev: int
    ino: int
    handle: str
    token: str


@dataclass(frozen=True)
class Meta:
    """Set attributes of ``PARENT/NAME`` in place (``NAME`` b"": the directory PARENT
    itself, SOURCE's root) if it still is the object the transaction changed."""

    parent: tuple[bytes, ...]
    name: bytes
    dev: int
    ino: int
    handle: str
    changes: txattrs.Changes


Op = Put | Unlink | Rmdir | Stash | Meta


def encode(ops: list[Op]) -> bytes:
    lines = [MAGIC]
    for op in ops:
        item: dict[str, object] = {"parent": [os.fsdecode(p) for p in op.parent],
                                   "name": os.fsdecode(op.name)}
        if isinstance(op, Put):
            item.update(op="put", token=op.token)
        elif isinstance(op, Unlink | Rmdir):
            item.update(op="unlink" if isinstance(op, Unlink) else "rmdir", dev=op.dev,
                        ino=op.ino, handle=op.handle)
        elif isinstance(op, Stash):
            item.update(op="stash", dev=op.dev, ino=op.ino, handle=op.handle, token=op.token)
        else:
            c = op.changes
            item.update(op="meta", dev=op.dev, ino=op.ino, handle=op.handle, mode=c.mode,
                        uid=c.uid, gid=c.gid, atime=c.atime_ns, mtime=c.mtime_ns,
                        xattrs=[[os.fsdecode(n), None if v is None else v.hex()]
                                for n, v in sorted(c.xattrs.items())])
        lines.append(json.dumps(item, sort_keys=True))
    body = ("\n".join(lines) + "\n").encode()
    return body + b"end " + hashlib.sha256(body).hexdigest().encode() + b"\n"


def decode(data: bytes) -> list[Op] | None:
    """The operations of a complete record; None if it is torn or not a record."""
    body, sep, tail = data.rpartition(b"end ")
    if not sep or tail.rstrip(b"\n") != hashlib.sha256(body).hexdigest().encode():
        return None
    lines = body.decode().splitlines()
    if not lines or lines[0] != MAGIC:
        return None
    ops: list[Op] = []
    for line in lines[1:]:
        item = json.loads(line)
        name = os.fsencode(item["name"])
        parent = tuple(os.fsencode(p) for p in item["parent"])
        itself = item.get("op") == "meta" and name == b""  # the parent itself
        if not (itself or _safe(name)) or not all(_safe(p) for p in parent):
            return None
        if item.get("op") == "put" and "/" not in item["token"]:
            ops.append(Put(item["token"], parent, name))
        elif item.get("op") in ("unlink", "rmdir"):
            kind = Unlink if item["op"] == "unlink" else Rmdir
            ops.append(kind(parent, name, int(item["dev"]), int(item["ino"]),
                            str(item.get("handle", ""))))
        elif item.get("op") == "stash" and "/" not in item["token"]:
            ops.append(Stash(parent, name, int(item["dev"]), int(item["ino"]),
                             str(item["handle"]), str(item["token"])))
        elif item.get("op") == "meta":
            changes = txattrs.Changes(
                mode=_int(item["mode"]), uid=_int(item["uid"]), gid=_int(item["gid"]),
                atime_ns=_int(item["atime"]), mtime_ns=_int(item["mtime"]),
                xattrs={os.fsencode(n): None if v is None else bytes.fromhex(v)
                        for n, v in item["xattrs"]})
            ops.append(Meta(parent, name, int(item["dev"]), int(item["ino"]),
                            str(item["handle"]), changes))
        else:
            return None
    return ops


def _int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _safe(name: bytes) -> bool:
    return bool(name) and b"/" not in name and name not in (b".", b"..")


def write(staging_fd: int, ops: list[Op]) -> None:
    """Write the record and make it durable (the record, then its directory)."""
    fd = os.open(RECORD, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600,
                 dir_fd=staging_fd)
    try:
        data = encode(ops)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        faults.point("tx.record_fsync")
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=staging_fd)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read(staging_fd: int) -> list[Op] | None:
    try:
        fd = os.open(RECORD, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=staging_fd)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return decode(b"".join(chunks))


def open_parent(root_fd: int, parent: tuple[bytes, ...]) -> int:
    """An O_PATH fd of the directory PARENT below the root, no symlink followed."""
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        for name in parent:
            nxt = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def apply_op(staging_fd: int, op: Op, parent_fd: int) -> bool:
    """Do one operation (if not done yet); returns whether it changed anything."""
    if isinstance(op, Meta):
        return _apply_meta(op, parent_fd)
    if isinstance(op, Unlink | Rmdir | Stash):
        is_dir = not isinstance(op, Unlink)
        try:
            fd = os.open(op.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except FileNotFoundError:
            return False
        try:
            st = os.stat(fd)
            same = ((st.st_dev, st.st_ino) == (op.dev, op.ino)
                    and stat.S_ISDIR(st.st_mode) == is_dir
                    and (not op.handle or identity(fd) == op.handle))
        finally:
            os.close(fd)
        if not same:
            return False  # done before (and the name made again since)
        if isinstance(op, Stash):
            os.rename(op.name, op.token, src_dir_fd=parent_fd, dst_dir_fd=staging_fd)
        elif is_dir:
            os.rmdir(op.name, dir_fd=parent_fd)
        else:
            os.unlink(op.name, dir_fd=parent_fd)
        return True
    try:
        os.rename(op.token, op.name, src_dir_fd=staging_fd, dst_dir_fd=parent_fd)
    except FileNotFoundError:
        if _exists(staging_fd, op.token):
            raise  # the target's directory is gone
        return False  # done before
    return True


def _apply_meta(op: Meta, parent_fd: int) -> bool:
    """Set the attributes if the name still is the object (setting them again is
    harmless: a replay does it once more)."""
    try:
        fd = os.open(op.name or b".", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent_fd)
    except FileNotFoundError:
        return False
    try:
        st = os.stat(fd)
        if (st.st_dev, st.st_ino) != (op.dev, op.ino) or (
                op.handle and identity(fd) != op.handle):
            return False  # removed, or replaced since (by the transaction itself too)
        txattrs.apply(fd, op.changes, stat.S_ISLNK(st.st_mode))
    finally:
        os.close(fd)
    return True


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def remove_tree(dir_fd: int, name: str) -> None:
    """rm -r of ``name`` in ``dir_fd`` (the daemon's own staging directory)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            remove_tree(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def replay(root_fd: int, daemon_dir: int, name: str) -> str:
    """Finish or discard the staging directory ``name``; returns what was done."""
    sfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                  dir_fd=daemon_dir)
    try:
        ops = read(sfd)
        done = 0
        if ops is not None:
            for op in ops:
                try:
                    pfd = open_parent(root_fd, op.parent)
                except FileNotFoundError:
                    if isinstance(op, Put):
                        raise
                    continue  # a removal or stash inside a directory removed or stashed
                    # since: done before (a record lists what is inside a directory first)
                try:
                    done += apply_op(sfd, op, pfd)
                    faults.point("tx.replay")
                    if done:
                        with contextlib.suppress(OSError):
                            _fsync_dir(pfd)
                finally:
                    os.close(pfd)
            if any(isinstance(op, Meta) for op in ops):
                # attributes set in place: durable before the record goes
                syscalls.sync_filesystem(root_fd)
    finally:
        os.close(sfd)
    remove_tree(daemon_dir, name)
    if ops is None:
        return f"discarded the uncommitted transaction {name}"
    return f"replayed the committed transaction {name} ({done} of {len(ops)} changes were left)"


def _fsync_dir(path_fd: int) -> None:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=path_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(root_fd: int, daemon_dir: int, names: list[str]) -> list[str]:
    return [replay(root_fd, daemon_dir, n) for n in sorted(names)
            if n.startswith(STAGING_PREFIX)]

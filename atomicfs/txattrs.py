"""A transaction's changes to the attributes of committed objects (docs/semantics.md §14,
docs/design-transactions.md "Attributes").

A member's chmod, chown, utimes, setxattr or removexattr of a file, directory
or symlink that exists in the committed tree is not applied to SOURCE: it is
kept in the transaction's overlay, ``tx.attrs[ino]`` (one :class:`Changes`
per object), folded into the replies to members, and applied at the commit
(into the new version of a rewritten file, or in place by a ``meta`` record
operation).  Outsiders get the committed attributes.

Pure but for :func:`apply` and :func:`copy_onto`, which change a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyfuse3

from . import metadata, syscalls


@dataclass
class Changes:
    """What a transaction changed of one committed object (None: unchanged)."""

    mode: int | None = None  # permission bits, set-id bits included (S_IMODE)
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None  # when the transaction last changed it (members' stat)
    xattrs: dict[bytes, bytes | None] = field(default_factory=dict)  # None: removed

    def empty(self) -> bool:
        return (self.mode is None and self.uid is None and self.gid is None
                and self.atime_ns is None and self.mtime_ns is None and not self.xattrs)


def setattr(changes: Changes, st_mode: int, uid: int, gid: int,
            attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
            now_ns: int, times: bool = True) -> bool:
    """Fold a setattr request into ``changes``, as Linux applies it to the object whose
    current mode and owner (committed, with ``changes`` folded in) are given.

    Owner first: a new owner or group clears the set-uid bit, and the set-gid bit
    when the group may execute, of anything but a directory (chown(2), also for
    root); then mode; then times (``times=False``: the mtime goes elsewhere, with
    a rewritten file's content).  Returns whether anything changed (a request that
    sets what is there already changes nothing, not even the ctime).
    """
    changed = False
    mode = stat.S_IMODE(st_mode)
    if (fields.update_uid and attr.st_uid != uid) or (fields.update_gid and attr.st_gid != gid):
        if fields.update_uid:
            changes.uid = attr.st_uid
        if fields.update_gid:
            changes.gid = attr.st_gid
        if not stat.S_ISDIR(st_mode):
            kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
            if mode & kill:
                mode &= ~kill
                changes.mode = mode
        changed = True
    if fields.update_mode and stat.S_IMODE(attr.st_mode) != mode:
        changes.mode = stat.S_IMODE(attr.st_mode)
        changed = True
    if fields.update_atime:
        changes.atime_ns = attr.st_atime_ns
        changed = True
    if fields.update_mtime and times:
        changes.mtime_ns = attr.st_mtime_ns
        changed = True
    if changed:
        changes.ctime_ns = now_ns
    return changed


def fold(attr: pyfuse3.EntryAttributes, changes: Changes) -> None:
    """The attributes a member sees: the committed ones with its changes."""
    if changes.mode is not None:
        attr.st_mode = stat.S_IFMT(attr.st_mode) | changes.mode
    if changes.uid is not None:
        attr.st_uid = changes.uid
    if changes.gid is not None:
        attr.st_gid = changes.gid
    if changes.atime_ns is not None:
        attr.st_atime_ns = changes.atime_ns
    if changes.mtime_ns is not None:
        attr.st_mtime_ns = changes.mtime_ns
    if changes.ctime_ns is not None:
        attr.st_ctime_ns = max(attr.st_ctime_ns, changes.ctime_ns)


def get_xattr(changes: Changes, name: bytes, committed: Callable[[], bytes]) -> bytes:
    """A member's getxattr: its own value, ENODATA if it removed it, else the committed."""
    if name in changes.xattrs:
        value = changes.xattrs[name]
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value
    return committed()


def xattr_names(changes: Changes, committed: Iterable[bytes]) -> list[bytes]:
    """A member's listxattr: the committed names, less those it removed, plus its own
    (in the order set)."""
    names = [n for n in committed if changes.xattrs.get(n, b"") is not None]
    have = set(names)
    names.extend(n for n, v in changes.xattrs.items() if v is not None and n not in have)
    return names


def set_xattr(changes: Changes, name: bytes, value: bytes, now_ns: int) -> None:
    changes.xattrs[name] = bytes(value)
    changes.ctime_ns = now_ns


def remove_xattr(changes: Changes, name: bytes, exists: bool, now_ns: int) -> None:
    """``exists``: does the member see the name now (else ENODATA, as removexattr)?"""
    if not exists:
        raise pyfuse3.FUSEError(errno.ENODATA)
    changes.xattrs[name] = None
    changes.ctime_ns = now_ns


def apply(fd: int, changes: Changes, is_symlink: bool) -> None:
    """Apply ``changes`` in place to the object behind ``fd`` (an O_PATH fd; a symlink
    itself, never its target).  Idempotent.  Order: xattrs, owner (which may clear
    set-id bits), mode, times last."""
    for name, value in sorted(changes.xattrs.items()):
        if value is None:
            with contextlib.suppress(pyfuse3.FUSEError):  # ENODATA: removed already
                metadata.remove_xattr(fd, name)
        else:
            metadata.set_xattr(fd, name, value)
    if changes.uid is not None or changes.gid is not None:
        syscalls.fchown_fd(fd, -1 if changes.uid is None else changes.uid,
                           -1 if changes.gid is None else changes.gid)
    if changes.mode is not None and not is_symlink:
        os.chmod(syscalls.proc_path(fd), changes.mode)
    if changes.atime_ns is not None or changes.mtime_ns is not None:
        syscalls.utimens_fd(fd, changes.atime_ns, changes.mtime_ns)


def copy_onto(src_fd: int, dst_fd: int, committed: os.stat_result, changes: Changes | None,
              mtime_ns: int) -> None:
    """The attributes of a rewritten file's new version (``dst_fd``): the committed
    file's (``src_fd``, ``committed``) with the transaction's ``changes``; the mtime
    is the content's (``mtime_ns``)."""
    metadata.replace_xattrs(src_fd, dst_fd)
    c = changes or Changes()
    only_xattrs = Changes(xattrs=c.xattrs)
    apply(dst_fd, only_xattrs, is_symlink=False)
    syscalls.fchown_fd(dst_fd, committed.st_uid if c.uid is None else c.uid,
                       committed.st_gid if c.gid is None else c.gid)
    os.fchmod(dst_fd, stat.S_IMODE(committed.st_mode) if c.mode is None else c.mode)
    syscalls.utimens_fd(dst_fd, committed.st_atime_ns if c.atime_ns is None else c.atime_ns,
                        mtime_ns)

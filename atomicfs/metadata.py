"""Metadata of backing files: stat → FUSE attributes, setattr, xattrs, ownership.

Every call takes the inode's ``O_PATH`` fd; xattrs and chmod go through the
``/proc/self/fd`` link, which reaches the inode itself (a symlink's own xattrs,
never its target).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence

import pyfuse3
import xattr

from . import processes, syscalls

log = logging.getLogger(__name__)

IS_ROOT = os.geteuid() == 0


class Timeouts:
    """Kernel cache timeouts for entries and attributes (seconds)."""

    entry: float = 1.0
    attr: float = 1.0


def entry_attributes(ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = ino
    attr.generation = 0
    attr.entry_timeout = Timeouts.entry
    attr.attr_timeout = Timeouts.attr
    attr.st_mode = st.st_mode
    attr.st_nlink = st.st_nlink
    attr.st_uid = st.st_uid
    attr.st_gid = st.st_gid
    attr.st_rdev = st.st_rdev
    attr.st_size = st.st_size
    attr.st_blksize = st.st_blksize
    attr.st_blocks = st.st_blocks
    attr.st_atime_ns = st.st_atime_ns
    attr.st_mtime_ns = st.st_mtime_ns
    attr.st_ctime_ns = st.st_ctime_ns
    return attr


def apply_setattr(fd: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> None:
    """Apply owner, mode and times of a setattr request (size is the caller's business).

    Order as chown(2) semantics need it: owner first (it may clear set-id bits),
    then mode, then times last.
    """
    if fields.update_uid or fields.update_gid:
        uid = attr.st_uid if fields.update_uid else -1
        gid = attr.st_gid if fields.update_gid else -1
        syscalls.fchown_fd(fd, uid, gid)
    if fields.update_mode:
        os.chmod(syscalls.proc_path(fd), stat.S_IMODE(attr.st_mode))
    if fields.update_atime or fields.update_mtime:
        syscalls.utimens_fd(
            fd,
            attr.st_atime_ns if fields.update_atime else None,
            attr.st_mtime_ns if fields.update_mtime else None,
        )


CAP_FSETID = 4
CAP_SYS_ADMIN = 21


def caller_capable(ctx: pyfuse3.RequestContext, cap: int) -> bool:
    """Does the calling process hold capability ``cap`` (its CapEff)?  By uid if it is gone."""
    try:
        return bool(int(processes.read_fields(f"/proc/{ctx.pid}/status")["CapEff"], 16)
                    >> cap & 1)
    except (OSError, ValueError, KeyError):
        return ctx.uid == 0


def caller_in_group(ctx: pyfuse3.RequestContext, gid: int) -> bool:
    if ctx.gid == gid:
        return True
    try:
        return gid in pyfuse3.get_sup_groups(ctx.pid)
    except (OSError, ValueError):
        return False


def drop_set_id(fd: int, ctx: pyfuse3.RequestContext) -> None:
    """Clear set-id bits as Linux does when the caller writes or truncates a file.

    For a caller without CAP_FSETID: setuid always goes; setgid goes if the group
    may execute or the caller is not in the file's group.  The kernel does part
    of this for FUSE itself (setuid, setgid with g+x), but only by the old rule:
    it never clears a setgid bit without g+x, and with atomic O_TRUNC it clears
    nothing at all.  So the daemon applies the rule where it sees the caller: in
    the SETATTR the kernel sends before a write or with a truncate, and at an
    open with O_TRUNC.
    """
    st = os.stat(fd)
    mode = set_id_dropped(st.st_mode, st.st_gid, ctx)
    if mode is not None:
        os.chmod(syscalls.proc_path(fd), mode)


def set_id_dropped(st_mode: int, st_gid: int, ctx: pyfuse3.RequestContext) -> int | None:
    """The permission bits a write or truncate by the caller leaves (:func:`drop_set_id`),
    or None when they stay as they are."""
    mode = stat.S_IMODE(st_mode)
    if not stat.S_ISREG(st_mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
        return None
    kill = stat.S_ISUID
    if mode & stat.S_IXGRP or not caller_in_group(ctx, st_gid):
        kill |= stat.S_ISGID
    if mode & kill and not caller_capable(ctx, CAP_FSETID):
        return mode & ~kill
    return None


def new_owner(ctx: pyfuse3.RequestContext, parent_st: os.stat_result) -> tuple[int, int]:
    """Owner of a file created by the caller in a directory (setgid-directory rule)."""
    gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else ctx.gid
    return ctx.uid, gid


def give_to_caller(fd: int, ctx: pyfuse3.RequestContext, parent_st: os.stat_result,
                   mode: int | None = None) -> None:
    """Make a file just created by the (root) daemon belong to the caller.

    ``mode``: permission bits to restore afterwards, since chown clears set-id bits.
    """
    if not IS_ROOT:
        return
    uid, gid = new_owner(ctx, parent_st)
    st = os.stat(fd)
    if (st.st_uid, st.st_gid) == (uid, gid):
        return
    syscalls.fchown_fd(fd, uid, gid)
    if mode is not None and mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(st.st_mode):
        os.chmod(syscalls.proc_path(fd), stat.S_IMODE(mode))


def _xattr_path(fd: int) -> str:
    return syscalls.proc_path(fd)


def get_xattr(fd: int, name: bytes) -> bytes:
    try:
        return bytes(xattr.getxattr(_xattr_path(fd), name.decode("utf-8", "surrogateescape")))
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            raise pyfuse3.FUSEError(errno.ENODATA) from None
        raise


def set_xattr(fd: int, name: bytes, value: bytes) -> None:
    xattr.setxattr(_xattr_path(fd), name.decode("utf-8", "surrogateescape"), value)


def list_xattrs(fd: int) -> Sequence[bytes]:
    return [n.encode("utf-8", "surrogateescape") for n in xattr.listxattr(_xattr_path(fd))]


def listed_xattrs(fd: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
    """listxattr as the caller sees it: trusted.* only for CAP_SYS_ADMIN (as ext4 lists).

    The kernel passes FUSE's listxattr through unfiltered, and the daemon sees all.
    """
    names = list_xattrs(fd)
    if any(n.startswith(b"trusted.") for n in names) and not caller_capable(ctx, CAP_SYS_ADMIN):
        names = [n for n in names if not n.startswith(b"trusted.")]
    return names


def remove_xattr(fd: int, name: bytes) -> None:
    try:
        xattr.removexattr(_xattr_path(fd), name.decode("utf-8", "surrogateescape"))
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            raise pyfuse3.FUSEError(errno.ENODATA) from None
        raise


def replace_xattrs(src_fd: int, dst_fd: int) -> None:
    """Make dst's xattrs exactly src's (dst may have inherited default ACLs); a name
    the filesystem will not drop from dst (a security label) is kept."""
    wanted = list_xattrs(src_fd)
    for name in list_xattrs(dst_fd):
        if name not in wanted:
            try:
                remove_xattr(dst_fd, name)
            except Exception:
                log.debug("could not remove xattr %r from a new version", name)
    copy_xattrs(src_fd, dst_fd, wanted)


def copy_xattrs(src_fd: int, dst_fd: int, names: Sequence[bytes] | None = None) -> None:
    """Copy every xattr (ACLs and security labels included), or ``names``, to dst."""
    for name in list_xattrs(src_fd) if names is None else names:
        try:
            value = get_xattr(src_fd, name)
        except pyfuse3.FUSEError:
            continue  # removed meanwhile
        set_xattr(dst_fd, name, value)


def may_access(st: os.stat_result, mode: int, ctx: pyfuse3.RequestContext) -> bool:
    """access(2) by mode bits, for mounts without default_permissions."""
    if mode == os.F_OK:
        return True
    if ctx.uid == 0:
        # root may do anything but execute a file with no x bit at all
        return not (mode & os.X_OK) or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
    if ctx.uid == st.st_uid:
        bits = (st.st_mode >> 6) & 7
    elif ctx.gid == st.st_gid or st.st_gid in pyfuse3.get_sup_groups(ctx.pid):
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return (mode & bits) == mode

"""Parity: the same system calls on an atomicfs mount and on a plain directory.

Every case is a function ``case(p, w)`` that drives system calls in the work
directory ``w`` through the :class:`Probe` ``p``, which records each call's
outcome: its result (only values that do not depend on where the directory
is) or the errno's name.  The case runs once inside a real atomicfs mount and
once inside a plain directory of the same filesystem; the two records must be
equal.  Nothing is hard-coded: the plain directory is the reference, except
where docs/semantics.md says what must happen.

Calls as another user run in a forked child (``p.as_user``) that drops to
``nobody`` (or another uid) and returns its own record.  The mount and the
plain directory live under a 0755 directory in /tmp so such users reach them.

A difference that FUSE itself cannot express is a strict xfail naming why.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import pickle
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import IS_ROOT, Mount, MountFactory, mounted_fstype

NOBODY = 65534
NOGROUP = 65534
OTHER_UID = 54321  # a second unprivileged user (needs no passwd entry)
OTHER_GID = 54321

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int],
              flags: int = 0) -> None:
    """utimensat(2) with raw (sec, nsec) pairs, so UTIME_NOW/UTIME_OMIT can be passed."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, bytes(path), times, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def stat_fields(st: os.stat_result, times: bool = False) -> tuple[Any, ...]:
    fields: tuple[Any, ...] = (stat.filemode(st.st_mode), st.st_nlink, st.st_uid, st.st_gid)
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
        fields += (st.st_size,)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        fields += (os.major(st.st_rdev), os.minor(st.st_rdev))
    if times:
        fields += (st.st_atime_ns, st.st_mtime_ns)
    return fields


class Probe:
    """Runs calls and records their outcomes, comparable between two directories."""

    def __init__(self, w: Path) -> None:
        self.w = w
        self.out: list[tuple[str, Any]] = []

    def note(self, label: str, value: Any) -> None:
        self.out.append((label, value))

    def do(self, label: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Call ``fn``; record its result (None → "ok") or the errno's name."""
        try:
            value = fn(*args, **kw)
        except OSError as exc:
            self.note(label, errname(exc))
            return None
        self.note(label, "ok" if value is None else value)
        return value

    def open(self, label: str, path: Path, flags: int, mode: int = 0o644) -> int | None:
        """open(2); records "ok" or the errno (never the fd number) and returns the fd."""
        try:
            fd = os.open(path, flags, mode)
        except OSError as exc:
            self.note(label, errname(exc))
            return None
        self.note(label, "ok")
        return fd

    def touch(self, label: str, path: Path, flags: int = 0, mode: int = 0o644) -> None:
        fd = self.open(label, path, os.O_WRONLY | os.O_CREAT | flags, mode)
        if fd is not None:
            os.close(fd)

    def stat(self, label: str, path: Path, follow: bool = False, times: bool = False) -> None:
        self.do(label, lambda: stat_fields(os.stat(path, follow_symlinks=follow), times))

    def fstat(self, label: str, fd: int, times: bool = False) -> None:
        self.do(label, lambda: stat_fields(os.fstat(fd), times))

    def listing(self, label: str, path: Path) -> None:
        def entries() -> list[tuple[str, str]]:
            kinds = []
            for e in os.scandir(path):
                kind = ("link" if e.is_symlink() else "dir" if e.is_dir(follow_symlinks=False)
                        else "file" if e.is_file(follow_symlinks=False) else "other")
                kinds.append((e.name, kind))
            return sorted(kinds)

        self.do(label, entries)

    def run(self, label: str, argv: list[str]) -> None:
        """A command run in the work directory: exit status and output, paths as W."""
        res = subprocess.run(argv, cwd=self.w, capture_output=True, text=True)
        self.note(label, (res.returncode, res.stdout.replace(str(self.w), "W"),
                          res.stderr.replace(str(self.w), "W")))

    def as_user(self, fn: Callable[[Probe], None], uid: int = NOBODY, gid: int = NOGROUP,
                groups: tuple[int, ...] = (), umask: int | None = None) -> None:
        """Run ``fn`` on a probe of its own in a child with the given credentials."""
        out = in_child(lambda: _record(fn, self.w), uid=uid, gid=gid, groups=groups,
                       umask=umask)
        self.out.extend((f"[{uid}] {label}", value) for label, value in out)


def _record(fn: Callable[[Probe], None], w: Path) -> list[tuple[str, Any]]:
    probe = Probe(w)
    fn(probe)
    return probe.out


def in_child(fn: Callable[[], Any], *, uid: int | None = None, gid: int | None = None,
             groups: tuple[int, ...] = (), umask: int | None = None) -> Any:
    """``fn()`` in a forked child with other credentials/umask; returns its (pickled) result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            if umask is not None:
                os.umask(umask)
            if gid is not None:
                os.setgroups(list(groups))
                os.setresgid(gid, gid, gid)
            if uid is not None:
                os.setresuid(uid, uid, uid)
            result: tuple[str, Any] = ("ok", fn())
        except BaseException:
            result = ("crash", traceback.format_exc())
        try:
            with os.fdopen(w, "wb") as f:
                pickle.dump(result, f)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind != "ok":
        raise AssertionError(f"child process failed:\n{value}")
    return value


# -- the cases ----------------------------------------------------------------

Case = Callable[[Probe, Path], None]
CASES: dict[str, tuple[Case, list[pytest.MarkDecorator]]] = {}


def case(*marks: pytest.MarkDecorator) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[fn.__name__] = (fn, list(marks))
        return fn

    return register


as_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")


# open and create

@case()
def create_excl_existing(p: Probe, w: Path) -> None:
    write(w / "f", b"data")
    p.touch("O_CREAT|O_EXCL on a file", w / "f", os.O_EXCL)
    p.touch("O_CREAT on a file", w / "f")
    os.mkdir(w / "d")
    p.touch("O_CREAT|O_EXCL on a dir", w / "d", os.O_EXCL)
    p.touch("O_CREAT on a dir", w / "d")
    os.symlink("f", w / "s")
    p.touch("O_CREAT|O_EXCL on a symlink", w / "s", os.O_EXCL)
    p.do("content kept", read, w / "f")
    p.touch("O_CREAT|O_EXCL new", w / "new", os.O_EXCL)
    p.stat("new", w / "new")


@case()
def open_missing(p: Probe, w: Path) -> None:
    p.open("open missing", w / "nope", os.O_RDONLY)
    p.open("open missing for write", w / "nope", os.O_WRONLY)
    p.open("create in a missing dir", w / "nodir" / "x", os.O_WRONLY | os.O_CREAT)
    p.stat("stat missing", w / "nope")
    p.do("listdir missing", os.listdir, w / "nope")


@case()
def open_dir(p: Probe, w: Path) -> None:
    os.mkdir(w / "d")
    write(w / "f", b"x")
    for name, flags in [("O_WRONLY", os.O_WRONLY), ("O_RDWR", os.O_RDWR),
                        ("O_RDONLY|O_TRUNC", os.O_RDONLY | os.O_TRUNC),
                        ("O_WRONLY|O_CREAT", os.O_WRONLY | os.O_CREAT)]:
        fd = p.open(f"dir {name}", w / "d", flags)
        if fd is not None:
            os.close(fd)
    fd = p.open("dir O_RDONLY", w / "d", os.O_RDONLY)
    if fd is not None:
        p.do("read a dir", os.read, fd, 10)
        os.close(fd)
    fd = p.open("file O_DIRECTORY", w / "f", os.O_RDONLY | os.O_DIRECTORY)
    if fd is not None:
        os.close(fd)


@case()
def path_through_a_file(p: Probe, w: Path) -> None:
    write(w / "f", b"x")
    p.stat("stat f/x", w / "f" / "x")
    p.open("create f/x", w / "f" / "x", os.O_WRONLY | os.O_CREAT)
    p.do("mkdir f/x", os.mkdir, w / "f" / "x")
    p.do("rename to f/x", os.rename, w / "f", w / "f" / "x")
    p.do("symlink at f/x", os.symlink, "t", w / "f" / "x")
    p.stat("stat f/", w / "f/")
    p.do("unlink f/", os.unlink, str(w / "f") + "/")


@case()
def name_lengths(p: Probe, w: Path) -> None:
    n255, n256 = "a" * 255, "b" * 256
    p.touch("create 255", w / n255)
    p.stat("stat 255", w / n255)
    p.touch("create 256", w / n256)
    p.stat("stat 256", w / n256)
    p.do("mkdir 256", os.mkdir, w / n256)
    p.do("symlink 256", os.symlink, "x", w / n256)
    p.do("link 256", os.link, w / n255, w / n256)
    p.do("rename to 256", os.rename, w / n255, w / n256)
    p.do("mkfifo 256", os.mkfifo, w / n256)
    p.do("unlink 256", os.unlink, w / n256)
    p.do("rename 255 to 255", os.rename, w / n255, w / ("c" * 255))
    p.listing("listing", w)
    p.do("symlink target 4095", os.symlink, "t" * 4095, w / "long")
    p.do("readlink long", lambda: len(os.readlink(w / "long")))
    p.do("symlink target 4096", os.symlink, "t" * 4096, w / "longer")


@case()
def mkdir_rmdir_unlink(p: Probe, w: Path) -> None:
    p.do("mkdir", os.mkdir, w / "d", 0o755)
    p.stat("parent after mkdir", w)
    p.do("mkdir existing", os.mkdir, w / "d")
    write(w / "f", b"x")
    p.do("mkdir over a file", os.mkdir, w / "f")
    write(w / "d" / "inside", b"x")
    p.do("rmdir non-empty", os.rmdir, w / "d")
    p.do("rmdir a file", os.rmdir, w / "f")
    p.do("rmdir missing", os.rmdir, w / "nope")
    p.do("rmdir d/.", os.rmdir, w / "d" / ".")
    p.do("unlink a dir", os.unlink, w / "d")
    p.do("unlink missing", os.unlink, w / "nope")
    p.do("unlink inside", os.unlink, w / "d" / "inside")
    p.do("rmdir emptied", os.rmdir, w / "d")
    p.stat("parent after rmdir", w)
    p.stat("gone", w / "d")
    p.do("mkdir again", os.mkdir, w / "d", 0o700)
    p.stat("again", w / "d")


@case()
def mkdir_modes(p: Probe, w: Path) -> None:
    for mode in (0o777, 0o1777, 0o2755, 0o4755, 0o700, 0):
        p.do(f"mkdir {mode:o}", os.mkdir, w / f"d{mode:o}", mode)
        p.stat(f"mode {mode:o}", w / f"d{mode:o}")
    for mode in (0o644, 0o4755, 0o2755, 0o6711, 0o1644, 0):
        p.touch(f"create {mode:o}", w / f"f{mode:o}", mode=mode)
        p.stat(f"file {mode:o}", w / f"f{mode:o}")


# rename

@case()
def rename_kinds(p: Probe, w: Path) -> None:
    write(w / "f", b"file")
    write(w / "g", b"other")
    os.mkdir(w / "d")
    os.mkdir(w / "e")
    os.mkdir(w / "full")
    write(w / "full" / "x", b"x")
    p.do("file over dir", os.rename, w / "f", w / "d")
    p.do("dir over file", os.rename, w / "d", w / "f")
    p.do("dir over non-empty dir", os.rename, w / "d", w / "full")
    p.do("dir over empty dir", os.rename, w / "d", w / "e")
    p.stat("e now", w / "e")
    p.stat("d gone", w / "d")
    p.do("file over file", os.rename, w / "f", w / "g")
    p.do("content", read, w / "g")
    p.stat("f gone", w / "f")
    p.do("missing source", os.rename, w / "nope", w / "x")
    p.do("to itself", os.rename, w / "g", w / "g")
    p.do("dir into itself", os.rename, w / "e", w / "e" / "sub")
    os.mkdir(w / "e" / "sub")
    p.do("dir into its child", os.rename, w / "e", w / "e" / "sub" / "x")
    p.do("dir over its child", os.rename, w / "e", w / "e" / "sub")
    p.do("child over its parent", os.rename, w / "e" / "sub", w / "e")
    p.do("rename '.'", os.rename, w / "e" / ".", w / "x")
    p.listing("listing", w)


@case()
def rename_across_dirs(p: Probe, w: Path) -> None:
    os.mkdir(w / "a")
    os.mkdir(w / "b")
    os.mkdir(w / "a" / "sub")
    write(w / "a" / "sub" / "f", b"deep")
    p.stat("a before", w / "a")
    p.do("move sub", os.rename, w / "a" / "sub", w / "b" / "sub2")
    p.stat("a after", w / "a")
    p.stat("b after", w / "b")
    p.do("read through new path", read, w / "b" / "sub2" / "f")
    p.stat("old path", w / "a" / "sub" / "f")
    p.do("move file up", os.rename, w / "b" / "sub2" / "f", w / "f")
    p.listing("a", w / "a")
    p.listing("b", w / "b")
    p.listing("b/sub2", w / "b" / "sub2")
    p.listing("w", w)


@case()
def rename_hard_links_of_one_file(p: Probe, w: Path) -> None:
    write(w / "a", b"one")
    os.link(w / "a", w / "b")
    p.do("rename a link onto its twin", os.rename, w / "a", w / "b")
    p.listing("both names stay", w)
    p.stat("a", w / "a")
    p.stat("b", w / "b")


@case()
def rename_noreplace(p: Probe, w: Path) -> None:
    write(w / "a", b"a")
    write(w / "b", b"b")
    p.do("onto existing", renameat2, w / "a", w / "b", RENAME_NOREPLACE)
    p.do("b kept", read, w / "b")
    p.do("onto missing", renameat2, w / "a", w / "c", RENAME_NOREPLACE)
    p.do("c", read, w / "c")
    p.stat("a", w / "a")
    os.mkdir(w / "d")
    p.do("file onto dir", renameat2, w / "c", w / "d", RENAME_NOREPLACE)
    p.do("missing source", renameat2, w / "x", w / "y", RENAME_NOREPLACE)
    p.do("both flags", renameat2, w / "c", w / "b", RENAME_NOREPLACE | RENAME_EXCHANGE)
    p.listing("listing", w)


@case()
def rename_exchange(p: Probe, w: Path) -> None:
    write(w / "a", b"AAA")
    write(w / "b", b"BB", mode=0o600)
    p.do("exchange files", renameat2, w / "a", w / "b", RENAME_EXCHANGE)
    p.do("a", read, w / "a")
    p.do("b", read, w / "b")
    p.stat("a stat", w / "a")
    p.stat("b stat", w / "b")
    os.mkdir(w / "d")
    write(w / "d" / "in", b"in")
    p.do("exchange file and dir", renameat2, w / "a", w / "d", RENAME_EXCHANGE)
    p.stat("a is a dir", w / "a")
    p.do("a/in", read, w / "a" / "in")
    p.do("d is a file", read, w / "d")
    p.do("second missing", renameat2, w / "b", w / "nope", RENAME_EXCHANGE)
    p.do("first missing", renameat2, w / "nope", w / "b", RENAME_EXCHANGE)
    p.do("with itself", renameat2, w / "b", w / "b", RENAME_EXCHANGE)
    os.mkdir(w / "a" / "sub")
    p.do("dir with its child", renameat2, w / "a", w / "a" / "sub", RENAME_EXCHANGE)
    p.stat("w", w)
    p.listing("listing", w)


@case()
def renames_while_open(p: Probe, w: Path) -> None:
    """Renames of new files still open for writing (not committed yet)."""
    fd = os.open(w / "new", os.O_WRONLY | os.O_CREAT, 0o640)
    os.write(fd, b"fresh")
    p.stat("new while open", w / "new")
    p.do("rename new", os.rename, w / "new", w / "moved")
    write(w / "old", b"old content")
    fd2 = os.open(w / "new2", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd2, b"second")
    p.do("rename new2 over old", os.rename, w / "new2", w / "old")
    fd3 = os.open(w / "new3", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd3, b"third")
    p.do("exchange new3 and moved", renameat2, w / "new3", w / "moved", RENAME_EXCHANGE)
    p.do("noreplace new3 onto old", renameat2, w / "new3", w / "old", RENAME_NOREPLACE)
    p.listing("listing while open", w)
    for name in ("moved", "old", "new3"):
        p.stat(f"{name} while open", w / name)
        p.do(f"{name} content", read, w / name)
    os.close(fd)
    os.close(fd2)
    os.close(fd3)
    for name in ("moved", "old", "new3"):
        p.stat(f"{name} closed", w / name)
        p.do(f"{name} content closed", read, w / name)
    p.listing("listing", w)


@case()
def rename_file_being_written(p: Probe, w: Path) -> None:
    write(w / "a", b"old content of a")
    os.mkdir(w / "sub")
    fd = os.open(w / "a", os.O_RDWR)
    os.write(fd, b"NEW")
    p.do("rename while written", os.rename, w / "a", w / "sub" / "b")
    os.write(fd, b"-more")
    p.do("read back through the writer", os.pread, fd, 100, 0)
    os.close(fd)
    p.stat("old name", w / "a")
    p.do("new name", read, w / "sub" / "b")
    p.stat("new name stat", w / "sub" / "b")
    fd = os.open(w / "sub" / "b", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"+")
    p.do("unlink while written", os.unlink, w / "sub" / "b")
    p.do("write after the unlink", os.write, fd, b"+")
    os.close(fd)
    p.listing("nothing left", w / "sub")
    p.listing("w", w)


@case()
def metadata_changes_while_writing(p: Probe, w: Path) -> None:
    write(w / "f", b"0123456789")
    fd = os.open(w / "f", os.O_RDWR)
    os.write(fd, b"abc")
    p.do("fchmod", os.fchmod, fd, 0o600)
    p.do("setxattr", os.setxattr, w / "f", "user.k", b"v")
    p.do("utime", os.utime, fd, ns=(1_000_000_001, 2_000_000_002))
    p.fstat("fstat with explicit times", fd, times=True)
    p.stat("stat with explicit times", w / "f", times=True)
    os.pwrite(fd, b"XYZ", 20)
    p.fstat("after another write", fd)
    os.close(fd)
    p.stat("closed", w / "f")
    p.do("xattr kept", os.getxattr, w / "f", "user.k")
    p.do("content", read, w / "f")
    if IS_ROOT:
        fd = os.open(w / "f", os.O_RDWR)
        os.write(fd, b"q")
        p.do("fchown", os.fchown, fd, NOBODY, NOGROUP)
        os.close(fd)
        p.stat("owner kept", w / "f")


@case()
def truncate_to_empty_then_read(p: Probe, w: Path) -> None:
    """``: > f`` then ``cat f`` (close-to-open after a truncation-only session)."""
    write(w / "f", b"old content")
    fd = os.open(w / "f", os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    p.do("read right after", read, w / "f")
    p.stat("stat", w / "f")


@case()
def mmap_writes(p: Probe, w: Path) -> None:
    import mmap

    write(w / "f", b"." * 10000)
    fd = os.open(w / "f", os.O_RDWR)
    m = mmap.mmap(fd, 10000, mmap.MAP_SHARED)
    m[100:105] = b"HELLO"
    m[9995:] = b"WORLD"
    p.do("read back through the map", lambda: bytes(m[98:107]))
    m.flush()
    m.close()
    os.close(fd)
    p.do("content", lambda: read(w / "f")[98:107] + read(w / "f")[-5:])
    p.stat("size", w / "f")


@case()
def copy_file_range_and_sendfile(p: Probe, w: Path) -> None:
    write(w / "src", bytes(range(256)) * 64)
    src = os.open(w / "src", os.O_RDONLY)
    dst = os.open(w / "dst", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        p.do("copy_file_range", os.copy_file_range, src, dst, 5000, 100, 0)
        p.do("sendfile", os.sendfile, dst, src, 0, 1000)
    finally:
        os.close(src)
        os.close(dst)
    p.do("copied", lambda: hashlib.sha256(read(w / "dst")).hexdigest())
    p.stat("dst", w / "dst")


@case(pytest.mark.xfail(strict=True, reason="pyfuse3 3.5.0 has no lseek handler: the kernel "
                        "answers SEEK_DATA/SEEK_HOLE as if the whole file were data"))
def seek_data_and_holes(p: Probe, w: Path) -> None:
    fd = os.open(w / "sparse", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"data", 1 << 20)
        os.ftruncate(fd, 4 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(w / "sparse", os.O_RDONLY)
    try:
        p.do("SEEK_DATA from 0", os.lseek, fd, 0, os.SEEK_DATA)
        p.do("SEEK_HOLE from 0", os.lseek, fd, 0, os.SEEK_HOLE)
        p.do("SEEK_HOLE after data", os.lseek, fd, (1 << 20) + 1, os.SEEK_HOLE)
        p.do("SEEK_DATA past EOF", os.lseek, fd, 5 << 20, os.SEEK_DATA)
    finally:
        os.close(fd)


@case()
def sparse_allocation(p: Probe, w: Path) -> None:
    """st_blocks tells holes from data (du, cp --sparse=auto; docs/semantics.md §6)."""
    fd = os.open(w / "sparse", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 8192, 1 << 20)
        os.ftruncate(fd, 8 << 20)
    finally:
        os.close(fd)
    os.sync()
    p.do("blocks", lambda: (os.stat(w / "sparse").st_size, os.stat(w / "sparse").st_blocks))
    p.do("big offset", lambda: write_at(w / "sparse", b"end", (1 << 40) - 3))
    os.sync()
    p.do("blocks after", lambda: (os.stat(w / "sparse").st_size,
                                  os.stat(w / "sparse").st_blocks))


def write_at(path: Path, data: bytes, offset: int) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@case(pytest.mark.xfail(strict=True, reason="pyfuse3 3.5.0 has no fallocate handler: the "
                        "kernel answers EOPNOTSUPP (posix_fallocate still works: glibc "
                        "falls back to writing)"))
def raw_fallocate(p: Probe, w: Path) -> None:
    write(w / "f", b"x" * 10000)
    fd = os.open(w / "f", os.O_RDWR)
    try:
        p.do("allocate", fallocate, fd, 0, 0, 20000)
        p.do("keep size", fallocate, fd, 0x01, 0, 40000)
        p.do("punch hole", fallocate, fd, 0x03, 0, 4096)
    finally:
        os.close(fd)
    p.do("content", lambda: read(w / "f")[:4] + read(w / "f")[4096:4100])
    p.stat("size", w / "f")


@case(pytest.mark.xfail(strict=True, reason="pyfuse3 3.5.0 has no tmpfile handler: the kernel "
                        "answers EOPNOTSUPP to O_TMPFILE"))
def o_tmpfile(p: Probe, w: Path) -> None:
    fd = p.open("O_TMPFILE", w, os.O_TMPFILE | os.O_RDWR, 0o600)
    if fd is not None:
        os.write(fd, b"anonymous")
        p.do("link it in", os.link, f"/proc/self/fd/{fd}", w / "named", follow_symlinks=True)
        os.close(fd)
        p.do("named", read, w / "named")


@case()
def file_locks(p: Probe, w: Path) -> None:
    import fcntl

    write(w / "f", b"x")
    a = os.open(w / "f", os.O_RDWR)
    b = os.open(w / "f", os.O_RDWR)
    try:
        p.do("flock a", fcntl.flock, a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p.do("flock b conflicts", fcntl.flock, b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p.do("shared b conflicts", fcntl.flock, b, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(a, fcntl.LOCK_UN)
        p.do("flock b after unlock", fcntl.flock, b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p.do("posix lock a", fcntl.lockf, a, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)

        def other_process() -> str:
            c = os.open(w / "f", os.O_RDWR)
            try:
                fcntl.lockf(c, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
            except OSError as exc:
                return errname(exc)
            finally:
                os.close(c)
            return "ok"

        p.note("posix lock from another process", in_child(other_process))
    finally:
        os.close(a)
        os.close(b)


OLD_NS = 1_000_000_000


def _mtime_moved(path: Path) -> bool:
    return os.stat(path).st_mtime_ns != OLD_NS


@case()
def parent_times_follow_changes(p: Probe, w: Path) -> None:
    """Each namespace change moves the directory's mtime (reset to 1970 before each)."""
    write(w / "f", b"x")
    os.mkdir(w / "d")
    write(w / "d" / "c", b"committed")
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("mkdir", lambda: os.mkdir(w / "d" / "sub")),
        ("symlink", lambda: os.symlink("x", w / "d" / "s")),
        ("link", lambda: os.link(w / "f", w / "d" / "l")),
        ("rename within", lambda: os.rename(w / "d" / "c", w / "d" / "c2")),
        ("rename out", lambda: os.rename(w / "d" / "c2", w / "c2")),
        ("unlink", lambda: os.unlink(w / "d" / "l")),
        ("rmdir", lambda: os.rmdir(w / "d" / "sub")),
        ("mkfifo", lambda: os.mkfifo(w / "d" / "p")),
        ("setxattr (not a dir change)", lambda: os.setxattr(w / "d", "user.x", b"1")),
        ("write to an entry (not a dir change)", lambda: write_existing(w / "d" / "s", b"x")),
    ]
    for label, step in steps:
        os.utime(w / "d", ns=(OLD_NS, OLD_NS))
        os.utime(w, ns=(OLD_NS, OLD_NS))
        p.do(label, step)
        p.note(f"{label}: mtime moved", _mtime_moved(w / "d"))
        p.note(f"{label}: mtime of the parent moved", _mtime_moved(w))


@case()
def parent_times_follow_new_files(p: Probe, w: Path) -> None:
    """The same for files just created and still open (not committed yet)."""
    os.mkdir(w / "d")
    os.utime(w / "d", ns=(OLD_NS, OLD_NS))
    fd = os.open(w / "d" / "n", os.O_WRONLY | os.O_CREAT, 0o644)
    p.note("create: mtime moved", _mtime_moved(w / "d"))
    os.utime(w / "d", ns=(OLD_NS, OLD_NS))
    p.do("rename within", os.rename, w / "d" / "n", w / "d" / "n2")
    p.note("rename within: mtime moved", _mtime_moved(w / "d"))
    os.utime(w / "d", ns=(OLD_NS, OLD_NS))
    os.utime(w, ns=(OLD_NS, OLD_NS))
    p.do("rename out", os.rename, w / "d" / "n2", w / "n")
    p.note("rename out: mtime moved", [_mtime_moved(w / "d"), _mtime_moved(w)])
    os.utime(w, ns=(OLD_NS, OLD_NS))
    p.do("unlink", os.unlink, w / "n")
    p.note("unlink: mtime moved", _mtime_moved(w))
    os.close(fd)


@case()
def absolute_symlink_out_of_the_tree(p: Probe, w: Path) -> None:
    os.symlink("/proc/self/exe", w / "exe")
    os.symlink("/etc/hostname", w / "host")
    p.do("readlink", os.readlink, w / "host")
    p.do("read through", read, w / "host")
    p.do("stat through is the host file", lambda: os.stat(w / "host") == os.stat("/etc/hostname"))
    os.symlink("../../../../../../../../../../etc", w / "up")
    p.do("relative escape", lambda: os.path.isdir(w / "up"))


# links

@case()
def hard_links(p: Probe, w: Path) -> None:
    write(w / "f", b"linked")
    p.do("link", os.link, w / "f", w / "g")
    p.stat("f right after link", w / "f")
    p.stat("g", w / "g")
    p.do("link to existing name", os.link, w / "f", w / "g")
    p.do("link missing", os.link, w / "nope", w / "h")
    os.mkdir(w / "d")
    p.do("link a dir", os.link, w / "d", w / "d2")
    p.do("link into a dir", os.link, w / "f", w / "d" / "f3")
    p.stat("f, three names", w / "f")
    with open(w / "g", "r+b") as f:
        f.write(b"LINK")
    p.do("write through g seen at f", read, w / "f")
    p.do("unlink f", os.unlink, w / "f")
    p.stat("g after unlink", w / "g")
    p.stat("d/f3 after unlink", w / "d" / "f3")
    p.do("unlink d/f3", os.unlink, w / "d" / "f3")
    p.stat("g alone", w / "g")


@case()
def hard_link_of_open_new_file(p: Probe, w: Path) -> None:
    fd = os.open(w / "n", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"pending")
    p.do("link while open", os.link, w / "n", w / "n2")
    p.stat("n", w / "n")
    p.stat("n2", w / "n2")
    p.fstat("fstat", fd)
    os.write(fd, b" more")
    p.do("read back through the writer", os.pread, fd, 100, 0)
    os.close(fd)
    # (another reader opened before the close sees the committed version: docs/semantics.md §4.2)
    p.do("n2 content", read, w / "n2")
    p.do("n content", read, w / "n")
    p.stat("n closed", w / "n")


@case()
def unlink_open_file(p: Probe, w: Path) -> None:
    write(w / "old", b"committed")
    fd = os.open(w / "old", os.O_RDWR)
    p.do("unlink open", os.unlink, w / "old")
    p.fstat("fstat after unlink", fd)
    p.do("write after unlink", os.pwrite, fd, b"X", 0)
    p.do("read after unlink", os.pread, fd, 100, 0)
    os.close(fd)
    fd = os.open(w / "new", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"abc")
    p.do("unlink new open", os.unlink, w / "new")
    p.fstat("fstat new after unlink", fd)
    p.do("read new after unlink", os.pread, fd, 100, 0)
    os.close(fd)
    p.listing("empty", w)
    p.touch("recreate", w / "new", os.O_EXCL)
    p.do("fresh", read, w / "new")


@case()
def symlinks(p: Probe, w: Path) -> None:
    write(w / "target", b"pointed to")
    p.do("symlink", os.symlink, "target", w / "s")
    p.do("readlink", os.readlink, w / "s")
    p.stat("lstat", w / "s")
    p.stat("stat through", w / "s", follow=True)
    p.do("read through", read, w / "s")
    p.do("symlink over a name", os.symlink, "x", w / "s")
    p.do("dangling", os.symlink, "missing", w / "dangling")
    p.stat("stat dangling", w / "dangling", follow=True)
    p.do("readlink a file", os.readlink, w / "target")
    p.do("readlink missing", os.readlink, w / "nope")
    p.touch("O_CREAT through dangling", w / "dangling")
    p.stat("created target", w / "missing")
    p.open("O_NOFOLLOW on symlink", w / "s", os.O_RDONLY | os.O_NOFOLLOW)
    os.mkdir(w / "d")
    p.do("symlink to dir", os.symlink, "d", w / "sd")
    p.touch("create through dir link", w / "sd" / "in")
    p.listing("d", w / "d")
    p.do("rmdir a dir link", os.rmdir, w / "sd")
    p.do("unlink the link", os.unlink, w / "sd")
    p.do("lchown", os.lchown, w / "s", -1, -1)
    p.do("symlink empty target", os.symlink, "", w / "empty")
    p.listing("listing", w)


@case()
def symlink_loops(p: Probe, w: Path) -> None:
    os.symlink("b", w / "a")
    os.symlink("a", w / "b")
    os.symlink("self", w / "self")
    p.open("open loop", w / "a", os.O_RDONLY)
    p.open("create through loop", w / "a", os.O_WRONLY | os.O_CREAT)
    p.open("open self", w / "self", os.O_RDONLY)
    p.stat("stat loop", w / "a", follow=True)
    p.stat("lstat loop", w / "a")
    p.stat("path through loop", w / "self" / "x")
    p.do("readlink loop", os.readlink, w / "a")
    chain = "t"
    write(w / chain, b"end")
    for i in range(45):
        os.symlink(chain, w / f"c{i}")
        chain = f"c{i}"
    p.do("40 links deep", read, w / "c39")
    p.open("41 links deep", w / "c40", os.O_RDONLY)


# special files

@case()
def mknod_fifo_and_socket(p: Probe, w: Path) -> None:
    p.do("mkfifo", os.mkfifo, w / "fifo", 0o640)
    p.stat("fifo", w / "fifo")
    p.do("mkfifo existing", os.mkfifo, w / "fifo")
    p.do("mknod socket", os.mknod, w / "sock", stat.S_IFSOCK | 0o600)
    p.stat("socket node", w / "sock")
    p.do("mknod regular", os.mknod, w / "reg", stat.S_IFREG | 0o600)
    p.stat("regular node", w / "reg")
    fd = p.open("fifo nonblocking read", w / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    if fd is not None:
        wfd = p.open("fifo write end", w / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        if wfd is not None:
            os.write(wfd, b"through the fifo")
            p.do("fifo data", os.read, fd, 100)
            os.close(wfd)
        os.close(fd)
    p.open("open socket node", w / "sock", os.O_RDONLY)
    p.listing("listing", w)


@case()
def unix_socket(p: Probe, w: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        p.do("bind", server.bind, str(w / "s"))
        server.listen(1)
        p.stat("socket", w / "s")
        p.do("connect", client.connect, str(w / "s"))
        conn, _ = server.accept()
        client.sendall(b"ping")
        p.do("received", conn.recv, 10)
        conn.close()
    finally:
        client.close()
        server.close()
    p.do("bind existing", socket.socket(socket.AF_UNIX).bind, str(w / "s"))


@case(as_root)
def mknod_char_device(p: Probe, w: Path) -> None:
    p.do("mknod null", os.mknod, w / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    p.stat("char device", w / "null")
    p.do("mknod block", os.mknod, w / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    p.stat("block device", w / "blk")
    p.as_user(lambda q: q.do("mknod as nobody", os.mknod, w / "x",
                             stat.S_IFCHR | 0o666, os.makedev(1, 3)))


@case(as_root, pytest.mark.mount_options("dev"))
def device_node_in_use(p: Probe, w: Path) -> None:
    """With -o dev (what mount(8) passes from fstab; atomicfs mount's default is nodev)."""
    os.mknod(w / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    p.do("write to the device", write_existing, w / "null", b"gone")
    p.do("read from the device", read, w / "null")
    p.stat("still a device", w / "null")


# attributes

@case(as_root)
def chmod_chown(p: Probe, w: Path) -> None:
    write(w / "f", b"x")
    os.mkdir(w / "d")
    os.symlink("f", w / "s")
    for mode in (0o600, 0o4755, 0o2755, 0o1777, 0o7777, 0):
        p.do(f"chmod {mode:o}", os.chmod, w / "f", mode)
        p.stat(f"after chmod {mode:o}", w / "f")
    p.do("chmod dir", os.chmod, w / "d", 0o3711)
    p.stat("dir", w / "d")
    p.do("chmod through symlink", os.chmod, w / "s", 0o640)
    p.stat("target", w / "f")
    p.do("chown", os.chown, w / "f", NOBODY, NOGROUP)
    p.stat("chowned", w / "f")
    p.do("chown group only", os.chown, w / "f", -1, 0)
    p.stat("group only", w / "f")
    p.do("lchown symlink", os.lchown, w / "s", NOBODY, NOGROUP)
    p.stat("symlink owner", w / "s")
    p.stat("target untouched", w / "f")
    p.do("chown dir", os.chown, w / "d", OTHER_UID, OTHER_GID)
    p.stat("dir owner", w / "d")
    p.do("chown missing", os.chown, w / "nope", 0, 0)


@case(as_root)
def chown_clears_set_id_bits(p: Probe, w: Path) -> None:
    for mode in (0o6755, 0o6745, 0o2745, 0o4700):
        name = f"f{mode:o}"
        write(w / name, b"x")
        os.chmod(w / name, mode)
        p.do(f"chown {mode:o}", os.chown, w / name, NOBODY, NOGROUP)
        p.stat(f"{mode:o} after chown", w / name)
        os.chmod(w / name, mode)
        p.do(f"chown {mode:o} to same owner", os.chown, w / name, -1, -1)
        p.stat(f"{mode:o} after no-op chown", w / name)
    os.mkdir(w / "d")
    os.chmod(w / "d", 0o2775)
    p.do("chown a setgid dir", os.chown, w / "d", NOBODY, NOGROUP)
    p.stat("dir keeps setgid", w / "d")


@case()
def utime_ns(p: Probe, w: Path) -> None:
    write(w / "f", b"x")
    os.mkdir(w / "d")
    os.symlink("f", w / "s")
    times = (1_234_567_890_123_456_789, 1_111_111_111_987_654_321)
    p.do("utime ns", os.utime, w / "f", ns=times)
    p.stat("file times", w / "f", times=True)
    p.do("utime dir", os.utime, w / "d", ns=(5_000_000_001, 6_000_000_002))
    p.stat("dir times", w / "d", times=True)
    p.do("utime symlink itself", os.utime, w / "s", ns=(7_000_000_003, 8_000_000_004),
         follow_symlinks=False)
    p.stat("symlink times", w / "s", times=True)
    p.stat("target times kept", w / "f", times=True)
    p.do("utime before 1970", os.utime, w / "f", ns=(-1_500_000_000, -2_000_000_000))
    p.stat("negative times", w / "f", times=True)
    p.do("utime missing", os.utime, w / "nope", ns=times)
    fd = os.open(w / "f", os.O_RDONLY)
    p.do("futimens", os.utime, fd, ns=(9_000_000_005, 10_000_000_006))
    os.close(fd)
    p.stat("futimens times", w / "f", times=True)


@case()
def utime_now_and_omit(p: Probe, w: Path) -> None:
    write(w / "f", b"x")
    os.utime(w / "f", ns=(1_000_000_001, 2_000_000_002))
    p.do("omit atime", utimensat, w / "f", (0, UTIME_OMIT), (3, 4))
    p.stat("atime kept", w / "f", times=True)
    p.do("omit mtime", utimensat, w / "f", (5, 6), (0, UTIME_OMIT))
    p.stat("mtime kept", w / "f", times=True)
    p.do("omit both", utimensat, w / "f", (0, UTIME_OMIT), (0, UTIME_OMIT))
    p.stat("both kept", w / "f", times=True)
    before = time.time_ns()
    p.do("now mtime, omit atime", utimensat, w / "f", (0, UTIME_OMIT), (0, UTIME_NOW))
    st = os.stat(w / "f")
    p.note("atime still 5.000000006", st.st_atime_ns)
    p.note("mtime is now", before - 10**9 <= st.st_mtime_ns <= time.time_ns() + 10**9)
    p.do("now atime, omit mtime", utimensat, w / "f", (0, UTIME_NOW), (0, UTIME_OMIT))
    st2 = os.stat(w / "f")
    p.note("mtime unchanged", st2.st_mtime_ns == st.st_mtime_ns)
    p.note("atime is now", before - 10**9 <= st2.st_atime_ns <= time.time_ns() + 10**9)
    os.utime(w / "f", ns=(1, 2))
    p.do("utime(None) means now", os.utime, w / "f")
    st3 = os.stat(w / "f")
    p.note("both now", [before - 10**9 <= t <= time.time_ns() + 10**9
                        for t in (st3.st_atime_ns, st3.st_mtime_ns)])
    p.do("bad nsec", utimensat, w / "f", (0, 1_000_000_000), (0, 0))
    os.symlink("f", w / "s")
    os.utime(w / "s", ns=(9_000_000_009, 10_000_000_010), follow_symlinks=False)
    p.do("omit on symlink", utimensat, w / "s", (0, UTIME_OMIT), (11, 12), AT_SYMLINK_NOFOLLOW)
    p.stat("symlink", w / "s", times=True)


@case()
def times_follow_writes(p: Probe, w: Path) -> None:
    """Explicit times stick; a write after them moves mtime to now (checked as a range)."""
    write(w / "f", b"x")
    os.utime(w / "f", ns=(1_000_000_000, 2_000_000_000))
    fd = os.open(w / "f", os.O_WRONLY)
    os.write(fd, b"y")
    os.utime(fd, ns=(3_000_000_003, 4_000_000_004))
    p.fstat("explicit time while open, after a write", fd, times=True)
    os.close(fd)
    p.stat("explicit time survives close", w / "f", times=True)
    before = time.time_ns()
    with open(w / "f", "ab") as f:
        f.write(b"z")
    mt = os.stat(w / "f").st_mtime_ns
    p.note("mtime moved to now by a write", before - 10**9 <= mt <= time.time_ns() + 10**9)
    p.do("content", read, w / "f")


# content

@case()
def truncate(p: Probe, w: Path) -> None:
    write(w / "f", b"0123456789")
    p.do("extend", os.truncate, w / "f", 100)
    p.stat("extended", w / "f")
    p.do("zeros after", read, w / "f")
    p.do("shrink", os.truncate, w / "f", 3)
    p.do("shrunk", read, w / "f")
    p.do("to zero", os.truncate, w / "f", 0)
    p.stat("empty", w / "f")
    p.do("negative", os.truncate, w / "f", -1)
    p.do("missing", os.truncate, w / "nope", 0)
    os.mkdir(w / "d")
    p.do("a dir", os.truncate, w / "d", 0)
    p.do("big sparse", os.truncate, w / "f", 1 << 40)
    p.stat("big", w / "f")
    p.do("read in the hole", lambda: read_at(w / "f", (1 << 40) - 5, 10))
    p.do("back to 2", os.truncate, w / "f", 2)
    p.do("content", read, w / "f")


def read_at(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


@case()
def read_write_offsets(p: Probe, w: Path) -> None:
    fd = os.open(w / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        p.do("write", os.write, fd, b"hello world")
        p.do("pwrite middle", os.pwrite, fd, b"WORLD", 6)
        p.do("pwrite past end", os.pwrite, fd, b"end", 20)
        p.fstat("size", fd)
        p.do("pread all", os.pread, fd, 100, 0)
        p.do("pread middle", os.pread, fd, 5, 3)
        p.do("pread at EOF", os.pread, fd, 10, 23)
        p.do("pread past EOF", os.pread, fd, 10, 1000)
        p.do("seek end", os.lseek, fd, 0, os.SEEK_END)
        p.do("write at end", os.write, fd, b"!")
        p.do("seek cur", os.lseek, fd, -4, os.SEEK_CUR)
        p.do("read from there", os.read, fd, 10)
        p.do("negative offset", os.pwrite, fd, b"x", -1)
        p.do("empty write", os.write, fd, b"")
        big = bytes(range(256)) * 4096 + b"tail"
        p.do("1 MiB write", os.pwrite, fd, big, 4000)
        p.do("1 MiB back", lambda: os.pread(fd, len(big) + 10, 4000) == big)
        p.fstat("size after", fd)
    finally:
        os.close(fd)
    p.do("reopen", lambda: read(w / "f")[:40])
    fd = os.open(w / "f", os.O_RDONLY)
    p.do("write to read-only fd", os.write, fd, b"x")
    os.close(fd)
    fd = os.open(w / "f", os.O_WRONLY)
    p.do("read from write-only fd", os.read, fd, 1)
    os.close(fd)
    fd = os.open(w / "f", os.O_WRONLY | os.O_TRUNC)
    p.fstat("O_TRUNC", fd)
    os.close(fd)
    p.stat("after O_TRUNC", w / "f")


@case()
def o_append(p: Probe, w: Path) -> None:
    write(w / "f", b"start")
    fd = os.open(w / "f", os.O_WRONLY | os.O_APPEND)
    try:
        p.do("append", os.write, fd, b"+one")
        os.lseek(fd, 0, os.SEEK_SET)
        p.do("append after seek 0", os.write, fd, b"+two")
        p.do("pwrite with O_APPEND appends (Linux)", os.pwrite, fd, b"+three", 0)
        p.do("position", os.lseek, fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
    p.do("content", read, w / "f")
    fd1 = os.open(w / "f", os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(w / "f", os.O_WRONLY | os.O_APPEND)
    os.write(fd1, b"<1>")
    os.write(fd2, b"<2>")
    os.write(fd1, b"<3>")
    os.close(fd1)
    os.close(fd2)
    p.do("two appenders", read, w / "f")
    fd = os.open(w / "f", os.O_RDWR | os.O_APPEND)
    os.write(fd, b"|")
    p.do("read after append", os.pread, fd, 5, 0)
    os.close(fd)
    p.stat("size", w / "f")


@case()
def ftruncate(p: Probe, w: Path) -> None:
    fd = os.open(w / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"0123456789")
        p.do("shrink", os.ftruncate, fd, 4)
        p.fstat("shrunk", fd)
        p.do("write at old offset", os.write, fd, b"X")
        p.do("content", os.pread, fd, 100, 0)
        p.do("extend", os.ftruncate, fd, 20)
        p.do("extended", os.pread, fd, 100, 0)
        p.do("negative", os.ftruncate, fd, -1)
    finally:
        os.close(fd)
    p.stat("closed", w / "f")
    fd = os.open(w / "f", os.O_RDONLY)
    p.do("ftruncate read-only fd", os.ftruncate, fd, 0)
    os.close(fd)
    p.do("still", read, w / "f")
    fd = os.open(w / "f", os.O_RDWR)
    p.do("posix_fallocate", os.posix_fallocate, fd, 0, 50)
    os.close(fd)
    p.stat("after fallocate", w / "f")


@case()
def fsync_calls(p: Probe, w: Path) -> None:
    fd = os.open(w / "f", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"data")
    p.do("fsync", os.fsync, fd)
    p.do("fdatasync", os.fdatasync, fd)
    p.stat("visible", w / "f")
    os.close(fd)
    dfd = os.open(w, os.O_RDONLY | os.O_DIRECTORY)
    p.do("fsync dir", os.fsync, dfd)
    os.close(dfd)
    fd = os.open(w / "f", os.O_RDONLY)
    p.do("fsync read-only", os.fsync, fd)
    os.close(fd)
    p.do("content", read, w / "f")


def _statvfs(path: Path) -> tuple[int, ...]:
    sv = os.statvfs(path)
    return (sv.f_bsize, sv.f_frsize, sv.f_blocks, sv.f_files, sv.f_namemax)


@case()
def statvfs(p: Probe, w: Path) -> None:
    p.do("statvfs", _statvfs, w)
    write(w / "f", b"x")
    p.do("statvfs of a file", _statvfs, w / "f")
    sv = os.statvfs(w)
    p.note("free blocks plausible", 0 < sv.f_bavail <= sv.f_bfree <= sv.f_blocks)


# extended attributes

@case()
def xattrs_user(p: Probe, w: Path) -> None:
    write(w / "f", b"x")
    f = w / "f"
    p.do("list empty", os.listxattr, f)
    p.do("get missing", os.getxattr, f, "user.nope")
    p.do("set", os.setxattr, f, "user.a", b"alpha")
    p.do("get", os.getxattr, f, "user.a")
    p.do("set empty", os.setxattr, f, "user.empty", b"")
    p.do("get empty", os.getxattr, f, "user.empty")
    p.do("binary value", os.setxattr, f, "user.bin", bytes(range(256)))
    p.do("get binary", os.getxattr, f, "user.bin")
    p.do("list", lambda: sorted(os.listxattr(f)))
    p.do("create existing", os.setxattr, f, "user.a", b"x", os.XATTR_CREATE)
    p.do("create new", os.setxattr, f, "user.b", b"beta", os.XATTR_CREATE)
    p.do("replace missing", os.setxattr, f, "user.c", b"x", os.XATTR_REPLACE)
    p.do("replace existing", os.setxattr, f, "user.a", b"ALPHA", os.XATTR_REPLACE)
    p.do("replaced", os.getxattr, f, "user.a")
    p.do("remove", os.removexattr, f, "user.a")
    p.do("remove missing", os.removexattr, f, "user.a")
    p.do("get removed", os.getxattr, f, "user.a")
    p.do("unknown namespace", os.setxattr, f, "bogus.x", b"x")
    p.do("name too long", os.setxattr, f, "user." + "n" * 251, b"x")
    p.do("name 255", os.setxattr, f, "user." + "n" * 250, b"x")
    p.do("value too big for ext4", os.setxattr, f, "user.big", b"v" * 8000)
    p.do("value over 64 KiB", os.setxattr, f, "user.huge", b"v" * 70000)
    p.do("list after", lambda: sorted(os.listxattr(f)))
    os.mkdir(w / "d")
    p.do("on a dir", os.setxattr, w / "d", "user.d", b"dir")
    p.do("dir value", os.getxattr, w / "d", "user.d")
    os.symlink("f", w / "s")
    p.do("user. on a symlink itself", os.setxattr, w / "s", "user.s", b"x",
         follow_symlinks=False)
    p.do("through a symlink", os.setxattr, w / "s", "user.t", b"target")
    p.do("on the target", os.getxattr, f, "user.t")
    os.mkfifo(w / "fifo")
    p.do("user. on a fifo", os.setxattr, w / "fifo", "user.x", b"x")


@case()
def xattr_sizes(p: Probe, w: Path) -> None:
    write(w / "f", b"x")
    os.setxattr(w / "f", "user.v", b"0123456789")
    buf = ctypes.create_string_buffer(100)
    getx = _libc.getxattr
    getx.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    getx.restype = ctypes.c_ssize_t

    def size_query(size: int) -> int:
        n = int(getx(bytes(w / "f"), b"user.v", buf if size else None, size))
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return n

    p.do("size query", size_query, 0)
    p.do("buffer too small", size_query, 5)
    p.do("buffer exact", size_query, 10)
    listx = _libc.listxattr
    listx.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    listx.restype = ctypes.c_ssize_t

    def list_query(size: int) -> int:
        n = int(listx(bytes(w / "f"), buf if size else None, size))
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return n

    p.do("list size query", list_query, 0)
    p.do("list buffer too small", list_query, 3)


@case(as_root)
def xattrs_trusted_and_security(p: Probe, w: Path) -> None:
    write(w / "f", b"x")
    f = w / "f"
    p.do("set trusted", os.setxattr, f, "trusted.t", b"secret")
    p.do("get trusted", os.getxattr, f, "trusted.t")
    p.do("set user", os.setxattr, f, "user.u", b"public")
    p.do("list as root", lambda: sorted(os.listxattr(f)))
    p.do("set security", os.setxattr, f, "security.s", b"label")
    p.do("get security", os.getxattr, f, "security.s")

    def nobody(q: Probe) -> None:
        q.do("list as nobody", lambda: sorted(os.listxattr(f)))
        q.do("get trusted as nobody", os.getxattr, f, "trusted.t")
        q.do("set trusted as nobody", os.setxattr, f, "trusted.n", b"x")
        q.do("get user as nobody", os.getxattr, f, "user.u")
        q.do("set user as nobody (no write)", os.setxattr, f, "user.n", b"x")
        q.do("get security as nobody", os.getxattr, f, "security.s")

    p.as_user(nobody)
    p.do("remove trusted", os.removexattr, f, "trusted.t")
    p.do("list after", lambda: sorted(os.listxattr(f)))


@case(as_root)
def posix_acls(p: Probe, w: Path) -> None:
    write(w / "f", b"x", mode=0o640)
    p.run("setfacl user", ["setfacl", "-m", f"u:{NOBODY}:rw,g::r", "f"])
    p.run("getfacl", ["getfacl", "--omit-header", "--numeric", "f"])
    p.stat("mode follows the mask", w / "f")
    p.do("raw xattr", os.getxattr, w / "f", "system.posix_acl_access")
    p.do("listed", lambda: sorted(os.listxattr(w / "f")))
    p.do("chmod changes the mask", os.chmod, w / "f", 0o600)
    p.run("getfacl after chmod", ["getfacl", "--omit-header", "--numeric", "f"])
    p.run("setfacl -b", ["setfacl", "-b", "f"])
    p.run("getfacl after -b", ["getfacl", "--omit-header", "--numeric", "f"])
    p.stat("mode after -b", w / "f")
    p.run("setfacl bad", ["setfacl", "-m", "u:nosuchuser_x:rw", "f"])
    os.mkdir(w / "d")
    p.run("default acl", ["setfacl", "-d", "-m", f"u:{NOBODY}:rwx,g::rx,o::-", "d"])
    p.run("getfacl dir", ["getfacl", "--omit-header", "--numeric", "d"])
    p.do("raw default xattr", os.getxattr, w / "d", "system.posix_acl_default")
    p.run("setfacl -k", ["setfacl", "-k", "d"])
    p.run("getfacl after -k", ["getfacl", "--omit-header", "--numeric", "d"])


ACL_OFF = ("docs/semantics.md §13: FUSE's posix_acl mode is not enabled (enable_acl=False), "
           "so the kernel "
           "applies the umask before the daemon sees the mode and ignores ACLs in permission "
           "checks; fixable by enable_acl plus ctx.umask in the daemon")


@case(as_root, pytest.mark.xfail(strict=True, reason=ACL_OFF))
def default_acl_inheritance(p: Probe, w: Path) -> None:
    os.mkdir(w / "d")
    p.run("default acl", ["setfacl", "-d", "-m", f"u:{NOBODY}:rwx,g::rx,o::-", "d"])
    p.run("getfacl dir", ["getfacl", "--omit-header", "--numeric", "d"])

    def create(q: Probe) -> None:  # a default ACL overrides the umask
        q.touch("create under default acl", w / "d" / "new", mode=0o666)
        q.do("mkdir under default acl", os.mkdir, w / "d" / "sub", 0o777)

    p.as_user(create, uid=0, gid=0, umask=0o022)
    p.run("inherited", ["getfacl", "--omit-header", "--numeric", "d/new"])
    p.stat("inherited mode", w / "d" / "new")
    p.run("inherited by dir", ["getfacl", "--omit-header", "--numeric", "d/sub"])
    p.stat("dir mode", w / "d" / "sub")


@case(as_root, pytest.mark.xfail(strict=True, reason=ACL_OFF))
def posix_acl_enforced(p: Probe, w: Path) -> None:
    os.chmod(w, 0o755)
    write(w / "f", b"for nobody", mode=0o600)
    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:r", str(w / "f")], check=True)
    write(w / "g", b"not for nobody", mode=0o644)
    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:-", str(w / "g")], check=True)

    def nobody(q: Probe) -> None:
        q.do("read granted by ACL", read, w / "f")
        q.do("read denied by ACL", read, w / "g")

    p.as_user(nobody)


# directories

@case()
def listing_after_renames(p: Probe, w: Path) -> None:
    for i in range(40):
        write(w / f"file{i:02d}", b"x")
    os.mkdir(w / "dir")
    os.symlink("file00", w / "link")
    os.mkfifo(w / "fifo")
    p.listing("initial", w)
    for i in range(0, 40, 3):
        os.rename(w / f"file{i:02d}", w / "dir" / f"moved{i:02d}")
    os.rename(w / "link", w / "dir" / "link")
    os.rename(w / "file01", w / "file02")
    p.listing("after renames", w)
    p.listing("dir", w / "dir")
    p.stat("dir", w / "dir")
    for i in range(300):
        write(w / "dir" / f"many-{i:04d}-{'x' * 100}", b"")
    p.do("long listing", lambda: sorted(os.listdir(w / "dir")))
    fd = os.open(w / "dir", os.O_RDONLY)
    p.do("listdir by fd", lambda: len(os.listdir(fd)))
    os.close(fd)


@case()
def listing_while_changing(p: Probe, w: Path) -> None:
    """Entries removed or added while a directory stream is open."""
    for i in range(10):
        write(w / f"f{i}", b"x")
    it = os.scandir(w)
    first = next(it).name
    for i in range(10):
        if f"f{i}" != first:
            os.unlink(w / f"f{i}")
    for _ in it:  # whether removed names still come is unspecified (buffering)
        pass
    it.close()
    p.do("left", lambda: os.listdir(w) == [first])
    write(w / "late", b"x")
    p.do("new stream sees the new name", lambda: sorted(os.listdir(w)) == sorted([first, "late"]))


@case()
def dot_entries(p: Probe, w: Path) -> None:
    os.mkdir(w / "d")
    os.mkdir(w / "d" / "e")
    p.stat("d/e/..", w / "d" / "e" / "..")
    p.stat("d/.", w / "d" / ".")
    p.do("listdir has no dots", lambda: sorted(os.listdir(w / "d")))
    p.do("..'s listing", lambda: sorted(os.listdir(w / "d" / "e" / "..")))
    p.do("same inode via ..", lambda: os.stat(w / "d" / "e" / "..").st_ino
         == os.stat(w / "d").st_ino)
    write(w / "f", b"x")
    os.link(w / "f", w / "d" / "g")
    p.do("hard links share st_ino", lambda: os.stat(w / "f").st_ino
         == os.stat(w / "d" / "g").st_ino)


@case(as_root)
def setgid_directory(p: Probe, w: Path) -> None:
    os.mkdir(w / "g")
    os.chown(w / "g", 0, NOGROUP)
    os.chmod(w / "g", 0o2775)
    p.stat("setgid dir", w / "g")
    p.touch("file", w / "g" / "f", mode=0o2755)
    p.stat("file gets the dir's group", w / "g" / "f")
    p.do("subdir", os.mkdir, w / "g" / "sub", 0o755)
    p.stat("subdir inherits group and g+s", w / "g" / "sub")
    p.touch("file in subdir", w / "g" / "sub" / "f")
    p.stat("deeper file", w / "g" / "sub" / "f")
    p.do("fifo", os.mkfifo, w / "g" / "fifo")
    p.stat("fifo group", w / "g" / "fifo")
    p.do("symlink", os.symlink, "f", w / "g" / "s")
    p.stat("symlink group", w / "g" / "s")
    os.chmod(w, 0o777)
    os.chmod(w / "g", 0o2777)

    def other(q: Probe) -> None:
        q.touch("file by a non-member", w / "g" / "o", mode=0o2755)
        q.stat("non-member's file: sgid stripped", w / "g" / "o")
        q.do("mkdir by a non-member", os.mkdir, w / "g" / "od", 0o2755)
        q.stat("non-member's dir", w / "g" / "od")

    p.as_user(other, uid=OTHER_UID, gid=OTHER_GID)

    def member(q: Probe) -> None:
        q.touch("file by a member", w / "g" / "m", mode=0o2755)
        q.stat("member's file: sgid kept", w / "g" / "m")

    p.as_user(member, uid=NOBODY, gid=NOGROUP)
    p.do("root sets g+s on another's file", os.chmod, w / "g" / "o", 0o2755)
    p.stat("root's chmod", w / "g" / "o")


@case()
def umask_applied(p: Probe, w: Path) -> None:
    def create(q: Probe) -> None:
        q.touch("file 0666", w / "f", mode=0o666)
        q.stat("file", w / "f")
        q.do("mkdir 0777", os.mkdir, w / "d", 0o777)
        q.stat("dir", w / "d")
        q.do("mkfifo 0666", os.mkfifo, w / "fifo", 0o666)
        q.stat("fifo", w / "fifo")
        q.do("mknod 0666", os.mknod, w / "node", stat.S_IFREG | 0o666)
        q.stat("node", w / "node")
        q.do("symlink ignores umask", os.symlink, "f", w / "s")
        q.stat("symlink", w / "s")
        q.do("chmod ignores umask", os.chmod, w / "f", 0o777)
        q.stat("chmod", w / "f")
        q.touch("file 04777", w / "suid", mode=0o4777)
        q.stat("suid file", w / "suid")

    p.note("umask 027", in_child(lambda: _record(create, w), umask=0o027))
    shutil.rmtree(w)
    os.mkdir(w)
    p.note("umask 0", in_child(lambda: _record(create, w), umask=0))
    shutil.rmtree(w)
    os.mkdir(w)
    p.note("umask 0777", in_child(lambda: _record(create, w), umask=0o777))


# other users

@case(as_root)
def eacces_reading_a_private_file(p: Probe, w: Path) -> None:
    write(w / "private", b"secret", mode=0o600)
    os.chmod(w / "private", 0o600)
    write(w / "readonly", b"read me", mode=0o644)
    os.chmod(w / "readonly", 0o644)
    os.mkdir(w / "closed", 0o700)
    write(w / "closed" / "inside", b"x")

    def nobody(q: Probe) -> None:
        q.open("open 0600 root file", w / "private", os.O_RDONLY)
        q.stat("stat it", w / "private")
        q.open("write 0644 root file", w / "readonly", os.O_WRONLY)
        q.open("O_TRUNC 0644 root file", w / "readonly", os.O_RDONLY | os.O_TRUNC)
        q.do("read 0644", read, w / "readonly")
        q.do("truncate 0644", os.truncate, w / "readonly", 0)
        q.stat("through a 0700 dir", w / "closed" / "inside")
        q.do("list a 0700 dir", os.listdir, w / "closed")
        for name in ("private", "readonly", "closed"):
            for mode, flag in (("R", os.R_OK), ("W", os.W_OK), ("X", os.X_OK)):
                q.do(f"access {name} {mode}", os.access, w / name, flag)

    p.as_user(nobody)
    p.do("still", read, w / "readonly")


@case(as_root)
def eacces_creating_in_a_root_dir(p: Probe, w: Path) -> None:
    os.chmod(w, 0o755)
    write(w / "f", b"x")

    def nobody(q: Probe) -> None:
        q.touch("create", w / "new")
        q.do("mkdir", os.mkdir, w / "d")
        q.do("symlink", os.symlink, "f", w / "s")
        q.do("mkfifo", os.mkfifo, w / "p")
        q.do("link", os.link, w / "f", w / "g")
        q.do("unlink", os.unlink, w / "f")
        q.do("rename", os.rename, w / "f", w / "g")
        q.do("setxattr", os.setxattr, w / "f", "user.x", b"x")

    p.as_user(nobody)
    p.listing("unchanged", w)


@case(as_root)
def eperm_changing_another_users_file(p: Probe, w: Path) -> None:
    write(w / "f", b"x")
    os.chmod(w / "f", 0o666)

    def nobody(q: Probe) -> None:
        q.do("chmod", os.chmod, w / "f", 0o777)
        q.do("chown to self", os.chown, w / "f", NOBODY, NOGROUP)
        q.do("chgrp", os.chown, w / "f", -1, NOGROUP)
        q.do("explicit utime", os.utime, w / "f", ns=(1, 2))
        q.do("utime now (has write access)", os.utime, w / "f")
        q.do("write (has write access)", write, w / "f", b"by nobody")

    p.as_user(nobody)
    p.stat("unchanged owner and mode", w / "f")
    write(w / "g", b"x")
    os.chmod(w / "g", 0o644)
    p.as_user(lambda q: q.do("utime now without write access", os.utime, w / "g"))


@case(as_root)
def owner_may_chmod_and_chgrp(p: Probe, w: Path) -> None:
    write(w / "f", b"x")
    os.chown(w / "f", NOBODY, NOGROUP)

    def nobody(q: Probe) -> None:
        q.do("chmod own file", os.chmod, w / "f", 0o2755)
        q.stat("sgid kept (own group)", w / "f")
        q.do("chgrp to a group not member of", os.chown, w / "f", -1, 0)
        q.do("give away", os.chown, w / "f", 0, -1)
        q.do("chgrp to a supplementary group", os.chown, w / "f", -1, OTHER_GID)
        q.stat("after chgrp (sgid cleared by the chown)", w / "f")
        q.do("chmod g+s, in the group", os.chmod, w / "f", 0o2755)
        q.stat("sgid set", w / "f")
        q.do("explicit utime on own file", os.utime, w / "f", ns=(1, 2))
        q.stat("own times", w / "f", times=True)

    p.as_user(nobody, groups=(OTHER_GID,))

    def without_the_group(q: Probe) -> None:
        q.do("chmod g+s, not in the group", os.chmod, w / "f", 0o2775)
        q.stat("sgid silently dropped", w / "f")

    p.as_user(without_the_group)


# How nobody modifies each file, and (mode, group) of the files: nobody is in
# group NOGROUP only; each file is writable to nobody through its group or other bits.
MODIFY: dict[str, Callable[[Probe, Path], None]] = {
    "write": lambda q, path: q.do("write", write_existing, path, b"WRITTEN"),
    "truncate": lambda q, path: q.do("truncate", os.truncate, path, 3),
    "ftruncate": lambda q, path: q.do("ftruncate", ftruncate_path, path, 2),
    "O_TRUNC": lambda q, path: q.touch("O_TRUNC", path, os.O_TRUNC),
}
SET_ID_FILES = {
    "g-w-x-sgid-suid": (0o6770, NOGROUP),  # in the group, g+x: both bits cleared
    "g-w-sgid-no-x": (0o2760, NOGROUP),  # in the group, no g+x: sgid kept
    "o-w-sgid-no-x": (0o2766, 0),  # not in the group, no g+x: sgid cleared
    "o-w-suid": (0o4766, 0),
    "o-w-suid-sgid-x": (0o6777, 0),
}


def write_existing(path: Path, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def ftruncate_path(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


@case(as_root)
def modification_by_non_owner_clears_set_id_bits(p: Probe, w: Path) -> None:
    for how in MODIFY:
        for name, (mode, gid) in SET_ID_FILES.items():
            path = w / f"{how}-{name}"
            write(path, b"original")
            os.chown(path, 0, gid)
            os.chmod(path, mode)

    def nobody(q: Probe) -> None:
        for how, modify in MODIFY.items():
            for name in SET_ID_FILES:
                modify(q, w / f"{how}-{name}")
                q.stat(f"{how} {name}", w / f"{how}-{name}")

    p.as_user(nobody)
    for how in MODIFY:
        for name in SET_ID_FILES:
            p.stat(f"{how} {name} seen by root", w / f"{how}-{name}")
            p.do(f"{how} {name} content", read, w / f"{how}-{name}")
    write(w / "root-writes", b"x")
    os.chmod(w / "root-writes", 0o6777)
    p.do("root writes", write_existing, w / "root-writes", b"root keeps the bits")
    p.stat("after root's write", w / "root-writes")
    p.do("root truncates", os.truncate, w / "root-writes", 1)
    p.stat("after root's truncate", w / "root-writes")


@case(as_root)
def sticky_directory(p: Probe, w: Path) -> None:
    os.chmod(w, 0o1777)
    write(w / "roots", b"x", mode=0o666)
    os.chmod(w / "roots", 0o666)

    def nobody(q: Probe) -> None:
        q.touch("own file", w / "mine", mode=0o666)
        q.do("own dir", os.mkdir, w / "mydir", 0o777)
        q.do("unlink root's file", os.unlink, w / "roots")
        q.do("rename root's file", os.rename, w / "roots", w / "taken")
        q.do("rename own over root's", os.rename, w / "mine", w / "roots")
        q.do("write root's file (allowed by mode)", write, w / "roots", b"w")

    p.as_user(nobody)

    def other(q: Probe) -> None:
        q.do("unlink nobody's file", os.unlink, w / "mine")
        q.do("rmdir nobody's dir", os.rmdir, w / "mydir")
        q.do("rename nobody's file away", os.rename, w / "mine", w / "x")
        q.touch("own", w / "others")
        q.do("rename own over nobody's", os.rename, w / "others", w / "mine")
        q.do("unlink own", os.unlink, w / "others")

    p.as_user(other, uid=OTHER_UID, gid=OTHER_GID)
    p.as_user(lambda q: q.do("nobody unlinks own", os.unlink, w / "mine"))
    p.do("root unlinks anything", os.unlink, w / "roots")
    p.listing("left", w)


@case(as_root)
def new_files_belong_to_the_caller(p: Probe, w: Path) -> None:
    os.chmod(w, 0o777)

    def nobody(q: Probe) -> None:
        q.touch("create", w / "f", mode=0o640)
        q.stat("file", w / "f")
        q.do("mkdir", os.mkdir, w / "d", 0o750)
        q.stat("dir", w / "d")
        q.do("symlink", os.symlink, "f", w / "s")
        q.stat("symlink", w / "s")
        q.do("mkfifo", os.mkfifo, w / "p", 0o600)
        q.stat("fifo", w / "p")
        q.do("link keeps owner", os.link, w / "f", w / "d" / "g")
        q.stat("link", w / "d" / "g")
        q.do("write own file", write, w / "f", b"mine")
        q.stat("after write", w / "f")
        q.do("read own file", read, w / "f")

    p.as_user(nobody, groups=(OTHER_GID,))
    p.as_user(lambda q: q.touch("with a primary group", w / "h"), uid=OTHER_UID, gid=NOGROUP)
    p.stat("other's file", w / "h")
    p.listing("listing", w)


# -- the runner ------------------------------------------------------------------

@dataclass
class Roots:
    mount: Mount
    plain: Path


@pytest.fixture
def roots(mount_factory: MountFactory, request: pytest.FixtureRequest) -> Iterator[Roots]:
    """A mount and a plain directory, both reachable by any user (under a 0755 dir)."""
    marker = request.node.get_closest_marker("mount_options")
    options = list(marker.args) if marker else []
    base = Path(tempfile.mkdtemp(prefix="atomicfs-parity-", dir="/tmp"))
    try:
        for d in (base, base / "src", base / "mnt", base / "plain"):
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o755)
        m = mount_factory(source=base / "src", mountpoint=base / "mnt", options=options)
        try:
            yield Roots(m, base / "plain")
        finally:
            m.unmount()
    finally:
        if mounted_fstype(base / "mnt") is None:
            shutil.rmtree(base, ignore_errors=True)


def run_case(fn: Case, root: Path) -> list[tuple[str, Any]]:
    w = root / "w"
    os.mkdir(w)
    os.chmod(w, 0o755)
    probe = Probe(w)
    fn(probe, w)
    return probe.out


@pytest.mark.parametrize("name", [pytest.param(n, marks=m) for n, (_, m) in CASES.items()])
def test_parity(name: str, roots: Roots) -> None:
    fn, _ = CASES[name]
    plain = run_case(fn, roots.plain)
    mounted = run_case(fn, roots.mount.mountpoint)
    assert mounted == plain, differences(mounted, plain)


def differences(mounted: list[tuple[str, Any]], plain: list[tuple[str, Any]]) -> str:
    """The calls whose outcomes differ, one per line (mount first, plain second)."""
    lines = ["outcomes differ (atomicfs != plain directory):"]
    for i in range(max(len(mounted), len(plain))):
        a = mounted[i] if i < len(mounted) else ("<missing>", None)
        b = plain[i] if i < len(plain) else ("<missing>", None)
        if a != b:
            lines.append(f"  {a[0]}: {a[1]!r:.300}  !=  {b[0]}: {b[1]!r:.300}")
    return "\n".join(lines)


def test_root_directory(roots: Roots) -> None:
    """The mount root itself: empty listing, nlink, and after a mkdir."""
    def probe(root: Path) -> list[tuple[str, Any]]:
        p = Probe(root)
        p.do("listing", os.listdir, root)
        p.stat("root", root)
        os.mkdir(root / "d")
        p.stat("root after mkdir", root)
        p.listing("after mkdir", root)
        return p.out

    mounted, plain = probe(roots.mount.mountpoint), probe(roots.plain)
    assert mounted == plain, differences(mounted, plain)

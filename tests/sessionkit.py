"""Helpers shared by the mount tests: source trees, debris checks, tree snapshots,
sparse-file data maps, and the "legacy writers" (cp, tar, sed, shell...) as
parametrizable tools."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atomicfs.status import STATUS_XATTR

TIMEOUT = 20  # seconds, for every subprocess a test starts

# A committed version and a few different new versions (ASCII: text-mode writers).
OLD = b"".join(b"old line %04d of the committed version\n" % i for i in range(300))
NEW = b"".join(b"brand new line %05d, longer than before\n" % i for i in range(400))
PATCH = b"P" * 4096  # what dd writes into the middle (offset 4096) of OLD


def make_source(root: Path, files: dict[str, bytes], name: str = "src") -> Path:
    """A source directory with the given files (relative names, parents made)."""
    src = root / name
    src.mkdir()
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return src


def debris(source: Path) -> list[str]:
    """What the daemon left in SOURCE: entries in .atomicfs, .atomicfs~* names anywhere."""
    found = []
    ddir = source / ".atomicfs"
    if ddir.is_dir():
        found += [f".atomicfs/{n}" for n in os.listdir(ddir)]
    for root, dirs, files in os.walk(source):
        for n in dirs + files:
            if n.startswith(".atomicfs~"):
                found.append(os.path.relpath(os.path.join(root, n), source))
    return found


def assert_no_debris(source: Path) -> None:
    left = debris(source)
    assert not left, f"atomicfs debris left in SOURCE {source}: {left}"


def user_entries(source: Path) -> list[str]:
    """Top-level names in SOURCE other than the daemon's own directory."""
    return sorted(n for n in os.listdir(source) if n != ".atomicfs")


def snapshot(*roots: Path) -> dict[str, tuple[object, ...]]:
    """Everything a program could have changed below ``roots``: names, types, modes,
    owners, sizes, link counts, mtimes, ctimes, contents, symlink targets, xattrs
    (not atime).  Does not descend into other mounts."""
    out: dict[str, tuple[object, ...]] = {}

    def visit(path: Path, dev: int) -> None:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            extra: object = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            extra = os.readlink(path)
        else:
            extra = None
        try:
            xattrs = sorted((n, os.getxattr(path, n, follow_symlinks=False))
                            for n in os.listxattr(path, follow_symlinks=False))
        except OSError:  # not supported here
            xattrs = []
        out[str(path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                          st.st_mtime_ns, st.st_ctime_ns, extra, tuple(xattrs))
        if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:  # not into other mounts
            for name in sorted(os.listdir(path)):
                visit(path / name, dev)

    for root in roots:
        if os.path.lexists(root):
            visit(root, os.lstat(root).st_dev)
        else:
            out[str(root)] = ("absent",)
    return out


def data_map(path: Path | str) -> list[tuple[int, int]]:
    """The file's data ranges [a, b) by SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out, pos = [], 0
        while pos < size:
            try:
                a = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            b = os.lseek(fd, a, os.SEEK_HOLE)
            out.append((a, b))
            pos = b
        return out
    finally:
        os.close(fd)


def status_of(mnt: Path | str) -> dict[str, Any]:
    """The live status of the atomicfs mount at ``mnt`` (the JSON of its root's xattr)."""
    doc = json.loads(os.getxattr(mnt, STATUS_XATTR))
    assert isinstance(doc, dict)
    return doc


def wait_for(cond: Callable[[], bool], timeout: float = 2.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=TIMEOUT, **kw)  # type: ignore


# -- legacy writers ----------------------------------------------------------------
@dataclass(frozen=True)
class Tool:
    """A program that rewrites ``target`` (which holds OLD) the way it always does.

    kind:
    - "rewrite": opens the existing file and writes it (O_TRUNC or in place);
      the commit is a rename commit of that file;
    - "temp+rename": writes a new temporary file, then renames it over the target
      (the commit is the publication of a new file);
    - "unlink+create": removes the target, then creates it anew.
    """

    name: str
    kind: str
    go: Callable[[Path, Path], subprocess.CompletedProcess[bytes]]  # (target, workdir)
    expected: bytes  # the target's content once the tool has finished


def _cp(target: Path, work: Path) -> subprocess.CompletedProcess[bytes]:
    staged = work / "cp-new"
    staged.write_bytes(NEW)
    return run(["cp", str(staged), str(target)])


def _tar_archive(target: Path, work: Path) -> Path:
    archive = work / "new.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(target.name)
        info.size = len(NEW)
        info.mode = 0o644
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(NEW))
    return archive


def _tar_overwrite(target: Path, work: Path) -> subprocess.CompletedProcess[bytes]:
    archive = _tar_archive(target, work)
    return run(["tar", "-x", "--overwrite", "-f", str(archive), "-C", str(target.parent)])


def _tar_default(target: Path, work: Path) -> subprocess.CompletedProcess[bytes]:
    archive = _tar_archive(target, work)
    return run(["tar", "-x", "-f", str(archive), "-C", str(target.parent)])


def _sed(target: Path, work: Path) -> subprocess.CompletedProcess[bytes]:
    return run(["sed", "-i", "s/old/new/", str(target)])


def _python(target: Path, work: Path) -> subprocess.CompletedProcess[bytes]:
    code = "import sys\nwith open(sys.argv[1], 'w') as f:\n    f.write(sys.argv[2])\n"
    return run([sys.executable, "-c", code, str(target), NEW.decode()])


def _dd(target: Path, work: Path) -> subprocess.CompletedProcess[bytes]:
    staged = work / "dd-patch"
    staged.write_bytes(PATCH)
    return run(["dd", f"if={staged}", f"of={target}", "bs=4096", "seek=1", "conv=notrunc",
                "status=none"])


def _shell(target: Path, work: Path) -> subprocess.CompletedProcess[bytes]:
    # The shell opens with O_TRUNC, dup2()s, closes the original, then writes.
    return run(["sh", "-c", 'cat "$1" > "$2"', "sh", str(_staged(work)), str(target)])


def _staged(work: Path) -> Path:
    staged = work / "sh-new"
    staged.write_bytes(NEW)
    return staged


TOOLS = [
    Tool("cp", "rewrite", _cp, NEW),
    Tool("tar-overwrite", "rewrite", _tar_overwrite, NEW),
    Tool("tar", "unlink+create", _tar_default, NEW),
    Tool("sed-i", "temp+rename", _sed, OLD.replace(b"old", b"new")),
    Tool("python-open-w", "rewrite", _python, NEW),
    Tool("dd-notrunc", "rewrite", _dd, OLD[:4096] + PATCH + OLD[8192:]),
    Tool("shell-redirect", "rewrite", _shell, NEW),
]
TOOL_IDS = [t.name for t in TOOLS]


def git_env(home: Path) -> dict[str, str]:
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="A U Thor",
               GIT_AUTHOR_EMAIL="author@example.com", GIT_COMMITTER_NAME="C O Mitter",
               GIT_COMMITTER_EMAIL="committer@example.com",
               GIT_AUTHOR_DATE="2005-04-07T22:13:13+0000",
               GIT_COMMITTER_DATE="2005-04-07T22:13:13+0000")
    return env


def save(path: Path, data: bytes, flags: int = os.O_WRONLY | os.O_TRUNC,
         fsync: bool = False) -> int | None:
    """open, write, [fsync,] close: the errno of the first failing call, or None."""
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        return exc.errno
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):  # the mount may be gone (ENOTCONN)
            os.close(fd)
        return exc.errno
    try:
        os.close(fd)
    except OSError as exc:
        return exc.errno
    return None


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill a process started in a session of its own, and its children (by its
    process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=TIMEOUT)

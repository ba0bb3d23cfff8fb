"""Operator commands on a live mount: ``status``, ``umount`` (busy check, wait for the daemon).

These run in a separate process from the daemon and talk to it only through
the mount itself: the status document is the ``user.atomicfs.status`` xattr of
the mount root (:mod:`atomicfs.status`), which also names the daemon's pid.

Unmount order:
1. refuse, with one line naming them, when processes hold files, working
   directories or mappings in the mount (found through ``/proc``; unless lazy);
2. ``fusermount3 -u`` (works for root and for the user who mounted);
3. wait until the daemon process has exited: it finishes the commits in
   flight and the sessions whose last release the kernel never delivered
   before it exits, so a returned ``atomicfs umount`` means every commit is done.
A dead mount (its daemon was killed) answers ENOTCONN; it is detached the same way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import processes
from .mount import MountError
from .mounttable import MountEntry, is_fuse, top_mount
from .status import STATUS_XATTR

T = TypeVar("T")
ANSWER_TIMEOUT = 10.0  # seconds a live daemon gets to answer a status or stat request
SHOW_HOLDERS = 5  # processes named in a refusal; the rest are counted


class _NoAnswer(Exception):
    """The daemon did not answer in time (hung, or very busy)."""


def _in_thread(fn: Callable[[], T], timeout: float) -> T:
    """Run ``fn`` with a time limit: a request to a hung FUSE daemon blocks forever."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _NoAnswer
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def fuse_mount_at(mountpoint: str) -> MountEntry:
    """The FUSE mount exactly at ``mountpoint``, or MountError."""
    entry = top_mount(os.path.realpath(mountpoint))
    if entry is None or not is_fuse(entry.fstype):
        if not os.path.lexists(mountpoint):
            raise MountError(f"{mountpoint!r} does not exist")
        raise MountError(f"{mountpoint!r} is not a FUSE mount")
    return entry


def read_status(mountpoint: str, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
    """The daemon's status document (JSON in the root's status xattr).

    Any FUSE mount is asked (``-o subtype=`` may have renamed an atomicfs mount's
    type); one without the attribute is not atomicfs.
    """
    entry = fuse_mount_at(mountpoint)
    try:
        raw = _in_thread(lambda: os.getxattr(entry.point, STATUS_XATTR), timeout)
    except _NoAnswer:
        raise MountError(f"the daemon of {mountpoint!r} did not answer within "
                         f"{timeout:.0f}s") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(f"{mountpoint!r} is a dead mount: its daemon is gone "
                             f"(detach it with: atomicfs umount {mountpoint})") from None
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise MountError(f"{mountpoint!r} is not an atomicfs mount "
                             f"({entry.fstype})") from None
        raise MountError(f"cannot read the status of {mountpoint!r}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise MountError(f"the status of {mountpoint!r} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise MountError(f"the status of {mountpoint!r} is not a JSON object")
    return doc


def is_dead(entry: MountEntry, timeout: float = ANSWER_TIMEOUT) -> bool:
    """Is this FUSE mount's daemon gone (every request answered ENOTCONN)?

    A daemon that does not answer in time is alive (hung or busy), not dead.
    """
    try:
        _in_thread(lambda: os.statvfs(entry.point), timeout)  # never cached
    except _NoAnswer:
        return False
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


# -- who uses a mount ---------------------------------------------------------------------

@dataclass(frozen=True)
class Holder:
    pid: int
    command: str
    what: str  # "has /mnt/f open", "has its working directory in /mnt"...


def _mount_id(fdinfo: str) -> int | None:
    """The ``mnt_id`` of an fdinfo file (None if it is gone or says none)."""
    try:
        return int(processes.read_fields(fdinfo)["mnt_id"])
    except (OSError, KeyError, ValueError):
        return None


def _link_mount_id(path: str) -> int | None:
    """The mount id of what a /proc magic link points to (O_PATH: the daemon is not asked)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _mount_id(f"/proc/self/fdinfo/{fd}")
    finally:
        os.close(fd)


def holders(entry: MountEntry, skip: set[int] | frozenset[int] = frozenset()) -> list[Holder]:
    """Processes with open files, a working or root directory, an executable or a
    mapping in this mount (those /proc lets this user see)."""
    found: list[Holder] = []
    skip = set(skip) | {os.getpid()}  # this command (it may hold inherited descriptors)
    major, minor = os.major(entry.dev), os.minor(entry.dev)
    dev_text = f"{major:02x}:{minor:02x}"
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        if int(pid) in skip:
            continue
        base = f"/proc/{pid}"
        what: list[str] = []
        for link, words in (("cwd", "its working directory"), ("root", "its root directory"),
                            ("exe", "its program")):
            if _link_mount_id(f"{base}/{link}") == entry.mount_id:
                what.append(f"{words} in {_readlink(f'{base}/{link}')}")
        try:
            fds = os.listdir(f"{base}/fd")
        except OSError:
            fds = []
        for fd in fds:
            if _mount_id(f"/proc/{pid}/fdinfo/{fd}") == entry.mount_id:
                what.append(f"{_readlink(f'{base}/fd/{fd}')} open")
        try:
            with open(f"{base}/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[3] == dev_text:
                        what.append(f"{fields[5].strip()} mapped")
        except OSError:
            pass
        if what:
            found.append(Holder(int(pid), _command(pid), ", ".join(dict.fromkeys(what))))
    return found


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def describe_holders(found: list[Holder]) -> str:
    shown = [f"pid {h.pid} ({h.command}) has {h.what}" for h in found[:SHOW_HOLDERS]]
    more = len(found) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


# -- the daemon process ---------------------------------------------------------------------

def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time), or None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def wait_for_exit(pid: int, started: str | None, timeout: float | None,
                  notice: Callable[[str], None] | None = None) -> bool:
    """Wait until process ``pid`` (that started at ``started``) is gone. False on timeout."""
    begun = time.monotonic()
    told = False
    while started is not None and _start_time(pid) == started:
        waited = time.monotonic() - begun
        if timeout is not None and waited >= timeout:
            return False
        if notice is not None and not told and waited > 2:
            notice(f"waiting for the daemon (pid {pid}) to finish its commits and exit")
            told = True
        time.sleep(0.02)
    return True


# -- unmount --------------------------------------------------------------------------------

def _fusermount(path: str, lazy: bool) -> subprocess.CompletedProcess[str]:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise MountError("fusermount3 is not installed (package fuse3)") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def unmount(mountpoint: str, lazy: bool = False, if_dead: bool = False,
            timeout: float | None = None,
            notice: Callable[[str], None] | None = None) -> str | None:
    """``atomicfs umount``. Returns a line to print (or None); raises MountError.

    ``if_dead``: detach only a mount whose daemon is gone, and succeed quietly
    otherwise (for systemd's ExecStartPre before a restart).
    """
    if if_dead:
        entry = top_mount(os.path.realpath(mountpoint))
        if entry is None or not is_fuse(entry.fstype) or not is_dead(entry):
            return None
        res = _fusermount(entry.point, lazy=True)
        if res.returncode != 0:
            raise MountError(f"detaching the dead mount {mountpoint!r} failed: "
                             f"{_last_line(res.stderr)}")
        return f"detached the dead mount {mountpoint!r}"
    entry = fuse_mount_at(mountpoint)
    daemon: tuple[int, str | None] | None = None
    sessions: list[str] = []
    transactions: list[dict[str, Any]] = []
    try:
        doc = read_status(mountpoint)
        pid = int(doc["pid"])
        daemon = (pid, _start_time(pid))
        sessions = [str(s.get("path")) for s in doc.get("sessions", [])]
        transactions = list(doc.get("transactions", []))
    except (MountError, KeyError, TypeError, ValueError):
        daemon = None  # dead, hung, not atomicfs: unmount all the same, without waiting
    if transactions and not lazy:
        # docs/semantics.md §14: refused while a transaction's command runs
        t = transactions[0]
        raise MountError(f"{mountpoint!r} is not unmounted: a transaction is open "
                         f"(pid {t.get('root_pid')}: {t.get('command')}); wait for it, or "
                         "use --lazy, which aborts it")
    if transactions:
        with contextlib.suppress(OSError):  # --lazy: abort them first (nothing stays)
            os.getxattr(entry.point, "user.atomicfs.tx.abort-all:0")
    if not lazy:
        found = holders(entry, skip={daemon[0]} if daemon else set())
        if found:
            raise MountError(f"{mountpoint!r} is in use, not unmounted: "
                             f"{describe_holders(found)} (close them, or use --lazy)")
    res = _fusermount(entry.point, lazy)
    if res.returncode != 0:
        reason = _last_line(res.stderr)
        if sessions and not lazy:
            reason += f"; open write sessions: {', '.join(sessions[:SHOW_HOLDERS])}"
        raise MountError(f"unmount of {mountpoint!r} failed: {reason}")
    if (daemon is not None and not lazy
            and not wait_for_exit(daemon[0], daemon[1], timeout, notice)):
        raise MountError(f"{mountpoint!r} is unmounted, but its daemon (pid {daemon[0]}) "
                             f"has not exited after {timeout:g}s")
    return None

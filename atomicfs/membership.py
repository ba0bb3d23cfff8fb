"""Which open transaction a thread belongs to: its process tree, read from ``/proc``
(docs/design-transactions.md).  Pure but for ``/proc``."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

CACHE_MAX = 65536


# -- membership (pure but for /proc) ---------------------------------------------------
def proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a process or thread from /proc; None if it is gone.

    Read on every request while a transaction is open (the membership cache is
    checked against the start time), so with the fewest syscalls: open, one read,
    close (a Python file object adds an fstat, an lseek and a second read)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)  # the whole line: procfs answers it in one read
    except OSError:
        return None
    finally:
        os.close(fd)
    return parse_stat(data)


def parse_stat(data: bytes) -> tuple[int, int] | None:
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[1]), int(fields[19])  # ppid (field 4), starttime (field 22)
    except (IndexError, ValueError):
        return None


def proc_tgid(tid: int) -> int | None:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class Membership:
    """Which open transaction, if any, a thread belongs to.

    A thread is a member when its process is a root or a descendant of one (the
    parent chain in /proc).  The answer is cached by (thread id, start time) for
    as long as the transaction is open: a process that detaches later (its parent
    exits, it is reparented to init) stays a member if it made a request before;
    one first seen after it detached is not.
    """

    def __init__(self, read_stat: Callable[[int], tuple[int, int] | None] = proc_stat,
                 read_tgid: Callable[[int], int | None] = proc_tgid) -> None:
        self.read_stat = read_stat
        self.read_tgid = read_tgid
        self.roots: dict[int, tuple[int, Any]] = {}  # root pid -> (start time, tx)
        self.cache: dict[int, tuple[int, Any]] = {}  # tid -> (start time, tx or None)

    def add(self, pid: int, start: int, tx: Any) -> None:
        self.roots[pid] = (start, tx)
        self.cache.clear()  # a thread known as an outsider may be the new root

    def remove(self, pid: int) -> None:
        self.roots.pop(pid, None)
        self.cache.clear()

    def find(self, tid: int) -> Any:
        if not self.roots or tid <= 0:
            return None
        st = self.read_stat(tid)
        if st is None:
            return None
        hit = self.cache.get(tid)
        if hit is not None and hit[0] == st[1]:
            return hit[1]
        found = None
        pid = self.read_tgid(tid) or tid
        pst = st if pid == tid else self.read_stat(pid)
        for _ in range(256):
            if pst is None:
                break
            root = self.roots.get(pid)
            if root is not None and root[0] == pst[1]:
                found = root[1]
                break
            pid = pst[0]
            if pid <= 1:
                break
            pst = self.read_stat(pid)
        if len(self.cache) > CACHE_MAX:
            self.cache.clear()
        self.cache[tid] = (st[1], found)
        return found

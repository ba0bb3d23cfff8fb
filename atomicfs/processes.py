"""What the daemon learns from /proc about the processes behind a close.

pyfuse3 hands ``flush`` no pid and no lock owner, so a FLUSH cannot tell who is
closing.  What /proc says about the *opener* (the pid of the OPEN request)
decides what a close after writes means (docs/semantics.md §1.3, §2.1; docs/semantics.md §2 "Commit
points"):

- the opener is being killed by a signal: the program died mid-write, so its
  unfinished writes must not be committed (:func:`killed`);
- a child of the opener is closing descriptors (exiting, in exec, in close),
  none of those children wrote a byte (``wchar`` in /proc/PID/io), and the
  opener still holds a descriptor of the file open the same way: the close is
  that child's — ``/bin/true`` or ``sleep`` exiting inside ``( ... ) > f``, or a
  program's child closing inherited descriptors before it execs a command —
  and the opener goes on writing, so the commit waits for a later close
  (:func:`silent_children_closing`, :func:`holds`).
  A child that wrote anything (``/bin/echo`` in the same place) may have written
  this file, and its close stays a commit point, with its error reported to it.

Reading /proc never touches the mount (readlink of ``/proc/PID/fd/N`` and the
``fdinfo`` files are answered by the kernel alone), so it cannot deadlock with
the daemon's own requests.  Where /proc cannot be read (another user's process
for an unprivileged daemon, another pid namespace), the answers are "not
killed" and "no silent child": a close then commits.
"""

from __future__ import annotations

import os
from typing import NamedTuple

PF_EXITING = 0x00000004  # include/linux/sched.h: the task is in do_exit()


class ProcState(NamedTuple):
    """What ``/proc/PID/stat`` says about a process."""
    flags: int
    exit_code: int  # 0 on kernels older than 3.5, which do not report it
    threads: int

    @property
    def exiting(self) -> bool:
        return bool(self.flags & PF_EXITING)

    @property
    def signal(self) -> int:
        """The signal killing the process, if it is exiting because of one; else 0."""
        return self.exit_code & 0x7F if self.exiting else 0


UNKNOWN = ProcState(0, 0, 0)  # /proc did not say: "not exiting", threads unknown


def parse_stat(text: str) -> ProcState:
    """:class:`ProcState` from the text of ``/proc/PID/stat``.

    The command name (field 2) may hold spaces and parentheses: fields are
    counted after its last ``)``.  flags is field 9, num_threads field 20,
    exit_code field 52.
    """
    rest = text[text.rindex(")") + 2:].split()
    exit_code = int(rest[52 - 3]) if len(rest) > 52 - 3 else 0
    return ProcState(int(rest[9 - 3]), exit_code, int(rest[20 - 3]))


def _read(path: str) -> str:
    """A /proc file's text: open, reads to the end, close (no buffered file object
    and its fstat/ioctl/lseek calls: this runs at every close after writes)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):  # a short read is not the end in /proc
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def state(pid: int) -> ProcState:
    """What /proc says about ``pid`` (:data:`UNKNOWN` if it cannot be read)."""
    try:
        return parse_stat(_read(f"/proc/{pid}/stat"))
    except (OSError, ValueError, IndexError):
        return UNKNOWN


def killed(pid: int) -> int:
    """The signal killing ``pid``, if it is exiting because of one; else 0."""
    return state(pid).signal


def _wrote(pid: int) -> bool:
    """Has ``pid`` written any byte (any file, pipe or terminal)?  True if unknown."""
    try:
        return int(read_fields(f"/proc/{pid}/io").get("wchar", "1")) > 0
    except (OSError, ValueError):
        return True


MAX_THREADS = 64  # a process with more threads is not asked (a close then commits)


def children(pid: int, threads: int = 0) -> list[int]:
    """The children of every thread of ``pid`` (empty if /proc does not say, or if
    the process has more than MAX_THREADS threads: each close would read them all).
    ``threads``: its thread count if known (1 spares listing its tasks)."""
    out: list[int] = []
    if threads == 1:
        tids = [str(pid)]
    else:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return out
    if len(tids) > MAX_THREADS:
        return out
    for tid in tids:
        try:
            out += [int(c) for c in _read(f"/proc/{pid}/task/{tid}/children").split()]
        except (OSError, ValueError):
            continue
    return out


# Syscalls that close a descriptor (close, close_range, dup2, dup3) or close
# the close-on-exec ones (execve, execveat), by machine.
CLOSING_SYSCALLS = {
    "x86_64": {3, 436, 33, 292, 59, 322},
    "aarch64": {57, 436, 24, 221, 281},
}.get(os.uname().machine, set())


def _closing(pid: int) -> bool:
    """Is ``pid`` exiting, or blocked in a syscall that closes descriptors?"""
    if state(pid).exiting:
        return True
    try:
        number = _read(f"/proc/{pid}/syscall").split(maxsplit=1)[0]
    except (OSError, IndexError):
        return False
    return number.isdigit() and int(number) in CLOSING_SYSCALLS


def silent_children_closing(pid: int, threads: int = 0) -> bool:
    """Is some child of ``pid`` closing descriptors (exit, exec, close), and has
    none of those children written a byte?  (``threads`` as for :func:`children`.)"""
    closing = [c for c in children(pid, threads) if _closing(c)]
    return bool(closing) and not any(_wrote(c) for c in closing)


def parse_fdinfo(text: str) -> dict[str, str]:
    """The ``key: value`` lines of a ``/proc/PID/fdinfo/N`` file (and of the other
    /proc files in that form: ``status``, ``io``)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def read_fields(path: str) -> dict[str, str]:
    """The ``key: value`` fields of a /proc file; OSError if it cannot be read."""
    return parse_fdinfo(_read(path))


def holds(pid: int, mountpoint: str, ino: int, accmode: int) -> bool:
    """Does ``pid`` hold a descriptor of the file ``ino`` under ``mountpoint``
    that was opened with access mode ``accmode``?"""
    if pid <= 0 or pid == os.getpid():
        return False
    prefix = mountpoint.rstrip("/") + "/"
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:  # gone, exiting (its table is already released), or not ours to see
        return False
    for fd in fds:
        try:
            target = os.readlink(f"{base}/{fd}")
            if not target.startswith(prefix) and target != mountpoint:
                continue
            info = read_fields(f"/proc/{pid}/fdinfo/{fd}")
        except OSError:  # closed meanwhile
            continue
        try:
            same_file = int(info.get("ino", "-1")) == ino
            same_mode = int(info.get("flags", "0"), 8) & os.O_ACCMODE == accmode
        except ValueError:
            continue
        if same_file and same_mode:
            return True
    return False


MAX_FDS = 4096  # a process with more descriptors is not scanned (its reads stay isolated)


def _under(target: str, mountpoint: str) -> bool:
    return target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/")


def writes_file(pid: int, mountpoint: str, ino: int) -> bool:
    """Does ``pid`` (a process, or any thread of one: they share the descriptor
    table) hold a descriptor of the file ``ino`` under ``mountpoint`` open for
    writing?  False if /proc cannot say, or past MAX_FDS descriptors."""
    if pid <= 0 or pid == os.getpid():
        return False
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except OSError:
        return False
    if len(fds) > MAX_FDS:
        return False
    for fd in fds:
        try:
            if not _under(os.readlink(f"{base}/{fd}"), mountpoint):
                continue
            info = read_fields(f"/proc/{pid}/fdinfo/{fd}")
            if (int(info.get("ino", "-1")) == ino
                    and int(info.get("flags", "0"), 8) & os.O_ACCMODE != os.O_RDONLY):
                return True
        except (OSError, ValueError):  # closed meanwhile
            continue
    return False


def parse_maps_shared(text: str, mountpoint: str, ino: int) -> bool:
    """Does a ``/proc/PID/maps`` text hold a shared mapping of the file ``ino``
    under ``mountpoint``?  Lines: ``start-end perms offset dev inode path``;
    perms ends in ``s`` for MAP_SHARED."""
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if (len(fields) == 6 and fields[1].endswith("s") and fields[4] == str(ino)
                and _under(fields[5], mountpoint)):
            return True
    return False


def maps_shared(pid: int, mountpoint: str, ino: int) -> bool:
    """Has ``pid`` mapped the file ``ino`` under ``mountpoint`` with MAP_SHARED?"""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        return parse_maps_shared(_read(f"/proc/{pid}/maps"), mountpoint, ino)
    except OSError:
        return False

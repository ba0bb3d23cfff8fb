"""Record the daemon's real system calls with strace and check the durability order.

:class:`Tracer` attaches ``strace -f`` to a running daemon (every thread, also
the ones trio starts later), records the calls that change or sync files, and
:func:`parse` turns the output into :class:`Call` records with start and end
times (CLOCK_REALTIME, the clock ``time.time()`` reads, so a test can compare
them with the moments its own calls returned).

Why the times can be compared: strace stamps a call when it handles the
thread's stop at entry and at exit, and the thread cannot go on before strace
resumes it.  So a call's recorded end is before anything the daemon does
afterwards, including the FUSE reply that lets a writer's close() return.

Checks (each returns a list of violations, empty when all is well):

- :func:`publish_violations`: every publication of a file in the source tree
  (``linkat`` of an unnamed file to its name, or ``rename`` of the daemon's
  temporary name over the target) comes after an ``fsync``/``fdatasync`` of
  that very file that started after its last modification;
- :func:`writer_violations`: for every commit a writer made (close or fsync),
  the file was published after the writer's call began, and the directory
  holding it was fsync'ed after the publication and before the call returned
  (``deferred``: durability=batch closes, published by a group within a bound);
- :func:`journal_violations`: a journal record was fsync'ed, and the daemon's
  directory after its creation, before the first in-place write to the
  target; the target was fsync'ed after its last write and before the record
  was removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from atomicfs import processes

TRACED = [
    # syncs
    "fsync", "fdatasync", "syncfs", "sync", "sync_file_range",
    # publication and removal of names
    "rename", "renameat", "renameat2", "link", "linkat", "unlink", "unlinkat",
    # opens (their returned fds are decorated with paths)
    "openat", "open",
    # data and metadata changes of files
    "write", "pwrite64", "pwritev", "pwritev2", "copy_file_range", "ftruncate", "truncate",
    "fallocate", "fchmod", "fchmodat", "chmod", "fchown", "fchownat", "utimensat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
]
SYNCS = {"fsync", "fdatasync"}
MODIFY_BY_FD = {"write", "pwrite64", "pwritev", "pwritev2", "ftruncate", "fallocate",
                "fchmod", "fchown", "fsetxattr", "fremovexattr"}
MODIFY_BY_PATH = {"chmod", "setxattr", "lsetxattr", "removexattr", "lremovexattr", "truncate"}
MODIFY_AT = {"fchmodat", "fchownat", "utimensat"}  # (dirfd, path, ...): path "" = dirfd
EPS = 2e-6  # printed times are rounded to microseconds

LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
FD = re.compile(r"(-?\d+|AT_FDCWD)<((?:[^<>\\]|\\.)*)>(\(deleted\))?")
RESULT = re.compile(r"\)\s+=\s+(-?\d+|\?)(?:<((?:[^<>\\]|\\.)*)>(\(deleted\))?)?"
                    r"(?:\s+(E[A-Z0-9]+)[^<]*)?\s*<(\d+\.\d+)>\s*$")
STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass
class Obj:
    """What a decorated fd names: a path, and whether it is an unlinked file."""

    path: str
    deleted: bool

    @property
    def key(self) -> str:
        """Identity of the file: unnamed (O_TMPFILE) files by inode, others by path."""
        base = os.path.basename(self.path)
        if self.deleted and re.fullmatch(r"#\d+", base):
            return "tmp" + base
        return self.path + (" (deleted)" if self.deleted else "")


@dataclass
class Call:
    pid: int
    name: str
    args: str
    ret: int | None
    errno: str | None
    start: float
    end: float
    fds: list[Obj] = field(default_factory=list)  # decorated fd arguments, in order
    strings: list[str] = field(default_factory=list)  # string arguments, in order
    ret_obj: Obj | None = None  # for calls returning an fd
    line: str = ""
    resolved: dict[int, Obj] = field(default_factory=dict)  # strings[i] = /proc/self/fd/N

    def path_arg(self, i: int) -> Obj | None:
        """String argument ``i`` as a file (what a /proc/self/fd/N link named then)."""
        if i in self.resolved:
            return self.resolved[i]
        if i < len(self.strings) and self.strings[i]:
            return Obj(self.strings[i], False)
        return None

    @property
    def ok(self) -> bool:
        return self.ret is not None and self.ret >= 0

    def __str__(self) -> str:
        return f"[{self.start:.6f}-{self.end:.6f}] {self.line.strip()}"


_C_ESCAPES = {"n": b"\n", "t": b"\t", "r": b"\r", "v": b"\v", "f": b"\f", "a": b"\a",
              "b": b"\b", "e": b"\x1b"}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)")


def _unescape(s: str) -> str:
    """strace's C escapes (\\n, \\ooo, \\xHH...) -> the name (non-UTF-8 bytes kept)."""

    def one(m: re.Match[str]) -> str:
        e = m.group(1)
        if e[0] == "x" and len(e) == 3:
            raw = bytes([int(e[1:], 16)])
        elif e[0] in "01234567":
            raw = bytes([int(e, 8) & 0xFF])
        else:
            raw = _C_ESCAPES.get(e, e.encode())
        return raw.decode("latin-1")

    return _ESCAPE.sub(one, s).encode("latin-1", "replace").decode("utf-8", "surrogateescape")


def _finish(pid: int, name: str, start: float, text: str, raw: str) -> Call | None:
    """Build a Call from ``name(args) = ret <dur>`` text (args may end in ``...``)."""
    m = RESULT.search(text)
    if m is None:
        return None
    args = text[:m.start()]
    ret = None if m.group(1) == "?" else int(m.group(1))
    ret_obj = Obj(_unescape(m.group(2)), bool(m.group(3))) if m.group(2) is not None else None
    fds = [Obj(_unescape(g[1]), bool(g[2])) for g in FD.findall(args)]
    strings = [_unescape(s) for s in STRING.findall(FD.sub("", args))]
    return Call(pid, name, args, ret, m.group(4), start, start + float(m.group(5)), fds,
                strings, ret_obj, raw)


def parse(text: str) -> list[Call]:
    """strace -f -ttt -T -y output -> calls ordered by start time (unfinished ones joined)."""
    calls: list[Call] = []
    pending: dict[tuple[int, str], tuple[float, str, str]] = {}
    for raw in text.splitlines():
        m = LINE.match(raw)
        if m is None:
            continue
        pid, ts, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if rest.startswith(("---", "+++")):
            continue
        if rest.startswith("<... "):
            r = re.match(r"<\.\.\. (\w+) resumed>(.*)$", rest)
            if r is None:
                continue
            head = pending.pop((pid, r.group(1)), None)
            if head is None:
                continue
            start, name, first = head
            call = _finish(pid, name, start, first + r.group(2), raw)
            if call is not None:
                calls.append(call)
            continue
        r = re.match(r"(\w+)\((.*)$", rest)
        if r is None:
            continue
        name, body = r.group(1), r.group(2)
        if body.endswith("<unfinished ...>"):
            pending[(pid, name)] = (ts, name, body[:-len("<unfinished ...>")].rstrip())
            continue
        call = _finish(pid, name, ts, body, raw)
        if call is not None:
            calls.append(call)
    calls.sort(key=lambda c: c.start)
    return calls


# -- who is touched --------------------------------------------------------------------
def _join(obj: Obj | None, name: str) -> str | None:
    if name.startswith("/"):
        return name
    if obj is None:
        return None
    return os.path.normpath(os.path.join(obj.path, name))


def modified(call: Call) -> Obj | None:
    """The file a call changes (data or metadata), or None."""
    if not call.ok:
        return None
    if call.name in MODIFY_BY_FD and call.fds:
        return call.fds[0]
    if call.name == "copy_file_range" and len(call.fds) >= 2:
        return call.fds[1]
    if call.name in MODIFY_BY_PATH:
        return call.path_arg(0)
    if call.name in MODIFY_AT and call.fds:
        if 0 in call.resolved:
            return call.resolved[0]
        if call.strings and call.strings[0]:
            path = _join(call.fds[0], call.strings[0])
            return Obj(path, False) if path else None
        return call.fds[0]
    return None


def synced(call: Call) -> Obj | None:
    if call.ok and call.name in SYNCS and call.fds:
        return call.fds[0]
    return None


def resolve_proc_fds(calls: list[Call]) -> None:
    """Replace ``/proc/self/fd/N`` path arguments by what fd N named at the time."""
    last: dict[str, Obj] = {}  # fd number -> what it named last (one traced process)
    for call in calls:
        for i, s in enumerate(call.strings):
            m = re.fullmatch(r"/proc/(?:self|thread-self)/fd/(\d+)", s)
            if m and m.group(1) in last:
                call.resolved[i] = last[m.group(1)]
        for g in FD.finditer(call.args):
            last[g.group(1)] = Obj(_unescape(g.group(2)), bool(g.group(3)))
        if call.ret_obj is not None and call.ret is not None:
            last[str(call.ret)] = call.ret_obj


@dataclass
class Publish:
    """A file got its final name in the source tree."""

    call: Call
    key: str  # identity of the published file (see Obj.key)
    directory: str
    name: str


def publications(calls: list[Call], daemon_dir: str) -> list[Publish]:
    """Every publication: linkat to a user name, rename out of the daemon's directory."""
    out: list[Publish] = []
    staged: dict[str, str] = {}  # temporary name in the daemon dir -> key
    for call in calls:
        if not call.ok:
            continue
        if call.name == "linkat" and len(call.fds) >= 2:
            src, newdir = call.fds[0], call.fds[-1]
            if call.strings and call.strings[0]:  # linkat(AT_FDCWD, "/proc/self/fd/N", ...)
                named = call.path_arg(0)
                if named is None:
                    continue
                src = named
            new = call.strings[-1]
            if newdir.path == daemon_dir:
                staged[new] = src.key
            else:
                out.append(Publish(call, src.key, newdir.path, new))
        elif call.name in ("renameat", "renameat2") and len(call.fds) >= 2 \
                and len(call.strings) >= 2:
            olddir, newdir = call.fds[0], call.fds[1]
            if olddir.path == daemon_dir and call.strings[0] in staged:
                out.append(Publish(call, staged.pop(call.strings[0]), newdir.path,
                                   call.strings[1]))
    return out


def publish_violations(calls: list[Call], daemon_dir: str) -> list[str]:
    """Each published file was fsync'ed after its last change, before its publication."""
    bad = []
    pubs = publications(calls, daemon_dir)
    for pub in pubs:
        before = [c for c in calls if c.start < pub.call.start]
        changes = [c for c in before if (o := modified(c)) is not None and o.key == pub.key]
        syncs = [c for c in before if (o := synced(c)) is not None and o.key == pub.key]
        last_change = changes[-1].end if changes else float("-inf")
        good = [s for s in syncs if s.start + EPS >= last_change and s.end <= pub.call.start + EPS]
        if not good:
            why = (f"last fsync {syncs[-1]}" if syncs else "never fsync'ed") \
                + (f"; last change {changes[-1]}" if changes else "")
            bad.append(f"{pub.directory}/{pub.name} published unsynced by {pub.call}: {why}")
    return bad


def dir_syncs(calls: list[Call], directory: str) -> list[Call]:
    return [c for c in calls if (o := synced(c)) is not None and o.path == directory]


@dataclass
class WriterOp:
    """A commit point a writer reached: its call began at ``t0`` and returned at ``t1``."""

    path: str  # in the source tree
    how: str  # "close" or "fsync"
    t0: float
    t1: float


def writer_violations(calls: list[Call], daemon_dir: str, ops: Iterable[WriterOp],
                      deferred: float | None = None) -> list[str]:
    """Every op's commit is published and its directory fsync'ed before the op returned.

    ``deferred`` (durability=batch closes): the publication and the directory fsync
    may come after the close returned, but within ``deferred`` seconds of it.
    """
    bad = []
    pubs = publications(calls, daemon_dir)
    for op in ops:
        directory, name = os.path.split(op.path)
        limit = op.t1 if deferred is None else op.t1 + deferred
        mine = [p for p in pubs if (p.directory, p.name) == (directory, name)
                and p.call.start >= op.t0 and p.call.end <= limit + EPS]
        if not mine:
            bad.append(f"{op.how} of {op.path} [{op.t0:.6f}-{op.t1:.6f}]: no publication "
                       f"of the file {'before it returned' if deferred is None else 'in time'}")
            continue
        pub = mine[-1] if deferred is None else mine[0]
        dsync = [s for s in dir_syncs(calls, directory)
                 if s.start + EPS >= pub.call.end and s.end <= limit + EPS]
        if not dsync:
            later = [s for s in dir_syncs(calls, directory) if s.start + EPS >= pub.call.end]
            bad.append(f"{op.how} of {op.path} returned at {op.t1:.6f} before the directory "
                       f"was fsync'ed after {pub.call}"
                       + (f"; next directory fsync {later[0]}" if later else
                          "; the directory was never fsync'ed after it"))
    return bad


def journal_violations(calls: list[Call], daemon_dir: str, target: str,
                       records_from: list[Call] | None = None) -> tuple[int, list[str]]:
    """Order of journalled commits of ``target``: (records checked, violations).

    The records checked are those created in ``records_from`` (default: ``calls``);
    everything else is looked up in ``calls``.  A record's apply is the target's
    writes from its creation to the next record's creation (commits of one file
    are sequential) or its removal.  Each record: fsync'ed, and the daemon's
    directory fsync'ed, before its first in-place write; the target fsync'ed after
    its last in-place write and before the record's removal (which, since the
    commit is durable once the record is, may come after the call returned).
    """
    bad = []

    def created(among: list[Call]) -> list[Call]:
        return [c for c in among if c.name == "openat" and c.ok and c.ret_obj is not None
                and os.path.dirname(c.ret_obj.path) == daemon_dir
                and os.path.basename(c.ret_obj.path).startswith("journal-")]

    mine = created(calls if records_from is None else records_from)
    every = created(calls)
    for rec in mine:
        rpath = rec.ret_obj.path if rec.ret_obj else ""
        rname = os.path.basename(rpath)
        retire = next((c for c in calls if c.start > rec.start and c.name == "unlinkat"
                       and c.ok and c.fds and c.fds[0].path == daemon_dir
                       and c.strings and c.strings[0] == rname), None)
        if retire is None:
            bad.append(f"journal record {rname} never removed")
            continue
        later = [c.start for c in every if c.start > rec.start]
        apply_end = min([retire.start] + later)
        window = [c for c in calls if rec.start <= c.start <= retire.start]
        rec_writes = [c for c in window if (o := modified(c)) is not None and o.path == rpath]
        rec_syncs = [c for c in window if (o := synced(c)) is not None and o.path == rpath
                     and (not rec_writes or c.start + EPS >= rec_writes[-1].end)]
        ddir_syncs = [c for c in window if (o := synced(c)) is not None
                      and o.path == daemon_dir and c.start + EPS >= rec.end]
        applies = [c for c in window if (o := modified(c)) is not None and o.path == target
                   and c.start <= apply_end]
        if not applies:
            bad.append(f"journal record {rname}: no in-place write to {target} before its "
                       "removal")
            continue
        first, last = applies[0], applies[-1]
        # any fsync that finished before the first write counts: another thread's fsync
        # of the same directory (the housekeeper settling an earlier record) may have
        # started earlier and still be running when the commit's own one returned
        if not any(c.end <= first.start + EPS for c in rec_syncs):
            bad.append(f"journal record {rname}: target written at {first} before the record "
                       f"was fsync'ed ({rec_syncs[0] if rec_syncs else 'never'})")
        if not any(c.end <= first.start + EPS for c in ddir_syncs):
            bad.append(f"journal record {rname}: target written at {first} before the "
                       f"daemon's directory was fsync'ed after the record's creation")
        tsyncs = [c for c in window if (o := synced(c)) is not None and o.path == target
                  and c.start + EPS >= last.end and c.end <= retire.start + EPS]
        if not tsyncs:
            bad.append(f"journal record {rname} removed at {retire} before {target} was "
                       f"fsync'ed after its last in-place write {last}")
    return len(mine), bad


def journal_writer_violations(calls: list[Call], daemon_dir: str, target: str,
                              ops: Iterable[WriterOp]) -> list[str]:
    """Each op on ``target`` returned only after its commit was durable (a journal
    record fsync'ed) and applied in place (the target written after that fsync)."""
    bad = []
    for op in ops:
        window = [c for c in calls if c.start >= op.t0 and c.end <= op.t1 + EPS]
        rec_syncs = [c for c in window if (o := synced(c)) is not None
                     and os.path.dirname(o.path) == daemon_dir
                     and os.path.basename(o.path).startswith("journal-")]
        writes = [c for c in window if (o := modified(c)) is not None and o.path == target
                  and rec_syncs and c.start + EPS >= rec_syncs[0].end]
        if not rec_syncs or not writes:
            what = "its journal record was fsync-ed" if not rec_syncs else "written in place"
            bad.append(f"{op.how} of {target} [{op.t0:.6f}-{op.t1:.6f}] returned before "
                       f"{what}")
    return bad


# -- attaching ---------------------------------------------------------------------------
class PtraceRefused(Exception):
    """strace could not attach (no ptrace permission here)."""


def _tracer_of(pid: int, tid: str) -> int:
    try:
        fields = processes.read_fields(f"/proc/{pid}/task/{tid}/status")
    except OSError:
        return -1
    return int(fields.get("TracerPid", "0"))


class Tracer:
    """``strace -f`` attached to a running process; :meth:`stop` returns its calls."""

    def __init__(self, pid: int, out: Path, timeout: float = 10.0,
                 extra: Iterable[str] = ()) -> None:
        """``extra``: system calls to record besides :data:`TRACED`."""
        exe = shutil.which("strace")
        if exe is None:
            raise FileNotFoundError("strace is not installed")
        self.out = out
        cmd = [exe, "-f", "-qq", "-ttt", "-T", "-y", "--seccomp-bpf", "-s", "256",
               "-e", "trace=" + ",".join([*TRACED, *extra]), "-o", str(out), "-p", str(pid)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while True:  # attached when every thread of the daemon has strace as its tracer
            tids = os.listdir(f"/proc/{pid}/task")
            if tids and all(_tracer_of(pid, t) == self.proc.pid for t in tids):
                break
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                if "not permitted" in err or "EPERM" in err:
                    raise PtraceRefused(err.strip().splitlines()[-1] if err.strip() else err)
                raise RuntimeError(f"strace exited with {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"strace did not attach to {pid} in {timeout}s")
            time.sleep(0.01)

    def stop(self, until: Callable[[list[Call]], bool] | None = None,
             timeout: float = 10.0) -> list[Call]:
        """Detach (SIGINT to strace), then parse what it recorded.

        ``until``: first wait (at most ``timeout`` seconds) until the calls recorded so
        far satisfy it. A call's effect is visible before strace has written its line
        (the thread waits in its exit stop), so a test that saw the effect must wait
        for the line before detaching, or the call comes out unfinished or missing.
        """
        deadline = time.monotonic() + timeout
        while until is not None and self.proc.poll() is None and time.monotonic() < deadline:
            if until(parse(self.out.read_text(errors="replace"))):
                break
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        calls = parse(self.out.read_text(errors="replace"))
        resolve_proc_fds(calls)
        return calls

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()

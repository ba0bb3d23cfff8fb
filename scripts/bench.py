#!/usr/bin/env python3
"""Benchmark atomicfs against the raw source directory and other FUSE filesystems.

    scripts/bench [--quick] [--only W1,W2] [--targets raw,atomicfs-full,...]
                  [--reps N] [--workdir DIR] [--out DIR] [--install-peers]
                  [--baseline [NAME=]DIR ...]

``--install-peers`` installs bindfs and fuse-overlayfs (apt) and matplotlib
(pip, into the venv) when missing.

Targets (all in one run, alternating per repetition): ``raw`` (a directory on
the work dir's filesystem), ``bindfs`` and ``fuse-overlayfs`` when installed,
``pyfuse3`` (``scripts/passthrough.py``: a plain pyfuse3 passthrough, the floor
of what Python plus pyfuse3 can do), ``atomicfs-full`` and ``atomicfs-batch``
(``-o durability=...``).  ``--baseline DIR`` adds ``atomicfs-full@base`` and
``atomicfs-batch@base``: the same mounts run by another checkout (DIR, with its
own ``DIR/.venv``), so a change is measured side by side with the build before
it, alternating in one run (``--baseline NAME=DIR``, repeatable: ``@NAME``).
Every workload runs in a forked child with a timeout, so a hung mount cannot
block the suite; a daemon that dies, hangs or logs errors is reported, never
hidden.

Writes ``results.md``, ``results.json`` and (with matplotlib) ``results.png`` to
``--out`` (default ``bench-results/`` in the checkout).  Every number is
measured in this run; ratios compare targets measured side by side, and the
issue's targets (GOALS below) are checked against those ratios.  ``--quick``
shrinks every workload to seconds: it checks the harness, not performance.
Exit status: 0 when every workload ran on every target, 3 when some failed
(results are written all the same), 1/2 for setup and usage errors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("ATOMICFS_VENV", ROOT / ".venv"))


def _ensure_venv() -> None:
    """Re-exec under the project's venv python (bootstrapping it if missing)."""
    if os.environ.get("ATOMICFS_BENCH_REEXEC"):
        return
    venv_python = VENV / "bin" / "python"
    if not venv_python.exists():
        print("bench: no virtualenv yet; running scripts/bootstrap.sh (bootstrap test)",
              file=sys.stderr)
        import subprocess

        rc = subprocess.run(["bash", "-c", '. "$1" && bootstrap test', "bootstrap",
                             str(ROOT / "scripts" / "bootstrap.sh")]).returncode
        if rc != 0 or not venv_python.exists():
            sys.exit(f"bench: error: bootstrap failed (exit {rc})")
    if Path(sys.prefix).resolve() != VENV.resolve():
        os.environ["ATOMICFS_BENCH_REEXEC"] = "1"
        os.execv(str(venv_python), [str(venv_python), str(Path(__file__).resolve()),
                                    *sys.argv[1:]])


if __name__ == "__main__":
    _ensure_venv()

# ruff: noqa: E402 - the re-exec above runs before anything else is imported
import argparse
import contextlib
import datetime
import functools
import json
import platform
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sysconfig
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from atomicfs import mounttable
from atomicfs.harness import Daemon, HarnessError

KiB = 1024
MiB = 1024 * KiB
LOG_BAD = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|\bException\b")
LOG_WARN = re.compile(r"\bWARNING\b")
ALL_TARGETS = ("raw", "bindfs", "fuse-overlayfs", "pyfuse3", "atomicfs-full", "atomicfs-batch")
ATOMICFS_TARGETS = ("atomicfs-full", "atomicfs-batch")  # each has an @NAME per --baseline


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# sizes

@dataclass(frozen=True)
class Sizes:
    seq: int = 256 * MiB           # sequential write/read file
    rand_file: int = 64 * MiB      # file for random overwrites
    rand_writes: int = 2000
    files: int = 2000              # small-file saves, create/stat/unlink
    stat_ops: int = 20000          # cached stat latency
    open_ops: int = 5000           # open+close latency
    tree_entries: int = 1500       # untar / rm -rf
    big: int = 1024 * MiB          # commit into a big file ...
    small: int = 1 * MiB           # ... and into a small one
    commit_writes: int = 64
    reps: int = 5
    heavy_reps: int = 3            # for the slow workloads (saves, untar-rm)
    timeout: float = 180.0         # per workload, target and repetition
    prepare_timeout: float = 300.0


FULL = Sizes()
QUICK = Sizes(seq=8 * MiB, rand_file=8 * MiB, rand_writes=200, files=100, stat_ops=2000,
              open_ops=200, tree_entries=120, big=16 * MiB, small=1 * MiB, reps=3,
              heavy_reps=3, timeout=30.0, prepare_timeout=30.0)


def human_size(n: int) -> str:
    return f"{n // MiB} MiB" if n < 1024 * MiB else f"{n // (1024 * MiB)} GiB"


# ---------------------------------------------------------------------------
# mount table

def fstype_at(path: Path) -> str | None:
    return mounttable.top_fstype(str(path))


def fs_of(path: Path) -> str:
    """fstype of the filesystem that holds ``path`` (longest mount-point prefix)."""
    return mounttable.filesystem_of(str(path))


def mounts_under(path: Path) -> list[str]:
    return [p for p in mounttable.mounts_below(str(path)) if p != str(path)]


def fusermount() -> str:
    return "fusermount3" if shutil.which("fusermount3") else "fusermount"


# ---------------------------------------------------------------------------
# targets

class TargetDown(Exception):
    """The target's daemon died or its mount vanished."""


@dataclass
class Target:
    name: str
    base: Path
    python: str = sys.executable
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    daemon: Daemon | None = None  # the atomicfs targets: atomicfs/harness.py
    checkout: Path = ROOT  # the checkout whose atomicfs runs (--baseline: another one)

    @property
    def is_fuse(self) -> bool:
        return self.name != "raw"

    @property
    def durable_close(self) -> bool:
        """close() commits durably here, so write workloads do not add an fsync."""
        return self.name.startswith("atomicfs")

    @property
    def root(self) -> Path:
        return self.base / ("data" if self.name == "raw" else "mnt")

    @property
    def log_path(self) -> Path:
        return self.base / "daemon.log"

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _command(self) -> list[str]:
        src, mnt = str(self.base / "src"), str(self.root)
        if self.name == "bindfs":
            return ["bindfs", "-f", src, mnt]
        if self.name == "fuse-overlayfs":
            b = self.base
            return ["fuse-overlayfs", "-f", "-o",
                    f"lowerdir={b / 'lower'},upperdir={b / 'upper'},workdir={b / 'work'}", mnt]
        if self.name == "pyfuse3":  # the benchmark peer: a plain passthrough, no commits
            return [self.python, str(ROOT / "scripts" / "passthrough.py"), src, mnt]
        raise ValueError(f"{self.name} is started by atomicfs/harness.py")

    def _start_atomicfs(self, timeout: float) -> None:
        durability = self.name.split("@")[0].split("-", 1)[1]
        # a session of its own: Ctrl-C reaches the bench only, which unmounts cleanly
        self.daemon = Daemon(self.base / "src", self.root, [f"durability={durability}"],
                             self.log_path, code=self.checkout, python=self.python,
                             new_session=True)
        with open(self.log_path, "ab") as log:
            log.write(f"=== bench: starting {' '.join(self.daemon.command())}\n".encode())
        try:
            self.daemon.start(timeout)
        finally:
            self.proc = self.daemon.proc

    def _stop_atomicfs(self, daemon: Daemon, timeout: float) -> str | None:
        if daemon.proc is not None and daemon.proc.poll() is not None and daemon.mounted():
            return f"the daemon had exited (status {daemon.proc.returncode}) before unmount"
        try:
            rc = daemon.unmount(timeout)
        except HarnessError as exc:
            return str(exc)
        if rc not in (0, None):
            return f"the daemon exited with status {rc} after a clean unmount"
        return None

    def start(self, timeout: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.is_fuse:
            return
        for d in ("src", "lower", "upper", "work") if self.name == "fuse-overlayfs" else ("src",):
            (self.base / d).mkdir(exist_ok=True)
        if fstype_at(self.root) is not None:
            raise RuntimeError(f"{self.root} is already a mount point")
        if self.name.startswith("atomicfs"):
            self._start_atomicfs(timeout)
            return
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            log.write(f"=== bench: starting {' '.join(self._command())}\n".encode())
            log.flush()
            # a session of its own: Ctrl-C reaches the bench only, which unmounts cleanly
            self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=str(ROOT),
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (fstype_at(self.root) or "").startswith("fuse"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before "
                                   f"mounting; log {self.log_path}:\n{self.log_since(0)[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not mount within {timeout:.0f}s")
            time.sleep(0.02)
        os.stat(self.root)

    def alive(self) -> bool:
        if not self.is_fuse:
            return True
        return (self.proc is not None and self.proc.poll() is None
                and (fstype_at(self.root) or "").startswith("fuse"))

    def stop(self, timeout: float = 30.0) -> str | None:
        """Clean unmount, waiting for the daemon; falls back to kill + lazy unmount.

        Returns what went wrong (a failed unmount, a daemon that did not exit or
        exited non-zero), or None.
        """
        if not self.is_fuse:
            return None
        if self.daemon is not None:
            problem = self._stop_atomicfs(self.daemon, timeout)
            self.kill()
            return problem
        deadline = time.monotonic() + timeout
        problem = None
        while (fstype_at(self.root) or "").startswith("fuse"):
            if self.proc is not None and self.proc.poll() is not None:
                problem = f"the daemon had exited (status {self.proc.returncode}) before unmount"
                break
            res = subprocess.run([fusermount(), "-u", str(self.root)],
                                 capture_output=True, text=True)
            if res.returncode == 0:
                break
            if time.monotonic() > deadline:
                problem = f"clean unmount failed: {res.stderr.strip()}"
                break
            time.sleep(0.2)
        if self.proc is not None and problem is None:
            try:
                rc = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                if rc != 0:
                    problem = f"the daemon exited with status {rc} after a clean unmount"
            except subprocess.TimeoutExpired:
                problem = f"the daemon did not exit within {timeout:.0f}s of the unmount"
        self.kill()
        return problem

    def kill(self) -> None:
        """kill -9 the daemon and lazily detach its mount."""
        if self.daemon is not None:
            with contextlib.suppress(HarnessError):  # a mount left is reported at the end
                self.daemon.kill()
            self.proc = None
            return
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        for _ in range(100):
            if not (fstype_at(self.root) or "").startswith("fuse"):
                break
            subprocess.run([fusermount(), "-uz", str(self.root)], capture_output=True)
            time.sleep(0.05)

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()


# ---------------------------------------------------------------------------
# running one step in a child process with a timeout

class StepTimeout(Exception):
    pass


class StepError(Exception):
    def __init__(self, message: str, details: str) -> None:
        super().__init__(message)
        self.details = details


def _reap(pid: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def run_in_child(fn: Callable[[], dict[str, float | None] | None], timeout: float,
                 on_stuck: Callable[[], None]) -> dict[str, float | None]:
    """Run ``fn`` in a forked child; its dict comes back as JSON through a pipe.

    On timeout the child is killed; a child stuck in a FUSE request cannot die
    until its daemon answers, so ``on_stuck`` (kill the daemon) runs then.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_end)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.sync()  # what earlier steps left dirty is not this step's cost
            payload: dict[str, Any] = {"ok": fn() or {}}
        except BaseException as exc:  # reported to the parent
            payload = {"error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()}
            code = 1
        try:
            os.write(write_end, json.dumps(payload).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    data = bytearray()
    reaped = timed_out = stuck = False
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_end], [], [], left)
            if ready:
                chunk = os.read(read_end, 1 << 16)
                if not chunk:
                    break
                data += chunk
        if not timed_out:
            os.waitpid(pid, 0)
            reaped = True
    finally:
        os.close(read_end)
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            if not _reap(pid, 5.0):
                stuck = True
                on_stuck()
                if not _reap(pid, 10.0):
                    say(f"bench: child {pid} is stuck even after its daemon was killed")
    if timed_out:
        raise StepTimeout(f"no result after {timeout:.0f}s; " + (
            "the workload was stuck in a FUSE request (unkillable), so the daemon was killed"
            if stuck else "the workload process was killed"))
    try:
        payload = json.loads(data.decode())
    except ValueError:
        raise StepError("the child died without a result", data.decode(errors="replace")) \
            from None
    if "error" in payload:
        raise StepError(payload["error"], payload["traceback"])
    result: dict[str, float | None] = payload["ok"]
    return result


# ---------------------------------------------------------------------------
# workloads (run in the child, inside target.root)

@dataclass
class Ctx:
    root: Path          # the workload's directory inside the target
    durable_close: bool
    sizes: Sizes
    rep: int
    tarball: Path
    drop_caches: bool


def _timer() -> float:
    return time.perf_counter()


def _write_all(fd: int, buf: bytes | memoryview) -> None:
    view = memoryview(buf)
    while view:
        view = view[os.write(fd, view):]


def _pwrite_all(fd: int, buf: bytes, offset: int) -> None:
    view = memoryview(buf)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _make_file(path: Path, size: int) -> None:
    """A file with real data allocated (1 MiB random chunks), made durable."""
    chunk = os.urandom(min(size, MiB))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < size:
            n = min(len(chunk), size - done)
            _write_all(fd, chunk[:n])
            done += n
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_all(path: Path) -> int:
    buf = bytearray(MiB)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def _offsets(seed: int, size: int, count: int, block: int = 4 * KiB) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(size // block) * block for _ in range(count)]


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def seq_write(ctx: Ctx) -> dict[str, float | None]:
    path = ctx.root / "seq"
    path.unlink(missing_ok=True)
    os.sync()
    buf = os.urandom(MiB)
    t0 = _timer()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(ctx.sizes.seq // MiB):
        _write_all(fd, buf)
    if not ctx.durable_close:
        os.fsync(fd)
    os.close(fd)
    dt = _timer() - t0
    return {"seq-write": ctx.sizes.seq / dt / 1e6}


def seq_read_prepare(ctx: Ctx) -> None:
    _make_file(ctx.root / "data", ctx.sizes.seq)


def seq_read(ctx: Ctx) -> dict[str, float | None]:
    path = ctx.root / "data"
    out: dict[str, float | None] = {"seq-read-cold": None}
    if ctx.drop_caches:
        _drop_caches()
        t0 = _timer()
        n = _read_all(path)
        out["seq-read-cold"] = n / (_timer() - t0) / 1e6
    else:
        _read_all(path)
    t0 = _timer()
    n = _read_all(path)
    out["seq-read-warm"] = n / (_timer() - t0) / 1e6
    return out


def rand_write_prepare(ctx: Ctx) -> None:
    _make_file(ctx.root / "data", ctx.sizes.rand_file)


def rand_write(ctx: Ctx) -> dict[str, float | None]:
    offsets = _offsets(ctx.rep, ctx.sizes.rand_file, ctx.sizes.rand_writes)
    buf = os.urandom(4 * KiB)
    t0 = _timer()
    fd = os.open(ctx.root / "data", os.O_RDWR)
    for off in offsets:
        _pwrite_all(fd, buf, off)
    if not ctx.durable_close:
        os.fsync(fd)
    os.close(fd)
    return {"rand-write": len(offsets) / (_timer() - t0)}


def _names(ctx: Ctx) -> list[Path]:
    return [ctx.root / f"f{i:05d}" for i in range(ctx.sizes.files)]


def saves_prepare(ctx: Ctx) -> None:
    buf = os.urandom(4 * KiB)
    for path in _names(ctx):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _write_all(fd, buf)
        os.close(fd)


def saves(ctx: Ctx) -> dict[str, float | None]:
    """Plain saves into existing files, then the same saves the careful way.

    The careful way (tmp, fsync, rename, fsync dir) is the reference a program
    would write by hand; both run in one step so that they are measured side by
    side with the other targets'.
    """
    names = _names(ctx)
    buf = os.urandom(4 * KiB)
    t0 = _timer()
    for path in names:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _write_all(fd, buf)
        os.close(fd)
    plain = len(names) / (_timer() - t0)
    os.sync()
    dfd = os.open(ctx.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = _timer()
        for path in names:
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _write_all(fd, buf)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, path)
            os.fsync(dfd)
        careful = len(names) / (_timer() - t0)
    finally:
        os.close(dfd)
    return {"small-saves": plain, "atomic-save": careful}


def create_stat_unlink(ctx: Ctx) -> dict[str, float | None]:
    d = ctx.root / f"r{ctx.rep}"
    d.mkdir()
    names = [d / f"n{i:05d}" for i in range(ctx.sizes.files)]
    t0 = _timer()
    for path in names:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    t1 = _timer()
    for path in names:
        os.stat(path)
    t2 = _timer()
    for path in names:
        os.unlink(path)
    t3 = _timer()
    d.rmdir()
    n = len(names)
    return {"create": n / (t1 - t0), "stat": n / (t2 - t1), "unlink": n / (t3 - t2)}


def latency_prepare(ctx: Ctx) -> None:
    _make_file(ctx.root / "f", 4 * KiB)


def latency(ctx: Ctx) -> dict[str, float | None]:
    path = str(ctx.root / "f")
    for _ in range(100):  # warm the caches
        os.stat(path)
        os.close(os.open(path, os.O_RDONLY))
    n = ctx.sizes.stat_ops
    t0 = _timer()
    for _ in range(n):
        os.stat(path)
    stat_us = (_timer() - t0) / n * 1e6
    n = ctx.sizes.open_ops
    t0 = _timer()
    for _ in range(n):
        os.close(os.open(path, os.O_RDONLY))
    open_us = (_timer() - t0) / n * 1e6
    return {"stat-cached": stat_us, "open-close": open_us}


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: "
                           f"{res.stderr.strip()[-500:]}")


def untar_rm(ctx: Ctx) -> dict[str, float | None]:
    dest = ctx.root / f"tree{ctx.rep}"
    dest.mkdir()
    _read_all(ctx.tarball)  # the tarball is read from the page cache on every target
    t0 = _timer()
    _run(["tar", "-xf", str(ctx.tarball), "-C", str(dest)])
    t1 = _timer()
    _run(["rm", "-rf", str(dest)])
    t2 = _timer()
    n = ctx.sizes.tree_entries
    return {"untar": n / (t1 - t0), "rm-rf": n / (t2 - t1)}


def commit_prepare(ctx: Ctx) -> None:
    _make_file(ctx.root / "big", ctx.sizes.big)
    _make_file(ctx.root / "small", ctx.sizes.small)


def commit(ctx: Ctx) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    buf = os.urandom(4 * KiB)
    for name, size in (("big", ctx.sizes.big), ("small", ctx.sizes.small)):
        offsets = _offsets(ctx.rep, size, ctx.sizes.commit_writes)
        os.sync()
        t0 = _timer()
        fd = os.open(ctx.root / name, os.O_RDWR)
        for off in offsets:
            _pwrite_all(fd, buf, off)
        t1 = _timer()
        if not ctx.durable_close:
            os.fsync(fd)
        os.close(fd)
        t2 = _timer()
        out[f"commit-{name}"] = (t2 - t0) * 1e3
        out[f"commit-{name}-close"] = (t2 - t1) * 1e3
    return out


# ---------------------------------------------------------------------------
# the catalogue

@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


@dataclass
class Workload:
    name: str
    run: Callable[[Ctx], dict[str, float | None]]
    metrics: list[Metric]
    prepare: Callable[[Ctx], None] | None = None
    heavy: bool = False  # gets Sizes.heavy_reps repetitions


def catalogue(s: Sizes) -> list[Workload]:
    seq, nf = human_size(s.seq), f"{s.files:,}"
    fs = "¹"  # footnote: fsync before close on non-atomicfs targets
    return [
        Workload("seq-write", seq_write, [
            Metric("seq-write", f"seq write {seq} (1 MiB writes) + close{fs}", "MB/s", True)],
            ),
        Workload("seq-read", seq_read, [
            Metric("seq-read-cold", f"seq read {seq}, cold cache", "MB/s", True),
            Metric("seq-read-warm", f"seq read {seq}, warm cache", "MB/s", True)],
            seq_read_prepare),
        Workload("rand-write", rand_write, [
            Metric("rand-write", f"{s.rand_writes:,} random 4 KiB overwrites in a "
                   f"{human_size(s.rand_file)} file + close{fs}", "writes/s", True)],
            rand_write_prepare),
        Workload("saves", saves, [
            Metric("small-saves", f"{nf} small-file saves (O_TRUNC, write 4 KiB, close)",
                   "saves/s", True),
            Metric("atomic-save", f"{nf} atomic saves by hand (tmp, fsync, rename, "
                   "fsync dir)", "saves/s", True)], saves_prepare, heavy=True),
        Workload("create-stat-unlink", create_stat_unlink, [
            Metric("create", f"create {nf} empty files", "files/s", True),
            Metric("stat", f"stat those {nf} files", "files/s", True),
            Metric("unlink", f"unlink those {nf} files", "files/s", True)]),
        Workload("latency", latency, [
            Metric("stat-cached", f"cached stat() latency ({s.stat_ops:,} calls)", "µs", False),
            Metric("open-close", f"open()+close() latency, read-only ({s.open_ops:,} calls)",
                   "µs", False)], latency_prepare),
        Workload("untar-rm", untar_rm, [
            Metric("untar", f"tar -x of a {s.tree_entries:,}-entry tree", "entries/s", True),
            Metric("rm-rf", "rm -rf of that tree", "entries/s", True)], heavy=True),
        Workload("commit", commit, [
            Metric("commit-big", f"{s.commit_writes} random 4 KiB pwrites + close, "
                   f"{human_size(s.big)} file{fs}", "ms", False),
            Metric("commit-big-close", f"close alone, {human_size(s.big)} file{fs}", "ms", False),
            Metric("commit-small", f"{s.commit_writes} random 4 KiB pwrites + close, "
                   f"{human_size(s.small)} file{fs}", "ms", False),
            Metric("commit-small-close", f"close alone, {human_size(s.small)} file{fs}", "ms",
                   False)],
            commit_prepare),
    ]


@dataclass(frozen=True)
class Goal:
    text: str
    num: tuple[str, str]      # (metric, target): the measured one
    den: tuple[str, str]      # (metric, target): what it is compared with
    minimum: float            # speed ratio num/den (latencies inverted) must reach this
    source: str


GOALS = [
    Goal("small-file saves, atomicfs full vs hand-written atomic save on raw",
         ("small-saves", "atomicfs-full"), ("atomic-save", "raw"), 0.6, ""),
    Goal("small-file saves, atomicfs batch vs hand-written atomic save on raw",
         ("small-saves", "atomicfs-batch"), ("atomic-save", "raw"), 1.5, ""),
    Goal("seq write + close, atomicfs full vs raw write + fsync",
         ("seq-write", "atomicfs-full"), ("seq-write", "raw"), 0.5, ""),
    Goal("seq read cold, atomicfs full vs raw",
         ("seq-read-cold", "atomicfs-full"), ("seq-read-cold", "raw"), 0.8, ""),
    Goal("random 4 KiB writes, atomicfs full vs raw",
         ("rand-write", "atomicfs-full"), ("rand-write", "raw"), 0.15, ""),
    Goal("cached stat, atomicfs full vs bindfs (≤ 1.5× its latency)",
         ("stat-cached", "atomicfs-full"), ("stat-cached", "bindfs"), 1 / 1.5, ""),
    Goal("open+close, atomicfs full vs bindfs (≤ 2× its latency)",
         ("open-close", "atomicfs-full"), ("open-close", "bindfs"), 0.5, ""),
    Goal("small-file saves, atomicfs batch vs the plain pyfuse3 passthrough",
         ("small-saves", "atomicfs-batch"), ("small-saves", "pyfuse3"), 0.8, ""),
    Goal("a program's own atomic save, atomicfs full vs the same on raw",
         ("atomic-save", "atomicfs-full"), ("atomic-save", "raw"), 0.6, ""),
    Goal("untar with every file committed durably, atomicfs full vs raw",
         ("untar", "atomicfs-full"), ("untar", "raw"), 0.3, ""),
    Goal("commit of 64×4 KiB, close in the big file vs in the 1 MiB file, atomicfs full "
         "(≤ 2× its cost)",
         ("commit-big-close", "atomicfs-full"), ("commit-small-close", "atomicfs-full"), 0.5,
         "docs/semantics.md §6"),
]


# ---------------------------------------------------------------------------
# the tree for untar / rm -rf

def build_tarball(workdir: Path, entries: int) -> tuple[Path, str]:
    out = workdir / f"tree-{entries}.tar"
    candidates = sorted(Path("/usr/lib").glob("python3.[0-9]*"), reverse=True)
    candidates += [Path("/usr/share/doc"), Path(sysconfig.get_paths()["stdlib"])]
    for top in candidates:
        if not top.is_dir():
            continue
        picked: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            here = Path(dirpath)
            picked.append(here)
            for name in sorted(filenames):
                p = here / name
                if p.is_symlink() or p.is_file():
                    picked.append(p)
            if len(picked) >= entries:
                break
        if len(picked) < entries:
            continue
        picked = picked[:entries]
        if not out.exists():
            tmp = out.with_suffix(".tmp")
            with tarfile.open(tmp, "w") as tar:
                for p in picked:
                    tar.add(p, arcname=str(p.relative_to(top.parent)), recursive=False)
            tmp.rename(out)
        return out, f"{entries} entries from {top}"
    # nothing suitable on this machine: a synthetic tree of small files
    if not out.exists():
        src = workdir / "synthetic-tree"
        rng = random.Random(1)
        made = 1
        src.mkdir(exist_ok=True)
        d = src
        while made < entries:
            if made % 20 == 1:
                d = src / f"d{made}"
                d.mkdir()
            else:
                (d / f"f{made}").write_bytes(os.urandom(rng.randrange(100, 40000)))
            made += 1
        tmp = out.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tar:
            tar.add(src, arcname="synthetic-tree")
        tmp.rename(out)
        shutil.rmtree(src)
    return out, f"{entries} synthetic entries"


# ---------------------------------------------------------------------------
# results

@dataclass
class Cell:
    samples: list[float] = field(default_factory=list)
    reps: list[int] = field(default_factory=list)  # the repetition of each sample
    failure: str | None = None
    skipped: str | None = None

    @property
    def median(self) -> float | None:
        if self.failure or self.skipped or not self.samples:
            return None
        return statistics.median(self.samples)


def speed_ratio(metric: Metric, value: float | None, base: float | None) -> float | None:
    """How fast ``value`` is relative to ``base`` (1 = as fast; 0.5 = half as fast)."""
    if value is None or base is None or value <= 0 or base <= 0:
        return None
    return value / base if metric.higher_is_better else base / value


def fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}×" if r >= 0.095 else f"{r:.2g}×"


class Results:
    def __init__(self, targets: list[str], workloads: list[Workload]) -> None:
        self.targets = targets
        self.workloads = workloads
        self.cells: dict[tuple[str, str], Cell] = {
            (m.key, t): Cell() for w in workloads for m in w.metrics for t in targets}
        self.notes: list[str] = []
        self.failures: list[str] = []

    def metrics(self) -> Iterator[tuple[Workload, Metric]]:
        for w in self.workloads:
            for m in w.metrics:
                yield w, m

    def metric(self, key: str) -> Metric | None:
        return next((m for _, m in self.metrics() if m.key == key), None)

    def median(self, key: str, target: str) -> float | None:
        cell = self.cells.get((key, target))
        return cell.median if cell else None

    def paired_ratio(self, m: Metric, num: tuple[str, str],
                     den: tuple[str, str]) -> float | None:
        """Median over repetitions of the speed ratio num/den within each repetition.

        Within one repetition the targets run back to back, so the machine's
        drift (other load, the disk's mood) cancels out of each ratio.
        """
        a, b = self.cells.get(num), self.cells.get(den)
        if a is None or b is None or a.median is None or b.median is None:
            return None
        base = dict(zip(b.reps, b.samples, strict=True))
        ratios = [speed_ratio(m, v, base[r]) for r, v in zip(a.reps, a.samples, strict=True)
                  if r in base]
        valid = [x for x in ratios if x is not None]
        return statistics.median(valid) if valid else None

    def ratio(self, m: Metric, target: str) -> float | None:
        if "raw" not in self.targets:
            return None
        return self.paired_ratio(m, (m.key, target), (m.key, "raw"))

    def baseline_lines(self) -> list[str]:
        """--baseline: each atomicfs target against its @NAME twins, repetition by
        repetition (>1: this checkout is faster)."""
        lines = []
        for _, m in self.metrics():
            for t, twin in ((t, u) for t in self.targets for u in self.targets
                            if u.startswith(t + "@")):
                a, b = self.cells.get((m.key, t)), self.cells.get((m.key, twin))
                if a is None or b is None:
                    continue
                base = dict(zip(b.reps, b.samples, strict=True))
                ratios = sorted(r for rep, v in zip(a.reps, a.samples, strict=True)
                                if rep in base and (r := speed_ratio(m, v, base[rep])))
                if ratios:
                    wins = sum(r > 1 for r in ratios)
                    lines.append(f"{m.key}, {t} vs {twin}: {statistics.median(ratios):.3f}× "
                                 f"(repetitions {ratios[0]:.2f}-{ratios[-1]:.2f}×, faster in "
                                 f"{wins} of {len(ratios)})")
        return lines

    def goal_lines(self) -> list[str]:
        lines = []
        for g in GOALS:
            m_num = self.metric(g.num[0])
            a, b = self.median(*g.num), self.median(*g.den)
            head = f"{g.text}: "
            r = None if m_num is None else self.paired_ratio(m_num, g.num, g.den)
            if m_num is None or a is None or b is None or r is None:
                lines.append(head + f"not measured in this run (target ≥ {g.minimum:.2g}×)"
                             + (f" [{g.source}]" if g.source else ""))
                continue
            verdict = "met" if r >= g.minimum else "NOT MET"
            lines.append(head + f"{fmt_ratio(r)} (target ≥ {g.minimum:.2g}×): {verdict} "
                         f"[{fmt(a)} vs {fmt(b)} {m_num.unit}"
                         + (f"; {g.source}]" if g.source else "]"))
        return lines

    def table(self) -> str:
        head = ["workload", "unit"] + self.targets
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * len(self.targets)]
        for _, m in self.metrics():
            unit = f"{m.unit} {'↑' if m.higher_is_better else '↓'}"
            cells = []
            for t in self.targets:
                c = self.cells[(m.key, t)]
                if c.failure:
                    cells.append("FAILED")
                elif c.skipped:
                    cells.append("skipped")
                elif c.median is None:
                    cells.append("—")
                else:
                    r = self.ratio(m, t)
                    cells.append(fmt(c.median) if t == "raw" or r is None
                                 else f"{fmt(c.median)} ({fmt_ratio(r)})")
            rows.append("| " + " | ".join([m.label, unit] + cells) + " |")
        return "\n".join(rows)

    def complete(self) -> bool:
        return not self.failures and all(
            c.median is not None or c.skipped for c in self.cells.values())

    def to_json(self, meta: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"meta": meta, "targets": self.targets, "metrics": [],
                               "goals": self.goal_lines(), "notes": self.notes,
                               "failures": self.failures}
        for w, m in self.metrics():
            entry: dict[str, Any] = {"workload": w.name, "key": m.key, "label": m.label,
                                     "unit": m.unit, "higher_is_better": m.higher_is_better,
                                     "results": {}}
            for t in self.targets:
                c = self.cells[(m.key, t)]
                entry["results"][t] = {"samples": c.samples, "reps": c.reps,
                                       "median": c.median,
                                       "ratio_to_raw": self.ratio(m, t),
                                       "failure": c.failure, "skipped": c.skipped}
            out["metrics"].append(entry)
        return out


def plot(results: Results, path: Path, title: str) -> str:
    try:
        import matplotlib
    except ImportError:
        return (f"plot skipped: matplotlib is not installed for {sys.executable} "
                f"({sys.executable} -m pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [t for t in results.targets if t != "raw"]
    metrics = [m for _, m in results.metrics()]
    if not others or "raw" not in results.targets:
        return "plot skipped: it shows ratios to raw, and raw or the others were not run"
    fig, ax = plt.subplots(figsize=(12, 0.16 * len(metrics) * (len(others) + 1) + 1.8))
    height = 0.8 / len(others)
    for i, t in enumerate(others):
        ys, xs = [], []
        for j, m in enumerate(metrics):
            r = results.ratio(m, t)
            if r is not None:
                ys.append(j + i * height)
                xs.append(r)
        ax.barh(ys, xs, height=height, label=t)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(metrics))])
    ax.set_yticklabels([m.label.replace("¹", "") for m in metrics], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed relative to raw (log scale; 1 = as fast as raw, right is faster)")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.grid(axis="x", which="both", linewidth=0.3, alpha=0.5)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=len(others))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


# ---------------------------------------------------------------------------
# the run

def install_peers() -> None:
    """The peers (Debian packages) and matplotlib for the plot (into this venv)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say("bench: installing matplotlib for the plot")
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", "matplotlib"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            say(f"bench: matplotlib not installed: {res.stderr.strip()[-200:]}")
    missing = [p for p in ("bindfs", "fuse-overlayfs") if shutil.which(p) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        say(f"bench: cannot install {' '.join(missing)} (needs root and apt-get)")
        return
    say(f"bench: installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            say(f"bench: apt-get install failed: {res.stderr.strip()[-500:]}")


def can_drop_caches() -> bool:
    try:
        _drop_caches()
        return True
    except OSError:
        return False


def tool_version(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (res.stdout or res.stderr).strip().splitlines()
    return text[0] if text else "?"


def collect_meta(args: argparse.Namespace, sizes: Sizes, workdir: Path,
                 tree: str) -> dict[str, Any]:
    commit = tool_version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), "status",
                            "--porcelain", "--", "atomicfs"], capture_output=True,
                           text=True).stdout.strip()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["scripts/bench", *sys.argv[1:]]),
        "mode": "quick" if args.quick else "full",
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "atomicfs_commit": commit + (" + uncommitted changes in atomicfs/" if dirty else ""),
        "bindfs": tool_version(["bindfs", "--version"]) if shutil.which("bindfs") else None,
        "fuse-overlayfs": (tool_version(["fuse-overlayfs", "--version"])
                           if shutil.which("fuse-overlayfs") else None),
        "baseline": collect_meta_baseline(args),
        "workdir": str(workdir),
        "workdir_fs": fs_of(workdir),
        "tree": tree,
        "sizes": {k: v for k, v in sizes.__dict__.items()},
    }


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sizes, run_dir: Path,
                 targets: list[Target], workloads: list[Workload], tarball: Path,
                 drop_ok: bool) -> None:
        self.args, self.sizes, self.run_dir = args, sizes, run_dir
        self.targets, self.workloads = targets, workloads
        self.tarball, self.drop_ok = tarball, drop_ok
        self.results = Results([t.name for t in targets], workloads)
        self.down: set[str] = set()  # targets that could not be (re)mounted
        self.seconds: dict[str, float] = {}  # wall time per workload

    def ctx(self, t: Target, w: Workload, rep: int) -> Ctx:
        return Ctx(t.root / w.name, t.durable_close, self.sizes, rep, self.tarball,
                   self.drop_ok)

    def step(self, t: Target, w: Workload, what: str, fn: Callable[[], Any],
             timeout: float) -> dict[str, float | None] | None:
        """Run one step; on any failure record it, restore the target, return None."""
        log_at = t.log_size()
        try:
            if not t.alive():
                raise TargetDown(f"{t.name} was not mounted before the step")
            out = run_in_child(fn, timeout, t.kill if t.is_fuse else lambda: None)
            problem = None
            if not t.alive():
                rc = t.proc.poll() if t.proc else None
                problem = (f"the {t.name} daemon exited (status {rc}) or its mount vanished "
                           "during the step")
        except StepTimeout as exc:
            problem = f"timed out: {exc}"
            out = None
        except StepError as exc:
            problem = f"error: {exc}"
            frames = [ln.strip() for ln in exc.details.splitlines()
                      if ln.strip().startswith('File "')]
            if frames:
                problem += f" (at {frames[-1]})"
            out = None
        except TargetDown as exc:
            problem, out = str(exc), None
        if problem is not None and t.is_fuse and t.proc is not None \
                and t.proc.poll() is not None and "daemon exited" not in problem:
            problem += f"; the {t.name} daemon had exited with status {t.proc.returncode}"
        log_lines = t.log_since(log_at).splitlines()
        for kind, pattern in (("error", LOG_BAD), ("warning", LOG_WARN)):
            logged = [ln for ln in log_lines if pattern.search(ln)]
            if logged:
                self.results.notes.append(
                    f"{t.name} logged {len(logged)} {kind} line(s) during {w.name} {what}; "
                    f"first: {logged[0].strip()[:300]}")
        if problem is None:
            return out
        msg = f"{w.name} on {t.name}, {what}: {problem}"
        if t.is_fuse:
            tail = t.log_since(log_at).strip().splitlines()[-3:]
            if tail:
                msg += " — daemon log tail: " + " | ".join(s.strip()[:200] for s in tail)
        self.results.failures.append(msg)
        say(f"bench: FAILED {msg}")
        if t.is_fuse and not t.alive():
            try:
                t.restart()
                self.results.notes.append(f"{t.name} was remounted after: {w.name} {what}")
            except Exception as exc:  # recorded; the suite goes on
                self.down.add(t.name)
                self.results.failures.append(f"{t.name} could not be remounted: {exc}")
        return None

    def run_workload(self, w: Workload) -> None:
        reps = self.args.reps or (self.sizes.heavy_reps if w.heavy else self.sizes.reps)
        started = time.monotonic()
        say(f"== {w.name} ({reps} repetitions, targets alternating)")
        live = []
        for t in self.targets:
            if t.name in self.down:
                for m in w.metrics:
                    self.results.cells[(m.key, t.name)].failure = "target down"
                continue
            ctx = self.ctx(t, w, 0)

            def prep(ctx: Ctx = ctx, w: Workload = w) -> None:
                ctx.root.mkdir()
                if w.prepare:
                    w.prepare(ctx)

            if self.step(t, w, "prepare", prep, self.sizes.prepare_timeout) is None:
                for m in w.metrics:
                    self.results.cells[(m.key, t.name)].failure = "prepare failed"
                continue
            live.append(t)
        for rep in range(reps):
            shift = rep % len(live) if live else 0
            for t in live[shift:] + live[:shift]:
                cells = [self.results.cells[(m.key, t.name)] for m in w.metrics]
                if any(c.failure for c in cells):
                    continue  # failed once: the rest of its repetitions would say nothing
                ctx = self.ctx(t, w, rep)
                out = self.step(t, w, f"repetition {rep + 1}",
                                functools.partial(w.run, ctx), self.sizes.timeout)
                if out is None:
                    for c in cells:
                        c.failure = f"repetition {rep + 1}"
                    continue
                shown = []
                for m, c in zip(w.metrics, cells, strict=True):
                    v = out.get(m.key)
                    if v is None:
                        c.skipped = "not measurable here"
                    else:
                        c.samples.append(v)
                        c.reps.append(rep)
                        shown.append(f"{m.key} {fmt(v)} {m.unit}")
                say(f"   rep {rep + 1} {t.name:15} " + ", ".join(shown))
        for t in live:
            ctx = self.ctx(t, w, 0)
            self.step(t, w, "cleanup", functools.partial(shutil.rmtree, ctx.root),
                      self.sizes.prepare_timeout)
        self.seconds[w.name] = round(time.monotonic() - started, 1)
        say(f"   ({self.seconds[w.name]:.0f}s)")

    def run(self) -> None:
        for w in self.workloads:
            self.run_workload(w)


def parse_args(argv: list[str]) -> argparse.Namespace:
    names = [w.name for w in catalogue(FULL)]
    p = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__.split("\n\n")[0],
        epilog=f"workloads: {', '.join(names)}\ntargets: {', '.join(ALL_TARGETS)}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: checks that the harness works, in seconds")
    p.add_argument("--only", metavar="W[,W...]", help="run only these workloads")
    p.add_argument("--targets", metavar="T[,T...]",
                   help="targets to run (default: every one available)")
    p.add_argument("--reps", type=int, help="repetitions per workload (default 5, 3 for "
                   "the slow ones; 3 with --quick)")
    p.add_argument("--workdir", type=Path,
                   help="where targets live (default: a fresh directory under /var/tmp, "
                        "removed at the end); must be disk-backed")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results",
                   help="results directory (default: bench-results/ in the checkout)")
    p.add_argument("--install-peers", action="store_true",
                   help="apt-get install bindfs and fuse-overlayfs, and pip install "
                        "matplotlib (for the plot), when missing")
    p.add_argument("--timeout", type=float,
                   help="seconds allowed per workload, target and repetition")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--paired", type=int, metavar="N",
                   help="instead of the workloads: N rounds of --explain's operations on "
                        "every atomicfs target (with --baseline: both builds), interleaved "
                        "one operation at a time (scripts/explain.py)")
    p.add_argument("--baseline", action="append", default=[], metavar="[NAME=]DIR",
                   help="also mount the atomicfs of checkout DIR (run by DIR/.venv) as "
                        "targets atomicfs-full@NAME and atomicfs-batch@NAME (NAME: base); "
                        "repeatable")
    p.add_argument("--explain", type=int, metavar="N", nargs="?", const=300,
                   help="instead of the workloads: the time budget of N operations of "
                        "each kind (default 300), phase by phase (scripts/explain.py)")
    args = p.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(names)
        if unknown:
            p.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    baselines: dict[str, Path] = {}
    for spec in args.baseline:
        name, _, path = spec.rpartition("=")
        name, where = name or "base", Path(path).resolve()
        if not re.fullmatch(r"\w+", name) or name in baselines:
            p.error(f"--baseline {spec}: NAME must be a word, once")
        if not (where / ".venv" / "bin" / "python").exists() or not (where / "atomicfs").is_dir():
            p.error(f"--baseline {spec}: not a checkout with its own .venv "
                    "(run ./scripts/test --version in it)")
        baselines[name] = where
    args.baseline = baselines
    if args.targets:
        unknown = set(args.targets.split(",")) - set(known_targets(args))
        if unknown:
            p.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def known_targets(args: argparse.Namespace) -> tuple[str, ...]:
    return ALL_TARGETS + tuple(f"{t}@{name}" for name in args.baseline
                               for t in ATOMICFS_TARGETS)


def choose_targets(args: argparse.Namespace, notes: list[str]) -> list[str]:
    known = known_targets(args)
    wanted = args.targets.split(",") if args.targets else list(known)
    chosen = []
    fuse_ok = os.path.exists("/dev/fuse") and shutil.which(fusermount())
    for name in known:
        if name not in wanted:
            continue
        tool = {"bindfs": "bindfs", "fuse-overlayfs": "fuse-overlayfs"}.get(name)
        if name != "raw" and not fuse_ok:
            msg = f"{name}: skipped, no /dev/fuse or fusermount"
        elif tool and shutil.which(tool) is None:
            msg = f"{name}: skipped, not installed (scripts/bench --install-peers installs it)"
        else:
            chosen.append(name)
            continue
        if args.targets:
            sys.exit(f"bench: error: {msg}")
        notes.append(msg)
    return chosen


def make_target(name: str, base: Path, args: argparse.Namespace) -> Target:
    """A target; an ``@NAME`` one runs that --baseline checkout with its own venv."""
    if "@" in name:
        checkout = args.baseline[name.split("@", 1)[1]]
        return Target(name, base, python=str(checkout / ".venv" / "bin" / "python"),
                      checkout=checkout)
    return Target(name, base)


def run_explain(args: argparse.Namespace, target_names: list[str]) -> int:
    """``--explain N``: the phase-by-phase budget of each atomicfs target."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import explain

    workdir = Path(tempfile.mkdtemp(prefix="atomicfs-explain-", dir="/var/tmp")) \
        if args.workdir is None else args.workdir.resolve()
    lines = ["# Where the time goes", "",
             f"`scripts/bench --explain {args.explain}`, {datetime.date.today()}, "
             f"work dir on {fs_of(workdir)}. Phases are consecutive marks on one "
             "clock: the program's system calls, the daemon's request handlers, the "
             "steps of a commit and the hand-offs to worker threads "
             "(atomicfs/timing.py).", ""]
    status = 0
    for name in target_names:
        target = make_target(name, workdir / name, args)
        marks = workdir / f"marks-{name}.jsonl"
        os.environ["ATOMICFS_TIMING"] = str(marks)
        try:
            target.start()
            explain.prepare(target.root, args.explain)
            streams = explain.drive(target.root, args.explain)
            problem = target.stop()
        finally:
            target.kill()
            del os.environ["ATOMICFS_TIMING"]
        if problem or not marks.exists():
            say(f"bench: {name}: {problem or 'the daemon wrote no timing marks'}")
            status = 3
            continue
        lines += explain.explain(target.root, marks, streams, name)
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "explain.md").write_text(text)
    print(text)
    if args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


def run_paired(args: argparse.Namespace, target_names: list[str]) -> int:
    """``--paired N``: builds compared operation by operation (explain.paired)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import explain

    workdir = Path(tempfile.mkdtemp(prefix="atomicfs-paired-", dir="/var/tmp")) \
        if args.workdir is None else args.workdir.resolve()
    targets = [make_target(n, workdir / n, args) for n in target_names]
    status = 0
    try:
        for t in targets:
            t.start()
            explain.prepare(t.root, args.paired)
        lines = [f"# Side by side, operation by operation ({args.paired} rounds)", "",
                 f"`{' '.join(['scripts/bench', *sys.argv[1:]])}`, {datetime.date.today()}, "
                 f"work dir on {fs_of(workdir)}; {collect_meta_baseline(args)}", ""]
        lines += explain.paired({t.name: t.root for t in targets}, args.paired)
    finally:
        for t in targets:
            problem = t.stop()
            if problem:
                say(f"bench: {t.name}: {problem}")
                status = 3
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paired.md").write_text(text)
    print(text)
    if args.workdir is None and not args.keep and not mounts_under(workdir):
        shutil.rmtree(workdir, ignore_errors=True)
    return status


def collect_meta_baseline(args: argparse.Namespace) -> str:
    return ", ".join(f"@{name}: {path} at " + tool_version(
        ["git", "-C", str(path), "rev-parse", "--short", "HEAD"])
        for name, path in args.baseline.items()) or "no baseline"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.timeout:
        sizes = Sizes(**{**sizes.__dict__, "timeout": args.timeout,
                         "prepare_timeout": max(args.timeout, sizes.prepare_timeout)})
    if args.install_peers:
        install_peers()
    notes: list[str] = []
    target_names = choose_targets(args, notes)
    if args.paired is not None:
        return run_paired(args, [n for n in target_names if n.startswith("atomicfs")])
    if args.explain is not None:
        return run_explain(args, [n for n in target_names if n.startswith("atomicfs")])
    made_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="atomicfs-bench-", dir="/var/tmp")) \
        if made_workdir else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    fstype = fs_of(workdir)
    if fstype in ("tmpfs", "ramfs") or fstype.startswith("fuse"):
        say(f"bench: warning: {workdir} is on {fstype}, not a disk filesystem")
        notes.append(f"the work dir is on {fstype}: durability costs are not a disk's")
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    tarball, tree = build_tarball(workdir, sizes.tree_entries)
    drop_ok = can_drop_caches()
    if not drop_ok:
        notes.append("cold-cache read skipped: writing /proc/sys/vm/drop_caches is not "
                     "permitted (run as root)")
    workloads = catalogue(sizes)
    if args.only:
        only = args.only.split(",")
        workloads = [w for w in workloads if w.name in only]
    targets = [make_target(n, run_dir / n, args) for n in target_names]
    meta = collect_meta(args, sizes, workdir, tree)
    say(f"bench: {meta['mode']} run, targets {', '.join(target_names)}; work dir {run_dir} "
        f"({fstype})")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    started = time.monotonic()
    bench = Bench(args, sizes, run_dir, targets, workloads, tarball, drop_ok)
    bench.results.notes[:0] = notes
    interrupted = False
    try:
        for t in targets:
            t.start()
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        say("bench: interrupted; unmounting")
    finally:
        for t in targets:
            log_at = t.log_size()
            try:
                problem = t.stop()
            except BaseException as exc:  # unmount the others too
                problem = f"unmount raised {exc!r}"
                t.kill()
            if problem:
                bench.results.failures.append(f"{t.name} at unmount: {problem}")
                say(f"bench: {t.name} at unmount: {problem}")
            bad = [ln for ln in t.log_since(log_at).splitlines() if LOG_BAD.search(ln)]
            if bad:
                bench.results.notes.append(f"{t.name} logged {len(bad)} error line(s) at "
                                           f"unmount; first: {bad[0].strip()[:300]}")
        save_logs(args.out, targets)
        left = mounts_under(run_dir)
        if left:
            say(f"bench: mounts left behind, not removing {workdir}: {', '.join(left)}")
        elif not args.keep:
            shutil.rmtree(workdir if made_workdir else run_dir, ignore_errors=True)
    elapsed = time.monotonic() - started
    meta["elapsed_s"] = round(elapsed, 1)
    meta["interrupted"] = interrupted
    meta["workload_seconds"] = bench.seconds
    write_results(args.out, bench.results, meta)
    return 130 if interrupted else (0 if bench.results.complete() else 3)


def save_logs(out: Path, targets: list[Target]) -> None:
    """Keep the daemons' logs (the work dir goes away) in OUT/logs/."""
    logs = out / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    for t in targets:
        if t.is_fuse and t.log_path.exists():
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(t.log_path, logs / f"{t.name}.log")


def write_results(out: Path, results: Results, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    title = (f"atomicfs bench ({meta['mode']}) {meta['date']}, atomicfs {meta['atomicfs_commit']}"
             f", kernel {meta['kernel']}, {meta['cpus']} CPUs, work dir on {meta['workdir_fs']}")
    plot_note = plot(results, out / "results.png", title.replace(", kernel", ",\nkernel"))
    goals = results.goal_lines()
    md = [f"# {title}", "", f"`{meta['command']}`", "",
          "Medians of the repetitions. In parentheses the speed relative to raw "
          "(1.00× = as fast as raw, 0.25× = 4× slower): the median of the per-repetition "
          "ratios, each taken between targets run back to back in that repetition (targets "
          "alternate, the order rotating). MB = 10⁶ bytes.", "",
          results.table(), "",
          "¹ On raw, bindfs and fuse-overlayfs these write workloads fsync before close, "
          "since atomicfs commits durably at close; 'close' there is fsync + close. "
          "Small-file saves, create and untar are plain (no fsync) everywhere but atomicfs.",
          "", "## Targets checked", ""]
    md += ["Ratios as in the table (per repetition, then the median); the numbers in "
           "brackets are the two medians.", ""] + [f"- {g}" for g in goals]
    against_base = results.baseline_lines()
    if against_base:
        md += ["", f"## Against the baseline ({meta['baseline']})", ""] + \
            [f"- {line}" for line in against_base]
    if results.failures:
        md += ["", "## Failures", ""] + [f"- {f}" for f in results.failures]
    per = ", ".join(f"{k} {v:.0f}s" for k, v in meta["workload_seconds"].items())
    if (out / "logs").is_dir():
        plot_note += f"; daemon logs: {out / 'logs'}/"
    notes = results.notes + [plot_note, f"elapsed {meta['elapsed_s']}s ({per}); "
                             f"untar tree: {meta['tree']}"]
    if meta["interrupted"]:
        notes.insert(0, "INTERRUPTED: results are partial")
    md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    text = "\n".join(md) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results.to_json(meta), indent=1) + "\n")
    print(text)
    print(f"results: {out / 'results.md'}, {out / 'results.json'}"
          + (f", {out / 'results.png'}" if (out / "results.png").exists()
             and plot_note.startswith("plot:") else ""))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

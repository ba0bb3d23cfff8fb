"""A developer tool, not used by the daemon: one atomicfs daemon run in the
foreground on a SOURCE and a MOUNTPOINT, for the tests, the torture and the
bench.

:class:`Daemon` starts ``python -m atomicfs mount -f SOURCE MOUNTPOINT -o
OPTIONS`` with the package of a given checkout first on ``PYTHONPATH`` (its
working directory too, since ``python -m`` puts that first on ``sys.path``), an
environment of its own (fault points, timing, knobs) and its output appended to
a log file; waits until the mount is there (or fails with the log); unmounts
cleanly and waits for the daemon; or kills it by pid and detaches the dead
mount.  It only ever signals the process it started.

The tests (``tests/conftest.py`` ``Mount``), ``scripts/torture.py``, the
power-cut kit and ``scripts/bench.py`` all use it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from atomicfs.mounttable import top_fstype

FSTYPE = "fuse.atomicfs"
FUSERMOUNT = "fusermount3"
# the checkout this module was imported from: the default code a daemon runs
CHECKOUT = Path(__file__).resolve().parent.parent


class HarnessError(RuntimeError):
    """A daemon that did not mount, unmount, exit or detach as asked."""


def mounted_fstype(path: Path | str) -> str | None:
    """fstype of the topmost mount exactly at ``path`` (reads mountinfo, never stats it)."""
    return top_fstype(os.path.realpath(path))


def detach(mountpoint: Path | str, tries: int = 100) -> None:
    """Lazily unmount the atomicfs mount at ``mountpoint`` (a dead one too) until none is
    left there; raises :class:`HarnessError` if it stays."""
    for _ in range(tries):
        if mounted_fstype(mountpoint) != FSTYPE:
            return
        subprocess.run([FUSERMOUNT, "-uz", str(mountpoint)], capture_output=True)
        if mounted_fstype(mountpoint) != FSTYPE:
            return
        time.sleep(0.05)
    raise HarnessError(f"could not detach {mountpoint}")


def daemon_env(code: Path, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with ``code`` first on PYTHONPATH and ``extra`` applied
    (a value of None removes the variable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(code) + os.pathsep + env.get("PYTHONPATH", "")
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@dataclass
class Daemon:
    """One atomicfs daemon in the foreground (``mount -f``), started by :meth:`start`."""

    source: Path
    mountpoint: Path
    options: Sequence[str]
    log_path: Path
    env: Mapping[str, str | None] | None = None  # on top of this process's environment
    prefix: Sequence[str] = ()  # runs the daemon under this command (e.g. setpriv ...)
    code: Path | None = None  # the directory holding the atomicfs package to run
    python: str = sys.executable
    new_session: bool = False  # a session of its own: a terminal's Ctrl-C does not reach it
    proc: subprocess.Popen[bytes] | None = None

    @property
    def code_dir(self) -> Path:
        return self.code if self.code is not None else CHECKOUT

    def command(self) -> list[str]:
        cmd = [*self.prefix, self.python, "-m", "atomicfs", "mount", "-f", str(self.source),
               str(self.mountpoint)]
        if self.options:
            cmd += ["-o", ",".join(self.options)]
        return cmd

    # -- lifecycle ---------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        """Start the daemon and wait until the mount answers; on failure the daemon is
        killed and :class:`HarnessError` carries the log."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env=daemon_env(self.code_dir, self.env),
                                         stdin=subprocess.DEVNULL, cwd=self.code_dir,
                                         start_new_session=self.new_session)
        deadline = time.monotonic() + timeout
        while not self.mounted():
            if self.proc.poll() is not None:
                raise HarnessError(f"atomicfs exited with {self.proc.returncode} at mount; "
                                   f"log {self.log_path}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise HarnessError(f"mount did not appear in {timeout:.0f}s; "
                                   f"log {self.log_path}:\n{self.log()}")
            time.sleep(0.01)
        os.stat(self.mountpoint)  # the first request: INIT has been answered

    def mounted(self) -> bool:
        return mounted_fstype(self.mountpoint) == FSTYPE

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def unmount(self, timeout: float = 30.0) -> int | None:
        """Clean unmount (``fusermount3 -u``, retried while busy); waits for the daemon and
        returns its exit status (None if none was started).  Raises
        :class:`HarnessError` if the mount does not go, or the daemon does not exit
        (then it is killed and the mount detached)."""
        deadline = time.monotonic() + timeout
        while self.mounted():
            res = subprocess.run([FUSERMOUNT, "-u", str(self.mountpoint)],
                                 capture_output=True, text=True)
            if res.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise HarnessError(f"unmount failed: {res.stderr.strip()}")
            time.sleep(0.05)
        if self.proc is None:
            return None
        try:
            rc = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise HarnessError(f"the daemon did not exit within {timeout:.0f}s of the "
                               "unmount") from None
        self.proc = None
        return rc

    def kill(self) -> None:
        """kill -9 the daemon (a crash), reap it, and lazily detach its dead mount."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        detach(self.mountpoint)

    # -- the daemon's log ----------------------------------------------------------
    def log(self) -> str:
        return self.log_since(0)

    def log_size(self) -> int:
        return log_size(self.log_path)

    def log_since(self, offset: int) -> str:
        """The log from byte ``offset`` on (see :meth:`log_size`)."""
        return log_since(self.log_path, offset)


def log_size(path: Path) -> int:
    """Bytes in a log file so far (0 before it exists)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def log_since(path: Path, offset: int) -> str:
    """A log file from byte ``offset`` on ("" before it exists)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


# -- driven child processes -------------------------------------------------------------
CHILD_TIMEOUT = 20  # seconds a driven child may take to end once its input is closed

_READER = r"""
import os, sys
for line in sys.stdin:
    try:
        fd = os.open(line.rstrip("\n"), os.O_RDONLY)
        try:
            data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        finally:
            os.close(fd)
        sys.stdout.write("ok " + data.hex() + "\n")
    except OSError as exc:
        sys.stdout.write("err %d\n" % exc.errno)
    sys.stdout.flush()
"""


class ChildProcess:
    """A Python child driven line by line through its stdin and stdout (``script``:
    its code); closed (and killed if it does not end) on close or at ``with`` exit."""

    def __init__(self, script: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=CHILD_TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReaderProcess(ChildProcess):
    """Another process that opens, reads (all of it) and closes a file on request.

    Start it *before* opening a file for writing: every fork+exec while a written
    descriptor is open closes the child's copy at exec, which sends a FLUSH for
    the writer's open file (a commit point).
    """

    def __init__(self) -> None:
        super().__init__(_READER)

    def read(self, path: Path) -> bytes:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer.startswith("ok "):
            raise OSError(int(answer.split()[1]) if answer else 5, f"reader: {answer!r}")
        return bytes.fromhex(answer[3:].strip())

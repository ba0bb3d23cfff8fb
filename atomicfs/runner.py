"""``atomicfs run MOUNTPOINT [--] CMD [ARGS...]``: run CMD as one transaction.

The runner forks; the child (the transaction's *root*) waits on a pipe until the
parent has begun the transaction for it, then execs CMD.  The parent waits for
CMD's exit status: 0 commits, anything else (a non-zero status, a signal)
aborts.  The requests to the daemon are getxattr calls on the mount's root
with reserved names (``user.atomicfs.tx.begin:PID``, ``...commit:PID``,
``...abort:PID``); the daemon checks that the caller is PID's parent.

Exit status: CMD's own status (128+N if a signal N killed it); 125 when the
transaction could not be begun or committed (one line on stderr says why:
nothing of CMD's changes was applied); 126 when CMD could not be run, 127 when
it was not found.  If the runner dies, the daemon aborts the transaction, and
CMD is killed (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .transactions import CONTROL_PREFIX

FAILED = 125  # the transaction could not be begun or committed
CANNOT_RUN = 126
NOT_FOUND = 127
PR_SET_PDEATHSIG = 1


class RunError(Exception):
    pass


def _request(mountpoint: str, verb: str, pid: int) -> dict[str, Any]:
    name = f"{CONTROL_PREFIX}{verb}:{pid}"
    try:
        raw = os.getxattr(mountpoint, name)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            raise RunError(f"{mountpoint!r} is not an atomicfs mount with transactions") from None
        raise RunError(f"the daemon refused to {verb} the transaction: "
                       f"{os.strerror(exc.errno or errno.EIO)}") from None
    try:
        result: dict[str, Any] = json.loads(raw)
    except ValueError:
        raise RunError(f"the daemon's answer to {verb} was not understood") from None
    return result


def _child(read_fd: int, argv: Sequence[str]) -> None:
    """In the forked child: die with the runner, wait for the go, exec CMD."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:  # the runner died already
            os._exit(FAILED)
        go = os.read(read_fd, 1)
        os.close(read_fd)
        if go != b"g":
            os._exit(FAILED)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        try:
            os.execvp(argv[0], list(argv))
        except FileNotFoundError:
            print(f"atomicfs run: {argv[0]}: command not found", file=sys.stderr)
            os._exit(NOT_FOUND)
        except OSError as exc:
            print(f"atomicfs run: {argv[0]}: {exc.strerror}", file=sys.stderr)
            os._exit(CANNOT_RUN)
    finally:
        os._exit(CANNOT_RUN)


def run(mountpoint: str, argv: Sequence[str]) -> int:
    """Run ``argv`` as one transaction on ``mountpoint``; returns the exit status."""
    if not argv:
        raise RunError("no command given")
    mountpoint = os.path.abspath(mountpoint)
    if not os.path.ismount(mountpoint):
        raise RunError(f"{mountpoint!r} is not a mount point")
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        _child(read_fd, argv)
    os.close(read_fd)
    # the terminal's ^C and ^\ go to CMD; CMD's status decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    try:
        _request(mountpoint, "begin", pid)
    except RunError:
        os.close(write_fd)  # the child exits without running CMD
        os.waitpid(pid, 0)
        raise
    os.write(write_fd, b"g")
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code
    if code != 0:
        _request(mountpoint, "abort", pid)
        return code
    result = _request(mountpoint, "commit", pid)
    if not result.get("ok"):
        why = result.get("error") or result.get("aborted") or "unknown reason"
        print(f"atomicfs run: the transaction was not committed: {why}", file=sys.stderr)
        return FAILED
    if result.get("warning"):
        print(f"atomicfs run: {result['warning']}", file=sys.stderr)
        return FAILED
    return 0

"""Test-only fault injection, switched on by the ATOMICFS_FAULTS environment variable.

``ATOMICFS_FAULTS`` holds comma-separated ``action:point`` items:
- ``raise:POINT``: raise RuntimeError when POINT is reached (a stand-in for a
  bug in a request handler; handler points are the handler names);
- ``exit:POINT``: end the daemon at once with ``os._exit(99)`` (a crash, as
  kill -9 would, at an exact step of a commit or of recovery);
- ``fail:POINT:ERRNO``: raise ``OSError(ERRNO)`` (e.g. ``fail:commit.before_fsync:ENOSPC``),
  a failing disk at that step;
- ``sleep:POINT:SECONDS``: wait that long at POINT (a slow commit; commit
  points run in a worker thread, so the daemon keeps serving meanwhile).
Unset (the normal case), :func:`point` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import errno
import os
import time

from . import timing

_ACTIONS: dict[str, tuple[str, str]] = {}
_USAGE = "want raise:POINT, exit:POINT, fail:POINT:ERRNO or sleep:POINT:SECONDS"


def load(spec: str | None = None) -> None:
    _ACTIONS.clear()
    spec = os.environ.get("ATOMICFS_FAULTS", "") if spec is None else spec
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action, _, rest = item.partition(":")
        where, _, arg = rest.partition(":") if action in ("fail", "sleep") else (rest, "", "")
        ok = bool(where) and (
            action in ("raise", "exit")
            or (action == "fail" and hasattr(errno, arg))
            or (action == "sleep" and arg.replace(".", "", 1).isdigit()))
        if not ok:
            raise ValueError(f"bad ATOMICFS_FAULTS item {item!r} ({_USAGE})")
        _ACTIONS[where] = (action, arg)


def point(name: str) -> None:
    timing.mark(name)  # the steps of a commit, for scripts/bench --explain
    if not _ACTIONS:
        return
    action, arg = _ACTIONS.get(name, ("", ""))
    if action == "raise":
        raise RuntimeError(f"fault injected at {name}")
    if action == "exit":
        os._exit(99)
    if action == "fail":
        code = getattr(errno, arg)
        raise OSError(code, f"{os.strerror(code)} (fault injected at {name})")
    if action == "sleep":
        time.sleep(float(arg))


load()

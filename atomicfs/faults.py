"""Test-only fault injection, switched on by the ATOMICFS_FAULTS environment variable.

``ATOMICFS_FAULTS`` holds comma-separated ``action:point`` items:
- ``raise:POINT``: raise RuntimeError when POINT is reached (a stand-in for a
  bug in a request handler; handler points are the handler names);
- ``exit:POINT``: end the daemon at once with ``os._exit(99)`` (a crash, as
  kill -9 would, at an exact step of a commit or of recovery).
Unset (the normal case), :func:`point` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os

_ACTIONS: dict[str, str] = {}


def load(spec: str | None = None) -> None:
    _ACTIONS.clear()
    spec = os.environ.get("ATOMICFS_FAULTS", "") if spec is None else spec
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action, _, where = item.partition(":")
        if action not in ("raise", "exit") or not where:
            raise ValueError(f"bad ATOMICFS_FAULTS item {item!r} (want raise:POINT or exit:POINT)")
        _ACTIONS[where] = action


def point(name: str) -> None:
    if not _ACTIONS:
        return
    action = _ACTIONS.get(name)
    if action == "raise":
        raise RuntimeError(f"fault injected at {name}")
    if action == "exit":
        os._exit(99)


load()

"""Where a request's time goes: timestamped marks, for ``scripts/bench --explain``.

Off unless ``ATOMICFS_TIMING=FILE`` is set in the daemon's environment (then
:func:`mark` costs one ``None`` test).  When on, the daemon records:

- ``req`` / ``reply`` at the start and end of every request handler;
- every fault point (:mod:`atomicfs.faults`) passed, which name the steps of a
  commit (``commit.before_fsync``, ``commit.after_rename``...);
- for every call of ``trio.to_thread.run_sync``: the hand-off (``handoff``),
  the start and end of the work in the worker thread (``thread``,
  ``thread-end``) and the return to the event loop (``resumed``).

Each mark is ``(CLOCK_MONOTONIC ns, request number, request name, what)``;
the request number follows the work into worker threads (a context variable,
which trio copies into them).  The marks are written to FILE as JSON lines
when the daemon stops (:func:`dump`).  CLOCK_MONOTONIC is one clock for the
whole machine, so a program driving the mount can put its own system calls on
the same time line.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
from collections.abc import Callable
from typing import Any

import trio

Mark = tuple[int, int, str, str]

_MARKS: list[Mark] | None = None
_FILE = ""
_REQUEST: contextvars.ContextVar[tuple[int, str]] = contextvars.ContextVar(
    "atomicfs_request", default=(0, ""))
_next_request = 0


def install(path: str | None = None) -> None:
    """Switch recording on if ``ATOMICFS_TIMING`` (or ``path``) names a file."""
    global _MARKS, _FILE
    path = os.environ.get("ATOMICFS_TIMING", "") if path is None else path
    if not path or _MARKS is not None:
        return
    _MARKS, _FILE = [], path
    original = trio.to_thread.run_sync

    async def run_sync(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        name = getattr(fn, "__name__", "work")
        mark(f"handoff:{name}")

        def in_thread(*a: Any) -> Any:
            mark(f"thread:{name}")
            try:
                return fn(*a)
            finally:
                mark(f"thread-end:{name}")

        try:
            return await original(in_thread, *args, **kwargs)
        finally:
            mark(f"resumed:{name}")

    trio.to_thread.run_sync = run_sync  # type: ignore[assignment]


def enabled() -> bool:
    return _MARKS is not None


def mark(what: str) -> None:
    if _MARKS is not None:
        number, name = _REQUEST.get()
        _MARKS.append((time.monotonic_ns(), number, name, what))


def begin(name: str) -> contextvars.Token[tuple[int, str]] | None:
    """A request starts: number it and mark it (None when recording is off)."""
    global _next_request
    if _MARKS is None:
        return None
    _next_request += 1
    token = _REQUEST.set((_next_request, name))
    mark("req")
    return token


def end(token: contextvars.Token[tuple[int, str]] | None) -> None:
    if token is not None:
        mark("reply")
        _REQUEST.reset(token)


def dump() -> None:
    """Write the marks to the file (JSON lines), once, when the daemon stops."""
    if _MARKS is None or not _FILE:
        return
    with open(_FILE, "w") as out:
        for ns, number, name, what in _MARKS:
            out.write(json.dumps([ns, number, name, what]) + "\n")

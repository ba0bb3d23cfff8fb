"""The daemon's log: where it goes, how its lines look, the summary at unmount.

- Foreground: stderr.  When stderr is systemd's journal (``$JOURNAL_STREAM``
  names it), lines carry a ``<N>`` syslog priority prefix and no timestamp
  (journald stamps and ranks them); otherwise a timestamp and the level name.
  Plain text either way: no colour, no cursor tricks, one event per line.
- Background: ``--log FILE`` (appended), else nothing.
- ``--debug``: every FUSE request and its answer, with its duration.
- Each failed commit is one WARNING line naming the file and the errno
  (:mod:`atomicfs.commit`); the unmount ends with one summary line.
"""

from __future__ import annotations

import logging
import os
import sys

from .publish import CommitStats
from .status import counts_text, human_bytes, human_duration

PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}


class JournaldFormatter(logging.Formatter):
    """``<6>atomicfs.mount: message``; every line of a traceback keeps the priority."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITIES.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """Is fd 2 the journal stream systemd set up ($JOURNAL_STREAM = "dev:ino")?"""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class DroppedReplies(logging.Filter):
    """libfuse logs (through pyfuse3) an ERROR when the kernel no longer waits for an
    answer: "fuse_reply_* failed with No such file or directory". The kernel gave the
    request up (the file system is being unmounted while an asynchronous RELEASE is
    answered, or the caller was interrupted), so the answer no longer matters and
    nothing was lost. It is not an error an operator can act on: kept as a DEBUG line
    under ``--debug``, dropped otherwise."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        if "fuse_reply_* failed with No such file or directory" not in record.getMessage():
            return True
        if not self.debug:
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def setup(debug: bool, log_file: str | None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    # paths that are not UTF-8 (surrogate escapes) are logged escaped, never fail
    if log_file is not None:
        handler = logging.FileHandler(log_file, errors="backslashreplace")
    else:
        if hasattr(sys.stderr, "reconfigure"):
            sys.stderr.reconfigure(errors="backslashreplace")
        handler = logging.StreamHandler(sys.stderr)
    if log_file is None and stderr_is_journal():
        handler.setFormatter(JournaldFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fuse_log = logging.getLogger("pyfuse3")
    for f in list(fuse_log.filters):
        if isinstance(f, DroppedReplies):
            fuse_log.removeFilter(f)
    fuse_log.addFilter(DroppedReplies(debug))
    if not debug:
        fuse_log.setLevel(logging.WARNING)


def summary(mountpoint: str, stats: CommitStats, uptime: float) -> str:
    """The one line logged at unmount."""
    failed = sum(stats.failures.values())
    return (f"unmounted {mountpoint} after {human_duration(uptime)}: "
            f"{counts_text(stats.commits, 'commits')}, "
            f"{human_bytes(stats.bytes_committed)} committed, "
            f"{counts_text(stats.failures, 'failed') if failed else 'failed 0'}")

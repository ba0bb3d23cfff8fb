"""The daemon's own directory in SOURCE, and recovery of what a crash left there.

``SOURCE/.atomicfs`` (invisible through the mount) holds the journal records
of in-place commits, the rollback records of checkpoints in progress
(:mod:`atomicfs.appends`) and the temporary names that a rename commit uses
between linking its shadow and renaming it over the target.  A temporary name
left there means the commit did not reach its rename: the committed version is
still the old one, so recovery removes the leftover.
Shadows are unnamed (O_TMPFILE): the filesystem frees them after a crash.
At a clean unmount the directory is removed when empty.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat

from . import appends, journal, txrecord
from .namespace import DAEMON_DIR

log = logging.getLogger(__name__)


def open_daemon_dir(root_fd: int) -> int:
    """Create (0700) and open SOURCE/.atomicfs; return an O_PATH fd of it."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(DAEMON_DIR, 0o700, dir_fd=root_fd)
    fd = os.open(DAEMON_DIR, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 dir_fd=root_fd)
    st = os.stat(fd)
    if not stat.S_ISDIR(st.st_mode) or st.st_dev != os.stat(root_fd).st_dev:
        os.close(fd)
        raise OSError(f"{DAEMON_DIR.decode()} in SOURCE is not the daemon's directory")
    return fd


def revive_daemon_dir(root_fd: int, daemon_dir: int) -> bool:
    """Make SOURCE/.atomicfs again if it was removed beside the mount (``rm -rf``
    in SOURCE, a cleaner of old files); returns whether it did.

    Every component holds the directory by the descriptor number ``daemon_dir``,
    so the new directory is put behind that same number (dup3): from then on they
    all use it.  What was in the removed one is gone with it (its removal was a
    change made beside the mount); a commit that was using it failed cleanly.
    """
    try:
        if os.stat(daemon_dir).st_nlink > 0:
            return False  # still there (or moved elsewhere in SOURCE: it works as well)
    except OSError:
        return False
    fresh = open_daemon_dir(root_fd)
    try:
        os.dup2(fresh, daemon_dir, inheritable=False)
    finally:
        os.close(fresh)
    log.warning("SOURCE/%s was removed beside the mount; made it again",
                DAEMON_DIR.decode())
    return True


def recover(root_fd: int, daemon_dir: int) -> list[str]:
    """Resolve what interrupted commits left; returns one line per action taken.

    Complete journal records are replayed (their commit finishes), torn ones
    discarded (their commit never started changing the file); checkpoints of
    append sessions that a crash interrupted are undone; temporary names
    of rename commits are removed (the rename never happened).
    """
    done = journal.replay(daemon_dir, root_fd)
    done += appends.recover(daemon_dir, root_fd)  # after the redo records (appends.py)
    listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=daemon_dir)
    try:
        names = os.listdir(listing)
    finally:
        os.close(listing)
    for name in sorted(names):
        if name.startswith("commit-"):
            os.unlink(name, dir_fd=daemon_dir)
            done.append(f"removed unfinished commit leftover {name}")
    # multi-file transactions: replay a complete record, discard an incomplete one
    done += txrecord.recover(root_fd, daemon_dir, names)
    for line in done:
        log.info("recovery: %s", line)
    return done


def close_daemon_dir(root_fd: int, daemon_dir: int) -> None:
    """At a clean unmount: remove the daemon's directory if nothing is left in it."""
    os.close(daemon_dir)
    with contextlib.suppress(OSError):
        os.rmdir(DAEMON_DIR, dir_fd=root_fd)

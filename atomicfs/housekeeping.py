"""Work kept off the request path: ready-made shadow files, deferred closes,
invalidation of the kernel's page cache, and the end of journalled commits
(fsync of the target, removal of the record, fsync of the directory).

Two costs measured on ext4 sit on the path of every small save if done in the
request handler (see docs/performance.md):

- creating an ``O_TMPFILE`` (~0.3 ms: an inode allocated and put on the orphan
  list in the journal), needed for the first write of a session;
- the last ``close`` of a file a commit replaced (~0.2 ms: the filesystem frees
  the old inode and its blocks).

The :class:`Housekeeper` keeps a few unnamed files ready in the daemon's
directory (same filesystem as the source root, so a rename commit can put them
anywhere in it) and closes replaced files' descriptors in a worker thread.
Both are plain optimisations: when the pool is empty, the caller makes its
shadow itself, and a crash loses nothing (unnamed files vanish with the daemon).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time

import pyfuse3
import trio

from . import faults, journal, syscalls

log = logging.getLogger(__name__)

POOL_SIZE = 8  # shadows kept ready; a burst beyond it makes its own
# Seconds without a shadow taken after which the ready ones are closed: an idle
# daemon does not keep unnamed files (allocated inodes, open for writing) on
# SOURCE's filesystem for nothing.
IDLE_DRAIN = 2.0
EXHAUSTED_PAUSE = 5.0  # seconds without refilling the pool after descriptors ran out
# The thread is woken for the pool only once it is down to half, and for deferred
# closes only once CLOSE_BATCH wait (else they wait for the next wake-up, at most
# CLOSE_DELAY seconds): each wake-up costs the event loop a futex wake, and the
# thread, running, takes the GIL from the loop in the middle of a request.
CLOSE_BATCH = 8
CLOSE_DELAY = 0.1


class Housekeeper:
    """One long-lived worker thread, fed through a condition variable.

    Handing work over costs the event loop a lock and, when the thread sleeps, one
    futex wake; the thread never reports back to trio (ready shadows go into a
    deque the loop pops from).  A ``trio.to_thread`` job per save cost the loop a
    wake-up through trio's socketpair, an iteration and two ``prctl`` calls (the
    saves' wall time did not measurably change: docs/performance.md).
    """

    def __init__(self, daemon_dir: int, pool_size: int = POOL_SIZE,
                 idle_drain: float = IDLE_DRAIN) -> None:
        self.daemon_dir = daemon_dir
        self.pool_size = pool_size
        self.idle_drain = idle_drain
        self.ready: collections.deque[int] = collections.deque()  # loop pops, thread appends
        self.to_close: list[int] = []
        self.to_invalidate: set[int] = set()
        self.to_forget: list[tuple[int, bytes]] = []  # (parent inode, name)
        self.to_settle: list[tuple[int, str]] = []  # (target fd, journal record), in order
        self.unsettled = 0  # journal records handed over and not yet settled
        self.made = 0  # shadows made by the pool
        self.last_taken = 0.0  # time.monotonic() of the last shadow asked for
        self.misses = 0  # shadows asked for while the pool was empty
        self._cond = threading.Condition()
        self._pending = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.crashed = False

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping

    def stats(self) -> dict[str, int]:
        """For the status document."""
        return {
            "shadows_ready": len(self.ready),
            "shadows_made": self.made,
            "shadow_pool_misses": self.misses,
            "journal_records_unsettled": self.unsettled,
        }

    def take_shadow(self) -> int | None:
        """A ready unnamed O_RDWR file in the daemon's directory, or None."""
        try:
            fd: int | None = self.ready.pop()
        except IndexError:
            fd = None
            self.misses += 1
        self.last_taken = time.monotonic()
        if len(self.ready) <= self.pool_size // 2:
            self._wake()
        return fd

    def close_later(self, fd: int) -> None:
        """Close ``fd`` soon, in the worker thread (or now, if it does not run)."""
        if not self.running:
            os.close(fd)
            return
        with self._cond:
            self.to_close.append(fd)
            if len(self.to_close) == 1:  # the thread may sleep with no timeout: set one
                self._cond.notify()
            if len(self.to_close) < CLOSE_BATCH:
                return  # closed within CLOSE_DELAY, or at the next wake-up
        self._wake()

    def settle_later(self, target_fd: int, record: str) -> None:
        """Finish a journalled commit soon: fsync its target, remove its record
        (journal.settle), fsync the daemon's directory; takes ``target_fd`` over."""
        if not self.running:
            self._settle([(target_fd, record)])
            return
        with self._cond:
            self.to_settle.append((target_fd, record))
            self.unsettled += 1
        self._wake()

    def _settle(self, items: list[tuple[int, str]]) -> None:
        for fd, record in items:
            try:
                journal.settle(fd, self.daemon_dir, record)
            except OSError as exc:  # the record stays: replayed at the next mount
                log.warning("journal record %s not settled (%s); the next mount replays it",
                            record, exc)
            finally:
                os.close(fd)
        if items:
            syscalls.fsync_dir(self.daemon_dir)

    def invalidate(self, ino: int) -> None:
        """Drop the kernel's cached pages of ``ino`` soon (never from inside a
        request handler: the kernel may wait on that very request)."""
        if self.running:
            with self._cond:
                self.to_invalidate.add(ino)
            self._wake()

    def forget_entry(self, parent: int, name: bytes) -> None:
        """Make the kernel forget the cached name ``name`` in ``parent`` soon (a new
        file dropped before its first commit)."""
        if self.running:
            with self._cond:
                self.to_forget.append((parent, name))
            self._wake()

    def _wake(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._pending = True
                self._cond.notify()

    async def run(self) -> None:
        """Background task: start the worker thread (it outlives the task and is
        stopped by :meth:`close_all`, after the last request)."""
        if self._thread is None:  # the pool fills at the first shadow asked for
            self._token = trio.lowlevel.current_trio_token()
            self._thread = threading.Thread(target=self._main, name="atomicfs-housekeeper",
                                            daemon=True)
            self._thread.start()
        await trio.sleep_forever()

    def _main(self) -> None:
        """The thread: errors of one piece of work are logged and the loop goes on
        (:meth:`_loop`); if the loop itself dies, the mount goes down with it rather
        than serve on half alive (deferred closes and journal settling undone)."""
        try:
            self._loop()
        except BaseException:
            log.critical("the housekeeping thread crashed; unmounting", exc_info=True)
            self.crashed = True
            with contextlib.suppress(Exception):  # the loop may be ending already
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    if self.to_close:
                        if not self._cond.wait(CLOSE_DELAY):
                            break  # deferred closes due
                    elif self.ready:
                        idle = time.monotonic() - self.last_taken
                        if idle >= self.idle_drain:
                            self._drain()  # idle: no shadow taken for a while
                        else:
                            self._cond.wait(self.idle_drain - idle)
                    else:
                        self._cond.wait()
                if self._stopping:
                    return
                faults.point("housekeeper.loop")  # tests: a crash of the thread itself
                self._pending = False
                closing, self.to_close = self.to_close, []
                stale, self.to_invalidate = self.to_invalidate, set()
                names, self.to_forget = self.to_forget, []
                settle, self.to_settle = self.to_settle, []
                want = self.pool_size - len(self.ready)
            try:
                self._work(closing, stale, names, settle, want)
            except Exception:  # a bug here must not end the thread
                log.exception("housekeeping failed; going on")
            finally:
                with self._cond:
                    self.unsettled -= len(settle)

    def _drain(self) -> None:
        """Close the ready shadows (called with the lock held, the loop idle)."""
        while True:
            try:
                fd = self.ready.pop()
            except IndexError:
                return
            try:
                faults.point("housekeeper.drain")
                os.close(fd)
            except OSError as exc:  # the fd was ours alone: a bug elsewhere, not fatal here
                log.error("closing a ready shadow (fd %d) failed: %s", fd, exc)

    def _work(self, closing: list[int], stale: set[int], names: list[tuple[int, bytes]],
              settle: list[tuple[int, str]], want: int) -> None:
        try:  # each kind of work goes on whatever the others do (closes above all)
            self._settle(settle)
        except OSError as exc:  # the disk (EIO after a shutdown): nothing to debug here
            log.error("settling journal records failed (%s); the next mount replays them", exc)
        except Exception:
            log.exception("settling journal records failed; the next mount replays them")
        for fd in closing:
            try:
                os.close(fd)
            except OSError as exc:  # a double close would be a bug: say so, go on
                log.error("deferred close of fd %d failed: %s", fd, exc)
        for ino in stale:
            # OSError: the kernel no longer knows the inode, so nothing is cached
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(ino, attr_only=False)
        for parent, name in names:
            with contextlib.suppress(OSError):  # ENOENT: the kernel had not cached it
                pyfuse3.invalidate_entry(parent, name)
        if time.monotonic() - syscalls.exhausted_at < EXHAUSTED_PAUSE:
            want = 0  # descriptors ran out lately: leave the last ones to requests
        for _ in range(want):
            try:
                fd = syscalls.tmpfile(self.daemon_dir)
            except OSError as exc:  # ENOSPC, EDQUOT...: callers make their own
                log.debug("shadow pool not refilled: %s", exc)
                break
            self.ready.append(fd)
            self.made += 1

    def close_all(self) -> None:
        """At shutdown: stop the thread, settle journalled commits, close everything
        still held."""
        thread = self._thread
        if thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            thread.join()
        self._settle(self.to_settle)
        self.unsettled = 0
        self.to_settle.clear()
        for fd in list(self.ready) + self.to_close:
            os.close(fd)
        self.ready.clear()
        self.to_close.clear()

"""Append sessions (logs): checkpoints, rotation, and a crash-safe append in place.

docs/semantics.md §10.  A session that, since its last commit, has only
written at or beyond its current end (``O_APPEND``, or plain writes at EOF),
with no truncate and no overwrite, is a *log*.  A log is committed in steps
(checkpoints) at a write() boundary: ``checkpoint=`` seconds after its first
uncommitted append, as soon as ``checkpoint_bytes=`` bytes are waiting, and
when a reader opens the file.  A checkpoint appends the new bytes to the
committed file in place, so its cost follows the appended bytes.  Any other
session is never committed part way (§1); it becomes a log again after its
next whole commit (close, fsync), from that commit on.

Which sessions are logs from their start: an existing file opened without
``O_TRUNC``; a new file only if its creator asked for ``O_APPEND`` (a program
writing a new file the ordinary way keeps §1.4: the file appears whole or not
at all).  An ``O_TRUNC`` open, a truncate, or a write below the end makes the
session a rewrite until its next commit.

Rotation: a truncate to zero of a log that was appended to, while another writer
holds it (logrotate's ``copytruncate``, ``: > log``), is committed at once, as
the truncation the rotating program asked for, and the session goes on as a log
of the empty file.  (A truncate to zero of an empty log changes nothing.)

Write boundaries.  FUSE sends one write() as several WRITE requests when it is
larger than a request (here 1 MiB, 256 pages), and also cuts it after a first
page that it only partly fills and does not hold in its cache (seen here: a
3 KiB request, then the rest); the kernel holds the file's lock for the whole
write(), so no other write() comes between them.  Every request but the last
of one write() ends on a page boundary (or, cut at ``max_write``, is a whole
number of pages).  A request that does not ends its write(); one that does may
be followed by the rest of the same write(), so a checkpoint stops before it
until the next request, or until it has been alone for ``IDLE_WHOLE`` seconds.

Crash safety of the append in place (:func:`append_in_place`).  Extending a
file is not atomic across a power cut: on ext4 the new size can reach the disk
(a journal commit of the inode) before the appended data, which then reads as
zeros.  So a checkpoint writes a small *rollback record* first — the file's
handle, its committed size and mtime — made durable (file and directory
fsync) before the file is touched; then appends and fsyncs the file; then
removes the record (directory fsync).  Recovery (:func:`recover`) truncates
the file of every record it finds back to the recorded size: the checkpoint in
progress is undone, every earlier one is kept.  The data is written once (the
redo journal would write it twice); the fixed cost is three fsyncs, whatever
the size.  Records need file handles (``open_by_handle_at``: a daemon running
as root); without them no checkpoint is made (logged once) and logs are
committed whole at their commit points, as before.

Concurrency (trio): a checkpoint holds ``session.lock`` from its first step to
the update of the session's map, so writes, truncates and commits of the file
wait for it; reads of the session's content read the shadow, which stays as it
was until the map says the bytes are committed; isolated readers of the
committed file wait for the append in place (:meth:`Reads.exclusive`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from . import faults, journal, syscalls
from .extents import ExtentMap, Kind

if TYPE_CHECKING:
    from .batch import Batch
    from .commit import Committer
    from .reads import Reads
    from .sessions import Session

log = logging.getLogger(__name__)

PAGE = 4096
PARTIAL_MIN = 32 << 10  # a request of whole pages this long may be cut at max_write
IDLE_WHOLE = 1.0  # seconds after which such a request, alone, is taken as a whole write()
# A session that is not a log and stays open longer than this is logged once
# (env: a test knob; docs/semantics.md §10).
LONG_SESSION = float(os.environ.get("ATOMICFS_LONG_SESSION", 3600))
# A whole commit (close, fsync) of a log appends in place when it appends at least
# this much to a file at least this large (or hard-linked).  Below, the usual commit
# is as fast or faster for the caller: a copy of a small file, or a journal record
# (its data is written twice, but the file's fsync and the record's removal come
# after the call returned, where an append's rollback record must be gone before:
# measured here, 2 MiB appended to 64 MiB took 26-39 ms journalled, 40-42 ms in
# place).  Above, the append halves the bytes written and needs no room for a
# record.  env: a test knob (the torture sets 0).
APPEND_MIN = int(os.environ.get("ATOMICFS_APPEND_MIN", 8 << 20))
SETTLE_WAIT = 5.0  # seconds a checkpoint waits for journal records to settle
RESCAN = 60.0  # seconds between looks at idle sessions (the warning's precision)
RECORD_PREFIX = "append-"
MAGIC = b"AFSA0001"
HEADER = struct.Struct("<8sI")  # magic, crc32 of the body
BODY = struct.Struct("<QQqII")  # st_ino, committed size, mtime_ns, handle type, handle length


def is_whole(offset: int, length: int) -> bool:
    """Does a WRITE request of ``length`` bytes at ``offset`` surely end its write()?"""
    if (offset + length) % PAGE == 0:
        return False
    return length < PARTIAL_MIN or bool(length % PAGE)


@dataclass
class AppendState:
    """Where a session stands as a log (pure: times are passed in)."""

    log: bool  # only appended since the last commit: checkpoints are allowed
    base: int  # the committed size
    end: int  # the session's size after its last write
    boundary: int  # the end of the last write known to be whole (base <= boundary <= end)
    last_write: float = 0.0
    unsaved_since: float | None = None  # the first append not committed yet was made then
    checkpoints: int = 0
    warned: bool = False  # the long-session warning was logged
    retry_at: float = 0.0  # a checkpoint that could not be made: none tried before this
    appended: bool = False  # appended as a log at least once (what a rotation rotates)

    @classmethod
    def new(cls, size: int, log: bool) -> AppendState:
        return cls(log, size, size, size)

    def wrote(self, offset: int, length: int, size_before: int, now: float) -> None:
        if not self.log:
            return
        if offset < size_before:  # an overwrite: a rewrite from now on
            self.log = False
            return
        self.end = offset + length
        self.appended = True
        if is_whole(offset, length):
            self.boundary = self.end
        self.last_write = now
        if self.unsaved_since is None:
            self.unsaved_since = now

    def stop(self) -> None:
        """A truncate or an overwrite: no checkpoint until the next whole commit."""
        self.log = False

    def committed(self, size: int) -> None:
        """The whole session was committed: a log again, from this size on."""
        self.log = True
        self.base = self.end = self.boundary = size
        self.unsaved_since = None

    def whole_upto(self, now: float) -> int:
        """The end of the appends that are whole writes."""
        if self.end > self.boundary and now - self.last_write >= IDLE_WHOLE:
            return self.end
        return self.boundary

    def due(self, now: float, interval: float, max_bytes: int) -> int | None:
        """The size to checkpoint up to now, or None."""
        if not self.log or self.unsaved_since is None or now < self.retry_at:
            return None
        upto = self.whole_upto(now)
        if upto <= self.base:
            return None
        if upto - self.base >= max_bytes or now - self.unsaved_since >= interval:
            return upto
        return None

    def wake_at(self, interval: float, max_bytes: int) -> float | None:
        """When :meth:`due` may next say yes without another write."""
        if not self.log or self.unsaved_since is None:
            return None
        at = self.unsaved_since + interval
        if self.end - self.base >= max_bytes:  # waiting only for the last write to be whole
            at = self.last_write + IDLE_WHOLE
        elif self.end > self.boundary:
            at = max(at, self.last_write + IDLE_WHOLE)
        return max(at, self.retry_at)

    def checkpointed(self, upto: int) -> None:
        self.base = upto
        self.checkpoints += 1
        self.unsaved_since = None if self.end == upto else self.last_write


# -- rollback records (pure encoding) ------------------------------------------------
@dataclass(frozen=True)
class Rollback:
    target: journal.FileId
    size: int  # the committed size before the checkpoint
    mtime_ns: int


def encode(record: Rollback) -> bytes:
    t = record.target
    body = BODY.pack(t.ino, record.size, record.mtime_ns, t.handle_type, len(t.handle)) + t.handle
    return HEADER.pack(MAGIC, zlib.crc32(body)) + body


def decode(blob: bytes) -> Rollback | None:
    """A verified record, or None if it is torn or corrupt (never raises)."""
    if len(blob) < HEADER.size + BODY.size:
        return None
    magic, crc = HEADER.unpack_from(blob, 0)
    body = blob[HEADER.size:]
    if magic != MAGIC or zlib.crc32(body) != crc:
        return None
    ino, size, mtime, htype, hlen = BODY.unpack_from(body, 0)
    handle = body[BODY.size:]
    if len(handle) != hlen:
        return None
    return Rollback(journal.FileId(ino, htype, handle), size, mtime)


# -- the append in place and its recovery (blocking) --------------------------------------
def append_in_place(target: int, shadow: int | None, base: int, upto: int,
                    mtime_ns: int | None, daemon_dir: int, name: str, record: Rollback) -> None:
    """Append the shadow's bytes ``[base, upto)`` to ``target`` (committed size
    ``base``), crash-safe by a rollback record; on failure the target is put back."""
    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600,
                 dir_fd=daemon_dir)
    try:
        try:
            os.write(fd, encode(record))
            os.fsync(fd)
        finally:
            os.close(fd)
        syscalls.fsync_dir(daemon_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            journal.retire(daemon_dir, name)
        raise
    faults.point("append.after_record")
    try:
        if shadow is not None:
            for a, b, data in syscalls.split_by_data(shadow, base, upto):
                if data:
                    syscalls.copy_range(shadow, target, a, b - a)
        faults.point("append.after_copy")
        if os.fstat(target).st_size < upto:  # a hole at the end (a write past the end)
            os.ftruncate(target, upto)
        if mtime_ns is not None:
            syscalls.utimens_fd(target, None, mtime_ns)
        faults.point("append.before_fsync")
        os.fsync(target)
    except BaseException:
        try:
            os.ftruncate(target, base)
            syscalls.utimens_fd(target, None, record.mtime_ns)
            os.fsync(target)
        except OSError as exc:
            log.warning("an unfinished checkpoint could not be undone now (%s); the next "
                        "mount undoes it (record %s)", exc, name)
            raise
        journal.retire(daemon_dir, name)
        raise
    faults.point("append.before_retire")
    journal.retire(daemon_dir, name)


def recover(daemon_dir: int, root_fd: int) -> list[str]:
    """Undo every checkpoint a crash interrupted; one line per record."""
    lines = []
    for name in journal.record_names(daemon_dir, RECORD_PREFIX):
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=daemon_dir)
        try:
            record = decode(os.read(fd, 1 << 16))
        finally:
            os.close(fd)
        if record is None:  # never complete, so the file was never touched
            lines.append(f"discarded torn checkpoint record {name} (file untouched)")
        else:
            lines.append(_undo(root_fd, name, record))
        journal.retire(daemon_dir, name)
    return lines


def _undo(root_fd: int, name: str, record: Rollback) -> str:
    try:
        target = journal.open_file_id(root_fd, record.target, os.O_RDWR)
    except OSError as exc:
        return (f"discarded checkpoint record {name}: inode {record.target.ino} is gone "
                f"({os.strerror(exc.errno or 0)})")
    try:
        size = os.fstat(target).st_size
        if size <= record.size:
            return (f"checkpoint record {name}: inode {record.target.ino} had not grown "
                    f"(size {size})")
        os.ftruncate(target, record.size)
        syscalls.utimens_fd(target, None, record.mtime_ns)
        os.fsync(target)
    finally:
        os.close(target)
    return (f"undid an unfinished checkpoint of inode {record.target.ino}: back to its "
            f"last checkpoint, size {record.size} (was {size})")


# -- the policy in a running daemon ----------------------------------------------------------
class Appends:
    """The append state of every session, the checkpoints, and their timer task.

    ``commit_whole`` commits a whole session (OpenFiles._commit), for a new file's first
    checkpoint and a rotation.
    """

    def __init__(self, committer: Committer, batch: Batch, reads: Reads,
                 commit_whole: Callable[[Session, str], Awaitable[bool]],
                 interval: float = 5.0, max_bytes: int = 64 << 20) -> None:
        self.committer = committer
        self.batch = batch
        self.reads = reads
        self.commit_whole = commit_whole
        self.interval = interval
        self.max_bytes = max_bytes
        self.states: dict[Session, AppendState] = {}
        self.checkpoints = 0
        self.bytes = 0
        self.failures = 0
        self._records = 0
        self._told_no_handles = False
        self._wake = trio.Event()

    def stats(self) -> dict[str, int]:
        """For the status document: checkpoints made since mount."""
        return {"made": self.checkpoints, "bytes": self.bytes, "failed": self.failures}

    def session_stats(self, session: Session) -> dict[str, Any]:
        """For the status document: is the session a log, and its checkpoints."""
        state = self.states.get(session)
        # docs/semantics.md §10: a log is checkpointed; any other session is not
        return {"append": state is not None and state.log,
                "checkpoints": state.checkpoints if state is not None else 0}

    # -- what happens to a session -------------------------------------------------
    def start(self, session: Session, log: bool) -> None:
        self.states[session] = AppendState.new(session.size, log)

    def forget(self, session: Session) -> None:
        self.states.pop(session, None)

    def is_log(self, session: Session) -> bool:
        state = self.states.get(session)
        return state is not None and state.log

    def wrote(self, session: Session, offset: int, length: int, size_before: int) -> None:
        state = self.states.get(session)
        if state is None:
            return
        waiting = state.unsaved_since is not None
        state.wrote(offset, length, size_before, time.monotonic())
        if (not waiting and state.unsaved_since is not None) or state.end > state.boundary:
            # the timer may need to wake sooner: a first append, or a write that may be
            # cut (whole once alone IDLE_WHOLE seconds)
            self._wake.set()

    def truncating(self, session: Session, size: int, others: int) -> bool:
        """Before a truncate to ``size``: is it a rotation (committed at once)?
        ``others``: writers of the session besides the one truncating."""
        state = self.states.get(session)
        if state is None:
            return False
        if state.log and size == 0 and others > 0:
            if session.size == 0:
                return False  # nothing to drop: changes nothing, the log goes on
            if state.appended:  # a log that was written to, held by its logger
                state.stop()
                return True
        state.stop()
        return False

    def committed(self, session: Session) -> None:
        state = self.states.get(session)
        if state is not None:
            state.committed(session.size)

    # -- checkpoints --------------------------------------------------------------------
    def due(self, session: Session) -> int | None:
        state = self.states.get(session)
        if state is None or session.write_errno or session.killed_by:
            return None
        return state.due(time.monotonic(), self.interval, self.max_bytes)

    def unsaved(self, session: Session) -> int | None:
        """For a reader's open: the size to checkpoint up to, if anything is waiting."""
        state = self.states.get(session)
        if state is None or not state.log or session.write_errno or session.killed_by:
            return None
        upto = state.whole_upto(time.monotonic())
        return upto if upto > state.base else None

    def whole_writes(self, session: Session) -> int | None:
        """At unmount: the end of the log's whole writes, if not committed yet (the
        writer is gone, so a request that may be cut is not waited for)."""
        state = self.states.get(session)
        if state is None or not state.log or session.write_errno or session.killed_by:
            return None
        return state.boundary if state.boundary > state.base else None

    async def checkpoint(self, session: Session, upto: int) -> bool:
        """Commit the session's appends up to ``upto`` (a write boundary); the
        caller holds ``session.lock``.  Raises OSError with nothing changed."""
        state = self.states.get(session)
        if state is None or not state.log or upto <= state.base or upto > session.size:
            return False
        if session.pending:  # a new log: its first checkpoint publishes it whole
            if upto != session.size:
                return False
            made = await self.commit_whole(session, "checkpoint")
            state.checkpoints += made
            self.checkpoints += made
            self.bytes += upto * made
            return made
        if not self.committer.journal_ok:
            if not self._told_no_handles:
                self._told_no_handles = True
                log.warning("append sessions are not checkpointed: the daemon cannot reopen "
                            "files by handle (not root); logs are committed at close")
            return False
        # A redo record not yet settled would, replayed after a crash, cut the file back
        # to its size: let the housekeeper settle it first (a few ms: an fsync, an unlink).
        waited = 0.0
        while self.committer.housekeeper.unsettled:
            if waited > SETTLE_WAIT:
                return False  # tried again later
            await trio.sleep(0.002)
            waited += 0.002
        inode = session.inode
        # durability=batch: what was staged before (this file's version too) is
        # published first, so a crash never keeps this checkpoint without an earlier
        # commit (docs/semantics.md §9.2)
        await self.batch.before_change()
        committed = os.stat(inode.fd)
        if committed.st_nlink == 0:
            return False  # unlinked while written: nothing to commit into
        if committed.st_size != session.base_size or session.base_size != state.base:
            log.debug("%s: committed size %d, session base %d, log base %d: no checkpoint",
                      self.committer.describe(inode), committed.st_size, session.base_size,
                      state.base)
            state.stop()
            return False
        base = state.base
        record = Rollback(journal.file_id(inode.fd), base, committed.st_mtime_ns)
        self._records += 1
        name = f"{RECORD_PREFIX}{os.getpid()}-{self._records:012d}"
        shadow, mtime = session.shadow, session.mtime_ns
        target = syscalls.reopen(inode.fd, os.O_RDWR)
        try:
            await self.reads.exclusive(inode, lambda: append_in_place(
                target, shadow, base, upto, mtime, self.committer.daemon_dir, name, record))
        finally:
            os.close(target)
        # No await from here: the session's map and the committed file agree again.
        rest = ExtentMap(upto)
        for ext in session.emap.extents(upto):
            if ext.kind is Kind.SHADOW:
                rest.write(ext.start, ext.length)
            else:
                rest.truncate(ext.end)
        session.emap = rest
        session.base_size = upto
        if upto == session.size:
            session.mtime_ns = None
        if shadow is not None:
            try:
                if upto == session.size:
                    os.ftruncate(shadow, 0)
                else:
                    syscalls.punch_hole(shadow, base, upto - base)
            except OSError as exc:  # only space not given back early
                log.debug("shadow space not freed after a checkpoint: %s", exc)
        state.checkpointed(upto)
        session.commits += 1
        self.checkpoints += 1
        self.bytes += upto - base
        log.debug("checkpoint of inode %d: %d bytes appended, size %d", inode.ino,
                  upto - base, upto)
        return True

    async def commit_log(self, session: Session) -> bool:
        """A whole commit (close, fsync) of a log: append in place instead of a copy
        or a journal record, so its cost follows the appended bytes too.  False: not
        done, nothing changed (the caller commits the usual way).  Only for appends
        of APPEND_MIN bytes or more, to a file as large or hard-linked; not under
        durability=batch, whose commits are staged without an fsync each, nor when
        commit= names a strategy."""
        state = self.states.get(session)
        if (state is None or not state.log or session.pending or self.batch.enabled
                or self.committer.strategy != "auto" or session.size <= state.base):
            return False
        if session.size - state.base < APPEND_MIN or (
                session.base_size < APPEND_MIN
                and self.batch.source_links(session.inode) < 2):
            return False
        started = time.monotonic()
        try:
            if not await self.checkpoint(session, session.size):
                return False
        except OSError as exc:  # the file is as it was: the usual commit tells the error
            log.debug("append commit of %s not made (%s); committing by copy",
                      self.committer.describe(session.inode), exc)
            return False
        stats = self.committer.counters
        stats.commits["append"] = stats.commits.get("append", 0) + 1
        stats.latencies.append(time.monotonic() - started)
        return True

    async def try_checkpoint(self, session: Session, upto: int, why: str) -> None:
        """A checkpoint nobody waits for: a failure is logged and counted, the appends
        stay in the session (committed at its next commit point, or retried later)."""
        try:
            if not await self.checkpoint(session, upto):
                # not possible now (an unlinked file, no file handles, records still
                # settling...): the timer tries again one interval later, not at once
                self._later(session)
        except OSError as exc:
            self.failures += 1
            self._later(session)
            log.warning("checkpoint of %s (%s) failed: %s; its appends stay uncommitted "
                        "and are retried", self.committer.describe(session.inode), why,
                        os.strerror(exc.errno or 0))

    def _later(self, session: Session) -> None:
        state = self.states.get(session)
        if state is not None:
            state.retry_at = time.monotonic() + self.interval

    async def run(self, sessions: Callable[[], list[Session]]) -> None:
        """Background task: checkpoint logs when due; warn of long rewrites."""
        while True:
            self._wake = trio.Event()  # set by what happens while this round runs
            now = time.monotonic()
            # a look at least this often for the long-rewrite warning (a new session
            # does not wake the task: thousands of saves would each cost a scan)
            wake_at = now + min(RESCAN, LONG_SESSION)
            for session in sessions():
                state = self.states.get(session)
                if state is None:
                    continue
                if (not state.log and not state.warned and session.dirty
                        and now - session.created_at > LONG_SESSION):
                    state.warned = True
                    log.warning("%s: a write session open for %.0f s that is not an append "
                                "session: what it wrote since its last commit is committed "
                                "only at a close or fsync (docs/semantics.md §10)",
                                self.committer.describe(session.inode),
                                now - session.created_at)
                upto = self.due(session)
                if upto is not None and not session.lock.locked():
                    async with session.lock:
                        upto = self.due(session)  # what was written while we waited
                        if upto is not None:
                            await self.try_checkpoint(session, upto, "timer")
                due_at = state.wake_at(self.interval, self.max_bytes)
                if due_at is not None:
                    wake_at = min(wake_at, due_at)
            # at least a short sleep: a checkpoint that could not be made now (a lock
            # held, a record settling) is tried again soon, not in a spin
            with trio.move_on_after(max(0.05, wake_at - time.monotonic())):
                await self._wake.wait()
            if wake_at <= now:
                await trio.sleep(0.05)

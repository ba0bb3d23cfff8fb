"""One transaction's state (:class:`Transaction`) and the pure conflict checks on it
(docs/semantics.md §14, docs/design-transactions.md)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import txattrs
from .inodes import Inode
from .sessions import Session

# -- conflicts (pure) ------------------------------------------------------------------
Identity = tuple[int, ...]  # dev, ino, mtime_ns, size (names); dev, ino, ctime_ns (attributes)


def identity_of(st: os.stat_result | None) -> Identity | None:
    """What a committed name leads to, for conflict detection: another file (dev,
    ino), or the same file with other contents (mtime, size), or nothing."""
    if st is None:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def attr_identity_of(st: os.stat_result | None) -> Identity | None:
    """What an object whose attributes the transaction changes is, for conflict
    detection: the same object (dev, ino) unchanged since (ctime: any chmod, chown,
    utimes, xattr change, write, link count change by anyone else moves it)."""
    if st is None:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def conflicts(seen: dict[tuple[int, bytes], Identity | None],
              changed: set[tuple[int, bytes]],
              now: Callable[[int, bytes], Identity | None]) -> list[tuple[int, bytes]]:
    """The names the transaction changes whose committed identity differs from the
    one it saw when it first touched them (sorted)."""
    return sorted(key for key in changed if key in seen and now(*key) != seen[key])


# -- one transaction -------------------------------------------------------------------
@dataclass(eq=False)
class Transaction:
    root: int  # pid of CMD
    runner: int  # pid of `atomicfs run`
    command: str
    staging_name: str
    staging_fd: int  # O_PATH fd of SOURCE/.atomicfs/tx-ID
    started: float = field(default_factory=time.monotonic)
    state: str = "open"  # open, committing, committed, aborted
    sessions: dict[int, Session] = field(default_factory=dict)  # ino -> content/new file
    entries: dict[tuple[int, bytes], Inode] = field(default_factory=dict)  # new names
    staged: dict[int, str] = field(default_factory=dict)  # ino -> token (dir/symlink/fifo)
    # directories it made (held: their FUSE inode numbers must not change while open)
    private: dict[int, Inode] = field(default_factory=dict)
    # committed names it removed: (parent ino, name) -> (parent, held; the file removed:
    # dev, ino, file handle)
    whiteouts: dict[tuple[int, bytes], tuple[Inode, int, int, str]] = field(
        default_factory=dict)
    # conflicts (docs/semantics.md §14): what each committed name the transaction
    # changes led to when it first touched it -- (dev, ino, mtime, size) or None
    # (absent) -- and the name of each committed file it rewrites (ino -> name)
    seen: dict[tuple[int, bytes], Identity | None] = field(default_factory=dict)
    rewrites: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    # attributes of committed objects it changed (held): ino -> changes
    # (atomicfs/txattrs.py); the name of each as first touched (parent held; b"": the
    # root itself) and what it was then, (dev, ino, ctime)
    attrs: dict[int, txattrs.Changes] = field(default_factory=dict)
    attr_names: dict[int, tuple[Inode, bytes]] = field(default_factory=dict)
    attr_seen: dict[tuple[int, bytes], Identity | None] = field(default_factory=dict)
    metas: int = 0  # attribute operations of its record, once written
    # committed directories it removed: (parent ino, name) -> the directory (held: the
    # whiteouts of its children are keyed by its inode number)
    removed_dirs: dict[tuple[int, bytes], Inode | None] = field(default_factory=dict)
    # committed directories it moved: old (parent ino, name) -> the directory (held);
    # the whiteout at the old name becomes a ``stash`` at the commit, its entry a ``put``
    moved_dirs: dict[tuple[int, bytes], Inode] = field(default_factory=dict)
    # names whose identity for conflicts is (dev, ino) alone: old names of directories
    # it moved (what an outsider does inside such a directory moves with it)
    by_inode: set[tuple[int, bytes]] = field(default_factory=set)
    # real objects (committed, or inside a directory it made) that it gave a name with
    # an entry -- moved or hard-linked: ino -> inode (held)
    linked: dict[int, Inode] = field(default_factory=dict)
    # committed directories it records a change in (held until it ends)
    directories: dict[int, Inode] = field(default_factory=dict)
    # committed names a member began to move: the kernel looked them up again
    # (replies about them carry timeout 0; see _move_committed)
    revalidated: set[tuple[int, bytes]] = field(default_factory=set)
    # the same names by their directory's identity (dev, ino): the kernel's retry may
    # come with another inode number for the directory (it dropped and looked it up
    # again meanwhile), and must not get ESTALE a second time
    revalidated_keys: set[tuple[tuple[int, int], bytes]] = field(default_factory=set)
    result: dict[str, Any] | None = None
    runner_fd: int | None = None  # pidfd of the runner: it dying aborts
    tokens: int = 0
    applied: int = 0  # operations of its redo record, once written
    # steps past the record that failed (the record then stays for the next mount)
    unapplied: list[str] = field(default_factory=list)

    def token(self, kind: str) -> str:
        self.tokens += 1
        return f"{kind}{self.tokens}"

    def touches(self, parent_ino: int, name: bytes) -> bool:
        key = (parent_ino, name)
        return key in self.entries or key in self.whiteouts or key in self.revalidated

    def summary(self) -> dict[str, Any]:
        files = sum(1 for s in self.sessions.values() if s.pending or s.dirty)
        if not self.command:
            self.command = _command(self.root)  # exec'd by now (at begin it was not yet)
        return {"root_pid": self.root, "runner_pid": self.runner, "command": self.command,
                "age_s": round(time.monotonic() - self.started, 3), "state": self.state,
                "files": files,
                "bytes": sum(s.size for s in self.sessions.values()),
                "changes": len(self.entries) + len(self.whiteouts) + len(self.attrs)
                + sum(1 for s in self.sessions.values() if not s.pending and s.dirty)}


class TxFailed(Exception):
    """A commit that could not be made: nothing of the transaction is applied."""


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"

"""Live status of a mount, served as a virtual xattr of the mount's root.

``getxattr(MOUNTPOINT, "user.atomicfs.status")`` returns a JSON document:
open sessions, commit counters since mount, commit latency percentiles.  It is
not a file in the tree (nothing to hide from readdir, nothing to back up), and
the kernel's own permission rules for the root directory's user xattrs apply.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from . import __version__
from .extents import Kind

if TYPE_CHECKING:
    from .operations import AtomicOperations

STATUS_XATTR = b"user.atomicfs.status"


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99),
            "max_ms": round(ordered[-1] * 1000, 3), "samples": len(ordered)}


def snapshot(ops: AtomicOperations) -> dict[str, Any]:
    now = time.monotonic()
    sessions = []
    for session in ops.files.sessions.values():
        inode = session.inode
        where = ops.committer.describe(inode)
        sessions.append({
            "inode": inode.ino,
            "path": where,
            "size": session.size,
            "buffered_bytes": session.emap.count(Kind.SHADOW),
            "extents": len(session.emap),
            "age_s": round(now - session.created_at, 3),
            "writers": session.writers,
            "new_file": session.pending,
            "dirty": session.dirty,
        })
    stats = ops.committer.stats
    return {
        "version": __version__,
        "options": ops.options_summary,
        "sessions": sorted(sessions, key=lambda s: s["inode"]),
        "open_handles": len(ops.files.handles),
        "inodes": len(ops.table),
        "commits": dict(stats.commits),
        "bytes_committed": stats.bytes_committed,
        "failures": dict(stats.failures),
        "recoveries": list(ops.recovered),
        "commit_latency": percentiles(list(stats.latencies)),
        "reflink": ops.committer.reflink_ok,
        "journal": ops.committer.journal_ok,
    }


def render(ops: AtomicOperations) -> bytes:
    return json.dumps(snapshot(ops), indent=1, sort_keys=True).encode()

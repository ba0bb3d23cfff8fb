"""Live status of a mount, served as a virtual xattr of the mount's root.

``getxattr(MOUNTPOINT, "user.atomicfs.status")`` returns a JSON document:
open sessions, commit counters since mount, commit latency percentiles.  It is
not a file in the tree (nothing to hide from readdir, nothing to back up), and
the kernel's own permission rules for the root directory's user xattrs apply.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import __version__
from .extents import Kind
from .inodes import open_fd_count

if TYPE_CHECKING:
    from .operations import AtomicOperations

STATUS_XATTR = b"user.atomicfs.status"


@dataclass
class DaemonInfo:
    """What the daemon knows about its own mount (set by :func:`atomicfs.mount.run`)."""

    source: str = ""
    mountpoint: str = ""
    started: float = field(default_factory=time.time)  # wall clock, for people
    started_mono: float = field(default_factory=time.monotonic)  # for the uptime

    def uptime(self) -> float:
        return time.monotonic() - self.started_mono


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
    appends = ops.files.appends
    for session in ops.files.sessions.values():
        inode = session.inode
        where = ops.committer.describe(inode)
        state = appends.states.get(session)
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
            "spilled_bytes": session.spilled,
            # docs/semantics.md §10: a log is checkpointed; any other session is not
            "append": state is not None and state.log,
            "checkpoints": state.checkpoints if state is not None else 0,
        })
    stats = ops.committer.stats
    info = ops.info
    return {
        "version": __version__,
        "pid": os.getpid(),
        "source": info.source,
        "mountpoint": info.mountpoint,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(info.started)),
        "uptime_s": round(info.uptime(), 3),
        "options": ops.options_summary,
        "sessions": sorted(sessions, key=lambda s: s["inode"]),
        # multi-file transactions (docs/semantics.md §14): open ones, and counts
        "transactions": ops.tx.status(),
        "transactions_done": dict(ops.tx.counts),
        "open_handles": len(ops.files.handles),
        "inodes": len(ops.table),
        "commits": dict(stats.commits),
        "commits_in_flight": ops.committer.in_flight,
        "checkpoints": {"made": appends.checkpoints, "bytes": appends.bytes,
                        "failed": appends.failures},
        "staged": len(ops.committer.staged),
        "bytes_committed": stats.bytes_committed,
        "failures": dict(stats.failures),
        "recoveries": list(ops.recovered),
        "commit_latency": percentiles(list(stats.latencies)),
        "reflink": ops.committer.reflink_ok,
        "journal": ops.committer.journal_ok,
        "reads": dict(ops.committer.reads),
        "descriptors": descriptors(ops),
        "not_durable": stats.not_durable,
        "housekeeping": {
            "shadows_ready": len(ops.housekeeper.ready),
            "shadows_made": ops.housekeeper.made,
            "shadow_pool_misses": ops.housekeeper.misses,
            "journal_records_unsettled": ops.housekeeper.unsettled,
        },
    }


def descriptors(ops: AtomicOperations) -> dict[str, Any]:
    """What the daemon holds against its descriptor budget (docs/semantics.md §11)."""
    table = ops.table
    return {
        "held": open_fd_count(),
        "limit": table.budget.limit,
        "cache_budget": table.budget.cache,
        "reserve": table.budget.reserve,
        "reserve_held": table.reserved,
        "cached_inodes": table.cached,
        "inode_mode": table.mode,
        "exhausted": table.fd_stats.exhausted,
        "reopened": table.fd_stats.reopened,
        "evicted": table.fd_stats.evicted,
        "stale": table.fd_stats.stale,
        "reserve_used": table.fd_stats.reserve_used,
    }


def render(ops: AtomicOperations) -> bytes:
    return json.dumps(snapshot(ops), indent=1, sort_keys=True).encode()


# -- text for people (``atomicfs status``) ---------------------------------------------------

def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s"


def counts_text(counts: dict[str, int], label: str = "") -> str:
    """``commits 12 (new 2, rename 10)``: a total, then its non-zero parts."""
    parts = [f"{name} {n}" for name, n in sorted(counts.items()) if n]
    total = f"{label + ' ' if label else ''}{sum(counts.values())}"
    return f"{total} ({', '.join(parts)})" if parts else total


def format_text(doc: dict[str, Any]) -> str:
    """The status document as ``atomicfs status`` prints it."""
    opts = doc.get("options", {})
    lines = [
        f"atomicfs {doc.get('version', '?')} on {doc.get('mountpoint', '?')} "
        f"(source {doc.get('source', '?')}), pid {doc.get('pid', '?')}, "
        f"up {human_duration(float(doc.get('uptime_s', 0)))}",
        "options: " + " ".join(f"{k}={v}" for k, v in sorted(opts.items())),
    ]
    sessions = doc.get("sessions", [])
    lines.append(f"open sessions: {len(sessions)} (open handles {doc.get('open_handles', 0)}, "
                 f"commits in flight {doc.get('commits_in_flight', 0)}, "
                 f"staged {doc.get('staged', 0)})")
    if sessions:
        rows = [("WRITERS", "BUFFERED", "EXTENTS", "AGE", "KIND", "PATH")]
        for s in sessions:
            path = s["path"] + (" (new file)" if s.get("new_file") else "")
            kind = (f"append ({s.get('checkpoints', 0)} checkpoints)" if s.get("append")
                    else "rewrite")
            rows.append((str(s["writers"]), human_bytes(s["buffered_bytes"]), str(s["extents"]),
                         human_duration(s["age_s"]), kind, path))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            lines.append("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False))
                         + "  " + r[5])
    txs = doc.get("transactions", [])
    done = doc.get("transactions_done", {})
    lines.append(f"open transactions: {len(txs)} (since mount: "
                 f"{counts_text(done) if done else 'none'})")
    if txs:
        rows = [("ROOT PID", "AGE", "FILES", "BYTES", "CHANGES", "COMMAND")]
        for t in txs:
            rows.append((str(t["root_pid"]), human_duration(t["age_s"]), str(t["files"]),
                         human_bytes(t["bytes"]), str(t["changes"]), t["command"]))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            lines.append("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False))
                         + "  " + r[5])
    lines.append(f"commits: {counts_text(doc.get('commits', {}))}; "
                 f"{human_bytes(doc.get('bytes_committed', 0))} committed")
    cp = doc.get("checkpoints")
    if cp:
        lines.append(f"checkpoints of append sessions: {cp['made']} "
                     f"({human_bytes(cp['bytes'])} appended), {cp['failed']} failed")
    failures = doc.get("failures", {})
    lines.append("failed commits: " + (counts_text(failures) if failures else "none"))
    recoveries = doc.get("recoveries", [])
    lines.append(f"recoveries at mount: {len(recoveries) or 'none'}")
    lines.extend(f"  {line}" for line in recoveries)
    hk = doc.get("housekeeping", {})
    if hk:
        lines.append(f"shadow pool: {hk.get('shadows_ready', 0)} ready, "
                     f"{hk.get('shadows_made', 0)} made, {hk.get('shadow_pool_misses', 0)} "
                     f"asked for while empty; journal records not yet settled: "
                     f"{hk.get('journal_records_unsettled', 0)}")
    fds = doc.get("descriptors", {})
    if fds:
        lines.append(f"descriptors: {fds.get('held', '?')} held of {fds.get('limit', '?')} "
                     f"(inode fd cache {fds.get('cached_inodes', 0)}/"
                     f"{fds.get('cache_budget', '?')}, {fds.get('inodes', doc.get('inodes', 0))} "
                     f"inodes known, reopened by {fds.get('inode_mode', '?')}; reserve for "
                     f"commits {fds.get('reserve_held', 0)}/{fds.get('reserve', '?')}); "
                     f"requests failed for lack of descriptors: {fds.get('exhausted', 0)}")
    if doc.get("not_durable"):
        lines.append(f"commits done but not known durable (directory fsync failed): "
                     f"{doc['not_durable']}")
    lat = doc.get("commit_latency", {})
    if lat:
        lines.append(f"commit latency: p50 {lat['p50_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms, "
                     f"p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms "
                     f"({lat['samples']} most recent commits)")
    else:
        lines.append("commit latency: no commits yet")
    return "\n".join(lines) + "\n"

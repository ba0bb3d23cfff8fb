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


def snapshot(ops: AtomicOperations) -> dict[str, Any]:
    """The status document, composed of each component's own ``stats()``."""
    info = ops.info
    files = ops.files.stats()
    table = ops.table.stats()
    commits = ops.committer.stats()
    return {
        "version": __version__,
        "pid": os.getpid(),
        "source": info.source,
        "mountpoint": info.mountpoint,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(info.started)),
        "uptime_s": round(info.uptime(), 3),
        "options": ops.options_summary,
        "sessions": files["sessions"],
        # multi-file transactions (docs/semantics.md §14): open ones, and counts
        "transactions": ops.tx.status(),
        "transactions_done": dict(ops.tx.counts),
        "open_handles": files["open_handles"],
        "inodes": table.pop("inodes"),
        "commits": commits["commits"],
        "commits_in_flight": commits["commits_in_flight"],
        "checkpoints": ops.files.appends.stats(),
        "staged": ops.batch.stats()["staged"],
        "bytes_committed": commits["bytes_committed"],
        "failures": commits["failures"],
        "recoveries": list(ops.recovered),
        "commit_latency": commits["commit_latency"],
        "reflink": commits["reflink"],
        "journal": commits["journal"],
        "reads": ops.reads.stats(),
        # what the daemon holds against its descriptor budget (docs/semantics.md §11)
        "descriptors": {"held": open_fd_count(), **table},
        "not_durable": commits["not_durable"],
        "housekeeping": ops.housekeeper.stats(),
        "dir_fsyncs": ops.daemon.dirsyncs.stats(),
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

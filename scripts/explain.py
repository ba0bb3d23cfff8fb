"""``scripts/bench --explain``: where the time of one save goes, phase by phase.

The daemon runs with ``ATOMICFS_TIMING=FILE`` (:mod:`atomicfs.timing`): it
marks the start and end of every request handler, every step of a commit and
every hand-off to a worker thread, on CLOCK_MONOTONIC.  This program drives the
mount itself and marks the start and end of each of its own system calls on the
same clock.  Putting both on one time line splits every system call into
phases: the wait until the handler runs (the kernel, /dev/fuse, pyfuse3, trio),
each handler and the steps inside it, and the reply back to the program.

Three workloads, each a stream of the same operation on distinct files:
- ``save``: open(O_TRUNC), write 4 KiB, close (a program saving in place);
- ``atomic-save``: a program's own atomic save: create a temporary file,
  write, fsync, close, rename over the name, fsync the directory;
- ``untar-entry``: one file as GNU tar extracts it: create (O_EXCL), write,
  futimens, fchown, fchmod, close.

After each operation the program waits a few milliseconds, outside the
measured time, so the asynchronous RELEASE of one operation does not land in
the next one's time line.  The phases of one operation add up to its measured
time by construction; the table shows the median of each phase over the
stream, and how far the sum of those medians is from the median operation.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PAYLOAD = os.urandom(4096)
SETTLE = 0.005  # seconds between operations, outside the measured time

Call = tuple[str, int, int]  # (system call, start ns, end ns)


@dataclass
class Stream:
    workload: str
    calls: list[list[Call]] = field(default_factory=list)  # one list per operation

    def timed(self, op: list[Call], name: str, fn: Callable[[], object]) -> object:
        start = time.monotonic_ns()
        try:
            return fn()
        finally:
            op.append((name, start, time.monotonic_ns()))


def _save(stream: Stream, root: Path, i: int) -> None:
    op: list[Call] = []
    path = root / f"s{i}"
    fd = stream.timed(op, "open", lambda: os.open(path, os.O_WRONLY | os.O_TRUNC))
    assert isinstance(fd, int)
    stream.timed(op, "write", lambda: os.write(fd, PAYLOAD))
    stream.timed(op, "close", lambda: os.close(fd))
    stream.calls.append(op)


def _atomic_save(stream: Stream, root: Path, i: int) -> None:
    op: list[Call] = []
    path, tmp = root / f"a{i}", root / f".a{i}.tmp"
    fd = stream.timed(op, "open", lambda: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                                  0o644))
    assert isinstance(fd, int)
    stream.timed(op, "write", lambda: os.write(fd, PAYLOAD))
    stream.timed(op, "fsync", lambda: os.fsync(fd))
    stream.timed(op, "close", lambda: os.close(fd))
    stream.timed(op, "rename", lambda: os.rename(tmp, path))
    dfd = stream.timed(op, "open dir", lambda: os.open(root, os.O_RDONLY | os.O_DIRECTORY))
    assert isinstance(dfd, int)
    stream.timed(op, "fsync dir", lambda: os.fsync(dfd))
    stream.timed(op, "close dir", lambda: os.close(dfd))
    stream.calls.append(op)


def _untar_entry(stream: Stream, root: Path, i: int) -> None:
    op: list[Call] = []
    path = root / f"t{i}"
    fd = stream.timed(op, "open", lambda: os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NONBLOCK, 0o600))
    assert isinstance(fd, int)
    stream.timed(op, "write", lambda: os.write(fd, PAYLOAD))
    stream.timed(op, "futimens", lambda: os.utime(fd, ns=(time.time_ns(), 1_700_000_000 * 10**9)))
    stream.timed(op, "fchown", lambda: os.fchown(fd, os.getuid(), os.getgid()))
    stream.timed(op, "fchmod", lambda: os.fchmod(fd, 0o644))
    stream.timed(op, "close", lambda: os.close(fd))
    stream.calls.append(op)


WORKLOADS: dict[str, Callable[[Stream, Path, int], None]] = {
    "save": _save, "atomic-save": _atomic_save, "untar-entry": _untar_entry}


def prepare(root: Path, count: int) -> None:
    """Files for the in-place saves, each saved once already (names and
    attributes in the kernel's caches, as for a program saving repeatedly)."""
    for i in range(count):
        (root / f"s{i}").write_bytes(PAYLOAD)
    for i in range(count):
        (root / f"s{i}").write_bytes(PAYLOAD)


def drive(root: Path, count: int) -> list[Stream]:
    streams = []
    for name, step in WORKLOADS.items():
        stream = Stream(name)
        for i in range(count):
            step(stream, root, i)
            time.sleep(SETTLE)
        streams.append(stream)
    return streams


def paired(roots: dict[str, Path], count: int) -> list[str]:
    """``scripts/bench --paired N``: the same operations on several mounts (two builds
    side by side), interleaved one operation at a time in a rotating order, so a
    load that comes and goes on the machine falls on every build alike.  For each
    workload: each target's median operation, and for each two builds of one
    target (``T``, ``T@NAME``; in the order given), the median over rounds of the
    second one's time / the first one's (>1: the first is faster) and how many
    rounds the first won."""
    names = list(roots)
    lines = [f"Operations interleaved one at a time across {', '.join(names)}, "
             f"{count} rounds, order rotating each round.", ""]
    for workload, step in WORKLOADS.items():
        streams = {n: Stream(workload) for n in names}
        for i in range(count):
            k = i % len(names)
            for n in names[k:] + names[:k]:
                step(streams[n], roots[n], i)
                time.sleep(SETTLE / len(names))
        took = {n: [op[-1][2] - op[0][1] for op in streams[n].calls] for n in names}
        lines += [f"### {workload}", "", "| target | median µs |", "|---|---:|"]
        lines += [f"| {n} | {statistics.median(took[n]) / 1000:.0f} |" for n in names]
        lines.append("")
        for i, n in enumerate(names):
            for twin in (t for t in names[i + 1:] if t.split("@")[0] == n.split("@")[0]):
                ratios = [b / a for a, b in zip(took[n], took[twin], strict=True)]
                wins = sum(r > 1 for r in ratios)
                lines.append(f"- {n} vs {twin}: {statistics.median(ratios):.3f}× "
                             f"(faster in {wins} of {len(ratios)} rounds)")
        lines.append("")
    return lines


# -- the time line ---------------------------------------------------------------

Event = tuple[int, str]  # (ns, label)


def load_marks(path: Path) -> list[Event]:
    """The daemon's marks as labelled events, in time order."""
    events: list[Event] = []
    with open(path) as f:
        for line in f:
            ns, number, request, what = json.loads(line)
            if what == request:  # the fault point at a handler's start: same as "req"
                continue
            if not number:  # background work (a group persist): no request's step; its
                continue    # time shows in the phase of the request it delayed
            if what == "req":
                label = f"{request.upper()} handler starts"
            elif what == "reply":
                label = f"{request.upper()} handler returns"
            else:
                label = what
            events.append((ns, label))
    events.sort()
    return events


def phases_of(op: list[Call], events: list[Event]) -> list[tuple[str, int]]:
    """Split one operation's time into labelled phases (they add up to its time)."""
    import bisect

    times = [ns for ns, _ in events]
    out: list[tuple[str, int]] = []
    seen: dict[str, int] = defaultdict(int)
    for index, (call, start, end) in enumerate(op):
        if index:
            out.append(("(the program, between its calls)", start - op[index - 1][2]))
        points: list[Event] = [(start, f"{call}() called")]
        lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
        points += events[lo:hi]
        points.append((end, f"{call}() returns"))
        for (t0, a), (t1, b) in zip(points, points[1:], strict=False):
            label = f"{call}(): {a} → {b}"
            seen[label] += 1
            if seen[label] > 1:
                label += f" (#{seen[label]})"
            out.append((label, t1 - t0))
    return out


CATEGORIES = (
    "the daemon's handlers (its own code, link, rename, copies, metadata)",
    "kernel, /dev/fuse, pyfuse3 and trio, up to the first handler",
    "kernel, /dev/fuse, pyfuse3 and trio, between two requests",
    "hand-offs to a worker thread",
    "returns from a worker thread",
    "the file's fsync",
    "the directory's fsync",
    "the reply, back to the program",
    "the program itself, and calls that sent no request",
)


def category(label: str) -> str:
    """Which kind of cost a phase is (for the summary table)."""
    if label.startswith("(the program"):
        return CATEGORIES[8]
    a, _, b = label.split(": ", 1)[-1].partition(" → ")
    if a.startswith("handoff:") and b.startswith("thread:"):
        return CATEGORIES[3]
    if a.startswith("thread-end:") and b.startswith("resumed:"):
        return CATEGORIES[4]
    if (a, b) in (("commit.before_fsync", "commit.after_fsync"),
                  ("thread:sync_data", "thread-end:sync_data")):  # batch: the group's
        return CATEGORIES[5]
    if ((a.startswith("thread:fsync") and b.startswith("thread-end:fsync"))
            or (a, b) == ("commit.dir_fsync", "commit.after_dir_fsync")
            or (a in ("dirs.before_fsync", "persist.before_dir_fsync")
                and b.startswith("thread-end:"))):
        return CATEGORIES[6]
    if a.endswith("() called") and b.endswith("handler starts"):
        return CATEGORIES[1]
    if a.endswith("handler returns") and b.endswith("handler starts"):
        return CATEGORIES[2]
    if a.endswith("handler returns") and b.endswith("() returns"):
        return CATEGORIES[7]
    if a.endswith("() called") and b.endswith("() returns"):
        return CATEGORIES[8]
    return CATEGORIES[0]


def summary(streams: list[Stream], events: list[Event]) -> list[str]:
    """Mean µs per operation in each kind of cost, one column per workload."""
    cols = []
    for stream in streams:
        sums: dict[str, float] = defaultdict(float)
        for op in stream.calls:
            for label, ns in phases_of(op, events):
                sums[category(label)] += ns / 1000 / len(stream.calls)
        cols.append(sums)
    lines = ["| where the time goes (mean µs per operation) | "
             + " | ".join(s.workload for s in streams) + " |",
             "|---|" + "---:|" * len(streams)]
    for cat in CATEGORIES:
        lines.append(f"| {cat} | " + " | ".join(
            f"{c.get(cat, 0):.0f} ({c.get(cat, 0) / sum(c.values()):.0%})" for c in cols) + " |")
    lines.append("| **total** | " + " | ".join(f"{sum(c.values()):.0f}" for c in cols) + " |")
    return lines + [""]


def table(stream: Stream, events: list[Event], heading: str) -> list[str]:
    per_op: list[dict[str, int]] = []
    position: dict[str, list[int]] = defaultdict(list)
    totals = []
    for op in stream.calls:
        totals.append(op[-1][2] - op[0][1])
        sums: dict[str, int] = defaultdict(int)
        for index, (label, ns) in enumerate(phases_of(op, events)):
            sums[label] += ns
            position[label].append(index)
        per_op.append(sums)
    n = len(per_op)
    labels = sorted(position, key=lambda lb: statistics.mean(position[lb]))
    # a phase missing from an operation counts as 0 there
    values = {lb: [sums.get(lb, 0) for sums in per_op] for lb in labels}
    medians = {lb: statistics.median(v) for lb, v in values.items()}
    means = {lb: statistics.mean(v) for lb, v in values.items()}
    total, mean_total = statistics.median(totals), statistics.mean(totals)
    summed = sum(medians.values())
    lines = [f"### {heading}", "",
             f"{n} operations; median {total / 1000:.0f} µs. The phase medians add up to "
             f"{summed / 1000:.0f} µs ({summed / total:.0%} of the median operation); the "
             f"phase means add up to the mean operation, {mean_total / 1000:.0f} µs.", "",
             "| phase | median µs | mean µs | share of the mean | seen in |",
             "|---|---:|---:|---:|---:|"]
    for lb in labels:
        seen = sum(1 for sums in per_op if lb in sums)
        if means[lb] < 2000 and seen < n // 2:
            continue  # rare and short: an asynchronous request that slipped in
        lines.append(f"| {lb} | {medians[lb] / 1000:.0f} | {means[lb] / 1000:.0f} | "
                     f"{means[lb] / mean_total:.0%} | {seen}/{n} |")
    lines.append("")
    return lines


def explain(root: Path, marks: Path, streams: list[Stream], title: str) -> list[str]:
    events = load_marks(marks)
    lines = [f"## {title}", ""] + summary(streams, events)
    for stream in streams:
        lines += table(stream, events, stream.workload)
    return lines

#!/usr/bin/env python3
"""Count and time the FUSE requests a command sends to one mount, by opcode.

    sudo .venv/bin/python scripts/fuse_requests.py MOUNTPOINT [--per N] [--sequence K] -- CMD...

Any FUSE filesystem (atomicfs, the pyfuse3 passthrough peer, bindfs): the
kernel's own tracepoints ``fuse:fuse_request_send`` and ``fuse:fuse_request_end``
(Linux 6.16+) are enabled in a private tracing instance, filtered to the
mount's connection, while CMD runs.  For each opcode: how many requests (and
per unit with ``--per N``, e.g. per untarred entry), how many failed and with
which errno, and the round trip as the kernel sees it (from the request queued
to the reply received: the daemon's whole cost, plus the wake-ups), median and
total.  ``--sequence K`` prints K consecutive requests from the middle of the
run, in order, with the process that sent each: what one unit of work costs.

Needs root and tracefs (``mount -t tracefs nodev /sys/kernel/tracing`` if
``/sys/kernel/tracing`` is empty).  FORGET is not traced by the kernel.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

TRACING = Path("/sys/kernel/tracing")
LINE = re.compile(r"^\s*(?P<comm>.+?)-(?P<pid>\d+)\s+\[\d+\]\s+\S+\s+(?P<ts>\d+\.\d+): "
                  r"(?P<event>fuse_request_send|fuse_request_end): connection (?P<conn>\d+) "
                  r"req (?P<req>\d+) (?P<rest>.*)$")
SEND = re.compile(r"opcode \d+ \(FUSE_(?P<op>\w+)\) len \d+")
END = re.compile(r"len \d+ error (?P<error>-?\d+)")


@dataclass
class Request:
    op: str
    comm: str
    sent: float
    ended: float | None = None
    error: int = 0


@dataclass
class OpStats:
    count: int = 0
    times: list[float] = field(default_factory=list)  # µs, requests with a reply
    errors: Counter[str] = field(default_factory=Counter)


def parse(text: str) -> list[Request]:
    """The requests of one trace, in the order they were sent."""
    pending: dict[tuple[str, str], Request] = {}
    done: list[Request] = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m is None:
            continue
        key = (m["conn"], m["req"])
        ts = float(m["ts"])
        if m["event"] == "fuse_request_send":
            s = SEND.match(m["rest"])
            if s is None:
                continue
            req = Request(s["op"], m["comm"], ts)
            pending[key] = req
            done.append(req)
        else:
            req_end = pending.pop(key, None)
            e = END.match(m["rest"])
            if req_end is not None and e is not None:
                req_end.ended = ts
                req_end.error = int(e["error"])
    return done


def summarise(requests: list[Request]) -> dict[str, OpStats]:
    stats: dict[str, OpStats] = defaultdict(OpStats)
    for r in requests:
        s = stats[r.op]
        s.count += 1
        if r.ended is not None:
            s.times.append((r.ended - r.sent) * 1e6)
        if r.error:
            s.errors[errno.errorcode.get(-r.error, str(r.error))] += 1
    return dict(stats)


def table(stats: dict[str, OpStats], per: int) -> list[str]:
    total_n = sum(s.count for s in stats.values())
    total_t = sum(sum(s.times) for s in stats.values())
    lines = ["| request | count | per unit | failed | median µs | total ms | share |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for op, s in sorted(stats.items(), key=lambda kv: -kv[1].count):
        failed = ", ".join(f"{n} {e}" for e, n in s.errors.most_common()) or ""
        med = statistics.median(s.times) if s.times else 0.0
        tot = sum(s.times) / 1000
        share = 100 * sum(s.times) / total_t if total_t else 0.0
        lines.append(f"| {op} | {s.count} | {s.count / per:.2f} | {failed} | {med:.0f} "
                     f"| {tot:.0f} | {share:.0f}% |")
    lines.append(f"| **all** | {total_n} | {total_n / per:.2f} | | | {total_t / 1000:.0f} | |")
    return lines


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def trace(mountpoint: Path, cmd: list[str]) -> tuple[str, int]:
    """Run CMD with the mount's requests traced; (trace text, CMD's status)."""
    if not (TRACING / "instances").is_dir():
        raise SystemExit(f"no tracefs at {TRACING}: mount -t tracefs nodev {TRACING}")
    if not (TRACING / "events" / "fuse" / "fuse_request_send").is_dir():
        raise SystemExit("this kernel has no fuse tracepoints (Linux 6.16+)")
    conn = os.stat(mountpoint).st_dev
    inst = TRACING / "instances" / f"fuse-requests-{os.getpid()}"
    inst.mkdir()
    try:
        _write(inst / "buffer_size_kb", "65536")
        _write(inst / "trace_clock", "mono")
        for ev in ("fuse_request_send", "fuse_request_end"):
            _write(inst / "events" / "fuse" / ev / "filter", f"connection == {conn}")
            _write(inst / "events" / "fuse" / ev / "enable", "1")
        status = subprocess.run(cmd).returncode
        for ev in ("fuse_request_send", "fuse_request_end"):
            _write(inst / "events" / "fuse" / ev / "enable", "0")
        text = (inst / "trace").read_text()
        lost = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", text)
        if lost and lost[1] != lost[2]:
            print(f"warning: the trace buffer lost events ({lost[1]} of {lost[2]} kept)",
                  file=sys.stderr)
        return text, status
    finally:
        inst.rmdir()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mountpoint", type=Path)
    ap.add_argument("--per", type=int, default=1, help="units of work (e.g. entries)")
    ap.add_argument("--sequence", type=int, default=0, metavar="K",
                    help="print K consecutive requests from the middle of the run")
    ap.add_argument("--save", type=Path, help="keep the raw trace in this file")
    argv = sys.argv[1:]
    if "--" not in argv:
        ap.error("no command: MOUNTPOINT [options] -- CMD...")
    cut = argv.index("--")
    args, cmd = ap.parse_args(argv[:cut]), argv[cut + 1:]
    if not cmd:
        ap.error("no command")
    text, status = trace(args.mountpoint, cmd)
    if args.save:
        args.save.write_text(text)
    requests = parse(text)
    print("\n".join(table(summarise(requests), args.per)))
    if args.sequence:
        mid = len(requests) // 2
        print()
        for r in requests[mid:mid + args.sequence]:
            took = f"{(r.ended - r.sent) * 1e6:.0f} µs" if r.ended is not None else "-"
            err = f" {errno.errorcode.get(-r.error, r.error)}" if r.error else ""
            print(f"  {r.comm:12s} {r.op:12s} {took}{err}")
    if status:
        print(f"the command exited {status}", file=sys.stderr)
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""The torture's checker (scripts/torture.py): after a crash and recovery, every
file of SOURCE must hold a complete version that was started, not older than
the last one durable before the crash; nothing else may be in the tree.

:class:`Checker` is a mixin of the driver's ``Torture``: it reads the writers'
side logs (:meth:`Checker.load_logs`), the tree (:meth:`Checker.check_tree`),
the appender's log and the daemons' logs, and appends what it finds wrong to
``self.violations``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torture_workloads import (
    ABSENT,
    APPLOG,
    DEAD_ERRNOS,
    SPIN_PLACES,
    State,
    Torn,
    applog_lines,
    parse,
    parse_w,
    read_all,
    spin_fid,
    spin_names,
)


@dataclass
class Op:
    v: int
    method: str
    digest: str
    tmp: str | None = None
    events: set[str] = field(default_factory=set)


@dataclass
class Stats:
    rounds: int = 0
    crashes: int = 0
    fault_crashes: int = 0
    kill_crashes: int = 0
    files_checked: int = 0
    torn: int = 0
    versions_verified: int = 0
    live_reads: int = 0
    ops_started: int = 0
    ops_done: int = 0
    fsyncs: int = 0
    tmp_kept: int = 0
    leftovers: int = 0
    missed_faults: list[str] = field(default_factory=list)


class Checker:
    """The checks of a round (a mixin of the driver's ``Torture``, whose state it reads)."""

    def check_out(self, log: Path, who: str) -> None:
        """A writer's or worker's stdout/stderr (``.out`` beside its log) must be empty."""
        out = log.with_suffix(".out")
        text = out.read_text() if out.exists() else ""
        if text.strip():
            self.violations.append(f"{out.name}: {who} printed:\n{text[-2000:]}")

    def check_applog(self, r: int, rdir: Path, via_mount: bytes | None) -> None:
        """The appender's file: whole lines, a prefix, every fsync'ed line kept."""
        data = read_all(self.src / APPLOG)
        if data is None:
            return  # the appender never got to create it
        if via_mount != data:
            self.violations.append(f"round {r + 1}: {APPLOG}: read through the recovery "
                                   "mount differs from SOURCE")
        try:
            n = applog_lines(data)
        except Torn as exc:
            self.stats.torn += 1
            self.violations.append(f"round {r + 1}: TORN {APPLOG}: {exc}")
            return
        log = rdir / "appender-0.log"
        synced = 0
        for line in (log.read_text().splitlines() if log.exists() else []):
            with contextlib.suppress(json.JSONDecodeError):
                ev = json.loads(line)
                if ev.get("e") == "F":
                    synced = max(synced, ev["n"])
        if n < synced:
            self.violations.append(f"round {r + 1}: {APPLOG} has {n} lines, but {synced} "
                                   "were fsync'ed")
        if n < self.applog_lines:
            self.violations.append(f"round {r + 1}: {APPLOG} shrank from "
                                   f"{self.applog_lines} lines to {n}")
        self.applog_lines = n
        self.check_out(log, "appender")

    def check_log(self, r: int, who: str, text: str) -> None:
        bad = [line for line in text.splitlines()
               if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]
        if bad:
            self.violations.append(f"round {r + 1}: {who} logged errors:\n" + "\n".join(bad[:10])
                                   + "\n--- log tail ---\n" + text[-3000:])

    def leftovers(self) -> list[str]:
        d = self.src / ".atomicfs"
        return sorted(os.listdir(d)) if d.is_dir() else []

    # -- logs -----------------------------------------------------------------------
    def load_logs(self, rdir: Path, death: float) -> tuple[dict[str, list[Op]], dict[str, int]]:
        ops: dict[str, dict[int, Op]] = {}
        counts = {"S": 0, "C": 0, "F": 0}
        for path in sorted(rdir.glob("writer-*.log")):
            for line in path.read_text().splitlines():
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                e, fid, v = ev["e"], ev["f"], ev["v"]
                if e == "S":
                    ops.setdefault(fid, {})[v] = Op(v, ev["m"], ev["d"], ev.get("tmp"))
                    counts["S"] += 1
                elif e == "N":
                    self.linked.add(fid)
                elif e in "CcFKT" and v in ops.get(fid, {}):
                    ops[fid][v].events.add(e)
                    counts["C"] += e == "C"
                    counts["F"] += e == "F"
                elif e == "R":
                    self.stats.live_reads += 1
                elif e == "X":
                    self.violations.append(f"{path.name}: {fid}: {ev['msg']} "
                                           f"(got {ev.get('got')}, expected {ev.get('expect')})")
                elif e == "E":
                    if ev.get("dead") or ev.get("errno") in DEAD_ERRNOS:
                        continue
                    if ev["ts"] < death - 0.05:
                        self.violations.append(f"{path.name}: {fid} v{v}: error while the "
                                               f"daemon was alive: {ev['msg']}")
            self.check_out(path, "writer")
        self.stats.ops_started += counts["S"]
        self.stats.ops_done += counts["C"]
        self.stats.fsyncs += counts["F"]
        return {f: [o[v] for v in sorted(o)] for f, o in ops.items()}, counts

    # -- the check ----------------------------------------------------------------------
    def observe(self, path: Path, fid: str) -> tuple[State | None, str | None]:
        data = read_all(path)
        if data is None:
            return (0, ABSENT), None
        try:
            return parse(data, fid), None
        except Torn as exc:
            return None, str(exc)

    def check_tree(self, r: int, ops: dict[str, list[Op]],
                   through_mount: dict[str, bytes | None]) -> tuple[int, int]:
        bad = self.violations.append
        rn = r + 1
        checked = kept = 0
        allowed_paths = {".", *{os.path.dirname(f) for f in self.all_files}, *self.all_files}
        tmp_present = []
        for fid in self.all_files:
            self.stats.files_checked += 1
            state, torn = self.observe(self.src / fid, fid)
            src_bytes = read_all(self.src / fid)
            if through_mount[fid] != src_bytes:
                bad(f"round {rn}: {fid}: read through the recovery mount differs from SOURCE")
            if state is None:
                self.stats.torn += 1
                bad(f"round {rn}: TORN {fid}: {torn}; versions started this round: "
                    + self.describe(ops.get(fid, [])))
                self.forget(fid)
                continue
            file_ops = ops.get(fid, [])
            durable = [o for o in file_ops if self.durable(o)]
            if durable:
                floor = durable[-1].v
                allowed = [(o.v, o.digest) for o in file_ops if o.v >= floor]
            else:
                allowed = [self.state[fid]] + [(o.v, o.digest) for o in file_ops]
            ok = (any(d == ABSENT for _, d in allowed) if state[1] == ABSENT
                  else state in allowed)
            if not ok:
                what = "missing" if state[1] == ABSENT else f"version {state[0]}"
                bad(f"round {rn}: {fid}: {what} is not allowed; allowed "
                    f"{[v for v, _ in allowed]} (base {self.state[fid][0]}); ops: "
                    + self.describe(file_ops))
                self.forget(fid)
                continue
            if state[1] != ABSENT:
                self.stats.versions_verified += 1
            if os.path.basename(fid)[0] == "Q":
                allowed_paths.add(fid + ".lnk")
                problem = self.check_link(rn, fid, state)
                if problem:
                    bad(problem)
                    self.forget(fid)
                    continue
            checked += 1
            for o in file_ops:  # temporary files of rename-over operations
                if o.tmp is None:
                    continue
                allowed_paths.add(o.tmp)
                tpath = self.src / o.tmp
                if not os.path.lexists(tpath):
                    continue
                tstate, ttorn = self.observe(tpath, fid)
                if tstate is None:
                    self.stats.torn += 1
                    bad(f"round {rn}: TORN temporary file {o.tmp} (version {o.v} of {fid}): "
                        f"{ttorn}")
                elif tstate != (o.v, o.digest):
                    bad(f"round {rn}: temporary file {o.tmp} holds {tstate[0]}, not {o.v}")
                elif not ({"K", "T"} & o.events):
                    bad(f"round {rn}: temporary file {o.tmp} exists although its writer never "
                        "reached close() or fsync() (a new file must not survive a crash "
                        "before its first commit)")
                elif "C" in o.events:
                    bad(f"round {rn}: temporary file {o.tmp} still exists after its "
                        "rename returned")
                elif state == (o.v, o.digest):
                    bad(f"round {rn}: version {o.v} of {fid} is both renamed and in {o.tmp}")
                else:
                    self.stats.versions_verified += 1
                    kept += 1
                tmp_present.append(tpath)
            self.state[fid] = state
        # nothing else in the tree
        if (self.src / ".atomicfs").exists():
            bad(f"round {rn}: SOURCE/.atomicfs still exists after the clean unmount: "
                f"{os.listdir(self.src / '.atomicfs')}")
        for dirpath, dirnames, filenames in os.walk(self.src):
            rel = os.path.relpath(dirpath, self.src)
            for name in dirnames + filenames:
                p = os.path.normpath(os.path.join(rel, name))
                if (p not in allowed_paths and not p.startswith(".atomicfs")
                        and p.split("/")[0] not in self.foreign):
                    bad(f"round {rn}: unexpected entry in SOURCE: {p}")
        for t in tmp_present:  # the application's leftovers: clean up for the next round
            t.unlink()
        self.stats.tmp_kept += kept
        return checked, kept

    def forget(self, fid: str) -> None:
        """After a violation: remove the file, so later rounds (--keep-going) start afresh."""
        for p in (self.src / fid, self.src / (fid + ".lnk")):
            if os.path.lexists(p):
                p.unlink()
        self.state[fid] = (0, ABSENT)
        self.linked.discard(fid)

    def durable(self, o: Op) -> bool:
        """Did the writer see version o.v made durable before the crash?

        durability=full: close() (C), fsync() (F), a rename or unlink that returned.
        durability=batch: fsync() only (and unlink, a namespace operation); a commit
        by close() may be lost with the group that had not been persisted yet.
        """
        if o.method == "unlink":
            return "C" in o.events
        if self.batch:
            return "F" in o.events
        return "C" in o.events or "F" in o.events

    def check_link(self, rn: int, fid: str, state: State) -> str | None:
        """Q files: the second name is the same file (the link never splits)."""
        link = self.src / (fid + ".lnk")
        if not os.path.lexists(link):
            if fid in self.linked:
                return f"round {rn}: {fid}.lnk, the file's second name, is gone"
            return None
        if state[1] == ABSENT:
            return f"round {rn}: {fid}.lnk exists without {fid}"
        a, b = os.stat(self.src / fid), os.stat(link)
        if (a.st_ino, a.st_nlink) != (b.st_ino, 2):
            return (f"round {rn}: the hard link {fid} / {fid}.lnk is split (inodes {a.st_ino}, "
                    f"{b.st_ino}, nlink {a.st_nlink}, {b.st_nlink})")
        self.linked.add(fid)
        return None

    @staticmethod
    def describe(file_ops: list[Op]) -> str:
        return ", ".join(f"{o.v}:{o.method}[{''.join(sorted(o.events))}]"
                         for o in file_ops[-6:]) or "none"

    def check_stress_logs(self, rdir: Path, dirs: list[str]) -> dict[str, int]:
        bad = self.violations.append
        counts = dict.fromkeys(["R", "L", "M", "C", "races"], 0)
        last: dict[str, int] = {}
        for log in sorted(rdir.glob("*.log")):
            role = log.name.split("-")[0]
            if role not in ("spin", "reader", "mover"):
                continue
            done = False
            for line in log.read_text().splitlines():
                ev = json.loads(line)
                e = ev["e"]
                if e in counts:
                    counts[e] += 1
                if e == "C":
                    last[ev["f"]] = max(last.get(ev["f"], 1), ev["v"])
                elif e == "X":
                    bad(f"{log.name}: {ev.get('f')}: {ev['msg']}")
                elif e == "E":
                    bad(f"{log.name}: error while the daemon was alive: {ev['msg']}")
                elif e == "D":
                    done = True
                    counts["races"] += ev.get("races", 0)
            if not done:
                bad(f"{log.name}: the worker did not finish")
            self.check_out(log, "worker")
        # the tree: each directory at exactly one place, each file its last version
        for d in dirs:
            places = [p.format(d=d) for p in SPIN_PLACES if (self.src / p.format(d=d)).is_dir()]
            if len(places) != 1:
                bad(f"spin directory {d} is at {places} in SOURCE, want exactly one place")
                continue
            where = self.src / places[0]
            names = sorted(os.listdir(where))
            if names != sorted(spin_names()):
                bad(f"{places[0]} holds {names}, want {sorted(spin_names())}")
            for name in spin_names():
                fid = spin_fid(d, name)
                try:
                    v = parse_w((where / name).read_bytes(), fid)[0]
                except (Torn, FileNotFoundError) as exc:
                    self.stats.torn += 1
                    bad(f"{places[0]}/{name}: {exc}")
                    continue
                if v != last.get(fid, 1):
                    bad(f"{places[0]}/{name}: version {v}, the last committed is "
                        f"{last.get(fid, 1)}")
                else:
                    self.stats.versions_verified += 1
        return counts


#!/usr/bin/env python3
"""Crash torture for atomicfs: the atomicity promise under crashes and load.

Each round mounts atomicfs on a SOURCE that persists across rounds, starts W
writer processes that rewrite self-checking files through the mount the ways
legacy programs do, crashes the daemon, kills the writers, detaches the dead
mount, remounts (recovery runs), unmounts cleanly and checks every file of
SOURCE.  Rounds alternate: kill -9 at a random moment (0.2-2 s), then
``ATOMICFS_FAULTS=exit:<point>`` for each commit step and each journal step in
turn (the daemon dies at the first commit reaching it); every third round
mounts with ``durability=batch`` (--batch-every).  ``--kill-writers`` also
kills one writer mid-round while the daemon lives (a program dying mid-write).

File kinds (the first letter of a file's name), every version verifiable:

- ``W`` whole file: header (magic, version, body length, sha256 of the body,
  file id) + a body generated from (file id, version).  Written by O_TRUNC
  rewrite, the shell's open/dup2/close-then-write, overwrite + ftruncate,
  ftruncate(0) + write, new file + rename over the old; sometimes unlinked.
- ``L`` log: a hash chain of records (each: version, index, previous record's
  hash, body sha256, file id).  Written by O_APPEND (one record per version,
  in several write() calls) and compacted by new file + rename.
- ``P`` fixed size: a 256-byte header (version, sha256 of the body) + 64
  records of 256 bytes, each with its own index, the version that wrote it and
  a checksum.  Patched in place: pwrite() of a few records in the middle, then
  of the header (or the same through a MAP_SHARED mapping).  A version is
  complete when every record checks and the body hashes to the header's sum.
- ``Q``: a P file with a second hard link ``<name>.lnk`` (its commits are
  journalled in place; the link must never split).  Only as root (the journal
  needs open_by_handle_at; without it such commits are documented as not
  crash-atomic).
- ``B``: a 10 MiB P file (one, shared): small patches of a large file, which
  ``commit=auto`` journals in place.

A long-lived appender holds ``applog`` open for the whole round and appends
numbered lines, one write() each, with an fsync every 25 lines (logged once it
returned): after the crash the file must be whole lines numbered from 0 (a
prefix of all it ever wrote, across rounds: checkpoints, docs/semantics.md §10)
holding at least every line fsync'ed.

Writers log to a side file outside the mount (fsync'ed): ``S`` before an
operation starts (with the digest the new version will have), ``F`` when an
fsync returned, ``K`` before closing a temporary file, ``T`` when a temporary
file was fsync'ed, ``C`` when the operation completed (close or rename
returned), ``E`` on an error.  After the crash each file must hold a complete
version, one that was started, and not older than the last version that was
durable (closed, fsync'ed or renamed) before the crash.  Temporary files may
survive only if their writer reached their close or fsync, and only complete.
Nothing else may be in the tree (no ``.atomicfs`` after the clean unmount).

Writers also check every file they read through the mount (close-to-open: an
open after a close() returned sees what it committed).

``--stress SECONDS`` runs no crash: one mount, the writers above, plus "spin"
writers, readers and a mover.  The mover renames a few directories between
places (also across parents) all the time; spin writers rewrite the files in
them (by temp + rename and in place) through a directory fd, so their commits
land wherever the directory went; readers read the rename-replaced files with
one read() each (a complete version, never older than one seen before) and
list the moving directories (exactly their files).  A worker whose log stops
growing for 30 s is a hang (the daemon's stacks go to its log).  After a
clean unmount, every file must be exactly its last committed version.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from torture_checker import Checker, Stats
from torture_workloads import (
    ABSENT,
    APPLOG,
    SPIN_PLACES,
    VERSION_STEP,
    WORKERS,
    State,
    make_w,
    read_all,
    spin_dirs,
    spin_fid,
    spin_names,
    worker_main,
    writer_main,
)

from atomicfs.harness import Daemon, detach

ROOT = Path(__file__).resolve().parent.parent
# The atomicfs package the daemon runs: this checkout, or ATOMICFS_CODE (a directory
# holding an ``atomicfs`` package, e.g. an exported commit) to test another version.
CODE = Path(os.environ.get("ATOMICFS_CODE") or ROOT).resolve()
PYTHON = sys.executable

# the daemon's crash points (atomicfs/faults.py), taken in turn by every other round
FAULT_POINTS = ["commit.before_fsync", "commit.after_fsync", "commit.after_link",
                "commit.after_rename", "commit.after_dir_fsync",
                "journal.before_header", "journal.before_record_fsync", "journal.after_record",
                "journal.mid_apply", "journal.after_apply", "journal.after_target_fsync",
                "journal.after_retire",
                # a log's commit by appending in place (atomicfs/appends.py): L files
                "append.after_record", "append.after_copy", "append.before_fsync",
                "append.before_retire"]


# ================================================================================
# The driver: the mount (atomicfs/harness.py) and the crash rounds
# ================================================================================
def start_daemon(source: Path, mnt: Path, log: Path, options: list[str],
                 faults: str | None = None) -> Daemon:
    """Mount atomicfs (CODE's) on ``mnt`` (atomicfs/harness.py), ATOMICFS_FAULTS=``faults``."""
    # the logs (L) are small: with this knob their closes commit by appending in
    # place too (atomicfs/appends.py), so the append.* crash points are reached
    env = {"ATOMICFS_FAULTS": faults,  # None: not set at all
           "ATOMICFS_APPEND_MIN": os.environ.get("ATOMICFS_APPEND_MIN", "0")}
    daemon = Daemon(source, mnt, options, log, env, code=CODE)
    daemon.start()
    return daemon


def file_set(writers: int, own: dict[str, int], shared: dict[str, int]
             ) -> tuple[dict[int, list[str]], list[str]]:
    per = {w: [f"w{w}/{k}{i}" for k, n in own.items() for i in range(n)] for w in range(writers)}
    sh = [f"shared/{k}{i}" for k, n in shared.items() for i in range(n)]
    return per, sh


class Torture(Checker):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = Path(args.workdir).resolve()
        self.src = self.work / "src"
        self.mnt = self.work / "mnt"
        self.locks = self.work / "locks"
        for d in (self.src, self.mnt, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        # Q (hard-linked) files need the journal, which needs root (open_by_handle_at);
        # without it their in-place commits are documented as not crash-atomic.
        self.own, self.shared = file_set(args.writers,
                                         {"W": 3, "L": 2, "P": 2, "Q": int(os.geteuid() == 0)},
                                         {"W": 2, "L": 1, "P": 1, "B": 1})
        self.all_files = [f for fs in self.own.values() for f in fs] + self.shared
        for d in {os.path.dirname(f) for f in self.all_files}:
            (self.src / d).mkdir(exist_ok=True)
        self.state: dict[str, State] = {f: (0, ABSENT) for f in self.all_files}
        self.stats = Stats()
        self.violations: list[str] = []
        self.how = ""
        self.round_violations = 0
        self.batch = False  # this round mounts with durability=batch
        self.linked: set[str] = set()  # Q files whose second name was made
        self.foreign: set[str] = {APPLOG}  # top-level names check_tree leaves to others
        self.applog_lines = 0

    def verdict(self, ok: str) -> int:
        """The last lines of a run: every violation (50 at most), or ``ok``; the exit code."""
        if self.violations:
            self.say(f"FAILED: {len(self.violations)} violation(s); workdir kept: {self.work}")
            for v in self.violations[:50]:
                self.say("  " + v.replace("\n", "\n    "))
            return 1
        self.say(ok)
        return 0

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def mode(self, r: int) -> str:
        if r % 2 == 0:
            return "kill"
        point = FAULT_POINTS[(r // 2) % len(FAULT_POINTS)]
        if point == "commit.before_fsync" and self.batch_round(r):
            return "kill"  # batch commits do not fsync; the group persist does
        return point

    def batch_round(self, r: int) -> bool:
        k = self.args.batch_every
        return k > 0 and r % k == k - 1

    def run(self) -> int:
        a = self.args
        self.say(f"atomicfs torture: seed {a.seed}, {a.crashes} crash rounds, {a.writers} "
                 f"writers, workdir {self.work}, atomicfs from {CODE}")
        t0 = time.monotonic()
        for r in range(a.crashes):
            try:
                self.round(r)
            except Exception as exc:
                self.violations.append(f"round {r + 1}: harness failure: "
                                       f"{type(exc).__name__}: {exc}")
                detach(self.mnt)
            if self.violations and not a.keep_going:
                break
        s = self.stats
        self.say(f"SUMMARY seed={a.seed} rounds={s.rounds} crashes_survived={s.crashes} "
                 f"(kill -9: {s.kill_crashes}, fault points: {s.fault_crashes}) "
                 f"files_checked={s.files_checked} torn_files={s.torn} "
                 f"versions_verified={s.versions_verified} live_reads_verified={s.live_reads} "
                 f"ops_started={s.ops_started} ops_completed={s.ops_done} fsyncs={s.fsyncs} "
                 f"app_tmp_files_kept={s.tmp_kept} recovery_leftovers={s.leftovers} "
                 f"applog_lines={self.applog_lines} "
                 f"violations={len(self.violations)} time={time.monotonic() - t0:.1f}s")
        if s.missed_faults:
            self.say("note: fault points not reached (killed instead): "
                     + ", ".join(s.missed_faults))
        return self.verdict("OK: no torn file, no lost commit, no debris")

    # -- one round --------------------------------------------------------------------
    def round(self, r: int) -> None:
        a = self.args
        rdir = self.work / "logs" / f"round-{r + 1:03d}"
        rdir.mkdir(parents=True, exist_ok=True)
        self.round_violations = len(self.violations)
        mode = self.mode(r)
        vbase = (r + 1) * VERSION_STEP
        self.reset_locks(vbase)
        self.batch = self.batch_round(r)
        options = a.options + (["durability=batch"] if self.batch else [])
        daemon = start_daemon(self.src, self.mnt, rdir / "daemon.log", options,
                              faults=None if mode == "kill" else f"exit:{mode}")
        writers: list[subprocess.Popen[bytes]] = []
        try:
            death = self.crash_round(r, rdir, mode, vbase, daemon, writers)
        finally:
            if daemon.proc.poll() is None:  # a harness failure mid-round
                daemon.proc.kill()
                daemon.proc.wait()
            for p in writers:
                if p.poll() is None:
                    p.kill()
            for p in writers:
                p.wait()
            detach(self.mnt)
        self.finish_round(r, rdir, death, daemon)

    def reset_locks(self, vbase: int) -> None:
        """Shared files: the version counter and what reads may show, under a lock file."""
        for f in self.shared:
            lock = self.locks / (f.replace("/", "_") + ".lock")
            lock.write_text(json.dumps({"counter": vbase + 5 * VERSION_STEP // 10,
                                        "expect": [list(self.state[f])]}))

    def spawn(self, rdir: Path, role: str, n: int, cfg: dict[str, Any]
              ) -> subprocess.Popen[bytes]:
        """Start a worker process (``_writer``, ``_spin``, ``_reader``, ``_mover``)."""
        cfg_path = rdir / f"{role}-{n}.json"
        cfg_path.write_text(json.dumps(cfg))
        with open(rdir / f"{role}-{n}.out", "wb") as out:
            return subprocess.Popen(
                [PYTHON, str(Path(__file__).resolve()), f"_{role}", str(cfg_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def start_writers(self, rdir: Path, vbase: int, max_seconds: float,
                      writers: list[subprocess.Popen[bytes]]) -> None:
        a = self.args
        for w in range(a.writers):
            cfg = {"id": w, "seed": self.rng.randrange(2**32), "mnt": str(self.mnt),
                   "log": str(rdir / f"writer-{w}.log"), "sync_log": not a.no_log_fsync,
                   "vbase": vbase + 1, "own": self.own[w], "shared": self.shared,
                   "base": {f: list(self.state[f]) for f in self.own[w]},
                   "locks": str(self.locks), "max_seconds": max_seconds}
            writers.append(self.spawn(rdir, "writer", w, cfg))

    def crash_round(self, r: int, rdir: Path, mode: str, vbase: int, daemon: Daemon,
                    writers: list[subprocess.Popen[bytes]]) -> float:
        a = self.args
        self.start_writers(rdir, vbase, 60, writers)
        writers.append(self.spawn(rdir, "appender", 0, {
            "seed": self.rng.randrange(2**32), "mnt": str(self.mnt), "seconds": 60,
            "log": str(rdir / "appender-0.log")}))
        start = time.monotonic()
        how = ""
        if mode == "kill":
            delay = self.rng.uniform(a.min_delay, a.max_delay)
            # a program dying mid-write, the daemon alive (docs/semantics.md §1.3)
            if a.kill_writers:
                time.sleep(delay / 2)
                victim = self.rng.randrange(len(writers))
                writers[victim].kill()
                how = f"writer {victim} killed at {delay / 2:.2f}s, "
                time.sleep(delay / 2)
            else:
                time.sleep(delay)
            died = daemon.proc.poll()
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            death = time.monotonic()
            how += f"kill -9 at {delay:.2f}s"
            if died is not None:
                self.violations.append(f"round {r + 1}: the daemon had already exited "
                                       f"({died}) before the kill:\n{daemon.log()[-3000:]}")
            self.stats.kill_crashes += 1
        else:
            deadline = start + a.max_delay + 1.0
            while daemon.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            death = time.monotonic()
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGKILL)
                daemon.proc.wait()
                how = f"{mode} not reached; kill -9 at {death - start:.2f}s"
                self.stats.missed_faults.append(mode)
                self.stats.kill_crashes += 1
            else:
                rc = daemon.proc.returncode
                how = f"exit:{mode} at {death - start:.2f}s"
                if rc != 99:
                    self.violations.append(f"round {r + 1}: daemon exited with {rc}, "
                                           f"not 99 (the fault exit):\n{daemon.log()[-3000:]}")
                self.stats.fault_crashes += 1
        self.how = how + (" (batch)" if self.batch else "")
        return death

    def finish_round(self, r: int, rdir: Path, death: float, daemon: Daemon) -> None:
        a = self.args
        how = self.how
        self.check_log(r, "crashed daemon", daemon.log())
        leftovers = self.leftovers()
        self.stats.leftovers += len(leftovers)

        # recovery: mount, look through the mount, clean unmount
        rec = start_daemon(self.src, self.mnt, rdir / "recovery.log", a.options)
        through_mount = {f: read_all(self.mnt / f) for f in self.all_files}
        applog_via_mount = read_all(self.mnt / APPLOG)
        rc = rec.unmount()
        if rc != 0:
            self.violations.append(f"round {r + 1}: recovery daemon exited with {rc}")
        self.check_log(r, "recovery daemon", rec.log())

        ops, events = self.load_logs(rdir, death)
        n_violations = self.round_violations
        checked, kept = self.check_tree(r, ops, through_mount)
        self.check_applog(r, rdir, applog_via_mount)
        self.stats.rounds += 1
        if len(self.violations) == n_violations:
            self.stats.crashes += 1
        self.say(f"round {r + 1:3d}: {how:<42} ops {events['S']:4d} started "
                 f"{events['C']:4d} done {events['F']:3d} fsync | {checked} files ok | "
                 f"leftovers {len(leftovers)} | tmp kept {kept}"
                 + ("" if len(self.violations) == n_violations
                    else f" | {len(self.violations) - n_violations} VIOLATION(S)"))


# ================================================================================
# Stress (--stress SECONDS): no crash; readers, directory renames and writers at once
# ================================================================================
HANG_SECONDS = 30.0  # a worker without progress this long: a deadlock (or a hung mount)


class Stress(Torture):
    """One mount, no crash: writers, spin writers, readers and a mover for a while;
    then a clean unmount and an exact check of the tree."""

    def run(self) -> int:
        a = self.args
        rdir = self.work / "logs" / "stress"
        rdir.mkdir(parents=True, exist_ok=True)
        dirs = spin_dirs(a.spin_dirs)
        for d in dirs:
            place = self.src / SPIN_PLACES[0].format(d=d)
            place.mkdir(parents=True)
            for name in spin_names():
                (place / name).write_bytes(make_w(spin_fid(d, name), 1, 1000)[0])
        (self.src / "mv" / "sub").mkdir(exist_ok=True)
        self.foreign.add("mv")
        self.say(f"atomicfs stress: seed {a.seed}, {a.stress:.0f} s, {a.writers} writers, "
                 f"{a.spin_writers} spin writers, {a.readers} readers, 1 mover, "
                 f"{len(dirs)} moving directories, workdir {self.work}")
        t0 = time.monotonic()
        self.reset_locks(VERSION_STEP)
        daemon = start_daemon(self.src, self.mnt, rdir / "daemon.log", a.options)
        procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        writers: list[subprocess.Popen[bytes]] = []
        hang = None
        try:
            self.start_writers(rdir, VERSION_STEP, a.stress, writers)
            procs += [(f"writer {i}", rdir / f"writer-{i}.log", p) for i, p in enumerate(writers)]
            files = [(d, n) for d in dirs for n in spin_names()]
            base = {"mnt": str(self.mnt), "seconds": a.stress, "dirs": dirs}
            for role, n, extra in (
                    [("spin", i, {"files": files[i::a.spin_writers]})
                     for i in range(a.spin_writers)]
                    + [("reader", i, {}) for i in range(a.readers)] + [("mover", 0, {})]):
                log = rdir / f"{role}-{n}.log"
                cfg = {**base, **extra, "id": n, "seed": self.rng.randrange(2**32),
                       "log": str(log)}
                procs.append((f"{role} {n}", log, self.spawn(rdir, role, n, cfg)))
            hang = self.watch(procs, daemon, t0 + a.stress + HANG_SECONDS)
        finally:
            for _, _, p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        through_mount = {f: read_all(self.mnt / f) for f in self.all_files}
        if hang is None:
            try:
                rc = daemon.unmount()
                if rc != 0:
                    self.violations.append(f"the daemon exited with {rc} at unmount")
            except RuntimeError as exc:
                self.violations.append(f"unmount: {exc}")
                daemon.kill()
        else:
            self.violations.append(hang)
            daemon.proc.send_signal(signal.SIGUSR1)  # faulthandler: stacks into its log
            time.sleep(0.5)
            daemon.kill()
        self.check_log(0, "daemon", daemon.log())
        ops, _ = self.load_logs(rdir, time.monotonic())
        self.check_tree(0, ops, through_mount)
        counts = self.check_stress_logs(rdir, dirs)
        s = self.stats
        self.say(f"STRESS seed={a.seed} seconds={time.monotonic() - t0:.1f} "
                 f"reads_verified={counts['R']} listings_verified={counts['L']} "
                 f"dir_renames={counts['M']} spin_commits={counts['C']} "
                 f"writer_ops={s.ops_done} writer_reads_verified={s.live_reads} "
                 f"path_races={counts['races']} hangs={int(hang is not None)} "
                 f"violations={len(self.violations)}")
        return self.verdict("OK: no wrong read, no hang, the tree is exactly what was committed")

    def watch(self, procs: list[tuple[str, Path, subprocess.Popen[bytes]]], daemon: Daemon,
              deadline: float) -> str | None:
        """Wait for the workers; a worker whose log stops growing for HANG_SECONDS hangs."""
        progress = {name: (-1, time.monotonic()) for name, _, _ in procs}
        while any(p.poll() is None for _, _, p in procs):
            now = time.monotonic()
            if daemon.proc.poll() is not None:
                return f"the daemon died with {daemon.proc.returncode}:\n{daemon.log()[-3000:]}"
            for name, log, p in procs:
                if p.poll() is not None:
                    continue
                size = log.stat().st_size if log.exists() else 0
                last_size, since = progress[name]
                if size != last_size:
                    progress[name] = (size, now)
                elif now - since > HANG_SECONDS or now > deadline:
                    return (f"HANG: {name} made no progress for {now - since:.0f} s "
                            "(deadlock?); daemon stacks follow in its log")
            time.sleep(0.2)
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_writer"]:
        return writer_main(argv[1])
    if argv[:1] and argv[0] in WORKERS:
        return worker_main(argv[0], argv[1])
    if any(a.split("=")[0] == "--power-cuts" for a in argv):  # scripts/powercut.py
        import powercut

        return powercut.main(argv)
    p = argparse.ArgumentParser(prog="torture", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crashes", type=int, default=10, help="crash rounds (default 10)")
    p.add_argument("--writers", type=int, default=4, help="writer processes (default 4)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--workdir", default=None, help="where SOURCE, the mount point and logs go "
                   "(default: a new temporary directory, removed on success)")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="mount options for atomicfs (e.g. -o isolation=shared)")
    p.add_argument("--min-delay", type=float, default=0.2, help="earliest kill (s)")
    p.add_argument("--max-delay", type=float, default=2.0, help="latest kill (s)")
    p.add_argument("--keep-going", action="store_true", help="go on after a violation")
    p.add_argument("--kill-writers", action="store_true",
                   help="in kill -9 rounds, first kill one writer process mid-round while the "
                   "daemon runs: what it was writing must stay intact (docs/semantics.md §1.3)")
    p.add_argument("--batch-every", type=int, default=3, metavar="K",
                   help="every K-th round mounts with durability=batch (0: never; default 3)")
    p.add_argument("--stress", type=float, metavar="SECONDS", default=None,
                   help="instead of crash rounds: one mount for SECONDS with the writers, "
                   "spin writers, readers and a mover renaming directories; then check "
                   "that no read was wrong, nothing hung, and the tree is exact")
    p.add_argument("--power-cuts", type=int, metavar="N", default=None,
                   help="instead: N power cuts per filesystem on loop-mounted XFS/ext4 "
                   "images (scripts/powercut.py --help: --fs, -o, --seed...)")
    p.add_argument("--readers", type=int, default=3, help="stress: reader processes")
    p.add_argument("--spin-writers", type=int, default=2,
                   help="stress: writers of the files in the moving directories")
    p.add_argument("--spin-dirs", type=int, default=3, help="stress: moving directories")
    p.add_argument("--no-log-fsync", action="store_true",
                   help="do not fsync the writers' side logs (the harness kills processes "
                   "only, so this loses nothing)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    options = []
    for o in args.options:
        options += [x for x in o.split(",") if x]
    args.options = options
    made = args.workdir is None
    if made:
        args.workdir = tempfile.mkdtemp(prefix="atomicfs-torture-")
    rc = 1
    try:
        rc = (Torture if args.stress is None else Stress)(args).run()
    finally:
        with contextlib.suppress(Exception):
            detach(Path(args.workdir) / "mnt")
        if made and rc == 0:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())

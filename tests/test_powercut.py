"""Power cuts (issue 12): the torture and real programs, on loop-mounted XFS and ext4.

A power cut is a shutdown of the image's filesystem without a log flush
(tests/powercutkit.py).  The bounded versions here run a few cuts per
filesystem and durability mode:

- ``test_powercut_torture``: ``scripts/torture --power-cuts 3`` (workers
  creating, rewriting, renaming, linking... through the mount); every worker's
  directory must be a prefix of its operations that includes every
  acknowledged one (docs/semantics.md §1.2, §3, §9).
- ``test_powercut_transactions``: the torture with its transaction worker
  (``--tx``: ``atomicfs run`` of a program changing contents, names,
  directories and attributes in one directory), under both durability modes;
  after each cut everything there names one transaction, not older than the
  last acknowledged, the directory has exactly that transaction's shape, and no
  staging is left (docs/semantics.md §14.6).
  ``test_a_transaction_cut_half_way`` shows the check failing for the same
  program run without ``atomicfs run``, and holding with it;
  ``test_a_transaction_cut_during_its_commit`` cuts at four steps of the
  commit, ``test_a_transaction_cut_during_its_replay`` again during recovery.
- ``test_app_through_mount``: sqlite3 (DELETE and WAL, synchronous=FULL), git,
  LMDB and a no-fsync JSON writer through the mount, each checked with its own
  invariant and its acknowledged data (tests/powercut_apps.py).
- ``test_app_raw_fails``: the same checks can fail: on the raw filesystem the
  JSON writer and git lose data within a bounded number of cuts.

Longer runs: ``ATOMICFS_POWERCUTS=N`` runs N cuts per filesystem and target
(atomicfs full, batch, raw; ``ATOMICFS_POWERCUT_TARGETS=full,raw`` picks) for
every program and prints the figures (``test_app_long``, marked slow); a
program whose check failed starts afresh, so the raw figures are rates.
The torture's long run is by hand:
``scripts/torture --power-cuts 100 --fs both [-o durability=batch]``.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import scratchfs
from conftest import ROOT, cli_env, needs_fuse
from powercut_apps import APPS, App, read_acks
from powercutkit import FS_KINDS, Cut, PowerCutFs, powercut_fs

sys.path.insert(0, str(ROOT / "scripts"))
import powercut  # noqa: E402  (scripts/powercut.py)

LONG = int(os.environ.get("ATOMICFS_POWERCUTS") or 0)
CI_CUTS = 2  # per program and mode in the bounded run
RAW_BOUND = 12  # cuts to wait for the raw filesystem to lose data
FS_OF = {"sqlite-delete": "ext4", "sqlite-wal": "xfs", "git": "xfs", "lmdb": "ext4",
         "json": "xfs"}  # the bounded run spreads the programs over both filesystems


def seed() -> int:
    return int(os.environ.get("ATOMICFS_TORTURE_SEED") or random.randrange(2**31))


# == the torture ========================================================================
def clean_torture(tmp_path: Path, *options: str) -> tuple[dict[str, str], str]:
    """``scripts/torture --power-cuts 3 OPTIONS``, which must end with 3 cuts and no
    violation of any kind: its summary fields and its output (skips where it cannot
    run)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "torture.py"), "--power-cuts", "3",
           *options, "--seed", str(seed()), "--workdir", str(tmp_path / "pc")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env(),
                         cwd=ROOT)
    out = f"$ {' '.join(cmd)}\n{res.stdout[-15000:]}\n{res.stderr[-3000:]}"
    if res.returncode == 77:
        pytest.skip(res.stdout.strip().splitlines()[-1])
    summary = re.search(r"^POWERCUT (.*)$", res.stdout, re.M)
    assert summary, out
    fields = dict(re.findall(r"(\w+)=(\S+)", summary.group(1)))
    print(out)
    assert res.returncode == 0, out
    assert fields["cuts"] == "3", out
    for kind in powercut.KINDS:
        assert fields[kind] == "0", out
    return fields, out


@needs_fuse
@pytest.mark.parametrize("mode", ["full", "batch"])
@pytest.mark.parametrize("fs", FS_KINDS)
def test_powercut_torture(tmp_path: Path, fs: str, mode: str) -> None:
    fields, out = clean_torture(tmp_path, "--fs", fs, "-o", f"durability={mode}")
    assert int(fields["ops_acked"]) > 20, f"too little was acknowledged to mean anything\n{out}"


# == transactions =======================================================================
@needs_fuse
@pytest.mark.parametrize("mode", ["full", "batch"])
@pytest.mark.parametrize("fs", FS_KINDS)
def test_powercut_transactions(tmp_path: Path, fs: str, mode: str) -> None:
    """Under both modes a transaction is acknowledged when ``atomicfs run`` exited 0
    (the commit is durable before it returns, docs/semantics.md §14.5); the plain
    worker beside it follows the mode's own acknowledgements."""
    fields, out = clean_torture(tmp_path, "--fs", fs, "-o", f"durability={mode}", "--tx",
                                "--writers", "1", "--min-delay", "1.5", "--max-delay", "3")
    assert int(fields["tx_acked"]) >= 1, f"no transaction was acknowledged\n{out}"


def cut_half_way(pc: PowerCutFs, work: Path, wrapped: bool, at: int
                 ) -> tuple[powercut.Verdict, int | None]:
    """Transaction 2 over transaction 1 in SOURCE/x0, cut after ``at`` of its steps
    (inside ``atomicfs run`` if ``wrapped``, else plainly, each change committed on
    its own)."""
    powercut.tx_setup(pc.source / powercut.TX_DIR, 1)
    pc.sync()
    ready = work / "ready"

    def workload(top: Path) -> list[subprocess.Popen[bytes]]:
        prog = [sys.executable, str(ROOT / "scripts" / "powercut.py"), "_txprog",
                str(top / powercut.TX_DIR), "2", str(at), str(ready)]
        run = [sys.executable, "-m", "atomicfs", "run", str(top), "--"] if wrapped else []
        with open(work / "prog.out", "wb") as out:
            proc = subprocess.Popen([*run, *prog], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=cli_env())
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), (work / "prog.out").read_text(errors="replace")
        return [proc]

    cut = pc.cycle(workload, 0.2, ["durability=full"], recovered_by="recover")
    assert not cut.early_exits, (work / "prog.out").read_text(errors="replace")
    assert sorted(os.listdir(pc.source)) == [powercut.TX_DIR], cut.recovery
    return powercut.verify_tx(1, [2], None, powercut.observe_tx(pc.source / powercut.TX_DIR))


# where the cut comes: after two of the four rewrites; after every change of names
# (new files and link, moves, the save by rename, rm -r and mkdir), before the
# attributes
HALF_WAY = {2: "X0=2 X1=2 X2=1 X3=1",
            powercut.TX_STEPS - 1: "D=2 D/f0=2 D/f1=2 E mtime=1 E xattr=1 K=2 L=2 M=2 N=2 "
                                   "N content=2 R=2 X0=2 X1=2 X2=2 X3=2 Y xattr=1 Y mode=610"}


@needs_fuse
@pytest.mark.parametrize("at", sorted(HALF_WAY))
@pytest.mark.parametrize("wrapped", [True, False], ids=["atomicfs-run", "per-file"])
def test_a_transaction_cut_half_way(tmp_path: Path, wrapped: bool, at: int) -> None:
    """Cut while the program waits half way: inside ``atomicfs run`` nothing of
    transaction 2 remains (and no staging); run plainly, what it did is committed
    (durability=full) and the check sees a mixed state."""
    with powercut_fs(tmp_path, "ext4") as pc:
        ver, t = cut_half_way(pc, tmp_path, wrapped, at)
    if wrapped:
        assert (ver.lines, t) == ([], 1)
    else:
        assert ver.counts == {"mixed": 1}, ver.lines
        assert HALF_WAY[at] in ver.lines[0], ver.lines


# the steps of a commit (atomicfs/transactions.py) and the transaction recovery must
# find there: before its record is durable none of it, after it all of it
COMMIT_STEPS = {"tx.before_record": 1, "tx.after_record": 2, "tx.apply": 2,
                "tx.before_dir_fsync": 2}
HOLD = 5  # seconds the commit sleeps at the point: past the cut (a process waiting for
# the daemon's answer cannot be killed before it comes, so the harness waits that long)


def commit_held(pc: PowerCutFs, work: Path, point: str, recovered_by: str = "recover"
                ) -> tuple[Cut, str]:
    """Transaction 2 (every kind of change, tx_program) over transaction 1 in SOURCE/x0,
    its commit held at ``point`` (``sleep`` fault) and the power cut there; the cut
    and the program's output."""
    ready = work / "ready"
    powercut.tx_setup(pc.source / powercut.TX_DIR, 1)
    pc.sync()

    def workload(top: Path) -> list[subprocess.Popen[bytes]]:
        prog = [sys.executable, str(ROOT / "scripts" / "powercut.py"), "_txprog",
                str(top / powercut.TX_DIR), "2", str(powercut.TX_STEPS), str(ready)]
        with open(work / "prog.out", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "atomicfs", "run", str(top), "--", *prog],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=cli_env())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not (
                ready.exists() if COMMIT_STEPS[point] == 1
                else list((pc.source / ".atomicfs").glob("tx-*/record"))):
            time.sleep(0.01)
        assert proc.poll() is None, (work / "prog.out").read_text(errors="replace")
        return [proc]

    # the program has ended (its commit runs) or the record is there: the commit
    # reaches the point well within the delay and sleeps there past the cut
    cut = pc.cycle(workload, 1.0, ["durability=full"], recovered_by=recovered_by,
                   env={"ATOMICFS_FAULTS": f"sleep:{point}:{HOLD}"})
    out = (work / "prog.out").read_text(errors="replace")
    assert not cut.early_exits, out
    return cut, f"{cut.recovery}\n{cut.daemon_log[-3000:]}\n{out}"


def tx_on_disk(pc: PowerCutFs) -> tuple[list[str], int | None]:
    """The verdict's lines and the transaction found in x0 (no staging left)."""
    assert sorted(os.listdir(pc.source)) == [powercut.TX_DIR]
    ver, t = powercut.verify_tx(1, [2], None, powercut.observe_tx(pc.source / powercut.TX_DIR))
    return ver.lines, t


@needs_fuse
@pytest.mark.parametrize("point", list(COMMIT_STEPS))
@pytest.mark.parametrize("fs", FS_KINDS)
def test_a_transaction_cut_during_its_commit(tmp_path: Path, fs: str, point: str) -> None:
    """Transaction 2 (every kind of change) over transaction 1, the power cut while
    its commit is held at ``point``.  After the image's log recovery and ``atomicfs
    recover``, x0 is transaction 1 whole or 2 whole, as COMMIT_STEPS says: a record
    written and synced is replayed (its unlinks, rmdir, moves and attributes), one
    not yet durable is discarded; no staging is left."""
    with powercut_fs(tmp_path, fs) as pc:
        cut, said = commit_held(pc, tmp_path, point)
        found = tx_on_disk(pc)
    assert found == ([], COMMIT_STEPS[point]), said
    # replayed, or discarded (its staging directory, synced before the record)
    assert ("replayed the committed transaction" in cut.recovery) == (
        COMMIT_STEPS[point] == 2), said


@needs_fuse
@pytest.mark.parametrize("fs", FS_KINDS)
def test_a_transaction_cut_during_its_replay(tmp_path: Path, fs: str) -> None:
    """The power cut after the record of transaction 2, then again while recovery
    replays it (a pause after each change, ``sleep`` fault at ``tx.replay``): some of
    its changes are replayed and durable, the rest not.  The next recovery replays
    the record again from the start, skipping what is done: transaction 2 whole."""
    with powercut_fs(tmp_path, fs) as pc:
        cut, said = commit_held(pc, tmp_path, "tx.after_record", recovered_by="none")
        assert list((pc.source / ".atomicfs").glob("tx-*/record")), said
        with open(tmp_path / "recover1.out", "wb") as out:
            first = subprocess.Popen(
                [sys.executable, "-m", "atomicfs", "recover", str(pc.source)], stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=cli_env(ATOMICFS_FAULTS="sleep:tx.replay:0.3"))
        pc.procs.append(first)
        # its first change: the removal of D1/f0 (removals come first, deepest first)
        gone = pc.source / powercut.TX_DIR / "D1" / "f0"
        deadline = time.monotonic() + 60
        while gone.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)  # a few more changes, each synced 0.3 s after it was made
        assert first.poll() is None, (tmp_path / "recover1.out").read_text()
        pc.cut()
        pc.release()
        pc.remount()
        half = powercut.observe_tx(pc.source / powercut.TX_DIR)
        again = pc.recover()
        found = tx_on_disk(pc)
    # the cut came half way: the tree was neither transaction whole
    assert powercut.verify_tx(1, [2], None, half)[1] is None, half.shape()
    assert found == ([], 2), f"{again}\n{half.shape()}\n{said}"
    assert "replayed the committed transaction" in again, again


def tx_tree(tmp_path: Path, t: int) -> Path:
    d = tmp_path / powercut.TX_DIR
    powercut.tx_setup(d, t)
    return d


def verify_tx(d: Path, base: int, begun: list[int], acked: int | None
              ) -> tuple[powercut.Verdict, int | None]:
    return powercut.verify_tx(base, begun, acked, powercut.observe_tx(d))


def test_verify_tx_whole(tmp_path: Path) -> None:
    """A whole transaction passes; older than acknowledged, or never begun, does not."""
    d = tx_tree(tmp_path, 5)
    ver, t = verify_tx(d, 4, [5, 6], 5)
    assert (ver.lines, t) == ([], 5)
    ver, t = verify_tx(d, 4, [5, 6], 6)
    assert ver.counts == {"older": 1} and t == 5, ver.lines
    ver, t = verify_tx(d, 1, [2, 3], None)
    assert ver.counts == {"lost": 1}, ver.lines
    ver, t = verify_tx(d, 5, [6], None)  # nothing of this cut's transaction: whole 5
    assert (ver.lines, t) == ([], 5)
    powercut.tx_program(str(d), 6)
    ver, t = verify_tx(d, 5, [6, 7], 6)
    assert (ver.lines, t) == ([], 6)


def _copy_file(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes())


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mtime(d: Path, t: int, frac: int = 0) -> None:
    ns = (powercut.TX_EPOCH + t) * 10**9 + frac
    os.utime(d / "E", ns=(ns, ns))


# hand-made mixes of transactions 4 and 5 in a tree of 5: each must be "mixed"
MIXES: dict[str, Callable[[Path], object]] = {
    "a rewrite of the next": lambda d: (d / "X1").write_bytes(powercut.make_tx("X1", 6)),
    "a rewrite of the one before": lambda d: (d / "X3").write_bytes(powercut.make_tx("X3", 4)),
    "the unlinked file still there": lambda d: (d / "N4").write_bytes(powercut.make_tx("N4", 4)),
    "the new file missing": lambda d: (d / "N5").unlink(),
    "the new file's link missing": lambda d: (d / "L5").unlink(),
    "the link under the old name": lambda d: (d / "L5").rename(d / "L4"),
    "the moved file at both names": lambda d: _copy_file(d / "M5", d / "M4"),
    "the moved file at its old name": lambda d: (d / "M5").rename(d / "M4"),
    "the moved symlink at its old name": lambda d: (d / "K5").rename(d / "K4"),
    "the moved symlink a file": lambda d: _file(d / "K.tmp", b"Y").replace(d / "K5"),
    "the file saved by rename older": lambda d: (d / "R").write_bytes(powercut.make_tx("R", 4)),
    "the removed directory back": lambda d: shutil.copytree(d / "D5", d / "D4"),
    "the new directory under the old name": lambda d: (d / "D5").rename(d / "D4"),
    "a file of the new directory missing": lambda d: (d / "D5" / "f1").unlink(),
    "a file of the new directory older": lambda d: (d / "D5" / "f0").write_bytes(
        powercut.make_tx("D/f0", 4)),
    "the mode of the one before": lambda d: os.chmod(d / "Y", powercut.tx_mode(4)),
    "the file's xattr of the one before": lambda d: os.setxattr(d / "Y", "user.tx", b"4"),
    "the file's xattr missing": lambda d: os.removexattr(d / "Y", "user.tx"),
    "the file's xattr not a number": lambda d: os.setxattr(d / "Y", "user.tx", b"x"),
    "the directory's xattr of the one before": lambda d: os.setxattr(d / "E", "user.tx",
                                                                      b"4"),
    "the directory's mtime of the one before": lambda d: _mtime(d, 4),
    "the directory's mtime not set by one": lambda d: _mtime(d, 5, 1),
    "the directory's mtime of another": lambda d: _mtime(d, 13),
}


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_verify_tx_finds_a_mix(tmp_path: Path, mix: str) -> None:
    d = tx_tree(tmp_path, 5)
    assert verify_tx(d, 4, [5], 5) == (powercut.Verdict(started=1, acked=1), 5)
    MIXES[mix](d)
    ver, t = verify_tx(d, 4, [5], None)
    assert ver.counts == {"mixed": 1} and t is None, ver.lines


def test_verify_tx_torn_debris_and_split_links(tmp_path: Path) -> None:
    d = tx_tree(tmp_path, 5)
    with open(d / "X2", "r+b") as f:
        f.truncate(100)
    (d / "R.new").write_bytes(powercut.make_tx("R", 6))
    ver, t = verify_tx(d, 4, [5], None)
    assert ver.counts == {"torn": 1, "mixed": 1, "debris": 1}, ver.lines
    d = tx_tree(tmp_path, 5)
    (d / "L5").unlink()
    _copy_file(d / "N5", d / "L5")  # two files where one had two names
    (d / "D5" / ".atomicfs~x").write_bytes(b"")
    ver, t = verify_tx(d, 4, [5], None)
    assert ver.counts == {"split_links": 1, "debris": 1} and t == 5, ver.lines
    data = powercut.make_tx("X1", 7)
    assert powercut.parse_tx(data, "X1") == 7
    for broken in (data[:-1], data[:20], b"", data.replace(b"X1 7", b"X2 7")):
        with pytest.raises(powercut.Torn):
            powercut.parse_tx(broken, "X1")


# == real programs ======================================================================
def need_app(app: App) -> None:
    for tool in app.tools:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (scripts/bootstrap.sh installs it)")
    if app.module and importlib.util.find_spec(app.module) is None:
        pytest.skip(f"needs the {app.module} package (the test extras of pyproject.toml)")


def run_app(pc: PowerCutFs, app: App, target: str, cuts: int, rng: random.Random,
            until_failure: bool = False) -> list[list[str]]:
    """``cuts`` power cuts of ``app`` working in SOURCE/app through atomicfs
    (``target`` full or batch) or on the raw filesystem (``raw``); the problems
    its check found after each cut.  After a failed check it stops if
    ``until_failure``, else starts the program afresh (a rate of failures)."""
    d = pc.source / "app"

    def prepare() -> None:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        app.prepare(d)
        pc.sync()

    prepare()
    acked: list[str] = []
    results = []
    options = None if target == "raw" else [f"durability={target}"]
    for n in range(cuts):
        acklog = pc.work / f"{app.name}-{target}-{n}.acks"

        def workload(top: Path, acklog: Path = acklog, n: int = n
                     ) -> list[subprocess.Popen[bytes]]:
            with open(pc.work / f"{app.name}-{target}-{n}.out", "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, str(ROOT / "tests" / "powercut_apps.py"), app.name,
                     str(top / "app"), str(acklog), target],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=cli_env())
            # the delay to the cut counts from the program's first operation done
            ready = Path(f"{acklog}.ready")
            deadline = time.monotonic() + 60
            while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            return [proc]

        cut = pc.cycle(workload, rng.uniform(0.3, 1.3), options,
                       recovered_by=rng.choice(["recover", "mount"]))
        this = read_acks(acklog)
        acked += this
        problems = app.check(d, acked, target)
        if cut.early_exits:
            out = (pc.work / f"{app.name}-{target}-{n}.out").read_text(errors="replace")
            problems.append(f"{app.name} stopped before the cut: {out[-800:]}")
        if not this and target == "full":
            problems.append(f"{app.name}: nothing acknowledged before the cut at "
                            f"{cut.delay:.2f} s (too slow to mean anything)")
        print(f"{pc.kind} {target} {app.name} cut {n + 1}: {len(this)} acknowledged, "
              f"{'; '.join(problems) or 'ok'}")
        if problems:
            said = [line for line in cut.daemon_log.splitlines() if " INFO " not in line]
            print("    daemon: " + ("\n    daemon: ".join(said[-8:]) or "(nothing but INFO)"))
        results.append(problems)
        if problems:
            if until_failure:
                break
            prepare()
            acked = []
    return results


@needs_fuse
@pytest.mark.parametrize("mode", ["full", "batch"])
@pytest.mark.parametrize("name", list(APPS))
def test_app_through_mount(tmp_path: Path, name: str, mode: str) -> None:
    app = APPS[name]
    need_app(app)
    rng = random.Random(seed())
    with powercut_fs(tmp_path, FS_OF[name]) as pc:
        results = run_app(pc, app, mode, CI_CUTS, rng)
    bad = [p for r in results for p in r]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", ["json", "git"])
def test_app_raw_fails(tmp_path: Path, name: str) -> None:
    """The checks are not vacuous: on the raw filesystem these programs lose
    acknowledged data (the JSON writer: the last close(); git: objects and refs)."""
    app = APPS[name]
    need_app(app)
    rng = random.Random(seed())
    with powercut_fs(tmp_path, FS_OF[name]) as pc:
        results = run_app(pc, app, "raw", RAW_BOUND, rng, until_failure=True)
    assert results[-1], (f"{name} on raw {FS_OF[name]} lost nothing in {RAW_BOUND} cuts; the "
                         "check cannot fail there?")


@needs_fuse
@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="long power-cut runs: set ATOMICFS_POWERCUTS=N")
@pytest.mark.parametrize("name", list(APPS))
def test_app_long(tmp_path: Path, name: str) -> None:
    app = APPS[name]
    need_app(app)
    rng = random.Random(seed())
    figures, bad = [], []
    targets = os.environ.get("ATOMICFS_POWERCUT_TARGETS", "full,batch,raw").split(",")
    for fs in FS_KINDS:
        for target in targets:
            with powercut_fs(tmp_path / f"{fs}-{target}", fs) as pc:
                results = run_app(pc, app, target, LONG, rng)
            failed = sum(1 for r in results if r)
            figures.append(f"{name} {fs} {target}: {len(results)} cuts, {failed} with a "
                           "failed check (the program starts afresh after one)")
            if target != "raw":
                bad += [f"{fs} {target}: {p}" for r in results for p in r]
    print("FIGURES\n" + "\n".join(figures))
    assert not bad, "\n".join(figures + bad)


# == the kit and the checker ==============================================================
def test_kit_cut_drops_what_was_not_durable(tmp_path: Path) -> None:
    """The cut is a power cut: an fsync'ed file survives, an unsynced one is gone,
    and everything is torn down afterwards."""
    with powercut_fs(tmp_path, "ext4") as pc:
        kept = pc.source / "kept"
        kept.write_bytes(b"durable")
        fd = os.open(kept, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        dfd = os.open(pc.source, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        (pc.source / "gone").write_bytes(b"not durable")
        pc.cut()
        with pytest.raises(OSError):
            (pc.source / "after").write_bytes(b"x")
        pc.remount()
        assert kept.read_bytes() == b"durable"
        assert not (pc.source / "gone").exists()
        point, image = pc.point, pc.image
    assert not scratchfs.is_mounted(point)
    assert scratchfs.loop_devices_of(image) == []


def test_kit_remount_waits_until_a_busy_filesystem_is_gone(tmp_path: Path) -> None:
    """A process still holding a file on the shut-down filesystem makes its unmount
    lazy; mounting the image again before that filesystem is gone would share it
    (the loop device is reused): every read would get EIO, nothing recovered.  The
    kit waits for it to go."""
    with powercut_fs(tmp_path, "ext4") as pc:
        kept = pc.source / "kept"
        kept.write_bytes(b"durable")
        pc.sync()
        holder = os.open(kept, os.O_RDONLY)
        pc.cut()
        closer = threading.Timer(1.0, os.close, [holder])  # the holder goes a second later
        closer.start()
        try:
            pc.remount()
        finally:
            closer.join()
        assert kept.read_bytes() == b"durable"


def model(**names: str) -> powercut.Model:
    m = powercut.Model()
    for name, fid in names.items():
        m.names[name] = fid
        if fid != "/":
            m.inodes[fid] = [1, 0o644, None]
    return m


def seen(m: powercut.Model) -> powercut.Seen:
    s = powercut.Seen(state=m.state())
    s.ino = {n: hash(f) for n, f in m.names.items() if f != "/"}
    return s


OPS = [{"op": "write", "name": "a", "v": 2}, {"op": "rename", "src": "b", "dst": "c"},
       {"op": "mkdir", "name": "D3"}]


@pytest.mark.parametrize("upto", [0, 1, 2, 3])
def test_verify_accepts_every_prefix_from_the_acknowledged(upto: int) -> None:
    m0 = model(a="w0/Wa", b="w0/Wb")
    m = m0.copy()
    for op in OPS[:upto]:
        m.apply(op)
    ver = powercut.verify_worker(0, m0, OPS, 0, seen(m))
    assert not ver.lines and ver.prefix == upto
    if upto < 2:  # acknowledged up to the rename (op 2): a is older, b/c do not hold
        ver = powercut.verify_worker(0, m0, OPS, 2, seen(m))
        assert ver.counts == Counter({"older": 1 - upto, "lost": 2}) + Counter(), ver.lines


def test_verify_finds_a_later_op_without_an_earlier_one() -> None:
    m0 = model(a="w0/Wa", b="w0/Wb")
    m = m0.copy()
    m.apply(OPS[2])  # the mkdir survived, the write and the rename before it did not
    ver = powercut.verify_worker(0, m0, OPS, 0, seen(m))
    assert ver.counts == {"out_of_order": 1}, ver.lines


def test_verify_torn_debris_and_split_links() -> None:
    m0 = model(a="w0/Wa", h="w0/Wa")
    s = seen(m0)
    s.ino["h"] += 1
    s.torn["x"] = "bad magic"
    s.debris.append("w0/.atomicfs-tmp")
    ver = powercut.verify_worker(0, m0, [], 0, s)
    assert ver.counts == {"torn": 1, "debris": 1, "split_links": 1}, ver.lines


def test_rename_between_links_of_one_file_does_nothing() -> None:
    m = model(a="w0/Wa", h="w0/Wa")
    m.apply({"op": "rename", "src": "a", "dst": "h"})
    assert m.names == {"a": "w0/Wa", "h": "w0/Wa"}

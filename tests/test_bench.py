"""scripts/bench --quick: the benchmark harness runs and writes a well-formed table.

Only checks that the harness works (every workload measured on every target,
the tables and goal lines written, no mount left behind); the numbers
themselves are not judged here.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAVE_FUSE, ROOT, atomicfs_mounts

from atomicfs import dirsync

BENCH = ROOT / "scripts" / "bench"
BUDGET = 90  # seconds; --quick takes ~10-30 s here


def _run_bench(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the bench; on overrun, SIGINT it (it unmounts everything) before killing it."""
    proc = subprocess.Popen([sys.executable, str(BENCH), *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=BUDGET)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"scripts/bench --quick took over {BUDGET}s\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.skipif(not HAVE_FUSE, reason="needs /dev/fuse and fusermount3")
def test_bench_quick(tmp_path: Path) -> None:
    out_dir, work = tmp_path / "results", tmp_path / "work"
    before = set(atomicfs_mounts())
    res = _run_bench(["--quick", "--out", str(out_dir), "--workdir", str(work)], tmp_path)
    try:
        assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr[-4000:]}"
    finally:
        left = [p for p in set(atomicfs_mounts()) - before if p.startswith(str(tmp_path))]
        for point in left:
            subprocess.run(["fusermount3", "-uz", point], capture_output=True)
        assert not left, f"mounts left behind: {left}"

    data = json.loads((out_dir / "results.json").read_text())
    targets = data["targets"]
    assert targets[0] == "raw"
    assert {"pyfuse3", "atomicfs-full", "atomicfs-batch"} <= set(targets)
    assert data["failures"] == []
    workloads = {m["workload"] for m in data["metrics"]}
    assert workloads == {"seq-write", "seq-read", "rand-write", "saves",
                         "create-stat-unlink", "latency", "untar-rm", "commit"}
    cold_skipped = os.geteuid() != 0
    for metric in data["metrics"]:
        for target in targets:
            cell = metric["results"][target]
            where = f"{metric['key']} on {target}"
            if cell["skipped"]:
                assert cold_skipped and metric["key"] == "seq-read-cold", where
                continue
            assert cell["failure"] is None, where
            assert len(cell["samples"]) >= 3, where
            med = cell["median"]
            assert isinstance(med, float) and math.isfinite(med) and med > 0, where
            if target != "raw":
                assert cell["ratio_to_raw"] > 0, where

    # the markdown table: a header with every target, one row per metric, numbers in each cell
    md = (out_dir / "results.md").read_text()
    assert md in res.stdout
    lines = md.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| workload | unit |"))
    assert lines[head] == "| workload | unit | " + " | ".join(targets) + " |"
    rows = []
    for ln in lines[head + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    assert len(rows) == len(data["metrics"])
    for row in rows:
        assert len(row) == 2 + len(targets), row
        for t, cell in zip(targets, row[2:], strict=True):
            if cell == "skipped":
                continue
            number = cell.split(" (")[0].replace(",", "")
            assert float(number) > 0, (row[0], t, cell)
            if t != "raw":
                assert cell.endswith("×)"), (row[0], t, cell)
    # the targets, each checked against this run's numbers
    assert "small-file saves, atomicfs full vs hand-written atomic save on raw: " in md
    goals = [ln for ln in lines if ln.startswith("- ") and "(target ≥" in ln]
    assert goals
    for goal in goals:
        peers = [p for p in ("bindfs", "fuse-overlayfs") if f" vs {p} " in goal]
        if peers and peers[0] not in targets:  # a peer not installed here: nothing to compare
            assert "not measured in this run" in goal, goal
        else:
            assert goal.endswith("]") and (": met [" in goal or ": NOT MET [" in goal), goal


def test_bench_rejects_unknown_workload(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(BENCH), "--only", "nope"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "unknown workload(s): nope" in res.stderr


@pytest.mark.skipif(not HAVE_FUSE, reason="needs /dev/fuse and fusermount3")
def test_bench_explain_splits_each_operation_into_phases(tmp_path: Path) -> None:
    """--explain: the daemon's timing marks and the program's calls on one time line."""
    out_dir = tmp_path / "results"
    res = _run_bench(["--explain", "5", "--targets", "atomicfs-full", "--out", str(out_dir),
                      "--workdir", str(tmp_path / "work")], tmp_path)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr[-4000:]}"
    text = (out_dir / "explain.md").read_text()
    sections = text.split("\n### ")[1:]
    assert [s.split("\n", 1)[0] for s in sections] == ["save", "atomic-save", "untar-entry"]
    save = sections[0]
    # a durable save: the commit's steps inside close(), each a phase of its own
    for phase in ("open(): open() called → OPEN handler starts",
                  "close(): commit.before_fsync → commit.after_fsync",
                  "close(): handoff:_sync_dirs → thread:_sync_dirs",
                  "close(): FLUSH handler returns → close() returns"):
        assert f"| {phase} |" in save, phase
    # the program's fsync of the directory right after the rename's: answered at once
    # (docs/semantics.md §3.5) where ctimes are fine-grained, else a worker thread's
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        at_once = dirsync.fine_grained_ctime(fd)
    finally:
        os.close(fd)
    phase = "FSYNCDIR handler returns" if at_once else "handoff:fsync_dir_fd"
    assert f"| fsync dir(): FSYNCDIR handler starts → {phase} |" in sections[1]
    for section in sections:
        rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "µs" not in ln
                and not ln.startswith("|---")]
        assert len(rows) >= 8, section
        assert all(ln.endswith("/5 |") for ln in rows), section

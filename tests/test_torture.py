"""Crash torture and stress (scripts/torture.py): the atomicity promise under crashes and load.

The bounded run (CI) takes ~15-30 s: ten crash rounds, half by kill -9 at a
random moment, half by ``ATOMICFS_FAULTS=exit:commit.*`` at each commit step,
some with ``durability=batch``.  The soak runs (hundreds of rounds, every
fault point, both isolation modes) are marked slow and run only with
ATOMICFS_SOAK=1.  The stress run (``--stress``) has no crash: readers, writers
and a mover renaming directories share one mount for 12 s (5 minutes per
option set in the soak); no read may be wrong, nothing may hang, and the tree
must be exactly what was committed.  The seed is random unless ATOMICFS_TORTURE_SEED is set; a
failure prints it, and ``scripts/torture --seed S --crashes N`` replays it.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, needs_fuse

SOAK = os.environ.get("ATOMICFS_SOAK") == "1"


def run_torture(workdir: Path, args: tuple[str, ...], timeout: float, line: str
                ) -> tuple[dict[str, str], str]:
    """Run scripts/torture.py; (fields of its ``line`` summary, the report)."""
    seed = os.environ.get("ATOMICFS_TORTURE_SEED") or str(random.randrange(2**31))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(ROOT / "scripts" / "torture.py"), "--seed", seed,
           "--workdir", str(workdir), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                         cwd=ROOT)
    report = f"$ {' '.join(cmd)}\n{res.stdout[-12000:]}\n{res.stderr[-4000:]}"
    assert res.returncode == 0, report
    summary = re.search(rf"^{line} (.*)$", res.stdout, re.M)
    assert summary, report
    print(res.stdout)
    return dict(re.findall(r"(\w+)=(\S+)", summary.group(1))), report


def torture(workdir: Path, *args: str, timeout: float) -> dict[str, str]:
    fields, report = run_torture(workdir, args, timeout, "SUMMARY")
    assert fields["torn_files"] == "0", report
    assert fields["violations"] == "0", report
    assert fields["crashes_survived"] == fields["rounds"], report
    return fields


@needs_fuse
def test_torture_bounded(tmp_path: Path) -> None:
    fields = torture(tmp_path / "t", "--crashes", "10", "--writers", "4", timeout=300)
    assert fields["rounds"] == "10"
    assert int(fields["versions_verified"]) > 100
    assert int(fields["ops_completed"]) > 100


@needs_fuse
@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak test: set ATOMICFS_SOAK=1")
@pytest.mark.parametrize("options", [[], ["-o", "isolation=shared"]],
                         ids=["committed", "shared"])
def test_torture_soak(tmp_path: Path, options: list[str]) -> None:
    fields = torture(tmp_path / "t", "--crashes", "220", "--writers", "6", *options,
                     timeout=3600)
    assert fields["rounds"] == "220"


def stress(workdir: Path, *args: str, timeout: float) -> dict[str, str]:
    fields, report = run_torture(workdir, ("--stress", *args), timeout, "STRESS")
    assert fields["violations"] == "0" and fields["hangs"] == "0", report
    for key in ("reads_verified", "listings_verified", "dir_renames", "spin_commits",
                "writer_ops"):
        assert int(fields[key]) > 20, f"too little of {key} to mean anything:\n{report}"
    return fields


@needs_fuse
def test_stress_bounded(tmp_path: Path) -> None:
    """Readers, writers and directory renames at once for 12 s: no wrong read, no hang."""
    stress(tmp_path / "s", "12", "--writers", "2", "--spin-writers", "2", "--readers", "3",
           timeout=300)


@needs_fuse
@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak test: set ATOMICFS_SOAK=1")
@pytest.mark.parametrize("options", [[], ["-o", "isolation=shared"], ["-o", "durability=batch"]],
                         ids=["committed", "shared", "batch"])
def test_stress_soak(tmp_path: Path, options: list[str]) -> None:
    stress(tmp_path / "s", "300", "--writers", "4", "--spin-writers", "3", "--readers", "6",
           "--spin-dirs", "5", *options, timeout=1200)

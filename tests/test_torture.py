"""Crash torture (scripts/torture.py): the atomicity promise under crashes and load.

The bounded run (CI) takes ~15-30 s: ten crash rounds, half by kill -9 at a
random moment, half by ``ATOMICFS_FAULTS=exit:commit.*`` at each commit step,
some with ``durability=batch``.  The soak runs (hundreds of rounds, every
fault point, both isolation modes) are marked slow and run only with
ATOMICFS_SOAK=1.  The seed is random unless ATOMICFS_TORTURE_SEED is set; a
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


def torture(workdir: Path, *args: str, timeout: float) -> dict[str, str]:
    seed = os.environ.get("ATOMICFS_TORTURE_SEED") or str(random.randrange(2**31))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(ROOT / "scripts" / "torture.py"), "--seed", seed,
           "--workdir", str(workdir), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                         cwd=ROOT)
    report = f"$ {' '.join(cmd)}\n{res.stdout[-12000:]}\n{res.stderr[-4000:]}"
    assert res.returncode == 0, report
    summary = re.search(r"^SUMMARY (.*)$", res.stdout, re.M)
    assert summary, report
    fields = dict(re.findall(r"(\w+)=(\S+)", summary.group(1)))
    assert fields["torn_files"] == "0", report
    assert fields["violations"] == "0", report
    assert fields["crashes_survived"] == fields["rounds"], report
    print(res.stdout)
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

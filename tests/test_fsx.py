"""fsx through the mount (scripts/fsx.py): random I/O on one file against a reference.

The CI run does ~2,000 operations (pwrite, pread, ftruncate, mmap write/read,
fsync, close + reopen, fresh readers) and checks SOURCE after every commit
point and after the unmount.  The seed is random unless ATOMICFS_FSX_SEED is
set; a failure prints it with the tail of the operation log.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys

import pytest
from conftest import ROOT, Mount

SOAK = os.environ.get("ATOMICFS_SOAK") == "1"


def load_fsx():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fsx", ROOT / "scripts" / "fsx.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fsx"] = module
    spec.loader.exec_module(module)
    return module


fsx = load_fsx()


def run_fsx(m: Mount, ops: int, **kw: int | str | bool) -> None:
    seed = int(os.environ.get("ATOMICFS_FSX_SEED") or random.randrange(2**31))
    f = fsx.Fsx(m.mountpoint, m.source, seed, ops, **kw)
    counts = f.run()
    m.unmount()
    f.check_final()
    assert sum(counts.values()) == ops
    want = ["fsx.dat", "fsx.dat.lnk"] if kw.get("link") else ["fsx.dat"]
    assert sorted(os.listdir(m.source)) == want  # no debris, no .atomicfs
    print(f"fsx seed {seed}: {counts}")


def test_fsx(mount: Mount) -> None:
    run_fsx(mount, 2000)


@pytest.mark.mount_options("isolation=shared")
def test_fsx_isolation_shared(mount: Mount) -> None:
    run_fsx(mount, 1000, isolation="shared")


@pytest.mark.mount_options("durability=batch")
def test_fsx_durability_batch(mount: Mount) -> None:
    run_fsx(mount, 300, durability="batch")


def test_fsx_hard_linked(mount: Mount) -> None:
    """A file with two names: every commit is in place (journalled as root)."""
    run_fsx(mount, 1000, link=True)


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak test: set ATOMICFS_SOAK=1")
def test_fsx_soak(mount: Mount) -> None:
    run_fsx(mount, 100_000, maxlen=4 << 20, maxop=256 << 10)

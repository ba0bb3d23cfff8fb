"""The mount harness (atomicfs/harness.py) that the tests, the torture and the bench share:
start and wait, clean unmount, kill and detach, a failed start with its log, the
daemon's environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import HAVE_FUSE, ROOT

from atomicfs.harness import Daemon, HarnessError, daemon_env, mounted_fstype

needs_fuse = pytest.mark.skipif(not HAVE_FUSE, reason="needs /dev/fuse and fusermount3")


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    return src, mnt


def test_daemon_env_sets_removes_and_puts_the_code_first(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setenv("ATOMICFS_FAULTS", "exit:commit.before_fsync")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = daemon_env(Path("/code"), {"ATOMICFS_FAULTS": None, "ATOMICFS_APPEND_MIN": "0"})
    assert "ATOMICFS_FAULTS" not in env
    assert env["ATOMICFS_APPEND_MIN"] == "0"
    assert env["PYTHONPATH"] == "/code" + os.pathsep + "/elsewhere"
    assert os.environ["ATOMICFS_FAULTS"] == "exit:commit.before_fsync"  # not changed


@needs_fuse
def test_start_serves_and_unmount_returns_the_exit_status(dirs: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    src, mnt = dirs
    d = Daemon(src, mnt, ["durability=batch"], tmp_path / "daemon.log", code=ROOT)
    try:
        d.start()
        assert mounted_fstype(mnt) == "fuse.atomicfs" and d.running()
        assert d.proc is not None
        cmdline = Path(f"/proc/{d.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[-3:-1] == [b"-o", b"durability=batch"]
        (mnt / "f").write_bytes(b"through the mount")
        at = d.log_size()
        assert d.unmount() == 0
        assert d.proc is None and mounted_fstype(mnt) is None
        assert (src / "f").read_bytes() == b"through the mount"
        assert d.log_since(at) == d.log()[at:]
        assert "unmounted" in d.log()
    finally:
        d.kill()


@needs_fuse
def test_kill_ends_the_daemon_and_detaches_its_mount(dirs: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    src, mnt = dirs
    d = Daemon(src, mnt, [], tmp_path / "daemon.log", code=ROOT)
    try:
        d.start()
        assert d.proc is not None
        proc = d.proc
        d.kill()
        assert proc.returncode == -9
        assert d.proc is None and mounted_fstype(mnt) is None
        d.kill()  # idempotent
    finally:
        d.kill()


@needs_fuse
def test_failed_start_raises_with_the_log_and_leaves_no_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    d = Daemon(tmp_path / "missing", mnt, [], tmp_path / "daemon.log", code=ROOT)
    try:
        with pytest.raises(HarnessError) as info:
            d.start()
        assert "atomicfs exited with" in str(info.value)
        assert "missing" in str(info.value)  # the daemon's own error line, from its log
        assert mounted_fstype(mnt) is None
    finally:
        d.kill()

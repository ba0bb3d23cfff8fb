"""Mounting, serving and unmounting: the basic life cycle through a real mount."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from conftest import ROOT, Mount, MountFactory, mounted_fstype


def test_files_before_mount_are_served_and_changes_persist(mount_factory: MountFactory,
                                                            tmp_path) -> None:
    src = tmp_path / "data"
    src.mkdir()
    (src / "old.txt").write_bytes(b"before\n")
    m = mount_factory(source=src)
    assert m.path("old.txt").read_bytes() == b"before\n"
    m.path("new.txt").write_bytes(b"through the mount\n")
    m.path("dir").mkdir()
    m.unmount()
    assert (src / "new.txt").read_bytes() == b"through the mount\n"
    assert (src / "dir").is_dir()


def test_mount_over_itself(mount_factory: MountFactory, tmp_path) -> None:
    d = tmp_path / "self"
    d.mkdir()
    (d / "kept").write_bytes(b"x" * 10000)
    os.mkdir(d / "sub")
    (d / "sub" / "deep").write_bytes(b"deep")
    m = mount_factory(source=d, mountpoint=d)
    assert mounted_fstype(d) == "fuse.atomicfs"
    assert (d / "kept").read_bytes() == b"x" * 10000
    assert sorted(os.listdir(d)) == ["kept", "sub"]
    (d / "sub" / "made").write_bytes(b"made through the mount")
    os.rename(d / "kept", d / "sub" / "kept2")
    m.unmount()
    assert mounted_fstype(d) != "fuse.atomicfs"
    assert (d / "sub" / "made").read_bytes() == b"made through the mount"
    assert (d / "sub" / "kept2").read_bytes() == b"x" * 10000
    assert sorted(os.listdir(d)) == ["sub"]


def test_handler_bug_answers_eio_and_mount_survives(mount_factory: MountFactory) -> None:
    m = mount_factory(env={"ATOMICFS_FAULTS": "raise:getxattr"})
    m.expect_log(r"unexpected error in getxattr|Traceback|RuntimeError: fault injected")
    m.path("f").write_bytes(b"data")
    with pytest.raises(OSError) as info:
        os.getxattr(m.path("f"), "user.x")
    assert info.value.errno == errno.EIO
    # the mount is alive and serving
    assert m.path("f").read_bytes() == b"data"
    m.path("g").write_bytes(b"more")
    assert sorted(os.listdir(m.mountpoint)) == ["f", "g"]
    assert "unexpected error in getxattr" in m.log()
    assert "Traceback" in m.log()


def test_daemon_files_are_invisible(mount: Mount) -> None:
    assert mount.src(".atomicfs").is_dir()  # the daemon's own directory
    (mount.source / ".atomicfs~tmp").write_bytes(b"temp")
    assert os.listdir(mount.mountpoint) == []
    assert not mount.path(".atomicfs").exists()
    assert not mount.path(".atomicfs~tmp").exists()
    with pytest.raises(PermissionError):
        mount.path(".atomicfs~mine").write_bytes(b"x")
    os.unlink(mount.src(".atomicfs~tmp"))
    mount.unmount()
    assert os.listdir(mount.source) == []  # a clean unmount leaves nothing behind


def test_background_mount_returns_when_live_and_umount_command(tmp_path) -> None:
    src, mnt = tmp_path / "s", tmp_path / "m"
    src.mkdir()
    mnt.mkdir()
    (src / "f").write_text("hi")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "atomicfs", "mount", str(src), str(mnt),
                          "--log", str(tmp_path / "bg.log")], env=env, capture_output=True,
                         text=True, timeout=30)
    try:
        assert res.returncode == 0, res.stderr
        assert mounted_fstype(mnt) == "fuse.atomicfs"
        assert (mnt / "f").read_text() == "hi"
    finally:
        res2 = subprocess.run([sys.executable, "-m", "atomicfs", "umount", str(mnt)], env=env,
                              capture_output=True, text=True, timeout=30)
        if mounted_fstype(mnt) is not None:
            subprocess.run(["fusermount3", "-uz", str(mnt)])
    assert res2.returncode == 0, res2.stderr
    assert mounted_fstype(mnt) is None


@pytest.mark.parametrize("entry_timeout", [0, 30])
def test_entry_timeout_bounds_how_late_a_change_made_in_source_shows(
        mount_factory: MountFactory, tmp_path, entry_timeout: int) -> None:
    """A name replaced directly in SOURCE (not through the mount) shows through the
    mount once the kernel stops trusting its cached entry: at once with
    entry_timeout=0, not within the 30 s of entry_timeout=30 (README, Options;
    docs/semantics.md §13)."""
    src = tmp_path / "data"
    src.mkdir()
    (src / "f").write_bytes(b"first\n")
    m = mount_factory(source=src, options=[f"entry_timeout={entry_timeout}",
                                           "attr_timeout=0"])
    assert m.path("f").read_bytes() == b"first\n"  # the kernel caches the name
    (src / "f.new").write_bytes(b"replaced in SOURCE\n")
    os.rename(src / "f.new", src / "f")
    seen = m.path("f").read_bytes()
    if entry_timeout == 0:
        assert seen == b"replaced in SOURCE\n"
    else:
        assert seen == b"first\n", "the cached name still leads to the file it named"
    m.path("g").write_bytes(b"through the mount\n")  # changes through it are never late
    assert m.path("g").read_bytes() == b"through the mount\n"

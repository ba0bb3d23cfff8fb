"""Odd names and deep trees through the mount (docs/semantics.md §8, §1.2).

Names with spaces, newlines, tabs, backslashes, non-UTF-8 bytes, a leading
dash, shell wildcards, 255 bytes; a tree 150 levels deep whose paths are far
longer than PATH_MAX (reached through directory fds, as the daemon does).
Each goes through every kind of commit (new file, rename commit, journalled
commit of a hard link) and the namespace operations, and SOURCE must hold
exactly the same names and bytes.  The command-line side (odd SOURCE and
MOUNTPOINT paths, mounting twice...) is in test_cli.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import Mount, MountFactory
from sessionkit import assert_no_debris, status_of

ODD = {
    "space": b"with space",
    "newline": b"new\nline",
    "tab-backslash": b"tab\tback\\slash",
    "non-utf8": b"latin1-\xe9t\xe9-\xff\xfe",
    "dash": b"-rf",
    "wildcards": b"*?[a]{b}",
    "dots": b"...",
    "255": b"n" * 254 + b"\xe9",
}


def read(p: bytes) -> bytes:
    return Path(os.fsdecode(p)).read_bytes()


@pytest.mark.parametrize("name", ODD.values(), ids=ODD.keys())
def test_odd_names_through_every_kind_of_commit(mount: Mount, name: bytes) -> None:
    mnt, src = os.fsencode(mount.mountpoint), os.fsencode(mount.source)
    d = name[:200] + b".d"  # a directory named alike, holding the files
    os.mkdir(mnt + b"/" + d)
    path = mnt + b"/" + d + b"/" + name
    with open(path, "xb") as f:  # a new file: published by linkat at close
        f.write(b"first\n")
    assert read(src + b"/" + d + b"/" + name) == b"first\n"
    with open(path, "wb") as f:  # rename commit over the odd name
        f.write(b"second\n")
    os.link(path, mnt + b"/" + d + b"/" + (b"K" + name[1:]))  # a second name, as odd
    other = mnt + b"/" + d + b"/" + (b"L" + name[1:])
    os.rename(path, other)
    fd = os.open(other, os.O_RDWR)  # a hard-linked file: a journalled commit
    try:
        os.pwrite(fd, b"THIRD", 0)
    finally:
        os.close(fd)
    os.setxattr(other, "user.odd", name[:100])
    listed = sorted(os.listdir(mnt + b"/" + d))
    assert listed == sorted(os.listdir(src + b"/" + d)), "mount and SOURCE list differently"
    assert b"L" + name[1:] in listed and name not in listed
    for n in listed:
        assert read(src + b"/" + d + b"/" + n) == b"THIRDd\n"
    assert os.getxattr(src + b"/" + d + b"/" + b"L" + name[1:], "user.odd") == name[:100]
    shutil.rmtree(mnt + b"/" + d)
    assert os.listdir(src) in ([], [b".atomicfs"])
    mount.unmount()
    assert_no_debris(mount.source)


DEPTH = 150
LEVEL = b"level-%03d-" + b"x" * 30  # 40 bytes a level: 6,000-byte paths (PATH_MAX 4096)


def test_tree_deeper_than_path_max(mount_factory: MountFactory) -> None:
    m = mount_factory()
    top = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    fd = top
    for i in range(DEPTH):  # mkdir through the mount, one level at a time
        os.mkdir(LEVEL % i, dir_fd=fd)
        nxt = os.open(LEVEL % i, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        if fd != top:
            os.close(fd)
        fd = nxt
    os.close(top)
    bottom = fd
    try:
        f = os.open(b"f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=bottom)
        os.write(f, b"at the bottom\n")
        os.close(f)
        # a writer at the bottom while the top is renamed: the commit follows the tree
        f = os.open(b"f", os.O_WRONLY | os.O_TRUNC, dir_fd=bottom)
        os.write(f, b"rewritten after the top moved\n")
        os.rename(m.path(os.fsdecode(LEVEL % 0)), m.path("moved"))
        os.close(f)
    finally:
        os.close(bottom)
    assert status_of(m.mountpoint)["failures"] == {}  # the daemon serves, nothing failed
    # SOURCE: the same 150 levels under the new name, the file's last version
    sfd = os.open(m.src("moved"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(1, DEPTH):
            nxt = os.open(LEVEL % i, os.O_RDONLY | os.O_DIRECTORY, dir_fd=sfd)
            os.close(sfd)
            sfd = nxt
        f = os.open(b"f", os.O_RDONLY, dir_fd=sfd)
        try:
            assert os.read(f, 100) == b"rewritten after the top moved\n"
        finally:
            os.close(f)
        assert os.listdir(sfd) == ["f"]
    finally:
        os.close(sfd)
    shutil.rmtree(m.path("moved"))  # fd-based: deeper than PATH_MAX is fine
    assert os.listdir(m.source) in ([], [".atomicfs"])
    m.unmount()
    assert_no_debris(m.source)


def test_mountpoint_above_the_source(mount_factory: MountFactory, tmp_path: Path) -> None:
    """MOUNTPOINT an ancestor of SOURCE: the mount hides SOURCE, the daemon keeps it open."""
    src = tmp_path / "top" / "inner" / "src"
    src.mkdir(parents=True)
    (src / "f").write_bytes(b"old\n")
    m = mount_factory(source=src, mountpoint=tmp_path / "top")
    assert os.listdir(m.mountpoint) == ["f"]
    m.path("f").write_bytes(b"new\n")
    m.path("g").write_bytes(b"g\n")
    m.unmount()
    assert sorted(os.listdir(src)) == ["f", "g"]
    assert (src / "f").read_bytes() == b"new\n"

"""Symlink swaps in the source under a live mount never lead the daemon out (docs/semantics.md §5).

Someone with write access to SOURCE (not through the mount) renames a
directory the kernel and the daemon already know and puts a symlink in its
place that points outside SOURCE, at a directory holding files with the same
names ("canaries").  Then every kind of operation goes through the mount on
paths under the swapped name: with the kernel's cached entries still
pointing at the real directory, and again after they expired.  Nothing
outside SOURCE may change (names, contents, modes, owners, times, xattrs),
and what the operations did must have happened inside SOURCE.

The symlink is relative (``../outside``): through the mount it resolves,
for the calling program, to ``MOUNTPOINT/../outside``, which does not exist.
So a change in the canary directory can only come from the daemon following
the link on the source side.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MountFactory
from sessionkit import assert_no_debris, snapshot

CANARY = b"canary: must never change\n"
INSIDE = b"inside the source\n"


def tree(root: Path, content: bytes) -> None:
    (root / "sub").mkdir(parents=True)
    for name in ("x", "canary", "sub/y"):
        (root / name).write_bytes(content)
    os.setxattr(root / "canary", "user.mark", content[:6])


def operations(d: Path, tag: str) -> dict[str, Callable[[], object]]:
    """Everything a program may do under ``d`` (a path through the mount)."""

    def rewrite() -> None:
        with open(d / "x", "wb") as f:
            f.write(b"rewritten " + tag.encode())

    def append() -> None:
        with open(d / "sub" / "y", "ab") as f:
            f.write(b"appended")

    def create() -> None:
        with open(d / f"new-{tag}", "xb") as f:
            f.write(b"new")

    def listing() -> list[str]:
        return os.listdir(d) + os.listdir(d / "sub")

    return {
        "read": lambda: (d / "canary").read_bytes(),
        "stat": lambda: os.stat(d / "canary"),
        "readdir": listing,
        "open+write+close": rewrite,
        "append": append,
        "create": create,
        "mkdir": lambda: os.mkdir(d / f"dir-{tag}"),
        "symlink": lambda: os.symlink("/etc/passwd", d / f"sl-{tag}"),
        "link": lambda: os.link(d / "canary", d / f"ln-{tag}"),
        "rename": lambda: os.rename(d / "x", d / f"x-{tag}"),
        "rename back": lambda: os.rename(d / f"x-{tag}", d / "x"),
        "chmod": lambda: os.chmod(d / "canary", 0o777),
        "chown": lambda: os.chown(d / "canary", 4321, 4321),
        "utime": lambda: os.utime(d / "canary", (1, 1)),
        "truncate": lambda: os.truncate(d / "canary", 1),
        "setxattr": lambda: os.setxattr(d / "canary", "user.pwned", b"1"),
        "removexattr": lambda: os.removexattr(d / "canary", "user.mark"),
        "unlink": lambda: os.unlink(d / "canary"),
        "rmdir": lambda: os.rmdir(d / "sub"),  # not empty: fails either way
    }


@pytest.mark.parametrize("depth", [1, 3], ids=["top-dir", "intermediate-dir"])
def test_directory_swapped_for_an_escaping_symlink(mount_factory: MountFactory, tmp_path: Path,
                                                   depth: int) -> None:
    base = tmp_path / "a"
    src, outside = base / "src", base / "outside"
    parts = ["d", "e", "f"][:depth]
    tree(src.joinpath(*parts), INSIDE)
    tree(outside, CANARY)
    (tmp_path / "b").mkdir()
    mnt = tmp_path / "b" / "mnt"
    mnt.mkdir()
    assert not (tmp_path / "b" / "outside").exists()
    m = mount_factory(source=src, mountpoint=mnt, options=["entry_timeout=1", "attr_timeout=1"])
    through = mnt.joinpath(*parts)
    # the kernel and the daemon learn the directories, and a handle stays open on x
    assert (through / "x").read_bytes() == INSIDE
    assert sorted(os.listdir(through)) == ["canary", "sub", "x"]
    held = os.open(through / "x", os.O_WRONLY | os.O_TRUNC)
    before = snapshot(outside)
    try:
        # the swap: d (the top of the path) goes aside, a symlink out takes its name
        os.rename(src / "d", src / "d.real")
        os.symlink("../outside", src / "d")
        assert (src / "d" / "canary").read_bytes() == CANARY  # it does lead out
        os.write(held, b"written through a handle opened before the swap")
    finally:
        os.close(held)
    results: dict[str, dict[str, str]] = {}
    for phase in ("cached", "expired"):
        if phase == "expired":
            time.sleep(1.2)  # past the entry and attribute timeouts (1 s)
        results[phase] = {}
        for what, op in operations(through, phase).items():
            try:
                op()
                results[phase][what] = "ok"
            except OSError as exc:
                results[phase][what] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        assert snapshot(outside) == before, \
            f"{phase}: the daemon changed files outside SOURCE; results: {results[phase]}"
    # what worked acted inside SOURCE: on the real directory (still cached by the kernel)
    real = src.joinpath("d.real", *parts[1:])
    cached = results["cached"]
    effects = {"create": (real / "new-cached").exists(), "mkdir": (real / "dir-cached").is_dir(),
               "unlink": not (real / "canary").exists(),
               "open+write+close": (real / "x").read_bytes() == b"rewritten cached",
               "append": (real / "sub" / "y").read_bytes() == INSIDE + b"appended"}
    for what, seen in effects.items():
        assert seen == (cached[what] == "ok"), f"{what}: {cached[what]}, effect inside: {seen}"
    assert not (tmp_path / "b" / "outside").exists()
    # after the entries expired, the name is the symlink: nothing resolves through it
    assert all(r != "ok" for w, r in results["expired"].items()), results["expired"]
    assert os.path.islink(mnt / "d") and os.readlink(mnt / "d") == "../outside"
    with contextlib.suppress(FileNotFoundError):
        os.stat(mnt / "d" / "canary")
        pytest.fail("a path through the swapped symlink resolved")
    m.unmount()
    assert snapshot(outside) == before
    assert_no_debris(src)
    print(results)

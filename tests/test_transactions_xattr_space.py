"""An xattr that SOURCE's filesystem cannot hold, set inside a transaction
(docs/semantics.md §14.1): the member's setxattr fails at once, as it does
outside a transaction, instead of the commit failing to set it after its record
(which left the rest of the transaction applied, this part not, and `atomicfs
run` exiting 0)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from conftest import MountFactory
from test_transactions import atomicfs_run


def too_big(source: Path) -> int:
    """A user xattr size that SOURCE's filesystem refuses (ext4: more than a block);
    skips where it takes the largest the kernel allows."""
    probe = source / "probe"
    probe.write_bytes(b"")
    try:
        for size in (8000, 65536):
            try:
                os.setxattr(probe, "user.big", b"x" * size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.E2BIG, errno.ERANGE):
                    return size
                raise
            os.removexattr(probe, "user.big")
    finally:
        probe.unlink()
    pytest.skip(f"{source}'s filesystem takes user xattrs of 64 KiB")


SET_BIG = "import os, sys; os.setxattr(sys.argv[1], 'user.big', b'x' * int(sys.argv[2]))"


@pytest.mark.parametrize("on", ["file", "directory"])
@pytest.mark.parametrize("script_goes_on", [False, True], ids=["set-e", "ignores-it"])
def test_an_xattr_too_big_for_source_fails_the_setxattr(
        mount_factory: MountFactory, on: str, script_goes_on: bool) -> None:
    m = mount_factory()
    size = too_big(m.source)
    m.path("a").write_text("a old\n")
    m.path("y").write_text("y\n")
    m.path("d").mkdir()
    target = "y" if on == "file" else "d"
    setx = f"python3 -c \"{SET_BIG}\" {target} {size}" + (" || true" if script_goes_on else "")
    res = atomicfs_run(m, "sh", "-c", f"set -e; echo 'a new' > a; chmod 600 y; {setx}",
                       cwd=m.mountpoint)
    assert "No space left on device" in res.stderr or "Argument list too long" in \
        res.stderr or "Numerical result out of range" in res.stderr, res.stderr
    if script_goes_on:  # the transaction commits without the xattr, whole
        assert res.returncode == 0, res.stderr
        assert m.src("a").read_text() == "a new\n"
        assert stat.S_IMODE(os.stat(m.src("y")).st_mode) == 0o600
    else:  # the command failed: nothing of it remains
        assert res.returncode != 0, res.stderr
        assert m.src("a").read_text() == "a old\n"
        assert stat.S_IMODE(os.stat(m.src("y")).st_mode) == 0o644
    assert "user.big" not in os.listxattr(m.src(target))
    assert not list((m.source / ".atomicfs").glob("tx-*"))
    assert " ERROR " not in m.log(), m.log()  # no change of the record failed

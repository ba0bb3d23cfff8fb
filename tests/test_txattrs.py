"""A transaction's attribute overlay (atomicfs/txattrs.py) and its ``meta`` record
operation, without FUSE.  The mounted behaviour is in test_transactions.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest

from atomicfs import txattrs, txrecord


def request(**values: int) -> tuple[pyfuse3.EntryAttributes, Any]:
    """A setattr request's attributes and fields (pyfuse3's SetattrFields cannot be
    made outside a request: the same attributes, read-only there)."""
    attr = pyfuse3.EntryAttributes()
    fields = SimpleNamespace(**{f"update_{k}": False for k in (
        "mode", "uid", "gid", "atime", "mtime", "size", "ctime")})
    for key, value in values.items():
        setattr(attr, f"st_{key}" if key in ("mode", "uid", "gid") else f"st_{key}_ns", value)
        setattr(fields, f"update_{key}", True)
    return attr, fields


def test_chown_clears_set_id_bits_of_files_as_linux_does() -> None:
    c = txattrs.Changes()
    attr, fields = request(uid=7)
    assert txattrs.setattr(c, stat.S_IFREG | 0o6755, 0, 0, attr, fields, now_ns=5)
    assert (c.uid, c.gid, c.mode, c.ctime_ns) == (7, None, 0o755, 5)
    c = txattrs.Changes()  # setgid without group execute stays (a mandatory-lock mark)
    assert txattrs.setattr(c, stat.S_IFREG | 0o6745, 0, 0, attr, fields, now_ns=5)
    assert c.mode == 0o2745
    c = txattrs.Changes()  # a directory keeps its set-id bits
    assert txattrs.setattr(c, stat.S_IFDIR | 0o2775, 0, 0, attr, fields, now_ns=5)
    assert c.mode is None


def test_setattr_that_changes_nothing_records_nothing() -> None:
    c = txattrs.Changes()
    attr, fields = request(mode=0o644, uid=3, gid=4)
    assert not txattrs.setattr(c, stat.S_IFREG | 0o644, 3, 4, attr, fields, now_ns=5)
    assert c.empty() and c.ctime_ns is None
    attr, fields = request(mtime=10, atime=11)
    assert txattrs.setattr(c, stat.S_IFREG | 0o644, 3, 4, attr, fields, now_ns=5,
                           times=False)  # the mtime goes with a rewritten file's content
    assert (c.atime_ns, c.mtime_ns) == (11, None)


def test_fold_keeps_the_file_type_and_the_latest_ctime() -> None:
    attr = pyfuse3.EntryAttributes()
    attr.st_mode, attr.st_uid, attr.st_ctime_ns, attr.st_mtime_ns = stat.S_IFDIR | 0o755, 1, 50, 9
    txattrs.fold(attr, txattrs.Changes(mode=0o700, uid=2, mtime_ns=3, ctime_ns=40))
    assert (attr.st_mode, attr.st_uid, attr.st_mtime_ns, attr.st_ctime_ns) == (
        stat.S_IFDIR | 0o700, 2, 3, 50)


def test_xattr_views() -> None:
    c = txattrs.Changes()
    txattrs.set_xattr(c, b"user.new", b"1", now_ns=1)
    txattrs.remove_xattr(c, b"user.old", exists=True, now_ns=2)
    assert txattrs.xattr_names(c, [b"user.old", b"user.kept"]) == [b"user.kept", b"user.new"]
    assert txattrs.get_xattr(c, b"user.new", lambda: b"x") == b"1"
    assert txattrs.get_xattr(c, b"user.kept", lambda: b"k") == b"k"
    with pytest.raises(pyfuse3.FUSEError):
        txattrs.get_xattr(c, b"user.old", lambda: b"x")
    with pytest.raises(pyfuse3.FUSEError):
        txattrs.remove_xattr(c, b"user.none", exists=False, now_ns=3)
    txattrs.set_xattr(c, b"user.old", b"again", now_ns=4)
    assert txattrs.xattr_names(c, [b"user.old"]) == [b"user.old", b"user.new"]


def test_meta_round_trips_in_the_record() -> None:
    changes = txattrs.Changes(mode=0o600, uid=None, gid=5, atime_ns=-1, mtime_ns=10**18,
                              xattrs={b"user.a": b"\x00\xff", b"user.\xffb": None})
    ops: list[txrecord.Op] = [txrecord.Meta((b"d",), b"f", 1, 2, "1:00", changes),
                              txrecord.Meta((), b"", 1, 3, "", txattrs.Changes(mode=0o700))]
    assert txrecord.decode(txrecord.encode(ops)) == ops
    # only a meta may name the parent itself, and never by "." or ".."
    bad = txrecord.encode([txrecord.Meta((b"..",), b"f", 1, 2, "", changes)])
    assert txrecord.decode(bad) is None


def test_meta_replay_is_idempotent_and_skips_a_replaced_object(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / ".atomicfs" / "tx-1").mkdir(parents=True)
    (root / "d").mkdir()
    (root / "d" / "f").write_text("f")
    (root / "d" / "g").write_text("g")
    os.setxattr(root / "d" / "f", "user.gone", b"x")
    rfd = os.open(root, os.O_PATH)
    dfd = os.open(root / ".atomicfs", os.O_PATH)
    sfd = os.open(root / ".atomicfs" / "tx-1", os.O_PATH)
    try:
        def meta(parent: tuple[bytes, ...], name: bytes, c: txattrs.Changes) -> txrecord.Meta:
            fd = os.open(root.joinpath(*map(os.fsdecode, parent), os.fsdecode(name)), os.O_PATH)
            st = os.stat(fd)
            op = txrecord.Meta(parent, name, st.st_dev, st.st_ino, txrecord.identity(fd), c)
            os.close(fd)
            return op
        f = txattrs.Changes(mode=0o600, mtime_ns=10**18, xattrs={b"user.new": b"1",
                                                                 b"user.gone": None})
        ops: list[txrecord.Op] = [meta((b"d",), b"f", f),
                                  meta((b"d",), b"g", txattrs.Changes(mode=0o640)),
                                  meta((b"d",), b"", txattrs.Changes(mtime_ns=7 * 10**17)),
                                  meta((), b"", txattrs.Changes(mode=0o711))]
        txrecord.write(sfd, ops)
        pfd = os.open(root / "d", os.O_PATH)
        assert txrecord.apply_op(sfd, ops[0], pfd)  # applied before a crash
        os.close(pfd)
        (root / "d" / "g").unlink()  # replaced by someone else since: left alone
        (root / "d" / "g").write_text("other")
        os.chmod(root / "d" / "g", 0o604)
        done = txrecord.recover(rfd, dfd, ["tx-1"])
    finally:
        for fd in (rfd, dfd, sfd):
            os.close(fd)
    st = os.stat(root / "d" / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o600, 10**18)
    assert os.listxattr(root / "d" / "f") == ["user.new"]
    assert stat.S_IMODE(os.stat(root / "d" / "g").st_mode) == 0o604
    assert os.stat(root / "d").st_mtime_ns == 7 * 10**17
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o711
    assert os.listdir(root / ".atomicfs") == []
    assert "3 of 4" in done[0], done

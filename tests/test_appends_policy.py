"""Append sessions without FUSE: the write-boundary rule, the checkpoint decision,
rollback records and their recovery, the mount options (docs/semantics.md §10)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import needs_root

from atomicfs import appends, journal, syscalls
from atomicfs.appends import IDLE_WHOLE, PAGE, PARTIAL_MIN, AppendState, Rollback, is_whole
from atomicfs.options import OptionError, parse_options

MIB = 1 << 20


@pytest.mark.parametrize(("offset", "length", "whole"), [
    (0, 10, True),  # a line
    (4000, 96, False),  # ends on a page: the short first request of a longer write()
    (0, MIB, False),  # a full request ending on a page: maybe more of the same write()
    (100, MIB - 100, False),  # the first request of an unaligned write
    (100, MIB - 99, True),  # ends inside a page: the last request of its write()
    (0, MIB + 1, True),
    (3, 64 * PAGE, False),  # a whole number of pages, unaligned: cut at max_write?
    (3, PARTIAL_MIN - PAGE, True),  # too short for that
])
def test_is_whole(offset: int, length: int, whole: bool) -> None:
    assert is_whole(offset, length) is whole


def test_appends_fall_due_by_time_and_by_bytes() -> None:
    st = AppendState.new(100, log=True)
    assert st.due(0.0, 5, MIB) is None  # nothing appended
    st.wrote(100, 10, 100, now=10.0)
    assert st.due(14.9, 5, MIB) is None
    assert st.due(15.0, 5, MIB) == 110
    assert st.wake_at(5, MIB) == 15.0
    st.checkpointed(110)
    assert (st.base, st.due(99.0, 5, MIB), st.wake_at(5, MIB)) == (110, None, None)
    st.wrote(110, MIB, 110, now=20.0)  # one request of a full MiB: maybe part of a write
    assert st.due(20.0, 5, MIB) is None
    assert st.wake_at(5, MIB) == 20.0 + IDLE_WHOLE
    st.wrote(110 + MIB, 7, 110 + MIB, now=20.1)  # its end: now the size counts
    assert st.due(20.1, 5, MIB) == 117 + MIB


def test_a_lone_full_request_counts_once_idle() -> None:
    st = AppendState.new(0, log=True)
    st.wrote(0, 10, 0, now=1.0)
    st.wrote(10, MIB - 10, 10, now=5.5)  # ends on a page: maybe cut
    assert st.due(6.0, 5, 2 * MIB) == 10  # the interval passed: up to the whole write
    assert st.wake_at(5, 2 * MIB) == 5.5 + IDLE_WHOLE
    assert st.due(5.5 + IDLE_WHOLE, 5, 2 * MIB) == MIB  # alone long enough: whole
    st.checkpointed(10)
    assert st.unsaved_since == 5.5  # the rest still waits, from its own write


def test_overwrite_and_truncate_end_a_log_until_a_whole_commit() -> None:
    st = AppendState.new(50, log=True)
    st.wrote(50, 10, 50, now=1.0)
    st.wrote(55, 2, 60, now=2.0)  # below the end
    assert not st.log and st.due(100.0, 5, 1) is None and st.wake_at(5, 1) is None
    st.committed(60)
    assert st.log and st.base == 60
    st.wrote(60, 1, 60, now=3.0)
    st.stop()  # a truncate
    assert st.due(100.0, 5, 1) is None
    st = AppendState.new(0, log=False)  # a new file written the ordinary way
    st.wrote(0, 10, 0, now=1.0)
    assert st.due(100.0, 5, 1) is None


def test_a_failed_checkpoint_is_retried_one_interval_later() -> None:
    st = AppendState.new(0, log=True)
    st.wrote(0, 10, 0, now=1.0)
    st.retry_at = 7.0  # what Appends sets when a checkpoint could not be made at 2.0
    assert st.due(6.9, 5, 1) is None and st.wake_at(5, 1) == 7.0
    assert st.due(7.0, 5, 1) == 10


def test_a_write_past_the_end_is_an_append() -> None:
    st = AppendState.new(10, log=True)
    st.wrote(20, 5, 10, now=1.0)  # leaves a hole: still at or beyond the end
    assert st.log and st.due(7.0, 5, MIB) == 25


def test_rollback_record_round_trip_and_torn() -> None:
    rec = Rollback(journal.FileId(42, 1, b"\x01\x02handle"), 12345, -7)
    blob = appends.encode(rec)
    assert appends.decode(blob) == rec
    for bad in (blob[:-1], blob[:5], b"", blob[:-1] + bytes([blob[-1] ^ 1]),
                b"AFSJ0002" + blob[8:]):
        assert appends.decode(bad) is None


@needs_root  # file handles (open_by_handle_at)
def test_append_in_place_and_recovery_undo(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"committed\n")
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    daemon_dir = os.open(tmp_path / "d", os.O_PATH | os.O_DIRECTORY)
    target = os.open(tmp_path / "f", os.O_RDWR)
    shadow = syscalls.tmpfile(daemon_dir)
    try:
        os.pwrite(shadow, b"one\ntwo\n", 10)
        old = os.fstat(target)
        fid = journal.file_id(target)
        rec = Rollback(fid, 10, old.st_mtime_ns)
        appends.append_in_place(target, shadow, 10, 14, None, daemon_dir, "append-1", rec)
        assert (tmp_path / "f").read_bytes() == b"committed\none\n"
        assert os.listdir(tmp_path / "d") == []  # the record is gone once done
        # a crash in the middle of the next one: its record and part of its bytes
        (tmp_path / "d" / "append-2").write_bytes(appends.encode(Rollback(fid, 14, 5)))
        (tmp_path / "d" / "append-3").write_bytes(appends.encode(Rollback(fid, 14, 5))[:-3])
        os.pwrite(target, b"tw", 14)
        lines = appends.recover(daemon_dir, root)
        assert (tmp_path / "f").read_bytes() == b"committed\none\n"
        assert os.stat(tmp_path / "f").st_mtime_ns == 5
        assert "undid an unfinished checkpoint" in lines[0] and "torn" in lines[1], lines
        assert os.listdir(tmp_path / "d") == []
    finally:
        for fd in (root, daemon_dir, target, shadow):
            os.close(fd)


@needs_root
def test_a_failed_append_puts_the_file_back(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"committed\n")
    daemon_dir = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    target = os.open(tmp_path / "f", os.O_RDWR)
    shadow = os.open(tmp_path / "f", os.O_RDONLY)  # a source that cannot be written to
    ro_target = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        rec = Rollback(journal.file_id(target), 10, os.fstat(target).st_mtime_ns)
        with pytest.raises(OSError):  # EBADF: the target is open read-only
            appends.append_in_place(ro_target, shadow, 10, 20, None, daemon_dir, "append-x",
                                    rec)
        assert (tmp_path / "f").read_bytes() == b"committed\n"
    finally:
        for fd in (daemon_dir, target, shadow, ro_target):
            os.close(fd)


@pytest.mark.parametrize(("items", "seconds", "size"), [
    ([], 5.0, 64 * MIB),
    (["checkpoint=0.5", "checkpoint_bytes=1M"], 0.5, MIB),
    (["checkpoint=3600", "checkpoint_bytes=4096"], 3600.0, 4096),
    (["checkpoint_bytes=2g", "checkpoint_bytes=16k"], 5.0, 16 << 10),
])
def test_checkpoint_options(items: list[str], seconds: float, size: int) -> None:
    opts = parse_options(items, source="/s", is_root=False)
    assert (opts.checkpoint, opts.checkpoint_bytes) == (seconds, size)


@pytest.mark.parametrize("item", ["checkpoint", "checkpoint=", "checkpoint=0",
                                  "checkpoint=nan", "checkpoint=7200", "checkpoint_bytes=0",
                                  "checkpoint_bytes=1.5M", "checkpoint_bytes=-1",
                                  "checkpoint_bytes=10T", "checkpoint_bytes"])
def test_bad_checkpoint_options(item: str) -> None:
    with pytest.raises(OptionError, match=item.partition("=")[0]):
        parse_options([item], source="/s", is_root=False)

"""Journal records (pure) and replay on a real directory, without FUSE."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atomicfs import journal
from atomicfs.journal import DATA, HOLE, Change, FileId, Record


def _record(changes: list[Change], size: int = 1 << 20, mtime: int | None = 123) -> Record:
    return Record(FileId(42, 1, b"\x01\x02\x03\x04\x05\x06\x07\x08"), size, mtime,
                  tuple(changes))


@given(st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(1, 64), st.booleans()),
                max_size=20), st.integers(0, 1 << 50),
       st.one_of(st.none(), st.integers(-(1 << 62), 1 << 62)))
@settings(max_examples=200, deadline=None)
def test_encode_decode_round_trip(raw: list[tuple[int, int, bool]], size: int,
                                  mtime: int | None) -> None:
    changes = [Change(off, n, DATA if data else HOLE) for off, n, data in raw]
    payload = [os.urandom(c.length) for c in changes if c.kind == DATA]
    rec = _record(changes, size, mtime)
    decoded = journal.decode(journal.encode(rec, payload))
    assert decoded is not None
    got, data = decoded
    assert got == rec
    assert data == b"".join(payload)


def test_every_truncation_and_every_bit_flip_is_rejected() -> None:
    rec = _record([Change(0, 8, DATA), Change(100, 50, HOLE), Change(4096, 4, DATA)])
    blob = journal.encode(rec, [b"abcdefgh", b"wxyz"])
    assert journal.decode(blob) is not None
    for cut in range(len(blob)):
        assert journal.decode(blob[:cut]) is None, f"torn at {cut} accepted"
    for pos in range(len(blob)):
        for bit in (0, 3, 7):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            assert journal.decode(bytes(bad)) is None, f"flip at {pos}.{bit} accepted"
    assert journal.decode(blob + b"x") is None


def _setup(tmp_path: Path, content: bytes) -> tuple[int, int, Path]:
    root = tmp_path / "root"
    (root / ".atomicfs").mkdir(parents=True)
    target = root / "file"
    target.write_bytes(content)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    ddir = os.open(root / ".atomicfs", os.O_PATH | os.O_DIRECTORY)
    return root_fd, ddir, target


@pytest.mark.skipif(not journal.available(os.open("/", os.O_PATH)),
                    reason="needs open_by_handle_at (root)")
def test_write_then_replay_applies_and_retires(tmp_path: Path) -> None:
    old = bytes(random.Random(1).randbytes(256 * 1024))
    root_fd, ddir, target = _setup(tmp_path, old)
    shadow = tmp_path / "shadow"
    new = bytearray(old)
    new[1000:1100] = b"N" * 100
    new[200_000:200_010] = b"M" * 10
    new = new[:250_000] + b"T" * 10
    sh = bytearray(len(new))
    sh[1000:1100] = new[1000:1100]
    sh[200_000:200_010] = new[200_000:200_010]
    sh[250_000:] = new[250_000:]
    shadow.write_bytes(bytes(sh))
    new[50_000:60_000] = bytes(10_000)  # a punched hole
    changes = [Change(1000, 100, DATA), Change(50_000, 10_000, HOLE),
               Change(200_000, 10, DATA), Change(250_000, 10, DATA)]
    tfd = os.open(target, os.O_PATH)
    rec = Record(journal.file_id(tfd), len(new), 1_000_000_123, tuple(changes))
    sfd = os.open(shadow, os.O_RDONLY)
    journal.write_record(ddir, "journal-test-1", rec, sfd)
    assert target.read_bytes() == old  # writing the record does not touch the target
    lines = journal.replay(ddir, root_fd)
    assert len(lines) == 1 and lines[0].startswith("replayed"), lines
    assert target.read_bytes() == bytes(new)
    assert os.stat(target).st_mtime_ns == 1_000_000_123
    assert os.listdir(tmp_path / "root" / ".atomicfs") == []
    # idempotent: applying the same record again changes nothing
    journal.write_record(ddir, "journal-test-2", rec, sfd)
    journal.replay(ddir, root_fd)
    assert target.read_bytes() == bytes(new)


@pytest.mark.skipif(not journal.available(os.open("/", os.O_PATH)),
                    reason="needs open_by_handle_at (root)")
@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_torn_or_corrupt_records_are_discarded(tmp_path: Path, damage: str) -> None:
    old = b"o" * 10000
    root_fd, ddir, target = _setup(tmp_path, old)
    shadow = tmp_path / "shadow"
    shadow.write_bytes(b"n" * 10000)
    tfd = os.open(target, os.O_PATH)
    rec = Record(journal.file_id(tfd), 10000, None, (Change(0, 10000, DATA),))
    journal.write_record(ddir, "journal-x-1", rec, os.open(shadow, os.O_RDONLY))
    path = tmp_path / "root" / ".atomicfs" / "journal-x-1"
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) - 100]
    elif damage == "flip":
        blob[len(blob) // 2] ^= 0x40
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    lines = journal.replay(ddir, root_fd)
    assert len(lines) == 1 and lines[0].startswith("discarded"), lines
    assert target.read_bytes() == old
    assert os.listdir(tmp_path / "root" / ".atomicfs") == []


@pytest.mark.skipif(not journal.available(os.open("/", os.O_PATH)),
                    reason="needs open_by_handle_at (root)")
def test_record_for_a_vanished_file_is_discarded(tmp_path: Path) -> None:
    root_fd, ddir, target = _setup(tmp_path, b"x" * 100)
    tfd = os.open(target, os.O_PATH)
    rec = Record(journal.file_id(tfd), 0, None, ())
    os.close(tfd)
    journal.write_record(ddir, "journal-y-1", rec, -1)
    target.unlink()
    (tmp_path / "root" / "other").write_bytes(b"y" * 100)  # may reuse the inode number
    lines = journal.replay(ddir, root_fd)
    # the handle carries the inode generation: a reused inode number is not the file
    assert lines[0].startswith("discarded"), lines
    assert (tmp_path / "root" / "other").read_bytes() == b"y" * 100
    assert os.listdir(tmp_path / "root" / ".atomicfs") == []


def test_reserve_allocates_the_holes_data_will_fill_and_unreserve_gives_them_back(
        tmp_path: Path) -> None:
    path = tmp_path / "target"
    with open(path, "wb") as f:
        f.write(b"A" * 65536)  # data, then a hole up to 1 MiB
        f.truncate(1 << 20)
    before = path.read_bytes()
    os.utime(path, ns=(10**18, 2 * 10**18))
    blocks = os.stat(path).st_blocks
    record = _record([Change(32768, 65536, DATA),  # half data, half hole
                      Change(512 * 1024, 8192, HOLE),  # a hole change reserves nothing
                      Change((1 << 20) - 4096, 8192, DATA)])  # past EOF
    fd = os.open(path, os.O_RDWR)
    try:
        reserved = journal.reserve(fd, record)
        assert reserved.ranges == [(65536, 98304), ((1 << 20) - 4096, (1 << 20) + 4096)]
        assert path.read_bytes() == before, "reserving changed the content or the size"
        assert os.stat(path).st_blocks >= blocks + (32768 + 8192) // 512
        journal.unreserve(fd, reserved)
        st = os.stat(path)
        assert st.st_blocks == blocks, "the reserved blocks were not all given back"
        assert (st.st_atime_ns, st.st_mtime_ns) == (10**18, 2 * 10**18), "times moved"
        assert path.read_bytes() == before
    finally:
        os.close(fd)


def test_a_version_1_record_still_decodes() -> None:
    """Records left by an older daemon (AFSJ0001: no flags, -1 meaning "keep")."""
    import struct
    import zlib

    for mtime_v1, want in ((-1, None), (5_000_000_000, 5_000_000_000)):
        handle = b"\x01\x02\x03\x04"
        body = (journal.FIXED_V1.pack(42, 4096, mtime_v1, 1, len(handle)) + handle
                + journal.COUNT.pack(1) + journal.EXTENT.pack(0, 4, DATA) + b"data")
        blob = journal.HEADER.pack(journal.MAGIC_V1, len(body), zlib.crc32(body)) + body
        decoded = journal.decode(blob)
        assert decoded is not None, struct.calcsize("<QQqII")
        record, data = decoded
        assert record == Record(FileId(42, 1, handle), 4096, want, (Change(0, 4, DATA),))
        assert data == b"data"


def test_apply_keeps_an_mtime_before_1970(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.write_bytes(b"old")
    fd = os.open(target, os.O_RDWR)
    try:
        record = Record(FileId(0, 0, b""), 3, -86_400 * 10**9, (Change(0, 3, HOLE),))
        blob = journal.encode(record, [])
        decoded = journal.decode(blob)
        assert decoded is not None and decoded[0].mtime_ns == -86_400 * 10**9
        journal.apply(fd, decoded[0], -1, None)
    finally:
        os.close(fd)
    assert os.stat(target).st_mtime_ns == -86_400 * 10**9, "a pre-1970 mtime was dropped"

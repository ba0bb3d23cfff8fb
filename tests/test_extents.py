"""Tests for atomicfs.extents: unit tests, a byte-level stateful model, huge offsets."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from atomicfs.extents import Extent, ExtentMap, Kind

C, S, H = Kind.COMMITTED, Kind.SHADOW, Kind.HOLE
BIG = 2**62


def layout(m: ExtentMap, start: int = 0, end: int | None = None) -> list[tuple[int, int, Kind]]:
    return [(e.start, e.end, e.kind) for e in m.extents(start, end)]


# -- unit tests -------------------------------------------------------------


def test_empty() -> None:
    m = ExtentMap()
    assert m.size == 0
    assert len(m) == 0
    assert layout(m) == []
    assert m.is_clean()
    m.check()


def test_initial_kind() -> None:
    m = ExtentMap(10)
    assert layout(m) == [(0, 10, C)]
    assert m.is_clean()
    h = ExtentMap(10, H)
    assert layout(h) == [(0, 10, H)]
    assert not h.is_clean()
    assert h.count(H) == 10


def test_extent_length() -> None:
    assert Extent(3, 10, S).length == 7


def test_write_at_zero_of_empty_map() -> None:
    m = ExtentMap()
    m.write(0, 5)
    assert m.size == 5
    assert layout(m) == [(0, 5, S)]
    assert not m.is_clean()
    m.check()


def test_write_zero_length_is_noop() -> None:
    m = ExtentMap(4)
    m.write(100, 0)
    assert m.size == 4
    assert layout(m) == [(0, 4, C)]


def test_write_past_eof_makes_hole() -> None:
    m = ExtentMap(10)
    m.write(20, 5)
    assert m.size == 25
    assert layout(m) == [(0, 10, C), (10, 20, H), (20, 25, S)]
    m.write(25, 5)  # appending exactly at EOF: no hole, merged
    assert layout(m) == [(0, 10, C), (10, 20, H), (20, 30, S)]
    m.check()


def test_write_inside_splits() -> None:
    m = ExtentMap(10)
    m.write(3, 4)
    assert layout(m) == [(0, 3, C), (3, 7, S), (7, 10, C)]
    assert m.count(C) == 6
    assert m.count(S) == 4
    m.check()


def test_overlapping_writes_merge() -> None:
    m = ExtentMap(100)
    m.write(10, 10)
    m.write(30, 10)
    m.write(15, 20)
    assert layout(m) == [(0, 10, C), (10, 40, S), (40, 100, C)]
    m.write(0, 100)
    assert layout(m) == [(0, 100, S)]
    assert len(m) == 1
    m.check()


def test_adjacent_writes_merge() -> None:
    m = ExtentMap(100)
    m.write(10, 10)
    m.write(20, 10)
    m.write(5, 5)
    assert layout(m) == [(0, 5, C), (5, 30, S), (30, 100, C)]


def test_write_straddling_eof() -> None:
    m = ExtentMap(10)
    m.write(8, 10)
    assert layout(m) == [(0, 8, C), (8, 18, S)]
    assert m.size == 18


def test_truncate_cuts_straddling_extent() -> None:
    m = ExtentMap(100)
    m.write(20, 30)
    m.truncate(30)
    assert m.size == 30
    assert layout(m) == [(0, 20, C), (20, 30, S)]
    m.truncate(20)
    assert layout(m) == [(0, 20, C)]
    assert m.count(S) == 0
    m.check()


def test_truncate_to_zero_and_regrow() -> None:
    m = ExtentMap(100)
    m.truncate(0)
    assert m.size == 0
    assert len(m) == 0
    m.truncate(7)
    assert layout(m) == [(0, 7, H)]
    m.check()


def test_extend_after_shrink_is_hole_not_committed() -> None:
    m = ExtentMap(100)
    m.truncate(40)
    m.truncate(100)
    assert layout(m) == [(0, 40, C), (40, 100, H)]
    assert not m.is_clean()
    m.truncate(120)  # extending a trailing hole merges
    assert layout(m) == [(0, 40, C), (40, 120, H)]
    m.check()


def test_truncate_same_size_noop() -> None:
    m = ExtentMap(10)
    m.write(2, 2)
    m.truncate(10)
    assert layout(m) == [(0, 2, C), (2, 4, S), (4, 10, C)]


def test_punch_inside_shadow_splits() -> None:
    m = ExtentMap()
    m.write(0, 100)
    m.punch(40, 20)
    assert layout(m) == [(0, 40, S), (40, 60, H), (60, 100, S)]
    assert m.size == 100
    assert m.count(H) == 20
    m.check()


def test_punch_keeps_size_and_clips() -> None:
    m = ExtentMap(10)
    m.punch(5, 1000)
    assert m.size == 10
    assert layout(m) == [(0, 5, C), (5, 10, H)]
    m.punch(50, 10)  # entirely past EOF: no-op
    m.punch(0, 0)
    assert layout(m) == [(0, 5, C), (5, 10, H)]
    m.punch(0, 5)
    assert layout(m) == [(0, 10, H)]
    assert len(m) == 1
    m.check()


def test_punch_merges_with_neighbouring_holes() -> None:
    m = ExtentMap(10)
    m.write(20, 10)  # hole [10, 20)
    m.punch(5, 5)
    m.punch(20, 3)
    assert layout(m) == [(0, 5, C), (5, 23, H), (23, 30, S)]


def test_extents_window() -> None:
    m = ExtentMap(100)
    m.write(10, 10)
    m.punch(50, 10)
    assert layout(m, 15, 55) == [(15, 20, S), (20, 50, C), (50, 55, H)]
    assert layout(m, 12, 18) == [(12, 18, S)]
    assert layout(m, 20, 20) == []
    assert layout(m, 60, 1000) == [(60, 100, C)]
    assert layout(m, 100) == []
    assert layout(m, 500, 1000) == []
    assert layout(m, 30, 10) == []


def test_counts_and_clean() -> None:
    m = ExtentMap(50)
    m.write(10, 10)
    m.punch(30, 5)
    m.write(60, 5)
    assert (m.count(C), m.count(S), m.count(H)) == (35, 15, 15)
    assert sum(m.count(k) for k in Kind) == m.size
    assert not m.is_clean()


def test_reset() -> None:
    m = ExtentMap(10)
    m.write(3, 20)
    m.punch(0, 2)
    m.reset(23)
    assert layout(m) == [(0, 23, C)]
    assert m.is_clean()
    assert m.count(S) == 0
    m.reset(0)
    assert m.size == 0
    assert len(m) == 0
    m.check()


def test_huge_offsets() -> None:
    m = ExtentMap(4096)
    m.write(BIG, 10)
    assert m.size == BIG + 10
    assert layout(m) == [(0, 4096, C), (4096, BIG, H), (BIG, BIG + 10, S)]
    m.punch(BIG + 2, 2)
    m.write(BIG - 5, 5)
    assert layout(m, BIG - 10) == [
        (BIG - 10, BIG - 5, H),
        (BIG - 5, BIG + 2, S),
        (BIG + 2, BIG + 4, H),
        (BIG + 4, BIG + 10, S),
    ]
    assert m.count(H) == BIG - 4096 - 5 + 2
    m.truncate(2 * BIG)
    assert layout(m, BIG + 5) == [(BIG + 5, BIG + 10, S), (BIG + 10, 2 * BIG, H)]
    m.truncate(BIG + 3)
    assert layout(m, BIG) == [(BIG, BIG + 2, S), (BIG + 2, BIG + 3, H)]
    m.check()


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.write(-1, 1),
        lambda m: m.write(0, -1),
        lambda m: m.truncate(-1),
        lambda m: m.punch(-1, 1),
        lambda m: m.punch(0, -1),
        lambda m: m.reset(-1),
        lambda m: m.extents(-1),
        lambda m: ExtentMap(-1),
    ],
)
def test_negative_values_raise(call: Callable[[ExtentMap], object]) -> None:
    m = ExtentMap(10)
    with pytest.raises(ValueError, match=">= 0"):
        call(m)
    assert layout(m) == [(0, 10, C)]


def test_check_detects_corruption() -> None:
    m = ExtentMap(10)
    m.write(2, 2)
    m._map[4] = S  # adjacent SHADOW extents
    with pytest.raises(AssertionError, match="adjacent"):
        m.check()


def test_many_small_writes() -> None:
    rng = random.Random(1234)
    size = 1 << 20
    m = ExtentMap(size)
    writes = 100_000
    for i in range(writes):
        m.write(rng.randrange(size), rng.randint(1, 64))
        if i % 10_000 == 0:
            assert len(m) <= 2 * (i + 1) + 1
    assert len(m) <= 2 * writes + 1
    assert sum(m.count(k) for k in Kind) == m.size
    m.check()
    assert sum(e.length for e in m.extents()) == m.size


# -- stateful test against a byte-level model ---------------------------------

MAX_OFF = 24 * 1024  # offsets/lengths keep every file below 64 KiB


class ByteModel(RuleBasedStateMachine):
    """Compare ExtentMap against committed/shadow/expected byte arrays."""

    def __init__(self) -> None:
        super().__init__()
        self.committed = bytearray()
        self.shadow = bytearray()
        self.expected = bytearray()
        self.kinds = bytearray()  # expected Kind of every byte
        self.m = ExtentMap()
        self.stamp = 0

    @initialize(data=st.binary(max_size=4096))
    def init(self, data: bytes) -> None:
        self.committed = bytearray(data)
        self.expected = bytearray(data)
        self.kinds = bytearray([C]) * len(data)
        self.m = ExtentMap(len(data))

    def _resize(self, size: int) -> None:
        old = len(self.expected)
        del self.expected[size:]
        del self.kinds[size:]
        self.expected += bytes(size - len(self.expected))
        self.kinds += bytes([H]) * (size - old if size > old else 0)

    def _write(self, offset: int, length: int) -> None:
        # Distinctive non-zero bytes so a wrong source shows up in the content too.
        self.stamp += 1
        data = bytes((self.stamp + i) % 255 + 1 for i in range(length))
        if length:
            end = offset + length
            if len(self.shadow) < end:
                self.shadow += bytes(end - len(self.shadow))
            self.shadow[offset:end] = data
            if len(self.expected) < end:
                self._resize(end)
            self.expected[offset:end] = data
            self.kinds[offset:end] = bytes([S]) * length
        self.m.write(offset, length)

    @rule(offset=st.integers(0, MAX_OFF), length=st.integers(0, 4096))
    def write(self, offset: int, length: int) -> None:
        self._write(offset, length)

    @rule(delta=st.integers(-64, 64), length=st.integers(0, 64))
    def write_near_eof(self, delta: int, length: int) -> None:
        self._write(max(0, len(self.expected) + delta), length)

    @precondition(lambda self: len(self.m) > 1)
    @rule(data=st.data())
    def write_on_boundary(self, data: st.DataObject) -> None:
        exts = list(self.m.extents())
        e = data.draw(st.sampled_from(exts))
        self._write(e.start, data.draw(st.sampled_from([e.length, e.length + 1, 1])))

    @rule(size=st.integers(0, MAX_OFF + 4096))
    def truncate(self, size: int) -> None:
        self._resize(size)
        self.m.truncate(size)

    @rule(offset=st.integers(0, MAX_OFF + 4096), length=st.integers(0, 8192))
    def punch(self, offset: int, length: int) -> None:
        end = min(offset + length, len(self.expected))
        if offset < end:
            self.expected[offset:end] = bytes(end - offset)
            self.kinds[offset:end] = bytes([H]) * (end - offset)
        self.m.punch(offset, length)

    @rule()
    def commit(self) -> None:
        self.committed = bytearray(self.expected)
        self.shadow = bytearray()
        self.kinds = bytearray([C]) * len(self.expected)
        self.m.reset(len(self.expected))

    @rule(start=st.integers(0, MAX_OFF + 4096), length=st.integers(0, 8192))
    def window(self, start: int, length: int) -> None:
        got = layout(self.m, start, start + length)
        end = min(start + length, self.m.size)
        want = [
            (max(s, start), min(e, end), k)
            for s, e, k in layout(self.m)
            if s < end and e > start and start < end
        ]
        assert got == want

    @invariant()
    def content_matches(self) -> None:
        m = self.m
        m.check()
        assert m.size == len(self.expected)
        exts = list(m.extents())
        out = bytearray()
        kinds = bytearray()
        prev: Kind | None = None
        for e in exts:
            assert e.start == len(out)
            assert e.end > e.start
            assert e.kind is not prev
            prev = e.kind
            if e.kind is C:
                assert e.end <= len(self.committed)
                out += self.committed[e.start : e.end]
            elif e.kind is S:
                assert e.end <= len(self.shadow)
                out += self.shadow[e.start : e.end]
            else:
                out += bytes(e.length)
            kinds += bytes([e.kind]) * e.length
        assert out == self.expected
        assert kinds == self.kinds
        assert len(m) == len(exts)
        for k in Kind:
            assert m.count(k) == self.kinds.count(k)
        assert m.is_clean() == (m.count(C) == m.size)


ByteModel.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestByteModel = ByteModel.TestCase


# -- huge offsets against a naive interval model -------------------------------


def naive_assign(
    segs: list[tuple[int, int, Kind]], start: int, end: int, kind: Kind
) -> list[tuple[int, int, Kind]]:
    """Set [start, end) to kind in a gap-free list of segments, then merge."""
    out: list[tuple[int, int, Kind]] = []
    for s, e, k in segs:
        if s < start:
            out.append((s, min(e, start), k))
        if e > end:
            out.append((max(s, end), e, k))
    out.append((start, end, kind))
    out.sort()
    merged: list[tuple[int, int, Kind]] = []
    for s, e, k in out:
        if merged and merged[-1][2] == k and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e, k)
        else:
            merged.append((s, e, k))
    return merged


Segs = list[tuple[int, int, Kind]]


def naive_apply(segs: Segs, size: int, op: tuple[str, int, int]) -> tuple[Segs, int]:
    name, a, b = op
    if name == "write" and b:
        if a > size:
            segs = naive_assign(segs, size, a, H)
        size = max(size, a + b)
        segs = naive_assign(segs, a, a + b, S)
    elif name == "truncate":
        if a > size:
            segs = naive_assign(segs, size, a, H)
        else:
            segs = [(s, min(e, a), k) for s, e, k in segs if s < a]
        size = a
    elif name == "punch" and min(a + b, size) > a:
        segs = naive_assign(segs, a, min(a + b, size), H)
    return segs, size


huge_offsets = st.one_of(
    st.integers(0, 2**63),
    st.integers(BIG - 4096, BIG + 4096),
    st.integers(0, 4096),
)
huge_lengths = st.one_of(st.integers(0, 2**40), st.integers(0, 4096))
ops = st.lists(
    st.tuples(st.sampled_from(["write", "truncate", "punch"]), huge_offsets, huge_lengths),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(init=st.integers(0, 2**62), ops=ops)
def test_huge_offsets_structure(init: int, ops: list[tuple[str, int, int]]) -> None:
    m = ExtentMap(init)
    segs: list[tuple[int, int, Kind]] = [(0, init, C)] if init else []
    size = init
    for op in ops:
        name, a, b = op
        if name == "truncate":
            m.truncate(a)
        else:
            getattr(m, name)(a, b)
        segs, size = naive_apply(segs, size, op)
        m.check()
        assert m.size == size
        assert layout(m) == segs
        for k in Kind:
            assert m.count(k) == sum(e - s for s, e, kk in segs if kk == k)


# -- bridges: what a session may fill to bound its map -----------------------------------
def test_bridges_are_the_gaps_between_shadow_extents() -> None:
    m = ExtentMap(100)
    for off in (0, 10, 30, 60):
        m.write(off, 5)
    m.write(98, 4)  # past EOF: [98, 102) SHADOW, no hole (it starts below size)
    m.truncate(120)  # [102, 120) HOLE: not between two SHADOW extents
    gaps = m.bridges(frozenset({Kind.COMMITTED}))
    assert [(e.start, e.end) for e in gaps] == [(5, 10), (15, 30), (35, 60), (65, 98)]
    assert m.bridges(frozenset({Kind.HOLE})) == []


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 1 << 20),
       writes=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 12)),
                       max_size=60),
       kinds=st.sampled_from([frozenset({Kind.COMMITTED}), frozenset({Kind.HOLE}),
                              frozenset({Kind.COMMITTED, Kind.HOLE})]))
def test_filling_each_bridge_removes_two_extents(size: int, writes: list[tuple[int, int]],
                                                 kinds: frozenset[Kind]) -> None:
    m = ExtentMap(size)
    for off, length in writes:
        m.write(off, length)
    for gap in m.bridges(kinds):
        assert gap.kind in kinds
        before = len(m)
        assert m._kind_at(gap.start - 1) is Kind.SHADOW
        assert m._kind_at(gap.end) is Kind.SHADOW
        m.write(gap.start, gap.length)
        assert len(m) == before - 2
        m.check()

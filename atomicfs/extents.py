"""Extent map: where each byte of a file session's current content comes from.

A file being rewritten has up to three sources for its bytes, all at the *same*
offset (there is no remapping):

* ``COMMITTED`` -- byte X is byte X of the committed (backing) file;
* ``SHADOW``    -- byte X is byte X of the sparse shadow file holding new writes;
* ``HOLE``      -- byte X is zero and stored nowhere (file extension, punched hole).

The map covers ``[0, size)`` without gaps.  Internally it is a ``SortedDict``
mapping each extent's start offset to its kind; an extent ends where the next
one starts (or at ``size``).  Adjacent extents never share a kind, so the map
is canonical: two maps describing the same content are equal.  Mutations
touch only the affected extents (O(log n + k)), and per-kind byte counts are
maintained incrementally, so offsets as large as 2**62 cost nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

from sortedcontainers import SortedDict  # type: ignore[import-untyped, unused-ignore]

__all__ = ["Extent", "ExtentMap", "Kind"]


class Kind(enum.IntEnum):
    """Source of a byte range."""

    COMMITTED = 0  # same offset in the committed (backing) file
    SHADOW = 1  # same offset in the shadow file
    HOLE = 2  # zeros, not stored anywhere


@dataclass(frozen=True, slots=True)
class Extent:
    """The half-open byte range ``[start, end)`` (``end > start``) of one kind."""

    start: int
    end: int
    kind: Kind

    @property
    def length(self) -> int:
        return self.end - self.start


def _check_nonneg(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


class ExtentMap:
    """Gap-free, canonical map of ``[0, size)`` to :class:`Kind`."""

    __slots__ = ("_counts", "_map", "_size")

    def __init__(self, size: int = 0, kind: Kind = Kind.COMMITTED) -> None:
        _check_nonneg(size=size)
        self._map: SortedDict = SortedDict()  # start -> Kind
        self._counts: dict[Kind, int] = dict.fromkeys(Kind, 0)
        self._size = 0
        if size:
            self._map[0] = kind
            self._counts[kind] = size
            self._size = size

    def __repr__(self) -> str:
        parts = ", ".join(f"[{e.start},{e.end}):{e.kind.name}" for e in self.extents())
        return f"ExtentMap(size={self._size}, {{{parts}}})"

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        """Number of stored extents."""
        return len(self._map)

    def count(self, kind: Kind) -> int:
        """Number of bytes of ``kind`` (O(1))."""
        return self._counts[kind]

    def is_clean(self) -> bool:
        """True iff every byte is COMMITTED (vacuously true for size 0).

        The caller must separately check that ``size`` equals the committed size.
        """
        return self._counts[Kind.COMMITTED] == self._size

    # -- mutations ---------------------------------------------------------

    def write(self, offset: int, length: int) -> None:
        """``pwrite``: the range becomes SHADOW; a gap left past EOF becomes HOLE."""
        _check_nonneg(offset=offset, length=length)
        if length == 0:
            return
        end = offset + length
        if end > self._size:
            self._grow(end)
        self._assign(offset, end, Kind.SHADOW)

    def truncate(self, size: int) -> None:
        """``ftruncate``: drop everything at/after ``size``, or extend with HOLE."""
        _check_nonneg(size=size)
        if size > self._size:
            self._grow(size)
        elif size < self._size:
            for ext in self.extents(size):
                self._counts[ext.kind] -= ext.length
            for key in list(self._map.irange(minimum=size)):
                del self._map[key]
            self._size = size

    def punch(self, offset: int, length: int) -> None:
        """``fallocate(PUNCH_HOLE|KEEP_SIZE)``: the part of the range below size -> HOLE."""
        _check_nonneg(offset=offset, length=length)
        end = min(offset + length, self._size)
        if offset < end:
            self._assign(offset, end, Kind.HOLE)

    def reset(self, size: int) -> None:
        """After a commit: the whole content is one COMMITTED extent ``[0, size)``."""
        _check_nonneg(size=size)
        self._map.clear()
        self._counts = dict.fromkeys(Kind, 0)
        self._size = size
        if size:
            self._map[0] = Kind.COMMITTED
            self._counts[Kind.COMMITTED] = size

    def _kind_at(self, offset: int) -> Kind:
        """Kind of the byte at ``offset`` (requires ``0 <= offset < size``)."""
        kind: Kind = self._map.peekitem(self._map.bisect_right(offset) - 1)[1]
        return kind

    def _grow(self, size: int) -> None:
        """Extend to ``size`` (> current size) with HOLE."""
        old = self._size
        if old == 0 or self._kind_at(old - 1) is not Kind.HOLE:
            self._map[old] = Kind.HOLE
        self._counts[Kind.HOLE] += size - old
        self._size = size

    def _assign(self, start: int, end: int, kind: Kind) -> None:
        """Set non-empty ``[start, end)`` within ``[0, size)`` to ``kind``, canonically."""
        m = self._map
        for ext in self.extents(start, end):
            self._counts[ext.kind] -= ext.length
        self._counts[kind] += end - start
        if end < self._size and end not in m:
            m[end] = self._kind_at(end)  # split the extent straddling `end`
        for key in list(m.irange(start, end, inclusive=(True, False))):
            del m[key]
        if start == 0 or self._kind_at(start - 1) is not kind:
            m[start] = kind  # otherwise the preceding extent simply grows
        if m.get(end) is kind:
            del m[end]  # merge with the following extent

    # -- queries -----------------------------------------------------------

    def bridges(self, kinds: frozenset[Kind]) -> list[Extent]:
        """Extents of one of ``kinds`` with SHADOW on both sides, in order.

        Turning one into SHADOW merges three extents into one (two fewer), which
        is how a session bounds its map (:meth:`atomicfs.sessions.Session.spill_plan`).
        """
        found: list[Extent] = []
        exts = self.extents()
        prev, cur = next(exts, None), next(exts, None)
        for nxt in exts:
            assert prev is not None and cur is not None
            if prev.kind is Kind.SHADOW and nxt.kind is Kind.SHADOW and cur.kind in kinds:
                found.append(cur)
            prev, cur = cur, nxt
        return found

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """Extents covering ``[start, min(end, size))`` in order, clipped to that range."""
        _check_nonneg(start=start)
        stop = self._size if end is None else min(end, self._size)
        if start >= stop:
            return iter(())
        return self._iter(start, stop)

    def _iter(self, start: int, stop: int) -> Iterator[Extent]:
        m = self._map
        first = m.keys()[m.bisect_right(start) - 1]
        keys = m.irange(minimum=first)
        cur = next(keys)
        while cur < stop:
            nxt = next(keys, self._size)
            yield Extent(max(cur, start), min(nxt, stop), m[cur])
            cur = nxt

    def check(self) -> None:
        """Verify all invariants; raise AssertionError on violation."""

        def fail(msg: str) -> NoReturn:
            raise AssertionError(f"{msg}: {self!r}")

        keys = list(self._map.keys())
        if self._size < 0:
            fail("negative size")
        if not keys:
            if self._size != 0:
                fail("non-empty map without extents")
        elif keys[0] != 0:
            fail("first extent does not start at 0")
        counts = dict.fromkeys(Kind, 0)
        prev: Kind | None = None
        for i, key in enumerate(keys):
            kind = self._map[key]
            nxt = keys[i + 1] if i + 1 < len(keys) else self._size
            if not isinstance(kind, Kind):
                fail(f"bad kind {kind!r} at {key}")
            if nxt <= key:
                fail(f"empty or unsorted extent at {key}")
            if kind is prev:
                fail(f"adjacent extents of kind {prev!r} at {key}")
            counts[kind] += nxt - key
            prev = kind
        if counts != self._counts:
            fail(f"byte counts {self._counts} != actual {counts}")

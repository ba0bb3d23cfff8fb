"""atomicfs.housekeeping: the worker thread, its shadow pool and deferred closes
(no FUSE: the pool lives in a plain directory)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from atomicfs import housekeeping
from atomicfs.housekeeping import Housekeeper


def _open_unnamed(directory: Path) -> int:
    """How many of this process's descriptors are unnamed files made in ``directory``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory) + "/#") and target.endswith("(deleted)"):
            count += 1
    return count


async def _until(cond, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await trio.sleep(0.01)
    return True


def test_pool_fills_on_demand_drains_when_idle_and_closes_handed_over_fds(
        tmp_path: Path) -> None:
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    hk = Housekeeper(dfd, pool_size=3, idle_drain=0.3)
    handed = os.open(tmp_path / "replaced", os.O_RDWR | os.O_CREAT, 0o600)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hk.run)
            await trio.sleep(0.1)
            assert not hk.ready and _open_unnamed(tmp_path) == 0, "no pool before it is asked"
            assert hk.take_shadow() is None and hk.misses == 1
            assert await _until(lambda: len(hk.ready) == 3)
            assert _open_unnamed(tmp_path) == 3
            fd = hk.take_shadow()
            assert fd is not None and os.fstat(fd).st_nlink == 0  # unnamed, ours now
            os.close(fd)
            hk.close_later(handed)
            assert await _until(lambda: not hk.ready), "an idle pool is drained"
            assert _open_unnamed(tmp_path) == 0
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        assert hk.made >= 4
        try:
            os.fstat(handed)
            raise AssertionError("the handed-over descriptor was not closed")
        except OSError:
            pass
    finally:
        hk.close_all()
        os.close(dfd)
    assert not hk.running and not hk.ready and _open_unnamed(tmp_path) == 0
    hk.close_later(os.open(tmp_path / "replaced", os.O_RDONLY))  # stopped: closes at once


def test_a_lone_deferred_close_is_made_without_any_other_wake_up(tmp_path: Path) -> None:
    """Deferred closes are batched (the thread is woken for them only every
    CLOSE_BATCH): a single one, with nothing else handed over, is still made
    within CLOSE_DELAY, also while the thread sleeps with no pool to watch."""
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    hk = Housekeeper(dfd, pool_size=2)
    handed = os.open(tmp_path / "replaced", os.O_RDWR | os.O_CREAT, 0o600)

    def closed() -> bool:
        try:
            os.fstat(handed)
        except OSError:
            return True
        return False

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hk.run)
            await trio.sleep(0.2)  # the thread sleeps: no pool, nothing handed over
            hk.close_later(handed)
            assert await _until(closed, timeout=housekeeping.CLOSE_DELAY + 2), \
                "a lone deferred close was never made"
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        hk.close_all()
        os.close(dfd)


def test_a_pool_in_use_is_not_drained_as_idle(tmp_path: Path) -> None:
    """The thread is woken for the pool only once it is down to half; shadows
    taken more often than the idle delay keep it filled (no misses)."""
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    hk = Housekeeper(dfd, pool_size=8, idle_drain=0.3)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hk.run)
            await trio.sleep(0.1)
            assert hk.take_shadow() is None  # the first ask fills the pool
            assert await _until(lambda: len(hk.ready) == 8)
            misses = hk.misses
            for _ in range(12):  # 2.4 s, each take 0.2 s after the last: never idle
                await trio.sleep(0.2)
                fd = hk.take_shadow()
                assert fd is not None, "the pool was drained while in use"
                os.close(fd)
            assert hk.misses == misses
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        hk.close_all()
        os.close(dfd)

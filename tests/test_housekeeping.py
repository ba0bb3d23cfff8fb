"""atomicfs.housekeeping: the worker thread, its shadow pool and deferred closes
(no FUSE: the pool lives in a plain directory)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

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

"""The commit's worker-thread hand-offs (atomicfs/handoff.py).

A durable commit hands its file's fsync and its directory's fsync to worker
threads through trio's thread cache directly, without ``trio.to_thread``'s
checkpoints and per-job thread naming; the same results, exceptions and
context, bounded by the same thread limiter."""

from __future__ import annotations

import contextvars
import os
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import MountFactory, needs_fuse
from stracekit import PtraceRefused, Tracer

from atomicfs import handoff

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("handoff_test", default="unset")


def test_runs_in_another_thread_and_returns_the_result() -> None:
    async def main() -> tuple[int, int]:
        return await handoff.run_sync(lambda a, b: (threading.get_ident(), a + b), 2, 3)

    ident, total = trio.run(main)
    assert ident != threading.get_ident() and total == 5


def test_an_exception_of_the_work_is_raised_in_the_caller() -> None:
    def fail() -> None:
        raise OSError(5, "the disk said no")

    async def main() -> None:
        await handoff.run_sync(fail)

    with pytest.raises(OSError, match="the disk said no"):
        trio.run(main)


def test_the_work_sees_the_callers_context() -> None:
    async def main() -> str:
        VAR.set("from the request")
        return await handoff.run_sync(VAR.get)

    assert trio.run(main) == "from the request"


def test_with_the_limiter_full_it_waits_for_a_slot() -> None:
    """No more threads than the limiter allows: with every slot taken, the call
    waits (through trio.to_thread) until one is free, then runs."""
    async def main() -> list[str]:
        limiter = trio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = 1
        order: list[str] = []
        release = threading.Event()

        def first() -> None:
            release.wait(5)
            order.append("first")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(handoff.run_sync, first)
            await trio.testing.wait_all_tasks_blocked()
            assert limiter.borrowed_tokens == 1

            async def second() -> None:
                await handoff.run_sync(order.append, "second")
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert order == []  # the second waits for the slot
            release.set()
        return order

    assert trio.run(main) == ["first", "second"]


@needs_fuse
def test_durable_saves_hand_off_without_naming_a_thread_per_job(
        mount_factory: MountFactory, tmp_path: Path) -> None:
    """trio.to_thread names its worker thread (two prctl) at every job: a durable
    save paid that twice.  Now the saves are still durable (file and directory
    fsync'ed before close returns) with no prctl at all."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(b"old\n")
    m = mount_factory(source=src)
    assert m.proc is not None
    try:
        tracer = Tracer(m.proc.pid, tmp_path / "daemon.strace", extra=["prctl"])
    except (FileNotFoundError, PtraceRefused) as exc:
        pytest.skip(f"needs strace with ptrace: {exc}")
    try:
        for i in range(20):
            fd = os.open(m.mountpoint / f"f{i}", os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, b"new %d\n" % i)
            finally:
                os.close(fd)
    finally:
        calls = tracer.stop()
    for i in range(20):
        assert (src / f"f{i}").read_bytes() == b"new %d\n" % i
    fsyncs = [c for c in calls if c.name in ("fsync", "fdatasync")]
    assert len(fsyncs) >= 40, f"{len(fsyncs)} fsyncs for 20 durable saves"
    prctls = [c.line for c in calls if c.name == "prctl"]
    assert prctls == [], f"{len(prctls)} prctl calls in 20 saves: {prctls[:4]}"

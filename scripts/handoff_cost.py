"""What one hand-off per durable commit could win at most: the commit's steps alone.

A benchmark of the mechanism, not of the daemon: no FUSE, no requests, no
namespace gate.  In a trio loop, on files in DIR (default: a new directory in
/var/tmp), rounds alternate between ways of doing a durable commit's steps
(the new version's fsync, its rename over the name, the directory's fsync):

- ``two-jobs``: as the daemon does today: fsync in a worker thread, rename in
  the event loop, directory fsync in a second worker-thread job;
- ``one-job``: all three in one worker-thread job (the lever, without the
  per-directory gate it would need; so its ceiling);
- ``dir-inline``: fsync in a worker thread, rename and directory fsync in the
  event loop (one hand-off, but the loop blocked for the directory fsync);
- ``noop-thread``: a no-op ``trio.to_thread.run_sync`` round trip;
- ``noop-worker``: a no-op round trip to a persistent worker thread woken
  through a queue, answering through ``trio.lowlevel`` (reschedule by token);
- ``noop-soon``: a no-op round trip through ``trio.lowlevel.start_thread_soon``
  (trio's thread cache without ``to_thread``'s limiter, checkpoints and names).

Prints the median and 90th percentile of each, in µs, and the median of the
per-round ratio two-jobs / one-job.  Usage:
``python scripts/handoff_cost.py [ROUNDS] [DIR]``.
"""

from __future__ import annotations

import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import outcome  # trio's own dependency
import trio


class Worker:
    """One long-lived thread; a job's answer comes back by rescheduling the task."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            fn, token, task = item
            token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.capture(fn))

    async def run(self, fn: Callable[[], Any]) -> Any:
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        self.jobs.put((fn, token, task))
        return await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()


async def soon(fn: Callable[[], Any]) -> Any:
    """trio's thread cache directly (no limiter, no checkpoints, no thread names)."""
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()

    def deliver(result: Any) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)
    trio.lowlevel.start_thread_soon(fn, deliver)
    return (await trio.lowlevel.wait_task_rescheduled(
        lambda _: trio.lowlevel.Abort.FAILED))


def _new_version(d: str, i: int) -> tuple[int, str, str]:
    tmp = os.path.join(d, f".tmp{i}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"x" * 4096)
    return fd, tmp, os.path.join(d, f"file{i % 50}")


async def main(rounds: int, d: str) -> None:
    dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    worker = Worker()
    times: dict[str, list[float]] = {k: [] for k in
                                     ("two-jobs", "one-job", "dir-inline",
                                      "noop-thread", "noop-worker", "noop-soon")}
    ratios = []

    async def two_jobs(i: int) -> None:
        fd, tmp, name = _new_version(d, i)
        await trio.to_thread.run_sync(os.fsync, fd)
        os.rename(tmp, name)
        await trio.to_thread.run_sync(os.fsync, dir_fd)
        os.close(fd)

    async def one_job(i: int) -> None:
        fd, tmp, name = _new_version(d, i)

        def job() -> None:
            os.fsync(fd)
            os.rename(tmp, name)
            os.fsync(dir_fd)
        await trio.to_thread.run_sync(job)
        os.close(fd)

    async def dir_inline(i: int) -> None:
        fd, tmp, name = _new_version(d, i)
        await trio.to_thread.run_sync(os.fsync, fd)
        os.rename(tmp, name)
        os.fsync(dir_fd)
        os.close(fd)

    async def noop_thread(i: int) -> None:
        await trio.to_thread.run_sync(lambda: None)

    async def noop_worker(i: int) -> None:
        await worker.run(lambda: None)

    async def noop_soon(i: int) -> None:
        await soon(lambda: None)

    ways = {"two-jobs": two_jobs, "one-job": one_job, "dir-inline": dir_inline,
            "noop-thread": noop_thread, "noop-worker": noop_worker,
            "noop-soon": noop_soon}
    names = list(ways)
    try:
        for r in range(rounds):
            this = {}
            for k in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                await trio.sleep(0.002)
                t0 = time.perf_counter()
                await ways[k](r)
                this[k] = (time.perf_counter() - t0) * 1e6
                times[k].append(this[k])
            ratios.append(this["two-jobs"] / this["one-job"])
    finally:
        worker.stop()
        os.close(dir_fd)
    print(f"{rounds} rounds in {d}; µs per operation")
    print(f"{'':12} {'median':>8} {'p90':>8}")
    for k, v in times.items():
        v.sort()
        print(f"{k:12} {statistics.median(v):8.0f} {v[int(len(v) * 0.9)]:8.0f}")
    print(f"two-jobs / one-job, median of per-round ratios: {statistics.median(ratios):.3f}; "
          f"one-job faster in {sum(x > 1 for x in ratios)} of {rounds} rounds")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    if len(sys.argv) > 2:
        trio.run(main, n, sys.argv[2])
    else:
        d = tempfile.mkdtemp(prefix="handoff-", dir="/var/tmp")
        try:
            trio.run(main, n, d)
        finally:
            shutil.rmtree(d)

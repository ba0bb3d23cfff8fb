"""A cheaper hand-off to a worker thread for the steps of a durable commit.

``trio.to_thread.run_sync`` costs ~290 µs per no-op round trip on this
machine, ``trio.lowlevel.start_thread_soon`` (the same thread cache) ~180 µs
(``scripts/handoff_cost.py``): the difference is ``to_thread``'s checkpoints
(scheduler passes before and after), the acquire of the thread limiter as a
checkpoint, and the thread's naming (two ``prctl``) at every job.
:func:`run_sync` keeps what matters of it:

- the default thread limiter bounds the threads: a slot is taken without a
  checkpoint (``acquire_on_behalf_of_nowait``); with none free, the call falls
  back to ``trio.to_thread.run_sync``, which waits for one;
- the work runs in a copy of the caller's context (the request number of
  :mod:`atomicfs.timing`, the inode pins), as in ``to_thread``;
- it cannot be cancelled once started (``to_thread``'s default: the caller
  waits for the thread to finish); unlike ``to_thread`` it does not check for
  a cancellation before starting — used only where the callers shield or do
  not cancel (the commit's own steps);
- exceptions of the work are raised in the caller.

Between the call and its return the event loop runs other tasks, as at any
await: nothing about the table or sessions may be assumed unchanged across it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

from . import timing

T = TypeVar("T")


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in one of trio's cached worker threads and return its result."""
    limiter = trio.to_thread.current_default_thread_limiter()
    task = trio.lowlevel.current_task()
    try:
        limiter.acquire_on_behalf_of_nowait(task)
    except trio.WouldBlock:
        return await trio.to_thread.run_sync(fn, *args)
    try:
        name = getattr(fn, "__name__", "work")
        timing.mark(f"handoff:{name}")
        token = trio.lowlevel.current_trio_token()
        context = contextvars.copy_context()

        def work() -> T:
            timing.mark(f"thread:{name}")
            try:
                return context.run(fn, *args)
            finally:
                timing.mark(f"thread-end:{name}")

        def deliver(result: outcome.Outcome[T]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        trio.lowlevel.start_thread_soon(work, deliver)
        try:
            value: T = await trio.lowlevel.wait_task_rescheduled(
                lambda _: trio.lowlevel.Abort.FAILED)
            return value
        finally:
            timing.mark(f"resumed:{name}")
    finally:
        limiter.release_on_behalf_of(task)
